"""VirtualTcpStream / VirtualTcpListener over back-to-back TcpConnections."""

from __future__ import annotations

import hashlib
import random
from collections import deque

import pytest
import trio
import trio.testing

from rdswitch.aio.tcp_stream import SocketInfo, VirtualTcpListener, VirtualTcpStream
from rdswitch.stack.tcp import TcpConnection
from rdswitch.wire.tcp import RST, SYN, Segment


class Wire:
    """A synchronous, re-entrancy-safe link between two streams ("a" <-> "b").

    ``transmit`` of one end queues the segments and, unless a delivery is
    already in progress further up the stack, delivers the queue to the other
    end until it is empty (deliveries cause transmits, which only queue).
    ``drop(src, seg) -> bool`` may discard segments.
    """

    def __init__(self) -> None:
        self.ends: dict[str, VirtualTcpStream] = {}
        self.queue: deque = deque()
        self.busy = False
        self.drop = None
        self.log: list[tuple[str, Segment]] = []

    def transmitter(self, name: str):
        other = "b" if name == "a" else "a"

        def transmit(segs: list[Segment]) -> None:
            for s in segs:
                self.queue.append((other, s))
            if self.busy:
                return
            self.busy = True
            try:
                for _ in range(10_000_000):
                    if not self.queue:
                        break
                    dst, seg = self.queue.popleft()
                    self.log.append((dst, seg))
                    if self.drop is not None and self.drop(dst, seg):
                        continue
                    if dst in self.ends:
                        self.ends[dst].deliver(seg)
                else:
                    raise AssertionError("wire never went quiet")
            finally:
                self.busy = False

        return transmit


def make_pair(*, mss: int = 1460, buf_a: int = 1 << 16, buf_b: int = 1 << 16, wire: Wire | None = None,
              on_closed=None) -> tuple[VirtualTcpStream, VirtualTcpStream, Wire]:
    """An established pair: ``a`` opened actively, ``b`` passively.  Timer loops not started."""
    wire = wire or Wire()
    now = trio.current_time()
    ca = TcpConnection.connect(40000, 80, now, iss=random.getrandbits(32), mss=mss, rcv_buffer=buf_a,
                               snd_buffer=buf_a)
    (syn,) = ca.take_outgoing()
    assert syn.flags == SYN
    cb = TcpConnection.from_syn(syn, now, iss=random.getrandbits(32), mss=mss, rcv_buffer=buf_b, snd_buffer=buf_b)
    a = VirtualTcpStream(ca, wire.transmitter("a"), on_closed=(lambda: on_closed("a")) if on_closed else None)
    b = VirtualTcpStream(cb, wire.transmitter("b"), on_closed=(lambda: on_closed("b")) if on_closed else None,
                         socket_info=SocketInfo(("192.168.127.1", 80), ("192.168.127.2", 40000)))
    wire.ends.update(a=a, b=b)
    cb.accept(now)
    b.flush()
    assert ca.established and cb.established
    return a, b, wire


def run(main, *, autojump: bool = True, limit: float = 20.0) -> None:
    """trio.run with a bounded (virtual, if autojumping) time."""
    clock = trio.testing.MockClock(autojump_threshold=0) if autojump else None

    async def bounded():
        with trio.fail_after(limit):
            await main()

    trio.run(bounded, clock=clock)


def fill(s: VirtualTcpStream) -> None:
    """Stuff the send side until both the peer's window and our send buffer are full."""
    for _ in range(1000):
        space = s.conn.send_space
        if not space:
            return
        s.conn.send(b"c" * space, trio.current_time())
        s.flush()
    raise AssertionError("never filled")


# ------------------------------------------------------------------ the generic trio checks

def test_check_half_closeable_stream():
    async def main():
        async with trio.open_nursery() as nursery:
            async def stream_maker():
                a, b, _ = make_pair()
                nursery.start_soon(a.timer_loop)
                nursery.start_soon(b.timer_loop)
                return a, b

            async def clogged_stream_maker():
                a, b, _ = make_pair(buf_a=3000, buf_b=3000)
                fill(a)
                fill(b)
                assert a.conn.send_space == 0 and b.conn.send_space == 0
                nursery.start_soon(a.timer_loop)
                nursery.start_soon(b.timer_loop)
                return a, b

            await trio.testing.check_half_closeable_stream(stream_maker, clogged_stream_maker)
            nursery.cancel_scope.cancel()

    run(main, limit=600.0)


# ------------------------------------------------------------------ data, back-pressure, timers

