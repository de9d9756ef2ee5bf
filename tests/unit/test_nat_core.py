"""The sans-IO NAT core driven with frames and a fake clock.

Frames from the VM are built with the wire codecs and go through a real
:class:`Gateway`; its events go to :meth:`NatCore.handle`.  Whatever the core
sends to the VM lands in a list (its ``emit`` sink) and is parsed back; the
I/O the core asks for comes back as actions, and the test plays the shell:
it reports dials, datagrams, echo replies and closes by calling the core.
"""

from __future__ import annotations

import ipaddress
import random
import sys

import pytest

from rdswitch.config import NetConfig
from rdswitch.stack import nat as N
from rdswitch.stack import tcp as T
from rdswitch.stack.counters import Counters
from rdswitch.stack.frames import FrameBuilder
from rdswitch.stack.gateway import Gateway, TcpIn
from rdswitch.stack.nat import (
    MAX_DNS_INFLIGHT, MAX_PINGS, TSO_MSS, CancelDial, Dial, DnsQuery, NatCore, NatPolicy, OffloadChanged, Ping,
    StartLocal, ToEndpoint, UdpClose, UdpOpen, UdpSend,
)
from rdswitch.wire import ethernet, icmp, ipv4, offload, tcp, udp
from rdswitch.wire.checksum import fold, pseudo_header_sum
from rdswitch.wire.tcp import ACK, FIN, PSH, RST, SYN

NET = NetConfig()
VM_MAC = NET.vm_mac
GW_MAC = NET.gateway_mac
VM_IP = NET.vm_ip.packed
GW_IP = NET.gateway_ip.packed
ALIAS = NET.host_alias_ip.packed  # .254: the host's loopback through the NAT table
SID = 1


def ip(s: str) -> bytes:
    return ipaddress.IPv4Address(s).packed


ALLOWED = ip("198.18.0.5")
ALLOWED_2 = ip("198.18.0.6")
DENIED = ip("10.9.9.9")  # outside allow_outbound
OTHER_VM_IP = ip("192.168.127.3")
ALLOW = (ipaddress.IPv4Network("198.18.0.0/15"), ipaddress.IPv4Network("127.0.0.0/8"))


class Rig:
    """One core with one session, a gateway in front of it and the frames it emitted."""

    def __init__(self, *, dns: bool = True, seed: int = 0, local: tuple[int, ...] = (), **policy_kw) -> None:
        policy_kw.setdefault("allow_outbound", ALLOW)
        self.gw_counters = Counters()
        self.frames = FrameBuilder(NET, self.gw_counters)
        self.gw = Gateway(NET, None, self.gw_counters, self.frames)
        self.out: list[bytes] = []
        self.core = NatCore(NatPolicy(NET, **policy_kw), self.frames, self.out.extend, dns=dns,
                            rng=random.Random(seed))
        for port in local:
            self.core.add_local_service(port)
        self.counters = Counters()
        self.state = self.core.open_session(SID, self.counters)
        self.now = 100.0

    # ---- frames from the VM ------------------------------------------------------------------
    def feed(self, frame: bytes, sid: int = SID) -> list:
        replies, ev = self.gw.input(frame, self.now)
        assert replies == [] and ev is not None
        return list(self.core.handle(sid, ev, self.now))

    def tcp(self, dst: bytes, sport: int, dport: int, flags: int, *, seq: int = 1000, ack: int = 0,
            payload: bytes = b"", src: bytes = VM_IP, window: int = 65535, sid: int = SID) -> list:
        mss = 1460 if flags & SYN else None
        seg = tcp.Segment(sport, dport, seq, ack, flags, window, payload, mss=mss)
        return self.feed(eth(ipv4.build(src, dst, ipv4.PROTO_TCP, tcp.build(seg, src, dst))), sid)

    def syn(self, dst: bytes, sport: int = 40000, dport: int = 80, *, seq: int = 1000, **kw) -> list:
        return self.tcp(dst, sport, dport, SYN, seq=seq, **kw)

    def udp(self, dst: bytes, sport: int, dport: int, payload: bytes = b"dgram", *, src: bytes = VM_IP,
            sid: int = SID) -> list:
        return self.feed(eth(ipv4.build(src, dst, ipv4.PROTO_UDP, udp.build(sport, dport, payload, src, dst))), sid)

    def ping(self, dst: bytes, ident: int = 7, seq: int = 1, payload: bytes = b"ping!", sid: int = SID) -> list:
        msg = icmp.build(icmp.IcmpMessage(icmp.ECHO_REQUEST, 0, (ident << 16) | seq, payload))
        return self.feed(eth(ipv4.build(VM_IP, dst, ipv4.PROTO_ICMP, msg)), sid)

    def offload(self, flags: int = offload.FLAG_PARTIAL_CSUM_TSO) -> list:
        return self.feed(ethernet.build(GW_MAC, VM_MAC, ethernet.TYPE_RDSWITCH, offload.capability_payload(flags)))

    # ---- what the core sent ------------------------------------------------------------------
    def take(self) -> list[bytes]:
        frames = list(self.out)
        del self.out[:]
        return frames

    def dialled(self, dst: bytes = ALIAS, sport: int = 40000, dport: int = 80, seq: int = 1000) -> N.TcpFlow:
        """A SYN dialled and connected; its SYN-ACK taken and checked to be there."""
        (dial,) = self.syn(dst, sport, dport, seq=seq)
        assert isinstance(dial, Dial)
        conn = self.core.dial_done(dial.flow, None, self.now)
        assert conn is not None
        self.core.transmit(dial.flow, conn.take_outgoing())
        (synack,) = [parse_tcp(f)[1] for f in self.take()]
        assert synack.flags == SYN | ACK
        return dial.flow


def eth(packet: bytes) -> bytes:
    return ethernet.build(GW_MAC, VM_MAC, ethernet.TYPE_IPV4, packet)


def parse_ip(frame: bytes) -> ipv4.IPv4Packet:
    dst, src, et, payload = ethernet.parse(frame)
    assert (dst, src, et) == (VM_MAC, GW_MAC, ethernet.TYPE_IPV4)
    return ipv4.parse(payload, verify=True)


def parse_tcp(frame: bytes, verify: bool = True) -> tuple[ipv4.IPv4Packet, tcp.Segment]:
    pkt = parse_ip(frame)
    assert pkt.proto == ipv4.PROTO_TCP and pkt.dst == VM_IP
    return pkt, tcp.parse(pkt.payload, pkt.src, pkt.dst, verify=verify)


def parse_udp(frame: bytes) -> tuple[ipv4.IPv4Packet, int, int, bytes]:
    pkt = parse_ip(frame)
    assert pkt.proto == ipv4.PROTO_UDP
    sport, dport, payload = udp.parse(pkt.payload, pkt.src, pkt.dst, verify=True)
    return pkt, sport, dport, bytes(payload)


def parse_icmp(frame: bytes) -> tuple[ipv4.IPv4Packet, icmp.IcmpMessage]:
    pkt = parse_ip(frame)
    assert pkt.proto == ipv4.PROTO_ICMP
    return pkt, icmp.parse(pkt.payload, verify=True)


def assert_rst_for_syn(frame: bytes, src: bytes, sport: int, dport: int, seq: int = 1000,
                       verify: bool = True) -> None:
    """``frame`` is the RST|ACK refusing the VM's SYN from ``sport`` to ``src:dport``."""
    pkt, seg = parse_tcp(frame, verify)
    assert (pkt.src, pkt.dst) == (src, VM_IP)
    assert (seg.src_port, seg.dst_port) == (dport, sport)
    assert seg.flags == RST | ACK
    assert seg.ack == (seq + 1) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# TCP: dialling


