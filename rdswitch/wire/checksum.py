"""The Internet checksum (RFC 1071), computed the fastest way pure Python can.

Summing 16-bit words with end-around carry equals the big integer value of the
buffer modulo 0xFFFF (because 2**16 == 1 mod 0xFFFF), except that a non-zero
sum that is a multiple of 0xFFFF must be 0xFFFF rather than 0.
"""

from __future__ import annotations


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """One's-complement sum of ``data`` as 16-bit big-endian words (odd length padded)."""
    if len(data) & 1:
        data = bytes(data) + b"\0"
    s = int.from_bytes(data, "big") % 0xFFFF
    if s == 0 and any(data):
        return 0xFFFF
    return s


def fold(*sums: int) -> int:
    s = sum(sums)
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The checksum field value: ~(initial + sum(data)) & 0xFFFF."""
    return ~fold(initial, ones_sum(data)) & 0xFFFF


def pseudo_header_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """Ones' sum of the IPv4 pseudo header (src, dst as 4 raw bytes)."""
    return fold(
        int.from_bytes(src[:2], "big"), int.from_bytes(src[2:4], "big"),
        int.from_bytes(dst[:2], "big"), int.from_bytes(dst[2:4], "big"),
        proto, length,
    )
