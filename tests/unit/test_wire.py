"""Wire codecs: known-answer checks against the kernel's conventions and hypothesis properties."""

import ipaddress
import struct

import pytest
from hypothesis import given, strategies as st

from rdswitch.wire import arp, ethernet, icmp, ipv4, tcp, udp
from rdswitch.wire.checksum import checksum, ones_sum
from rdswitch.wire.errors import MalformedPacket

A = ipaddress.IPv4Address("192.168.127.2").packed
B = ipaddress.IPv4Address("192.168.127.1").packed


def ref_checksum(data: bytes) -> int:
    """RFC 1071 by the book, as the reference for the fast version."""
    if len(data) % 2:
        data += b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += (data[i] << 8) | data[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


@given(st.binary(max_size=3000))
def test_checksum_matches_rfc1071(data):
    assert checksum(data) == ref_checksum(data)


def test_checksum_nonzero_multiple_of_ffff():
    # Sum is exactly 0xFFFF: the naive modulo would say 0.
    assert ones_sum(b"\xff\xff") == 0xFFFF
    assert checksum(b"\xff\xff") == 0
    assert ones_sum(b"\0\0") == 0


def test_ipv4_header_known_answer():
    # The classic example from Wikipedia's IPv4 header checksum article.
    hdr = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert checksum(hdr) == 0xB861


@given(st.binary(max_size=2000), st.integers(0, 255), st.integers(1, 255))
def test_ipv4_roundtrip(payload, proto, ttl):
    pkt = ipv4.build(A, B, proto, payload, ttl=ttl, ident=7)
    parsed = ipv4.parse(pkt, verify=True)
    assert (parsed.src, parsed.dst, parsed.proto, bytes(parsed.payload), parsed.ttl) == (A, B, proto, payload, ttl)
    assert not parsed.is_fragment


def test_ipv4_fragment_flag_and_errors():
    pkt = bytearray(ipv4.build(A, B, 17, b"x" * 10))
    pkt[6] = 0x20  # MF
    assert ipv4.parse(bytes(pkt)).is_fragment
    with pytest.raises(MalformedPacket):
        ipv4.parse(b"\x45" + b"\0" * 10)
    bad = bytearray(ipv4.build(A, B, 17, b"abc"))
    bad[0] = 0x65
    with pytest.raises(MalformedPacket, match="version"):
        ipv4.parse(bytes(bad))
    bad = bytearray(ipv4.build(A, B, 17, b"abc"))
    bad[8] ^= 1
    with pytest.raises(MalformedPacket, match="checksum"):
        ipv4.parse(bytes(bad), verify=True)


@given(st.binary(max_size=1500), st.integers(1, 65535), st.integers(1, 65535))
def test_udp_roundtrip_and_checksum(payload, sp, dp):
    data = udp.build(sp, dp, payload, A, B)
    s, d, p = udp.parse(data, A, B, verify=True)
    assert (s, d, bytes(p)) == (sp, dp, payload)


@given(
    st.binary(max_size=1500),
    st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 255), st.integers(0, 65535),
    st.none() | st.integers(0, 65535), st.none() | st.integers(0, 14), st.booleans(),
    st.none() | st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
)
def test_tcp_roundtrip(payload, seq, ack, flags, window, mss, wscale, sack, ts):
    seg = tcp.Segment(1234, 80, seq, ack, flags, window, payload, mss, wscale, sack, ts)
    data = tcp.build(seg, A, B)
    back = tcp.parse(data, A, B, verify=True)
    assert (back.seq, back.ack, back.flags, back.window, bytes(back.payload)) == (seq, ack, flags, window, payload)
    assert (back.mss, back.wscale, back.sack_perm, back.timestamp) == (mss, wscale, sack, ts)


def test_tcp_checksum_matches_reference():
    seg = tcp.Segment(40000, 443, 1, 2, tcp.ACK | tcp.PSH, 502, b"hello world!!", mss=1460)
    data = bytearray(tcp.build(seg, A, B))
    got = struct.unpack_from("!H", data, 16)[0]
    data[16:18] = b"\0\0"
    pseudo = A + B + struct.pack("!BBH", 0, 6, len(data))
    assert got == ref_checksum(pseudo + bytes(data))


@given(st.binary(max_size=100))
def test_parsers_raise_only_malformed(data):
    for parse in (ethernet.parse, arp.parse, ipv4.parse, icmp.parse, tcp.parse, lambda d: udp.parse(d)):
        try:
            parse(data)
        except MalformedPacket:
            pass


def test_arp_reply():
    req = arp.ArpPacket(arp.REQUEST, b"\x5a\x94\xef\xe4\x0c\xee", A, b"\0" * 6, B)
    parsed = arp.parse(arp.build(req))
    assert parsed == req
    rep = arp.reply_to(parsed, b"\x5a\x94\xef\xe4\x0c\xdd")
    assert (rep.op, rep.sender_ip, rep.target_ip, rep.target_mac) == (arp.REPLY, B, A, req.sender_mac)
    with pytest.raises(MalformedPacket):
        arp.parse(b"\0\2" + arp.build(req)[2:])


@given(st.binary(max_size=500), st.integers(0, 65535), st.integers(0, 65535))
def test_icmp_roundtrip(payload, ident, seq):
    msg = icmp.IcmpMessage(icmp.ECHO_REQUEST, 0, (ident << 16) | seq, payload)
    back = icmp.parse(icmp.build(msg), verify=True)
    assert (back.type, back.ident, back.seq, bytes(back.payload)) == (icmp.ECHO_REQUEST, ident, seq, payload)
    rep = icmp.echo_reply(back)
    assert rep.type == icmp.ECHO_REPLY and rep.rest == back.rest


def test_icmp_unreachable_quotes_header():
    orig = ipv4.build(A, B, 17, udp.build(5000, 53, b"query-bytes", A, B))
    msg = icmp.unreachable(icmp.PORT_UNREACH, orig)
    assert bytes(msg.payload) == orig[:28]


def test_ethernet():
    f = ethernet.build(ethernet.BROADCAST, b"\x02" * 6, ethernet.TYPE_ARP, b"xyz")
    dst, src, et, payload = ethernet.parse(f)
    assert (dst, src, et, bytes(payload)) == (ethernet.BROADCAST, b"\x02" * 6, 0x0806, b"xyz")
    assert ethernet.is_multicast(ethernet.BROADCAST) and not ethernet.is_multicast(b"\x02" * 6)


@given(st.binary(min_size=0, max_size=9000), st.integers(576, 9000))
def test_fragments_reassemble(payload, mtu):
    packets = ipv4.fragment(A, B, 17, payload, mtu, ident=42)
    assert all(len(p) <= max(mtu, 20 + len(payload) if len(packets) == 1 else mtu) for p in packets)
    parts = []
    for p in packets:
        pkt = ipv4.parse(p, verify=True)
        parts.append(((pkt.flags_frag & 0x1FFF) * 8, bytes(pkt.payload), bool(pkt.flags_frag & 0x2000)))
    parts.sort()
    assert b"".join(p[1] for p in parts) == payload
    assert [p[2] for p in parts] == [True] * (len(parts) - 1) + [False]
