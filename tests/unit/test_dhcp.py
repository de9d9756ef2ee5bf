"""DHCP: wire codec, server and client, all in memory with a fake clock."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings, strategies as st

from rdswitch.config import NetConfig, parse_mac
from rdswitch.services.dhcp import BROADCAST_IP, BROADCAST_MAC, DhcpServer
from rdswitch.vm import dhcp_client as dc
from rdswitch.vm.dhcp_client import Bound, DhcpClient, Lost, Renewed
from rdswitch.wire import dhcp as wire
from rdswitch.wire.errors import MalformedPacket

VM_MAC = parse_mac("5a:94:ef:e4:0c:ee")
OTHER_MAC = parse_mac("02:00:00:00:00:01")
THIRD_MAC = parse_mac("02:00:00:00:00:02")
IP = IPv4Address


def mac_n(n: int) -> bytes:
    return b"\x02\x00" + struct.pack("!I", n)


# ---------------------------------------------------------------- harness


class Net:
    """A client and a server wired together in memory; counts what crosses."""

    def __init__(self, server: DhcpServer, client: DhcpClient):
        self.server = server
        self.client = client
        self.server_up = True
        self.sent: list[dc.Outgoing] = []
        self.replies = []

    def pump(self, now: float) -> list:
        events = []
        for _ in range(20):  # bounded: a DORA needs two rounds
            out = self.client.take_outgoing()
            if not out:
                return events
            for o in out:
                self.sent.append(o)
                if not self.server_up:
                    continue
                reply = self.server.handle(o.payload, now)
                if reply is not None:
                    self.replies.append(reply)
                    events += self.client.receive(reply.payload, now)
        raise AssertionError("client and server keep talking")

    def run_until(self, now: float, end: float) -> tuple[float, list]:
        """Fire the client's timers (and pump) until ``end``; return (now, events)."""
        events = self.pump(now)
        for _ in range(1000):
            t = self.client.next_timeout()
            if t is None or t > end:
                return end, events
            now = max(now, t)
            events += self.client.handle_timeout(now)
            events += self.pump(now)
        raise AssertionError("timer loop did not settle")


def dora(server: DhcpServer, mac: bytes, now: float = 0.0, xid: int = 1, **kw) -> tuple[DhcpClient, list]:
    client = DhcpClient(mac, xid=xid, **kw)
    net = Net(server, client)
    client.start(now)
    return client, net.pump(now)


def raw_msg(mtype: int, mac: bytes = VM_MAC, xid: int = 0x1234, **kw) -> bytes:
    opts = {wire.OPT_MESSAGE_TYPE: bytes([mtype])}
    opts.update(kw.pop("options", {}))
    return wire.build(wire.DhcpMessage(op=wire.BOOTREQUEST, xid=xid, chaddr=mac, options=opts, **kw))


# ----------------------------------------------------------- client/server


def test_full_dora_gives_static_lease_with_all_options():
    server = DhcpServer(NetConfig(), search_domains=["corp.example.com", "example.com"])
    client, events = dora(server, VM_MAC, hostname="rd")
    assert client.state == dc.BOUND
    assert len(events) == 1 and isinstance(events[0], Bound)
    lease = events[0].lease
    assert lease == client.lease
    assert str(lease.interface) == "192.168.127.2/24"
    assert lease.router == IP("192.168.127.1")
    assert lease.dns_servers == (IP("192.168.127.1"),)
    assert lease.server_id == IP("192.168.127.1")
    assert lease.mtu == 1500
    assert lease.search_domains == ("corp.example.com", "example.com")
    assert lease.lease_time == 3600 and lease.t1 == 1800 and lease.t2 == 3150
    assert server.leases() == {"192.168.127.2": "5a:94:ef:e4:0c:ee"}


def test_client_messages_are_what_a_server_expects():
    client = DhcpClient(VM_MAC, xid=0xABCD, hostname="rd")
    client.start(0.0)
    [out] = client.take_outgoing()
    assert out.src_ip == IP("0.0.0.0") and out.dst_ip == IP("255.255.255.255") and out.broadcast
    msg = wire.parse(out.payload)
    assert msg.message_type == wire.DISCOVER and msg.xid == 0xABCD == client.xid
    assert msg.chaddr == VM_MAC and msg.hostname == "rd"
    assert set(msg.param_request_list) >= {1, 3, 6, 15, 26, 119}
    assert client.take_outgoing() == []


