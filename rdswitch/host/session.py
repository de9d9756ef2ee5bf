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

    def __repr__(self) -> str:
        return f"<session {self.id} {self.peer}>"

    def enqueue(self, frame: bytes) -> bool:
        """Queue one frame towards the VM (sync, never blocks).  False if dropped."""
        if self.closed:
            return False
        n = len(frame)
        if n > MAX_FRAME:
            self.counters.drop("frame-too-large")
            return False
        if self._queued_bytes + n > QUEUE_LIMIT_BYTES:
            self.counters.drop("queue-full")
            return False
        self._queue.append(frame)
        self._queued_bytes += n
        if len(self._queue) == 1:
            self._wakeup.unpark_all()
        return True

    async def writer(self) -> None:
        """Drain the queue into the link, one ``send_batch`` per burst."""
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
            await self.link.send_batch(batch)

    def close(self) -> None:
        self.closed = True
        self._queue.clear()
        self._queued_bytes = 0
