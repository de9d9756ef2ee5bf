"""trio streams over the sans-IO TCP endpoint (:mod:`rdswitch.stack.tcp`).

:class:`VirtualTcpStream` is a :class:`trio.abc.HalfCloseableStream` over one
:class:`~rdswitch.stack.tcp.TcpConnection`.  The owner (the gateway's demux)
feeds it incoming segments with the synchronous :meth:`~VirtualTcpStream.deliver`
and runs :meth:`~VirtualTcpStream.timer_loop` in the flow's nursery; outgoing
segments go to the synchronous, non-blocking ``transmit`` callable (which may
drop: the connection retransmits).  Every interaction with the connection ends
in ``_sync``: take the queued segments, transmit them, wake whoever waits
(readers, writers, the timer loop), and call ``on_closed`` once when the
connection is closed for good.

Semantics worth knowing:

* ``send_all`` returns when the data is in the send buffer; it blocks while
  the buffer is full (back-pressure from the VM's window).
* ``send_eof`` queues the FIN and returns once everything we sent, FIN
  included, is acknowledged (or the connection broke) - so an owner may tear
  the flow down (cancel the timer loop, ``abort_if_open``) right after both
  directions ended without losing data.
* ``aclose`` is a full close (``TcpConnection.close``: RST if unread data is
  buffered, FIN otherwise), waits at most ``close_timeout`` seconds for the
  peer to acknowledge what we sent, then aborts.  Cancelled, it aborts.
* ``receive_some`` returns b"" at EOF and raises BrokenResourceError after a
  reset (or when the connection was aborted).

:class:`VirtualTcpListener` is the accept queue of a local service (the
gateway's DNS over TCP, the API): the demux ``push``-es new streams, the
service ``accept``-s them.
"""

from __future__ import annotations

import operator
import socket
from typing import Callable

import attrs
import trio

from ..wire.tcp import Segment
from ..stack.tcp import TcpConnection

DEFAULT_RECEIVE_SIZE = 65536
TIME_WAIT = "TIME_WAIT"


@attrs.frozen
class SocketInfo:
    """What servers (hypercorn) expect of ``stream.socket``: addresses; and the session the stream belongs to."""

    local: tuple[str, int]
    peer: tuple[str, int]
    family: int = socket.AF_INET
    #: the id of the VM session whose frames carry this connection (who is really calling, whatever ``peer`` says)
    session: int | None = None

    def getsockname(self) -> tuple[str, int]:
        return self.local

    def getpeername(self) -> tuple[str, int]:
        return self.peer


class _ConflictDetector:
    """Raise trio.BusyResourceError if two tasks use one side at once (like trio's private one)."""

    __slots__ = ("_held", "_msg")

    def __init__(self, msg: str) -> None:
        self._held = False
        self._msg = msg

    def __enter__(self) -> None:
        if self._held:
            raise trio.BusyResourceError(self._msg)
        self._held = True

    def __exit__(self, *exc: object) -> None:
        self._held = False