def test_syn_to_allowed_destination_dials_once():
    rig = Rig()
    actions = rig.syn(ALIAS, 40000, 8080, seq=5000)
    assert len(actions) == 1 and isinstance(actions[0], Dial)
    flow = actions[0].flow
    assert flow.dst == ("127.0.0.1", 8080)
    assert flow.key == (VM_IP, 40000, ALIAS, 8080) and flow.vm_mac == VM_MAC and flow.dialling
    assert flow.syn.seq == 5000 and flow.syn.mss == 1460
    assert rig.state.pending_dials == 1 and rig.state.tcp == {flow.key: flow}
    assert rig.take() == []


def test_retransmitted_syn_while_dialling_is_ignored():
    rig = Rig()
    (dial,) = rig.syn(ALIAS, 40000, 80)
    assert rig.syn(ALIAS, 40000, 80) == []
    assert rig.tcp(ALIAS, 40000, 80, ACK, ack=1) == []  # any other segment waits for the dial too
    assert rig.take() == [] and rig.state.pending_dials == 1 and len(rig.state.tcp) == 1


def test_dial_done_queues_synack_from_the_dialled_alias():
    rig = Rig(seed=3)
    (dial,) = rig.syn(ALIAS, 40000, 8080, seq=0xFFFFFFFF)  # the SYN's seq wraps: ack is 0
    flow = dial.flow
    conn = rig.core.dial_done(flow, None, rig.now)
    assert conn is flow.conn and not flow.dialling and flow.syn is None
    assert rig.state.pending_dials == 0 and rig.counters.values["tcp_flows_total"] == 1
    assert rig.take() == []  # queued on the connection, not sent by the core itself
    rig.core.transmit(flow, conn.take_outgoing())
    (frame,) = rig.take()
    pkt, seg = parse_tcp(frame)
    assert (pkt.src, pkt.dst) == (ALIAS, VM_IP)
    assert (seg.src_port, seg.dst_port, seg.flags, seg.ack) == (8080, 40000, SYN | ACK, 0)
    assert seg.seq == conn.iss and seg.mss == NET.mtu - 40


def test_segments_after_the_handshake_feed_the_connection_and_mark_it_dirty():
    rig = Rig()
    flow = rig.dialled(ALIAS, 40000, 80, seq=1000)
    iss = flow.conn.iss
    assert rig.tcp(ALIAS, 40000, 80, ACK | PSH, seq=1001, ack=iss + 1, payload=b"GET / HTTP/1.0\r\n\r\n") == []
    assert flow in rig.core.dirty
    assert flow.conn.state == T.ESTABLISHED and flow.conn.read(100, rig.now) == b"GET / HTTP/1.0\r\n\r\n"
    assert rig.core.take_dirty() == {flow} and rig.core.dirty == set()
    # the ACK the shell transmits once per batch
    rig.core.transmit(flow, flow.conn.take_outgoing())
    (frame,) = rig.take()
    _, seg = parse_tcp(frame)
    assert seg.flags & ACK and seg.ack == 1001 + 18


def test_rst_while_dialling_cancels_once_and_abandoned_dial_is_forgotten():
    rig = Rig()
    (dial,) = rig.syn(ALIAS, 40000, 80)
    actions = rig.tcp(ALIAS, 40000, 80, RST, seq=1001)
    assert actions == [CancelDial(dial.flow)] and dial.flow.abandoned
    assert rig.tcp(ALIAS, 40000, 80, RST, seq=1001) == []  # a second RST: already cancelling
    assert rig.syn(ALIAS, 40000, 80) == []
    assert rig.core.dial_done(dial.flow, "abandoned", rig.now) is None
    assert rig.state.tcp == {} and rig.state.pending_dials == 0
    assert rig.counters.drops["tcp-dial-abandoned"] == 1
    assert rig.take() == []


def test_dial_that_connects_after_the_vm_gave_up_is_abandoned():
    rig = Rig()
    (dial,) = rig.syn(ALIAS, 40000, 80)
    rig.tcp(ALIAS, 40000, 80, RST, seq=1001)
    assert rig.core.dial_done(dial.flow, None, rig.now) is None  # the shell closes the host stream
    assert rig.state.tcp == {} and rig.state.pending_dials == 0 and rig.take() == []
    assert rig.counters.drops["tcp-dial-abandoned"] == 1


@pytest.mark.parametrize("failure", ["refused", "failed", "timeout"])
def test_failed_dial_resets_the_vm(failure):
    rig = Rig()
    (dial,) = rig.syn(ALLOWED, 40001, 443, seq=77)
    assert rig.core.dial_done(dial.flow, failure, rig.now) is None
    (frame,) = rig.take()  # a timed-out dial too: the VM's connect must not hang until its SYNs give up
    assert_rst_for_syn(frame, ALLOWED, 40001, 443, seq=77)
    assert rig.counters.drops[f"tcp-dial-{failure}"] == 1
    assert rig.state.tcp == {} and rig.state.pending_dials == 0
    # the VM's next SYN dials again
    assert [type(a) for a in rig.syn(ALLOWED, 40001, 443)] == [Dial]


# ---------------------------------------------------------------------------------------------
# TCP: no flow, refusals


def test_segment_without_flow_is_reset_and_rst_is_not():
    rig = Rig()
    assert rig.tcp(ALLOWED, 40000, 80, ACK, seq=10, ack=12345) == []
    (frame,) = rig.take()
    pkt, seg = parse_tcp(frame)
    assert (pkt.src, seg.src_port, seg.dst_port, seg.flags, seg.seq) == (ALLOWED, 80, 40000, RST, 12345)
    assert rig.tcp(ALLOWED, 40000, 80, FIN, seq=10) == []  # no ACK: RST|ACK acking the FIN
    (frame,) = rig.take()
    _, seg = parse_tcp(frame)
    assert (seg.flags, seg.ack) == (RST | ACK, 11)
    assert rig.tcp(ALLOWED, 40000, 80, RST, seq=10) == []
    assert rig.tcp(ALLOWED, 40000, 80, RST | ACK, seq=10, ack=5) == []
    assert rig.take() == [] and rig.state.tcp == {}


def test_syn_ack_without_flow_is_reset_not_dialled():
    rig = Rig()
    assert rig.tcp(ALLOWED, 40000, 80, SYN | ACK, seq=10, ack=999) == []
    (frame,) = rig.take()
    _, seg = parse_tcp(frame)
    assert (seg.flags, seg.seq) == (RST, 999)
    assert rig.state.pending_dials == 0


@pytest.mark.parametrize("dst,reason", [
    (ip("127.0.0.1"), "loopback"),
    (DENIED, "outbound-denied"),
    (ip("169.254.169.254"), "link-local"),
    (ip("192.168.127.77"), "virtual-subnet"),
])
def test_refused_destinations_are_reset_and_counted(dst, reason):
    rig = Rig()
    assert rig.syn(dst, 40000, 80, seq=4242) == []
    (frame,) = rig.take()
    assert_rst_for_syn(frame, dst, 40000, 80, seq=4242)
    assert rig.counters.drops == {f"tcp-{reason}": 1}
    assert rig.state.tcp == {} and rig.state.pending_dials == 0


def test_flow_limit_refuses_with_rst():
    rig = Rig(max_tcp_flows=2)
    rig.dialled(ALIAS, 40000)
    rig.syn(ALIAS, 40001)  # dialling flows count too
    assert rig.syn(ALIAS, 40002, seq=9) == []
    (frame,) = rig.take()
    assert_rst_for_syn(frame, ALIAS, 40002, 80, seq=9)
    assert rig.counters.drops["tcp-flow-limit"] == 1 and len(rig.state.tcp) == 2