def test_bulk_both_ways_through_streams():
    rng = random.Random(5)
    d1, d2 = rng.randbytes(3 << 20), rng.randbytes(2 << 20)

    async def main():
        a, b, _ = make_pair(buf_a=1 << 18, buf_b=1 << 17)

        async def pump(src, dst, data, out):
            async def sender():
                for i in range(0, len(data), 100_000):
                    await src.send_all(data[i:i + 100_000])
                await src.send_eof()

            async def receiver():
                while True:
                    chunk = await dst.receive_some(rng.randint(1, 1 << 17))
                    if not chunk:
                        return
                    out.extend(chunk)

            async with trio.open_nursery() as n:
                n.start_soon(sender)
                n.start_soon(receiver)

        got_b, got_a = bytearray(), bytearray()
        async with trio.open_nursery() as n:
            n.start_soon(a.timer_loop)
            n.start_soon(b.timer_loop)
            async with trio.open_nursery() as n2:
                n2.start_soon(pump, a, b, d1, got_b)
                n2.start_soon(pump, b, a, d2, got_a)
            assert hashlib.sha256(got_b).digest() == hashlib.sha256(d1).digest()
            assert hashlib.sha256(got_a).digest() == hashlib.sha256(d2).digest()
            # both FINs exchanged and acknowledged: one side lingers in TIME_WAIT, the other is closed
            assert {a.conn.state, b.conn.state} <= {"CLOSED", "TIME_WAIT"}
            await a.aclose()
            await b.aclose()
        # the timer loops returned on their own (TIME_WAIT expired)
        assert a.conn.closed and b.conn.closed

    run(main, limit=60.0)


def test_back_pressure_bounds_memory():
    async def main():
        a, b, _ = make_pair(buf_a=20000, buf_b=30000)
        sent = 0
        blocked_at = None
        data = bytes(range(256)) * 40

        async def writer():
            nonlocal sent
            for _ in range(10_000):
                await a.send_all(data)
                sent += len(data)

        async with trio.open_nursery() as n:
            n.start_soon(a.timer_loop)
            n.start_soon(b.timer_loop)
            n.start_soon(writer)
            await trio.testing.wait_all_tasks_blocked()
            blocked_at = sent
            # the writer is stuck: everything it managed to hand over sits in the two bounded buffers
            assert a.conn.send_space == 0 and b.conn.rcv_room == 0
            assert blocked_at <= 20000 + 30000
            assert b.conn.readable == 30000
            await trio.sleep(30)  # ok-sleep: virtual time (MockClock): persist probes go on, nothing else moves
            assert sent == blocked_at and b.conn.readable == 30000
            # reading releases the writer
            got = 0
            for _ in range(100_000):
                chunk = await b.receive_some(1 << 16)
                got += len(chunk)
                if got >= 1_000_000:
                    break
            assert sent > blocked_at
            n.cancel_scope.cancel()

    run(main, limit=300.0)


def test_dropped_segment_retransmitted_by_timer_loop():
    async def main():
        a, b, wire = make_pair()
        dropped = []
        wire.drop = lambda dst, s: dst == "b" and len(s.payload) > 0 and not dropped and (dropped.append(s) or True)
        async with trio.open_nursery() as n:
            n.start_soon(a.timer_loop)
            n.start_soon(b.timer_loop)
            t0 = trio.current_time()
            await a.send_all(b"precious")
            assert len(dropped) == 1 and b.conn.readable == 0
            assert await b.receive_some(100) == b"precious"
            elapsed = trio.current_time() - t0
            assert a.conn.rto_min <= elapsed <= 1.5  # waited for the RTO, not longer
            assert a.conn.all_sent_acked
            n.cancel_scope.cancel()

    run(main)


def test_timer_loop_gives_up_and_stream_breaks():
    async def main():
        a, b, wire = make_pair()
        wire.drop = lambda dst, s: dst == "b"  # b is unreachable from now on
        closed = []
        a._on_closed = lambda: closed.append("a")
        async with trio.open_nursery() as n:
            n.start_soon(a.timer_loop)
            await a.send_all(b"into the void")
            with pytest.raises(trio.BrokenResourceError):
                await a.receive_some(10)
            assert a.conn.reset and closed == ["a"]
            with pytest.raises(trio.BrokenResourceError):
                await a.send_all(b"more")
        # the timer loop returned by itself once the connection was closed

    run(main, limit=1000.0)


# ------------------------------------------------------------------ opens, resets, closing

