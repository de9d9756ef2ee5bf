"""ARP for IPv4 over Ethernet (RFC 826)."""

from __future__ import annotations

import struct

import attrs

from .errors import MalformedPacket

REQUEST = 1
REPLY = 2
_FMT = struct.Struct("!HHBBH6s4s6s4s")
LEN = _FMT.size  # 28


@attrs.frozen
class ArpPacket:
    op: int
    sender_mac: bytes
    sender_ip: bytes  # 4 raw bytes
    target_mac: bytes
    target_ip: bytes


def parse(data: bytes | memoryview) -> ArpPacket:
    if len(data) < LEN:
        raise MalformedPacket("arp-truncated", f"{len(data)} bytes")
    htype, ptype, hlen, plen, op, smac, sip, tmac, tip = _FMT.unpack_from(data)
    if htype != 1 or ptype != 0x0800 or hlen != 6 or plen != 4:
        raise MalformedPacket("arp-unsupported", f"htype={htype} ptype={ptype:#x} hlen={hlen} plen={plen}")
    if op not in (REQUEST, REPLY):
        raise MalformedPacket("arp-op", f"op={op}")
    return ArpPacket(op, smac, sip, tmac, tip)


def build(pkt: ArpPacket) -> bytes:
    return _FMT.pack(1, 0x0800, 6, 4, pkt.op, pkt.sender_mac, pkt.sender_ip, pkt.target_mac, pkt.target_ip)


def reply_to(request: ArpPacket, our_mac: bytes) -> ArpPacket:
    return ArpPacket(REPLY, our_mac, request.target_ip, request.sender_mac, request.sender_ip)