def test_set_search_domains_replaces_them_and_empty_list_omits_option_119():
    server = DhcpServer(NetConfig(), search_domains=("a.test",))
    _, [ev] = dora(server, VM_MAC)
    assert ev.lease.search_domains == ("a.test",)
    server.set_search_domains(["b.test", "c.test"])
    reply = server.handle(raw_msg(wire.DISCOVER), 1.0)
    assert wire.parse(reply.payload).search_domains == ("b.test", "c.test")
    assert server.search_domains() == ["b.test", "c.test"]
    server.set_search_domains([])
    reply = server.handle(raw_msg(wire.DISCOVER), 2.0)
    assert wire.OPT_DOMAIN_SEARCH not in wire.parse(reply.payload).options


def test_search_domains_are_data_not_a_callable_or_a_string():
    # A provider called per reply would put the host's resolver config on the frame path.
    with pytest.raises(TypeError, match="sequence of names"):
        DhcpServer(NetConfig(), search_domains=lambda: ["a.test"])
    with pytest.raises(TypeError, match="sequence of names"):
        DhcpServer(NetConfig()).set_search_domains("corp.test")


def test_bad_search_domain_names_do_not_break_dhcp():
    server = DhcpServer(NetConfig(), search_domains=["bad..name", "x" * 64 + ".com", "ok.test"])
    reply = server.handle(raw_msg(wire.DISCOVER), 0)
    assert wire.parse(reply.payload).yiaddr == IP("192.168.127.2")
    assert wire.parse(reply.payload).search_domains == ("ok.test",)
    server.set_search_domains(["bad..name"])
    reply = server.handle(raw_msg(wire.DISCOVER), 1.0)
    assert wire.OPT_DOMAIN_SEARCH not in wire.parse(reply.payload).options


def test_second_mac_gets_pool_address_and_same_mac_gets_it_back():
    server = DhcpServer(NetConfig())
    _, [a] = dora(server, VM_MAC)
    c2, [b] = dora(server, OTHER_MAC, now=5.0, xid=77)
    assert a.lease.ip == IP("192.168.127.2")
    assert b.lease.ip == IP("192.168.127.3")
    # the client restarts (new state machine, new xid): same address
    c2b, [b2] = dora(server, OTHER_MAC, now=100.0, xid=999)
    assert b2.lease.ip == IP("192.168.127.3")
    # a third MAC gets the next one, never a reserved address
    _, [c] = dora(server, THIRD_MAC, now=101.0, xid=5)
    assert c.lease.ip == IP("192.168.127.4")
    assert server.leases() == {
        "192.168.127.2": "5a:94:ef:e4:0c:ee",
        "192.168.127.3": "02:00:00:00:00:01",
        "192.168.127.4": "02:00:00:00:00:02",
    }


def test_init_reboot_with_wrong_address_is_naked_then_client_gets_right_one():
    server = DhcpServer(NetConfig())
    client = DhcpClient(VM_MAC, xid=3)
    net = Net(server, client)
    client.start(0.0, requested_ip=IP("192.168.127.50"))
    events = net.pump(0.0)
    nak = wire.parse(net.replies[0].payload)
    assert nak.message_type == wire.NAK and net.replies[0].broadcast
    assert net.replies[0].dst_ip == BROADCAST_IP and net.replies[0].dst_mac == BROADCAST_MAC
    assert isinstance(events[0], Lost) and "NAK" in events[0].reason
    assert isinstance(events[-1], Bound) and events[-1].lease.ip == IP("192.168.127.2")
    assert [wire.parse(o.payload).message_type for o in net.sent] == [wire.REQUEST, wire.DISCOVER, wire.REQUEST]


def test_init_reboot_for_another_free_address_than_its_lease_is_naked():
    server = DhcpServer(NetConfig())
    _, [ev] = dora(server, OTHER_MAC)
    assert ev.lease.ip == IP("192.168.127.3")
    reply = server.handle(raw_msg(wire.REQUEST, mac=OTHER_MAC, options={wire.OPT_REQUESTED_IP: IP("192.168.127.50").packed}), 1.0)
    msg = wire.parse(reply.payload)
    assert msg.message_type == wire.NAK and "not your lease" in msg.message
    # and renewing someone else's address is refused too
    reply = server.handle(raw_msg(wire.REQUEST, mac=OTHER_MAC, ciaddr=IP("192.168.127.50")), 1.0)
    assert wire.parse(reply.payload).message_type == wire.NAK


def test_init_reboot_with_right_address_is_acked_directly():
    server = DhcpServer(NetConfig())
    client = DhcpClient(OTHER_MAC, xid=3)
    net = Net(server, client)
    client.start(0.0, requested_ip=IP("192.168.127.40"))  # free pool address, e.g. after a host-switch restart
    [ev] = net.pump(0.0)
    assert isinstance(ev, Bound) and ev.lease.ip == IP("192.168.127.40")
    assert len(net.sent) == 1


