"""One VM connection = one switch port = one session nursery.

A :class:`Session` owns an outgoing frame queue and the writer task that
drains it in batches.  Everything that serves its VM (the writer, the NAT's
flows, DNS queries and DNS-over-TCP connections, API connections on the
gateway, forwarded connections into the VM) runs in ``session.nursery``, so
cancelling the session is the only teardown path.
"""

from __future__ import annotations

import collections
import itertools
import logging

import trio

from ..aio import packet_trace, trace

from ..stack.counters import Counters

log = logging.getLogger("rdswitch.host")

_ids = itertools.count(1)

# Frames queued towards one VM.  TCP never has more in flight than the VM's
# window, so the limit is a safety net against a misbehaving sender, not the
# flow control itself.
QUEUE_LIMIT_BYTES = 64 << 20
# The 16-bit framing carries at most this much per frame; a larger frame is
# dropped here (counted) rather than failing the whole batch in the writer.
MAX_FRAME = 65535
SEND_BATCH_BYTES = 1 << 20


class Session:
    def __init__(self, link, nursery: trio.Nursery, peer: str = "?") -> None:
        self.id = next(_ids)
        self.link = link
        self.nursery = nursery
        self.peer = peer
        self.counters = Counters()
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued_bytes = 0
        self._wakeup = trio.lowlevel.ParkingLot()
        self.closed = False
        # The link sends inline (a socket): frames go out from the task that made them.
        self._inline = bool(getattr(link, "can_send_inline", False))

    def __repr__(self) -> str:
        return f"<session {self.id} {self.peer}>"

    def enqueue(self, frame: bytes) -> None:
        """One frame towards the VM (sync, never blocks)."""
        self.send([frame])

    def send(self, frames: list[bytes]) -> None:
        """Frames towards the VM (sync, never blocks; a full queue drops, counted).

        Over a socket link the frames go out right here, in the caller's task,
        when the socket takes them; only what it does not take is left for the
        writer task (the link keeps it, in order).
        """
        if self.closed:
            return
        size = 0
        for frame in frames:
            size += len(frame)
            if len(frame) > MAX_FRAME:
                self.counters.drop("frame-too-large")
                frames = [f for f in frames if len(f) <= MAX_FRAME]
                size = sum(len(f) for f in frames)
                break
        if not frames:
            return
        if packet_trace.enabled:
            packet_trace.frames(f"{self!r} to VM", frames)
        values = self.counters.values
        if self._inline and not self._queue:
            link = self.link
            if link.pending_bytes + size > QUEUE_LIMIT_BYTES:
                self.counters.drop("queue-full", len(frames))
                return
            if trace.enabled:  # before the send: the peer may read it before the send returns here
                trace.frames("hs.link_write", frames)
            try:
                clear = link.try_send(frames)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.counters.drop("link-broken", len(frames))  # the reader sees it and ends the session
                return
            values["frames_out"] += len(frames)
            values["bytes_out"] += size
            if not clear:
                self._wakeup.unpark_all()
            return
        if self._queued_bytes + size > QUEUE_LIMIT_BYTES:
            self.counters.drop("queue-full", len(frames))
            return
        was_empty = not self._queue
        self._queue.extend(frames)
        self._queued_bytes += size
        if was_empty:
            self._wakeup.unpark_all()

    async def writer(self) -> None:
        """Send what could not go out inline: the link's leftovers, or the queue in batches."""
        link = self.link
        if self._inline:
            while True:
                while not link.pending_bytes:
                    await self._wakeup.park()
                await link.flush()
        queue = self._queue
        values = self.counters.values
        while True:
            while not queue:
                await self._wakeup.park()
            batch = []
            size = 0
            while queue and size < SEND_BATCH_BYTES:
                frame = queue.popleft()
                batch.append(frame)
                size += len(frame)
            self._queued_bytes -= size
            values["frames_out"] += len(batch)
            values["bytes_out"] += size
            await link.send_batch(batch)

    def close(self) -> None:
        self.closed = True
        self._queue.clear()
        self._queued_bytes = 0
