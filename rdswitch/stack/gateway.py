"""What the gateway's addresses answer, sans-IO.

``Gateway.input(frame, now)`` takes one Ethernet frame that the switch sent to
the gateway port and returns the frames to send back plus, for traffic that
needs I/O (NAT flows, the DNS service), one event for the trio shell.  ARP,
ICMP echo to the gateway IP and DHCP are answered right here.
"""

from __future__ import annotations

import ipaddress
import struct

import attrs

from ..config import NetConfig
from ..wire import arp, ethernet, icmp, ipv4, offload, tcp, udp
from ..wire.checksum import fold, ones_sum, pseudo_header_sum
from ..wire.errors import MalformedPacket
from .counters import Counters

BROADCAST_IP = b"\xff\xff\xff\xff"
# IPv4 header (no options) followed by a TCP header without options, packed at once.
_IP_TCP_HDR = struct.Struct("!BBHHHBBH4s4sHHIIHHHH")
# From the IPv4 total length (frame offset 16) to the TCP window: what the input hot path reads.
_IN_IP_TCP = struct.Struct("!H2xH4x4s4sHHIIBBH")
DHCP_SERVER_PORT = 67
DHCP_CLIENT_PORT = 68


@attrs.define(slots=True)
class TcpIn:
    src_mac: bytes
    src_ip: bytes
    dst_ip: bytes
    seg: tcp.Segment


@attrs.define(slots=True)
class UdpIn:
    src_mac: bytes
    src_ip: bytes
    src_port: int
    dst_ip: bytes
    dst_port: int
    payload: memoryview | bytes
    ip_packet: memoryview | bytes  # the whole IP packet, for ICMP errors that quote it


@attrs.define(slots=True)
class IcmpEchoIn:
    src_mac: bytes
    src_ip: bytes
    dst_ip: bytes
    msg: icmp.IcmpMessage
    ip_packet: memoryview | bytes


@attrs.define(slots=True)
class OffloadIn:
    """A vm-switch announced what its tap can take (wire/offload.py)."""

    flags: int


Event = TcpIn | UdpIn | IcmpEchoIn | OffloadIn


def _mac_dst(dst_ip: bytes, neighbors: dict[bytes, bytes]) -> bytes:
    return neighbors.get(dst_ip, ethernet.BROADCAST)


