"""Fuzzing the whole frame path of an in-process host-switch: garbage from one VM never hurts another.

Two sessions on one host-switch (``switch_host.build``, memory links, no kernel
namespace): a *neighbour* VM downloads a fixed blob from a service on the
gateway IP, while an *attacker* VM sends hypothesis-made frames: random bytes,
and valid ARP / IPv4 (UDP, TCP with options, ICMP, DHCP, DNS, fragments, IP
options) / offload frames built with ``rdswitch.wire``, then mutated (flipped
bytes, truncations, bad length fields), from its own MAC, random MACs,
broadcast/multicast, the gateway's MAC or the neighbour's MAC and IP.

Checked for every example: the neighbour's bytes arrive whole (sha256), both
sessions stay up until the test ends them, no exception escapes and none is
caught and logged by the frame path's safety nets, and every table stays within
its bound (switch MACs per port, neighbours, frame caches, NAT flows, dials,
pings, DNS queries, reassembly).

Destinations are the gateway, the .254 alias or the virtual subnet only. The
policy allows only 127.0.0.0/8 (reached through .254), and ``confine`` points
every TCP/UDP packet for .254 at a port this test owns (a TCP echo server, a
closed TCP port, a UDP echo socket), so nothing leaves the machine and nothing
but the test's own sockets on 127.0.0.1 is ever touched.

The neighbour announces itself (a gratuitous ARP, as a VM does when it comes
up) before the attacker starts: from then on its MAC is its own (the switch's
port security), so frames the attacker sends from it are dropped and counted,
never learnt.  The clock is trio's MockClock (autojump): retransmission
timers cost no wall time.  FRAME_FUZZ_EXAMPLES scales the examples.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import logging
import os
import socket
import struct

import dnslib
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rdswitch.config import NetConfig
from rdswitch.host import dns_server, switch_host
from rdswitch.host.dns_upstream import UpstreamError
from rdswitch.stack import frames as frames_mod
from rdswitch.stack import nat as nat_mod
from rdswitch.stack.reassembly import MAX_PAYLOAD, Reassembler
from rdswitch.stack.nat import NatPolicy
from rdswitch.stack.tcp import TcpConnection
from rdswitch.wire import arp, dhcp, ethernet, icmp, ipv4, offload, tcp, udp
from rdswitch.wire.checksum import fold, ones_sum
from rdswitch.wire.errors import MalformedPacket
from tests.vmpeer import MemoryLink, VmPeer

NET = NetConfig()
GW_MAC, GW_IP = NET.gateway_mac, NET.gateway_ip.packed
ALIAS = NET.host_alias_ip.packed
NEIGH_MAC, NEIGH_IP = NET.vm_mac, NET.vm_ip.packed
ATK_MAC, ATK_IP = bytes.fromhex("02000000a700"), (NET.subnet.network_address + 77).packed
SUBNET_BROADCAST = NET.subnet.broadcast_address.packed

BLOB = hashlib.sha256(b"frame fuzz").digest() * (256 * 1024 // 32)  # 256 KiB
BLOB_SHA = hashlib.sha256(BLOB).hexdigest()
BLOB_PORT = 8080  # the gateway's blob service (a local service: no host socket)
DNS_PORT = 53

# Small limits so that the fuzz reaches them.
POLICY = NatPolicy(NET, allow_outbound=(ipaddress.IPv4Network("127.0.0.0/8"),), max_pending_dials=4,
                   max_udp_flows=4, max_tcp_flows=8, connect_timeout=2.0, udp_idle_timeout=5.0)
MAX_MACS = 4
EXAMPLES = int(os.environ.get("FRAME_FUZZ_EXAMPLES", "100"))


# ---- the host's side: sockets this test owns on 127.0.0.1 ----------------------------------------------------

class HostPorts:
    """A TCP echo server, a closed TCP port and a UDP echo socket on 127.0.0.1; .254 traffic goes only there."""

    def __init__(self) -> None:
        self.tcp_listener = socket.socket()
        self.tcp_listener.bind(("127.0.0.1", 0))
        self.tcp_listener.listen(64)
        self.tcp_listener.setblocking(False)
        self.closed = socket.socket()  # bound, never listening: connects are refused
        self.closed.bind(("127.0.0.1", 0))
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.setblocking(False)
        self.tcp_ports = (self.tcp_listener.getsockname()[1], self.closed.getsockname()[1])
        self.udp_ports = (self.udp.getsockname()[1],)

    def close(self) -> None:
        for s in (self.tcp_listener, self.closed, self.udp):
            s.close()

    async def serve(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._udp_echo)
            listener = trio.SocketListener(trio.socket.from_stdlib_socket(self.tcp_listener.dup()))
            await trio.serve_listeners(self._tcp_echo, [listener])

    async def _udp_echo(self) -> None:
        sock = trio.socket.from_stdlib_socket(self.udp.dup())
        with sock:
            while True:
                data, addr = await sock.recvfrom(65535)
                await sock.sendto(data[:2048], addr)

    @staticmethod
    async def _tcp_echo(stream) -> None:
        with trio.move_on_after(30):
            try:
                async with stream:
                    async for data in stream:
                        await stream.send_all(data)
            except trio.BrokenResourceError:
                pass


def confine(frame: bytes, ports: HostPorts) -> bytes:
    """Point a TCP/UDP packet (or first fragment) for .254 at one of the test's own host ports."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[14] >> 4 != 4 or frame[30:34] != ALIAS:
        return frame
    proto, ihl = frame[23], (frame[14] & 0xF) * 4
    offset = struct.unpack_from("!H", frame, 20)[0] & 0x1FFF
    at = 14 + ihl + 2  # the destination port
    if proto not in (ipv4.PROTO_TCP, ipv4.PROTO_UDP) or offset or ihl < 20 or len(frame) < at + 2:
        return frame
    owned = ports.tcp_ports if proto == ipv4.PROTO_TCP else ports.udp_ports
    port = struct.unpack_from("!H", frame, at)[0]
    if port in owned:
        return frame
    out = bytearray(frame)
    struct.pack_into("!H", out, at, owned[port % len(owned)])
    return bytes(out)


