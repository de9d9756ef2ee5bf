"""Frame links: whole Ethernet frames over one connection (trio).

A :class:`FrameLink` moves frames with a framing from :mod:`rdswitch.framing`:
the stream framings (stdio, qemu) over any byte stream, ``bess`` over
SOCK_SEQPACKET and ``vfkit`` over SOCK_DGRAM.  :func:`link_from_fd` wraps an
inherited descriptor (vm-switch's fd 3).
"""

from __future__ import annotations

import collections
import os
import socket as _stdsocket
import stat

import trio

from rdswitch.config import ConfigError
from rdswitch.urls import hvsock_port, normalize_guid
from rdswitch.framing import (
    MAX_FRAME,
    STREAM_FRAMINGS,
    VFKIT_HELLO,
    FramingError,
    StreamDecoder,
    check_datagram,
    encode,
    encoder,
    validate_framing,
)

__all__ = ["FrameLink", "StreamFrameLink", "SocketFrameLink", "DatagramFrameLink", "link_from_fd", "FramingError"]

#: Bytes asked for per receive on a stream link: many frames per wakeup.
RECV_CHUNK = 256 * 1024
#: Socket buffer size requested on data links.
SOCKET_BUFFER = 4 * 1024 * 1024
#: Most datagrams drained per receive_batch on a datagram link.
DATAGRAM_BATCH = 64


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
    if sock.family == getattr(_stdsocket, "AF_HYPERV", -1):
        return describe_hvsock_peer(name, fallback)
    return fallback


def describe_hvsock_peer(name: object, fallback: str) -> str:
    """An AF_HYPERV peer address (Python's ``(vm_id, service_id)`` strings) as ``hvsock://VMID:PORT``.

    A service id outside the vsock template shows as port 0: the VM id is
    what names the peer (:func:`rdswitch.urls.peer_identity`).
    """
    try:
        vm_id, service_id = name  # type: ignore[misc]
        vm = normalize_guid(vm_id)
    except (TypeError, ValueError):
        return fallback
    try:
        port: object = hvsock_port(service_id)
    except ValueError:
        port = 0
    return f"hvsock://{vm}:{port}"


# --------------------------------------------------------------------------
# Frame links


class FrameLink:
    """Moves whole Ethernet frames over one connection.

    ``receive_batch`` returns one or more frames, ``[]`` on clean EOF; it
    raises FramingError on garbage and trio.BrokenResourceError on reset.
    """

    peer: str = "?"
    framing: str = "stdio"
    #: :meth:`try_send` sends without waiting (a socket link)
    can_send_inline: bool = False

    async def receive_batch(self) -> list[bytes]:
        raise NotImplementedError

    async def send_batch(self, frames: list[bytes]) -> None:
        raise NotImplementedError

    def try_send(self, frames: list[bytes]) -> bool | None:
        """Send without waiting, if this link can: True when everything went out, False when
        some bytes wait in the link for :meth:`flush`; None when the link cannot send inline
        (the caller queues and uses :meth:`send_batch`)."""
        return None

    @property
    def pending_bytes(self) -> int:
        """Bytes accepted by :meth:`try_send` that the socket has not taken yet."""
        return 0

    async def flush(self) -> None:
        """Wait until every byte accepted by :meth:`try_send` is sent."""
        await trio.lowlevel.checkpoint()

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
            frames = self._decoded(await self.stream.receive_some(self._recv_chunk))
            if frames is not None:
                return frames

    def _decoded(self, data: bytes) -> list[bytes] | None:
        """The frames ``data`` completes; [] at EOF; None when it completed none (read more)."""
        if not data:
            self._eof = True
            self._decoder.eof()
            return []
        return self._decoder.feed(data) or None

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


