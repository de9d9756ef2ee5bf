import pytest
import trio
import trio.testing

from rdswitch.config import READY, SIGNATURE
from rdswitch.handshake import (
    HandshakeError,
    check_signature,
    find_vm,
    hvsock_guid,
    probe,
    serve_handshake,
    signal_ready,
)
from rdswitch.aio.connect import dial, dial_stream, listen, listen_stream


def run(fn, *args):
    async def main():
        with trio.fail_after(10):
            await fn(*args)

    trio.run(main)


def test_signature_is_exact():
    assert len(SIGNATURE) == 53
    assert check_signature(SIGNATURE)
    assert check_signature(bytearray(SIGNATURE))
    assert not check_signature(SIGNATURE[:-1])
    assert not check_signature(SIGNATURE + b"\n")
    assert not check_signature(b"")


def test_hvsock_guid():
    assert hvsock_guid(6669) == "00001a0d-facb-11e6-bd58-64006a7986d3"
    assert hvsock_guid(6656) == "00001a00-facb-11e6-bd58-64006a7986d3"
    assert hvsock_guid(0xFFFFFFFF) == "ffffffff-facb-11e6-bd58-64006a7986d3"
    with pytest.raises(ValueError):
        hvsock_guid(-1)
    with pytest.raises(ValueError):
        hvsock_guid(2**32)


async def _fake_server(url, reply, on_accept=None, *, task_status=trio.TASK_STATUS_IGNORED):
    """Accepts connections and writes reply (or nothing, if None) to each.

    ``on_accept(n)`` is called with the number of connections accepted so far.
    """
    listener = await listen_stream(url)
    task_status.started(listener.url)
    accepted = 0
    async with listener:
        while True:
            s = await listener.accept()
            accepted += 1
            if on_accept is not None:
                on_accept(accepted)
            if reply is not None:
                await s.send_all(reply)
                await s.aclose()
            # reply None: keep the connection open and silent


def test_full_handshake_then_data_link(tmp_path):
    hs = f"unix://{tmp_path}/hs.sock"
    data_url = f"unix://{tmp_path}/data.sock"
    wrong = f"unix://{tmp_path}/wrong.sock"
    silent = f"unix://{tmp_path}/silent.sock"
    absent = f"unix://{tmp_path}/absent.sock"

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(_fake_server, wrong, SIGNATURE[:-1] + b"X")
            # the host probes every candidate once a round, all at once; the silent
            # one's second probe means a whole round (hs included) found nothing
            second_round = trio.Event()
            await nursery.start(_fake_server, silent, None, lambda n: n == 2 and second_round.set())

            vm_result = []

            async def vm_side():
                await serve_handshake(hs)
                link = await dial(data_url)
                vm_result.append(await link.receive_batch())
                await link.send_batch([b"from-vm"])
                await link.aclose()

            async def start_vm_late():
                await second_round.wait()  # the host is already probing, and hs did not answer
                nursery.start_soon(vm_side)

            nursery.start_soon(start_vm_late)
            found = await find_vm([absent, wrong, silent, hs], interval=0.1, give_up=5, probe_timeout=0.5)
            assert found == hs
            data_listener = await listen(data_url)
            await signal_ready(found)
            link = await data_listener.accept()
            await link.send_batch([b"from-host"])
            assert await link.receive_batch() == [b"from-vm"]
            assert vm_result == [[b"from-host"]]
            await link.aclose()
            await data_listener.aclose()
            # the VM stopped listening for the handshake
            with pytest.raises(OSError):
                await dial_stream(hs)
            nursery.cancel_scope.cancel()

    run(main)


def test_find_vm_gives_up(tmp_path):
    wrong = f"unix://{tmp_path}/wrong.sock"

    probes = []

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(_fake_server, wrong, b"not the phrase", probes.append)
            t0 = trio.current_time()
            with pytest.raises(HandshakeError, match="no VM answered"):
                await find_vm([wrong, f"unix://{tmp_path}/none.sock"], interval=0.05, give_up=0.3)
            assert trio.current_time() - t0 == pytest.approx(0.3)  # virtual time: exactly give_up
            nursery.cancel_scope.cancel()

    # A mock clock that jumps whenever every task waits: the rounds (one every
    # 0.05 s, each over at once) run in no real time, and the timing is exact.
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert 6 <= len(probes) <= 7  # a round every 0.05 s from 0 until it gave up at 0.3 (a tie at 0.3 may go either way)
    with pytest.raises(HandshakeError):
        trio.run(find_vm, [])


