"""Ethernet II frames (no FCS, no VLAN tags)."""

from __future__ import annotations

from .errors import MalformedPacket

HEADER_LEN = 14
TYPE_IPV4 = 0x0800
TYPE_ARP = 0x0806
TYPE_IPV6 = 0x86DD
# IEEE 802 "local experimental" ethertype: rdswitch's own link messages (vm-switch -> host-switch)
TYPE_RDSWITCH = 0x88B5
BROADCAST = b"\xff" * 6


def parse(frame: bytes | memoryview) -> tuple[bytes, bytes, int, memoryview]:
    """Return (dst, src, ethertype, payload view)."""
    if len(frame) < HEADER_LEN:
        raise MalformedPacket("ethernet-truncated", f"{len(frame)} bytes")
    return bytes(frame[0:6]), bytes(frame[6:12]), (frame[12] << 8) | frame[13], memoryview(frame)[HEADER_LEN:]


def build(dst: bytes, src: bytes, ethertype: int, payload: bytes | memoryview = b"") -> bytes:
    return b"".join((dst, src, ethertype.to_bytes(2, "big"), payload))


def header(dst: bytes, src: bytes, ethertype: int) -> bytes:
    return dst + src + ethertype.to_bytes(2, "big")


def is_multicast(mac: bytes) -> bool:
    """Broadcast is a multicast address too (the group bit of the first octet)."""
    return bool(mac[0] & 1)
