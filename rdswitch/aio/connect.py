"""Listening and dialling by URL (trio): byte streams and frame links.

``listen``/``dial`` give :class:`~rdswitch.aio.links.FrameLink`s in a framing;
``listen_stream``/``dial_stream`` give plain byte streams (the handshake, the
API).  Unix socket files are created mode 0600, a stale one is replaced, a
live one is refused, and ours is removed when the listener closes.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import socket as _stdsocket
import stat

import attrs
import trio

from rdswitch.config import ConfigError
from rdswitch.framing import MAX_FRAME, STREAM_FRAMINGS, VFKIT_HELLO, FramingError, check_datagram, validate_framing
from rdswitch.urls import Endpoint, parse_url
from rdswitch.aio.links import (
    DatagramFrameLink,
    FrameLink,
    SocketFrameLink,
    _describe,
    _tune_data_socket,
    link_from_fd,
)

__all__ = ["StreamListener", "FrameListener", "check_listen", "listen", "listen_stream", "listen_unix_within", "dial",
           "dial_stream"]

log = logging.getLogger("rdswitch.aio")


def _new_socket(family: int, type_: int, proto: int = 0) -> _stdsocket.socket:
    try:
        return _stdsocket.socket(family, type_, proto)
    except OSError as exc:
        if family == getattr(_stdsocket, "AF_VSOCK", None) and exc.errno in (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
            raise OSError(exc.errno, f"vsock is not available on this machine (is the vsock kernel module loaded?): {exc.strerror}") from None
        if family == getattr(_stdsocket, "AF_HYPERV", None):
            raise OSError(exc.errno, f"Hyper-V sockets are not available here (is Hyper-V / WSL 2 enabled?): {exc.strerror or exc}") from None
        raise


def _ep_socket(ep: Endpoint, type_: int) -> _stdsocket.socket:
    return _new_socket(ep.family, type_, ep.proto)



# --------------------------------------------------------------------------
# Listeners


class StreamListener(trio.abc.Listener[trio.SocketStream]):
    """A listening stream socket; ``url`` is the bound address (real port)."""

    def __init__(self, tsock: trio.socket.SocketType, endpoint: Endpoint, *, unlink_path: str | None = None):
        self.socket = tsock
        self.endpoint = endpoint
        self._listener = trio.SocketListener(tsock)
        self._unlink = _unlink_token(unlink_path)
        if endpoint.scheme == "tcp":
            host, port = tsock.getsockname()[:2]
            endpoint = attrs.evolve(endpoint, port=port)
        elif endpoint.scheme == "vsock":
            cid, port = tsock.getsockname()[:2]
            endpoint = attrs.evolve(endpoint, port=port)
        self.url = str(endpoint)

    async def accept(self) -> trio.SocketStream:
        return await self._listener.accept()

    async def aclose(self) -> None:
        try:
            await self._listener.aclose()
        finally:
            _do_unlink(self._unlink)


class FrameListener(trio.abc.Listener[FrameLink]):
    """accept() returns a FrameLink."""

    url: str

    async def accept(self) -> FrameLink:  # pragma: no cover - abstract
        raise NotImplementedError


class _StreamFrameListener(FrameListener):
    def __init__(self, inner: StreamListener, framing: str):
        self.inner = inner
        self.framing = framing
        self.url = inner.url

    async def accept(self) -> FrameLink:
        stream = await self.inner.accept()
        sock = _stdsocket.socket(fileno=stream.socket.detach())
        _tune_data_socket(sock)
        return SocketFrameLink(sock, self.framing, peer=_describe(sock, self.url))

    async def aclose(self) -> None:
        await self.inner.aclose()


class _SeqpacketListener(FrameListener):
    def __init__(self, tsock: trio.socket.SocketType, endpoint: Endpoint, unlink_path: str | None):
        self._tsock = tsock
        self.url = str(endpoint)
        self._unlink = _unlink_token(unlink_path)

    async def accept(self) -> FrameLink:
        try:
            conn, _addr = await self._tsock.accept()
        except OSError:
            if self._tsock.fileno() == -1:
                raise trio.ClosedResourceError("listener was closed") from None
            raise
        sock = _stdsocket.socket(fileno=conn.detach())
        _tune_data_socket(sock)
        return DatagramFrameLink(sock, "bess", peer=f"{self.url} (seqpacket peer)")

    async def aclose(self) -> None:
        self._tsock.close()
        _do_unlink(self._unlink)
        await trio.lowlevel.checkpoint()


class _VfkitListener(FrameListener):
    """A bound SOCK_DGRAM socket: the first peer with an address gets the link.

    A vfkit peer opens with the datagram ``VFKT``; QEMU's ``-netdev dgram``
    sends a frame straight away, which becomes the link's first frame.  A
    sender without an address of its own (an unbound socket) cannot be
    answered and is ignored.
    """

    def __init__(self, sock: _stdsocket.socket, endpoint: Endpoint, unlink_path: str | None):
        self._sock = sock
        self._tsock = trio.socket.from_stdlib_socket(sock)
        self.url = str(endpoint)
        self._unlink = _unlink_token(unlink_path)
        self._handed_out = False
        self._warned_unbound = False

    async def accept(self) -> FrameLink:
        if self._handed_out:
            # One socket, one peer: there is nothing more to accept.
            await trio.sleep_forever()
        while True:
            data, addr = await self._tsock.recvfrom(MAX_FRAME + 1)
            if not addr:
                if not self._warned_unbound:
                    self._warned_unbound = True
                    log.warning("%s: ignoring datagrams from an unbound socket (no address to answer; "
                                "QEMU needs local.type=unix,local.path=...)", self.url)
                continue
            if data == VFKIT_HELLO:
                first: list[bytes] = []
                break
            try:
                first = [check_datagram(data)]
            except FramingError:
                continue  # an empty or oversized datagram opens nothing
            break
        self._sock.connect(addr)
        self._handed_out = True
        _tune_data_socket(self._sock)
        name = addr.decode(errors="replace") if isinstance(addr, bytes) else addr
        peer = "unix://" + (("@" + name[1:]) if name.startswith("\0") else name)
        return DatagramFrameLink(self._sock, "vfkit", peer=peer, first_frames=first)

    async def aclose(self) -> None:
        if not self._handed_out:
            self._tsock.close()
        _do_unlink(self._unlink)
        await trio.lowlevel.checkpoint()


def _unlink_token(path: str | None) -> tuple[str, int, int] | None:
    if not path or path.startswith("\0"):
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (path, st.st_dev, st.st_ino)


def _do_unlink(token: tuple[str, int, int] | None) -> None:
    """Remove our socket file, unless someone else's socket has replaced it."""
    if token is None:
        return
    path, dev, ino = token
    try:
        st = os.stat(path)
        if (st.st_dev, st.st_ino) == (dev, ino):
            os.unlink(path)
    except OSError:
        pass


