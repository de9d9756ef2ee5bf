"""Port forwarding: host listeners whose connections are piped into a VM.

Each forward's listener runs in the forwarder's nursery under its own cancel
scope.  A forwarded TCP connection belongs to the session of the VM it goes
to (its task runs in that session's nursery), so it ends with the session, and
also when the forward is removed.  A UDP forward gives each host client a
gateway port in the VM's session that accepts replies only from the forward's
own remote address.
"""

from __future__ import annotations

import errno
import functools
import logging
import socket

import attrs
import trio

from ..aio.tasks import accept_loop, pipe
from ..logs import describe
from ..services.forwarder import Forward
from ..stack.flowtable import FlowTable

log = logging.getLogger("rdswitch.forwarder")

UDP_IDLE = 90.0
UDP_MAX_CLIENTS = 256


class ForwardError(Exception):
    """A forward cannot be made or removed; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@attrs.define
class _Active:
    forward: Forward
    scope: trio.CancelScope
    conn_scopes: set = attrs.field(factory=set)


class Forwarder:
    def __init__(self, hs) -> None:
        self.hs = hs
        self.nat = hs.nat
        self.active: dict[tuple[str, str], _Active] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def all(self) -> list[dict]:
        return [a.forward.as_json() for a in sorted(self.active.values(), key=lambda a: (a.forward.local, a.forward.protocol))]

    async def expose(self, fwd: Forward) -> None:
        current = self.active.get(fwd.key)
        if current is not None:
            if current.forward == fwd:
                return  # idempotent
            raise ForwardError(f"{fwd.local}/{fwd.protocol} is already forwarded to {current.forward.remote}", 409)
        kind = socket.SOCK_STREAM if fwd.protocol == "tcp" else socket.SOCK_DGRAM
        sock = socket.socket(socket.AF_INET, kind)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((fwd.local_ip, fwd.local_port))  # an IP literal: no lookup, never blocks
            if kind == socket.SOCK_STREAM:
                sock.listen(128)
        except OSError as exc:
            sock.close()
            raise ForwardError(f"cannot listen on {fwd.local}/{fwd.protocol}: {exc.strerror or exc}",
                               409 if exc.errno == errno.EADDRINUSE else 400) from None
        active = _Active(fwd, trio.CancelScope())
        self.active[fwd.key] = active
        serve = self._serve_tcp if kind == socket.SOCK_STREAM else self._serve_udp
        self._nursery.start_soon(serve, active, sock)
        log.info("forwarding %s/%s -> %s", fwd.local, fwd.protocol, fwd.remote)

    async def unexpose(self, key: tuple[str, str]) -> None:
        active = self.active.pop(key, None)
        if active is None:
            raise ForwardError(f"{key[0]}/{key[1]} is not forwarded", 404)
        active.scope.cancel()
        for scope in list(active.conn_scopes):
            scope.cancel()
        log.info("stopped forwarding %s/%s", *key)

    async def _serve_tcp(self, active: _Active, sock) -> None:
        with active.scope, sock:
            listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
            async with trio.open_nursery() as nursery:  # holds no connection: each runs in its VM's session
                await accept_loop(listener, functools.partial(self._tcp_accepted, active), nursery,
                                  f"forward {active.forward.local}", log)

    async def _tcp_accepted(self, active: _Active, host_stream) -> None:
        fwd = active.forward
        found = self.hs.session_for(socket.inet_aton(fwd.remote_ip))
        if found is None:
            log.debug("forward %s: no VM holds %s", fwd.local, fwd.remote_ip)
            await host_stream.aclose()
            return
        session, vm_mac = found
        session.nursery.start_soon(self._tcp_conn, active, session, vm_mac, host_stream)

    async def _tcp_conn(self, active: _Active, session, vm_mac: bytes, host_stream) -> None:
        fwd = active.forward
        scope = trio.CancelScope()
        active.conn_scopes.add(scope)
        try:
            with scope:
                async with host_stream:
                    try:
                        vstream = await self.nat.open_tcp(session, vm_mac, socket.inet_aton(fwd.remote_ip),
                                                          fwd.remote_port)
                    except OSError as exc:
                        log.debug("forward %s -> %s: %s", fwd.local, fwd.remote, exc)
                        return
                    try:
                        await pipe(host_stream, vstream)
                    except Exception as exc:  # noqa: BLE001 - one connection's failure is its own
                        log.debug("forward %s -> %s ended: %s", fwd.local, fwd.remote, describe(exc))
                    finally:
                        vstream.abort_if_open()
        finally:
            active.conn_scopes.discard(scope)

    async def _serve_udp(self, active: _Active, sock: socket.socket) -> None:
        """Datagrams from host clients go to the VM from one gateway port per client; replies come back."""
        fwd = active.forward
        nat = self.nat
        vm_ip = socket.inet_aton(fwd.remote_ip)
        # host client address -> (its gateway port in the VM's session, that session)
        clients: FlowTable[tuple, tuple] = FlowTable(UDP_IDLE, UDP_MAX_CLIENTS)

        def replier(addr):
            def on_reply(payload) -> None:
                clients.touch(addr, trio.current_time())
                try:
                    sock.sendto(bytes(payload), addr)  # non-blocking; a full buffer drops
                except OSError:
                    pass
            return on_reply

        try:
            with active.scope, sock:
                while True:
                    with trio.move_on_after(UDP_IDLE / 3):
                        await trio.lowlevel.wait_readable(sock)
                    now = trio.current_time()
                    for _ in range(64):
                        try:
                            data, addr = sock.recvfrom(65535)
                        except (BlockingIOError, ConnectionRefusedError):
                            break
                        found = self.hs.session_for(vm_ip)
                        if found is None:
                            continue
                        session, vm_mac = found
                        entry = clients.get(addr, now)
                        if entry is not None and (entry[1] is not session or not nat.endpoint_alive(entry[0])):
                            clients.remove(addr)  # the VM's session was replaced
                            nat.close_endpoint(entry[0])
                            entry = None
                        if entry is None:
                            entry = (nat.open_endpoint(session, vm_ip, fwd.remote_port, replier(addr)), session)
                            for old_ep, _old_session in clients.add(addr, entry, now):
                                nat.close_endpoint(old_ep)
                        nat.send_udp(session, vm_mac, entry[0].port, vm_ip, fwd.remote_port, data)
                    for ep, _session in clients.expire(now):
                        nat.close_endpoint(ep)
        finally:
            for ep, _session in clients.values():
                nat.close_endpoint(ep)
