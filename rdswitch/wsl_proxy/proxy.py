"""wsl-proxy's trio shell: control socket, per-port listeners, pipes.

Each published port listens on the host IPs its mapping gives ("" = every
address: 0.0.0.0 and ::), like the incumbent; TCP connections and UDP flows
are piped to the upstream (the namespace's veth address) at the same port.

Lifetimes follow the nursery tree:

    Proxy.serve (the proxy's nursery)
      control connections (one task each, bounded)
      one task per forwarded port  -> that port's nursery (its cancel scope is
                                      kept in Proxy.ports; remove cancels it)
          listener tasks (127.0.0.1 and ::1)
          one task per TCP connection: owns the accepted and the upstream socket
          one task per UDP flow: owns its upstream socket; a reaper idles flows out

Every socket is opened by the task that closes it (``with``/``async with``),
so cancelling a port or the proxy is the only teardown path and nothing can
leak.
"""

from __future__ import annotations

import errno
import functools
import logging
import socket as _stdsocket

import attrs
import trio

from ..aio.tasks import accept_loop, pipe
from ..stack.flowtable import FlowTable
from .mapping import Binding, MappingError, MessageFramer, PortMapping, parse_mapping

log = logging.getLogger("rdswitch.wsl_proxy")

#: What a binding without a HostIp listens on: every IPv4 and every IPv6 address.
ANY_ADDRESS = ((_stdsocket.AF_INET, "0.0.0.0"), (_stdsocket.AF_INET6, "::"))
#: The receive buffer asked for on each published UDP port (the incumbent's -udpBuffer default):
#: room for a burst; beyond it the kernel drops, so a flood never grows our memory.
DEFAULT_UDP_BUFFER = 8 << 20
CONTROL_READ_TIMEOUT = 10.0
MAX_CONTROL_CONNECTIONS = 32
CONNECT_TIMEOUT = 15.0
BUFSIZE = 65536
BACKLOG = 128
#: A UDP flow (client address -> its own upstream socket) closes after this
#: many seconds without a datagram either way ...
DEFAULT_IDLE_TIMEOUT = 60.0
#: ... and a port has at most this many; a new one evicts the least recently used.
DEFAULT_MAX_FLOWS = 256

# errors a UDP socket reports for an earlier datagram (ICMP): not fatal
_TRANSIENT_UDP_ERRORS = {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EMSGSIZE, errno.ENOBUFS, errno.ENOMEM}


class PortUnavailable(Exception):
    """A localhost port could not be bound; str() is for the log."""


@attrs.define(eq=False)
class PortEntry:
    binding: Binding
    addresses: list[str]
    scope: trio.CancelScope | None = None
    done: trio.Event = attrs.field(factory=trio.Event)
    connections: int = 0  # open TCP pipes / UDP flows, for the log and tests


@attrs.define(eq=False)
class UdpFlow:
    sock: trio.socket.SocketType
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)


