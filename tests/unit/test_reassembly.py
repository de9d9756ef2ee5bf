"""IPv4 reassembly (stack/reassembly.py) on its own and behind the gateway, with a fake clock."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings, strategies as st

from rdswitch.config import NetConfig
from rdswitch.stack.counters import Counters
from rdswitch.stack.gateway import Gateway, IcmpEchoIn, TcpIn, UdpIn
from rdswitch.stack.reassembly import FRAGMENT_COST, MAX_PAYLOAD, Reassembler
from rdswitch.wire import ethernet, icmp, ipv4, tcp, udp
from rdswitch.wire.checksum import checksum

NET = NetConfig()
VM_MAC = NET.vm_mac
VM_IP = NET.vm_ip.packed
GW_IP = NET.gateway_ip.packed
DST = bytes([192, 168, 127, 254])


def frag(src: bytes, dst: bytes, proto: int, ident: int, offset: int, chunk: bytes, more: bool, *,
         ttl: int = 64, tos: int = 0) -> bytes:
    """One IPv4 fragment: ``chunk`` at byte ``offset`` (a multiple of 8) of the datagram's payload."""
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, tos, 20 + len(chunk), ident, (0x2000 if more else 0) | offset >> 3,
                                ttl, proto, 0, src, dst))
    struct.pack_into("!H", hdr, 10, checksum(hdr))
    return bytes(hdr) + chunk


def pieces(payload: bytes, cuts: list[int]) -> list[tuple[int, bytes, bool]]:
    """``payload`` split at ``cuts`` (multiples of 8) into (offset, chunk, more)."""
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < len(payload))), len(payload)]
    return [(a, payload[a:b], b < len(payload)) for a, b in zip(bounds, bounds[1:])]


def add(r: Reassembler, raw: bytes, now: float = 0.0) -> bytes | None:
    return r.add(ipv4.parse(raw), now)


# ---- any split, any order --------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(payload=st.binary(min_size=9, max_size=4000), data=st.data(), ident=st.integers(0, 0xFFFF),
       ttl=st.integers(1, 255), tos=st.integers(0, 255), proto=st.sampled_from([1, 6, 17]))
