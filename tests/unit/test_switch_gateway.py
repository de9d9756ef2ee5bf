"""The sans-IO switch and gateway driven with frames."""

import ipaddress

import pytest

from rdswitch.config import ConfigError, NetConfig, normalize_argv, parse_mac
from rdswitch.stack.gateway import Gateway, IcmpEchoIn, TcpIn, UdpIn
from rdswitch.stack.switch import Switch
from rdswitch.wire import arp, ethernet, icmp, ipv4, tcp, udp
from rdswitch.wire.errors import MalformedPacket

NET = NetConfig()
VM_MAC = NET.vm_mac
VM_IP = NET.vm_ip.packed
GW_IP = NET.gateway_ip.packed


def eth(dst, src, payload, et=ethernet.TYPE_IPV4):
    return ethernet.build(dst, src, et, payload)


def test_switch_learns_and_floods():
    sw = Switch()
    for p in ("a", "b", "c"):
        sw.add_port(p)
    ma, mb = b"\x02" * 6, b"\x04" * 6
    # unknown destination: flood to all but the sender
    assert sorted(sw.route("a", eth(mb, ma, b""))) == ["b", "c"]
    # b answers: a is known now, unicast goes only there
    assert list(sw.route("b", eth(ma, mb, b""))) == ["a"]
    assert list(sw.route("a", eth(mb, ma, b""))) == ["b"]
    # broadcast floods
    assert sorted(sw.route("c", eth(ethernet.BROADCAST, b"\x06" * 6, b""))) == ["a", "b"]
    # a frame to a MAC learnt on the ingress port goes nowhere
    assert list(sw.route("a", eth(ma, b"\x08" * 6, b""))) == []
    sw.remove_port("b")
    assert sw.lookup(mb) is None
    assert sorted(sw.route("a", eth(mb, ma, b""))) == ["c"]


def test_arp_answers_gateway_ips_only():
    gw = Gateway(NET)
    for target, answered in ((NET.gateway_ip, True), (NET.host_alias_ip, True),
                             (ipaddress.IPv4Address("192.168.127.77"), False)):
        req = arp.build(arp.ArpPacket(arp.REQUEST, VM_MAC, VM_IP, b"\0" * 6, target.packed))
        replies, ev = gw.input(eth(ethernet.BROADCAST, VM_MAC, req, ethernet.TYPE_ARP), 0.0)
        assert ev is None
        assert bool(replies) == answered
        if answered:
            dst, src, et, payload = ethernet.parse(replies[0])
            rep = arp.parse(payload)
            assert (dst, src, rep.op, rep.sender_mac, rep.sender_ip) == (VM_MAC, NET.gateway_mac, arp.REPLY,
                                                                         NET.gateway_mac, target.packed)
    assert gw.neighbors[VM_IP] == VM_MAC


def test_ping_gateway_answered_locally_and_others_become_events():
    gw = Gateway(NET)
    req = icmp.build(icmp.IcmpMessage(icmp.ECHO_REQUEST, 0, (7 << 16) | 1, b"ping!"))
    replies, ev = gw.input(eth(NET.gateway_mac, VM_MAC, ipv4.build(VM_IP, GW_IP, 1, req)), 0.0)
    assert ev is None and len(replies) == 1
    pkt = ipv4.parse(memoryview(replies[0])[14:], verify=True)
    rep = icmp.parse(pkt.payload, verify=True)
    assert (pkt.src, pkt.dst, rep.type, rep.ident, rep.seq, bytes(rep.payload)) == (GW_IP, VM_IP, 0, 7, 1, b"ping!")
    alias = NET.host_alias_ip.packed
    replies, ev = gw.input(eth(NET.gateway_mac, VM_MAC, ipv4.build(VM_IP, alias, 1, req)), 0.0)
    assert replies == [] and isinstance(ev, IcmpEchoIn) and ev.dst_ip == alias