@pytest.mark.parametrize(
    "requested, why",
    [
        ("10.0.0.5", "not on"),  # outside the subnet
        ("192.168.127.1", "not available"),  # the gateway
        ("192.168.127.254", "not available"),  # the host alias
        ("192.168.127.2", "not available"),  # the VM's static address
        ("192.168.127.3", "not available"),  # another MAC's lease
        ("192.168.127.255", "not available"),  # broadcast
    ],
)
def test_request_for_wrong_address_is_naked(requested, why):
    server = DhcpServer(NetConfig())
    dora(server, THIRD_MAC)  # takes .3
    reply = server.handle(raw_msg(wire.REQUEST, mac=OTHER_MAC, options={wire.OPT_REQUESTED_IP: IP(requested).packed}), 1.0)
    msg = wire.parse(reply.payload)
    assert msg.message_type == wire.NAK and why in msg.message
    assert msg.yiaddr == IP(0)


def test_selecting_request_must_match_the_offer_and_other_servers_are_ignored():
    server = DhcpServer(NetConfig())
    offer = wire.parse(server.handle(raw_msg(wire.DISCOVER, mac=OTHER_MAC), 0).payload)
    assert offer.message_type == wire.OFFER and offer.yiaddr == IP("192.168.127.3")
    sid = {wire.OPT_SERVER_ID: IP("192.168.127.1").packed}
    bad = server.handle(raw_msg(wire.REQUEST, mac=OTHER_MAC, options={**sid, wire.OPT_REQUESTED_IP: IP("192.168.127.9").packed}), 1)
    assert wire.parse(bad.payload).message_type == wire.NAK
    # the client picked another server: no answer and the offer is withdrawn
    other = {wire.OPT_SERVER_ID: IP("192.168.127.99").packed, wire.OPT_REQUESTED_IP: IP("10.1.1.1").packed}
    assert server.handle(raw_msg(wire.REQUEST, mac=OTHER_MAC, options=other), 2) is None
    assert "192.168.127.3" not in server.leases()


def test_release_frees_pool_address_but_static_stays():
    server = DhcpServer(NetConfig(), pool=range(3, 4))  # a pool of one: .3
    a, [ea] = dora(server, OTHER_MAC)
    assert ea.lease.ip == IP("192.168.127.3")
    assert server.handle(raw_msg(wire.DISCOVER, mac=THIRD_MAC), 1.0) is None  # exhausted
    assert a.release(2.0) == [Lost("released")]
    [rel] = a.take_outgoing()
    assert rel.dst_ip == IP("192.168.127.1") and rel.src_ip == IP("192.168.127.3") and not rel.broadcast
    assert server.handle(rel.payload, 2.0) is None
    assert "192.168.127.3" not in server.leases()
    _, [eb] = dora(server, THIRD_MAC, now=3.0)
    assert eb.lease.ip == IP("192.168.127.3")
    # static lease survives its RELEASE
    vm, _ = dora(server, VM_MAC, now=4.0)
    vm.release(5.0)
    server.handle(vm.take_outgoing()[0].payload, 5.0)
    assert server.leases()["192.168.127.2"] == "5a:94:ef:e4:0c:ee"


def test_released_address_returns_to_same_mac_when_nobody_else_took_it():
    server = DhcpServer(NetConfig())
    a, [ea] = dora(server, OTHER_MAC)
    a.release(1.0)
    server.handle(a.take_outgoing()[0].payload, 1.0)
    _, [eb] = dora(server, THIRD_MAC, now=2.0)
    assert eb.lease.ip != ea.lease.ip  # a never-used address is preferred
    _, [ea2] = dora(server, OTHER_MAC, now=3.0, xid=50)
    assert ea2.lease.ip == ea.lease.ip


def test_pool_exhaustion_gives_no_offer():
    net = NetConfig()
    server = DhcpServer(net)
    ips = set()
    for n in range(len(net.dhcp_pool)):
        reply = server.handle(raw_msg(wire.DISCOVER, mac=mac_n(n), xid=n), 0.0)
        assert reply is not None, f"no offer for client {n}"
        ips.add(wire.parse(reply.payload).yiaddr)
    assert len(ips) == 251  # .3 .. .253
    assert IP("192.168.127.254") not in ips and IP("192.168.127.1") not in ips and IP("192.168.127.2") not in ips
    assert server.handle(raw_msg(wire.DISCOVER, mac=mac_n(9999)), 1.0) is None
    # offers are only held for a while; then addresses come back
    assert server.handle(raw_msg(wire.DISCOVER, mac=mac_n(9999)), 61.0) is not None