# ---- the neighbour: a VM that checks what it accepts, as a kernel does ----------------------------------------

class Neighbour(VmPeer):
    """Accepts only TCP segments for its own MAC, IP and connection, from the gateway, with a valid checksum."""

    async def run(self) -> None:
        async for frame in self.link.from_host:
            if len(frame) < 54 or frame[0:6] != self.mac or frame[12:14] != b"\x08\x00":
                continue
            try:
                pkt = ipv4.parse(memoryview(frame)[14:], verify=True)
                if pkt.proto != ipv4.PROTO_TCP or pkt.dst != self.ip or pkt.is_fragment:
                    continue
                seg = tcp.parse(pkt.payload, pkt.src, pkt.dst, verify=True)
            except MalformedPacket:
                continue
            found = self.conns.get(seg.dst_port)
            if found is None or found[1] != pkt.src or seg.src_port != found[0].remote_port:
                continue
            conn, dst_ip = found
            conn.receive_segment(seg, trio.current_time())
            self._send(conn, dst_ip)
            self._changed.set()
            self._changed = trio.Event()

    def announce(self) -> None:
        """A gratuitous ARP: the switch learns this MAC on this port again."""
        garp = arp.ArpPacket(arp.REQUEST, self.mac, self.ip, b"\0" * 6, self.ip)
        self.link.to_host.send_nowait(ethernet.build(ethernet.BROADCAST, self.mac, ethernet.TYPE_ARP, arp.build(garp)))

    async def download(self, port: int) -> bytes:
        conn = self.connect(GW_IP, port)
        got = bytearray()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._timers, conn)
            while True:
                data = conn.read(1 << 20, trio.current_time())
                if data:
                    got += data
                    self._send(conn, GW_IP)  # window updates
                    continue
                if conn.eof_received or conn.closed:
                    break
                await self._changed.wait()
            conn.close(trio.current_time())
            self._send(conn, GW_IP)
            nursery.cancel_scope.cancel()
        return bytes(got)

    async def _timers(self, conn: TcpConnection) -> None:
        while not conn.closed:
            t = conn.next_timeout()
            await trio.sleep_until(min(t, trio.current_time() + 0.5) if t is not None else trio.current_time() + 0.5)
            self.announce()  # like a VM re-announcing itself
            now = trio.current_time()
            if t is not None and now >= t:
                conn.handle_timeout(now)
                self._send(conn, GW_IP)