def _listen_type(framing: str) -> int:
    framing = validate_framing(framing)
    if framing in STREAM_FRAMINGS:
        return _stdsocket.SOCK_STREAM
    return _stdsocket.SOCK_SEQPACKET if framing == "bess" else _stdsocket.SOCK_DGRAM


def check_listen(url: str, framing: str = "stdio") -> None:
    """Check, before trio runs, that :func:`listen` can use ``url``: ConfigError (one line) if not.

    vsock and hvsock need their socket family (AF_VSOCK, AF_HYPERV).  A unix path must be free or a stale socket (not a live socket, not another
    kind of file); ``fd://N`` must be an inherited socket of the framing's type,
    listening (stream, seqpacket) or bound (datagram).
    """
    ep = parse_url(url)
    sock_type = _listen_type(framing)
    if ep.scheme in ("vsock", "hvsock"):
        _ = ep.family  # ConfigError where this OS/Python has no such sockets
    if ep.scheme == "fd":
        _inherited_listener(ep.fd, sock_type).detach()
    elif ep.scheme == "unix":
        try:
            _check_unix_path(ep.path, sock_type)
        except OSError as exc:  # a live socket (EADDRINUSE, as listen() raises it)
            raise ConfigError(exc.strerror or str(exc)) from None


def _check_unix_path(path: str, sock_type: int) -> bool:
    """Whether a stale socket file is in the way; OSError (EADDRINUSE) for a live socket, ConfigError for
    a non-socket."""
    if path.startswith("\0"):
        return False
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise ConfigError(f"cannot listen on unix://{path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"cannot listen on unix://{path}: the path exists and is not a socket")
    if sock_type != _stdsocket.SOCK_DGRAM:
        with _stdsocket.socket(_stdsocket.AF_UNIX, sock_type) as probe:
            probe.settimeout(1.0)  # a unix connect answers at once unless the backlog is full (live, then)
            try:
                probe.connect(path)
            except (ConnectionRefusedError, FileNotFoundError):
                return True  # nobody listens: stale
            except OSError as exc:
                if not isinstance(exc, TimeoutError):
                    raise ConfigError(f"cannot listen on unix://{path}: {exc.strerror or exc}") from None
            raise OSError(errno.EADDRINUSE, f"cannot listen on unix://{path}: another process is listening there")
    return True


def _prepare_unix_path(path: str, sock_type: int) -> None:
    """Remove a stale socket file; refuse to clobber a live socket or a non-socket."""
    if _check_unix_path(path, sock_type):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _fd_mode(fd: int) -> int:
    try:
        return os.fstat(fd).st_mode
    except OSError as exc:
        raise ConfigError(f"fd://{fd}: not an open file descriptor ({exc.strerror})") from None


def _inherited_listener(fd: int, sock_type: int) -> _stdsocket.socket:
    """The socket at ``fd`` (inherited from a parent, systemd-style), if it can serve as a listener."""
    names = {_stdsocket.SOCK_STREAM: "stream", _stdsocket.SOCK_SEQPACKET: "seqpacket", _stdsocket.SOCK_DGRAM: "datagram"}
    wanted = f"a {'bound' if sock_type == _stdsocket.SOCK_DGRAM else 'listening'} {names[sock_type]} socket"
    if not stat.S_ISSOCK(_fd_mode(fd)):
        raise ConfigError(f"cannot listen on fd://{fd}: not a socket (expected {wanted})")
    sock = _stdsocket.socket(fileno=fd)
    ok = sock.type == sock_type
    if ok and sock_type != _stdsocket.SOCK_DGRAM:
        ok = bool(sock.getsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_ACCEPTCONN))
    if not ok:
        sock.detach()  # not ours to close
        raise ConfigError(f"cannot listen on fd://{fd}: expected {wanted}")
    return sock