def test_decline_keeps_address_out_for_a_while():
    server = DhcpServer(NetConfig(), pool=range(3, 5), decline_hold=100)
    _, [ev] = dora(server, OTHER_MAC)
    assert ev.lease.ip == IP("192.168.127.3")
    decline = raw_msg(wire.DECLINE, mac=OTHER_MAC, options={wire.OPT_REQUESTED_IP: IP("192.168.127.3").packed, wire.OPT_SERVER_ID: IP("192.168.127.1").packed})
    assert server.handle(decline, 1.0) is None
    _, [ev2] = dora(server, OTHER_MAC, now=2.0, xid=9)
    assert ev2.lease.ip == IP("192.168.127.4")
    assert server.handle(raw_msg(wire.DISCOVER, mac=THIRD_MAC), 3.0) is None  # .3 declined, .4 taken
    assert wire.parse(server.handle(raw_msg(wire.DISCOVER, mac=THIRD_MAC), 101.0).payload).yiaddr == IP("192.168.127.3")


def test_inform_acks_without_lease():
    server = DhcpServer(NetConfig())
    reply = server.handle(raw_msg(wire.INFORM, mac=OTHER_MAC, ciaddr=IP("192.168.127.77")), 0)
    msg = wire.parse(reply.payload)
    assert msg.message_type == wire.ACK and msg.yiaddr == IP(0) and msg.lease_time is None
    assert msg.routers == (IP("192.168.127.1"),) and msg.subnet_mask == IP("255.255.255.0")
    assert reply.dst_ip == IP("192.168.127.77") and reply.dst_mac == OTHER_MAC and not reply.broadcast
    assert server.leases() == {"192.168.127.2": "5a:94:ef:e4:0c:ee"}


def test_reply_addressing_follows_rfc2131_4_1():
    server = DhcpServer(NetConfig())
    uni = server.handle(raw_msg(wire.DISCOVER), 0)
    assert (uni.dst_ip, uni.dst_mac, uni.broadcast) == (IP("192.168.127.2"), VM_MAC, False)
    bc = server.handle(raw_msg(wire.DISCOVER, flags=wire.FLAG_BROADCAST), 0)
    assert (bc.dst_ip, bc.dst_mac, bc.broadcast) == (BROADCAST_IP, BROADCAST_MAC, True)
    renew = server.handle(raw_msg(wire.REQUEST, ciaddr=IP("192.168.127.2")), 0)
    assert wire.parse(renew.payload).message_type == wire.ACK
    assert (renew.dst_ip, renew.dst_mac, renew.broadcast) == (IP("192.168.127.2"), VM_MAC, False)


def test_server_ignores_what_is_not_for_it():
    server = DhcpServer(NetConfig())
    reply_op = wire.build(wire.DhcpMessage(op=wire.BOOTREPLY, chaddr=VM_MAC, options={53: bytes([wire.OFFER])}))
    assert server.handle(reply_op, 0) is None
    assert server.handle(raw_msg(wire.DISCOVER, giaddr=IP("10.0.0.1")), 0) is None
    assert server.handle(raw_msg(wire.OFFER), 0) is None
    assert server.handle(raw_msg(99), 0) is None
    with pytest.raises(MalformedPacket):
        server.handle(b"\x01" * 100, 0)
    with pytest.raises(MalformedPacket):  # plain BOOTP: no message type
        server.handle(wire.build(wire.DhcpMessage(chaddr=VM_MAC)), 0)


def test_renewal_at_t1_extends_the_lease():
    server = DhcpServer(NetConfig(), lease_time=100)
    client = DhcpClient(VM_MAC, xid=1)
    net = Net(server, client)
    client.start(0.0)
    [bound] = net.pump(0.0)
    assert client.next_timeout() == 50.0  # T1
    now, events = net.run_until(0.0, 60.0)
    assert events == [Renewed(client.lease)]
    assert client.state == dc.BOUND and client.lease.obtained_at == 50.0
    renew = net.sent[-1]
    assert renew.src_ip == IP("192.168.127.2") and renew.dst_ip == IP("192.168.127.1") and not renew.broadcast
    msg = wire.parse(renew.payload)
    assert msg.ciaddr == IP("192.168.127.2") and msg.requested_ip is None and msg.server_id is None
    # and it keeps renewing: still bound long after the first lease would have expired
    now, events = net.run_until(now, 1000.0)
    assert client.state == dc.BOUND and all(isinstance(e, Renewed) for e in events) and len(events) >= 10