class Proxy:
    def __init__(
        self,
        upstream: str = "192.168.143.1",
        udp_idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        udp_max_flows: int = DEFAULT_MAX_FLOWS,
        any_address=ANY_ADDRESS,
        udp_buffer: int = DEFAULT_UDP_BUFFER,
    ):
        self.upstream = upstream
        self.udp_idle_timeout = udp_idle_timeout
        self.udp_max_flows = udp_max_flows
        self.any_address = any_address
        self.udp_buffer = udp_buffer
        self.ports: dict[tuple[str, int], PortEntry] = {}
        self._lock = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self._control_limit = trio.CapacityLimiter(MAX_CONTROL_CONNECTIONS)

    # ---- control socket -------------------------------------------------

    async def serve(self, listener: trio.abc.Listener, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve control connections on ``listener`` until cancelled; cancelling
        closes every forwarded port and its connections."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                task_status.started()
                async with listener:
                    await accept_loop(listener, self._control_connection, nursery, "control socket", log)
            finally:
                nursery.cancel_scope.cancel()
                self.ports.clear()

    async def _control_connection(self, stream: trio.abc.Stream) -> None:
        async with stream:
            async with self._control_limit:
                try:
                    data = await self._read_message(stream)
                except MappingError as exc:
                    log.error("rejected port mapping: %s", exc)
                    return
                except trio.TooSlowError:
                    log.error("rejected port mapping: no complete JSON message within %gs", CONTROL_READ_TIMEOUT)
                    return
                except (trio.BrokenResourceError, OSError) as exc:
                    log.error("control connection failed: %s", exc)
                    return
                try:
                    mapping = parse_mapping(data)
                except MappingError as exc:
                    log.error("rejected port mapping: %s (message %r)", exc, _preview(data))
                    return
                log.debug("port mapping: %s", mapping)
                await self.apply(mapping)

    async def _read_message(self, stream: trio.abc.Stream) -> bytes:
        framer = MessageFramer()
        with trio.fail_after(CONTROL_READ_TIMEOUT):
            while True:
                chunk = await stream.receive_some(BUFSIZE)
                if not chunk:
                    return framer.eof()
                msg = framer.feed(chunk)
                if msg is not None:
                    return msg

    async def apply(self, mapping: PortMapping) -> None:
        """Add or remove every binding of ``mapping``; returns once listeners are
        bound (add) or closed along with their connections (remove)."""
        for err in mapping.errors:
            log.error("rejected port binding: %s", err)
        async with self._lock:
            for b in mapping.bindings:
                if mapping.remove:
                    await self.remove_port(b)
                else:
                    await self.add_port(b)

    # ---- ports ------------------------------------------------------------

    async def add_port(self, b: Binding) -> bool:
        assert self._nursery is not None, "Proxy.serve is not running"
        if b.key in self.ports:
            log.debug("already forwarding %s", b)
            return True
        try:
            socks = await self._bind(b)
        except PortUnavailable as exc:
            log.error("cannot forward %s: %s", b, exc)
            return False
        entry = PortEntry(b, [a for a, _ in socks])
        await self._nursery.start(self._run_port, entry, socks)
        self.ports[b.key] = entry
        log.info("forwarding %s on %s to %s:%s", b, ", ".join(entry.addresses), self.upstream, b.host_port)
        return True

    async def remove_port(self, b: Binding) -> bool:
        entry = self.ports.pop(b.key, None)
        if entry is None:
            log.info("remove %s: not forwarded; nothing to do", b)
            return False
        assert entry.scope is not None
        entry.scope.cancel()
        with trio.move_on_after(10):
            await entry.done.wait()
        log.info("stopped forwarding %s", b)
        return True

    def addresses(self, b: Binding) -> list[tuple[int, str]]:
        """(family, address) for each host IP of ``b``; "" stands for every address."""
        out: list[tuple[int, str]] = []
        for ip in b.host_ips or ("",):
            for item in (self.any_address if ip == "" else ((_stdsocket.AF_INET6 if ":" in ip else _stdsocket.AF_INET, ip),)):
                if item not in out:
                    out.append(item)
        return out

    async def _bind(self, b: Binding) -> list[tuple[str, trio.socket.SocketType]]:
        """Bind every host IP of the binding; all or nothing for 'in use'."""
        kind = trio.socket.SOCK_STREAM if b.protocol == "tcp" else trio.socket.SOCK_DGRAM
        socks: list[tuple[str, trio.socket.SocketType]] = []
        try:
            for family, host in self.addresses(b):
                try:
                    sock = trio.socket.socket(family, kind)
                except OSError as exc:
                    log.debug("no %s on this host (%s); skipping it for %s", host, exc.strerror, b)
                    continue
                try:
                    if kind == trio.socket.SOCK_STREAM:
                        # lets a removed port be re-added at once; an active
                        # listener still makes bind fail with EADDRINUSE
                        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
                    else:
                        _udp_buffer(sock, self.udp_buffer)
                    if family == trio.socket.AF_INET6:
                        sock.setsockopt(trio.socket.IPPROTO_IPV6, trio.socket.IPV6_V6ONLY, 1)
                    await sock.bind((host, b.host_port))
                    if kind == trio.socket.SOCK_STREAM:
                        sock.listen(BACKLOG)
                except OSError as exc:
                    sock.close()
                    if family == trio.socket.AF_INET6 and exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                        log.debug("%s unavailable (%s); %s on IPv4 only", host, exc.strerror, b)
                        continue
                    if exc.errno == errno.EADDRINUSE:
                        raise PortUnavailable(f"port {b.host_port}/{b.protocol} is already in use on {host}") from None
                    raise PortUnavailable(f"cannot bind {host} port {b.host_port}/{b.protocol}: {exc.strerror or exc}") from None
                socks.append((host, sock))
            if not socks:
                raise PortUnavailable("none of its addresses could be bound")
        except BaseException:
            for _, s in socks:
                s.close()
            raise
        return socks

    async def _run_port(self, entry: PortEntry, socks, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                entry.scope = nursery.cancel_scope
                for host, sock in socks:
                    if entry.binding.protocol == "tcp":
                        nursery.start_soon(self._tcp_listener, entry, host, sock, nursery)
                    else:
                        nursery.start_soon(self._udp_listener, entry, host, sock, nursery)
                task_status.started()
        finally:
            for _, sock in socks:  # normally closed by their listener tasks already
                sock.close()
            if self.ports.get(entry.binding.key) is entry:
                del self.ports[entry.binding.key]  # its listeners died: a later add must bind again
            entry.done.set()

    # ---- TCP ---------------------------------------------------------------

    async def _tcp_listener(self, entry: PortEntry, host: str, sock, nursery: trio.Nursery) -> None:
        async with trio.SocketListener(sock) as listener:
            try:
                await accept_loop(listener, functools.partial(self._tcp_pipe, entry), nursery,
                                  f"{entry.binding} on {host}", log)
            except OSError as exc:  # not transient: this listener is broken; the port's other listener goes on
                log.error("%s on %s: listener failed: %s", entry.binding, host, exc)

    async def _tcp_pipe(self, entry: PortEntry, client: trio.SocketStream) -> None:
        entry.connections += 1
        try:
            async with client:
                port = entry.binding.host_port
                try:
                    with trio.fail_after(CONNECT_TIMEOUT):
                        upstream = await trio.open_tcp_stream(self.upstream, port)
                except (OSError, trio.TooSlowError) as exc:
                    log.warning("%s: cannot reach upstream %s:%s: %s", entry.binding, self.upstream, port, exc or "timeout")
                    return
                async with upstream:
                    try:
                        await pipe(client, upstream, BUFSIZE)
                    except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as group:
                        # a reset or a closed end: both directions are over; the proxy goes on
                        log.debug("%s: connection ended: %s", entry.binding, group.exceptions[0])
        finally:
            entry.connections -= 1

    # ---- UDP ---------------------------------------------------------------

    async def _udp_listener(self, entry: PortEntry, host: str, sock, nursery: trio.Nursery) -> None:
        table: FlowTable = FlowTable(self.udp_idle_timeout, self.udp_max_flows)
        port = entry.binding.host_port
        with sock:
            nursery.start_soon(self._udp_reaper, table)
            while True:
                try:
                    data, addr = await sock.recvfrom(BUFSIZE)
                except OSError as exc:
                    if exc.errno in _TRANSIENT_UDP_ERRORS:
                        continue
                    log.error("%s on %s: listener failed: %s", entry.binding, host, exc)
                    return
                now = trio.current_time()
                flow = table.get(addr, now)
                if flow is None:
                    try:
                        usock = await self._udp_connect(port)
                    except OSError as exc:
                        log.warning("%s: cannot reach upstream %s:%s: %s", entry.binding, self.upstream, port, exc)
                        continue
                    flow = UdpFlow(usock)
                    for old in table.add(addr, flow, now):
                        old.scope.cancel()
                    nursery.start_soon(self._udp_flow, entry, table, sock, addr, flow)
                try:
                    await flow.sock.send(data)
                except OSError as exc:  # e.g. ICMP port unreachable from an earlier datagram
                    log.debug("%s: send upstream: %s", entry.binding, exc)

    async def _udp_connect(self, port: int):
        infos = await trio.socket.getaddrinfo(self.upstream, port, type=trio.socket.SOCK_DGRAM)
        if not infos:
            raise OSError(f"cannot resolve {self.upstream}")
        family, type_, proto, _, addr = infos[0]
        usock = trio.socket.socket(family, type_, proto)
        try:
            await usock.connect(addr)
        except BaseException:
            usock.close()
            raise
        return usock

    async def _udp_flow(self, entry: PortEntry, table: FlowTable, lsock, addr, flow: UdpFlow) -> None:
        entry.connections += 1
        try:
            with flow.sock, flow.scope:
                while True:
                    try:
                        data = await flow.sock.recv(BUFSIZE)
                    except OSError as exc:
                        if exc.errno in _TRANSIENT_UDP_ERRORS:  # ICMP unreachable: keep the flow
                            continue
                        log.debug("%s: upstream recv: %s; closing flow", entry.binding, exc)
                        return
                    table.touch(addr, trio.current_time())
                    try:
                        await lsock.sendto(data, addr)
                    except OSError as exc:
                        log.debug("%s: reply to %s: %s", entry.binding, addr, exc)
        finally:
            table.remove(addr, flow)
            entry.connections -= 1

    async def _udp_reaper(self, table: FlowTable) -> None:
        interval = max(0.05, min(self.udp_idle_timeout / 4, 5.0))
        while True:
            await trio.sleep(interval)
            for flow in table.expire(trio.current_time()):
                flow.scope.cancel()


def _udp_buffer(sock, size: int) -> None:
    """Ask for a ``size``-byte receive buffer: past net.core.rmem_max when we may (root), else up to it."""
    for opt in (getattr(_stdsocket, "SO_RCVBUFFORCE", None), _stdsocket.SO_RCVBUF):
        if opt is None:
            continue
        try:
            sock.setsockopt(_stdsocket.SOL_SOCKET, opt, size)
            return
        except OSError:
            continue


def _preview(data: bytes, limit: int = 80) -> bytes:
    return data if len(data) <= limit else data[:limit] + b"..."