def test_any_split_in_any_order_reassembles_to_the_datagram(payload, data, ident, ttl, tos, proto):
    cuts = data.draw(st.lists(st.integers(1, (len(payload) - 1) // 8).map(lambda k: k * 8), min_size=1, max_size=40))
    parts = pieces(payload, cuts)
    order = data.draw(st.permutations(parts))
    counters = Counters()
    r = Reassembler(counters)
    results = [add(r, frag(VM_IP, DST, proto, ident, o, c, m, ttl=ttl, tos=tos), 1.0) for o, c, m in order]
    assert results[:-1] == [None] * (len(order) - 1)
    assert results[-1] == ipv4.build(VM_IP, DST, proto, payload, ttl=ttl, ident=ident, tos=tos, dont_fragment=False)
    assert len(r) == 0 and r.bytes == 0 and not counters.drops
    assert counters.values["ipv4_reassembled"] == 1


@settings(max_examples=200, deadline=None)
@given(payload=st.binary(min_size=32, max_size=2000), data=st.data())
def test_overlapping_fragments_drop_the_whole_datagram(payload, data):
    cuts = data.draw(st.lists(st.integers(1, (len(payload) - 1) // 8).map(lambda k: k * 8), min_size=1, max_size=20))
    parts = pieces(payload, cuts)
    # one extra fragment that overlaps at least one byte of another (same or different data)
    start = data.draw(st.integers(0, (len(payload) - 1) // 8)) * 8
    length = data.draw(st.integers(1, len(payload) - start))
    more = start + length < len(payload) or data.draw(st.booleans())
    if more:
        length = max(8, length - length % 8)
    extra = (start, data.draw(st.sampled_from([payload, bytes(len(payload))]))[start:start + length], more)
    if start + length > len(payload):
        return  # (an 8-byte rounding that ran past the end; covered by the cases that fit)
    order = data.draw(st.permutations(parts))
    # right after a fragment it overlaps, and before the datagram is complete (after that, the
    # same ident is a new datagram)
    i = next(k for k, (o, c, _m) in enumerate(order) if o < start + length and start < o + len(c))
    if i == len(order) - 1:
        order.insert(0, order.pop())
        i = 0
    order.insert(i + 1, extra)
    counters = Counters()
    r = Reassembler(counters)
    results = [add(r, frag(VM_IP, DST, 17, 9, o, c, m)) for o, c, m in order]
    assert results == [None] * len(order)
    assert counters.drops["ipv4-fragment-overlap"] == 1 and counters.drops["ipv4-reassembly-dropped"] == 1
    assert r.bytes == 0
    # the dead datagram takes nothing more until it times out; then the same ident works again
    assert add(r, frag(VM_IP, DST, 17, 9, *parts[0])) is None
    assert add(r, frag(VM_IP, DST, 17, 9, *parts[-1])) is None
    assert counters.drops["ipv4-fragment-dead"] >= 2
    results = [add(r, frag(VM_IP, DST, 17, 9, o, c, m), 30.0) for o, c, m in parts]
    assert results[-1] == ipv4.build(VM_IP, DST, 17, payload, ident=9, dont_fragment=False)


def test_malformed_fragments_are_counted_by_reason():
    counters = Counters()
    r = Reassembler(counters)
    assert add(r, frag(VM_IP, DST, 17, 1, 0, b"x" * 12, True)) is None  # not a multiple of 8
    assert add(r, frag(VM_IP, DST, 17, 2, 65512, b"x" * 16, False)) is None  # beyond 65535 bytes
    assert counters.drops["ipv4-fragment-bad-length"] == 1 and counters.drops["ipv4-fragment-too-large"] == 1
    assert len(r) == 0
    # two different ends of one datagram
    assert add(r, frag(VM_IP, DST, 17, 3, 16, b"y" * 8, False)) is None
    assert add(r, frag(VM_IP, DST, 17, 3, 8, b"y" * 16, False)) is None
    assert counters.drops["ipv4-fragment-overlap"] == 1


def test_timeout_follows_the_fake_clock():
    counters = Counters()
    r = Reassembler(counters, timeout=30.0)
    assert add(r, frag(VM_IP, DST, 17, 1, 0, b"a" * 8, True), 100.0) is None
    r.expire(129.9)
    assert len(r) == 1
    assert add(r, frag(VM_IP, DST, 17, 1, 8, b"b", False), 130.0) is None  # too late: a new datagram
    assert counters.drops["ipv4-reassembly-timeout"] == 1 and len(r) == 1
    r.expire(160.0)
    assert len(r) == 0 and r.bytes == 0 and counters.drops["ipv4-reassembly-timeout"] == 2


@settings(max_examples=100, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from([VM_IP, b"\xc0\xa8\x7f\x03", b"\xc0\xa8\x7f\x04"]),
                              st.integers(0, 40), st.integers(0, 64), st.integers(1, 200), st.booleans(),
                              st.floats(0, 5)), max_size=300))
def test_bounds_hold(ops):
    counters = Counters()
    r = Reassembler(counters, timeout=30.0, max_per_source=4, max_bytes=MAX_PAYLOAD + 2000)
    now = 0.0
    sources = set()
    for src, ident, block, size, more, dt in ops:
        now += dt
        if block == 0 and not more:
            continue  # not a fragment
        chunk = bytes(size * 8 if more else size)
        sources.add(src)
        add(r, frag(src, DST, 17, ident, block * 8, chunk, more), now)
        assert r.bytes <= r.max_bytes
        assert all(r.in_progress(s) <= 4 for s in sources)
        assert r.bytes == sum(dg.cost for dg in r._datagrams.values())
        assert all(now - dg.created < 30.0 for dg in r._datagrams.values())
    r.expire(now + 31.0)
    assert len(r) == 0 and r.bytes == 0


def test_tiny_fragments_cost_more_than_their_bytes():
    counters = Counters()
    r = Reassembler(counters, max_bytes=MAX_PAYLOAD)
    n = 0
    while not counters.drops:
        add(r, frag(VM_IP, DST, 17, 1, n * 16, b"z" * 8, True))
        n += 1
    assert counters.drops["ipv4-reassembly-memory"] == 1 and n * (8 + FRAGMENT_COST) > MAX_PAYLOAD
    assert r.bytes == 0


def test_a_full_source_evicts_its_oldest_and_others_are_not_affected():
    counters = Counters()
    r = Reassembler(counters, max_per_source=2)
    other = b"\xc0\xa8\x7f\x03"
    add(r, frag(other, DST, 17, 1, 0, b"o" * 8, True))
    for ident in (1, 2, 3):
        add(r, frag(VM_IP, DST, 17, ident, 0, b"v" * 8, True))
    assert counters.drops["ipv4-reassembly-evicted"] == 1
    assert r.in_progress(VM_IP) == 2 and r.in_progress(other) == 1
    assert add(r, frag(VM_IP, DST, 17, 1, 8, b"!", False)) is None  # ident 1 was evicted
    assert add(r, frag(VM_IP, DST, 17, 3, 8, b"!", False)) == ipv4.build(VM_IP, DST, 17, b"v" * 8 + b"!", ident=3,
                                                                         dont_fragment=False)


# ---- behind the gateway -------------------------------------------------------------------------

def gw_feed(gw: Gateway, raw_packets: list[bytes], now: float = 0.0):
    out = []
    for raw in raw_packets:
        out.append(gw.input(ethernet.build(NET.gateway_mac, VM_MAC, ethernet.TYPE_IPV4, raw), now))
    return out


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_gateway_passes_reassembled_udp_icmp_and_tcp_on(order):
    gw = Gateway(NET)
    step = 1480

    def fragments(proto, ident, payload):
        raws = ipv4.fragment(VM_IP, DST if proto != 1 else GW_IP, proto, payload, 1500, ident=ident)
        assert len(raws) > 1
        return raws if order == "forward" else raws[::-1]

    data = bytes(range(256)) * 31  # 7936 bytes: 6 fragments
    results = gw_feed(gw, fragments(17, 1, udp.build(5000, 7, data, VM_IP, DST)))
    assert [r for r in results[:-1]] == [([], None)] * (len(results) - 1)
    replies, ev = results[-1]
    assert replies == [] and isinstance(ev, UdpIn) and bytes(ev.payload) == data and ev.dst_port == 7
    assert ipv4.parse(ev.ip_packet).flags_frag == 0

    seg = tcp.Segment(40000, 80, 1, 1, tcp.ACK | tcp.PSH, 65535, data[:3000])
    replies, ev = gw_feed(gw, fragments(6, 2, tcp.build(seg, VM_IP, DST)))[-1]
    assert isinstance(ev, TcpIn) and bytes(ev.seg.payload) == data[:3000]

    msg = icmp.build(icmp.IcmpMessage(icmp.ECHO_REQUEST, 0, (7 << 16) | 1, data[:step * 2]))
    replies, ev = gw_feed(gw, fragments(1, 3, msg))[-1]
    assert ev is None and len(replies) > 1  # the gateway's echo reply, fragmented to the MTU in its turn
    assert all(len(f) <= 14 + 1500 for f in replies)
    back = Reassembler(Counters())
    whole = [back.add(ipv4.parse(memoryview(f)[14:], verify=True), 0.0) for f in replies][-1]
    reply = icmp.parse(ipv4.parse(whole).payload)
    assert (reply.type, reply.rest, bytes(reply.payload)) == (icmp.ECHO_REPLY, (7 << 16) | 1, data[:step * 2])
    assert not gw.counters.drops and gw.counters.values["ipv4_reassembled"] == 3
    echo = ipv4.fragment(VM_IP, DST, 1, msg, 1500, ident=4)
    _, ev = gw_feed(gw, echo)[-1]
    assert isinstance(ev, IcmpEchoIn) and bytes(ev.msg.payload) == data[:step * 2]