def test_lost_server_goes_rebinding_then_expires():
    server = DhcpServer(NetConfig(), lease_time=1000)
    client = DhcpClient(OTHER_MAC, xid=1)
    net = Net(server, client)
    client.start(0.0)
    net.pump(0.0)
    net.server_up = False
    n_before = len(net.sent)
    now, events = net.run_until(0.0, 874.9)
    assert events == [] and client.state == dc.RENEWING
    renewing = net.sent[n_before:]
    assert renewing and all(not o.broadcast and o.dst_ip == IP("192.168.127.1") for o in renewing)
    now, events = net.run_until(now, 999.9)
    assert events == [] and client.state == dc.REBINDING
    rebinding = net.sent[n_before + len(renewing):]
    assert rebinding and all(o.broadcast and o.dst_ip == BROADCAST_IP and o.src_ip == IP("192.168.127.3") for o in rebinding)
    now, events = net.run_until(now, 1000.0)
    assert events == [Lost("lease expired")]
    assert client.lease is None and client.state == dc.SELECTING
    assert wire.parse(net.sent[-1].payload).message_type == wire.DISCOVER
    # the server comes back: the client binds again, to the same address
    net.server_up = True
    now, events = net.run_until(now, 1020.0)
    assert [type(e) for e in events] == [Bound] and events[0].lease.ip == IP("192.168.127.3")


def test_rebinding_reaches_the_server_when_renewals_are_lost():
    server = DhcpServer(NetConfig(), lease_time=1000)
    client = DhcpClient(OTHER_MAC, xid=1)
    net = Net(server, client)
    client.start(0.0)
    net.pump(0.0)
    net.server_up = False
    now, _ = net.run_until(0.0, 900.0)
    assert client.state == dc.REBINDING
    net.server_up = True
    now, events = net.run_until(now, 1000.0)
    assert [type(e) for e in events] == [Renewed] and client.state == dc.BOUND


def test_discover_retransmits_with_capped_backoff():
    client = DhcpClient(VM_MAC, xid=1)
    client.start(0.0)
    times = [0.0]
    client.take_outgoing()
    now = 0.0
    for _ in range(7):
        now = client.next_timeout()
        client.handle_timeout(now)
        [o] = client.take_outgoing()
        assert wire.parse(o.payload).message_type == wire.DISCOVER
        times.append(now)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps == [1, 2, 4, 8, 8, 8, 8]
    # an early call does nothing
    assert client.handle_timeout(now + 1) == [] and client.take_outgoing() == []


def test_request_retransmits_then_starts_over():
    server = DhcpServer(NetConfig())
    client = DhcpClient(VM_MAC, xid=1)
    client.start(0.0)
    offer = server.handle(client.take_outgoing()[0].payload, 0.0)
    client.receive(offer.payload, 0.0)
    assert client.state == dc.REQUESTING
    kinds = [wire.parse(o.payload).message_type for o in client.take_outgoing()]
    now = 0.0
    for _ in range(10):
        now = client.next_timeout()
        client.handle_timeout(now)
        kinds += [wire.parse(o.payload).message_type for o in client.take_outgoing()]
        if client.state == dc.SELECTING:
            break
    assert kinds == [wire.REQUEST] * 5 + [wire.DISCOVER]


def test_client_ignores_foreign_and_malformed_replies():
    server = DhcpServer(NetConfig())
    client = DhcpClient(VM_MAC, xid=1)
    client.start(0.0)
    discover = client.take_outgoing()[0].payload
    offer = server.handle(discover, 0.0).payload
    msg = wire.parse(offer)
    wrong_xid = wire.build(wire.DhcpMessage(**{**_fields(msg), "xid": msg.xid + 1}))
    wrong_mac = wire.build(wire.DhcpMessage(**{**_fields(msg), "chaddr": OTHER_MAC}))
    for junk in (wrong_xid, wrong_mac, b"", b"\x02" * 300, offer[:250], offer[:236] + b"\x00\x00\x00\x00" + offer[240:]):
        assert client.receive(junk, 0.0) == []
        assert client.state == dc.SELECTING and client.take_outgoing() == []
    # an ACK while selecting is not a lease
    assert client.receive(server.handle(raw_msg(wire.REQUEST, xid=client.xid, ciaddr=IP("192.168.127.2")), 0).payload, 0) == []
    assert client.receive(offer, 0.0) == [] and client.state == dc.REQUESTING


def _fields(msg: wire.DhcpMessage) -> dict:
    import attrs

    return attrs.asdict(msg, recurse=False)