# ---- the attacker's frames ----------------------------------------------------------------------------------

def subnet_ip(n: int) -> bytes:
    return (NET.subnet.network_address + n).packed


unicast_mac = st.binary(min_size=6, max_size=6).map(lambda b: bytes([b[0] & 0xFE]) + b[1:])
src_macs = st.one_of(st.sampled_from([ATK_MAC, ATK_MAC, NEIGH_MAC, GW_MAC, ethernet.BROADCAST,
                                      bytes.fromhex("01005e000001")]), unicast_mac)
dst_macs = st.one_of(st.just(GW_MAC), st.just(GW_MAC), st.just(GW_MAC), st.just(ethernet.BROADCAST),
                     st.sampled_from([NEIGH_MAC, ATK_MAC, bytes.fromhex("01005e0000fb"), bytes.fromhex("333300000001")]),
                     unicast_mac)
src_ips = st.one_of(st.sampled_from([ATK_IP, ATK_IP, NEIGH_IP, GW_IP, ALIAS, b"\0\0\0\0", b"\xff" * 4]),
                    st.integers(0, 255).map(subnet_ip), st.binary(min_size=4, max_size=4))
dst_ips = st.one_of(st.just(GW_IP), st.just(GW_IP), st.just(ALIAS), st.just(ALIAS),
                    st.sampled_from([NEIGH_IP, b"\xff" * 4, SUBNET_BROADCAST]), st.integers(0, 255).map(subnet_ip))
ports = st.one_of(st.sampled_from([DNS_PORT, BLOB_PORT, 67, 68, 80, 0, 1]), st.integers(0, 65535))
payloads = st.binary(max_size=600)


@st.composite
def ip_header_options(draw) -> bytes:
    opts = draw(st.sampled_from([b"", b"", b"\x01\x01\x01\x00", b"\x07\x07\x04\0\0\0\0\0", b"\x94\x04\0\0"]))
    return opts + b"\0" * (-len(opts) % 4)


def ipv4_packet(src: bytes, dst: bytes, proto: int, payload: bytes, options: bytes = b"", ident: int = 0,
                flags_frag: int = 0x4000) -> bytes:
    ihl = 5 + len(options) // 4
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(payload), ident, flags_frag, 64, proto,
                                0, src, dst)) + options
    struct.pack_into("!H", hdr, 10, ~fold(ones_sum(hdr)) & 0xFFFF)
    return bytes(hdr) + payload


@st.composite
def tcp_segments(draw, src: bytes, dst: bytes) -> bytes:
    seg = tcp.Segment(draw(ports), draw(ports), seq=draw(st.integers(0, 2**32 - 1)), ack=draw(st.integers(0, 2**32 - 1)),
                      flags=draw(st.one_of(st.just(tcp.SYN), st.just(tcp.SYN),
                                           st.sampled_from([tcp.ACK, tcp.ACK | tcp.PSH, tcp.RST, tcp.FIN | tcp.ACK,
                                                            tcp.SYN | tcp.ACK]),
                                           st.integers(0, 255))),
                      window=draw(st.integers(0, 65535)), payload=draw(payloads),
                      mss=draw(st.none() | st.integers(0, 65535)), wscale=draw(st.none() | st.integers(0, 255)),
                      sack_perm=draw(st.booleans()),
                      timestamp=draw(st.none() | st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))))
    return tcp.build(seg, src, dst)