async def _bound_socket(ep: Endpoint, sock_type: int) -> tuple[_stdsocket.socket, str | None]:
    """A socket bound to ep (unix: stale file removed, mode 0600)."""
    if ep.scheme == "fd":
        return _inherited_listener(ep.fd, sock_type), None
    if ep.scheme != "unix" and sock_type != _stdsocket.SOCK_STREAM:
        raise ConfigError(f"cannot listen on {ep}: this framing needs a unix:// socket")
    if ep.scheme == "unix":
        _prepare_unix_path(ep.path, sock_type)
    sock = _ep_socket(ep, sock_type)
    try:
        if ep.scheme == "tcp":
            # Windows' SO_REUSEADDR would let another process take the port over: keep it ours instead
            # (as trio.open_tcp_listeners does)
            if hasattr(_stdsocket, "SO_EXCLUSIVEADDRUSE"):
                sock.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_EXCLUSIVEADDRUSE, 1)
            else:
                sock.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_REUSEADDR, 1)
        if ep.scheme == "tcp" and not _is_ip(ep.host):
            infos = await trio.socket.getaddrinfo(ep.host, ep.port, ep.family, sock_type)
            if not infos:
                raise OSError(errno.EADDRNOTAVAIL, f"cannot resolve {ep.host}")
            sock.bind(infos[0][4])
        else:
            sock.bind(ep.sockaddr(listening=True))
        if ep.scheme == "unix" and not ep.path.startswith("\0"):
            os.chmod(ep.path, 0o600)  # before listen(): nobody can connect yet
    except BaseException:
        sock.close()
        raise
    return sock, (ep.path if ep.scheme == "unix" else None)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


