"""The offload capability message and virtio-net headers (sans-IO).

A vm-switch whose tap speaks virtio-net headers (``--offload``) tells the
host-switch so with one Ethernet frame of ethertype 0x88B5 (local
experimental) addressed to the gateway: ``b"RDSW"``, a version byte and a
flags byte.  The host-switch then sends that VM's TCP segments up to 64 KiB
with only the pseudo-header in the checksum field, and vm-switch hands them to
the kernel marked NEEDS_CSUM (and as GSO when larger than the MTU), so the
kernel segments them and no one computes a payload checksum in Python.  A
peer that does not know the message ignores it (unknown ethertype), so the
wire contract with the incumbent is unchanged.
"""

from __future__ import annotations

import struct

from .errors import MalformedPacket

MAGIC = b"RDSW"
VERSION = 1
FLAG_PARTIAL_CSUM_TSO = 0x01

# struct virtio_net_hdr: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset (little-endian)
VNET_HDR = struct.Struct("<BBHHHH")
VNET_HDR_LEN = VNET_HDR.size
F_NEEDS_CSUM = 1
GSO_NONE = 0
GSO_TCPV4 = 1
PLAIN = bytes(VNET_HDR_LEN)


def capability_payload(flags: int = FLAG_PARTIAL_CSUM_TSO) -> bytes:
    return MAGIC + bytes((VERSION, flags))


def parse_capability(payload: bytes | memoryview) -> int:
    """The flags of a capability message; MalformedPacket if it is not one."""
    if len(payload) < 6 or bytes(payload[:4]) != MAGIC:
        raise MalformedPacket("rdswitch-message", "bad magic")
    if payload[4] != VERSION:
        raise MalformedPacket("rdswitch-message", f"unknown version {payload[4]}")
    return payload[5]


def vnet_header_for(frame: bytes | memoryview, mtu: int) -> bytes:
    """The virtio-net header to write ``frame`` to an offload tap with.

    IPv4 TCP (not fragments) is marked NEEDS_CSUM, so a partial checksum (the
    pseudo-header only) is completed or, for local delivery, trusted; a frame
    larger than the MTU is marked GSO TCPv4 so the kernel segments it.
    Anything else gets the plain header (the kernel verifies as usual).
    """
    if len(frame) < 54 or frame[12] != 0x08 or frame[13] != 0x00 or frame[23] != 6 or frame[20] & 0x3F or frame[21]:
        return PLAIN
    ihl = (frame[14] & 0x0F) * 4
    if ihl < 20 or len(frame) < 14 + ihl + 20:
        return PLAIN
    thl = (frame[14 + ihl + 12] >> 4) * 4
    start = 14 + ihl
    if len(frame) - 14 > mtu:
        return VNET_HDR.pack(F_NEEDS_CSUM, GSO_TCPV4, start + thl, mtu - ihl - thl, start, 16)
    return VNET_HDR.pack(F_NEEDS_CSUM, GSO_NONE, 0, 0, start, 16)
