"""The trio shell around the gateway: NAT of TCP/UDP/ICMP flows and local services.

Every flow is a task in the nursery of the session whose VM started it, so a
session's end cancels its flows and closes their host sockets.  The policy
(:class:`NatPolicy`) decides where a flow may go; it is plain data and tested
on its own.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import random
import socket
from typing import Callable

import attrs
import trio

from ..config import ConfigError, NetConfig, parse_cidr
from ..logs import describe
from ..stack.gateway import IcmpEchoIn, OffloadIn, TcpIn, UdpIn
from ..aio.tcp_stream import SocketInfo, VirtualTcpListener, VirtualTcpStream
from ..stack.tcp import TcpConnection, rst_for
from ..wire import icmp, offload, tcp
from .session import Port

log = logging.getLogger("rdswitch.nat")

LINK_LOCAL = ipaddress.IPv4Network("169.254.0.0/16")
PIPE_CHUNK = 1 << 18
MAX_DNS_INFLIGHT = 128
# TCP payload per segment towards an offload port: the frame (14+20+20+payload) stays
# inside the 16-bit framing and the IP packet under 65535; the VM's kernel segments it.
TSO_MSS = 65000 - 40  # DNS queries of one session being answered at once


def add_nat_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("NAT")
    g.add_argument("--allow-outbound", action="append", default=[], metavar="CIDR",
                   help="destinations (after the NAT table) flows may reach; repeatable; default: everything")
    g.add_argument("--allow-link-local", action="store_true", help="allow flows to 169.254.0.0/16")
    g.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to dial a host for a VM's SYN")
    g.add_argument("--max-pending-dials", type=int, default=256, help="concurrent host dials per session")
    g.add_argument("--udp-idle-timeout", type=float, default=90.0, help="seconds before an idle UDP flow closes")
    g.add_argument("--max-udp-flows", type=int, default=1024, help="UDP flows (host sockets) per session")
    g.add_argument("--max-tcp-flows", type=int, default=4096, help="TCP flows (host sockets) per session")
    g.add_argument("--tcp-buffer", type=int, default=0, help="per-flow TCP buffer bytes (0: derived from the MTU)")


@attrs.frozen
class NatPolicy:
    net: NetConfig
    allow_outbound: tuple[ipaddress.IPv4Network, ...] = (ipaddress.IPv4Network("0.0.0.0/0"),)
    allow_link_local: bool = False
    connect_timeout: float = 10.0
    max_pending_dials: int = 256
    udp_idle_timeout: float = 90.0
    max_udp_flows: int = 1024
    tcp_buffer: int = 0
    max_tcp_flows: int = 4096

    @classmethod
    def from_args(cls, args: argparse.Namespace, net: NetConfig) -> "NatPolicy":
        allow = tuple(parse_cidr(c) for c in args.allow_outbound) or cls.allow_outbound.default  # type: ignore[attr-defined]
        for name in ("connect_timeout", "udp_idle_timeout"):
            if getattr(args, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")
        for name in ("max_pending_dials", "max_udp_flows", "max_tcp_flows"):
            if getattr(args, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        return cls(net, allow, args.allow_link_local, args.connect_timeout, args.max_pending_dials,
                   args.udp_idle_timeout, args.max_udp_flows, args.tcp_buffer, args.max_tcp_flows)

    def destination(self, dst: bytes) -> tuple[str | None, str]:
        """Map a virtual destination to the host address to dial, or refuse.

        Returns (ip, "") or (None, reason).
        """
        addr = ipaddress.IPv4Address(dst)
        real = self.net.nat_table.get(addr)
        if real is None:
            if addr.is_loopback:
                return None, "loopback"  # the host's loopback only through the NAT table (.254)
            real = addr
        if real in LINK_LOCAL and not self.allow_link_local:
            return None, "link-local"
        if (real.is_multicast or real == ipaddress.IPv4Address("255.255.255.255") or real.is_unspecified
                or addr == self.net.subnet.broadcast_address):
            return None, "not-unicast"
        if addr in self.net.subnet and addr not in self.net.nat_table:
            return None, "virtual-subnet"
        if not any(real in n for n in self.allow_outbound):
            return None, "outbound-denied"
        return str(real), ""

    @property
    def tcp_buffer_size(self) -> int:
        if self.tcp_buffer:
            return self.tcp_buffer
        return max(1 << 20, 32 * (self.net.mtu - 40))


@attrs.define
class PendingDial:
    """A SYN whose host dial is in progress (the flow table's placeholder)."""

    scope: trio.CancelScope


async def dial_tcp(ip: str, port: int) -> trio.SocketStream:
    """Connect to an IP literal (no name lookup); OSError keeps its errno (ECONNREFUSED, ...)."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        await sock.connect((ip, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


class SessionFlows:
    """The flow tables of one session (one VM port)."""

    def __init__(self, port: Port) -> None:
        self.port = port
        self.tcp: dict[tuple, VirtualTcpStream | PendingDial] = {}
        self.udp: dict[tuple, "UdpFlow"] = {}
        self.pending_dials = 0
        self.pings = 0
        self.dns_queries = 0


class NetStack:
    def __init__(self, hs, policy: NatPolicy, *, dns=None) -> None:
        self.hs = hs
        self.policy = policy
        self.net = hs.net
        self.gateway = hs.gateway
        self.dns = dns
        self.gateway_ip = self.net.gateway_ip.packed
        self.mss = self.net.mtu - 40
        self.sessions: dict[int, SessionFlows] = {}
        # Local TCP services on the gateway IP: port -> listener.
        self.listeners: dict[int, VirtualTcpListener] = {}
        # Local UDP endpoints on the gateway IP (port forwarding replies): port -> callback(port, UdpIn).
        self.udp_endpoints: dict[int, Callable] = {}
        self._next_ephemeral = 49152
        # Streams fed segments during the current batch of frames; flushed once per batch.
        self.dirty: set[VirtualTcpStream] = set()

    def listen_tcp(self, port: int, backlog: int = 128) -> VirtualTcpListener:
        """A virtual listener on gateway_ip:port (inside the network, not on the host)."""
        if port in self.listeners:
            raise ValueError(f"gateway port {port} is already in use")
        listener = self.listeners[port] = VirtualTcpListener(backlog)
        return listener

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Start the gateway's own TCP services (DNS over TCP)."""
        async with trio.open_nursery() as nursery:
            if self.dns is not None:
                nursery.start_soon(self._serve_listener, self.listen_tcp(53), self.dns.serve_stream)
            task_status.started()

    async def _serve_listener(self, listener: VirtualTcpListener, handler) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                stream = await listener.accept()
                nursery.start_soon(handler, stream)

    def flows(self, port: Port) -> SessionFlows:
        f = self.sessions.get(port.id)
        if f is None:
            f = self.sessions[port.id] = SessionFlows(port)
        return f

    def session_closed(self, port: Port) -> None:
        """Forget a session's flows; reset its streams (local service handlers see the reset and end)."""
        flows = self.sessions.pop(port.id, None)
        if flows is None:
            return
        for stream in list(flows.tcp.values()):
            if type(stream) is VirtualTcpStream:
                self.dirty.discard(stream)
                stream.abort_if_open()
        flows.tcp.clear()

    def handle(self, port: Port, event) -> None:
        if type(event) is TcpIn:
            self.tcp_in(port, event)
        elif type(event) is UdpIn:
            self.udp_in(port, event)
        elif type(event) is IcmpEchoIn:
            self.icmp_in(port, event)
        elif type(event) is OffloadIn:
            offload_ok = bool(event.flags & offload.FLAG_PARTIAL_CSUM_TSO)
            if offload_ok != port.offload:
                log.info("%r: offload %s (partial checksums, %d-byte TCP segments)", port,
                         "on" if offload_ok else "off", TSO_MSS)
            port.offload = offload_ok

    # ---- TCP -----------------------------------------------------------------------------
    def tcp_in(self, port: Port, ev: TcpIn) -> None:
        seg = ev.seg
        key = (ev.src_ip, seg.src_port, ev.dst_ip, seg.dst_port)
        flows = self.flows(port)
        if key in flows.tcp:
            stream = flows.tcp[key]
            if type(stream) is PendingDial:
                if seg.flags & tcp.RST:  # the VM gave up: stop dialling
                    stream.scope.cancel()
                return  # a retransmitted SYN while we dial: the answer comes when the dial ends
            # Process now, transmit (ACKs, window updates) once per batch of frames: flush_dirty().
            stream.conn.receive_segment(seg, trio.current_time())
            self.dirty.add(stream)
            return
        if seg.flags & (tcp.SYN | tcp.ACK | tcp.RST) != tcp.SYN:
            rst = rst_for(seg)
            if rst is not None:
                self._send_segments(port, ev.src_mac, ev.dst_ip, ev.src_ip, [rst])
            return
        if ev.dst_ip == self.gateway_ip:
            self._accept_local(port, flows, ev, key)
            return
        dst, reason = self.policy.destination(ev.dst_ip)
        if dst is None:
            self._refuse_syn(port, ev, reason)
            return
        if len(flows.tcp) >= self.policy.max_tcp_flows:
            self._refuse_syn(port, ev, "flow-limit")
            return
        if flows.pending_dials >= self.policy.max_pending_dials:
            port.counters.drop("tcp-dial-limit")  # the VM retransmits its SYN
            return
        pending = flows.tcp[key] = PendingDial(trio.CancelScope())
        flows.pending_dials += 1
        port.nursery.start_soon(self._tcp_flow, port, flows, ev, key, dst, pending)

    def flush_dirty(self) -> None:
        """Transmit what the streams fed during one batch of frames queued (one ACK per stream, not per segment)."""
        dirty = self.dirty
        while dirty:
            dirty.pop().flush()

    def _refuse_syn(self, port: Port, ev: TcpIn, reason: str) -> None:
        port.counters.drop(f"tcp-{reason}")
        # the RST|ACK answering a SYN: no connection needs to exist for it
        self._send_segments(port, ev.src_mac, ev.dst_ip, ev.src_ip, [rst_for(ev.seg)])

    def _new_stream(self, port: Port, flows: SessionFlows, ev: TcpIn, key: tuple, now: float) -> VirtualTcpStream:
        bufsize = self.policy.tcp_buffer_size
        conn = TcpConnection.from_syn(ev.seg, now, iss=random.getrandbits(32), mss=self.mss,
                                      rcv_buffer=bufsize, snd_buffer=bufsize)
        if port.offload:
            conn.tso_mss = TSO_MSS
        src_mac, local_ip, vm_ip = ev.src_mac, ev.dst_ip, ev.src_ip
        info = SocketInfo((socket.inet_ntoa(local_ip), ev.seg.dst_port), (socket.inet_ntoa(vm_ip), ev.seg.src_port))

        def on_closed() -> None:
            if flows.tcp.get(key) is stream:
                del flows.tcp[key]

        stream = VirtualTcpStream(conn, self._transmitter(port, src_mac, local_ip, vm_ip), on_closed=on_closed,
                                  socket_info=info)
        return stream

    def _transmitter(self, port: Port, vm_mac: bytes, local_ip: bytes, vm_ip: bytes) -> Callable:
        tcp_frame = self.gateway.tcp_frame
        send = self.hs.send_to
        partial = port.offload

        def transmit(segments) -> None:
            for seg in segments:
                send(port, tcp_frame(vm_mac, local_ip, vm_ip, seg, partial))

        return transmit

    def _send_segments(self, port: Port, vm_mac: bytes, local_ip: bytes, vm_ip: bytes, segments) -> None:
        self._transmitter(port, vm_mac, local_ip, vm_ip)(segments)

    def _accept_local(self, port: Port, flows: SessionFlows, ev: TcpIn, key: tuple) -> None:
        listener = self.listeners.get(ev.seg.dst_port)
        if listener is None:
            self._refuse_syn(port, ev, "closed-port")
            return
        stream = self._new_stream(port, flows, ev, key, trio.current_time())
        if len(flows.tcp) >= self.policy.max_tcp_flows or not listener.push(stream):
            self._refuse_syn(port, ev, "backlog-full")
            return
        flows.tcp[key] = stream
        stream.conn.accept(trio.current_time())
        stream.flush()
        port.nursery.start_soon(stream.timer_loop)
        port.counters.values["tcp_local_total"] += 1

    async def _tcp_flow(self, port: Port, flows: SessionFlows, ev: TcpIn, key: tuple, dst: str,
                        pending: "PendingDial") -> None:
        counters = port.counters
        stream = None
        try:
            host_stream = None
            failure = "timeout"
            try:
                with pending.scope, trio.move_on_after(self.policy.connect_timeout):
                    host_stream = await dial_tcp(dst, ev.seg.dst_port)
            except OSError as exc:
                failure = "refused" if exc.errno == errno.ECONNREFUSED else "failed"
                log.debug("%r: dial %s:%d failed: %s", port, dst, ev.seg.dst_port, exc)
            finally:
                flows.pending_dials -= 1
                if flows.tcp.get(key) is pending:
                    del flows.tcp[key]
            if host_stream is None:
                if pending.scope.cancelled_caught:
                    counters.drop("tcp-dial-abandoned")  # the VM reset its SYN while we dialled
                elif failure == "timeout":
                    counters.drop("tcp-dial-timeout")  # nothing sent: the VM's own SYN timeout applies
                else:
                    self._refuse_syn(port, ev, f"dial-{failure}")
                return
            async with host_stream:
                stream = self._new_stream(port, flows, ev, key, trio.current_time())
                flows.tcp[key] = stream
                stream.conn.accept(trio.current_time())
                stream.flush()
                counters.values["tcp_flows_total"] += 1
                counters.values["tcp_flows_open"] += 1
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(stream.timer_loop)
                        await pipe(stream, host_stream)
                        nursery.cancel_scope.cancel()
                finally:
                    counters.values["tcp_flows_open"] -= 1
        except Exception as exc:  # noqa: BLE001 - one flow's failure never ends another
            log.debug("%r: flow %s:%d ended: %s", port, dst, ev.seg.dst_port, describe(exc))
        finally:
            if stream is not None:
                stream.abort_if_open()
                if flows.tcp.get(key) is stream:
                    del flows.tcp[key]

    # ---- into the VM (port forwarding) -----------------------------------------------------
    def session_for(self, vm_ip: bytes) -> tuple[Port, bytes] | None:
        """The session (switch port) and MAC that hold ``vm_ip``, if any VM has used it."""
        mac = self.gateway.neighbors.get(vm_ip)
        if mac is None:
            return None
        port = self.hs.switch.lookup(mac)
        if not isinstance(port, Port) or port.closed:
            return None
        return port, mac

    def ephemeral_port(self, in_use) -> int:
        """A gateway-side port (49152..65535) for which ``in_use(port)`` is false."""
        for _ in range(16384):
            p = self._next_ephemeral
            self._next_ephemeral = 49152 if p >= 65535 else p + 1
            if not in_use(p) and p not in self.listeners and p not in self.udp_endpoints:
                return p
        raise OSError(errno.EADDRINUSE, "no free gateway port")

    async def open_tcp(self, vm_ip: bytes, vm_port: int, *, timeout: float = 10.0) -> tuple[Port, VirtualTcpStream]:
        """Open a virtual TCP connection from the gateway IP into a VM (active open).

        The connection belongs to the VM's session: its timer runs in the
        session nursery, so it dies with the session.  Raises OSError when no
        session holds ``vm_ip`` or the VM refuses / does not answer.
        """
        found = self.session_for(vm_ip)
        if found is None:
            raise OSError(errno.EHOSTUNREACH, f"no VM session holds {socket.inet_ntoa(vm_ip)}")
        port, vm_mac = found
        flows = self.flows(port)
        gw = self.gateway_ip
        local_port = self.ephemeral_port(lambda p: (vm_ip, vm_port, gw, p) in flows.tcp)
        key = (vm_ip, vm_port, gw, local_port)
        bufsize = self.policy.tcp_buffer_size
        conn = TcpConnection.connect(local_port, vm_port, trio.current_time(), iss=random.getrandbits(32),
                                     mss=self.mss, rcv_buffer=bufsize, snd_buffer=bufsize)
        if port.offload:
            conn.tso_mss = TSO_MSS
        info = SocketInfo((socket.inet_ntoa(gw), local_port), (socket.inet_ntoa(vm_ip), vm_port))

        def on_closed() -> None:
            if flows.tcp.get(key) is stream:
                del flows.tcp[key]

        stream = VirtualTcpStream(conn, self._transmitter(port, vm_mac, gw, vm_ip), on_closed=on_closed, socket_info=info)
        flows.tcp[key] = stream
        port.nursery.start_soon(stream.timer_loop)
        stream.flush()
        try:
            with trio.fail_after(timeout):
                await stream.wait_established()
        except (trio.TooSlowError, trio.BrokenResourceError) as exc:
            stream.abort_if_open()
            flows.tcp.pop(key, None)
            refused = isinstance(exc, trio.BrokenResourceError)
            raise OSError(errno.ECONNREFUSED if refused else errno.ETIMEDOUT,
                          f"{socket.inet_ntoa(vm_ip)}:{vm_port} {'refused' if refused else 'did not answer'}") from None
        return port, stream

    def send_udp(self, port: Port, vm_mac: bytes, src_port: int, vm_ip: bytes, vm_port: int, payload: bytes,
                 src_ip: bytes | None = None) -> None:
        """A datagram into a VM (from the gateway IP unless ``src_ip``), fragmented to the MTU if needed."""
        frames = self.gateway.udp_frames(vm_mac, src_ip or self.gateway_ip, src_port, vm_ip, vm_port, payload)
        if frames is None:
            port.counters.drop("udp-too-large")
            return
        for frame in frames:
            self.hs.send_to(port, frame)

    # ---- UDP -----------------------------------------------------------------------------
    def udp_in(self, port: Port, ev: UdpIn) -> None:
        if ev.dst_ip == self.gateway_ip:
            endpoint = self.udp_endpoints.get(ev.dst_port)
            if endpoint is not None:
                endpoint(port, ev)
            elif ev.dst_port == 53 and self.dns is not None:
                flows = self.flows(port)
                if flows.dns_queries >= MAX_DNS_INFLIGHT:
                    port.counters.drop("dns-inflight-limit")  # the resolver retries
                    return
                flows.dns_queries += 1
                port.nursery.start_soon(self._dns_query, port, flows, ev.src_mac, ev.src_ip, ev.src_port,
                                        bytes(ev.payload))
            else:
                port.counters.drop("udp-closed-port")
                self.hs.send_to(port, self.gateway.icmp_unreachable(ev.src_mac, self.gateway_ip, ev.src_ip,
                                                                     icmp.PORT_UNREACH, ev.ip_packet))
            return
        key = (ev.src_ip, ev.src_port, ev.dst_ip, ev.dst_port)
        flows = self.flows(port)
        flow = flows.udp.get(key)
        if flow is None:
            dst, reason = self.policy.destination(ev.dst_ip)
            if dst is None:
                port.counters.drop(f"udp-{reason}")
                if reason != "not-unicast":  # never answer broadcast/multicast with ICMP errors (RFC 1122)
                    self.hs.send_to(port, self.gateway.icmp_unreachable(ev.src_mac, self.gateway_ip, ev.src_ip,
                                                                         icmp.ADMIN_PROHIBITED, ev.ip_packet))
                return
            if len(flows.udp) >= self.policy.max_udp_flows:
                port.counters.drop("udp-flow-limit")
                return
            try:
                flow = UdpFlow(self, port, flows, key, ev.src_mac, (dst, ev.dst_port))
            except OSError as exc:
                port.counters.drop("udp-socket-error")
                log.warning("%r: cannot open a UDP socket for %s:%d: %s", port, dst, ev.dst_port, exc)
                return
            flows.udp[key] = flow
            port.counters.values["udp_flows_total"] += 1
            port.nursery.start_soon(flow.run)
        flow.send(bytes(ev.payload))

    async def _dns_query(self, port: Port, flows: SessionFlows, vm_mac: bytes, vm_ip: bytes, vm_port: int,
                         query: bytes) -> None:
        try:
            reply = await self.dns.handle_udp(query, (socket.inet_ntoa(vm_ip), vm_port))
            if reply:
                self.send_udp(port, vm_mac, 53, vm_ip, vm_port, reply, src_ip=self.gateway_ip)
        except Exception as exc:  # noqa: BLE001 - one query never ends the session
            log.warning("DNS query failed: %s", describe(exc))
        finally:
            flows.dns_queries -= 1

    # ---- ICMP ----------------------------------------------------------------------------
    def icmp_in(self, port: Port, ev: IcmpEchoIn) -> None:
        dst, reason = self.policy.destination(ev.dst_ip)
        if dst is None:
            port.counters.drop(f"icmp-{reason}")
            return
        flows = self.flows(port)
        if flows.pings >= 64:
            port.counters.drop("icmp-limit")
            return
        flows.pings += 1
        port.nursery.start_soon(self._ping, port, flows, ev, dst)

    async def _ping(self, port: Port, flows: SessionFlows, ev: IcmpEchoIn, dst: str) -> None:
        try:
            reply = await ping_once(dst, ev.msg, timeout=5.0)
            if reply is not None:
                frames = self.gateway.ip_frames(ev.src_mac, ev.dst_ip, ev.src_ip, 1,
                                                icmp.build(icmp.IcmpMessage(icmp.ECHO_REPLY, 0, ev.msg.rest, reply)))
                for frame in frames or ():
                    self.hs.send_to(port, frame)
                port.counters.values["icmp_echo_forwarded"] += 1
            else:
                port.counters.drop("icmp-no-reply")
        except OSError as exc:
            port.counters.drop("icmp-error")
            log.debug("ping %s failed: %s", dst, exc)
        finally:
            flows.pings -= 1


async def ping_once(dst: str, msg: icmp.IcmpMessage, timeout: float) -> bytes | None:
    """Send one echo request from the host; return the real reply's payload or None.

    Uses an unprivileged ping socket (Linux: the kernel picks the identifier
    and matches replies); falls back to a raw socket where those are not
    allowed.  Some systems (macOS) include the IP header on either kind, so it
    is stripped whenever present.
    """
    try:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
        raw = False
    except OSError:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        raw = True
    with sock:
        ident = msg.ident if raw else 0
        request = icmp.build(icmp.IcmpMessage(icmp.ECHO_REQUEST, 0, (ident << 16) | msg.seq, msg.payload))
        await sock.sendto(request, (dst, 0))
        with trio.move_on_after(timeout):
            while True:
                data, addr = await sock.recvfrom(65535)
                if addr[0] != dst:
                    continue
                if data and data[0] >> 4 == 4 and len(data) >= 20:  # an IP header first (raw, or macOS)
                    data = data[(data[0] & 0xF) * 4:]
                try:
                    reply = icmp.parse(data)
                except ValueError:
                    continue
                if reply.type == icmp.ECHO_REPLY and reply.seq == msg.seq and (not raw or reply.ident == ident):
                    return bytes(reply.payload)
    return None


async def pipe(a: trio.abc.HalfCloseableStream, b: trio.abc.HalfCloseableStream) -> None:
    """Copy both ways, carrying half-close; returns when both directions end.

    An error in either direction ends both (the caller closes the streams).
    """

    async def one_way(src, dst) -> None:
        while True:
            data = await src.receive_some(PIPE_CHUNK)
            if not data:
                break
            await dst.send_all(data)
        await dst.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one_way, a, b)
        nursery.start_soon(one_way, b, a)