class VirtualTcpStream(trio.abc.HalfCloseableStream):
    """A trio stream over a :class:`TcpConnection` (see the module docstring)."""

    def __init__(self, conn: TcpConnection, transmit: Callable[[list[Segment]], None], *,
                 clock: Callable[[], float] = trio.current_time, on_closed: Callable[[], None] | None = None,
                 socket_info: SocketInfo | None = None, close_timeout: float = 10.0) -> None:
        self.conn = conn
        self.socket = socket_info
        self.close_timeout = close_timeout
        self._transmit = transmit
        self._clock = clock
        self._on_closed = on_closed
        self._notified = False
        self._local_closed = False  # aclose() was called
        self._eof_called = False  # send_eof() was called
        self._rx_event: trio.Event | None = None
        self._tx_event: trio.Event | None = None
        self._timer_event: trio.Event | None = None
        self._timer_target: float | None = None
        self._est_seen = conn.established
        self._send_conflict = _ConflictDetector("another task is using this stream for sending")
        self._recv_conflict = _ConflictDetector("another task is using this stream for receiving")

    def __repr__(self) -> str:
        return f"<VirtualTcpStream {self.conn!r}>"

    # ---- the owner's (synchronous) side ------------------------------------------------------
    def deliver(self, seg: Segment) -> None:
        """Process one incoming segment; transmit what it caused; wake waiters."""
        self.conn.receive_segment(seg, self._clock())
        self._sync()

    def flush(self) -> None:
        """Transmit whatever the connection has queued (e.g. after ``conn.accept``)."""
        self._sync()

    def abort_if_open(self) -> None:
        """If the connection is not closed: reset it (RST) and transmit.  For finally-blocks."""
        conn = self.conn
        if not conn.closed and conn.state != TIME_WAIT:
            conn.abort()
        self._sync(force_closed=True)

    def _sync(self, force_closed: bool = False) -> None:
        conn = self.conn
        segs = conn.take_outgoing()
        if segs:
            self._transmit(segs)
        closed = conn.closed or force_closed
        ev = self._rx_event
        if ev is not None and (conn.readable or conn.eof_received or closed):
            self._rx_event = None
            ev.set()
        ev = self._tx_event
        if ev is not None:
            low = conn.snd_buffer >> 2
            if low > 65536:
                low = 65536
            if (closed or conn.send_space >= low or conn.all_sent_acked or conn.reset
                    or (conn.established and not self._est_seen)):
                self._tx_event = None
                ev.set()
        self._est_seen = conn.established
        ev = self._timer_event
        if ev is not None:
            t = conn.next_timeout()
            if closed or (t is not None and (self._timer_target is None or t < self._timer_target)):
                self._timer_event = None
                ev.set()
        if closed and not self._notified:
            self._notified = True
            if self._on_closed is not None:
                self._on_closed()

    def _wake_all(self) -> None:
        for name in ("_rx_event", "_tx_event", "_timer_event"):
            ev = getattr(self, name)
            if ev is not None:
                setattr(self, name, None)
                ev.set()

    async def _wait_rx(self) -> None:
        if self._rx_event is None:
            self._rx_event = trio.Event()
        await self._rx_event.wait()

    async def _wait_tx(self) -> None:
        if self._tx_event is None:
            self._tx_event = trio.Event()
        await self._tx_event.wait()

    async def timer_loop(self) -> None:
        """Run the connection's timers until it is closed (run by the owner in the flow's nursery)."""
        conn = self.conn
        while not conn.closed and not self._notified:
            t = conn.next_timeout()
            ev = self._timer_event = trio.Event()
            self._timer_target = t
            if t is None:
                await ev.wait()
            else:
                with trio.move_on_at(t):
                    await ev.wait()
            self._timer_event = None
            t = conn.next_timeout()
            if t is not None:
                now = self._clock()
                if now >= t:
                    conn.handle_timeout(now)
                    self._sync()

    async def wait_established(self) -> None:
        """For active opens: return once the handshake completed; BrokenResourceError if it failed."""
        await trio.lowlevel.checkpoint_if_cancelled()
        conn = self.conn
        while not conn.established:
            if conn.closed or self._notified:
                raise trio.BrokenResourceError("connection failed" + (" (reset)" if conn.reset else ""))
            if self._local_closed:
                raise trio.ClosedResourceError
            await self._wait_tx()
        await trio.lowlevel.cancel_shielded_checkpoint()

    # ---- HalfCloseableStream -----------------------------------------------------------------
    def _check_send(self) -> None:
        conn = self.conn
        if self._local_closed:
            raise trio.ClosedResourceError("stream was closed")
        if self._eof_called:
            raise trio.ClosedResourceError("send_eof was called")
        if conn.reset:
            raise trio.BrokenResourceError("connection reset")
        if conn.closed or self._notified:
            raise trio.BrokenResourceError("connection closed")
        if conn.write_closed:  # the owner half-closed the connection itself
            raise trio.ClosedResourceError("the connection's write side is closed")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with self._send_conflict:
            self._check_send()
            await trio.lowlevel.checkpoint_if_cancelled()
            conn = self.conn
            clock = self._clock
            with memoryview(data) as mv:
                if mv.ndim != 1 or mv.itemsize != 1:
                    mv = mv.cast("B")
                total = len(mv)
                off = 0
                while off < total:
                    self._check_send()
                    n = conn.send(mv[off:], clock())
                    if n:
                        off += n
                        self._sync()
                    else:
                        await self._wait_tx()
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        with self._send_conflict:
            await trio.lowlevel.checkpoint()
            conn = self.conn
            while True:
                self._check_send()
                if conn.send_space > 0:
                    return
                await self._wait_tx()

    async def send_eof(self) -> None:
        with self._send_conflict:
            if self._local_closed:
                await trio.lowlevel.checkpoint()
                raise trio.ClosedResourceError("stream was closed")
            await trio.lowlevel.checkpoint_if_cancelled()
            self._eof_called = True
            conn = self.conn
            if not conn.write_closed and not conn.closed:
                conn.close_write(self._clock())
                self._sync()
            while not (conn.closed or conn.all_sent_acked or self._local_closed or self._notified):
                await self._wait_tx()
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is None:
            max_bytes = DEFAULT_RECEIVE_SIZE
        else:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
        with self._recv_conflict:
            await trio.lowlevel.checkpoint_if_cancelled()
            conn = self.conn
            while True:
                if self._local_closed:
                    raise trio.ClosedResourceError("stream was closed")
                if conn.readable:
                    data = conn.read(max_bytes, self._clock())
                    self._sync()
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return data
                if conn.reset:
                    raise trio.BrokenResourceError("connection reset by peer")
                if conn.eof_received:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return b""
                if conn.closed or self._notified:
                    raise trio.BrokenResourceError("connection aborted")
                await self._wait_rx()

    async def aclose(self) -> None:
        if self._local_closed:
            await trio.lowlevel.checkpoint()
            return
        self._local_closed = True
        conn = self.conn
        try:
            if not conn.closed and not self._notified:
                conn.close(self._clock())
                self._sync()
            self._wake_all()
            with trio.move_on_after(self.close_timeout):
                while not (conn.closed or conn.all_sent_acked or self._notified):
                    await self._wait_tx()
            await trio.lowlevel.checkpoint()
        except BaseException:
            self.abort_if_open()
            raise
        if not conn.all_sent_acked:
            self.abort_if_open()
        elif conn.closed:
            self._sync()


class VirtualTcpListener(trio.abc.Listener[VirtualTcpStream]):
    """Accept queue for connections the demux hands over with :meth:`push`."""

    def __init__(self, backlog: int = 128) -> None:
        self._send, self._recv = trio.open_memory_channel[VirtualTcpStream](backlog)
        self._closed = False

    def push(self, stream: VirtualTcpStream) -> bool:
        """Queue a new connection; False if the backlog is full or the listener closed."""
        if self._closed:
            return False
        try:
            self._send.send_nowait(stream)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        return True

    async def accept(self) -> VirtualTcpStream:
        try:
            return await self._recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise trio.ClosedResourceError("listener closed") from None

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._send.close()
            while True:  # bounded by the backlog: nothing is pushed after close
                try:
                    stream = self._recv.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
                stream.abort_if_open()
            self._recv.close()
        await trio.lowlevel.checkpoint()


__all__ = ["SocketInfo", "VirtualTcpStream", "VirtualTcpListener"]
