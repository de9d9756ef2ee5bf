"""One NAT'd TCP flow: a VM's :class:`~rdswitch.stack.tcp.TcpConnection` joined to a host socket.

The frame path feeds the connection and calls :meth:`HostBridge.to_host`:
what the VM sent goes to the host socket right there, inline, whenever the
socket takes it, so a small exchange costs no task hand-off.  Only what
would block waits: the bytes stay in the connection's receive buffer (its
window closes, which is the back-pressure the VM sees) and the bridge's
writer task (started only then) takes over until the socket drains.  The
other way, one reader task waits for the host socket to be readable, moves
what it reads into the connection (as much as the VM's window and our send
buffer allow) and the segments go out through the egress inline.  The
connection's timers (retransmission, persist, TIME_WAIT) run in the flow's
own task, whose cancel-scope deadline follows the connection: re-arming a
timer wakes nobody.  So a flow costs two tasks, and a short connection starts
two.
"""

from __future__ import annotations

import errno
import logging
import math
import socket
from typing import Callable

import trio

from ..aio import trace
from ..stack.tcp import TIME_WAIT, TcpConnection

log = logging.getLogger("rdswitch.nat")

#: Most bytes moved per read or send (host socket <-> connection).
CHUNK = 1 << 18
#: The reader waits for this much free send buffer before reading the host again.
LOW_WATER = 1 << 16


class HostBridge:
    def __init__(self, conn: TcpConnection, sock: socket.socket, transmit: Callable[[list], None],
                 counters) -> None:
        self.conn = conn
        self.sock = sock
        self._transmit = transmit
        self.counters = counters
        self._pending = b""  # read from the connection, not yet taken by the host socket
        self._nursery: trio.Nursery | None = None
        self._writing = False  # the writer task runs
        self._space = trio.Event()
        self._reader_needs_space = False
        self._timer_scope: trio.CancelScope | None = None
        self._timer_deadline = math.inf
        self._host_shut = False  # we passed the VM's EOF on (shutdown SHUT_WR)
        self._host_eof = False  # the host sent EOF (we queued our FIN)
        self._failed = False
        self._finished = trio.Event()

    # ---- the frame path's side (sync) ---------------------------------------------------------
    def sync(self) -> None:
        """Transmit what the connection queued; follow its timer; wake who must wake."""
        conn = self.conn
        segs = conn.take_outgoing()
        if segs:
            self._transmit(segs)
        t = conn.next_timeout()
        if t is not None and t < self._timer_deadline:
            # Only ever earlier: a timer that was disarmed or moved later just wakes the
            # timer task once for nothing, which costs less than re-arming on every segment.
            self._timer_deadline = t
            if self._timer_scope is not None:
                self._timer_scope.deadline = t
        if self._reader_needs_space and (conn.send_space >= LOW_WATER or conn.closed or conn.send_space
                                         >= conn.snd_buffer // 2):
            self._reader_needs_space = False
            self._space.set()
        if self._done():
            self._finished.set()

    def _done(self) -> bool:
        conn = self.conn
        if self._failed or conn.closed or conn.state == TIME_WAIT:
            return True
        return self._host_shut and self._host_eof and conn.all_sent_acked

    def to_host(self, now: float | None = None) -> None:
        """After segments were fed: send what the VM wrote to the host, inline when it fits.

        ``now`` is the frame batch's time when the frame path calls (the clock is read once
        per batch); the bridge's own tasks read it only when there is something to read."""
        conn = self.conn
        if self._pending:
            return  # the writer task holds the line; the rest waits in the receive buffer
        sock = self.sock
        while conn.readable:
            if now is None:
                now = trio.current_time()
            data = conn.read(CHUNK, now)
            if trace.enabled:  # before the send, as every hop that hands bytes to the kernel
                trace.hop("hs.host_write", len(data))
            try:
                n = sock.send(data)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                self._fail(exc)
                return
            if n < len(data):
                self._pending = memoryview(data)[n:]
                if not self._writing and self._nursery is not None:
                    self._writing = True
                    self._nursery.start_soon(self._writer)
                break
        if not self._pending and conn.eof_received and not self._host_shut and not conn.readable:
            self._host_shut = True
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                if exc.errno != errno.ENOTCONN:
                    self._fail(exc)
                    return
        self.sync()

    def _fail(self, exc: OSError) -> None:
        log.debug("host socket of %r failed: %s", self.conn, exc)
        self._failed = True
        self.conn.abort()  # RST to the VM
        self.sync()
        self._finished.set()

    # ---- tasks --------------------------------------------------------------------------------
    async def run(self) -> None:
        """Serve the flow until both directions ended (or one failed); then close the host socket."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._reader)
                self.sync()
                if self._pending:  # the host socket was full before this task ran
                    self._writing = True
                    nursery.start_soon(self._writer)
                else:
                    self.to_host()  # data that came with the handshake
                await self._timers_until_finished()
                nursery.cancel_scope.cancel()
        finally:
            conn = self.conn
            if not conn.closed and conn.state != TIME_WAIT:
                conn.abort()
            self.sync()
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()

    async def _reader(self) -> None:
        conn = self.conn
        sock = self.sock
        while True:
            space = conn.send_space
            if space <= 0:
                if conn.write_closed:
                    return
                self._reader_needs_space = True
                self._space = trio.Event()
                await self._space.wait()
                continue
            await trio.lowlevel.wait_readable(sock)
            try:
                data = sock.recv(min(space, CHUNK))
            except BlockingIOError:
                continue
            except OSError as exc:
                self._fail(exc)
                return
            if trace.enabled:
                trace.hop("hs.host_read", len(data))
            now = trio.current_time()
            if not data:
                self._host_eof = True
                conn.close_write(now)
                self.sync()
                return
            conn.send(data, now)
            self.sync()

    async def _writer(self) -> None:
        """Send what the host socket did not take inline; then what the connection holds meanwhile."""
        sock = self.sock
        try:
            while self._pending:
                await trio.lowlevel.wait_writable(sock)
                try:
                    n = sock.send(self._pending)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    self._fail(exc)
                    return
                self._pending = self._pending[n:]
        finally:
            self._writing = False
        self.to_host()  # what arrived meanwhile (may start a writer again)

    async def _timers_until_finished(self) -> None:
        conn = self.conn
        while not self._finished.is_set():
            with trio.CancelScope(deadline=self._timer_deadline) as scope:
                self._timer_scope = scope
                await self._finished.wait()
            self._timer_scope = None
            now = trio.current_time()
            t = conn.next_timeout()
            if t is not None and now >= t:
                conn.handle_timeout(now)
                t = conn.next_timeout()
            self._timer_deadline = math.inf if t is None else t
            self.sync()