def test_custom_subnet_10_5_0_0_16():
    net = NetConfig(subnet="10.5.0.0/16", mtu=4000)
    server = DhcpServer(net, search_domains=["svc.local"])
    _, [a] = dora(server, VM_MAC)
    _, [b] = dora(server, OTHER_MAC, xid=2)
    assert str(a.lease.interface) == "10.5.0.2/16"
    assert a.lease.router == IP("10.5.0.1") and a.lease.dns_servers == (IP("10.5.0.1"),) and a.lease.mtu == 4000
    assert a.lease.server_id == IP("10.5.0.1")
    assert str(b.lease.interface) == "10.5.0.3/16"
    nak = server.handle(raw_msg(wire.REQUEST, mac=OTHER_MAC, options={wire.OPT_REQUESTED_IP: IP("192.168.127.3").packed}), 1)
    assert wire.parse(nak.payload).message_type == wire.NAK


def test_static_leases_override_and_validation():
    net = NetConfig()
    server = DhcpServer(net, static_leases={OTHER_MAC: IP("192.168.127.2"), THIRD_MAC: IP("192.168.127.100")})
    _, [a] = dora(server, OTHER_MAC)
    _, [b] = dora(server, THIRD_MAC, xid=2)
    _, [c] = dora(server, VM_MAC, xid=3)
    assert (a.lease.ip, b.lease.ip, c.lease.ip) == (IP("192.168.127.2"), IP("192.168.127.100"), IP("192.168.127.3"))
    from rdswitch.config import ConfigError

    for bad in ({OTHER_MAC: IP("192.168.127.1")}, {OTHER_MAC: IP("10.0.0.1")}, {OTHER_MAC: IP("192.168.127.254")}):
        with pytest.raises(ConfigError):
            DhcpServer(net, static_leases=bad)
    with pytest.raises(ConfigError):
        DhcpServer(net, lease_time=0)


def test_client_id_is_echoed():
    server = DhcpServer(NetConfig())
    reply = server.handle(raw_msg(wire.DISCOVER, options={wire.OPT_CLIENT_ID: b"\x01" + VM_MAC}), 0)
    assert wire.parse(reply.payload).client_id == b"\x01" + VM_MAC


# --------------------------------------------------------------- wire codec


def test_hand_built_udhcpc_discover_parses():
    # What busybox udhcpc sends: fixed header, cookie, 53, 61, 57, 55, 60, 12, END, padding.
    hdr = struct.pack("!BBBBIHH", 1, 1, 6, 0, 0x3903F326, 0, 0) + b"\x00" * 16
    hdr += VM_MAC + b"\x00" * 10 + b"\x00" * 192
    opts = bytes([53, 1, 1])
    opts += bytes([61, 7, 1]) + VM_MAC
    opts += bytes([57, 2, 0x02, 0x40])
    opts += bytes([55, 7, 1, 3, 6, 12, 15, 28, 42])
    opts += bytes([60, 12]) + b"udhcp 1.36.1"
    opts += bytes([12, 3]) + b"vm\x00"[:3]
    opts += bytes([255])
    data = hdr + wire.MAGIC_COOKIE + opts
    data += b"\x00" * (548 - len(data))
    msg = wire.parse(data)
    assert msg.message_type == wire.DISCOVER and msg.xid == 0x3903F326 and msg.chaddr == VM_MAC
    assert msg.param_request_list == (1, 3, 6, 12, 15, 28, 42)
    assert msg.client_id == b"\x01" + VM_MAC and msg.hostname == "vm"
    assert msg.options[wire.OPT_VENDOR_CLASS] == b"udhcp 1.36.1"
    assert list(msg.options) == [53, 61, 57, 55, 60, 12]
    reply = DhcpServer(NetConfig()).handle(data, 0.0)
    assert wire.parse(reply.payload).yiaddr == IP("192.168.127.2")


def test_hand_built_dhclient_request_with_pad_and_overload_parses():
    # dhclient-style INIT-REBOOT REQUEST, broadcast flag, PAD bytes, and options continued in `file` (overload 52=1).
    file_opts = bytes([12, 4]) + b"host" + bytes([255])
    hdr = struct.pack("!BBBBIHH", 1, 1, 6, 0, 0xDEADBEEF, 3, 0x8000) + b"\x00" * 16
    hdr += VM_MAC + b"\x00" * 10 + b"\x00" * 64 + file_opts.ljust(128, b"\x00")
    opts = bytes([53, 1, 3, 0, 0, 50, 4, 192, 168, 127, 2, 52, 1, 1, 55, 3, 1, 3, 6, 255])
    msg = wire.parse(hdr + wire.MAGIC_COOKIE + opts)
    assert msg.message_type == wire.REQUEST and msg.secs == 3 and msg.broadcast
    assert msg.requested_ip == IP("192.168.127.2") and msg.hostname == "host" and msg.file == b""
    assert wire.OPT_OVERLOAD not in msg.options
    reply = DhcpServer(NetConfig()).handle(hdr + wire.MAGIC_COOKIE + opts, 0.0)
    assert wire.parse(reply.payload).message_type == wire.ACK and reply.broadcast


