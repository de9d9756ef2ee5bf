"""UDP datagrams with the IPv4 pseudo-header checksum."""

from __future__ import annotations

import struct

from .checksum import fold, ones_sum, pseudo_header_sum
from .errors import MalformedPacket

PROTO = 17
_HDR = struct.Struct("!HHHH")


def parse(data: bytes | memoryview, src_ip: bytes | None = None, dst_ip: bytes | None = None,
          verify: bool = False) -> tuple[int, int, memoryview]:
    """Return (src_port, dst_port, payload view)."""
    if len(data) < 8:
        raise MalformedPacket("udp-truncated", f"{len(data)} bytes")
    sport, dport, length, csum = _HDR.unpack_from(data)
    if length < 8 or length > len(data):
        raise MalformedPacket("udp-length", f"length field {length}, have {len(data)}")
    if verify and csum and src_ip is not None and dst_ip is not None:
        if fold(pseudo_header_sum(src_ip, dst_ip, PROTO, length), ones_sum(memoryview(data)[:length])) != 0xFFFF:
            raise MalformedPacket("udp-checksum")
    return sport, dport, memoryview(data)[8:length]


def build(src_port: int, dst_port: int, payload: bytes | memoryview, src_ip: bytes, dst_ip: bytes) -> bytes:
    length = 8 + len(payload)
    hdr = _HDR.pack(src_port, dst_port, length, 0)
    s = fold(pseudo_header_sum(src_ip, dst_ip, PROTO, length), ones_sum(hdr), ones_sum(payload))
    csum = ~s & 0xFFFF or 0xFFFF  # 0 means "no checksum" in UDP
    return _HDR.pack(src_port, dst_port, length, csum) + bytes(payload)
