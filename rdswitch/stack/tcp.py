"""The virtual TCP endpoint: a sans-IO connection state machine.

One :class:`TcpConnection` is one end of a TCP connection terminated by the
virtual gateway.  It consumes and produces :class:`rdswitch.wire.tcp.Segment`
objects (ports only; the gateway demultiplexes by 4-tuple and encodes IP) and
is driven with an explicit clock: every call that may start or fire a timer
takes ``now`` (seconds, any monotonic origin).  No sockets, no clock reads, no
randomness: the initial sequence number is passed in.

Life cycle
----------
Passive open (the VM dials out through the NAT)::

    conn = TcpConnection.from_syn(syn, now, iss=..., mss=...)  # nothing queued
    ... the NAT dials the host ...
    conn.accept(now)          # queues SYN-ACK       or
    rst = conn.refuse()       # RST|ACK answering the SYN; conn is CLOSED

Active open (port forwarding / API into the VM)::

    conn = TcpConnection.connect(local_port, remote_port, now, iss=..., mss=...)  # queues SYN

Then, for every incoming segment ``conn.receive_segment(seg, now)``; when
``now >= conn.next_timeout()`` call ``conn.handle_timeout(now)``; after any
call (or after a *batch* of ``receive_segment`` calls) transmit
``conn.take_outgoing()``.  ``take_outgoing`` is the flush point: pure ACKs are
coalesced until it is called (at most one per flush; duplicate ACKs for
out-of-order segments are not coalesced), and the ACK number and window of
every segment are filled in at that moment, so they are always the freshest.

Application side: ``send(data, now) -> accepted``, ``read(max_bytes, now)``,
``close_write(now)`` (FIN after buffered data), ``close(now)`` (full close,
like close(2): RST if unread data is buffered, later data answered with RST),
``abort()`` (RST now).

Read-only state: ``state`` (str), ``established`` (the handshake completed,
stays True afterwards), ``readable`` (bytes buffered), ``send_space``,
``eof_received``, ``reset`` (peer reset us or we gave up retransmitting),
``closed`` (nothing more will ever happen; the connection can be forgotten),
``all_sent_acked``, ``write_closed``, ``rcv_room``, ``eff_mss``.

Module function :func:`rst_for(seg) <rst_for>` builds the RFC 793 reset reply
for a segment that matches no connection.

Behaviour
---------
* MSS, window scale, SACK-permitted are parsed; we send MSS and window scale,
  never SACK-permitted or timestamps.  Our window scale is the smallest shift
  that lets ``rcv_buffer`` fit the 16-bit field (offered on active opens; on
  passive opens only if the peer offered scaling).
* Receive: in-order only.  Out-of-order segments are dropped and answered with
  a duplicate ACK.  Data beyond the free room of the receive buffer is never
  accepted; the advertised window is exactly (rounded down to the scale) the
  free room.  Window updates are queued when a read opens the window by at
  least min(MSS, half the buffer) while the peer's view of it was small.
* Send: bounded send buffer (``send`` accepts what fits), segments of at most
  min(peer MSS, our MSS) within the peer's window, sender-side SWS avoidance.
  Retransmission: RFC 6298 RTO (initial 1 s, min 200 ms, max 60 s,
  exponential backoff, Karn), go-back-N from ``snd_una``; three duplicate
  ACKs trigger the same go-back-N once per window.  Gives up (RST, ``reset``)
  after ``max_retries`` expiries or ``user_timeout`` seconds without progress.
* Zero window: persist timer sends window probes (an ACK with seq snd_una-1,
  which every stack answers with an ACK carrying its window).
* TIME_WAIT lasts ``time_wait`` seconds (default 1 s); an orphaned
  connection (after ``close``) waits at most ``fin_timeout`` in FIN_WAIT_2.

Sequence numbers are kept internally as unbounded integers (starting at the
ISS / IRS) and wrapped to 32 bits only on the wire.
"""

from __future__ import annotations

from collections import deque

from rdswitch.wire.tcp import ACK, FIN, PSH, RST, SYN, Segment