@st.composite
def dhcp_payloads(draw) -> bytes:
    options = {dhcp.OPT_MESSAGE_TYPE: bytes([draw(st.integers(0, 9))])}
    if draw(st.booleans()):
        options[dhcp.OPT_REQUESTED_IP] = draw(st.sampled_from([NEIGH_IP, ATK_IP, GW_IP, ALIAS, subnet_ip(100)]))
    if draw(st.booleans()):
        options[dhcp.OPT_SERVER_ID] = draw(st.sampled_from([GW_IP, ATK_IP]))
    if draw(st.booleans()):
        options[dhcp.OPT_CLIENT_ID] = draw(st.binary(min_size=2, max_size=20))
    if draw(st.booleans()):
        options[dhcp.OPT_PARAM_REQUEST_LIST] = draw(st.binary(max_size=30))
    msg = dhcp.DhcpMessage(op=draw(st.sampled_from([dhcp.BOOTREQUEST, dhcp.BOOTREPLY])),
                           xid=draw(st.integers(0, 2**32 - 1)), flags=draw(st.sampled_from([0, dhcp.FLAG_BROADCAST])),
                           ciaddr=draw(st.sampled_from([b"\0" * 4, NEIGH_IP, ATK_IP])),
                           chaddr=draw(st.sampled_from([ATK_MAC, NEIGH_MAC, GW_MAC])) if draw(st.booleans())
                           else draw(unicast_mac), options=options)
    return dhcp.build(msg)


@st.composite
def dns_payloads(draw) -> bytes:
    name = draw(st.sampled_from(["gateway.rancher-desktop.internal", "host.docker.internal", "example.org",
                                 "x" * 60 + ".invalid"]))
    qtype = draw(st.sampled_from(["A", "AAAA", "PTR", "ANY", "TXT", "SOA"]))
    header = dnslib.DNSHeader(id=draw(st.integers(0, 65535)), rd=1)  # (question() would draw a random id)
    return dnslib.DNSRecord(header, q=dnslib.DNSQuestion(name, getattr(dnslib.QTYPE, qtype))).pack()


@st.composite
def udp_datagrams(draw, src: bytes, dst: bytes) -> bytes:
    kind = draw(st.sampled_from(["raw", "dns", "dhcp"]))
    if kind == "dns":
        return udp.build(draw(ports), DNS_PORT, draw(dns_payloads()), src, dst)
    if kind == "dhcp":
        return udp.build(68, 67, draw(dhcp_payloads()), src, dst)
    return udp.build(draw(ports), draw(ports), draw(payloads), src, dst)


@st.composite
def icmp_messages(draw) -> bytes:
    t = draw(st.sampled_from([icmp.ECHO_REQUEST, icmp.ECHO_REQUEST, icmp.ECHO_REPLY, icmp.DEST_UNREACH, 5, 13]))
    return icmp.build(icmp.IcmpMessage(t, draw(st.integers(0, 255)), draw(st.integers(0, 2**32 - 1)), draw(payloads)))


@st.composite
def valid_frames(draw) -> list[bytes]:
    """One valid frame (or a datagram's fragments) of some protocol."""
    src_mac, dst_mac = draw(src_macs), draw(dst_macs)
    kind = draw(st.sampled_from(["tcp", "tcp", "tcp", "udp", "udp", "udp", "icmp", "fragments", "arp", "offload",
                                 "ethertype"]))
    if kind == "arp":
        pkt = arp.ArpPacket(draw(st.sampled_from([arp.REQUEST, arp.REPLY])), draw(src_macs), draw(src_ips),
                            draw(st.sampled_from([b"\0" * 6, GW_MAC, NEIGH_MAC])), draw(dst_ips))
        return [ethernet.build(dst_mac, src_mac, ethernet.TYPE_ARP, arp.build(pkt))]
    if kind == "offload":
        payload = draw(st.sampled_from([offload.capability_payload(), offload.capability_payload(0)])) \
            if draw(st.booleans()) else draw(st.binary(max_size=16))
        return [ethernet.build(draw(st.sampled_from([GW_MAC, ethernet.BROADCAST])), src_mac, ethernet.TYPE_RDSWITCH,
                               payload)]
    if kind == "ethertype":
        return [ethernet.build(dst_mac, src_mac, draw(st.sampled_from([ethernet.TYPE_IPV6, 0x8100, 0x0000, 0xFFFF])),
                               draw(payloads))]
    src_ip, dst_ip = draw(src_ips), draw(dst_ips)
    if kind == "tcp":
        proto, body = ipv4.PROTO_TCP, draw(tcp_segments(src_ip, dst_ip))
    elif kind == "udp":
        proto, body = ipv4.PROTO_UDP, draw(udp_datagrams(src_ip, dst_ip))
    elif kind == "icmp":
        proto, body = ipv4.PROTO_ICMP, draw(icmp_messages())
    else:  # fragments of a UDP datagram or an echo request, some of them, in some order
        proto = draw(st.sampled_from([ipv4.PROTO_UDP, ipv4.PROTO_ICMP]))
        data = draw(st.binary(min_size=1, max_size=3000))
        body = (udp.build(draw(ports), draw(ports), data, src_ip, dst_ip) if proto == ipv4.PROTO_UDP
                else icmp.build(icmp.IcmpMessage(icmp.ECHO_REQUEST, 0, draw(st.integers(0, 2**32 - 1)), data)))
        mtu = draw(st.integers(68, 1500))
        frags = ipv4.fragment(src_ip, dst_ip, proto, body, mtu, ident=draw(st.integers(0, 3)))
        picked = draw(st.lists(st.sampled_from(frags), min_size=1, max_size=len(frags) + 2)) \
            if draw(st.booleans()) else draw(st.permutations(frags))
        return [ethernet.build(dst_mac, src_mac, ethernet.TYPE_IPV4, f) for f in picked]
    packet = ipv4_packet(src_ip, dst_ip, proto, body, draw(ip_header_options()), ident=draw(st.integers(0, 65535)),
                         flags_frag=draw(st.sampled_from([0x4000, 0x4000, 0, 0x2000, 0x0001, 0x2003])))
    return [ethernet.build(dst_mac, src_mac, ethernet.TYPE_IPV4, packet)]