class UdpFlow:
    """One VM (ip, port) -> destination flow, carried by one host UDP socket."""

    def __init__(self, stack: NetStack, port: Port, flows: SessionFlows, key: tuple, vm_mac: bytes,
                 dst: tuple[str, int]) -> None:
        self.stack = stack
        self.port = port
        self.flows = flows
        self.key = key
        self.vm_mac = vm_mac
        self.dst = dst
        # A plain non-blocking socket: sends happen synchronously on the frame
        # path (a full buffer drops, like a network would); receives wait on
        # trio.lowlevel.wait_readable in run().
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.connect(dst)  # UDP connect only sets the peer: no packet, no blocking
        self.last_activity = trio.current_time()

    def send(self, payload: bytes) -> None:
        self.last_activity = trio.current_time()
        try:
            self.sock.send(payload)
        except (BlockingIOError, OSError) as exc:
            self.port.counters.drop("udp-send-error")
            log.debug("udp send to %s failed: %s", self.dst, exc)

    async def run(self) -> None:
        vm_ip, vm_port, virt_dst_ip, virt_dst_port = self.key
        stack = self.stack
        sock = self.sock
        try:
            with sock:
                idle = stack.policy.udp_idle_timeout
                while True:
                    with trio.move_on_at(self.last_activity + idle) as scope:
                        await trio.lowlevel.wait_readable(sock)
                    if scope.cancelled_caught:
                        if trio.current_time() >= self.last_activity + idle:
                            return
                        continue
                    for _ in range(64):  # drain what is queued, bounded
                        try:
                            data = sock.recv(65535)
                        except (BlockingIOError, ConnectionRefusedError):
                            break  # refused: an ICMP error for an earlier send; keep the flow
                        self.last_activity = trio.current_time()
                        stack.send_udp(self.port, self.vm_mac, virt_dst_port, vm_ip, vm_port, data, src_ip=virt_dst_ip)
        except OSError as exc:
            log.debug("udp flow %s failed: %s", self.dst, exc)
        finally:
            if self.flows.udp.get(self.key) is self:
                del self.flows.udp[self.key]