def test_wait_established_and_refused():
    async def main():
        wire = Wire()
        now = trio.current_time()
        ca = TcpConnection.connect(1, 2, now, iss=7, mss=1460)
        a = VirtualTcpStream(ca, wire.transmitter("a"))
        wire.ends["a"] = a
        syns = []

        def fake_peer(dst, seg):
            syns.append(seg)
            return True

        wire.drop = fake_peer
        outcome = []

        async def waiter():
            try:
                await a.wait_established()
            except trio.BrokenResourceError as exc:
                outcome.append(exc)

        async with trio.open_nursery() as n:
            n.start_soon(a.timer_loop)
            a.flush()
            n.start_soon(waiter)
            await trio.sleep(1.5)  # ok-sleep: virtual time (MockClock): the SYN is retransmitted once (RTO 1 s)
            assert len(syns) == 2 and all(s.flags == SYN and s.seq == 7 for s in syns)
            assert outcome == []
            # the peer refuses: RST|ACK answering the SYN
            passive = TcpConnection.from_syn(syns[0], now, iss=0, mss=1460)
            a.deliver(passive.refuse())
        assert len(outcome) == 1
        with pytest.raises(trio.BrokenResourceError):
            await a.wait_established()
        assert a.conn.reset and a.conn.closed

    run(main)


def test_wait_established_succeeds():
    async def main():
        wire = Wire()
        ca = TcpConnection.connect(1, 2, trio.current_time(), iss=7, mss=1460)
        a = VirtualTcpStream(ca, wire.transmitter("a"))
        wire.ends["a"] = a

        def answer(dst, seg):
            if dst == "b" and "b" not in wire.ends:
                cb = TcpConnection.from_syn(seg, trio.current_time(), iss=99, mss=1460)
                wire.ends["b"] = VirtualTcpStream(cb, wire.transmitter("b"))
                cb.accept(trio.current_time())
                wire.ends["b"].flush()
                return True
            return False

        wire.drop = answer
        async with trio.open_nursery() as n:
            n.start_soon(a.timer_loop)
            a.flush()
            await a.wait_established()
            await a.send_all(b"hi")
            assert await wire.ends["b"].receive_some() == b"hi"
            n.cancel_scope.cancel()

    run(main)


def test_abort_if_open_resets_peer_and_notifies_once():
    async def main():
        events = []
        a, b, _ = make_pair(on_closed=events.append)
        await a.send_all(b"x")
        a.abort_if_open()
        a.abort_if_open()  # idempotent
        assert sorted(events) == ["a", "b"]
        with pytest.raises(trio.BrokenResourceError):
            await b.receive_some(10)  # unread data is discarded by the reset
        with pytest.raises(trio.BrokenResourceError):
            await b.send_all(b"y")
        with pytest.raises(trio.BrokenResourceError):
            await a.receive_some(10)
        with pytest.raises(trio.BrokenResourceError):
            await a.send_all(b"z")  # aborted, not closed: Broken, not Closed
        await a.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await a.receive_some(10)

    run(main)


def test_graceful_close_half_close_and_on_closed():
    async def main():
        events = []
        a, b, _ = make_pair(on_closed=events.append)
        async with trio.open_nursery() as n:
            n.start_soon(a.timer_loop)
            n.start_soon(b.timer_loop)
            await a.send_all(b"request")
            await a.send_eof()  # returns once the FIN is acknowledged
            assert a.conn.state == "FIN_WAIT_2" and a.conn.all_sent_acked
            assert await b.receive_some() == b"request"
            assert await b.receive_some() == b""
            await b.send_all(b"response")
            with pytest.raises(trio.ClosedResourceError):
                await a.send_all(b"late")
            await b.aclose()
            assert await a.receive_some() == b"response"
            assert await a.receive_some() == b""
            assert b.conn.closed and a.conn.state == "TIME_WAIT" and events == ["b"]
        assert a.conn.closed and events == ["b", "a"]  # TIME_WAIT expired in the timer loop

    run(main)


def test_aclose_with_unread_data_resets_peer():
    async def main():
        a, b, _ = make_pair()
        await b.send_all(b"never read")
        await a.aclose()
        assert a.conn.closed and b.conn.reset
        with pytest.raises(trio.BrokenResourceError):
            await b.send_all(b"x")

    run(main)