def test_tcp_and_udp_become_events():
    gw = Gateway(NET)
    dst = bytes([10, 0, 0, 1])
    seg = tcp.build(tcp.Segment(40000, 80, 1, 0, tcp.SYN, 65535, mss=1460), VM_IP, dst)
    _, ev = gw.input(eth(NET.gateway_mac, VM_MAC, ipv4.build(VM_IP, dst, 6, seg)), 0.0)
    assert isinstance(ev, TcpIn) and ev.seg.mss == 1460 and ev.dst_ip == dst
    dgram = udp.build(5000, 53, b"q", VM_IP, GW_IP)
    _, ev = gw.input(eth(NET.gateway_mac, VM_MAC, ipv4.build(VM_IP, GW_IP, 17, dgram)), 0.0)
    assert isinstance(ev, UdpIn) and (ev.dst_port, bytes(ev.payload)) == (53, b"q")


def test_garbage_raises_malformed_only():
    gw = Gateway(NET)
    for frame in (b"\x01" * 5, eth(NET.gateway_mac, VM_MAC, b"\x45\x00"), eth(NET.gateway_mac, VM_MAC, b"\x00" * 3, 0x0806)):
        with pytest.raises(MalformedPacket):
            gw.input(frame, 0.0)
    # a first fragment is held for reassembly (tests/unit/test_reassembly.py), nothing dropped
    frag = bytearray(ipv4.build(VM_IP, GW_IP, 17, udp.build(1, 2, b"x" * 8, VM_IP, GW_IP)))
    frag[6] = 0x20
    assert gw.input(eth(NET.gateway_mac, VM_MAC, bytes(frag)), 0.0) == ([], None)
    assert len(gw.reassembly) == 1 and not gw.counters.drops


def test_gateway_frame_builders_checksums():
    gw = Gateway(NET)
    seg = tcp.Segment(80, 40000, 5, 6, tcp.ACK, 100, b"x" * 1001)
    frame = gw.frames.tcp_frame(VM_MAC, GW_IP, VM_IP, seg)
    pkt = ipv4.parse(memoryview(frame)[14:], verify=True)
    back = tcp.parse(pkt.payload, pkt.src, pkt.dst, verify=True)
    assert bytes(back.payload) == b"x" * 1001


def test_config_derivation_and_validation():
    net = NetConfig(subnet="10.8.0.0/16")
    assert (str(net.gateway_ip), str(net.vm_ip), str(net.host_alias_ip)) == ("10.8.0.1", "10.8.0.2", "10.8.0.254")
    for bad in ("10.0.0.1/24", "10.0.0.0/30", "nonsense"):
        with pytest.raises(ConfigError):
            NetConfig(subnet=bad)
    for bad in ("01:02:03:04:05", "zz:94:ef:e4:0c:ee", "01:00:00:00:00:01"):
        with pytest.raises(ConfigError):
            parse_mac(bad)
    with pytest.raises(ConfigError):
        NetConfig(mtu=100)
    with pytest.raises(ConfigError):
        NetConfig(mtu=70000)
    assert normalize_argv(["-debug", "-subnet=1", "-x", "--debug"], {"debug", "subnet"}) == ["--debug", "--subnet=1", "-x", "--debug"]


def test_switch_pins_gateway_mac_and_caps_learning():
    sw = Switch(max_macs_per_port=3)
    for p in ("gw", "a", "b"):
        sw.add_port(p)
    gw_mac = NET.gateway_mac
    sw.pin(gw_mac, "gw")
    # a VM claiming the gateway's MAC does not move it
    sw.route("a", eth(ethernet.BROADCAST, gw_mac, b""))
    assert sw.lookup(gw_mac) == "gw" and sw.refused_learning == 1
    assert list(sw.route("b", eth(gw_mac, b"\x04" * 6, b""))) == ["gw"]
    # a port flooding random source MACs stops being learnt at the cap
    for i in range(10):
        sw.route("a", eth(ethernet.BROADCAST, bytes([2, 0, 0, 0, 0, i]), b""))
    assert sum(1 for p in sw.macs().values() if p == "a") == 3
    sw.remove_port("a")
    assert sw.lookup(gw_mac) == "gw"
    assert all(p != "a" for p in sw.macs().values())