__all__ = ["TcpConnection", "rst_for", "choose_wscale",
           "CLOSED", "SYN_SENT", "SYN_RECEIVED", "ESTABLISHED", "FIN_WAIT_1", "FIN_WAIT_2",
           "CLOSE_WAIT", "CLOSING", "LAST_ACK", "TIME_WAIT"]

M32 = 0xFFFFFFFF

CLOSED = "CLOSED"
SYN_SENT = "SYN_SENT"
SYN_RECEIVED = "SYN_RECEIVED"
ESTABLISHED = "ESTABLISHED"
FIN_WAIT_1 = "FIN_WAIT_1"
FIN_WAIT_2 = "FIN_WAIT_2"
CLOSE_WAIT = "CLOSE_WAIT"
CLOSING = "CLOSING"
LAST_ACK = "LAST_ACK"
TIME_WAIT = "TIME_WAIT"

_SEND_STATES = frozenset((ESTABLISHED, CLOSE_WAIT, FIN_WAIT_1, CLOSING, LAST_ACK))
_RECV_STATES = frozenset((ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2))
_RESET_REPORTED = frozenset((SYN_SENT, SYN_RECEIVED, ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2, CLOSE_WAIT))

DEFAULT_PEER_MSS = 536
_CLOCK_G = 0.001
OOW_ACK_INTERVAL = 0.5  # seconds between ACKs answering unacceptable pure ACKs


def _rel(x: int, base: int) -> int:
    """The unbounded integer congruent to the 32-bit ``x`` that is nearest ``base``."""
    return base + ((x - base + 0x80000000) & M32) - 0x80000000


def choose_wscale(rcv_buffer: int) -> int:
    """Smallest shift (<= 14) with ``rcv_buffer >> shift <= 65535``."""
    ws = 0
    while ws < 14 and (rcv_buffer >> ws) > 0xFFFF:
        ws += 1
    return ws


def rst_for(seg: Segment) -> Segment | None:
    """The RFC 793 reset answering ``seg``, which matched no connection.

    None if ``seg`` is itself a reset (never answer a reset).
    """
    if seg.flags & RST:
        return None
    if seg.flags & ACK:
        return Segment(seg.dst_port, seg.src_port, seq=seg.ack, ack=0, flags=RST, window=0)
    return Segment(seg.dst_port, seg.src_port, seq=0, ack=(seg.seq + seg.seg_len) & M32,
                   flags=RST | ACK, window=0)


