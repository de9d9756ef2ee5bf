"""The live pcap capture: flushed per interval/batch, cheap when idle, never stalls on a slow pipe."""

import os
import struct

import pytest
import trio

from rdswitch.host import capture as capture_mod
from rdswitch.host.capture import Capture
from rdswitch.wire.pcap import PCAP_MAGIC

FRAME = bytes.fromhex("5a94efe40cdd5a94efe40cee0800") + bytes(range(50))


def records(data: bytes) -> list[bytes]:
    """The frames in a pcap byte stream (up to the last complete record)."""
    assert struct.unpack_from("<I", data)[0] == PCAP_MAGIC
    out, pos = [], 24
    while pos + 16 <= len(data):
        _, _, incl, _ = struct.unpack_from("<IIII", data, pos)
        if pos + 16 + incl > len(data):
            break
        out.append(data[pos + 16 : pos + 16 + incl])
        pos += 16 + incl
    return out


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_header_is_on_disk_at_once_and_first_batch_immediately(tmp_path):
    path = tmp_path / "c.pcap"
    cap = Capture(str(path))
    try:
        assert len(read(path)) == 24
        cap.write([FRAME, FRAME])
        assert records(read(path)) == [FRAME, FRAME]  # without close()
    finally:
        cap.close()


def test_batch_within_interval_waits_for_flush_then_is_there(tmp_path):
    path = tmp_path / "c.pcap"
    cap = Capture(str(path))
    try:
        cap.write([FRAME])
        cap.write([FRAME[:20]])  # within FLUSH_INTERVAL of the first: buffered
        assert cap.pending > 0
        assert records(read(path)) == [FRAME]
        cap.flush()
        assert cap.pending == 0
        assert records(read(path)) == [FRAME, FRAME[:20]]
    finally:
        cap.close()


def test_flush_with_nothing_pending_makes_no_system_call(tmp_path, monkeypatch):
    cap = Capture(str(tmp_path / "c.pcap"))
    try:
        calls = []
        real_write = os.write
        monkeypatch.setattr(capture_mod.os, "write", lambda fd, b: calls.append(1) or real_write(fd, b))
        for _ in range(1000):
            cap.flush()
        assert calls == []
        cap.write([FRAME])
        cap.flush()
        assert calls  # and something pending is written
    finally:
        cap.close()


def test_clock_is_read_once_per_batch_not_per_frame(tmp_path, monkeypatch):
    cap = Capture(str(tmp_path / "c.pcap"))
    try:
        reads = []
        monkeypatch.setattr(capture_mod.time, "time", lambda: reads.append(1) or 1_700_000_000.0)
        cap.write([FRAME] * 500)
        assert len(reads) == 1
    finally:
        cap.close()
    assert len(records(read(tmp_path / "c.pcap"))) == 500


def test_size_threshold_flushes_before_the_interval(tmp_path, monkeypatch):
    path = tmp_path / "c.pcap"
    monkeypatch.setattr(capture_mod, "FLUSH_BYTES", 1000)
    cap = Capture(str(path))
    try:
        cap.write([FRAME])
        cap.write([FRAME] * 20)  # > 1000 bytes: written although the interval has not passed
        assert len(records(read(path))) == 21
    finally:
        cap.close()


def test_run_task_writes_the_tail_after_traffic_stops(tmp_path):
    path = tmp_path / "c.pcap"
    cap = Capture(str(path))

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cap.run, 0.01)
            cap.write([FRAME])
            cap.write([FRAME])  # buffered: within the interval
            with trio.fail_after(5):
                while len(records(read(path))) < 2:
                    await trio.sleep(0.01)  # ok-sleep: the poll interval of a bounded wait for the file
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        cap.close()


def test_slow_pipe_reader_never_blocks_and_stream_stays_valid(monkeypatch):
    monkeypatch.setattr(capture_mod, "MAX_BACKLOG", 256 * 1024)
    monkeypatch.setattr(capture_mod, "CLOSE_TIMEOUT", 0.2)
    r, w = os.pipe()
    try:
        # a Capture on the pipe's write end, as --capture - gets when stdout is a pipe
        monkeypatch.setattr(capture_mod, "_take_stdout", lambda: w)
        cap = Capture("-")
        big = FRAME + bytes(1400)
        for _ in range(2000):  # ~3 MB: far more than a pipe holds; no reader yet
            cap.write([big])
            cap.flush()
        assert cap.dropped > 0  # bounded memory: records were dropped, not queued forever
        assert cap.pending <= capture_mod.MAX_BACKLOG + 2 * len(big) + 32
        os.set_blocking(r, False)
        data = b""
        for _ in range(10000):  # drain the pipe while the capture writes its backlog
            try:
                chunk = os.read(r, 1 << 16)
            except BlockingIOError:
                if not cap.pending:
                    break
                cap.flush()
                continue
            data += chunk
        cap.close()
        frames = records(data)
        assert len(frames) + cap.dropped == 2000
        assert all(f == big for f in frames)
    finally:
        os.close(r)


def test_a_closed_pipe_stops_the_capture_not_the_caller(monkeypatch):
    r, w = os.pipe()
    monkeypatch.setattr(capture_mod, "_take_stdout", lambda: w)
    cap = Capture("-")
    os.close(r)
    cap.write([FRAME])
    cap.flush()
    assert cap.failed
    cap.write([FRAME])  # ignored, no exception
    cap.close()


@pytest.mark.parametrize("n", [1, 3])
def test_close_writes_everything(tmp_path, n):
    path = tmp_path / "c.pcap"
    cap = Capture(str(path))
    for _ in range(n):
        cap.write([FRAME])
    cap.close()
    cap.close()  # idempotent
    assert records(read(path)) == [FRAME] * n