def test_neighbors_only_learn_subnet_addresses():
    gw = Gateway(NET)
    outside = bytes([8, 8, 8, 8])
    dgram = udp.build(5000, 53, b"q", outside, GW_IP)
    gw.input(eth(NET.gateway_mac, VM_MAC, ipv4.build(outside, GW_IP, 17, dgram)), 0.0)
    assert outside not in gw.neighbors


def test_big_udp_is_fragmented_to_the_mtu():
    gw = Gateway(NetConfig(mtu=1500))
    payload = bytes(range(256)) * 100  # 25600 bytes
    frames = gw.frames.udp_frames(VM_MAC, GW_IP, 53, VM_IP, 5000, payload)
    assert len(frames) > 1 and all(len(f) <= 1514 for f in frames)
    # reassemble by offset and check the UDP datagram
    parts = {}
    for f in frames:
        pkt = ipv4.parse(memoryview(f)[14:], verify=True)
        assert pkt.is_fragment
        parts[(pkt.flags_frag & 0x1FFF) * 8] = bytes(pkt.payload)
    whole = b"".join(parts[k] for k in sorted(parts))
    sport, dport, data = udp.parse(whole, GW_IP, VM_IP, verify=True)
    assert (sport, dport, bytes(data)) == (53, 5000, payload)
    assert gw.frames.udp_frames(VM_MAC, GW_IP, 53, VM_IP, 5000, b"x" * 70000) is None
    assert gw.counters.drops["udp-too-large"] == 1


from hypothesis import given, strategies as st  # noqa: E402


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 255).filter(lambda f: not f & tcp.SYN),
       st.integers(0, 65535), st.integers(1, 65535), st.integers(1, 65535), st.binary(max_size=3000),
       st.binary(min_size=4, max_size=4), st.binary(min_size=4, max_size=4))
def test_tcp_frame_fast_path_matches_reference(seq, ack, flags, window, sport, dport, payload, src, dst):
    gw = Gateway(NET)
    seg = tcp.Segment(sport, dport, seq, ack, flags, window, payload)
    frame = gw.frames.tcp_frame(VM_MAC, src, dst, seg)
    pkt = ipv4.parse(memoryview(frame)[14:], verify=True)
    assert (pkt.src, pkt.dst, pkt.proto, pkt.ttl) == (src, dst, 6, 64) and not pkt.is_fragment
    back = tcp.parse(pkt.payload, src, dst, verify=True)
    assert (back.src_port, back.dst_port, back.seq, back.ack, back.flags, back.window, bytes(back.payload)) == \
        (sport, dport, seq, ack, flags, window, payload)
    # identical bytes to the general builder (apart from the IP identification)
    ref = ipv4.build(src, dst, 6, tcp.build(seg, src, dst), ident=pkt.ident)
    assert bytes(frame[14:]) == ref


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 255), st.integers(0, 65535),
       st.binary(max_size=1500), st.sampled_from([None, 1460]), st.binary(max_size=30))
def test_tcp_input_fast_path_matches_general_parser(seq, ack, flags, window, payload, mss, trailer):
    gw = Gateway(NET)
    seg = tcp.Segment(40000, 80, seq, ack, flags, window, payload, mss=mss)
    dst = bytes([10, 0, 0, 9])
    # trailing bytes beyond the IP total length (Ethernet padding) must not leak into the payload
    frame = eth(NET.gateway_mac, VM_MAC, ipv4.build(VM_IP, dst, 6, tcp.build(seg, VM_IP, dst))) + trailer
    _, fast = gw.input(frame, 0.0)
    _, general = gw._input_ipv4(VM_MAC, memoryview(frame)[14:], 0.0)
    assert isinstance(fast, TcpIn) and isinstance(general, TcpIn)
    assert (fast.src_mac, fast.src_ip, fast.dst_ip) == (general.src_mac, general.src_ip, general.dst_ip)
    f, g = fast.seg, general.seg
    assert (f.src_port, f.dst_port, f.seq, f.ack, f.flags, f.window, bytes(f.payload)) == \
        (g.src_port, g.dst_port, g.seq, g.ack, g.flags, g.window, bytes(g.payload))
    if flags & tcp.SYN:
        assert f.mss == mss  # SYNs take the general path: their options are parsed