@st.composite
def mutated(draw, frames: list[bytes]) -> list[bytes]:
    out = []
    for frame in frames:
        data = bytearray(frame)
        for op in draw(st.lists(st.sampled_from(["flip", "truncate", "u16", "append", "ihl"]), max_size=3)):
            if not data:
                break
            i = draw(st.integers(0, len(data) - 1))
            if op == "flip":
                data[i] ^= draw(st.integers(1, 255))
            elif op == "truncate":
                del data[i:]
            elif op == "u16" and len(data) >= 48:  # a length field: IPv4 total, UDP length, TCP offset+flags
                at = draw(st.sampled_from([16, 38, 46, 20, 24]))
                struct.pack_into("!H", data, at, draw(st.sampled_from([0, 1, 20, 28, 0xFFFF, len(data), len(data) - 13])))
            elif op == "append":
                data += draw(st.binary(min_size=1, max_size=64))
            elif op == "ihl" and len(data) > 14:
                data[14] = (data[14] & 0xF0) | draw(st.integers(0, 15))
        out.append(bytes(data))
    return out


attacker_frames = st.lists(
    st.one_of(
        valid_frames(),
        valid_frames(),
        valid_frames().flatmap(mutated),
        st.binary(max_size=200).map(lambda b: [b]),
    ),
    min_size=1, max_size=40,
).map(lambda groups: [f for g in groups for f in g])


# ---- the host-switch and the checks -------------------------------------------------------------------------

def make_dns():
    p = argparse.ArgumentParser()
    dns_server.add_arguments(p)
    dns = dns_server.from_args(p.parse_args(["--dns-upstream", "127.0.0.1:9", "--dns-resolv-conf", os.devnull]), NET)

    async def no_upstream(data, upstreams, **kw):  # never touches the network
        await trio.sleep(0.1)  # ok-sleep: virtual time (MockClock): an upstream that takes a while to fail
        raise UpstreamError("no upstream in this test")

    dns._forward = no_upstream
    return dns


async def blob_service(stream) -> None:
    async with stream:
        await stream.send_all(BLOB)