def test_build_pads_and_splits_long_options():
    long = b"x" * 600
    data = wire.build(wire.DhcpMessage(options={53: b"\x01", 224: long}))
    assert len(data) == 300 or len(data) > 600
    assert data[236:240] == wire.MAGIC_COOKIE
    assert wire.parse(data).options[224] == long
    assert len(wire.build(wire.DhcpMessage(options={53: b"\x01"}))) == 300


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "dhcp truncated"),
        (b"\x01" * 239, "dhcp truncated"),
        (bytes([1, 1, 6, 0]) + b"\x00" * 232 + b"\x00\x00\x00\x00" + bytes([53, 1, 1, 255]), "dhcp bad magic cookie"),
        (bytes([3, 1, 6, 0]) + b"\x00" * 232 + wire.MAGIC_COOKIE + bytes([53, 1, 1, 255]), "dhcp bad op"),
        (bytes([1, 1, 17, 0]) + b"\x00" * 232 + wire.MAGIC_COOKIE + bytes([53, 1, 1, 255]), "dhcp bad hlen"),
        (bytes([1, 1, 6, 0]) + b"\x00" * 232 + wire.MAGIC_COOKIE + bytes([53, 1, 1, 12, 9, 65]), "dhcp option overrun"),
        (bytes([1, 1, 6, 0]) + b"\x00" * 232 + wire.MAGIC_COOKIE + bytes([53, 1, 1, 12]), "dhcp option overrun"),
        (bytes([1, 1, 6, 0]) + b"\x00" * 232 + wire.MAGIC_COOKIE + bytes([53, 2, 1, 1, 255]), "dhcp bad option length"),
        (bytes([1, 1, 6, 0]) + b"\x00" * 232 + wire.MAGIC_COOKIE + bytes([53, 1, 1, 50, 3, 1, 2, 3, 255]), "dhcp bad option length"),
        (bytes([1, 1, 6, 0]) + b"\x00" * 232 + wire.MAGIC_COOKIE + bytes([53, 1, 1, 3, 5, 1, 2, 3, 4, 5, 255]), "dhcp bad option length"),
        (bytes([1, 1, 6, 0]) + b"\x00" * 232 + wire.MAGIC_COOKIE + bytes([12, 1, 65, 255]), "dhcp missing message type"),
        (bytes([1, 1, 6, 0]) + b"\x00" * 232 + wire.MAGIC_COOKIE + bytes([53, 1, 1, 52, 1, 7, 255]), "dhcp bad option value"),
        (bytes([1, 1, 6, 0]) + b"\x00" * 232 + wire.MAGIC_COOKIE + bytes([53, 1, 1, 119, 3, 1, 97, 0xC0, 255]), "dhcp bad domain search"),
    ],
)
def test_parse_rejects_malformed(data, reason):
    with pytest.raises(MalformedPacket) as exc:
        wire.parse(data)
    assert exc.value.reason == reason


def test_domain_search_compression_pointers():
    # RFC 3397 example: eng.apple.com, marketing.apple.com with a pointer to "apple.com"
    data = b"\x03eng\x05apple\x03com\x00" + b"\x09marketing\xc0\x04"
    assert wire.decode_domain_search(data) == ("eng.apple.com", "marketing.apple.com")
    # a pointer to itself / forwards / a loop is refused, never followed forever
    for bad in (b"\xc0\x00", b"\x01a\xc0\x00", b"\x01a\x00\xc0\x05\x01b\xc0\x02", b"\x01a\x00\x01b\xc0\x07"):
        with pytest.raises(MalformedPacket, match="pointer"):
            wire.decode_domain_search(bad)
    # chained pointers (each strictly backwards) are fine
    chained = b"\x03com\x00" + b"\x05apple\xc0\x00" + b"\x03eng\xc0\x05"
    assert wire.decode_domain_search(chained) == ("com", "apple.com", "eng.apple.com")


def test_domain_search_encoding_rejects_bad_names():
    for bad in ("", ".", "a..b", "x" * 64 + ".com", "spaces are bad.com", ".".join(["abcdefghi"] * 30)):
        with pytest.raises(ValueError):
            wire.encode_domain_search([bad])
    assert wire.encode_domain_search(["Example.COM."]) == b"\x07Example\x03COM\x00"


# -------------------------------------------------------------- properties

