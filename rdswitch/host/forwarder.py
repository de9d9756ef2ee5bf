"""Port forwarding: host listeners whose connections are piped into a VM.

Each forward's listener runs in the forwarder's nursery under its own cancel
scope.  A forwarded TCP connection belongs to the session of the VM it goes
to (its task runs in that session's nursery), so it ends with the session, and
also when the forward is removed.  A UDP forward gives each host client a
gateway port in the VM's session that accepts replies only from the forward's
own remote address.

Every forward records who made it (:class:`~rdswitch.services.policy.Caller`:
the host, or a VM's IP and session).  A VM's requests are admitted by the VM
policy (``services/policy.py``) before anything is bound and once more right
before the forward is committed, with no await in between, so a limit holds
however many requests race; a VM's unix socket is made by
``connect.listen_unix_within`` (no symlink followed, nothing replaced).
"""

from __future__ import annotations

import errno
import functools
import logging
import socket
from typing import Callable

import attrs
import trio

from ..aio import connect
from ..aio.tasks import accept_loop, pipe
from ..config import ConfigError
from ..logs import describe
from ..services.forwarder import Forward
from ..services.policy import HOST, Caller, PolicyRefused, Refusal, is_localhost
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
    owner: Caller = HOST
    conn_scopes: set = attrs.field(factory=set)
    closed: trio.Event = attrs.field(factory=trio.Event)  # its listeners are closed (and socket file removed)


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
        """The forwards as the API lists them: gvisor-tap-vsock's three fields, and who made each."""
        return [{**a.forward.as_json(), "owner": a.owner.owner}
                for a in sorted(self.active.values(), key=lambda a: (a.forward.local, a.forward.protocol))]

    def owners(self) -> dict[tuple[str, str], str]:
        """The key of every live forward -> its owner (``"host"`` or a VM's IP)."""
        return {key: a.owner.owner for key, a in self.active.items()}

    def _existing(self, fwd: Forward) -> bool:
        """True if this very forward exists (a repeat is a no-op); ForwardError 409 if another holds its key."""
        current = self.active.get(fwd.key)
        if current is None:
            return False
        if current.forward == fwd:
            return True
        raise ForwardError(f"{fwd.local}/{fwd.protocol} is already forwarded to {current.forward.remote}", 409)

    async def expose(self, fwd: Forward, owner: Caller = HOST, *, admit: Callable[[], Refusal | None] | None = None,
                     within: tuple[str, tuple[str, ...]] | None = None) -> None:
        """Listen for ``fwd`` on behalf of ``owner``.

        ``admit`` is asked right before the forward is committed (a refusal:
        PolicyRefused, and what was bound is closed again); ``within`` is where
        a VM's unix socket goes (the allowed directory, the components below it).
        """
        if self._existing(fwd):
            return
        if fwd.protocol == "unix":
            listeners = [await self._listen_unix(fwd, within)]
            socks = []
        else:
            socks = await self._bind(fwd)
            listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in socks] \
                if fwd.protocol == "tcp" else []
        try:
            again = self._existing(fwd)  # the same key may have been exposed while we resolved or bound
            refusal = None if again or admit is None else admit()  # and the state may have changed meanwhile
        except ForwardError:
            await _discard(listeners, socks)
            raise
        if again or refusal is not None:
            await _discard(listeners, socks)
            if refusal is not None:
                raise PolicyRefused(refusal)
            return
        active = _Active(fwd, trio.CancelScope(), owner)
        self.active[fwd.key] = active
        self._nursery.start_soon(self._run, active, listeners, socks)
        log.info("forwarding %s/%s -> %s for %s", fwd.local, fwd.protocol, fwd.remote, owner.owner)

    async def _listen_unix(self, fwd: Forward, within: tuple[str, tuple[str, ...]] | None):
        """A socket file (mode 0600; a stale one replaced, a live one or a non-socket refused; removed at close).

        ``within`` (a VM's request): made below that directory without following
        a symlink, and never over an existing name, stale sockets included.
        """
        if within is not None:
            try:
                return connect.listen_unix_within(*within)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise PolicyRefused(Refusal("vm-expose-unix-dir", f"{fwd.local}: a symlink or a non-directory "
                                                                      f"is on the way below {within[0]}")) from None
                if exc.errno in (errno.EADDRINUSE, errno.EEXIST):
                    raise ForwardError(f"cannot listen on {fwd.local}: the name exists (a VM never replaces a "
                                       "file or socket)", 409) from None
                raise ForwardError(f"cannot listen on {fwd.local}: {exc.strerror or exc}", 400) from None
        try:
            return await connect.listen_stream("unix://" + fwd.local_host)
        except (ConfigError, OSError) as exc:
            status = 409 if isinstance(exc, ConfigError) or exc.errno == errno.EADDRINUSE else 400
            raise ForwardError(f"cannot listen on {fwd.local}: {getattr(exc, 'strerror', None) or exc}", status) from None

    async def _addresses(self, fwd: Forward, kind: int) -> list[tuple[int, tuple, bool]]:
        """(family, socket address, required) to bind for the forward's local host."""
        host, port = fwd.local_host, fwd.local_port
        if host in ("", "::"):
            return [(socket.AF_INET6, ("::", port, 0, 0), True)]  # dual-stack (IPv4 too)
        if is_localhost(host):  # both loopbacks, whatever /etc/hosts says
            return [(socket.AF_INET, ("127.0.0.1", port), True), (socket.AF_INET6, ("::1", port, 0, 0), False)]
        try:  # numeric hosts are answered at once; names by the host's resolver in a thread
            infos = await trio.socket.getaddrinfo(host, port, type=kind)
        except OSError as exc:
            raise ForwardError(f"cannot listen on {fwd.local}: {host}: {exc.strerror or exc}", 400) from None
        out = []
        for family, _type, _proto, _canon, addr in infos:
            if family in (socket.AF_INET, socket.AF_INET6) and (family, addr, True) not in out:
                out.append((family, addr, True))
        if not out:
            raise ForwardError(f"cannot listen on {fwd.local}: {host} has no IP address", 400)
        return out

    async def _bind(self, fwd: Forward) -> list[socket.socket]:
        kind = socket.SOCK_STREAM if fwd.protocol == "tcp" else socket.SOCK_DGRAM
        socks: list[socket.socket] = []
        try:
            for family, addr, required in await self._addresses(fwd, kind):
                try:
                    socks.append(_bound(family, kind, addr))
                except OSError as exc:
                    if exc.errno not in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                        raise
                    if addr[0] == "::":  # no IPv6 on this host: every IPv4 address
                        socks.append(_bound(socket.AF_INET, kind, ("0.0.0.0", addr[1])))
                    elif required:
                        raise
                    # an optional address (localhost's ::1) this host does not have
        except OSError as exc:
            for sock in socks:
                sock.close()
            raise ForwardError(f"cannot listen on {fwd.local}/{fwd.protocol}: {exc.strerror or exc}",
                               409 if exc.errno == errno.EADDRINUSE else 400) from None
        return socks

    async def unexpose(self, key: tuple[str, str], admit: Callable[[str], Refusal | None] | None = None) -> None:
        """Remove a forward; ``admit(owner)`` may refuse it (PolicyRefused) for the caller."""
        active = self.active.get(key)
        if active is None:
            raise ForwardError(f"{key[0]}/{key[1]} is not forwarded", 404)
        refusal = admit(active.owner.owner) if admit is not None else None
        if refusal is not None:
            raise PolicyRefused(refusal)
        self._remove(key)
        with trio.move_on_after(5):  # answer once the port is free and the socket file gone
            await active.closed.wait()
        log.info("stopped forwarding %s/%s", *key)

    def _remove(self, key: tuple[str, str]) -> _Active:
        active = self.active.pop(key)
        active.scope.cancel()
        for scope in list(active.conn_scopes):
            scope.cancel()
        return active

    def session_ended(self, session: int, keep: bool) -> None:
        """A VM's session is over: its forwards go (logged), or stay when ``keep`` (--vm-forwards-outlive-session)."""
        for key, active in list(self.active.items()):
            if active.owner.session != session:
                continue
            if keep:
                log.info("keeping %s/%s of %s after its session ended", *key, active.owner.owner)
            else:
                self._remove(key)
                log.info("removed %s/%s of %s: its session ended", *key, active.owner.owner)

    async def _run(self, active: _Active, listeners: list, socks: list[socket.socket]) -> None:
        """Serve the forward's listeners (TCP, unix) or sockets (UDP) until it is removed."""
        try:
            with active.scope:
                async with trio.open_nursery() as nursery:
                    for listener in listeners:
                        nursery.start_soon(self._serve_stream, active, listener)
                    if not listeners:
                        for sock in socks:
                            nursery.start_soon(self._serve_udp, active, sock)
        finally:
            await _discard(listeners, socks)
            active.closed.set()

    async def _serve_stream(self, active: _Active, listener) -> None:
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
            with sock:
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


def _bound(family: int, kind: int, addr: tuple) -> socket.socket:
    """A non-blocking socket bound to an address (listening if a stream); ``::`` takes IPv4 too."""
    sock = socket.socket(family, kind)
    try:
        sock.setblocking(False)
        if kind == socket.SOCK_STREAM:  # (for UDP it would let two forwards share a port)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if addr[0] == "::" else 1)
        sock.bind(addr)
        if kind == socket.SOCK_STREAM:
            sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


async def _discard(listeners: list, socks: list[socket.socket]) -> None:
    """Close listeners (a unix one removes its socket file) and sockets, even when cancelled."""
    with trio.CancelScope(shield=True):
        for listener in listeners:
            await listener.aclose()
    for sock in socks:
        sock.close()