def test_pending_dial_limit_drops_silently():
    rig = Rig(max_pending_dials=2)
    rig.syn(ALIAS, 40000)
    rig.syn(ALIAS, 40001)
    assert rig.syn(ALIAS, 40002) == []
    assert rig.take() == []  # the VM retransmits its SYN
    assert rig.counters.drops["tcp-dial-limit"] == 1 and rig.state.pending_dials == 2
    (first,) = [f for f in rig.state.tcp.values() if f.key[1] == 40000]
    rig.core.dial_done(first, "timeout", rig.now)
    assert [type(a) for a in rig.syn(ALIAS, 40002)] == [Dial]


# ---------------------------------------------------------------------------------------------
# TCP: the gateway's own services


def test_syn_to_local_service_starts_it_with_a_synack():
    rig = Rig(local=(53,))
    actions = rig.syn(GW_IP, 40000, 53, seq=500)
    assert len(actions) == 1 and isinstance(actions[0], StartLocal) and actions[0].port == 53
    flow = actions[0].flow
    assert flow.conn is not None and rig.state.pending_dials == 0
    assert rig.counters.values["tcp_local_total"] == 1
    rig.core.transmit(flow, flow.conn.take_outgoing())
    (frame,) = rig.take()
    pkt, seg = parse_tcp(frame)
    assert (pkt.src, seg.src_port, seg.dst_port, seg.flags, seg.ack) == (GW_IP, 53, 40000, SYN | ACK, 501)


def test_syn_to_closed_gateway_port_is_reset():
    rig = Rig(local=(53,))
    assert rig.syn(GW_IP, 40000, 54, seq=500) == []
    (frame,) = rig.take()
    assert_rst_for_syn(frame, GW_IP, 40000, 54, seq=500)
    assert rig.counters.drops["tcp-closed-port"] == 1 and rig.state.tcp == {}


def test_local_service_respects_the_flow_limit():
    rig = Rig(local=(53,), max_tcp_flows=1)
    assert [type(a) for a in rig.syn(GW_IP, 40000, 53)] == [StartLocal]
    assert rig.syn(GW_IP, 40001, 53) == []
    (frame,) = rig.take()
    assert_rst_for_syn(frame, GW_IP, 40001, 53)
    assert rig.counters.drops["tcp-flow-limit"] == 1


def test_flow_closed_forgets_the_flow():
    rig = Rig()
    flow = rig.dialled()
    rig.tcp(ALIAS, 40000, 80, ACK, seq=1001, ack=flow.conn.iss + 1, payload=b"x")
    assert flow in rig.core.dirty
    rig.core.flow_closed(flow)
    assert rig.state.tcp == {} and flow not in rig.core.dirty
    rig.core.flow_closed(flow)  # twice is harmless
    # the port can be used again: a new SYN dials
    assert [type(a) for a in rig.syn(ALIAS, 40000, 80)] == [Dial]


# ---------------------------------------------------------------------------------------------
# UDP


def test_udp_new_flow_opens_then_sends_and_the_next_datagram_only_sends():
    rig = Rig()
    actions = rig.udp(ALLOWED, 5000, 9999, b"one")
    assert [type(a) for a in actions] == [UdpOpen, UdpSend]
    flow = actions[0].flow
    assert actions[1].flow is flow and bytes(actions[1].payload) == b"one"
    assert flow.key == (VM_IP, 5000, ALLOWED, 9999) and flow.dst == ("198.18.0.5", 9999)
    assert flow.last_activity == rig.now and rig.counters.values["udp_flows_total"] == 1
    rig.now += 5
    actions = rig.udp(ALLOWED, 5000, 9999, b"two")
    assert actions == [UdpSend(flow, actions[0].payload)] and bytes(actions[0].payload) == b"two"
    assert flow.last_activity == rig.now and rig.take() == []


def test_udp_reply_comes_from_the_virtual_destination():
    rig = Rig()
    (opened, _) = rig.udp(ALIAS, 5000, 7000)
    flow = opened.flow
    assert flow.dst == ("127.0.0.1", 7000)
    rig.now += 1
    rig.core.udp_reply(flow, b"answer", rig.now)
    assert flow.last_activity == rig.now
    (frame,) = rig.take()
    pkt, sport, dport, payload = parse_udp(frame)
    assert (pkt.src, pkt.dst, sport, dport, payload) == (ALIAS, VM_IP, 7000, 5000, b"answer")


def test_udp_expiry_follows_the_fake_clock():
    rig = Rig(udp_idle_timeout=30.0)
    (opened, _) = rig.udp(ALLOWED, 5000, 9999)
    flow = opened.flow
    assert not rig.core.udp_expired(flow, rig.now + 29.9)
    assert rig.core.udp_expired(flow, rig.now + 30.0)
    rig.now += 20
    rig.udp(ALLOWED, 5000, 9999)  # activity pushes the expiry
    assert not rig.core.udp_expired(flow, rig.now + 29.9)
    rig.core.udp_reply(flow, b"r", rig.now + 25)  # so does a reply
    assert not rig.core.udp_expired(flow, rig.now + 50)
    assert rig.core.udp_expired(flow, rig.now + 55)
    rig.core.udp_closed(flow)
    assert rig.state.udp == {}
    assert [type(a) for a in rig.udp(ALLOWED, 5000, 9999)] == [UdpOpen, UdpSend]


def test_udp_full_table_evicts_the_least_recently_active_flow():
    rig = Rig(max_udp_flows=3)
    a = rig.udp(ALLOWED, 5000, 1)[0].flow
    rig.now += 1
    b = rig.udp(ALLOWED, 5001, 1)[0].flow
    rig.now += 1
    c = rig.udp(ALLOWED, 5002, 1)[0].flow
    rig.now += 1
    rig.udp(ALLOWED, 5000, 1)  # a datagram from the VM makes a recent
    rig.core.udp_reply(b, b"r", rig.now)  # so does a reply to b
    rig.now += 1
    actions = rig.udp(ALLOWED, 5003, 1)  # a full table: c is the least recently active
    assert [type(x) for x in actions] == [UdpClose, UdpOpen, UdpSend] and actions[0].flow is c
    d = actions[1].flow
    assert list(rig.state.udp.values()) == [a, b, d]
    assert rig.counters.drops["udp-flow-evicted"] == 1 and rig.counters.values["udp_flows_total"] == 4
    rig.take()
    # the evicted flow's late reply still reaches the VM but does not bring it back
    rig.core.udp_reply(c, b"late", rig.now)
    assert len(rig.take()) == 1 and c not in rig.state.udp.values()
    rig.core.udp_closed(c)  # its task ends: nothing else is forgotten
    assert list(rig.state.udp.values()) == [a, b, d]
    # c's next datagram is a new flow, which evicts a (the least recently active now)
    actions = rig.udp(ALLOWED, 5002, 1)
    assert [type(x) for x in actions] == [UdpClose, UdpOpen, UdpSend] and actions[0].flow is a
    assert actions[1].flow is not c and len(rig.state.udp) == 3


def test_udp_many_flows_through_a_small_table_are_never_refused():
    rig = Rig(max_udp_flows=64)
    opened = 0
    for i in range(2000):
        rig.now += 0.001
        actions = rig.udp(ALIAS, 10000 + i, 7)
        opened += sum(type(x) is UdpOpen for x in actions)
        assert len(rig.state.udp) <= 64
    assert opened == 2000 and rig.counters.drops["udp-flow-evicted"] == 2000 - 64


@pytest.mark.parametrize("dst", [ip("255.255.255.255"), ip("192.168.127.255"), ip("224.0.0.251"),
                                 ip("239.255.255.250")])
