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
from ..wire.errors import MalformedPacket
from .counters import Counters
from .frames import FrameBuilder
from .reassembly import Reassembler

BROADCAST_IP = b"\xff\xff\xff\xff"
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


class Gateway:
    def __init__(self, net: NetConfig, dhcp=None, counters: Counters | None = None,
                 frames: FrameBuilder | None = None) -> None:
        self.net = net
        self.mac = net.gateway_mac
        self.ip = net.gateway_ip.packed
        self.ips = frozenset(ip.packed for ip in net.gateway_ips)
        self.dhcp = dhcp
        self.counters = counters or Counters()
        # IP -> MAC of the VMs, learnt from ARP, DHCP and new flows.
        self.neighbors: dict[bytes, bytes] = {}
        self._subnet = _SubnetContains(net.subnet)
        self.frames = frames or FrameBuilder(net, self.counters)
        self.reassembly = Reassembler(self.counters)  # the VMs' fragmented datagrams

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
            if not self._learn(pkt.sender_ip, pkt.sender_mac):
                return []
        if pkt.op == arp.REQUEST and pkt.target_ip in self.ips:
            self.counters.values["arp_replies"] += 1
            reply = arp.reply_to(pkt, self.mac)
            return [ethernet.build(pkt.sender_mac, self.mac, ethernet.TYPE_ARP, arp.build(reply))]
        return []

    def _input_ipv4(self, src_mac: bytes, data: memoryview, now: float) -> tuple[list[bytes], Event | None]:
        pkt = ipv4.parse(data)
        if pkt.is_fragment:
            whole = self.reassembly.add(pkt, now)
            if whole is None:
                return [], None
            # the datagram continues as if it had arrived whole
            data = memoryview(whole)
            pkt = ipv4.parse(data)
        proto = pkt.proto
        if proto == ipv4.PROTO_TCP:
            seg = tcp.parse(pkt.payload)
            if seg.flags & tcp.SYN and pkt.src in self._subnet and not self._learn(pkt.src, src_mac):
                return [], None
            return [], TcpIn(src_mac, pkt.src, pkt.dst, seg)
        if proto == ipv4.PROTO_UDP:
            sport, dport, payload = udp.parse(pkt.payload)
            if dport == DHCP_SERVER_PORT and (pkt.dst == BROADCAST_IP or pkt.dst == self.ip):
                return self._input_dhcp(payload, now), None
            if pkt.src in self._subnet and not self._learn(pkt.src, src_mac):
                return [], None
            return [], UdpIn(src_mac, pkt.src, sport, pkt.dst, dport, payload, data)
        if proto == ipv4.PROTO_ICMP:
            msg = icmp.parse(pkt.payload)
            if msg.type != icmp.ECHO_REQUEST:
                self.counters.drop(f"icmp-type-{msg.type}")
                return [], None
            if pkt.src in self._subnet and not self._learn(pkt.src, src_mac):
                return [], None
            if pkt.dst == self.ip:
                self.counters.values["icmp_echo_replies"] += 1
                # fragmented to the MTU: a reassembled request can be bigger than one frame
                return self.frames.echo_reply(src_mac, self.ip, pkt.src, msg) or [], None
            return [], IcmpEchoIn(src_mac, pkt.src, pkt.dst, msg, data)
        self.counters.drop(f"ip-proto-{proto}")
        return [], None

    def _learn(self, ip: bytes, mac: bytes) -> bool:
        """Note that ``ip`` lives at ``mac``; False (counted) when ``ip`` is another MAC's DHCP lease.

        That frame is a spoof: learning it would send the other VM's forwarded
        connections and replies to the sender, so it is dropped instead.  An
        address without a lease is learnt from whoever uses it, as before.
        """
        if self.neighbors.get(ip) == mac:
            return True
        holder = self.dhcp.holder(ip) if self.dhcp is not None else None
        if holder is not None and holder != mac:
            self.counters.drop("ip-spoofed")
            return False
        self.neighbors[ip] = mac
        return True

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
        return [self.frames.udp_frame(dst_mac, self.ip, DHCP_SERVER_PORT, dst_ip, DHCP_CLIENT_PORT, reply.payload)]

class _SubnetContains:
    """Membership of 4 raw address bytes in a network, without building addresses."""

    __slots__ = ("lo", "hi")

    def __init__(self, net: ipaddress.IPv4Network) -> None:
        self.lo = int(net.network_address)
        self.hi = int(net.broadcast_address)

    def __contains__(self, ip: bytes) -> bool:
        return self.lo <= int.from_bytes(ip, "big") <= self.hi
