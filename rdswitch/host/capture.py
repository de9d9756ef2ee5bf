"""``--capture FILE``: every frame through the switch as pcap records (a debugging aid).

The capture is live: records reach the file (or ``-``, stdout) at least every
:data:`FLUSH_INTERVAL` seconds while frames flow, and :meth:`Capture.run`
(a task of the process) writes out whatever is left after the traffic stops,
so ``tshark -r FILE`` or ``host-switch ... --capture - | wireshark -k -i -``
see frames while the switch runs.

Frames are buffered per batch and written with one ``write`` per flush; the
clock is read once per batch (for the records' timestamps), never per frame.
A pipe or socket is written without blocking: a reader that falls behind
costs at most :data:`MAX_BACKLOG` bytes, then whole records are dropped (and
counted) rather than stalling the network.
"""

from __future__ import annotations

import logging
import os
import select
import stat
import sys
import time

import trio

from ..wire import pcap

log = logging.getLogger("rdswitch.host")

#: Longest time a captured frame waits in memory while frames keep coming.
FLUSH_INTERVAL = 0.1
#: Buffered bytes that trigger a write without waiting for the interval.
FLUSH_BYTES = 256 * 1024
#: Unwritten bytes kept for a slow pipe reader before records are dropped.
MAX_BACKLOG = 8 * 1024 * 1024
#: How long close() keeps trying to hand the rest to a slow pipe reader.
CLOSE_TIMEOUT = 2.0


def _take_stdout() -> int:
    """A descriptor for the capture on what was stdout; stdout itself becomes stderr.

    Nothing else (a stray print, a library) can then write text into the pcap stream.
    """
    sys.stdout.flush()
    fd = os.dup(1)
    os.set_inheritable(fd, False)
    os.dup2(2, 1)
    if sys.platform == "win32":  # a CRT descriptor in text mode would turn every \n of the pcap into \r\n
        import msvcrt
        msvcrt.setmode(fd, os.O_BINARY)
    return fd


class Capture:
    """Every frame that enters the switch, as pcap records; ``path`` ``-`` is stdout."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.failed = False
        self.dropped = 0  # records not written because a pipe reader fell behind
        self._chunks: list[bytes] = [pcap.pcap_header()]  # records not yet handed to write()
        self._chunk_bytes = len(self._chunks[0])
        self._backlog = b""  # bytes a non-blocking write() did not take yet
        self._next_flush = 0.0
        if path == "-":
            self._fd = _take_stdout()
        else:
            # O_BINARY: Windows (text mode would mangle the pcap); O_CLOEXEC: POSIX (Windows: not inheritable anyway)
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
            self._fd = os.open(path, flags, 0o644)
        mode = os.fstat(self._fd).st_mode
        self._nonblocking = stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)
        if self._nonblocking:
            os.set_blocking(self._fd, False)
        self.flush()  # the header at once: a reader can open the stream now

    @property
    def pending(self) -> int:
        """Bytes captured but not yet written."""
        return self._chunk_bytes + len(self._backlog)

    def write(self, frames) -> None:
        """Buffer one batch of frames; write them out if the interval has passed."""
        if self.failed:
            return
        ts = time.time()
        if len(self._backlog) > MAX_BACKLOG:
            self._drop(frames)
            return
        record = pcap.pcap_record
        chunks = self._chunks
        n = 0
        for frame in frames:
            rec = record(frame, ts)
            chunks.append(rec)
            n += len(rec)
        self._chunk_bytes += n
        if ts >= self._next_flush or self._chunk_bytes >= FLUSH_BYTES:
            self._next_flush = ts + FLUSH_INTERVAL
            self.flush()

    def _drop(self, frames) -> None:
        before = self.dropped
        self.dropped += sum(1 for _ in frames)
        if before == 0 and self.dropped:
            log.warning("capture: the reader of %s falls behind; dropping records (counted in Capture.dropped)",
                        self.path)
        self.flush()

    def flush(self) -> None:
        """Write out what is buffered; cheap (no system call) when nothing is pending."""
        if not (self._chunk_bytes or self._backlog) or self.failed:
            return
        data = self._backlog + b"".join(self._chunks) if self._chunks else self._backlog
        self._chunks.clear()
        self._chunk_bytes = 0
        try:
            self._backlog = self._write_some(data)
        except OSError as exc:  # a full disk or a closed pipe stops the capture, not the network
            self._backlog = b""
            self.failed = True
            log.error("capture stopped: %s", exc)

    def _write_some(self, data: bytes) -> bytes:
        """Write as much as the descriptor takes now; return the rest (only a pipe leaves any)."""
        view = memoryview(data)
        try:
            while view:
                try:
                    n = os.write(self._fd, view)
                except BlockingIOError:
                    break
                view = view[n:]
            return bytes(view)
        finally:
            view.release()

    async def run(self, interval: float = FLUSH_INTERVAL) -> None:
        """Write out the tail of the traffic (and a slow pipe's backlog) every ``interval``."""
        while not self.failed:
            await trio.sleep(interval)
            self.flush()

    def close(self) -> None:
        """Flush what is left (giving a pipe reader up to CLOSE_TIMEOUT) and close."""
        if self._fd < 0:
            return
        self.flush()
        deadline = time.monotonic() + CLOSE_TIMEOUT
        while self._backlog and not self.failed:
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("capture: %d bytes never reached the reader of %s", len(self._backlog), self.path)
                break
            select.select([], [self._fd], [], left)
            self.flush()
        try:
            os.close(self._fd)
        except OSError:
            pass
        self._fd = -1