async def listen_stream(url: str, *, backlog: int = 128) -> StreamListener:
    """A listener of raw byte streams (unix, tcp, vsock, hvsock)."""
    ep = parse_url(url)
    sock, path = await _bound_socket(ep, _stdsocket.SOCK_STREAM)
    try:
        sock.listen(backlog)
        return StreamListener(trio.socket.from_stdlib_socket(sock), ep, unlink_path=path)
    except BaseException:
        sock.close()
        raise


class _WithinListener(StreamListener):
    """A unix listener made by :func:`listen_unix_within`: its file is removed through the directory's fd."""

    def __init__(self, tsock, endpoint: Endpoint, dir_fd: int, name: str, ino: int) -> None:
        super().__init__(tsock, endpoint)
        self._dir_fd, self._name, self._ino = dir_fd, name, ino

    async def aclose(self) -> None:
        try:
            await self._listener.aclose()
        finally:
            if self._dir_fd >= 0:
                with contextlib.suppress(OSError):
                    st = os.stat(self._name, dir_fd=self._dir_fd, follow_symlinks=False)
                    if stat.S_ISSOCK(st.st_mode) and st.st_ino == self._ino:
                        os.unlink(self._name, dir_fd=self._dir_fd)
                os.close(self._dir_fd)
                self._dir_fd = -1