def test_udp_broadcast_and_multicast_get_no_icmp_error(dst):
    rig = Rig()
    frame = ethernet.build(ethernet.BROADCAST, VM_MAC, ethernet.TYPE_IPV4,
                           ipv4.build(VM_IP, dst, ipv4.PROTO_UDP, udp.build(5353, 5353, b"mdns", VM_IP, dst)))
    assert rig.feed(frame) == []
    assert rig.take() == []  # RFC 1122 3.2.2: no ICMP error about a broadcast/multicast datagram
    assert rig.counters.drops["udp-not-unicast"] == 1 and rig.state.udp == {}


@pytest.mark.parametrize("dst,reason", [(DENIED, "outbound-denied"), (ip("127.0.0.1"), "loopback"),
                                        (ip("192.168.127.77"), "virtual-subnet")])
def test_udp_denied_destination_gets_admin_prohibited(dst, reason):
    rig = Rig()
    packet = ipv4.build(VM_IP, dst, ipv4.PROTO_UDP, udp.build(5000, 9, b"discard me", VM_IP, dst))
    assert rig.feed(eth(packet)) == []
    (frame,) = rig.take()
    pkt, msg = parse_icmp(frame)
    assert (pkt.src, pkt.dst) == (GW_IP, VM_IP)
    assert (msg.type, msg.code) == (icmp.DEST_UNREACH, icmp.ADMIN_PROHIBITED)
    assert bytes(msg.payload) == packet[:28]  # the IP header and the first 8 bytes
    assert rig.counters.drops[f"udp-{reason}"] == 1 and rig.state.udp == {}


def test_udp_to_closed_gateway_port_is_port_unreachable():
    rig = Rig()
    packet = ipv4.build(VM_IP, GW_IP, ipv4.PROTO_UDP, udp.build(5000, 4444, b"?", VM_IP, GW_IP))
    assert rig.feed(eth(packet)) == []
    (frame,) = rig.take()
    pkt, msg = parse_icmp(frame)
    assert (pkt.src, msg.type, msg.code, bytes(msg.payload)) == (GW_IP, icmp.DEST_UNREACH, icmp.PORT_UNREACH,
                                                                   packet[:28])
    assert rig.counters.drops["udp-closed-port"] == 1


def test_dns_to_gateway_is_a_query_within_the_inflight_cap():
    rig = Rig()
    (q,) = rig.udp(GW_IP, 5353, 53, b"query-0")
    assert q == DnsQuery(SID, VM_MAC, VM_IP, 5353, b"query-0")
    for i in range(1, MAX_DNS_INFLIGHT):
        assert len(rig.udp(GW_IP, 5353, 53, b"q%d" % i)) == 1
    assert rig.state.dns_queries == MAX_DNS_INFLIGHT
    assert rig.udp(GW_IP, 5353, 53, b"one too many") == []
    assert rig.take() == [] and rig.counters.drops["dns-inflight-limit"] == 1
    rig.core.udp_to_vm(SID, VM_MAC, 53, VM_IP, 5353, b"answer")
    (frame,) = rig.take()
    pkt, sport, dport, payload = parse_udp(frame)
    assert (pkt.src, sport, dport, payload) == (GW_IP, 53, 5353, b"answer")
    rig.core.dns_done(SID)
    assert rig.state.dns_queries == MAX_DNS_INFLIGHT - 1
    assert [type(a) for a in rig.udp(GW_IP, 5353, 53, b"again")] == [DnsQuery]


def test_dns_disabled_means_port_53_is_closed():
    rig = Rig(dns=False)
    assert rig.udp(GW_IP, 5353, 53) == []
    (frame,) = rig.take()
    assert parse_icmp(frame)[1].code == icmp.PORT_UNREACH


# ---------------------------------------------------------------------------------------------
# Port-forward UDP endpoints


def test_endpoint_takes_datagrams_only_from_its_remote():
    rig = Rig()
    ep = rig.core.open_endpoint(SID, VM_IP, 6000)
    assert N.EPHEMERAL_FIRST <= ep.port <= N.EPHEMERAL_LAST
    actions = rig.udp(GW_IP, 6000, ep.port, b"reply")
    assert actions == [ToEndpoint(ep, actions[0].payload)] and bytes(actions[0].payload) == b"reply"
    assert rig.udp(GW_IP, 6001, ep.port) == []  # another port
    assert rig.udp(GW_IP, 6000, ep.port, src=OTHER_VM_IP) == []  # another VM
    assert rig.take() == [] and rig.counters.drops["udp-endpoint-foreign-source"] == 2
    rig.core.close_endpoint(ep)
    assert rig.udp(GW_IP, 6000, ep.port) == []
    (frame,) = rig.take()
    assert parse_icmp(frame)[1].code == icmp.PORT_UNREACH
    assert rig.counters.drops["udp-closed-port"] == 1


def test_endpoints_get_distinct_ports():
    rig = Rig()
    a = rig.core.open_endpoint(SID, VM_IP, 6000)
    b = rig.core.open_endpoint(SID, VM_IP, 6000)
    assert a.port != b.port and rig.state.endpoints == {a.port: a, b.port: b}


# ---------------------------------------------------------------------------------------------
# ICMP echo


def test_ping_alias_goes_to_host_loopback_and_reply_comes_from_the_alias():
    rig = Rig()
    (p,) = rig.ping(ALIAS, ident=0x1234, seq=9, payload=b"abcdefgh")
    assert isinstance(p, Ping) and p.dst == "127.0.0.1" and p.virtual_dst == ALIAS
    assert (p.sid, p.vm_mac, p.vm_ip, p.msg.ident, p.msg.seq) == (SID, VM_MAC, VM_IP, 0x1234, 9)
    assert rig.state.pings == 1 and rig.take() == []
    rig.core.ping_reply(p, b"abcdefgh")
    (frame,) = rig.take()
    pkt, msg = parse_icmp(frame)
    assert (pkt.src, pkt.dst) == (ALIAS, VM_IP)
    assert (msg.type, msg.code, msg.ident, msg.seq, bytes(msg.payload)) == (icmp.ECHO_REPLY, 0, 0x1234, 9, b"abcdefgh")
    assert rig.counters.values["icmp_echo_forwarded"] == 1
    rig.core.ping_done(p)
    assert rig.state.pings == 0


def test_pings_in_flight_are_capped():
    rig = Rig()
    pings = [rig.ping(ALLOWED, seq=i)[0] for i in range(MAX_PINGS)]
    assert rig.ping(ALLOWED, seq=999) == [] and rig.counters.drops["icmp-limit"] == 1
    rig.core.ping_done(pings[0], "no-reply")
    assert rig.counters.drops["icmp-no-reply"] == 1 and rig.state.pings == MAX_PINGS - 1
    assert len(rig.ping(ALLOWED, seq=1000)) == 1
    assert rig.take() == []


@pytest.mark.parametrize("dst,reason", [(DENIED, "outbound-denied"), (ip("127.0.0.1"), "loopback"),
                                        (ip("192.168.127.255"), "not-unicast")])
def test_ping_to_denied_destination_is_counted_silently(dst, reason):
    rig = Rig()
    assert rig.ping(dst) == []
    assert rig.take() == [] and rig.counters.drops[f"icmp-{reason}"] == 1 and rig.state.pings == 0


# ---------------------------------------------------------------------------------------------
# Offload


