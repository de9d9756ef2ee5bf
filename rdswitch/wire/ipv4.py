"""IPv4 headers: parse (zero-copy payload view) and build, with header checksum."""

from __future__ import annotations

import struct

import attrs

from .checksum import checksum
from .errors import MalformedPacket

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
_HDR = struct.Struct("!BBHHHBBH4s4s")
HEADER_LEN = 20


@attrs.define(slots=True)
class IPv4Packet:
    src: bytes  # 4 raw bytes
    dst: bytes
    proto: int
    payload: memoryview | bytes
    ttl: int = 64
    ident: int = 0
    tos: int = 0
    flags_frag: int = 0

    @property
    def is_fragment(self) -> bool:
        # MF set or a non-zero fragment offset
        return bool(self.flags_frag & 0x3FFF)


def parse(data: bytes | memoryview, verify: bool = False) -> IPv4Packet:
    """Parse an IPv4 packet; the payload is a view limited to the total length.

    The link from the VM is reliable, so the header checksum is checked only
    when ``verify`` is set.
    """
    n = len(data)
    if n < HEADER_LEN:
        raise MalformedPacket("ipv4-truncated", f"{n} bytes")
    vihl, tos, total, ident, ff, ttl, proto, _csum, src, dst = _HDR.unpack_from(data)
    if vihl >> 4 != 4:
        raise MalformedPacket("ipv4-version", f"version {vihl >> 4}")
    ihl = (vihl & 0xF) * 4
    if ihl < HEADER_LEN or total < ihl or total > n:
        raise MalformedPacket("ipv4-length", f"ihl={ihl} total={total} have={n}")
    if verify and checksum(memoryview(data)[:ihl]) != 0:
        raise MalformedPacket("ipv4-checksum")
    return IPv4Packet(src, dst, proto, memoryview(data)[ihl:total], ttl, ident, tos, ff)


def build_header(src: bytes, dst: bytes, proto: int, payload_len: int, *, ttl: int = 64, ident: int = 0,
                 tos: int = 0, dont_fragment: bool = True) -> bytes:
    total = HEADER_LEN + payload_len
    if total > 0xFFFF:
        raise ValueError(f"IPv4 packet too large: {total}")
    hdr = bytearray(_HDR.pack(0x45, tos, total, ident & 0xFFFF, 0x4000 if dont_fragment else 0, ttl, proto, 0, src, dst))
    struct.pack_into("!H", hdr, 10, checksum(hdr))
    return bytes(hdr)


def build(src: bytes, dst: bytes, proto: int, payload: bytes | memoryview, **kw) -> bytes:
    return build_header(src, dst, proto, len(payload), **kw) + bytes(payload)


def fragment(src: bytes, dst: bytes, proto: int, payload: bytes | memoryview, mtu: int, *, ident: int,
             ttl: int = 64) -> list[bytes]:
    """The IPv4 packets carrying ``payload`` within ``mtu`` (RFC 791 fragmentation).

    One unfragmented packet (DF clear) when it fits.  Raises ValueError when
    the payload cannot be carried at all (more than 65515 bytes).
    """
    if HEADER_LEN + len(payload) > 0xFFFF:
        raise ValueError(f"IPv4 payload too large: {len(payload)}")
    if HEADER_LEN + len(payload) <= mtu:
        return [build_header(src, dst, proto, len(payload), ttl=ttl, ident=ident, dont_fragment=False) + bytes(payload)]
    step = (mtu - HEADER_LEN) & ~7
    if step <= 0:
        raise ValueError(f"MTU {mtu} too small to fragment")
    view = memoryview(payload)
    out = []
    for off in range(0, len(view), step):
        chunk = view[off:off + step]
        more = off + step < len(view)
        hdr = bytearray(_HDR.pack(0x45, 0, HEADER_LEN + len(chunk), ident & 0xFFFF,
                                  (0x2000 if more else 0) | (off >> 3), ttl, proto, 0, src, dst))
        struct.pack_into("!H", hdr, 10, checksum(hdr))
        out.append(bytes(hdr) + bytes(chunk))
    return out