class SocketFrameLink(FrameLink):
    """stdio/qemu framing over a connected stream socket, driven directly (the hot path).

    A send that would not block happens inline, in the caller's task
    (:meth:`try_send`): no hand-off to a writer task and no scheduler round;
    what the socket does not take waits here, in order, until :meth:`flush`.
    A receive waits for readability once and then drains what is there.
    """

    can_send_inline = True

    def __init__(self, sock: _stdsocket.socket, framing: str = "stdio", *, peer: str = "socket",
                 max_frame: int = MAX_FRAME, recv_chunk: int = RECV_CHUNK):
        self.framing = validate_framing(framing)
        if self.framing not in STREAM_FRAMINGS:
            raise ConfigError(f"framing {self.framing!r} needs a datagram socket, not a byte stream")
        sock.setblocking(False)
        self.sock = sock
        self.peer = peer
        self._decoder = StreamDecoder(self.framing, max_frame)
        self._recv_chunk = recv_chunk
        self._encode = encoder(self.framing)
        self._pending: collections.deque[memoryview] = collections.deque()
        self._pending_bytes = 0
        self._flush_lock = trio.StrictFIFOLock()
        self._eof = False
        self._closed = False

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def _error(self, exc: OSError) -> Exception:
        if self._closed:
            return trio.ClosedResourceError("link was closed")
        return trio.BrokenResourceError(f"{self.peer}: {exc}")

    async def receive_batch(self) -> list[bytes]:
        if self._eof:
            await trio.lowlevel.checkpoint()
            return []
        sock = self.sock
        # Bounded: each pass either returns or adds bytes to a frame of at
        # most max_frame bytes; a longer frame was already rejected.
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                data = sock.recv(self._recv_chunk)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise self._error(exc) from exc
            frames = self._decoded(data)
            if frames is not None:
                return frames

    _decoded = StreamFrameLink._decoded

    def try_send(self, frames: list[bytes]) -> bool:
        if self._closed:
            raise trio.ClosedResourceError("link was closed")
        buf = self._encode(frames)
        if self._pending:  # keep the order: behind what already waits
            self._pending.append(memoryview(buf))
            self._pending_bytes += len(buf)
            return False
        try:
            n = self.sock.send(buf)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            raise self._error(exc) from exc
        if n == len(buf):
            return True
        rest = memoryview(buf)[n:]
        self._pending.append(rest)
        self._pending_bytes += len(rest)
        return False

    async def flush(self) -> None:
        async with self._flush_lock:
            pending = self._pending
            sock = self.sock
            while pending:
                await trio.lowlevel.wait_writable(sock)
                while pending:
                    head = pending[0]
                    try:
                        n = sock.send(head)
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        raise self._error(exc) from exc
                    self._pending_bytes -= n
                    if n == len(head):
                        pending.popleft()
                    else:
                        pending[0] = head[n:]
                        break
            await trio.lowlevel.checkpoint()

    async def send_batch(self, frames: list[bytes]) -> None:
        if frames and self.try_send(frames):
            await trio.lowlevel.checkpoint()
            return
        await self.flush()

    async def send_eof(self) -> None:
        """Half-close once everything is sent: the peer sees EOF."""
        await self.flush()
        try:
            self.sock.shutdown(_stdsocket.SHUT_WR)
        except OSError as exc:
            raise self._error(exc) from exc

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()
        await trio.lowlevel.checkpoint()


class DatagramFrameLink(FrameLink):
    """bess (SOCK_SEQPACKET) or vfkit (SOCK_DGRAM): one frame per datagram.

    The socket must be connected (the peer's address fixed).  ``first_frames``
    are returned by the first receive_batch (frames read while accepting).
    """

    def __init__(self, sock: _stdsocket.socket, framing: str, *, peer: str = "datagram", max_frame: int = MAX_FRAME,
                 first_frames: list[bytes] | None = None):
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
        # frames the listener read before the link existed (a QEMU dgram peer's first frame)
        self._first = list(first_frames or ())

    def _check(self, data: bytes) -> bytes:
        return check_datagram(data, self.max_frame)

    async def receive_batch(self) -> list[bytes]:
        if self._eof:
            await trio.lowlevel.checkpoint()
            return []
        if self._first:
            frames, self._first = self._first, []
            await trio.lowlevel.checkpoint()
            return frames
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
        return SocketFrameLink(sock, framing, peer=peer)
    return DatagramFrameLink(sock, framing, peer=peer)
