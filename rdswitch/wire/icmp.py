"""ICMPv4: echo request/reply and destination unreachable."""

from __future__ import annotations

import struct

import attrs

from .checksum import checksum
from .errors import MalformedPacket

PROTO = 1
ECHO_REPLY = 0
DEST_UNREACH = 3
ECHO_REQUEST = 8
TIME_EXCEEDED = 11
# codes for DEST_UNREACH
NET_UNREACH = 0
HOST_UNREACH = 1
PROTO_UNREACH = 2
PORT_UNREACH = 3
ADMIN_PROHIBITED = 13


@attrs.define(slots=True)
class IcmpMessage:
    type: int
    code: int
    rest: int  # the 4 bytes after the checksum: (id << 16 | seq) for echo
    payload: bytes | memoryview

    @property
    def ident(self) -> int:
        return self.rest >> 16

    @property
    def seq(self) -> int:
        return self.rest & 0xFFFF


def parse(data: bytes | memoryview, verify: bool = False) -> IcmpMessage:
    if len(data) < 8:
        raise MalformedPacket("icmp-truncated", f"{len(data)} bytes")
    if verify and checksum(data) != 0:
        raise MalformedPacket("icmp-checksum")
    t, c, _csum, rest = struct.unpack_from("!BBHI", data)
    return IcmpMessage(t, c, rest, memoryview(data)[8:])


def build(msg: IcmpMessage) -> bytes:
    body = struct.pack("!BBHI", msg.type, msg.code, 0, msg.rest) + bytes(msg.payload)
    csum = checksum(body)
    return body[:2] + csum.to_bytes(2, "big") + body[4:]


def echo_reply(request: IcmpMessage) -> IcmpMessage:
    return IcmpMessage(ECHO_REPLY, 0, request.rest, request.payload)


def unreachable(code: int, original_ip_packet: bytes | memoryview) -> IcmpMessage:
    """Destination unreachable quoting the IP header + first 8 payload bytes (RFC 792)."""
    ihl = (original_ip_packet[0] & 0xF) * 4 if len(original_ip_packet) else 20
    return IcmpMessage(DEST_UNREACH, code, 0, bytes(original_ip_packet[: ihl + 8]))