@given(st.binary(max_size=1600), st.integers(1, 65535), st.integers(1, 65535), st.integers(0, 0xFFFE))
def test_udp_fast_path_equals_the_general_path(payload, sport, dport, ident):
    """A datagram that fits the MTU is packed in one go; byte for byte what the codecs build."""
    from rdswitch.stack.frames import FrameBuilder
    from rdswitch.wire import ethernet, ipv4, udp
    fb = FrameBuilder(NET)
    fb._ident = ident
    src, dst = NET.gateway_ip.packed, NET.vm_ip.packed
    frames = fb.udp_frames(NET.vm_mac, src, sport, dst, dport, payload)
    expected = [ethernet.header(NET.vm_mac, NET.gateway_mac, ethernet.TYPE_IPV4) + p for p in
                ipv4.fragment(src, dst, ipv4.PROTO_UDP, udp.build(sport, dport, payload, src, dst), NET.mtu,
                              ident=ident + 1)]
    assert frames == expected


def test_a_mac_stays_on_its_port_while_the_port_is_up():
    sw = Switch()
    for p in ("a", "b", "c"):
        sw.add_port(p)
    ma, mb = b"\x02" * 6, b"\x04" * 6
    sw.route("a", eth(ethernet.BROADCAST, ma, b""))
    sw.route("b", eth(ethernet.BROADCAST, mb, b""))
    # b claims a's MAC: the frame goes nowhere, a keeps it, a's traffic still goes to a
    assert list(sw.route("b", eth(ethernet.BROADCAST, ma, b""))) == []
    assert list(sw.route("b", eth(mb, ma, b""))) == []
    assert sw.lookup(ma) == "a" and sw.spoofed == 2
    assert list(sw.route("c", eth(ma, b"\x06" * 6, b""))) == ["a"]
    # once a's port is gone, its MAC may come up elsewhere (a restarted VM on a new session)
    sw.remove_port("a")
    assert sorted(sw.route("b", eth(ethernet.BROADCAST, ma, b""))) == ["c"]
    assert sw.lookup(ma) == "b"


def test_neighbours_are_not_learnt_against_a_lease():
    from rdswitch.services.dhcp import DhcpServer

    gw = Gateway(NET, DhcpServer(NET))
    other_mac = b"\x02\x00\x00\x00\x00\x07"
    # another MAC using the VM's static lease (.2): dropped, counted, not learnt
    syn = tcp.build(tcp.Segment(40000, 80, 1, 0, tcp.SYN, 65535, b""), VM_IP, GW_IP)
    replies, ev = gw.input(eth(NET.gateway_mac, other_mac, ipv4.build(VM_IP, GW_IP, 6, syn)), 0.0)
    assert (replies, ev) == ([], None) and VM_IP not in gw.neighbors and gw.counters.drops["ip-spoofed"] == 1
    dgram = udp.build(5000, 53, b"q", VM_IP, GW_IP)
    assert gw.input(eth(NET.gateway_mac, other_mac, ipv4.build(VM_IP, GW_IP, 17, dgram)), 0.0) == ([], None)
    garp = arp.build(arp.ArpPacket(arp.REQUEST, other_mac, VM_IP, b"\0" * 6, GW_IP))
    assert gw.input(eth(ethernet.BROADCAST, other_mac, garp, ethernet.TYPE_ARP), 0.0) == ([], None)
    assert VM_IP not in gw.neighbors and gw.counters.drops["ip-spoofed"] == 3
    # the lease's own MAC is learnt; an address without a lease is learnt from whoever uses it
    replies, ev = gw.input(eth(NET.gateway_mac, VM_MAC, ipv4.build(VM_IP, GW_IP, 6, syn)), 0.0)
    assert isinstance(ev, TcpIn) and gw.neighbors[VM_IP] == VM_MAC
    free = (NET.subnet.network_address + 77).packed
    syn2 = tcp.build(tcp.Segment(40000, 80, 1, 0, tcp.SYN, 65535, b""), free, GW_IP)
    assert isinstance(gw.input(eth(NET.gateway_mac, other_mac, ipv4.build(free, GW_IP, 6, syn2)), 0.0)[1], TcpIn)
    assert gw.neighbors[free] == other_mac
