"""TCP segments: parse and build, with the options rdswitch negotiates.

A :class:`Segment` is the unit the TCP state machine (``stack/tcp.py``)
consumes and produces; it knows nothing of IP addresses.  ``parse`` and
``build`` convert between a segment and the bytes of the TCP header+payload;
the pseudo-header checksum needs the IPv4 addresses, so they are passed in.
"""

from __future__ import annotations

import struct

import attrs

from .checksum import checksum, ones_sum, pseudo_header_sum, fold
from .errors import MalformedPacket

PROTO = 6

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20
ECE = 0x40
CWR = 0x80

_HDR = struct.Struct("!HHIIBBHHH")

OPT_END = 0
OPT_NOP = 1
OPT_MSS = 2
OPT_WSCALE = 3
OPT_SACK_PERM = 4
OPT_SACK = 5
OPT_TIMESTAMP = 8


def flags_str(flags: int) -> str:
    return "".join(c for bit, c in ((SYN, "S"), (FIN, "F"), (RST, "R"), (PSH, "P"), (ACK, "."), (URG, "U")) if flags & bit) or "-"


@attrs.define(slots=True)
class Segment:
    """One TCP segment.  ``window`` is the raw 16-bit header field (unscaled)."""

    src_port: int
    dst_port: int
    seq: int = 0
    ack: int = 0
    flags: int = 0
    window: int = 0
    payload: bytes | memoryview = b""
    mss: int | None = None
    wscale: int | None = None
    sack_perm: bool = False
    timestamp: tuple[int, int] | None = None  # (TSval, TSecr)

    @property
    def seg_len(self) -> int:
        """Sequence space consumed: payload plus one each for SYN and FIN."""
        return len(self.payload) + (1 if self.flags & SYN else 0) + (1 if self.flags & FIN else 0)

    def __repr__(self) -> str:  # compact, for logs
        return (f"<TCP {self.src_port}>{self.dst_port} [{flags_str(self.flags)}] seq={self.seq} "
                f"ack={self.ack} win={self.window} len={len(self.payload)}>")


def _parse_options(seg: Segment, opts: bytes | memoryview) -> None:
    i = 0
    n = len(opts)
    while i < n:
        kind = opts[i]
        if kind == OPT_END:
            return
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= n:
            raise MalformedPacket("tcp-options", "option length missing")
        length = opts[i + 1]
        if length < 2 or i + length > n:
            raise MalformedPacket("tcp-options", f"bad option length {length}")
        if kind == OPT_MSS and length == 4:
            seg.mss = (opts[i + 2] << 8) | opts[i + 3]
        elif kind == OPT_WSCALE and length == 3:
            seg.wscale = min(opts[i + 2], 14)
        elif kind == OPT_SACK_PERM and length == 2:
            seg.sack_perm = True
        elif kind == OPT_TIMESTAMP and length == 10:
            seg.timestamp = struct.unpack_from("!II", opts, i + 2)
        i += length


def _build_options(seg: Segment) -> bytes:
    out = b""
    if seg.mss is not None:
        out += struct.pack("!BBH", OPT_MSS, 4, seg.mss)
    if seg.sack_perm:
        out += bytes((OPT_NOP, OPT_NOP, OPT_SACK_PERM, 2))
    if seg.timestamp is not None:
        out += struct.pack("!BBBBII", OPT_NOP, OPT_NOP, OPT_TIMESTAMP, 10, *seg.timestamp)
    if seg.wscale is not None:
        out += bytes((OPT_NOP, OPT_WSCALE, 3, seg.wscale))
    return out


def parse(data: bytes | memoryview, src_ip: bytes | None = None, dst_ip: bytes | None = None,
          verify: bool = False) -> Segment:
    """Parse a TCP header+payload.  The payload is a zero-copy slice of ``data``.

    With ``verify`` (and the addresses) the checksum is checked; frames from
    the VM come over a reliable link and are not verified by default.
    """
    if len(data) < 20:
        raise MalformedPacket("tcp-truncated", f"{len(data)} bytes")
    sport, dport, seq, ack, off, flags, window, csum, _urg = _HDR.unpack_from(data)
    hlen = (off >> 4) * 4
    if hlen < 20 or hlen > len(data):
        raise MalformedPacket("tcp-header-length", f"data offset {hlen} for {len(data)} bytes")
    if verify and src_ip is not None and dst_ip is not None:
        if fold(pseudo_header_sum(src_ip, dst_ip, PROTO, len(data)), ones_sum(data)) != 0xFFFF:
            raise MalformedPacket("tcp-checksum")
    seg = Segment(sport, dport, seq, ack, flags, window, memoryview(data)[hlen:] if hlen < len(data) else b"")
    if hlen > 20:
        _parse_options(seg, memoryview(data)[20:hlen])
    return seg


def build(seg: Segment, src_ip: bytes, dst_ip: bytes) -> bytes:
    """Serialize ``seg`` (header, options, payload) with a valid checksum."""
    opts = _build_options(seg)
    if len(opts) & 3:
        opts += b"\0" * (4 - (len(opts) & 3))
    hlen = 20 + len(opts)
    header = bytearray(_HDR.pack(seg.src_port, seg.dst_port, seg.seq & 0xFFFFFFFF, seg.ack & 0xFFFFFFFF,
                                 (hlen // 4) << 4, seg.flags, seg.window, 0, 0))
    header += opts
    total = hlen + len(seg.payload)
    s = fold(pseudo_header_sum(src_ip, dst_ip, PROTO, total), ones_sum(header), ones_sum(seg.payload) if seg.payload else 0)
    # The payload starts at an even offset (hlen is a multiple of 4), so the
    # two partial sums add up to the sum of the whole.
    struct.pack_into("!H", header, 16, ~s & 0xFFFF)
    return bytes(header) + bytes(seg.payload) if seg.payload else bytes(header)


__all__ = ["Segment", "parse", "build", "FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR", "PROTO", "flags_str",
           "checksum"]