class Gateway:
    def __init__(self, net: NetConfig, dhcp=None, counters: Counters | None = None) -> None:
        self.net = net
        self.mac = net.gateway_mac
        self.ip = net.gateway_ip.packed
        self.ips = frozenset(ip.packed for ip in net.gateway_ips)
        self.dhcp = dhcp
        self.counters = counters or Counters()
        # IP -> MAC of the VMs, learnt from ARP, DHCP and new flows.
        self.neighbors: dict[bytes, bytes] = {}
        self._subnet = _SubnetContains(net.subnet)
        self._eth_hdr_cache: dict[bytes, bytes] = {}
        self._tcp_templates: dict[tuple, tuple[bytes, int, int]] = {}
        self._ident = 0

    # ---- input ---------------------------------------------------------------------------
    def input(self, frame: bytes | memoryview, now: float) -> tuple[list[bytes], Event | None]:
        """Handle one frame for the gateway.  Raises MalformedPacket for garbage."""
        if len(frame) < ethernet.HEADER_LEN:
            raise MalformedPacket("ethernet-truncated", f"{len(frame)} bytes")
        ethertype = (frame[12] << 8) | frame[13]
        if ethertype == ethernet.TYPE_IPV4:
            dst_mac = frame[0:6]
            if dst_mac != self.mac and dst_mac != ethernet.BROADCAST:
                return [], None  # flooded unicast for someone else
            if len(frame) >= 54 and frame[23] == 6 and frame[14] == 0x45:
                # The hot path: TCP in an option-less IPv4 header, not a SYN (whose
                # options matter), not a fragment: one unpack, no IPv4Packet.
                (total, ff, src, dst, sport, dport, seq, ack, off, flags,
                 window) = _IN_IP_TCP.unpack_from(frame, 16)
                thl = (off >> 4) * 4
                if not ff & 0x3FFF and not flags & tcp.SYN and 40 <= 20 + thl <= total <= len(frame) - 14 and thl >= 20:
                    end = 14 + total
                    payload = memoryview(frame)[34 + thl:end] if end > 34 + thl else b""
                    return [], TcpIn(bytes(frame[6:12]), src, dst, tcp.Segment(sport, dport, seq, ack, flags, window, payload))
            return self._input_ipv4(bytes(frame[6:12]), memoryview(frame)[14:], now)
        if ethertype == ethernet.TYPE_ARP:
            return self._input_arp(memoryview(frame)[14:]), None
        if ethertype == ethernet.TYPE_RDSWITCH and frame[0:6] == self.mac:
            return [], OffloadIn(offload.parse_capability(memoryview(frame)[14:]))
        self.counters.drop(f"ethertype-{ethertype:04x}")
        return [], None

    def _input_arp(self, data: memoryview) -> list[bytes]:
        pkt = arp.parse(data)
        if pkt.sender_ip != b"\0\0\0\0" and pkt.sender_ip in self._subnet:
            self.neighbors[pkt.sender_ip] = pkt.sender_mac
        if pkt.op == arp.REQUEST and pkt.target_ip in self.ips:
            self.counters.values["arp_replies"] += 1
            reply = arp.reply_to(pkt, self.mac)
            return [ethernet.build(pkt.sender_mac, self.mac, ethernet.TYPE_ARP, arp.build(reply))]
        return []

    def _input_ipv4(self, src_mac: bytes, data: memoryview, now: float) -> tuple[list[bytes], Event | None]:
        pkt = ipv4.parse(data)
        if pkt.is_fragment:
            self.counters.drop("ipv4-fragment")
            return [], None
        proto = pkt.proto
        if proto == ipv4.PROTO_TCP:
            seg = tcp.parse(pkt.payload)
            if seg.flags & tcp.SYN and pkt.src in self._subnet:
                self.neighbors[pkt.src] = src_mac
            return [], TcpIn(src_mac, pkt.src, pkt.dst, seg)
        if proto == ipv4.PROTO_UDP:
            sport, dport, payload = udp.parse(pkt.payload)
            if dport == DHCP_SERVER_PORT and (pkt.dst == BROADCAST_IP or pkt.dst == self.ip):
                return self._input_dhcp(payload, now), None
            if pkt.src in self._subnet:
                self.neighbors[pkt.src] = src_mac
            return [], UdpIn(src_mac, pkt.src, sport, pkt.dst, dport, payload, data)
        if proto == ipv4.PROTO_ICMP:
            msg = icmp.parse(pkt.payload)
            if msg.type != icmp.ECHO_REQUEST:
                self.counters.drop(f"icmp-type-{msg.type}")
                return [], None
            if pkt.src in self._subnet:
                self.neighbors[pkt.src] = src_mac
            if pkt.dst == self.ip:
                self.counters.values["icmp_echo_replies"] += 1
                reply = icmp.build(icmp.echo_reply(msg))
                return [self.ip_frame(src_mac, self.ip, pkt.src, ipv4.PROTO_ICMP, reply)], None
            return [], IcmpEchoIn(src_mac, pkt.src, pkt.dst, msg, data)
        self.counters.drop(f"ip-proto-{proto}")
        return [], None

    def _input_dhcp(self, payload: memoryview, now: float) -> list[bytes]:
        if self.dhcp is None:
            return []
        reply = self.dhcp.handle(bytes(payload), now)
        if reply is None:
            return []
        self.counters.values["dhcp_replies"] += 1
        dst_ip = b"\xff\xff\xff\xff" if reply.broadcast else reply.dst_ip.packed
        dst_mac = ethernet.BROADCAST if reply.broadcast else reply.dst_mac
        if not reply.broadcast:
            self.neighbors[dst_ip] = dst_mac
        return [self.udp_frame(dst_mac, self.ip, DHCP_SERVER_PORT, dst_ip, DHCP_CLIENT_PORT, reply.payload)]

    # ---- output --------------------------------------------------------------------------
    def mac_for(self, ip: bytes) -> bytes:
        return self.neighbors.get(ip, ethernet.BROADCAST)

    def _next_ident(self) -> int:
        self._ident = (self._ident + 1) & 0xFFFF
        return self._ident

    def _eth_hdr(self, dst_mac: bytes) -> bytes:
        h = self._eth_hdr_cache.get(dst_mac)
        if h is None:
            h = self._eth_hdr_cache[dst_mac] = dst_mac + self.mac + b"\x08\x00"
        return h

    def ip_frame(self, dst_mac: bytes, src_ip: bytes, dst_ip: bytes, proto: int, payload: bytes | memoryview,
                 ttl: int = 64) -> bytes:
        return b"".join((self._eth_hdr(dst_mac),
                         ipv4.build_header(src_ip, dst_ip, proto, len(payload), ttl=ttl, ident=self._next_ident()),
                         payload))

    def ip_frames(self, dst_mac: bytes, src_ip: bytes, dst_ip: bytes, proto: int,
                  payload: bytes | memoryview) -> list[bytes] | None:
        """Frames carrying one IP packet, fragmented to the MTU; None if it cannot be carried (counted)."""
        try:
            packets = ipv4.fragment(src_ip, dst_ip, proto, payload, self.net.mtu, ident=self._next_ident())
        except ValueError:
            self.counters.drop("ip-too-large")
            return None
        hdr = self._eth_hdr(dst_mac)
        return [hdr + p for p in packets]

    def udp_frames(self, dst_mac: bytes, src_ip: bytes, src_port: int, dst_ip: bytes, dst_port: int,
                   payload: bytes | memoryview) -> list[bytes] | None:
        """A datagram of any size (fragmented to the MTU); None if over the IPv4 limit."""
        if len(payload) > 0xFFFF - 28:
            self.counters.drop("udp-too-large")
            return None
        return self.ip_frames(dst_mac, src_ip, dst_ip, ipv4.PROTO_UDP, udp.build(src_port, dst_port, payload, src_ip, dst_ip))

    def udp_frame(self, dst_mac: bytes, src_ip: bytes, src_port: int, dst_ip: bytes, dst_port: int,
                  payload: bytes | memoryview) -> bytes:
        return self.ip_frame(dst_mac, src_ip, dst_ip, ipv4.PROTO_UDP, udp.build(src_port, dst_port, payload, src_ip, dst_ip))

    def tcp_frame(self, dst_mac: bytes, src_ip: bytes, dst_ip: bytes, seg: tcp.Segment, partial: bool = False) -> bytes:
        """Ethernet+IPv4+TCP in one join: the payload is copied exactly once.

        The hot path (no options: everything but SYNs) packs both headers with
        checksums summed from the fields and a per-address-pair precomputed
        part, so the only per-byte work is the payload's sum.  With ``partial``
        (towards a vm-switch that announced offload) not even that: the
        checksum field holds the pseudo-header sum for the VM's kernel to
        complete, as a NIC with checksum offload would.
        """
        if seg.flags & tcp.SYN:
            return self._tcp_frame_with_options(dst_mac, src_ip, dst_ip, seg)
        key = (dst_mac, src_ip, dst_ip)
        tmpl = self._tcp_templates.get(key)
        if tmpl is None:
            tmpl = self._tcp_templates[key] = self._tcp_template(dst_mac, src_ip, dst_ip)
        eth, ip_base, pseudo_base = tmpl
        payload = seg.payload
        tcp_len = 20 + len(payload)
        self._ident = ident = (self._ident + 1) & 0xFFFF
        total = tcp_len + 20
        ip_sum = ip_base + total + ident
        ip_sum = (ip_sum & 0xFFFF) + (ip_sum >> 16)
        ip_sum = (ip_sum & 0xFFFF) + (ip_sum >> 16)
        seq = seg.seq & 0xFFFFFFFF
        ack = seg.ack & 0xFFFFFFFF
        flags_word = 0x5000 | seg.flags
        if partial:  # the field holds the folded pseudo-header sum, for the receiver to complete
            s = pseudo_base + tcp_len
            s = (s & 0xFFFF) + (s >> 16)
            check = (s & 0xFFFF) + (s >> 16)
        else:
            s = (pseudo_base + tcp_len + seg.src_port + seg.dst_port + (seq >> 16) + (seq & 0xFFFF) + (ack >> 16)
                 + (ack & 0xFFFF) + flags_word + seg.window + (ones_sum(payload) if payload else 0))
            while s > 0xFFFF:
                s = (s & 0xFFFF) + (s >> 16)
            check = ~s & 0xFFFF
        return b"".join((eth,
                         _IP_TCP_HDR.pack(0x45, 0, total, ident, 0x4000, 64, 6, ~ip_sum & 0xFFFF, src_ip, dst_ip,
                                          seg.src_port, seg.dst_port, seq, ack, flags_word, seg.window, check, 0),
                         payload))

    def _tcp_template(self, dst_mac: bytes, src_ip: bytes, dst_ip: bytes) -> tuple[bytes, int, int]:
        if len(self._tcp_templates) > 4096:
            self._tcp_templates.clear()
        # constant words of the IPv4 header: version/IHL/TOS, DF, TTL/protocol, addresses
        ip_base = 0x4500 + 0x4000 + ((64 << 8) | 6) + pseudo_header_sum(src_ip, dst_ip, 0, 0)
        return self._eth_hdr(dst_mac), ip_base, pseudo_header_sum(src_ip, dst_ip, tcp.PROTO, 0)

    def _tcp_frame_with_options(self, dst_mac: bytes, src_ip: bytes, dst_ip: bytes, seg: tcp.Segment) -> bytes:
        opts = tcp._build_options(seg)
        if len(opts) & 3:
            opts += b"\0" * (4 - (len(opts) & 3))
        hlen = 20 + len(opts)
        payload = seg.payload
        hdr = bytearray(tcp._HDR.pack(seg.src_port, seg.dst_port, seg.seq & 0xFFFFFFFF, seg.ack & 0xFFFFFFFF,
                                      (hlen // 4) << 4, seg.flags, seg.window, 0, 0))
        hdr += opts
        total = hlen + len(payload)
        s = fold(pseudo_header_sum(src_ip, dst_ip, tcp.PROTO, total), ones_sum(hdr), ones_sum(payload) if payload else 0)
        struct.pack_into("!H", hdr, 16, ~s & 0xFFFF)
        return b"".join((self._eth_hdr(dst_mac),
                         ipv4.build_header(src_ip, dst_ip, ipv4.PROTO_TCP, total, ident=self._next_ident()),
                         hdr, payload))

    def icmp_unreachable(self, dst_mac: bytes, src_ip: bytes, dst_ip: bytes, code: int,
                         original: bytes | memoryview) -> bytes:
        return self.ip_frame(dst_mac, src_ip, dst_ip, ipv4.PROTO_ICMP, icmp.build(icmp.unreachable(code, original)))


class _SubnetContains:
    """Membership of 4 raw address bytes in a network, without building addresses."""

    __slots__ = ("lo", "hi")

    def __init__(self, net: ipaddress.IPv4Network) -> None:
        self.lo = int(net.network_address)
        self.hi = int(net.broadcast_address)

    def __contains__(self, ip: bytes) -> bool:
        return self.lo <= int.from_bytes(ip, "big") <= self.hi