def listen_unix_within(top: str, parts: tuple[str, ...], *, backlog: int = 128) -> StreamListener:
    """A unix stream listener at ``top/parts...`` that follows no symlink below ``top`` and replaces nothing.

    Each directory below ``top`` is opened relative to the one above with
    ``O_NOFOLLOW`` (a symlink on the way is refused, whatever it points at);
    the socket is bound inside the last one through its fd, so nothing can be
    swapped between the check and the bind; and ``bind`` itself creates the
    file or fails with EADDRINUSE when anything (a file, a socket, a dangling
    symlink) already has the name: there is no check-then-create window.
    Mode 0600, set on the new file through an ``O_PATH`` fd (not by name).
    Raises OSError (``EADDRINUSE``: the name exists; ``ELOOP``/``ENOTDIR``: a
    symlink or a non-directory on the way).  Linux only (``/proc/self/fd``).
    """
    if not parts or any(p in ("", ".", "..") or "/" in p or "\0" in p for p in parts):
        raise OSError(errno.EINVAL, "not a plain relative path")
    dfd = os.open(top, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in parts[:-1]:
            nfd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            os.close(dfd)
            dfd = nfd
            if not stat.S_ISDIR(os.fstat(dfd).st_mode):  # O_PATH|O_NOFOLLOW opens a symlink itself
                raise OSError(errno.ELOOP, f"{name} is a symlink")
        name = parts[-1]
        sock = _stdsocket.socket(_stdsocket.AF_UNIX, _stdsocket.SOCK_STREAM)
        try:
            sock.bind(f"/proc/self/fd/{dfd}/{name}")
            pfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            try:
                st = os.fstat(pfd)
                if not stat.S_ISSOCK(st.st_mode):
                    raise OSError(errno.EEXIST, f"{name} was replaced while it was made")
                os.chmod(f"/proc/self/fd/{pfd}", 0o600)  # before listen(): nobody can connect yet
            finally:
                os.close(pfd)
            sock.listen(backlog)
            ep = parse_url("unix://" + os.path.join(top, *parts))
            return _WithinListener(trio.socket.from_stdlib_socket(sock), ep, dfd, name, st.st_ino)
        except BaseException:
            sock.close()
            raise
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(dfd)
        raise


async def listen(url: str, framing: str = "stdio") -> FrameListener:
    """A listener whose accept() returns FrameLinks."""
    framing = validate_framing(framing)
    if framing in STREAM_FRAMINGS:
        return _StreamFrameListener(await listen_stream(url), framing)
    ep = parse_url(url)
    if framing == "bess":
        sock, path = await _bound_socket(ep, _stdsocket.SOCK_SEQPACKET)
        try:
            sock.listen(16)
            return _SeqpacketListener(trio.socket.from_stdlib_socket(sock), ep, path)
        except BaseException:
            sock.close()
            raise
    sock, path = await _bound_socket(ep, _stdsocket.SOCK_DGRAM)
    _tune_data_socket(sock)
    return _VfkitListener(sock, ep, path)


# --------------------------------------------------------------------------
# Dialing


async def _connect(ep: Endpoint, sock_type: int) -> trio.socket.SocketType:
    if ep.scheme == "tcp":
        if ep.port == 0:
            raise ConfigError(f"cannot dial {ep}: port 0")
        if sock_type != _stdsocket.SOCK_STREAM:
            raise ConfigError(f"cannot dial {ep}: this framing needs a unix:// socket")
        if not _is_ip(ep.host):
            # Host names: let trio try every address.
            stream = await trio.open_tcp_stream(ep.host, ep.port)
            return stream.socket  # type: ignore[return-value]
    if ep.scheme in ("vsock", "hvsock") and sock_type != _stdsocket.SOCK_STREAM:
        raise ConfigError(f"cannot dial {ep}: this framing needs a unix:// socket")
    addr = ep.sockaddr()
    tsock = trio.socket.from_stdlib_socket(_ep_socket(ep, sock_type))
    try:
        await tsock.connect(addr)
    except BaseException:
        tsock.close()
        raise
    return tsock


async def dial_stream(url: str) -> trio.abc.Stream:
    """A connected byte stream (unix, tcp, vsock, hvsock, fd)."""
    ep = parse_url(url)
    if ep.scheme == "fd":
        return _stream_from_fd(ep.fd)
    return trio.SocketStream(await _connect(ep, _stdsocket.SOCK_STREAM))


async def dial(url: str, framing: str = "stdio") -> FrameLink:
    """Connect to url and return a FrameLink speaking framing."""
    framing = validate_framing(framing)
    ep = parse_url(url)
    if ep.scheme == "fd":
        await trio.lowlevel.checkpoint()
        return link_from_fd(ep.fd, framing)
    if framing in STREAM_FRAMINGS:
        sock = _stdsocket.socket(fileno=(await _connect(ep, _stdsocket.SOCK_STREAM)).detach())
        _tune_data_socket(sock)
        return SocketFrameLink(sock, framing, peer=str(ep))
    if ep.scheme != "unix":
        raise ConfigError(f"cannot dial {ep} with {framing} framing: it needs a unix:// socket")
    if framing == "bess":
        tsock = await _connect(ep, _stdsocket.SOCK_SEQPACKET)
        sock = _stdsocket.socket(fileno=tsock.detach())
        _tune_data_socket(sock)
        return DatagramFrameLink(sock, "bess", peer=str(ep))
    # vfkit: our own (autobound, abstract) address so the peer can answer.
    sock = _stdsocket.socket(_stdsocket.AF_UNIX, _stdsocket.SOCK_DGRAM)
    try:
        sock.bind("")
        sock.connect(ep.path)
        _tune_data_socket(sock)
        link = DatagramFrameLink(sock, "vfkit", peer=str(ep))
    except BaseException:
        sock.close()
        raise
    await link.send_batch([VFKIT_HELLO])
    return link


# --------------------------------------------------------------------------
# fd://


def _stream_from_fd(fd: int) -> trio.abc.Stream:
    if stat.S_ISSOCK(_fd_mode(fd)):
        sock = _stdsocket.socket(fileno=fd)
        if sock.type != _stdsocket.SOCK_STREAM:
            sock.detach()
            raise ConfigError(f"fd://{fd} is not a stream socket")
        return trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    return trio.lowlevel.FdStream(fd)