def test_probe_reads_a_slow_signature_in_pieces(tmp_path):
    url = f"unix://{tmp_path}/p.sock"

    async def dribble(*, task_status=trio.TASK_STATUS_IGNORED):
        listener = await listen_stream(url)
        task_status.started()
        s = await listener.accept()
        for i in range(0, len(SIGNATURE), 10):
            await s.send_all(SIGNATURE[i : i + 10])
            # the prober has taken this piece and waits for more: each piece is its own read
            await trio.testing.wait_all_tasks_blocked()
        await s.aclose()
        await listener.aclose()

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(dribble)
            assert await probe(url, timeout=2)

    run(main)


def test_serve_handshake_survives_garbage_and_probes(tmp_path):
    url = f"unix://{tmp_path}/hs.sock"

    async def main():
        async with trio.open_nursery() as inner:
            bound = await inner.start(serve_handshake, url)
            assert bound == url
            # a probe: reads the signature and hangs up
            assert await probe(url)
            # garbage instead of READY: the VM keeps listening
            s = await dial_stream(url)
            assert await s.receive_some(100) == SIGNATURE
            await s.send_all(b"NOPE!")
            await s.aclose()
            assert await probe(url)
            # READY ends serve_handshake, so the nursery exits (else fail_after fires)
            await signal_ready(url)

    run(main)


def test_signal_ready_to_wrong_peer(tmp_path):
    url = f"unix://{tmp_path}/w.sock"

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(_fake_server, url, b"hello")
            with pytest.raises(HandshakeError, match="did not send the handshake signature"):
                await signal_ready(url)
            with pytest.raises(HandshakeError, match="failed"):
                await signal_ready(f"unix://{tmp_path}/none.sock")
            nursery.cancel_scope.cancel()

    run(main)


def test_ready_bytes():
    assert READY == b"READY"


def test_host_keeps_looking_after_the_give_up_and_finds_a_late_vm(tmp_path, caplog):
    """host-switch's --handshake loop: no VM for 5 minutes is logged, not the end; a VM at minute 7 gets READY."""
    import logging

    from rdswitch.handshake import GIVE_UP
    from rdswitch.host.__main__ import handshake

    url = f"unix://{tmp_path}/late.sock"

    class FakeHostSwitch:  # what handshake() reads: the sessions and the event that says they changed
        sessions: list = []
        sessions_changed = trio.Event()

    got_ready_at = []

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handshake, FakeHostSwitch(), [url])
            await trio.sleep(7 * 60)  # ok-sleep: virtual time (MockClock): the VM appears at minute 7
            with trio.move_on_after(15 * 60):  # (virtual time: bounds a host that stopped looking)
                await serve_handshake(url)  # returns once the host said READY
                got_ready_at.append(trio.current_time())
            nursery.cancel_scope.cancel()

    caplog.set_level(logging.INFO)
    # virtual time: the clock jumps whenever every task waits, so 7 minutes take none
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert got_ready_at and 7 * 60 <= got_ready_at[0] <= 8 * 60  # within the back-off bound (MAX_INTERVAL)
    gave_up = [r for r in caplog.records if "no VM answered" in r.getMessage()]
    assert len(gave_up) == 1 and "still looking" in gave_up[0].getMessage()  # once per give-up period
    assert GIVE_UP < 7 * 60 < 2 * GIVE_UP


def test_keep_finding_vm_backs_off_to_a_bounded_interval(tmp_path):
    from rdswitch.handshake import keep_finding_vm

    wrong = f"unix://{tmp_path}/wrong.sock"
    probes = []

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(_fake_server, wrong, b"not the phrase", lambda n: probes.append(trio.current_time()))
            with trio.move_on_after(100):
                await keep_finding_vm([wrong], interval=1, give_up=10, max_interval=4)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    gaps = [round(b - a, 6) for a, b in zip(probes, probes[1:])]
    assert set(gaps[:9]) == {1} and max(gaps) == 4 and gaps[-1] == 4  # 1 s, then 2 s, then at most 4 s
    assert 2 in gaps
    with pytest.raises(HandshakeError):
        trio.run(keep_finding_vm, [])