class ErrorLog(logging.Handler):
    """ERROR records of rdswitch: a frame path safety net caught an exception (a bug)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))


def check_bounds(hs) -> None:
    switch = hs.switch
    per_port: dict = {}
    for mac, port in switch.macs().items():
        if mac != GW_MAC:
            per_port[port] = per_port.get(port, 0) + 1
    for port, n in per_port.items():
        assert n <= switch.max_macs_per_port, (port, n)
    assert all(0 <= n <= switch.max_macs_per_port for n in switch._macs_per_port.values())
    assert all(ip in hs.gateway._subnet for ip in hs.gateway.neighbors)
    assert len(hs.gateway.neighbors) <= NET.subnet.num_addresses
    fb = hs.gateway.frames
    assert len(fb._eth_hdr_cache) <= frames_mod.CACHE_LIMIT and len(fb._tcp_templates) <= frames_mod.CACHE_LIMIT
    for state in hs.nat.core.sessions.values():
        assert len(state.tcp) <= POLICY.max_tcp_flows, len(state.tcp)
        assert len(state.udp) <= POLICY.max_udp_flows, len(state.udp)
        assert 0 <= state.pending_dials <= POLICY.max_pending_dials
        assert 0 <= state.pings <= nat_mod.MAX_PINGS
        assert 0 <= state.dns_queries <= nat_mod.MAX_DNS_INFLIGHT
    r = hs.gateway.reassembly
    assert 0 <= r.bytes <= r.max_bytes
    assert all(len(keys) <= r.max_per_source for keys in r._by_source.values())
    assert len(r) == sum(len(keys) for keys in r._by_source.values())


async def scenario(frames: list[bytes], ports: HostPorts, errors: ErrorLog) -> None:
    hs = switch_host.build(NET, POLICY, dns=make_dns())
    hs.switch.max_macs_per_port = MAX_MACS
    hs.gateway.reassembly = Reassembler(hs.counters, timeout=5.0, max_per_source=4, max_bytes=MAX_PAYLOAD)
    hs.nat.add_local_service(BLOB_PORT, blob_service)
    hs.nat.add_local_service(DNS_PORT, hs.nat.dns.serve_stream)
    n_link, a_link = MemoryLink(), MemoryLink()
    neighbour = Neighbour(n_link, NET)
    ended = []
    both_ended = trio.Event()

    async def session(link) -> None:
        await hs.run_session(link)
        ended.append(link)
        if len(ended) == 2:
            both_ended.set()

    async def drain(link) -> None:
        async for _ in link.from_host:
            pass

    with trio.fail_after(600):  # virtual seconds (MockClock): a stuck example fails instead of hanging
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ports.serve)
            nursery.start_soon(session, n_link)
            nursery.start_soon(session, a_link)
            nursery.start_soon(neighbour.run)
            nursery.start_soon(drain, a_link)
            while len(hs.sessions) < 2:
                await hs.sessions_changed.wait()
            sessions = set(hs.sessions)
            neighbour.announce()
            while not isinstance(hs.switch.lookup(NEIGH_MAC), switch_host.Session):
                await trio.sleep(0)  # ok-sleep: a checkpoint, until the session has read the announcement
            n_session = hs.switch.lookup(NEIGH_MAC)

            got = []

            async def download() -> None:
                got.append(await neighbour.download(BLOB_PORT))

            async with trio.open_nursery() as inner:
                inner.start_soon(download)
                for frame in frames:  # interleaved with the download
                    a_link.to_host.send_nowait(confine(frame, ports))
                    await trio.sleep(0)  # ok-sleep: a checkpoint, so the session processes the frame
                    assert set(hs.sessions) == sessions, "a session ended"
                    check_bounds(hs)
            assert hashlib.sha256(got[0]).hexdigest() == BLOB_SHA, (len(got[0]), len(BLOB))
            assert hs.switch.lookup(NEIGH_MAC) is n_session and hs.gateway.neighbors[NEIGH_IP] == NEIGH_MAC
            await trio.sleep(1)  # ok-sleep: virtual time (MockClock) for the timers: dials, retransmissions, reassembly, UDP idle
            assert set(hs.sessions) == sessions and not ended, "a session ended"
            check_bounds(hs)
            drops = {k: v for s in hs.sessions.values() for k, v in s.counters.as_dict().get("drops", {}).items()}
            assert not {"stack-error", "nat-error"} & set(drops), drops
            assert not errors.records, errors.records

            n_link.to_host.close()
            a_link.to_host.close()
            await both_ended.wait()
            assert hs.sessions == {} and hs.nat.core.sessions == {}
            nursery.cancel_scope.cancel()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(attacker_frames)
def test_garbage_from_one_vm_never_hurts_the_other(frames):
    ports = HostPorts()
    errors = ErrorLog()
    logger = logging.getLogger("rdswitch")
    logger.addHandler(errors)
    try:
        trio.run(scenario, frames, ports, errors, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        logger.removeHandler(errors)
        ports.close()