class TcpConnection:
    """One end of a TCP connection (see the module docstring)."""

    __slots__ = (
        "local_port", "remote_port", "state", "mss", "peer_mss", "peer_sack_perm", "rcv_buffer", "snd_buffer",
        "rcv_wscale", "snd_wscale", "_offer_ws", "iss", "snd_una", "snd_nxt", "snd_max", "snd_wnd", "_max_snd_wnd",
        "_wl1", "_wl2", "irs", "rcv_nxt", "_have_irs", "_accepted", "_sbuf", "_sbuf_seq", "_fin_seq", "_rbuf",
        "readable", "eof_received", "reset", "established", "_orphaned", "_out", "_ack_pending", "_rcv_adv_edge",
        "_srtt", "_rttvar", "_rto", "_rto_at", "_retries", "_first_fail", "_rtt_seq", "_rtt_time", "_dupacks",
        "_recover", "_persist_at", "_persist_backoff", "_probes", "_tw_at", "_last_oow_ack", "tso_mss",
        "rto_initial", "rto_min", "rto_max", "max_retries", "user_timeout", "time_wait", "fin_timeout",
    )

    def __init__(self, local_port: int, remote_port: int, *, iss: int, mss: int, rcv_buffer: int = 1 << 20,
                 snd_buffer: int = 1 << 20, rto_initial: float = 1.0, rto_min: float = 0.2, rto_max: float = 60.0,
                 max_retries: int = 10, user_timeout: float = 60.0, time_wait: float = 1.0,
                 fin_timeout: float = 60.0):
        if not 0 < mss <= 0xFFFF:
            raise ValueError(f"mss {mss} out of range")
        if rcv_buffer < 1 or snd_buffer < 1:
            raise ValueError("buffers must hold at least one byte")
        self.local_port = local_port
        self.remote_port = remote_port
        self.state = CLOSED
        self.mss = mss
        self.peer_mss = DEFAULT_PEER_MSS
        self.peer_sack_perm = False
        self.rcv_buffer = rcv_buffer
        self.snd_buffer = snd_buffer
        self.rcv_wscale = 0
        self.snd_wscale = 0
        self._offer_ws = False
        self.iss = iss & M32
        self.snd_una = self.snd_nxt = self.snd_max = self.iss
        self.snd_wnd = 0
        self._max_snd_wnd = 0
        self._wl1 = self._wl2 = 0
        self.irs = 0
        self.rcv_nxt = 0
        self._have_irs = False
        self._accepted = False
        self._sbuf = bytearray()
        self._sbuf_seq = self.iss + 1  # sequence number of _sbuf[0]
        self._fin_seq: int | None = None  # sequence number of our FIN, once close_write was called
        self._rbuf: deque = deque()
        self.readable = 0
        self.eof_received = False
        self.reset = False
        self.established = False
        self._orphaned = False
        self._out: list[Segment] = []
        self._ack_pending = False
        self._rcv_adv_edge = 0
        self.rto_initial, self.rto_min, self.rto_max = rto_initial, rto_min, rto_max
        self.max_retries, self.user_timeout = max_retries, user_timeout
        self.time_wait, self.fin_timeout = time_wait, fin_timeout
        self._srtt: float | None = None
        self._rttvar = 0.0
        self._rto = rto_initial
        self._rto_at: float | None = None
        self._retries = 0
        self._first_fail: float | None = None
        self._rtt_seq: int | None = None
        self._rtt_time = 0.0
        self._dupacks = 0
        self._recover = self.iss
        self._persist_at: float | None = None
        self._persist_backoff = rto_initial
        self._probes = 0
        self._tw_at: float | None = None
        self._last_oow_ack = float("-inf")
        # Segment size when the link segments for us (TSO towards a vm-switch with
        # --offload); 0: segment by the negotiated MSS as usual.
        self.tso_mss = 0

    # ------------------------------------------------------------------ opens

    @classmethod
    def from_syn(cls, syn: Segment, now: float, *, iss: int, mss: int, **kw) -> "TcpConnection":
        """A passive connection for the peer's SYN; nothing is queued until :meth:`accept`."""
        if not syn.flags & SYN or syn.flags & (ACK | RST):
            raise ValueError(f"not an initial SYN: {syn!r}")
        c = cls(syn.dst_port, syn.src_port, iss=iss, mss=mss, **kw)
        c.state = SYN_RECEIVED
        c.irs = syn.seq & M32
        c.rcv_nxt = c.irs + 1
        c._have_irs = True
        c._take_syn_options(syn)
        if syn.wscale is not None:
            c._offer_ws = True
            c.rcv_wscale = choose_wscale(c.rcv_buffer)
            c.snd_wscale = syn.wscale
        c.snd_wnd = syn.window  # never scaled in a SYN
        c._max_snd_wnd = c.snd_wnd
        return c

    @classmethod
    def connect(cls, local_port: int, remote_port: int, now: float, *, iss: int, mss: int,
                **kw) -> "TcpConnection":
        """An active open: queues our SYN."""
        c = cls(local_port, remote_port, iss=iss, mss=mss, **kw)
        c.state = SYN_SENT
        c._offer_ws = True
        c.rcv_wscale = choose_wscale(c.rcv_buffer)
        c._emit_syn(now)
        return c

    def accept(self, now: float) -> None:
        """Answer the SYN a passive connection was created from (queues SYN-ACK)."""
        if self.state != SYN_RECEIVED or self._accepted:
            return
        self._accepted = True
        self._emit_syn(now)

    def refuse(self) -> Segment:
        """Refuse the SYN of a passive connection: returns the RST|ACK to send; the connection is CLOSED."""
        self._to_closed()
        return Segment(self.local_port, self.remote_port, seq=0, ack=self.rcv_nxt & M32, flags=RST | ACK)

    def _take_syn_options(self, syn: Segment) -> None:
        if syn.mss:
            self.peer_mss = syn.mss
        self.peer_sack_perm = bool(syn.sack_perm)

    # ------------------------------------------------------------ properties

    @property
    def closed(self) -> bool:
        return self.state is CLOSED

    @property
    def write_closed(self) -> bool:
        """close_write/close was called (or the connection is closed): send() accepts nothing more."""
        return self._fin_seq is not None or self.state is CLOSED

    @property
    def send_space(self) -> int:
        if self.state is CLOSED or self._fin_seq is not None:
            return 0
        return max(0, self.snd_buffer - len(self._sbuf))

    @property
    def all_sent_acked(self) -> bool:
        return (not self._sbuf and self.snd_una == self.snd_max and self.snd_una > self.iss
                and (self._fin_seq is None or self.snd_una > self._fin_seq))

    @property
    def eff_mss(self) -> int:
        return min(self.peer_mss, self.mss)

    @property
    def rcv_room(self) -> int:
        """Free room in the receive buffer."""
        return self.rcv_buffer - self.readable

    @property
    def rto(self) -> float:
        return self._rto

    def next_timeout(self) -> float | None:
        t = self._rto_at
        for x in (self._persist_at, self._tw_at):
            if x is not None and (t is None or x < t):
                t = x
        return t

    def __repr__(self) -> str:
        return (f"<TcpConnection {self.local_port}->{self.remote_port} {self.state} una={self.snd_una - self.iss} "
                f"nxt={self.snd_nxt - self.iss} max={self.snd_max - self.iss} wnd={self.snd_wnd} "
                f"rcv_nxt={self.rcv_nxt - self.irs} readable={self.readable}>")

    # ------------------------------------------------------------ app calls

    def send(self, data: bytes | bytearray | memoryview, now: float) -> int:
        """Append as much of ``data`` as fits to the send buffer; returns the count accepted."""
        space = self.send_space
        if space <= 0 or not data:
            return 0
        n = len(data)
        if n > space:
            n = space
            self._sbuf += memoryview(data)[:n]
        else:
            self._sbuf += data
        self._output(now)
        return n

    def read(self, max_bytes: int, now: float) -> bytes:
        """Take up to ``max_bytes`` from the receive buffer (b"" if empty; see ``eof_received``)."""
        if self.readable <= 0 or max_bytes <= 0:
            return b""
        rb = self._rbuf
        if max_bytes >= self.readable:
            parts = list(rb)
            rb.clear()
            n = self.readable
        else:
            parts = []
            n = 0
            while n < max_bytes:
                chunk = rb[0]
                need = max_bytes - n
                if len(chunk) <= need:
                    parts.append(rb.popleft())
                    n += len(chunk)
                else:
                    mv = chunk if isinstance(chunk, memoryview) else memoryview(chunk)
                    parts.append(mv[:need])
                    rb[0] = mv[need:]
                    n += need
        self.readable -= n
        data = parts[0] if len(parts) == 1 and type(parts[0]) is bytes else b"".join(parts)
        self._maybe_window_update()
        return data

    def close_write(self, now: float) -> None:
        """Queue our FIN after all buffered data (half-close)."""
        if self._fin_seq is not None or self.state is CLOSED:
            return
        self._fin_seq = self._sbuf_seq + len(self._sbuf)
        if self.state is ESTABLISHED:
            self.state = FIN_WAIT_1
        elif self.state is CLOSE_WAIT:
            self.state = LAST_ACK
        self._output(now)

    def close(self, now: float) -> None:
        """Full close (like close(2)): we will read nothing more.

        Unread data buffered -> RST.  Otherwise FIN after buffered data; data
        arriving later is answered with RST, and FIN_WAIT_2 is bounded by
        ``fin_timeout``.
        """
        if self.state is CLOSED:
            return
        if self.readable or self.state is SYN_SENT or (self.state is SYN_RECEIVED and not self._accepted):
            self.abort()
            return
        self._orphaned = True
        self.close_write(now)
        if self.state is FIN_WAIT_2 and self._tw_at is None:
            self._tw_at = now + self.fin_timeout

    def abort(self) -> None:
        """Queue a RST (if the peer may know us) and go CLOSED."""
        if self.state is CLOSED:
            return
        if self.state is SYN_RECEIVED and not self._accepted:
            self._out.append(self.refuse())
            return
        if self.snd_max > self.iss:  # our SYN went out: the peer may have state
            self._out.append(self._rst_segment())
        self._to_closed()

    def _rst_segment(self) -> Segment:
        if self._have_irs:
            return Segment(self.local_port, self.remote_port, seq=self.snd_nxt & M32, ack=self.rcv_nxt & M32,
                           flags=RST | ACK)
        return Segment(self.local_port, self.remote_port, seq=self.snd_nxt & M32, flags=RST)

    def _to_closed(self, keep_received: bool = False) -> None:
        """Go CLOSED.  A graceful close (``keep_received``) keeps the data received but not yet
        read: the application still reads it, then EOF; a reset or abort discards it."""
        self.state = CLOSED
        self._rto_at = self._persist_at = self._tw_at = None
        self._ack_pending = False
        if not keep_received:
            self._rbuf.clear()
            self.readable = 0
        self._sbuf = bytearray()

    def _give_up(self) -> None:
        self.abort()
        self.reset = True

    # --------------------------------------------------------------- output

    def take_outgoing(self) -> list[Segment]:
        """Drain the segments to transmit, in order, with current ACK and window filled in."""
        if self._ack_pending:
            self._ack_pending = False
            if self.state is not CLOSED and self._have_irs and (self._accepted or self.state is not SYN_RECEIVED):
                self._out.append(Segment(self.local_port, self.remote_port, seq=self.snd_nxt & M32, flags=ACK))
        out = self._out
        if not out:
            return []
        self._out = []
        room = self.rcv_buffer - self.readable
        if self._have_irs:
            ack = self.rcv_nxt & M32
            ws = self.rcv_wscale
            win = room >> ws
            if win > 0xFFFF:
                win = 0xFFFF
            syn_win = room if room < 0xFFFF else 0xFFFF
            for seg in out:
                f = seg.flags
                if f & RST:
                    continue
                if f & SYN:
                    seg.window = syn_win
                else:
                    seg.window = win
                seg.ack = ack
            self._rcv_adv_edge = self.rcv_nxt + (win << ws)
        else:
            for seg in out:
                if not seg.flags & RST:
                    seg.window = room if room < 0xFFFF else 0xFFFF
        return out

    def _emit_syn(self, now: float) -> None:
        flags = SYN | ACK if self._have_irs else SYN
        self._out.append(Segment(self.local_port, self.remote_port, seq=self.iss, flags=flags, mss=self.mss,
                                 wscale=self.rcv_wscale if self._offer_ws else None))
        self.snd_nxt = self.iss + 1
        if self.snd_max < self.snd_nxt:
            self.snd_max = self.snd_nxt
            self._rtt_seq = self.snd_nxt
            self._rtt_time = now
        if self._rto_at is None:
            self._rto_at = now + self._rto
        self._ack_pending = False

    def _emit(self, seq: int, n: int, fin: bool, mv: memoryview) -> None:
        """Queue the segment carrying ``n`` bytes from ``seq`` (plus FIN)."""
        data_end = self._sbuf_seq + len(self._sbuf)
        flags = ACK
        if seq + n == data_end and n:
            flags |= PSH
        if fin:
            flags |= FIN
        off = seq - self._sbuf_seq
        payload = bytes(mv[off:off + n]) if n else b""
        self._out.append(Segment(self.local_port, self.remote_port, seq=seq & M32, flags=flags, payload=payload))
        self._ack_pending = False

    def _output(self, now: float) -> None:
        """Queue whatever the window and buffers allow."""
        st = self.state
        if st not in _SEND_STATES:
            if st is SYN_SENT or (st is SYN_RECEIVED and self._accepted):
                if self.snd_nxt == self.iss:
                    self._emit_syn(now)
            return
        sbuf = self._sbuf
        data_end = self._sbuf_seq + len(sbuf)
        fin_seq = self._fin_seq
        nxt = start = self.snd_nxt
        una = self.snd_una
        if nxt < data_end:
            edge = una + self.snd_wnd
            mss = self.tso_mss or min(self.peer_mss, self.mss)
            half = self._max_snd_wnd >> 1
            with memoryview(sbuf) as mv:
                while nxt < data_end:
                    left = data_end - nxt
                    n = edge - nxt
                    if n > mss:
                        n = mss
                    if n > left:
                        n = left
                    if n <= 0:
                        break
                    if n < mss and n < left and nxt > una and n < half:
                        break  # sender SWS avoidance: wait for a useful window
                    fin = fin_seq is not None and nxt + n == fin_seq
                    self._emit(nxt, n, fin, mv)
                    nxt += n + fin
        if fin_seq is not None and nxt == fin_seq:
            last = self._out[-1] if self._out else None
            if (last is not None and last.payload and not last.flags & (FIN | RST | SYN)
                    and (last.seq + len(last.payload)) & M32 == fin_seq & M32):
                last.flags |= FIN  # piggyback on the data segment still waiting in the queue
            else:
                with memoryview(sbuf) as mv:
                    self._emit(nxt, 0, True, mv)
            nxt += 1
        if nxt > start:
            self.snd_nxt = nxt
            if nxt > self.snd_max:
                if self._rtt_seq is None and start >= self.snd_max:
                    self._rtt_seq = nxt
                    self._rtt_time = now
                self.snd_max = nxt
            if self._rto_at is None:
                self._rto_at = now + self._rto
        # persist timer: data waiting, zero window, nothing in flight
        if self.snd_wnd == 0 and nxt < data_end and self.snd_una == self.snd_max:
            if self._persist_at is None:
                self._persist_at = now + self._persist_backoff
        elif self._persist_at is not None:
            self._persist_at = None
            self._persist_backoff = self._rto
            self._probes = 0

    def _retransmit_head(self, now: float) -> None:
        """After an RTO / 3 dup ACKs: resend from snd_una (the head ignores the window), go-back-N."""
        self._rtt_seq = None
        self._dupacks = 0
        self.snd_nxt = self.snd_una
        st = self.state
        if st is SYN_SENT or st is SYN_RECEIVED:
            self.snd_nxt = self.iss
            self._emit_syn(now)
            return
        if st not in _SEND_STATES:
            return
        una = self.snd_una
        data_end = self._sbuf_seq + len(self._sbuf)
        fin_seq = self._fin_seq
        # only what was sent before: the head may exceed the window, never snd_max
        n = max(0, min(min(data_end, self.snd_max) - una, self.peer_mss, self.mss))
        fin = fin_seq is not None and una + n == fin_seq and self.snd_max > fin_seq
        if n > 0 or fin:
            with memoryview(self._sbuf) as mv:
                self._emit(una, n, fin, mv)
            self.snd_nxt = una + n + fin
        self._output(now)

    # ---------------------------------------------------------------- timers

    def handle_timeout(self, now: float) -> None:
        """Fire every timer due at ``now`` (calling early is harmless)."""
        if self._tw_at is not None and now >= self._tw_at:
            self._to_closed(keep_received=True)
            return
        if self._rto_at is not None and now >= self._rto_at:
            if self._first_fail is None:
                self._first_fail = now
            self._retries += 1
            if self._retries > self.max_retries or now - self._first_fail >= self.user_timeout:
                self._give_up()
                return
            self._rto = min(self._rto * 2, self.rto_max)
            self._rto_at = now + self._rto
            self._recover = self.snd_max
            self._retransmit_head(now)
        if self._persist_at is not None and now >= self._persist_at:
            self._probes += 1
            if self._probes > self.max_retries + 5:
                self._give_up()
                return
            self._out.append(Segment(self.local_port, self.remote_port, seq=(self.snd_una - 1) & M32, flags=ACK))
            self._ack_pending = False
            self._persist_backoff = min(self._persist_backoff * 2, self.rto_max)
            self._persist_at = now + self._persist_backoff

    # --------------------------------------------------------------- receive

    def receive_segment(self, seg: Segment, now: float) -> None:
        """Process one incoming segment (in arrival order)."""
        st = self.state
        if st is CLOSED:
            return
        if st is SYN_SENT:
            self._rx_syn_sent(seg, now)
            return
        flags = seg.flags
        if st is SYN_RECEIVED and not self._accepted:
            if flags & RST and (seg.seq & M32) == (self.rcv_nxt & M32):
                self._to_closed()
                self.reset = True
            return
        rcv_nxt = self.rcv_nxt
        seq = _rel(seg.seq, rcv_nxt)
        payload = seg.payload
        plen = len(payload)
        seg_len = plen + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)
        wnd = self.rcv_buffer - self.readable
        # --- sequence acceptability (RFC 793), lenient for seq == rcv_nxt into a zero window
        if seg_len == 0:
            ok = seq == rcv_nxt if wnd <= 0 else rcv_nxt <= seq < rcv_nxt + wnd
        elif wnd <= 0:
            ok = seq == rcv_nxt
        else:
            end = seq + seg_len - 1
            ok = (rcv_nxt <= seq < rcv_nxt + wnd or rcv_nxt <= end < rcv_nxt + wnd
                  or (seq < rcv_nxt and end >= rcv_nxt + wnd))
        if not ok:
            if flags & RST:
                return
            if st is SYN_RECEIVED and flags & SYN and seq == rcv_nxt - 1:
                # our SYN-ACK was lost: the peer retransmitted its SYN
                self.snd_nxt = self.iss
                self._emit_syn(now)
                return
            if seg_len == 0:
                # Answer unacceptable pure ACKs at most every OOW_ACK_INTERVAL (as Linux
                # does): two ends whose zero-window probes both sit past the other's
                # window would otherwise ACK each other's ACKs forever.
                if now - self._last_oow_ack < OOW_ACK_INTERVAL:
                    return
                self._last_oow_ack = now
            self._ack_pending = True
            return
        if flags & RST:
            self.reset = st in _RESET_REPORTED
            self._to_closed()
            return
        if flags & SYN:
            self._ack_pending = True  # in-window SYN: challenge ACK (RFC 5961)
            return
        if not flags & ACK:
            return
        ack = _rel(seg.ack, self.snd_una)
        if st is SYN_RECEIVED:
            if not self.snd_una < ack <= self.snd_max:
                self._out.append(Segment(self.local_port, self.remote_port, seq=seg.ack, flags=RST))
                return
            self._become_established()
            self._wl1 = seq - 1  # force the window update below
            st = self.state
        if ack > self.snd_max:
            self._ack_pending = True
            return
        self._probes = 0
        wnd_field = seg.window << self.snd_wscale
        if ack > self.snd_una:
            self._ack_new(ack, now)
        elif (ack == self.snd_una and seg_len == 0 and self.snd_max > self.snd_una and wnd_field == self.snd_wnd):
            self._dupacks += 1
            if self._dupacks == 3 and self.snd_una >= self._recover:
                self._recover = self.snd_max
                self._retransmit_head(now)
        if self._wl1 < seq or (self._wl1 == seq and self._wl2 <= ack):
            self.snd_wnd = wnd_field
            if wnd_field > self._max_snd_wnd:
                self._max_snd_wnd = wnd_field
            self._wl1 = seq
            self._wl2 = ack
        st = self.state
        if st is CLOSED:
            return
        # --- data and FIN
        if seg_len:
            if st in _RECV_STATES:
                if seq > rcv_nxt:
                    # out of order: dropped; one duplicate ACK each (not coalesced, so that
                    # the peer's fast retransmit can count them)
                    self._out.append(Segment(self.local_port, self.remote_port, seq=self.snd_nxt & M32,
                                             flags=ACK))
                else:
                    fin = flags & FIN
                    skip = rcv_nxt - seq
                    take = plen - skip
                    if take > 0:
                        if self._orphaned:
                            self.abort()  # data for a closed socket
                            return
                        if take > wnd:
                            take = wnd
                            fin = 0
                        if take > 0:
                            chunk = payload if (skip == 0 and take == plen) else memoryview(payload)[skip:skip + take]
                            if type(chunk) is memoryview and not (chunk.readonly and type(chunk.obj) is bytes):
                                chunk = bytes(chunk)
                            self._rbuf.append(chunk)
                            self.readable += take
                            self.rcv_nxt = rcv_nxt = rcv_nxt + take
                    self._ack_pending = True
                    if fin and seq + plen == rcv_nxt:
                        self._rx_fin(now)
            else:
                self._ack_pending = True
        self._output(now)

    def _rx_fin(self, now: float) -> None:
        self.rcv_nxt += 1
        self.eof_received = True
        self._ack_pending = True
        st = self.state
        if st is ESTABLISHED:
            self.state = CLOSE_WAIT
        elif st is FIN_WAIT_1:
            self.state = CLOSING
        elif st is FIN_WAIT_2:
            self.state = TIME_WAIT
            self._tw_at = now + self.time_wait

    def _become_established(self) -> None:
        self.established = True
        self.state = FIN_WAIT_1 if self._fin_seq is not None else ESTABLISHED

    def _ack_new(self, ack: int, now: float) -> None:
        self.snd_una = ack
        if ack > self.snd_nxt:
            self.snd_nxt = ack
        n = min(ack, self._sbuf_seq + len(self._sbuf)) - self._sbuf_seq
        if n > 0:
            del self._sbuf[:n]  # O(1) amortized in CPython (bytearray keeps a start offset)
            self._sbuf_seq += n
        if self._rtt_seq is not None and ack >= self._rtt_seq:
            r = now - self._rtt_time
            if r < 0:
                r = 0.0
            if self._srtt is None:
                self._srtt = r
                self._rttvar = r / 2
            else:
                self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - r)
                self._srtt = 0.875 * self._srtt + 0.125 * r
            self._rtt_seq = None
        if self._srtt is not None:
            self._rto = min(self.rto_max, max(self.rto_min, self._srtt + max(_CLOCK_G, 4 * self._rttvar)))
        self._retries = 0
        self._first_fail = None
        self._dupacks = 0
        self._rto_at = None if ack >= self.snd_max else now + self._rto
        fin_seq = self._fin_seq
        if fin_seq is not None and ack > fin_seq:
            st = self.state
            if st is FIN_WAIT_1:
                self.state = FIN_WAIT_2
                if self._orphaned:
                    self._tw_at = now + self.fin_timeout
            elif st is CLOSING:
                self.state = TIME_WAIT
                self._tw_at = now + self.time_wait
            elif st is LAST_ACK:
                self._to_closed(keep_received=True)

    def _rx_syn_sent(self, seg: Segment, now: float) -> None:
        flags = seg.flags
        ack = None
        if flags & ACK:
            ack = _rel(seg.ack, self.snd_una)
            if not self.iss < ack <= self.snd_max:
                if not flags & RST:
                    self._out.append(Segment(self.local_port, self.remote_port, seq=seg.ack, flags=RST))
                return
        if flags & RST:
            if ack is not None:
                self._to_closed()
                self.reset = True
            return
        if not flags & SYN:
            return
        self.irs = seg.seq & M32
        self.rcv_nxt = self.irs + 1
        self._have_irs = True
        self._take_syn_options(seg)
        if seg.wscale is not None:
            self.snd_wscale = seg.wscale
        else:
            self.rcv_wscale = 0
            self._offer_ws = False
        seq = self.rcv_nxt - 1
        if ack is not None:
            self._ack_new(ack, now)
            self._become_established()
            self.snd_wnd = self._max_snd_wnd = seg.window  # unscaled in a SYN
            self._wl1, self._wl2 = seq, ack
            self._ack_pending = True
            self._output(now)
        else:  # simultaneous open
            self.state = SYN_RECEIVED
            self._accepted = True
            self.snd_wnd = self._max_snd_wnd = seg.window
            self._wl1, self._wl2 = seq, self.iss
            self.snd_nxt = self.iss
            self._emit_syn(now)

    def _maybe_window_update(self) -> None:
        if not self._have_irs or self.state not in _RECV_STATES:
            return
        room = self.rcv_buffer - self.readable
        ws = self.rcv_wscale
        win = min(room >> ws, 0xFFFF) << ws
        peer_view = self._rcv_adv_edge - self.rcv_nxt
        half = self.rcv_buffer >> 1
        if win - peer_view >= min(half, self.eff_mss) and peer_view < half:
            self._ack_pending = True
