"""Connections by URL, and frame links over them (trio).

URLs (SPEC.md: vsock in production, unix/TCP loopback elsewhere):

* ``unix:///abs/path`` (``unix://@name`` = Linux abstract socket)
* ``tcp://HOST:PORT`` (``tcp://[::1]:PORT`` for IPv6; port 0 = any, listen only)
* ``vsock://CID:PORT``; listen with ``vsock://:PORT`` (any CID)
* ``fd://N`` -- an already-open, already-connected descriptor

A :class:`FrameLink` moves whole Ethernet frames with a framing from
:mod:`rdswitch.framing`: stream framings (stdio, qemu) over stream sockets,
``bess`` over SOCK_SEQPACKET, ``vfkit`` over SOCK_DGRAM.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket as _stdsocket
import stat
from typing import Any

import attrs
import trio

from rdswitch.config import ConfigError
from rdswitch.framing import (
    MAX_FRAME,
    STREAM_FRAMINGS,
    VFKIT_HELLO,
    FramingError,
    StreamDecoder,
    check_datagram,
    encode,
    validate_framing,
)

__all__ = [
    "Endpoint",
    "FrameLink",
    "FrameListener",
    "StreamFrameLink",
    "DatagramFrameLink",
    "StreamListener",
    "parse_url",
    "dial",
    "listen",
    "link_from_fd",
    "dial_stream",
    "listen_stream",
    "FramingError",
]

#: Bytes asked for per receive on a stream link: many frames per wakeup.
RECV_CHUNK = 256 * 1024
#: Socket buffer size requested on data links.
SOCKET_BUFFER = 4 * 1024 * 1024
#: Most datagrams drained per receive_batch on a datagram link.
DATAGRAM_BATCH = 64

VMADDR_CID_ANY = 0xFFFFFFFF
VMADDR_CID_HOST = 2
SCHEMES = ("unix", "tcp", "vsock", "fd")


# --------------------------------------------------------------------------
# URLs


@attrs.frozen
class Endpoint:
    """A parsed transport URL."""

    scheme: str
    path: str = ""  # unix: filesystem path, or "\0name" for abstract
    host: str = ""  # tcp
    port: int = 0  # tcp, vsock
    cid: int | None = None  # vsock; None = any (listen only)
    fd: int = -1  # fd

    @property
    def family(self) -> int:
        if self.scheme == "unix":
            return _stdsocket.AF_UNIX
        if self.scheme == "tcp":
            return _stdsocket.AF_INET6 if ":" in self.host else _stdsocket.AF_INET
        if self.scheme == "vsock":
            return vsock_family()
        raise ConfigError(f"{self} has no socket family of its own")

    def sockaddr(self, *, listening: bool = False) -> Any:
        if self.scheme == "unix":
            return self.path
        if self.scheme == "tcp":
            return (self.host, self.port)
        if self.scheme == "vsock":
            if self.cid is None:
                if not listening:
                    raise ConfigError(f"cannot dial {self}: the URL has no CID (use vsock://CID:PORT)")
                return (VMADDR_CID_ANY, self.port)
            return (self.cid, self.port)
        raise ConfigError(f"{self} has no socket address")

    def __str__(self) -> str:
        if self.scheme == "unix":
            return "unix://" + (("@" + self.path[1:]) if self.path.startswith("\0") else self.path)
        if self.scheme == "tcp":
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"tcp://{host}:{self.port}"
        if self.scheme == "vsock":
            return f"vsock://{'' if self.cid is None else self.cid}:{self.port}"
        return f"fd://{self.fd}"


def _int(text: str, what: str, url: str, lo: int, hi: int) -> int:
    if not text.isdigit():
        raise ConfigError(f"invalid URL {url!r}: {what} {text!r} is not a number")
    value = int(text)
    if not lo <= value <= hi:
        raise ConfigError(f"invalid URL {url!r}: {what} {value} must be {lo}..{hi}")
    return value


def parse_url(url: str) -> Endpoint:
    """Parse a transport URL; raise ConfigError with a readable message."""
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(
            f"invalid URL {url!r}: expected unix:///path, tcp://HOST:PORT, vsock://CID:PORT or fd://N"
        )
    scheme, rest = url.split("://", 1)
    scheme = scheme.lower()
    if scheme == "unix":
        if not rest:
            raise ConfigError(f"invalid URL {url!r}: no socket path (use unix:///absolute/path)")
        if rest.startswith("@"):
            if len(rest) < 2:
                raise ConfigError(f"invalid URL {url!r}: empty abstract socket name")
            path = "\0" + rest[1:]
        else:
            path = rest
        if len(path.encode()) > 107:
            raise ConfigError(f"invalid URL {url!r}: unix socket path longer than 107 bytes")
        if "\0" in path[1:]:
            raise ConfigError(f"invalid URL {url!r}: NUL byte in path")
        return Endpoint("unix", path=path)
    if scheme == "tcp":
        if rest.startswith("["):
            host, sep, port = rest[1:].partition("]:")
            if not sep:
                raise ConfigError(f"invalid URL {url!r}: expected tcp://[IPv6]:PORT")
        else:
            host, sep, port = rest.rpartition(":")
            if not sep:
                raise ConfigError(f"invalid URL {url!r}: no port (use tcp://HOST:PORT)")
        if not host:
            raise ConfigError(f"invalid URL {url!r}: no host (use tcp://127.0.0.1:PORT)")
        port = port.rstrip("/")
        portnum = _int(port, "port", url, 0, 65535)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not all(part and (part.replace("-", "").isalnum()) for part in host.split(".")):
                raise ConfigError(f"invalid URL {url!r}: {host!r} is not an IP address or host name") from None
        return Endpoint("tcp", host=host, port=portnum)
    if scheme == "vsock":
        cid, sep, port = rest.rstrip("/").rpartition(":")
        if not sep:
            raise ConfigError(f"invalid URL {url!r}: expected vsock://CID:PORT (or vsock://:PORT to listen)")
        cidnum = None if cid in ("", "any") else (VMADDR_CID_HOST if cid == "host" else _int(cid, "CID", url, 0, 0xFFFFFFFF))
        return Endpoint("vsock", cid=cidnum, port=_int(port, "port", url, 0, 0xFFFFFFFF))
    if scheme == "fd":
        return Endpoint("fd", fd=_int(rest.rstrip("/"), "fd", url, 0, 2**31 - 1))
    raise ConfigError(f"invalid URL {url!r}: unknown scheme {scheme!r} (valid: {', '.join(SCHEMES)})")


def vsock_family() -> int:
    fam = getattr(_stdsocket, "AF_VSOCK", None)
    if fam is None:
        raise ConfigError("vsock:// URLs need AF_VSOCK, which this Python/OS does not provide")
    return fam


def _new_socket(family: int, type_: int) -> _stdsocket.socket:
    try:
        return _stdsocket.socket(family, type_)
    except OSError as exc:
        if family == getattr(_stdsocket, "AF_VSOCK", None) and exc.errno in (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
            raise OSError(exc.errno, f"vsock is not available on this machine (is the vsock kernel module loaded?): {exc.strerror}") from None
        raise


def _tune_data_socket(sock: _stdsocket.socket) -> None:
    for opt in (_stdsocket.SO_SNDBUF, _stdsocket.SO_RCVBUF):
        try:
            sock.setsockopt(_stdsocket.SOL_SOCKET, opt, SOCKET_BUFFER)
        except OSError:
            pass
    if sock.family in (_stdsocket.AF_INET, _stdsocket.AF_INET6) and sock.type == _stdsocket.SOCK_STREAM:
        try:
            sock.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)
        except OSError:
            pass


def _describe(sock: _stdsocket.socket, fallback: str) -> str:
    try:
        name = sock.getpeername()
    except OSError:
        return fallback
    if sock.family == _stdsocket.AF_UNIX:
        if not name:
            return fallback
        if isinstance(name, bytes):
            name = name.decode(errors="replace")
        return "unix://" + (("@" + name[1:]) if name.startswith("\0") else name)
    if sock.family == _stdsocket.AF_INET6:
        return f"tcp://[{name[0]}]:{name[1]}"
    if sock.family == _stdsocket.AF_INET:
        return f"tcp://{name[0]}:{name[1]}"
    if sock.family == getattr(_stdsocket, "AF_VSOCK", -1):
        return f"vsock://{name[0]}:{name[1]}"
    return fallback


# --------------------------------------------------------------------------
# Frame links


class FrameLink:
    """Moves whole Ethernet frames over one connection.

    ``receive_batch`` returns one or more frames, ``[]`` on clean EOF; it
    raises FramingError on garbage and trio.BrokenResourceError on reset.
    """

    peer: str = "?"
    framing: str = "stdio"

    async def receive_batch(self) -> list[bytes]:
        raise NotImplementedError

    async def send_batch(self, frames: list[bytes]) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> "FrameLink":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.framing} {self.peer}>"


class StreamFrameLink(FrameLink):
    """stdio/qemu framing over any trio byte stream (socket, pipe, memory)."""

    def __init__(self, stream: trio.abc.Stream, framing: str = "stdio", *, peer: str = "stream", max_frame: int = MAX_FRAME, recv_chunk: int = RECV_CHUNK):
        self.framing = validate_framing(framing)
        if self.framing not in STREAM_FRAMINGS:
            raise ConfigError(f"framing {self.framing!r} needs a datagram socket, not a byte stream")
        self.stream = stream
        self.peer = peer
        self._decoder = StreamDecoder(self.framing, max_frame)
        self._recv_chunk = recv_chunk
        self._send_lock = trio.StrictFIFOLock()
        self._eof = False

    async def receive_batch(self) -> list[bytes]:
        if self._eof:
            await trio.lowlevel.checkpoint()
            return []
        # Bounded: each pass either returns or adds bytes to a frame of at
        # most max_frame bytes; a longer frame was already rejected.
        while True:
            data = await self.stream.receive_some(self._recv_chunk)
            if not data:
                self._eof = True
                self._decoder.eof()
                return []
            frames = self._decoder.feed(data)
            if frames:
                return frames

    async def send_batch(self, frames: list[bytes]) -> None:
        if not frames:
            await trio.lowlevel.checkpoint()
            return
        buf = encode(self.framing, frames)
        async with self._send_lock:
            await self.stream.send_all(buf)

    async def send_eof(self) -> None:
        """Half-close (if the stream supports it): the peer sees EOF."""
        if isinstance(self.stream, trio.abc.HalfCloseableStream):
            await self.stream.send_eof()
        else:
            await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await self.stream.aclose()


class DatagramFrameLink(FrameLink):
    """bess (SOCK_SEQPACKET) or vfkit (SOCK_DGRAM): one frame per datagram.

    The socket must be connected (the peer's address fixed).
    """

    def __init__(self, sock: _stdsocket.socket, framing: str, *, peer: str = "datagram", max_frame: int = MAX_FRAME):
        self.framing = validate_framing(framing)
        if self.framing in STREAM_FRAMINGS:
            raise ConfigError(f"framing {self.framing!r} needs a byte stream, not a datagram socket")
        sock.setblocking(False)
        self._sock = sock
        self._tsock = trio.socket.from_stdlib_socket(sock)
        self.peer = peer
        self.max_frame = max_frame
        self._send_lock = trio.StrictFIFOLock()
        self._closed = False
        self._eof = False

    def _check(self, data: bytes) -> bytes:
        return check_datagram(data, self.max_frame)

    async def receive_batch(self) -> list[bytes]:
        if self._eof:
            await trio.lowlevel.checkpoint()
            return []
        size = self.max_frame + 1  # a longer datagram shows up as too large
        frames: list[bytes] = []
        try:
            while True:  # each pass waits for a datagram; vfkit peers may repeat hellos
                first = await self._tsock.recv(size)
                if not (first == VFKIT_HELLO and self.framing == "vfkit"):
                    break
            if not first:
                if self.framing == "bess":  # SEQPACKET: 0 bytes = peer closed
                    self._eof = True
                    return []
                self._check(first)
            frames.append(self._check(first))
            sock = self._sock
            for _ in range(DATAGRAM_BATCH - 1):
                try:
                    data = sock.recv(size)
                except BlockingIOError:
                    break
                if not data:
                    if self.framing == "bess":
                        self._eof = True
                        break
                    self._check(data)
                if data == VFKIT_HELLO and self.framing == "vfkit":
                    continue
                frames.append(self._check(data))
        except OSError as exc:
            raise self._link_error(exc) from exc
        return frames

    async def send_batch(self, frames: list[bytes]) -> None:
        for f in frames:
            check_datagram(f, MAX_FRAME if self.max_frame < MAX_FRAME else self.max_frame)
        async with self._send_lock:
            if self._closed:
                raise trio.ClosedResourceError("link was closed")
            sock = self._sock
            try:
                for f in frames:
                    try:
                        sock.send(f)
                    except BlockingIOError:
                        await self._tsock.send(f)
            except OSError as exc:
                raise self._link_error(exc) from exc
        await trio.lowlevel.checkpoint()

    def _link_error(self, exc: OSError) -> Exception:
        """The trio error for a socket error: closed by us, or broken by the peer."""
        if self._closed and not isinstance(exc, (ConnectionResetError, ConnectionRefusedError, BrokenPipeError)):
            return trio.ClosedResourceError("link was closed")
        return trio.BrokenResourceError(f"{self.peer}: {exc}")

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._tsock.close()
        await trio.lowlevel.checkpoint()


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
        sock = stream.socket
        _tune_data_socket(sock)  # type: ignore[arg-type]  # trio sockets accept setsockopt too
        return StreamFrameLink(stream, self.framing, peer=_describe(sock, self.url))  # type: ignore[arg-type]

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
    """A bound SOCK_DGRAM socket: the first peer that sends VFKT gets the link."""

    def __init__(self, sock: _stdsocket.socket, endpoint: Endpoint, unlink_path: str | None):
        self._sock = sock
        self._tsock = trio.socket.from_stdlib_socket(sock)
        self.url = str(endpoint)
        self._unlink = _unlink_token(unlink_path)
        self._handed_out = False

    async def accept(self) -> FrameLink:
        if self._handed_out:
            # One socket, one peer: there is nothing more to accept.
            await trio.sleep_forever()
        while True:
            data, addr = await self._tsock.recvfrom(MAX_FRAME + 1)
            if data == VFKIT_HELLO and addr:
                break
            # Frames from a peer that never said hello are dropped.
        self._sock.connect(addr)
        self._handed_out = True
        _tune_data_socket(self._sock)
        name = addr.decode(errors="replace") if isinstance(addr, bytes) else addr
        peer = "unix://" + (("@" + name[1:]) if name.startswith("\0") else name)
        return DatagramFrameLink(self._sock, "vfkit", peer=peer)

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


async def _prepare_unix_path(path: str, sock_type: int) -> None:
    """Remove a stale socket file; refuse to clobber a live socket or a non-socket."""
    if path.startswith("\0"):
        return
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"cannot listen on unix://{path}: the path exists and is not a socket")
    if sock_type != _stdsocket.SOCK_DGRAM:
        probe = trio.socket.socket(_stdsocket.AF_UNIX, sock_type)
        try:
            with trio.move_on_after(1.0):
                await probe.connect(path)
                raise OSError(errno.EADDRINUSE, f"cannot listen on unix://{path}: another process is listening there")
        except (ConnectionRefusedError, FileNotFoundError):
            pass
        finally:
            probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


async def _bound_socket(ep: Endpoint, sock_type: int) -> tuple[_stdsocket.socket, str | None]:
    """A socket bound to ep (unix: stale file removed, mode 0600)."""
    if ep.scheme == "fd":
        raise ConfigError(f"cannot listen on {ep}: fd:// URLs name an already-connected socket")
    if ep.scheme != "unix" and sock_type != _stdsocket.SOCK_STREAM:
        raise ConfigError(f"cannot listen on {ep}: this framing needs a unix:// socket")
    if ep.scheme == "unix":
        await _prepare_unix_path(ep.path, sock_type)
    sock = _new_socket(ep.family, sock_type)
    try:
        if ep.scheme == "tcp":
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
    """A listener of raw byte streams (unix, tcp, vsock)."""
    ep = parse_url(url)
    sock, path = await _bound_socket(ep, _stdsocket.SOCK_STREAM)
    try:
        sock.listen(backlog)
        return StreamListener(trio.socket.from_stdlib_socket(sock), ep, unlink_path=path)
    except BaseException:
        sock.close()
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
    if ep.scheme == "vsock" and sock_type != _stdsocket.SOCK_STREAM:
        raise ConfigError(f"cannot dial {ep}: this framing needs a unix:// socket")
    addr = ep.sockaddr()
    tsock = trio.socket.from_stdlib_socket(_new_socket(ep.family, sock_type))
    try:
        await tsock.connect(addr)
    except BaseException:
        tsock.close()
        raise
    return tsock


async def dial_stream(url: str) -> trio.abc.Stream:
    """A connected byte stream (unix, tcp, vsock, fd)."""
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
        tsock = await _connect(ep, _stdsocket.SOCK_STREAM)
        _tune_data_socket(tsock)  # type: ignore[arg-type]
        return StreamFrameLink(trio.SocketStream(tsock), framing, peer=str(ep))
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
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise ConfigError(f"fd://{fd}: not an open file descriptor ({exc.strerror})") from None
    if stat.S_ISSOCK(mode):
        sock = _stdsocket.socket(fileno=fd)
        if sock.type != _stdsocket.SOCK_STREAM:
            sock.detach()
            raise ConfigError(f"fd://{fd} is not a stream socket")
        return trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    return trio.lowlevel.FdStream(fd)


_SOCK_TYPE_NAMES = {
    _stdsocket.SOCK_STREAM: "SOCK_STREAM",
    _stdsocket.SOCK_DGRAM: "SOCK_DGRAM",
    _stdsocket.SOCK_SEQPACKET: "SOCK_SEQPACKET",
}
_WANTED_TYPE = {"stdio": _stdsocket.SOCK_STREAM, "qemu": _stdsocket.SOCK_STREAM, "bess": _stdsocket.SOCK_SEQPACKET, "vfkit": _stdsocket.SOCK_DGRAM}


def link_from_fd(fd: int, framing: str = "stdio") -> FrameLink:
    """A FrameLink over an inherited, connected descriptor (vm-switch's fd 3).

    The link owns the fd from now on.  A socket's type must suit the framing;
    a pipe or character device works for the stream framings.
    """
    framing = validate_framing(framing)
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise ConfigError(f"fd://{fd}: not an open file descriptor ({exc.strerror})") from None
    if not stat.S_ISSOCK(mode):
        if framing not in STREAM_FRAMINGS:
            raise ConfigError(f"fd://{fd} is not a socket; {framing} framing needs a {_SOCK_TYPE_NAMES[_WANTED_TYPE[framing]]} socket")
        return StreamFrameLink(trio.lowlevel.FdStream(fd), framing, peer=f"fd://{fd}")
    sock = _stdsocket.socket(fileno=fd)
    want = _WANTED_TYPE[framing]
    if sock.type != want:
        got = _SOCK_TYPE_NAMES.get(sock.type, str(sock.type))
        sock.detach()  # leave the caller's fd alone
        raise ConfigError(f"fd://{fd} is a {got} socket; {framing} framing needs {_SOCK_TYPE_NAMES[want]}")
    _tune_data_socket(sock)
    peer = _describe(sock, f"fd://{fd}")
    if framing in STREAM_FRAMINGS:
        return StreamFrameLink(trio.SocketStream(trio.socket.from_stdlib_socket(sock)), framing, peer=peer)
    return DatagramFrameLink(sock, framing, peer=peer)
