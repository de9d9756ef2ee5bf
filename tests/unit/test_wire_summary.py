"""The one-line frame summary of per-packet tracing: right for real frames, never raises on junk."""

from hypothesis import given
from hypothesis import strategies as st

from rdswitch.wire import arp, ethernet, ipv4, tcp, udp
from rdswitch.wire.summary import summary

A, B = bytes.fromhex("5a94efe40cee"), bytes.fromhex("5a94efe40cdd")
VM, GW = bytes([192, 168, 127, 2]), bytes([192, 168, 127, 1])


def test_udp_tcp_arp_frames():
    seg = udp.build(68, 67, b"x" * 10, VM, GW)
    frame = ethernet.build(B, A, ethernet.TYPE_IPV4, ipv4.build(VM, GW, ipv4.PROTO_UDP, seg))
    assert summary(frame) == f"5a:94:ef:e4:0c:ee > 5a:94:ef:e4:0c:dd IPv4 192.168.127.2:68 > 192.168.127.1:67 UDP len {len(frame)}"
    req = ethernet.build(ethernet.BROADCAST, A, ethernet.TYPE_ARP, arp.build(arp.ArpPacket(arp.REQUEST, A, VM, bytes(6), GW)))
    assert summary(req) == "5a:94:ef:e4:0c:ee > ff:ff:ff:ff:ff:ff ARP who-has 192.168.127.1 tell 192.168.127.2 len 42"
    syn = tcp.build(tcp.Segment(40312, 443, flags=tcp.SYN, window=100), VM, GW)
    frame = ethernet.build(B, A, ethernet.TYPE_IPV4, ipv4.build(VM, GW, ipv4.PROTO_TCP, syn))
    assert "IPv4 192.168.127.2:40312 > 192.168.127.1:443 TCP [S] len" in summary(frame)
    assert summary(b"\x00" * 5) == "truncated frame len 5"
    assert summary(memoryview(frame)[:20]).endswith("IPv4 len 20")


@given(st.binary(max_size=200))
def test_never_raises(data):
    assert isinstance(summary(data), str)