def test_offload_changes_once_and_later_flows_use_it():
    rig = Rig()
    before = rig.dialled(ALIAS, 40000)
    assert rig.offload() == [OffloadChanged(SID, True)]
    assert rig.offload() == []
    assert rig.state.offload
    after = rig.dialled(ALIAS, 40001)
    assert after.partial and after.conn.tso_mss == TSO_MSS
    assert not before.partial and before.conn.tso_mss != TSO_MSS
    # frames of a partial flow carry the pseudo-header sum only: the plain checksum does not verify
    after.conn.receive_segment(tcp.Segment(40001, 80, 1001, after.conn.iss + 1, ACK, 65535), rig.now)
    after.conn.send(b"x" * 100, rig.now)
    rig.core.transmit(after, after.conn.take_outgoing())
    frames = rig.take()
    assert frames
    for frame in frames:
        _, seg = parse_tcp(frame, verify=False)
        assert seg.src_port == 80 and bytes(seg.payload) == b"x" * 100
    assert rig.offload(0) == [OffloadChanged(SID, False)]


@pytest.mark.parametrize("on_at_syn", [False, True])
def test_dial_straddling_an_offload_change_follows_the_offload_at_its_end(on_at_syn):
    """The flow's checksum mode and segment size are decided together, when its first frame goes out.

    A VM that reconnects (a restarted host-switch) sends SYNs at once; its
    vm-switch announces offload only when DHCP binds, often while those dial.
    """
    rig = Rig()
    if on_at_syn:
        rig.offload()
    (dial,) = rig.syn(ALIAS, 40000, 80)
    rig.offload(0 if on_at_syn else offload.FLAG_PARTIAL_CSUM_TSO)
    on = not on_at_syn
    conn = rig.core.dial_done(dial.flow, None, rig.now)
    assert dial.flow.partial == on and (conn.tso_mss == TSO_MSS) == on
    conn.receive_segment(tcp.Segment(40000, 80, 1001, conn.iss + 1, ACK, 65535), rig.now)
    conn.send(b"y" * 3000, rig.now)
    rig.core.transmit(dial.flow, conn.take_outgoing())
    frames = rig.take()
    data = [f for f in frames if not parse_tcp(f, verify=False)[1].flags & SYN]
    assert data
    for frame in data:
        pkt = parse_ip(frame)
        field = int.from_bytes(pkt.payload[16:18], "big")
        pseudo = fold(pseudo_header_sum(pkt.src, pkt.dst, tcp.PROTO, len(pkt.payload)))
        if on:
            assert field == pseudo
        else:
            tcp.parse(pkt.payload, pkt.src, pkt.dst, verify=True)
            assert len(pkt.payload) - 20 <= NET.mtu - 40  # no TSO segments to a plain tap


def test_failed_dial_rst_follows_the_offload_at_its_end():
    rig = Rig()
    (dial,) = rig.syn(ALLOWED, 40000, 443, seq=9)
    rig.offload()
    rig.core.dial_done(dial.flow, "refused", rig.now)
    (frame,) = rig.take()
    assert_rst_for_syn(frame, ALLOWED, 40000, 443, seq=9, verify=False)
    pkt = parse_ip(frame)
    assert int.from_bytes(pkt.payload[16:18], "big") == fold(pseudo_header_sum(pkt.src, pkt.dst, tcp.PROTO, 20))


# ---------------------------------------------------------------------------------------------
# Sessions, ports, port forwarding


def test_close_session_forgets_everything():
    rig = Rig(local=(53,))
    open_flow = rig.dialled(ALIAS, 40000)
    (dial,) = rig.syn(ALIAS, 40001)
    (local,) = rig.syn(GW_IP, 40002, 53)
    rig.udp(ALLOWED, 5000, 1)
    rig.tcp(ALIAS, 40000, 80, ACK, seq=1001, ack=open_flow.conn.iss + 1, payload=b"x")
    assert open_flow in rig.core.dirty
    flows = rig.core.close_session(SID)
    assert set(flows) == {open_flow, local.flow}
    assert SID not in rig.core.sessions and rig.core.dirty == set()
    assert rig.core.close_session(SID) == []
    # events and reports for the gone session yield nothing
    assert rig.syn(ALIAS, 40003) == [] and rig.udp(ALLOWED, 5000, 1) == [] and rig.ping(ALIAS) == []
    assert rig.core.dial_done(dial.flow, None, rig.now) is None
    rig.core.dial_done(dial.flow, "refused", rig.now)
    rig.core.dns_done(SID)
    assert rig.take() == []


def test_events_for_an_unknown_session_yield_nothing():
    rig = Rig(local=(53,))
    assert rig.syn(ALIAS, 40000, sid=2) == []
    assert rig.tcp(ALIAS, 40000, 80, ACK, sid=2) == []
    assert rig.udp(DENIED, 5000, 1, sid=2) == []
    assert rig.udp(GW_IP, 5000, 53, sid=2) == []
    assert rig.ping(ALIAS, sid=2) == []
    assert rig.take() == [] and 2 not in rig.core.sessions


def test_ephemeral_port_wraps_and_skips_taken_ports():
    rig = Rig(local=(N.EPHEMERAL_FIRST + 1,))
    core = rig.core
    assert core.ephemeral_port() == N.EPHEMERAL_FIRST
    assert core.ephemeral_port() == N.EPHEMERAL_FIRST + 2  # +1 is a local service
    core._next_ephemeral = N.EPHEMERAL_LAST - 1
    assert core.ephemeral_port(lambda p: p == N.EPHEMERAL_LAST - 1) == N.EPHEMERAL_LAST
    assert core.ephemeral_port(lambda p: p == N.EPHEMERAL_FIRST) == N.EPHEMERAL_FIRST + 2
    with pytest.raises(OSError):
        core.ephemeral_port(lambda p: True)


def test_connect_to_vm_queues_a_syn_from_the_gateway():
    rig = Rig(seed=5)
    flow = rig.core.connect_to_vm(SID, VM_MAC, VM_IP, 22, rig.now)
    vm_ip, vm_port, gw, port = flow.key
    assert (vm_ip, vm_port, gw) == (VM_IP, 22, GW_IP) and N.EPHEMERAL_FIRST <= port <= N.EPHEMERAL_LAST
    assert rig.state.tcp[flow.key] is flow and not flow.dialling
    rig.core.transmit(flow, flow.conn.take_outgoing())
    (frame,) = rig.take()
    pkt, seg = parse_tcp(frame)
    assert (pkt.src, seg.src_port, seg.dst_port, seg.flags) == (GW_IP, port, 22, SYN)
    # the VM's SYN-ACK reaches the connection through the flow table
    assert rig.tcp(GW_IP, 22, port, SYN | ACK, seq=7000, ack=seg.seq + 1) == []
    assert flow in rig.core.dirty and flow.conn.state == T.ESTABLISHED
    # a second forward to the same VM port gets another gateway port
    other = rig.core.connect_to_vm(SID, VM_MAC, VM_IP, 22, rig.now)
    assert other.key[3] != port


# ---------------------------------------------------------------------------------------------
# Property: random traffic and reports keep the tables bounded, answer every refusal, leak nothing

from unittest import mock  # noqa: E402

from hypothesis import event, settings, strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test  # noqa: E402

VM_PORTS = (40000, 40001, 40002, 40003)
#: (destination ip, port): dialled (the alias, an allowed address), refused, or the gateway's services
TCP_DSTS = ((ALIAS, 80), (ALLOWED, 443), (ALLOWED_2, 443), (DENIED, 80), (ip("127.0.0.1"), 80),
            (ip("169.254.169.254"), 80), (GW_IP, 53), (GW_IP, 54))
UDP_DSTS = ((ALLOWED, 53), (ALIAS, 7000), (ALLOWED_2, 123), (DENIED, 9), (ip("192.168.127.77"), 9),
            (ip("255.255.255.255"), 5353), (ip("224.0.0.251"), 5353))
