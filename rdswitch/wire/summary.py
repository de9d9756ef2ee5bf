"""One line per Ethernet frame, for per-packet tracing (sans-IO; never raises).

``summary(frame)`` reads as much of the headers as the frame has:

    5a:94:ef:e4:0c:ee > 5a:94:ef:e4:0c:dd IPv4 192.168.127.2:40312 > 10.0.0.5:443 TCP [S] len 74
    5a:94:ef:e4:0c:dd > ff:ff:ff:ff:ff:ff ARP who-has 192.168.127.2 tell 192.168.127.1 len 42

A truncated or odd frame says so instead of failing: tracing must never take
the frame path down.
"""

from __future__ import annotations

import struct

from .tcp import flags_str

_ETHERTYPES = {0x0800: "IPv4", 0x0806: "ARP", 0x86DD: "IPv6", 0x8100: "802.1Q", 0x88B5: "rdswitch"}
_PROTOS = {1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6"}


def _mac(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


def _ip4(b: bytes) -> str:
    return ".".join(str(x) for x in b)


def summary(frame: bytes | bytearray | memoryview) -> str:
    data = bytes(frame[:64])  # headers only: never copy a payload
    n = len(frame)
    if len(data) < 14:
        return f"truncated frame len {n}"
    head = f"{_mac(data[6:12])} > {_mac(data[0:6])}"
    (etype,) = struct.unpack_from("!H", data, 12)
    name = _ETHERTYPES.get(etype, f"ethertype 0x{etype:04x}")
    if etype == 0x0806 and len(data) >= 42:
        (op,) = struct.unpack_from("!H", data, 20)
        spa, tpa = _ip4(data[28:32]), _ip4(data[38:42])
        what = f"who-has {tpa} tell {spa}" if op == 1 else f"reply {spa} is-at {_mac(data[22:28])}" if op == 2 else f"op {op}"
        return f"{head} ARP {what} len {n}"
    if etype != 0x0800 or len(data) < 34:
        return f"{head} {name} len {n}"
    ihl = (data[14] & 0x0F) * 4
    proto = data[23]
    (frag,) = struct.unpack_from("!H", data, 20)
    src, dst = _ip4(data[26:30]), _ip4(data[30:34])
    pname = _PROTOS.get(proto, f"proto {proto}")
    l4 = 14 + ihl
    if frag & 0x1FFF:
        return f"{head} IPv4 {src} > {dst} {pname} fragment offset {(frag & 0x1FFF) * 8} len {n}"
    if proto in (6, 17) and len(data) >= l4 + 4:
        sport, dport = struct.unpack_from("!HH", data, l4)
        text = f"{head} IPv4 {src}:{sport} > {dst}:{dport} {pname}"
        if proto == 6 and len(data) >= l4 + 14:
            text += f" [{flags_str(data[l4 + 13])}]"
        return f"{text} len {n}"
    if proto == 1 and len(data) >= l4 + 2:
        return f"{head} IPv4 {src} > {dst} ICMP type {data[l4]} code {data[l4 + 1]} len {n}"
    return f"{head} IPv4 {src} > {dst} {pname} len {n}"