def test_aclose_is_bounded_when_the_peer_is_gone():
    async def main():
        a, b, wire = make_pair()
        wire.drop = lambda dst, s: True
        async with trio.open_nursery() as n:
            n.start_soon(a.timer_loop)
            await a.send_all(b"unacked")
            t0 = trio.current_time()
            await a.aclose()
            assert trio.current_time() - t0 <= a.close_timeout + 0.01
            assert a.conn.closed
        with pytest.raises(trio.ClosedResourceError):
            await a.send_all(b"x")

    run(main, limit=100.0)


def test_socket_info():
    info = SocketInfo(("192.168.127.1", 53), ("192.168.127.2", 5555))
    assert info.getsockname() == ("192.168.127.1", 53)
    assert info.getpeername() == ("192.168.127.2", 5555)
    assert info.family == 2


# ------------------------------------------------------------------ listener

def test_listener_push_accept_backlog_close():
    async def main():
        listener = VirtualTcpListener(backlog=2)
        pairs = [make_pair() for _ in range(3)]
        assert listener.push(pairs[0][1]) and listener.push(pairs[1][1])
        assert not listener.push(pairs[2][1])  # backlog full
        assert await listener.accept() is pairs[0][1]
        await listener.aclose()
        assert pairs[1][1].conn.closed and pairs[1][0].conn.reset  # pending connection was reset
        assert not listener.push(pairs[2][1])
        with pytest.raises(trio.ClosedResourceError):
            await listener.accept()
        await listener.aclose()

    run(main)


def test_listener_accept_waits_for_push():
    async def main():
        listener = VirtualTcpListener()
        a, b, _ = make_pair()
        got = []

        async def acceptor():
            got.append(await listener.accept())

        async with trio.open_nursery() as n:
            n.start_soon(acceptor)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []
            assert listener.push(b)
        assert got == [b]
        async with listener:
            pass

    run(main)


def test_concurrent_receivers_conflict():
    async def main():
        a, b, _ = make_pair()
        with pytest.raises(trio.BusyResourceError):
            async with trio.open_nursery() as n:
                n.start_soon(b.receive_some, 10)
                n.start_soon(b.receive_some, 10)

    with pytest.raises(BaseException) as info:
        run(main)
    # trio wraps the failure in an exception group (strict groups) or not: either way a BusyResourceError
    assert "BusyResourceError" in repr(info.value) or isinstance(info.value, trio.BusyResourceError)


def test_check_half_closeable_stream_real_clock():
    """The same generic checks without the autojump clock: nothing may rely on virtual time."""

    async def main():
        async with trio.open_nursery() as nursery:
            async def stream_maker():
                a, b, _ = make_pair()
                nursery.start_soon(a.timer_loop)
                nursery.start_soon(b.timer_loop)
                return a, b

            await trio.testing.check_half_closeable_stream(stream_maker, None)
            nursery.cancel_scope.cancel()

    run(main, autojump=False, limit=20.0)


@pytest.mark.parametrize("seed", range(4))
def test_lossy_wire_transfer_with_timer_loops(seed):
    """Random loss in both directions (data, ACKs, FINs): the timers repair everything."""
    rng = random.Random(seed)
    d1, d2 = rng.randbytes(400_000), rng.randbytes(300_000)

    async def main():
        a, b, wire = make_pair(buf_a=1 << 15, buf_b=1 << 16)
        drops = []
        wire.drop = lambda dst, s: not s.flags & RST and rng.random() < 0.05 and (drops.append(s) or True)
        t0 = trio.current_time()
        got = {"a": bytearray(), "b": bytearray()}

        async def one_way(src, dst, data, out):
            async def sender():
                view = memoryview(data)
                i = 0
                while i < len(data):
                    n = rng.randint(1, 50_000)
                    await src.send_all(view[i:i + n])
                    i += n
                await src.send_eof()

            async def receiver():
                while True:
                    chunk = await dst.receive_some(rng.randint(1, 40_000))
                    if not chunk:
                        return
                    out.extend(chunk)

            async with trio.open_nursery() as n:
                n.start_soon(sender)
                n.start_soon(receiver)

        async with trio.open_nursery() as n:
            n.start_soon(a.timer_loop)
            n.start_soon(b.timer_loop)
            async with trio.open_nursery() as n2:
                n2.start_soon(one_way, a, b, d1, got["b"])
                n2.start_soon(one_way, b, a, d2, got["a"])
            n.cancel_scope.cancel()
        assert bytes(got["b"]) == d1 and bytes(got["a"]) == d2
        # the loss was real and was repaired by retransmission timers (virtual time passed)
        assert len(drops) > 5 and any(s.payload for s in drops)
        assert trio.current_time() - t0 >= a.conn.rto_min

    run(main, limit=3000.0)
