"""The NAT's trio shell: carries out what the sans-IO :class:`~rdswitch.stack.nat.NatCore` decides.

It dials the host for a VM's SYN, pipes an accepted flow between its host
socket and a :class:`~rdswitch.aio.tcp_stream.VirtualTcpStream`, opens and
reads the host UDP socket of each UDP flow, sends the host's echo requests,
answers DNS queries and starts the gateway's own TCP services (DNS over TCP,
the API) on their connections.  Every task it starts for a VM is a child of
that VM's session nursery, so the session's end ends them all.  It decides
nothing on its own: every "may this flow exist" lives in the core.
"""

from __future__ import annotations

import argparse
import errno
import functools
import logging
import socket
from typing import Awaitable, Callable

import trio

from ..aio.tcp_stream import SocketInfo, VirtualTcpStream
from ..logs import describe
from ..stack import nat as core_mod
from ..stack.nat import NatCore, TcpFlow, UdpEndpoint, UdpFlow
from .bridge import HostBridge
from .ping import PING_TIMEOUT, Pinger, ping_once
from .session import Session

log = logging.getLogger("rdswitch.nat")

#: A local service: an async handler of one connection (DNS over TCP, the API).
Handler = Callable[[VirtualTcpStream], Awaitable[None]]


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


class NatShell:
    def __init__(self, core: NatCore, *, dns=None) -> None:
        self.core = core
        self.dns = dns
        self.sessions: dict[int, Session] = {}
        self.services: dict[int, Handler] = {}
        self.pingers: dict[int, Pinger | None] = {}  # session id -> its ping socket (None: raw sockets)

    def add_local_service(self, port: int, handler: Handler) -> None:
        """Serve TCP ``port`` on the gateway IP inside the network; each connection runs in its VM's session."""
        if port in self.services:
            raise ValueError(f"gateway port {port} is already in use")
        self.services[port] = handler
        self.core.add_local_service(port)

    # ---- sessions --------------------------------------------------------------------------
    def session_opened(self, session: Session) -> None:
        self.sessions[session.id] = session
        self.core.open_session(session.id, session.counters)

    def session_closed(self, session: Session) -> None:
        """Forget the session's flows; reset their streams (their tasks end with the session nursery)."""
        self.sessions.pop(session.id, None)
        self.pingers.pop(session.id, None)  # its task ends with the session nursery
        for flow in self.core.close_session(session.id):
            if isinstance(flow.handle, VirtualTcpStream):
                flow.handle.abort_if_open()

    # ---- the frame path ------------------------------------------------------------------------
    def handle(self, session: Session, event, now: float) -> None:
        """One gateway event of ``session``'s VM (sync, on the frame path): decide, then act."""
        for action in self.core.handle(session.id, event, now):
            try:
                self._act(session, action, now)
            except Exception:  # noqa: BLE001 - a bug in one flow must not end the session
                session.counters.drop("nat-error")
                log.exception("%r: error carrying out %s", session, type(action).__name__)

    def flush(self, now: float) -> None:
        """Once per batch of frames: the flows fed segments answer (one ACK per flow, not per segment)."""
        if self.core.dirty:
            for flow in self.core.take_dirty():
                handle = flow.handle
                if type(handle) is HostBridge:
                    handle.to_host(now)  # the VM's bytes to the host socket, inline
                elif handle is not None:
                    handle.flush()  # a VirtualTcpStream: wake its reader, send its ACK

    def _act(self, session: Session, action, now: float) -> None:
        kind = type(action)
        if kind is core_mod.UdpSend:
            self._udp_send(session, action.flow, action.payload)
        elif kind is core_mod.Dial:
            self._dial(session, action.flow, now)
        elif kind is core_mod.CancelDial:
            scope = action.flow.handle
            if isinstance(scope, trio.CancelScope):
                scope.cancel()
        elif kind is core_mod.StartLocal:
            self._start_local(session, action.flow, action.port)
        elif kind is core_mod.UdpOpen:
            self._udp_open(session, action.flow)
        elif kind is core_mod.UdpClose and action.flow.handle is not None:  # evicted: _udp_flow ends
            trio.lowlevel.notify_closing(action.flow.handle)
            action.flow.handle.close()
        elif kind is core_mod.ToEndpoint:
            action.endpoint.handle(action.payload)
        elif kind is core_mod.DnsQuery:
            if self.dns is None:
                self.core.dns_done(action.sid)
            else:
                session.nursery.start_soon(self._dns_query, action)
        elif kind is core_mod.Ping:
            self._ping(session, action, now)
        elif kind is core_mod.OffloadChanged:
            log.info("%r: offload %s (partial checksums, %d-byte TCP segments)", session,
                     "on" if action.offload else "off", core_mod.TSO_MSS)

    # ---- TCP ------------------------------------------------------------------------------------
    def _stream(self, flow: TcpFlow) -> VirtualTcpStream:
        vm_ip, vm_port, local_ip, local_port = flow.key
        info = SocketInfo((socket.inet_ntoa(local_ip), local_port), (socket.inet_ntoa(vm_ip), vm_port),
                          session=flow.sid)
        stream = VirtualTcpStream(flow.conn, functools.partial(self.core.transmit, flow),
                                  on_closed=functools.partial(self.core.flow_closed, flow), socket_info=info)
        flow.handle = stream
        return stream

    def _start_local(self, session: Session, flow: TcpFlow, port: int) -> None:
        stream = self._stream(flow)
        stream.flush()  # the SYN-ACK
        session.nursery.start_soon(self._serve_local, session, stream, self.services[port])

    async def _serve_local(self, session: Session, stream: VirtualTcpStream, handler: Handler) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream.timer_loop)
                try:
                    await handler(stream)
                finally:
                    nursery.cancel_scope.cancel()
        except Exception as exc:  # noqa: BLE001 - one connection never ends another
            log.debug("%r: local service connection ended: %s", session, describe(exc))
        finally:
            stream.abort_if_open()

    def _dial(self, session: Session, flow: TcpFlow, now: float) -> None:
        """Connect to the host for a VM's SYN: inline when the kernel completes it at once (loopback
        often does), otherwise in a task of the session; the VM hears SYN-ACK or RST only then."""
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError as exc:
            log.warning("%r: cannot open a socket for %s:%d: %s", session, *flow.dst, exc)
            self.core.dial_done(flow, "failed", now)
            return
        sock.setblocking(False)
        err = sock.connect_ex(flow.dst)
        if err == errno.EINPROGRESS:
            # Linux says EINPROGRESS even when the kernel finished the handshake (or was
            # refused) inside the call, as it does on loopback: look before waiting.
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or self._connected_now(sock)
        if err == 0:
            bridge = self._connected(session, flow, sock, now)
            if bridge is not None:
                session.nursery.start_soon(self._run_bridge, session, flow, bridge)
        elif err in (errno.EINPROGRESS, errno.EAGAIN):
            flow.handle = trio.CancelScope()  # cancelled by CancelDial
            session.nursery.start_soon(self._tcp_flow, session, flow, sock)
        else:
            sock.close()
            log.debug("%r: dial %s:%d failed: %s", session, *flow.dst, errno.errorcode.get(err, err))
            self.core.dial_done(flow, "refused" if err == errno.ECONNREFUSED else "failed", now)

    @staticmethod
    def _connected_now(sock: socket.socket) -> int:
        try:
            sock.getpeername()
        except OSError:
            return errno.EINPROGRESS
        return 0

    def _connected(self, session: Session, flow: TcpFlow, sock: socket.socket, now: float) -> HostBridge | None:
        conn = self.core.dial_done(flow, None, now)
        if conn is None:  # the VM gave up meanwhile, or its session is gone
            sock.close()
            return None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # the VM's stack already decided when to send
        except OSError:
            pass
        bridge = HostBridge(conn, sock, functools.partial(self.core.transmit, flow), session.counters)
        flow.handle = bridge
        bridge.sync()  # the SYN-ACK
        return bridge

    async def _tcp_flow(self, session: Session, flow: TcpFlow, sock: socket.socket) -> None:
        """Finish a dial that did not complete at once, then serve the flow."""
        scope: trio.CancelScope = flow.handle
        failure = "timeout"
        try:
            with scope, trio.move_on_after(self.core.policy.connect_timeout):
                await trio.lowlevel.wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                failure = None if err == 0 else ("refused" if err == errno.ECONNREFUSED else "failed")
                if err:
                    log.debug("%r: dial %s:%d failed: %s", session, *flow.dst, errno.errorcode.get(err, err))
        except BaseException:
            sock.close()
            raise
        if scope.cancelled_caught:
            failure = "abandoned"
        now = trio.current_time()
        if failure is not None:
            sock.close()
            self.core.dial_done(flow, failure, now)
            return
        bridge = self._connected(session, flow, sock, now)
        if bridge is not None:
            await self._run_bridge(session, flow, bridge)

    async def _run_bridge(self, session: Session, flow: TcpFlow, bridge: HostBridge) -> None:
        counters = session.counters.values
        counters["tcp_flows_open"] += 1
        try:
            await bridge.run()
        except Exception as exc:  # noqa: BLE001 - one flow's failure never ends another
            log.debug("%r: flow %s:%d ended: %s", session, *flow.dst, describe(exc))
        finally:
            counters["tcp_flows_open"] -= 1
            self.core.flow_closed(flow)

    async def open_tcp(self, session: Session, vm_mac: bytes, vm_ip: bytes, vm_port: int, *,
                       timeout: float = 10.0) -> VirtualTcpStream:
        """A virtual TCP connection from the gateway IP into a VM (port forwarding).

        Its timer runs in the session nursery, so it dies with the session.
        Raises OSError when the VM refuses or does not answer.
        """
        flow = self.core.connect_to_vm(session.id, vm_mac, vm_ip, vm_port, trio.current_time())
        stream = self._stream(flow)
        session.nursery.start_soon(stream.timer_loop)
        stream.flush()
        try:
            with trio.fail_after(timeout):
                await stream.wait_established()
        except (trio.TooSlowError, trio.BrokenResourceError) as exc:
            stream.abort_if_open()
            self.core.flow_closed(flow)
            refused = isinstance(exc, trio.BrokenResourceError)
            raise OSError(errno.ECONNREFUSED if refused else errno.ETIMEDOUT,
                          f"{socket.inet_ntoa(vm_ip)}:{vm_port} {'refused' if refused else 'did not answer'}") from None
        return stream

    # ---- UDP ------------------------------------------------------------------------------------
    def _udp_open(self, session: Session, flow: UdpFlow) -> None:
        # A plain non-blocking socket: sends happen synchronously on the frame
        # path (a full buffer drops, like a network would); receives wait on
        # trio.lowlevel.wait_readable in _udp_flow.
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        except OSError as exc:
            session.counters.drop("udp-socket-error")
            log.warning("%r: cannot open a UDP socket for %s:%d: %s", session, *flow.dst, exc)
            self.core.udp_closed(flow)
            return
        try:
            sock.setblocking(False)
            sock.connect(flow.dst)  # UDP connect only sets the peer: no packet, no blocking
        except OSError as exc:
            sock.close()
            session.counters.drop("udp-socket-error")
            log.debug("%r: UDP flow to %s:%d: %s", session, *flow.dst, exc)
            self.core.udp_closed(flow)
            return
        flow.handle = sock
        session.nursery.start_soon(self._udp_flow, session, flow)

    def _udp_send(self, session: Session, flow: UdpFlow, payload) -> None:
        sock = flow.handle
        if sock is None:
            return
        try:
            sock.send(payload)
        except OSError as exc:  # BlockingIOError included: a full buffer drops
            session.counters.drop("udp-send-error")
            log.debug("udp send to %s failed: %s", flow.dst, exc)

    async def _udp_flow(self, session: Session, flow: UdpFlow) -> None:
        core = self.core
        sock: socket.socket = flow.handle
        idle = core.policy.udp_idle_timeout
        try:
            with sock:
                while sock.fileno() != -1:  # -1: closed by UdpClose (evicted) while this task was not waiting
                    # One scope per idle period, not per datagram: activity moves last_activity
                    # on, and the scope firing early costs one check, not a re-arm per datagram.
                    with trio.CancelScope(deadline=flow.last_activity + idle):
                        while sock.fileno() != -1:
                            await trio.lowlevel.wait_readable(sock)
                            now = trio.current_time()
                            for _ in range(64):  # drain what is queued, bounded
                                try:
                                    data = sock.recv(65535)
                                except (BlockingIOError, ConnectionRefusedError):
                                    break  # refused: an ICMP error for an earlier send; keep the flow
                                core.udp_reply(flow, data, now)
                    if core.udp_expired(flow, trio.current_time()):
                        return
        except (OSError, trio.ClosedResourceError) as exc:  # closed: evicted (UdpClose)
            log.debug("udp flow %s failed: %s", flow.dst, exc)
        finally:
            flow.handle = None
            core.udp_closed(flow)

    def open_endpoint(self, session: Session, remote_ip: bytes, remote_port: int,
                      on_datagram: Callable[[bytes | memoryview], None]) -> UdpEndpoint:
        """A gateway UDP port in ``session`` whose datagrams from ``remote_ip:remote_port`` go to ``on_datagram``."""
        ep = self.core.open_endpoint(session.id, remote_ip, remote_port)
        ep.handle = on_datagram
        return ep

    def close_endpoint(self, ep: UdpEndpoint) -> None:
        self.core.close_endpoint(ep)

    def endpoint_alive(self, ep: UdpEndpoint) -> bool:
        state = self.core.sessions.get(ep.sid)
        return state is not None and state.endpoints.get(ep.port) is ep

    def send_udp(self, session: Session, vm_mac: bytes, src_port: int, vm_ip: bytes, vm_port: int, payload) -> None:
        """A datagram from the gateway IP into a VM (fragmented to the MTU if needed)."""
        self.core.udp_to_vm(session.id, vm_mac, src_port, vm_ip, vm_port, payload)

    # ---- DNS and ICMP -----------------------------------------------------------------------------
    async def _dns_query(self, q: core_mod.DnsQuery) -> None:
        try:
            reply = await self.dns.handle_udp(q.query, (socket.inet_ntoa(q.vm_ip), q.vm_port))
            if reply:
                self.core.udp_to_vm(q.sid, q.vm_mac, 53, q.vm_ip, q.vm_port, reply)
        except Exception as exc:  # noqa: BLE001 - one query never ends the session
            log.warning("DNS query failed: %s", describe(exc))
        finally:
            self.core.dns_done(q.sid)

    def _ping(self, session: Session, ping: core_mod.Ping, now: float) -> None:
        pinger = self.pingers.get(session.id)
        if pinger is None and session.id not in self.pingers:
            pinger = self.pingers[session.id] = Pinger.open(self.core)
            if pinger is not None:
                session.nursery.start_soon(pinger.run)
        if pinger is not None:
            pinger.send(ping, now)
        else:
            session.nursery.start_soon(self._raw_ping, ping)

    async def _raw_ping(self, ping: core_mod.Ping) -> None:
        failure = None
        try:
            reply = await ping_once(ping.dst, ping.msg, timeout=PING_TIMEOUT)
            if reply is None:
                failure = "no-reply"
            else:
                self.core.ping_reply(ping, reply)
        except OSError as exc:
            failure = "error"
            log.debug("ping %s failed: %s", ping.dst, exc)
        finally:
            self.core.ping_done(ping, failure)