PING_DSTS = (ALIAS, ALLOWED, DENIED, ip("192.168.127.255"))
OUTCOMES = (None, "refused", "failed", "timeout", "abandoned")
#: what the shell reports for a dial: connected as often as not, so that open flows pile up
DIAL_OUTCOMES = (None,) * 4 + OUTCOMES[1:]
LIMITS = dict(max_tcp_flows=4, max_pending_dials=3, max_udp_flows=4, udp_idle_timeout=30.0)
SMALL_PINGS = 3
SMALL_DNS = 4


def check_tcp_checksum(frame: bytes, partial: bool) -> None:
    """A TCP frame to the VM has a full checksum, or (``partial``, not a SYN) the pseudo-header sum only."""
    pkt = parse_ip(frame)
    seg = tcp.parse(pkt.payload)
    if partial and not seg.flags & SYN:
        field = int.from_bytes(pkt.payload[16:18], "big")
        assert field == fold(pseudo_header_sum(pkt.src, pkt.dst, tcp.PROTO, len(pkt.payload)))
    else:
        tcp.parse(pkt.payload, pkt.src, pkt.dst, verify=True)


class NatMachine(RuleBasedStateMachine):
    """Plays a VM and the shell against one core; the model is what the shell would know.

    The VM's session may end and a new one start (the VM reconnected) while the
    shell still has reports of the old one to make: those must change nothing.
    """

    def __init__(self) -> None:
        super().__init__()
        self.rig = Rig(local=(53,), **LIMITS)
        self.core = self.rig.core
        self.sid = SID
        self.state = self.rig.state
        self.pending: list[N.TcpFlow] = []  # Dial actions not reported yet
        self.syn_seq: dict[N.TcpFlow, int] = {}
        self.open: list[N.TcpFlow] = []  # flows with a connection the shell has not closed
        self.udp_flows: list[N.UdpFlow] = []
        self.endpoints: list[N.UdpEndpoint] = []
        self.pings: list[Ping] = []
        self.dns = 0
        self.stale: list[tuple[str, object]] = []  # reports still due for sessions that ended

    @property
    def counters(self) -> Counters:
        return self.state.counters

    def take(self, partial: bool | None = None) -> list[bytes]:
        frames = self.rig.take()
        if partial is not None:
            for frame in frames:
                check_tcp_checksum(frame, partial)
        return frames

    # ---- the VM ------------------------------------------------------------------------------
    def _target(self, data, existing: int = 2) -> tuple[int, bytes, int]:
        """The ports of a TCP segment from the VM: one time in ``existing`` those of a flow in the table, else any."""
        flows = list(self.state.tcp.values())
        if flows and data.draw(st.integers(1, existing)) == 1:
            _, port, dst_ip, dport = data.draw(st.sampled_from(flows)).key
        else:
            port = data.draw(st.sampled_from(VM_PORTS))
            dst_ip, dport = data.draw(st.sampled_from(TCP_DSTS))
        return port, dst_ip, dport

    @rule(data=st.data(), seq=st.integers(0, 2**32 - 1))
    def syn(self, data, seq):
        state = self.state
        port, dst_ip, dport = self._target(data, existing=4)  # mostly new flows, to fill the tables
        existing = state.tcp.get((VM_IP, port, dst_ip, dport))
        dial_limited = self.counters.drops["tcp-dial-limit"]
        actions = self.rig.syn(dst_ip, port, dport, seq=seq, sid=self.sid)
        frames = self.take(state.offload)
        if existing is not None:  # a retransmission (or a SYN on an open connection): the flow's business
            event("syn: retransmitted while dialling" if existing.dialling else "syn: on an open flow")
            assert actions == [] and frames == []
            return
        kinds = [type(a) for a in actions]
        if kinds == [Dial]:
            flow = actions[0].flow
            assert frames == [] and flow.dst[1] == dport and flow.partial == state.offload
            self.pending.append(flow)
            self.syn_seq[flow] = seq
        elif kinds == [StartLocal]:
            flow = actions[0].flow
            assert frames == [] and dst_ip == GW_IP and actions[0].port == dport == 53
            assert flow.partial == state.offload and (flow.conn.tso_mss == TSO_MSS) == state.offload
            self.open.append(flow)
        else:
            assert actions == []
            if self.counters.drops["tcp-dial-limit"] > dial_limited:
                event("syn: dial limit")
                assert frames == [] and state.pending_dials == LIMITS["max_pending_dials"]
            else:  # refused: exactly one RST for its ports
                full = len(state.tcp) >= LIMITS["max_tcp_flows"]
                event(f"syn: refused{', flow limit' if full else ''}{' (local)' if dst_ip == GW_IP else ''}")
                assert len(frames) == 1
                assert_rst_for_syn(frames[0], dst_ip, port, dport, seq=seq, verify=not state.offload)

    @rule(data=st.data(), seq=st.integers(0, 2**32 - 1))
    def syn_too(self, data, seq):  # SYNs are what fills the tables: twice the weight
        self.syn(data, seq)

    @rule(data=st.data())
    def rst(self, data):
        port, dst_ip, dport = self._target(data)
        flow = self.state.tcp.get((VM_IP, port, dst_ip, dport))
        cancel = flow is not None and flow.dialling and not flow.abandoned
        actions = self.rig.tcp(dst_ip, port, dport, RST, seq=1, sid=self.sid)
        assert actions == ([CancelDial(flow)] if cancel else [])
        if cancel:
            event("rst: dial cancelled")
        assert self.take() == []  # a RST is never answered

    @rule(data=st.data(), payload=st.binary(max_size=20))
    def segment(self, data, payload):
        port, dst_ip, dport = self._target(data)
        flow = self.state.tcp.get((VM_IP, port, dst_ip, dport))
        ack = flow.conn.iss + 1 if flow is not None and flow.conn is not None else 777
        offload = self.state.offload
        assert self.rig.tcp(dst_ip, port, dport, ACK, seq=5, ack=ack, payload=payload, sid=self.sid) == []
        frames = self.take(offload)
        if flow is None:
            (frame,) = frames
            pkt, seg = parse_tcp(frame, verify=False)
            assert (pkt.src, seg.src_port, seg.dst_port, seg.flags, seg.seq) == (dst_ip, dport, port, RST, 777)
        else:
            assert frames == []
            assert (flow in self.core.dirty) == (flow.conn is not None)

    @rule(data=st.data(), payload=st.binary(max_size=20))
    def udp(self, data, payload):
        rig, state = self.rig, self.state
        if state.udp and data.draw(st.booleans()):
            _, port, dst_ip, dport = data.draw(st.sampled_from(list(state.udp.values()))).key
        else:
            port = data.draw(st.sampled_from(VM_PORTS))
            dst_ip, dport = data.draw(st.sampled_from(UDP_DSTS))
        existing = state.udp.get((VM_IP, port, dst_ip, dport))
        full = len(state.udp) >= LIMITS["max_udp_flows"]
        flows_before = list(state.udp.values())
        mac = ethernet.BROADCAST if dst_ip == ip("255.255.255.255") else GW_MAC
        packet = ipv4.build(VM_IP, dst_ip, ipv4.PROTO_UDP, udp.build(port, dport, payload, VM_IP, dst_ip))
        actions = rig.feed(ethernet.build(mac, VM_MAC, ethernet.TYPE_IPV4, packet), self.sid)
        frames = self.take()
        policy_dst, reason = self.core.policy.destination(dst_ip)
        if existing is not None:
            assert actions == [UdpSend(existing, actions[0].payload)] and bytes(actions[0].payload) == payload
            assert existing.last_activity == rig.now and frames == []
        elif policy_dst is None:
            assert actions == []
            if reason == "not-unicast":
                assert frames == []
            else:
                (frame,) = frames
                pkt, msg = parse_icmp(frame)
                assert (pkt.src, msg.code, bytes(msg.payload)) == (GW_IP, icmp.ADMIN_PROHIBITED, packet[:28])
        elif full:
            event("udp: full table evicts")
            assert [type(a) for a in actions] == [UdpClose, UdpOpen, UdpSend] and frames == []
            assert actions[0].flow in flows_before and actions[0].flow not in state.udp.values()
            assert actions[0].flow.last_activity == min(f.last_activity for f in flows_before)
            self.udp_flows.remove(actions[0].flow)
            self.udp_flows.append(actions[1].flow)
        else:
            assert [type(a) for a in actions] == [UdpOpen, UdpSend] and frames == []
            self.udp_flows.append(actions[0].flow)

    @rule(data=st.data(), src_ip=st.sampled_from([VM_IP, OTHER_VM_IP]), src_port=st.sampled_from(VM_PORTS))
    def to_gateway_port(self, data, src_ip, src_port):
        """A datagram to a port-forward endpoint's gateway port (or one that is not, or no longer, one)."""
        if self.endpoints and data.draw(st.booleans()):
            ep = data.draw(st.sampled_from(self.endpoints))
            port, (src_ip, src_port) = ep.port, ep.remote
        else:
            port = data.draw(st.sampled_from([ep.port for ep in self.endpoints] + [4444, N.EPHEMERAL_FIRST]))
        ep = self.state.endpoints.get(port)
        foreign = self.counters.drops["udp-endpoint-foreign-source"]
        packet = ipv4.build(src_ip, GW_IP, ipv4.PROTO_UDP, udp.build(src_port, port, b"fwd", src_ip, GW_IP))
        actions = self.rig.feed(eth(packet), self.sid)
        frames = self.take()
        if ep is None:
            assert actions == []
            (frame,) = frames
            pkt, msg = parse_ip(frame), parse_icmp(frame)[1]
            assert (pkt.dst, msg.code, bytes(msg.payload)) == (src_ip, icmp.PORT_UNREACH, packet[:28])
        elif ep.remote == (src_ip, src_port):
            event("endpoint: delivered")
            assert frames == [] and actions == [ToEndpoint(ep, actions[0].payload)]
        else:
            assert frames == [] and actions == []
            assert self.counters.drops["udp-endpoint-foreign-source"] == foreign + 1

    @rule(dst=st.sampled_from(PING_DSTS), seq=st.integers(0, 0xFFFF))
    def ping(self, dst, seq):
        before = self.state.pings
        actions = self.rig.ping(dst, seq=seq, sid=self.sid)
        assert self.take() == []
        if self.core.policy.destination(dst)[0] is None or before >= N.MAX_PINGS:
            event("ping: refused" if before < N.MAX_PINGS else "ping: limit")
            assert actions == []
        else:
            (p,) = actions
            assert isinstance(p, Ping) and p.msg.seq == seq and p.sid == self.sid
            self.pings.append(p)

    @rule(port=st.sampled_from(VM_PORTS))
    def dns_query(self, port):
        before = self.state.dns_queries
        actions = self.rig.udp(GW_IP, port, 53, b"q", sid=self.sid)
        assert self.take() == []
        if before >= N.MAX_DNS_INFLIGHT:
            event("dns: limit")
            assert actions == []
        else:
            assert actions == [DnsQuery(self.sid, VM_MAC, VM_IP, port, b"q")]
            self.dns += 1

    @rule(on=st.booleans())
    def offload(self, on):
        was = self.state.offload
        actions = self.rig.feed(ethernet.build(GW_MAC, VM_MAC, ethernet.TYPE_RDSWITCH, offload.capability_payload(
            offload.FLAG_PARTIAL_CSUM_TSO if on else 0)), self.sid)
        assert actions == ([OffloadChanged(self.sid, on)] if on != was else [])
        assert self.state.offload == on and self.take() == []

    @rule(dt=st.floats(0, 100, allow_nan=False))
    def advance(self, dt):
        self.rig.now += dt  # the clock only moves forward

    # ---- the shell -----------------------------------------------------------------------------
    def _report(self, flow: N.TcpFlow, outcome: str | None) -> None:
        rig = self.rig
        abandoned = flow.abandoned
        conn = self.core.dial_done(flow, outcome, rig.now)
        event(f"dial_done: {outcome}{' (abandoned)' if abandoned else ''}")
        frames = self.take(flow.partial)
        dst_ip, dport = flow.key[2], flow.key[3]
        if outcome is None and not abandoned:
            assert conn is flow.conn is not None and frames == []
            assert flow.partial == self.state.offload and (conn.tso_mss == TSO_MSS) == flow.partial
            self.core.transmit(flow, conn.take_outgoing())
            (frame,) = self.take(flow.partial)
            pkt, seg = parse_tcp(frame)
            assert (pkt.src, seg.src_port, seg.dst_port, seg.flags) == (dst_ip, dport, flow.key[1], SYN | ACK)
            assert seg.ack == (self.syn_seq[flow] + 1) & 0xFFFFFFFF
            self.open.append(flow)
        else:
            assert conn is None
            if outcome in ("refused", "failed", "timeout") and not abandoned:
                (frame,) = frames
                assert_rst_for_syn(frame, dst_ip, flow.key[1], dport, seq=self.syn_seq[flow], verify=False)
            else:
                assert frames == []
        del self.syn_seq[flow]

    def _dial_done(self, data):
        flow = self.pending.pop(data.draw(st.integers(0, len(self.pending) - 1)))
        self._report(flow, data.draw(st.sampled_from(DIAL_OUTCOMES)))

    def _flow_closed(self, data):
        flow = self.open.pop(data.draw(st.integers(0, len(self.open) - 1)))
        self.core.flow_closed(flow)

    def _udp_reply(self, data):
        flow = data.draw(st.sampled_from(self.udp_flows))
        payload = data.draw(st.binary(max_size=20))
        self.core.udp_reply(flow, payload, self.rig.now)
        (frame,) = self.take()
        pkt, sport, dport, got = parse_udp(frame)
        assert (pkt.src, sport, dport, got) == (flow.key[2], flow.key[3], flow.key[1], payload)

    def _udp_closed(self, data):
        flow = self.udp_flows.pop(data.draw(st.integers(0, len(self.udp_flows) - 1)))
        self.core.udp_closed(flow)

    def _udp_expire(self, data):
        """The shell's idle timers: flows idle for long enough close."""
        for flow in list(self.udp_flows):
            if self.core.udp_expired(flow, self.rig.now):
                assert self.rig.now - flow.last_activity >= self.core.policy.udp_idle_timeout
                event("udp flow expired")
                self.udp_flows.remove(flow)
                self.core.udp_closed(flow)

    def _ping_done(self, data):
        p = self.pings.pop(data.draw(st.integers(0, len(self.pings) - 1)))
        reply = data.draw(st.booleans())
        if reply:
            self.core.ping_reply(p, p.msg.payload)
            (frame,) = self.take()
            pkt, msg = parse_icmp(frame)
            assert (pkt.src, pkt.dst, msg.type, msg.seq, bytes(msg.payload)) == \
                (p.virtual_dst, VM_IP, icmp.ECHO_REPLY, p.msg.seq, bytes(p.msg.payload))
        self.core.ping_done(p, None if reply else "no-reply")

    def _dns_done(self, data):
        self.dns -= 1
        self.core.dns_done(self.sid)

    def _open_endpoint(self, data):
        remote = (data.draw(st.sampled_from([VM_IP, OTHER_VM_IP])), data.draw(st.sampled_from(VM_PORTS)))
        ep = self.core.open_endpoint(self.sid, *remote)
        assert ep.remote == remote and ep.port not in self.core.local_tcp_ports
        assert N.EPHEMERAL_FIRST <= ep.port <= N.EPHEMERAL_LAST
        self.endpoints.append(ep)

    def _close_endpoint(self, data):
        ep = self.endpoints.pop(data.draw(st.integers(0, len(self.endpoints) - 1)))
        self.core.close_endpoint(ep)

    def _restart(self, data):
        """The VM's session ends (its flows' reports may still come) and it connects again."""
        event("session restarted")
        old = self.sid
        flows = self.core.close_session(old)
        assert set(flows) == set(self.open) and not self.core.dirty & set(flows)
        late_syn = TcpIn(VM_MAC, VM_IP, ALIAS, tcp.Segment(40000, 80, 1, 0, SYN, 65535, mss=1460))
        assert list(self.core.handle(old, late_syn, self.rig.now)) == [] and self.take() == []
        self.stale += [("dial", f) for f in self.pending] + [("flow", f) for f in self.open]
        self.stale += [("udp", f) for f in self.udp_flows] + [("ping", p) for p in self.pings]
        self.stale += [("dns", old)] * self.dns + [("endpoint", ep) for ep in self.endpoints]
        self.pending, self.open, self.udp_flows, self.pings, self.endpoints, self.dns = [], [], [], [], [], 0
        self.sid += 1
        self.state = self.core.open_session(self.sid, Counters())

    def _stale(self, data):
        self._stale_report(data.draw(st.integers(0, len(self.stale) - 1)), data.draw(st.sampled_from(OUTCOMES)))

    def _stale_report(self, index: int, outcome: str | None) -> None:
        """A late report about a session that ended changes nothing, here or in the new session."""
        kind, what = self.stale.pop(index)
        state = self.state
        before = (dict(state.tcp), dict(state.udp), dict(state.endpoints), state.pending_dials, state.pings,
                  state.dns_queries, dict(state.counters.values), dict(state.counters.drops))
        if kind == "dial":
            assert self.core.dial_done(what, outcome, self.rig.now) is None
            del self.syn_seq[what]
        elif kind == "flow":
            self.core.flow_closed(what)
        elif kind == "udp":
            self.core.udp_closed(what)
        elif kind == "ping":
            self.core.ping_done(what, "no-reply")
        elif kind == "dns":
            self.core.dns_done(what)
        else:
            self.core.close_endpoint(what)
        assert self.take() == []
        assert before == (dict(state.tcp), dict(state.udp), dict(state.endpoints), state.pending_dials, state.pings,
                          state.dns_queries, dict(state.counters.values), dict(state.counters.drops))

    def _shell(self, data):
        # One rule picking among what is possible (rules with preconditions make every step slower).
        ops = [op for op, possible in ((self._dial_done, self.pending), (self._flow_closed, self.open),
                                       (self._udp_reply, self.udp_flows), (self._udp_closed, self.udp_flows),
                                       (self._ping_done, self.pings), (self._dns_done, self.dns),
                                       (self._close_endpoint, self.endpoints), (self._stale, self.stale))
               if possible]
        # a session ending is rare: it empties everything the other steps build up
        op = data.draw(st.sampled_from(ops * 4 + [self._udp_expire, self._open_endpoint] * 2 + [self._restart]))
        op(data)

    @rule(data=st.data())
    def shell(self, data):
        self._shell(data)

    @rule(data=st.data())
    def shell_too(self, data):  # the same, weighted like the VM's rules
        self._shell(data)

    # ---- invariants ------------------------------------------------------------------------------
    @invariant()
    def limits_hold_and_tables_match_the_model(self):
        state = self.state
        assert set(self.core.sessions) == {self.sid} and self.core.sessions[self.sid] is state
        assert len(state.tcp) <= LIMITS["max_tcp_flows"]
        assert state.pending_dials == len(self.pending) <= LIMITS["max_pending_dials"]
        assert set(state.tcp.values()) == set(self.pending) | set(self.open)
        assert all(f.dialling for f in self.pending) and not any(f.dialling for f in self.open)
        assert all(state.tcp[f.key] is f for f in self.pending + self.open)
        assert len(state.udp) <= LIMITS["max_udp_flows"]
        assert set(state.udp.values()) == set(self.udp_flows)
        assert set(state.endpoints.values()) == set(self.endpoints)
        assert all(state.endpoints[ep.port] is ep for ep in self.endpoints)
        assert state.pings == len(self.pings) <= N.MAX_PINGS
        assert state.dns_queries == self.dns <= N.MAX_DNS_INFLIGHT
        assert self.core.dirty <= set(self.open)
        assert self.rig.out == []  # every frame was accounted for by the step that caused it

    def teardown(self):
        """Report everything in flight and close everything open: nothing may be left."""
        if sys.exc_info()[0] is not None:
            return  # a step failed: let its error be the one reported (and shrunk)
        for i, flow in enumerate(self.pending):
            self._report(flow, OUTCOMES[i % len(OUTCOMES)])
        self.pending.clear()
        for flow in self.open:
            self.core.flow_closed(flow)
        for flow in self.udp_flows:
            self.core.udp_closed(flow)
        for ep in self.endpoints:
            self.core.close_endpoint(ep)
        for p in self.pings:
            self.core.ping_done(p)
        for _ in range(self.dns):
            self.core.dns_done(self.sid)
        while self.stale:
            self._stale_report(0, "refused")
        state = self.state
        assert state.tcp == {} and state.udp == {} and state.endpoints == {}
        assert (state.pending_dials, state.pings, state.dns_queries) == (0, 0, 0)
        assert self.core.dirty == set() and self.rig.out == []


