"""IPv4 reassembly of the fragments a VM sends (sans-IO: the caller passes ``now``).

:meth:`Reassembler.add` takes one parsed fragment and returns the whole IPv4
packet (a fresh header, no fragment bits) once its last hole is filled, else
None.  A datagram is keyed by (source, destination, protocol, identification)
as RFC 791 says, and:

- lives at most ``timeout`` seconds after its first fragment (then it is
  dropped, counted ``ipv4-reassembly-timeout``);
- is one of at most ``max_per_source`` in progress per source address (a new
  one beyond that evicts that source's oldest, ``ipv4-reassembly-evicted``);
- holds bytes counted against ``max_bytes`` for all sources together (its
  payload plus ``FRAGMENT_COST`` per fragment; the oldest datagrams are evicted
  to make room, ``ipv4-reassembly-evicted``, and one that cannot fit alone is
  dropped, ``ipv4-reassembly-memory``);
- is dropped whole when two of its fragments overlap (RFC 5722's rule, which
  closes the overlapping-fragment attacks of RFC 1858/3128), counted
  ``ipv4-fragment-overlap``; its later fragments are dropped too until its
  timeout (``ipv4-fragment-dead``).

Malformed fragments (a non-final one whose length is no multiple of 8, one
that ends beyond 65535 bytes or beyond the end a final fragment set) drop their
datagram as well, each counted by its own reason.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict

import attrs

from ..wire import ipv4
from .counters import Counters

MORE_FRAGMENTS = 0x2000
OFFSET_MASK = 0x1FFF
MAX_PAYLOAD = 0xFFFF - ipv4.HEADER_LEN  # the largest payload a reassembled packet can carry
FRAGMENT_COST = 64  # what a held fragment costs beyond its payload (against max_bytes): tiny ones are no cheaper


@attrs.define(eq=False, slots=True)
class _Datagram:
    src: bytes
    created: float
    parts: dict = attrs.field(factory=dict)  # offset -> payload bytes
    offsets: list = attrs.field(factory=list)  # of parts, sorted
    end: int | None = None  # the payload length, once the final fragment came
    have: int = 0  # payload bytes held
    cost: int = 0  # what it holds against max_bytes
    first: ipv4.IPv4Packet | None = None  # the fragment at offset 0 (its header fields are kept)
    dead: bool = False  # dropped (overlap, malformed): later fragments are dropped too


class Reassembler:
    def __init__(self, counters: Counters, *, timeout: float = 30.0, max_per_source: int = 64,
                 max_bytes: int = 4 << 20) -> None:
        if max_bytes < MAX_PAYLOAD:
            raise ValueError("max_bytes must hold one whole datagram")
        if max_per_source < 1 or timeout <= 0:
            raise ValueError("max_per_source and timeout must be positive")
        self.counters = counters
        self.timeout = timeout
        self.max_per_source = max_per_source
        self.max_bytes = max_bytes
        self.bytes = 0  # what all datagrams hold: payload plus FRAGMENT_COST per fragment
        self._datagrams: OrderedDict[tuple, _Datagram] = OrderedDict()  # oldest first
        self._by_source: dict[bytes, OrderedDict[tuple, None]] = {}  # oldest first

    def __len__(self) -> int:
        return len(self._datagrams)

    def in_progress(self, src: bytes) -> int:
        return len(self._by_source.get(src, ()))

    def add(self, pkt: ipv4.IPv4Packet, now: float) -> bytes | None:
        """One fragment (``pkt.is_fragment``); the whole IPv4 packet when it completes one, else None."""
        self.expire(now)
        payload = bytes(pkt.payload)
        offset = (pkt.flags_frag & OFFSET_MASK) << 3
        more = bool(pkt.flags_frag & MORE_FRAGMENTS)
        stop = offset + len(payload)
        key = (pkt.src, pkt.dst, pkt.proto, pkt.ident)
        dg = self._datagrams.get(key)
        if dg is not None and dg.dead:
            self.counters.drop("ipv4-fragment-dead")
            return None
        reason = None
        if more and (not payload or len(payload) % 8):
            reason = "ipv4-fragment-bad-length"
        elif stop > MAX_PAYLOAD:
            reason = "ipv4-fragment-too-large"
        if dg is None:
            if reason is not None:
                self.counters.drop(reason)
                return None
            dg = self._new(key, pkt.src, now)
        if reason is None:
            reason = self._check(dg, offset, stop, more)
        if reason is not None:
            self._kill(dg, reason)
            return None
        cost = len(payload) + FRAGMENT_COST
        if not self._make_room(cost, keep=dg):
            self._kill(dg, "ipv4-reassembly-memory")
            return None
        dg.parts[offset] = payload
        bisect.insort(dg.offsets, offset)
        dg.have += len(payload)
        dg.cost += cost
        self.bytes += cost
        if not more:
            dg.end = stop
        if offset == 0:
            dg.first = pkt
        if dg.end is None or dg.have != dg.end:
            return None
        # No overlaps and every byte of [0, end) accounted for: complete.
        self._forget(key, dg)
        data = b"".join(dg.parts[o] for o in dg.offsets)
        first = dg.first
        self.counters.values["ipv4_reassembled"] += 1
        return ipv4.build(first.src, first.dst, first.proto, data, ttl=first.ttl, ident=first.ident, tos=first.tos,
                          dont_fragment=False)

    def expire(self, now: float) -> None:
        """Drop every datagram older than the timeout."""
        while self._datagrams:
            key, dg = next(iter(self._datagrams.items()))
            if now - dg.created < self.timeout:
                break
            if not dg.dead:
                self.counters.drop("ipv4-reassembly-timeout")
            self._forget(key, dg)

    # ---- internals ---------------------------------------------------------------------------
    def _new(self, key: tuple, src: bytes, now: float) -> _Datagram:
        mine = self._by_source.setdefault(src, OrderedDict())
        while len(mine) >= self.max_per_source:
            old = next(iter(mine))
            self.counters.drop("ipv4-reassembly-evicted")
            self._forget(old, self._datagrams[old])
        dg = self._datagrams[key] = _Datagram(src, now)
        mine[key] = None
        return dg

    @staticmethod
    def _check(dg: _Datagram, offset: int, stop: int, more: bool) -> str | None:
        if dg.end is not None and (stop > dg.end or (not more and stop != dg.end)):
            return "ipv4-fragment-overlap"  # beyond (or a second, different) end of the datagram
        offsets, parts = dg.offsets, dg.parts
        if not more and offsets and offsets[-1] + len(parts[offsets[-1]]) > stop:
            return "ipv4-fragment-overlap"  # an end before bytes already held
        i = bisect.bisect_left(offsets, offset)
        if i > 0 and offsets[i - 1] + len(parts[offsets[i - 1]]) > offset:
            return "ipv4-fragment-overlap"  # the part before runs into this one
        if i < len(offsets) and (offsets[i] < stop or offsets[i] == offset):
            return "ipv4-fragment-overlap"  # this one runs into the part after (or starts where it does)
        return None

    def _kill(self, dg: _Datagram, reason: str) -> None:
        self.counters.drop(reason)
        self.counters.drop("ipv4-reassembly-dropped")
        self.bytes -= dg.cost
        dg.parts.clear()
        dg.offsets.clear()
        dg.have = dg.cost = 0
        dg.first = None
        dg.dead = True  # kept (no bytes) until its timeout, so its other fragments are dropped

    def _make_room(self, n: int, keep: _Datagram) -> bool:
        """Evict the oldest datagrams (not ``keep``) until ``n`` more fit; False if they cannot."""
        while self.bytes + n > self.max_bytes:
            for key, dg in self._datagrams.items():
                if dg is not keep and dg.cost:
                    break
            else:
                return False  # only ``keep`` holds anything
            self.counters.drop("ipv4-reassembly-evicted")
            self._forget(key, dg)
        return True

    def _forget(self, key: tuple, dg: _Datagram) -> None:
        del self._datagrams[key]
        mine = self._by_source[dg.src]
        del mine[key]
        if not mine:
            del self._by_source[dg.src]
        self.bytes -= dg.cost
