"""Building the frames the gateway sends into the virtual network, sans-IO.

One :class:`FrameBuilder` per host-switch, shared by the gateway (ARP, ping
and DHCP replies) and the NAT (TCP segments, UDP datagrams, ICMP errors and
echo replies): every frame from the gateway's MAC is made here, with one IPv4
identification counter.  The TCP hot path packs both headers at once and
copies the payload exactly once.
"""

from __future__ import annotations

import struct

from ..config import NetConfig
from ..wire import icmp, ipv4, tcp, udp
from ..wire.checksum import ones_sum, pseudo_header_sum
from .counters import Counters

# IPv4 header (no options) followed by a TCP header without options, packed at once.
_IP_TCP_HDR = struct.Struct("!BBHHHBBH4s4sHHIIHHHH")
# IPv4 header (no options) followed by a UDP header, packed at once.
_IP_UDP_HDR = struct.Struct("!BBHHHBBH4s4sHHHH")
#: Cached Ethernet headers / TCP templates at most (a VM could otherwise grow them with made-up MACs).
CACHE_LIMIT = 4096


class FrameBuilder:
    def __init__(self, net: NetConfig, counters: Counters | None = None) -> None:
        self.net = net
        self.mac = net.gateway_mac
        self.counters = counters or Counters()
        self._eth_hdr_cache: dict[bytes, bytes] = {}
        self._tcp_templates: dict[tuple, tuple[bytes, int, int]] = {}
        self._ident = 0

    def _next_ident(self) -> int:
        self._ident = (self._ident + 1) & 0xFFFF
        return self._ident

    def eth_header(self, dst_mac: bytes) -> bytes:
        h = self._eth_hdr_cache.get(dst_mac)
        if h is None:
            if len(self._eth_hdr_cache) >= CACHE_LIMIT:
                self._eth_hdr_cache.clear()
            h = self._eth_hdr_cache[dst_mac] = dst_mac + self.mac + b"\x08\x00"
        return h

    def ip_frame(self, dst_mac: bytes, src_ip: bytes, dst_ip: bytes, proto: int, payload: bytes | memoryview,
                 ttl: int = 64) -> bytes:
        """One frame with one IP packet (the caller knows it fits the MTU)."""
        return b"".join((self.eth_header(dst_mac),
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
        hdr = self.eth_header(dst_mac)
        return [hdr + p for p in packets]

    def udp_frames(self, dst_mac: bytes, src_ip: bytes, src_port: int, dst_ip: bytes, dst_port: int,
                   payload: bytes | memoryview) -> list[bytes] | None:
        """A datagram of any size (fragmented to the MTU); None if over the IPv4 limit.

        One that fits the MTU (DNS answers, a UDP flow's replies) is packed in one go,
        both checksums summed from the fields, the payload copied once.
        """
        n = len(payload)
        if n > 0xFFFF - 28:
            self.counters.drop("udp-too-large")
            return None
        if 28 + n > self.net.mtu:
            return self.ip_frames(dst_mac, src_ip, dst_ip, ipv4.PROTO_UDP,
                                  udp.build(src_port, dst_port, payload, src_ip, dst_ip))
        ulen = 8 + n
        total = 20 + ulen
        self._ident = ident = (self._ident + 1) & 0xFFFF
        addrs = pseudo_header_sum(src_ip, dst_ip, 0, 0)
        s = 0x4500 + total + ident + ((64 << 8) | ipv4.PROTO_UDP) + addrs  # no DF: as ipv4.fragment builds it
        while s > 0xFFFF:
            s = (s & 0xFFFF) + (s >> 16)
        ip_check = ~s & 0xFFFF
        s = addrs + ipv4.PROTO_UDP + ulen + src_port + dst_port + ulen + (ones_sum(payload) if n else 0)
        while s > 0xFFFF:
            s = (s & 0xFFFF) + (s >> 16)
        check = ~s & 0xFFFF or 0xFFFF  # 0 means "no checksum" in UDP
        return [b"".join((self.eth_header(dst_mac),
                          _IP_UDP_HDR.pack(0x45, 0, total, ident, 0, 64, ipv4.PROTO_UDP, ip_check, src_ip, dst_ip,
                                           src_port, dst_port, ulen, check),
                          payload))]

    def udp_frame(self, dst_mac: bytes, src_ip: bytes, src_port: int, dst_ip: bytes, dst_port: int,
                  payload: bytes | memoryview) -> bytes:
        return self.ip_frame(dst_mac, src_ip, dst_ip, ipv4.PROTO_UDP, udp.build(src_port, dst_port, payload, src_ip, dst_ip))

    def icmp_unreachable(self, dst_mac: bytes, src_ip: bytes, dst_ip: bytes, code: int,
                         original: bytes | memoryview) -> bytes:
        return self.ip_frame(dst_mac, src_ip, dst_ip, ipv4.PROTO_ICMP, icmp.build(icmp.unreachable(code, original)))

    def echo_reply(self, dst_mac: bytes, src_ip: bytes, dst_ip: bytes, request: icmp.IcmpMessage,
                   payload: bytes | memoryview | None = None) -> list[bytes] | None:
        """The echo reply to ``request`` (with ``payload`` instead of the request's, if given)."""
        msg = icmp.IcmpMessage(icmp.ECHO_REPLY, 0, request.rest, request.payload if payload is None else payload)
        return self.ip_frames(dst_mac, src_ip, dst_ip, ipv4.PROTO_ICMP, icmp.build(msg))

    def tcp_frame(self, dst_mac: bytes, src_ip: bytes, dst_ip: bytes, seg: tcp.Segment, partial: bool = False) -> bytes:
        """Ethernet+IPv4+TCP in one join: the payload is copied exactly once.

        The hot path (no options: everything but SYNs) packs both headers with
        checksums summed from the fields and a per-address-pair precomputed
        part, so the only per-byte work is the payload's sum.  With ``partial``
        (towards a vm-switch that announced offload) not even that: the
        checksum field holds the pseudo-header sum for the VM's kernel to
        complete, as a NIC with checksum offload would.
        """
        if seg.flags & tcp.SYN:  # options matter: the codec's general path (SYNs carry no payload)
            return self.ip_frame(dst_mac, src_ip, dst_ip, ipv4.PROTO_TCP, tcp.build(seg, src_ip, dst_ip))
        key = (dst_mac, src_ip, dst_ip)
        tmpl = self._tcp_templates.get(key)
        if tmpl is None:
            if len(self._tcp_templates) >= CACHE_LIMIT:
                self._tcp_templates.clear()
            # constant words of the IPv4 header: version/IHL/TOS, DF, TTL/protocol, addresses
            ip_base = 0x4500 + 0x4000 + ((64 << 8) | 6) + pseudo_header_sum(src_ip, dst_ip, 0, 0)
            tmpl = self._tcp_templates[key] = (self.eth_header(dst_mac), ip_base,
                                               pseudo_header_sum(src_ip, dst_ip, tcp.PROTO, 0))
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