def test_nat_core_state_machine():
    with mock.patch.object(N, "MAX_PINGS", SMALL_PINGS), mock.patch.object(N, "MAX_DNS_INFLIGHT", SMALL_DNS):
        run_state_machine_as_test(NatMachine, settings=settings(max_examples=200, stateful_step_count=40,
                                                                deadline=None))


def test_remembered_destinations_match_the_policy_and_stay_bounded(monkeypatch):
    monkeypatch.setattr(N, "DESTINATION_CACHE", 64)
    rig = Rig(allow_outbound=(ipaddress.IPv4Network("127.0.0.0/8"), ipaddress.IPv4Network("198.18.0.0/15")))
    rnd = random.Random(5)
    samples = [bytes(rnd.getrandbits(8) for _ in range(4)) for _ in range(300)]
    samples += [NET.host_alias_ip.packed, NET.gateway_ip.packed, b"\x7f\0\0\1", b"\xc6\x12\0\1", b"\xa9\xfe\0\1"]
    for ip in samples * 2:  # the second pass answers from the cache
        assert rig.core.destination(ip) == rig.core.policy.destination(ip)
        assert len(rig.core._destinations) <= 64


def test_host_switch_listeners_are_never_a_destination():
    rig = Rig()
    rig.core.protect("127.0.0.1", 9000)  # the host's API on tcp://127.0.0.1:9000
    rig.core.protect(None, 6656)  # a data listener on every address
    assert rig.syn(ALIAS, 40000, 9000, seq=7) == []  # .254 is the host's 127.0.0.1
    assert_rst_for_syn(rig.take()[0], ALIAS, 40000, 9000, seq=7)
    assert rig.syn(ALLOWED, 40001, 6656, seq=8) == []
    assert_rst_for_syn(rig.take()[0], ALLOWED, 40001, 6656, seq=8)
    assert rig.counters.drops == {"tcp-host-only": 2} and rig.state.tcp == {}
    # other ports, and the protected port on another address, still dial
    assert isinstance(rig.syn(ALIAS, 40002, 9001)[0], Dial)
    assert isinstance(rig.syn(ALLOWED, 40003, 9000)[0], Dial)