ipv4 = st.integers(0, 2**32 - 1).map(IPv4Address)
label = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20)
domain = st.lists(label, min_size=1, max_size=5).map(".".join)
known_options = st.fixed_dictionaries(
    {},
    optional={
        wire.OPT_SUBNET_MASK: ipv4.map(wire.encode_ip),
        wire.OPT_ROUTER: st.lists(ipv4, min_size=1, max_size=3).map(wire.encode_ips),
        wire.OPT_DNS: st.lists(ipv4, min_size=1, max_size=80).map(wire.encode_ips),
        wire.OPT_HOSTNAME: domain.map(wire.encode_str),
        wire.OPT_DOMAIN_NAME: domain.map(wire.encode_str),
        wire.OPT_MTU: st.integers(68, 65535).map(wire.encode_u16),
        wire.OPT_REQUESTED_IP: ipv4.map(wire.encode_ip),
        wire.OPT_LEASE_TIME: st.integers(0, 2**32 - 1).map(wire.encode_u32),
        wire.OPT_SERVER_ID: ipv4.map(wire.encode_ip),
        wire.OPT_PARAM_REQUEST_LIST: st.binary(min_size=1, max_size=40),
        wire.OPT_T1: st.integers(0, 2**32 - 1).map(wire.encode_u32),
        wire.OPT_T2: st.integers(0, 2**32 - 1).map(wire.encode_u32),
        wire.OPT_CLIENT_ID: st.binary(min_size=2, max_size=20),
        wire.OPT_DOMAIN_SEARCH: st.lists(domain, min_size=1, max_size=30).map(wire.encode_domain_search),
        200: st.binary(max_size=600),
    },
)


@st.composite
def messages(draw):
    hlen = draw(st.integers(0, 16))
    opts = {wire.OPT_MESSAGE_TYPE: bytes([draw(st.integers(1, 8))])}
    known = draw(known_options)
    keys = draw(st.permutations(list(known)))
    opts.update((k, known[k]) for k in keys)
    return wire.DhcpMessage(
        op=draw(st.sampled_from([1, 2])),
        htype=draw(st.integers(0, 255)),
        hlen=hlen,
        hops=draw(st.integers(0, 255)),
        xid=draw(st.integers(0, 2**32 - 1)),
        secs=draw(st.integers(0, 65535)),
        flags=draw(st.integers(0, 65535)),
        ciaddr=draw(ipv4),
        yiaddr=draw(ipv4),
        siaddr=draw(ipv4),
        giaddr=draw(ipv4),
        chaddr=draw(st.binary(min_size=hlen, max_size=hlen)),
        sname=draw(st.binary(max_size=64).map(lambda b: b.rstrip(b"\x00"))),
        file=draw(st.binary(max_size=128).map(lambda b: b.rstrip(b"\x00"))),
        options=opts,
    )


@settings(max_examples=300, deadline=None)
@given(messages())
def test_build_parse_round_trip(msg):
    data = wire.build(msg)
    assert len(data) >= 300
    back = wire.parse(data)
    assert back == msg
    assert list(back.options) == list(msg.options)
    assert wire.build(back) == data


@settings(max_examples=200, deadline=None)
@given(st.lists(domain, min_size=1, max_size=20))
def test_domain_search_round_trip(names):
    assert wire.decode_domain_search(wire.encode_domain_search(names)) == tuple(names)


def _never_crash(data: bytes):
    try:
        msg = wire.parse(data)
    except MalformedPacket:
        return
    # whatever parses must have readers that never raise and must rebuild
    (msg.message_type, msg.requested_ip, msg.server_id, msg.lease_time, msg.param_request_list, msg.hostname)
    (msg.routers, msg.dns_servers, msg.mtu, msg.search_domains, msg.t1, msg.t2, msg.prefixlen, msg.summary())
    wire.parse(wire.build(msg))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_random_bytes_only_raise_malformed(data):
    _never_crash(data)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=120), st.binary(max_size=64), st.binary(max_size=128))
def test_fuzz_valid_header_random_options(opts, sname, file):
    """Random option bytes behind a valid header reach the option parser (pure random bytes rarely do)."""
    head = bytes([1, 1, 6, 0]) + b"\x00" * 40 + sname.ljust(64, b"\x00") + file.ljust(128, b"\x00")
    _never_crash(head + wire.MAGIC_COOKIE + opts)
    _never_crash(head + wire.MAGIC_COOKIE + bytes([52, 1, 3]) + opts)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_fuzz_domain_search_decoder(data):
    try:
        names = wire.decode_domain_search(data)
    except MalformedPacket:
        return
    assert all(0 < len(n) < 256 for n in names)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=400), st.floats(0, 1e6))
def test_fuzz_server_and_client_never_crash(data, now):
    server = DhcpServer(NetConfig())
    try:
        server.handle(data, now)
    except MalformedPacket:
        pass
    client = DhcpClient(VM_MAC, xid=1)
    client.start(0.0)
    assert client.receive(data, now) == []
