"""An opt-in latency trace: where a small round trip's time goes, hop by hop.

Set ``RDSWITCH_TRACE_LATENCY=/path/to/file`` in the environment of
host-switch and vm-switch (or pass ``--trace-latency FILE``). Each process
then appends one line per hop of every small TCP segment (1..64 bytes of
payload, so a request/response exchange and not its ACKs or bulk data)::

    <CLOCK_MONOTONIC ns> <hop> <bytes>

CLOCK_MONOTONIC is one clock for every process of the machine, so the lines
of both processes can be merged. The hops, in the order a round trip from
the VM to a host server and back passes them:

    vm.tap_read  vm.link_write  hs.link_read  hs.nat  hs.host_write
    hs.host_read  hs.link_write  vm.link_read  vm.tap_write

``scripts/trace-latency`` runs a round-trip benchmark with the trace on and
prints the median time between consecutive hops. Off (the default), a hop
costs one test of a module-level boolean.
"""

from __future__ import annotations

import os
import time

ENV = "RDSWITCH_TRACE_LATENCY"
#: Payload sizes traced (a request/response message, not bulk data or bare ACKs).
MAX_TRACED = 64

enabled = False
_fd = -1


def start(path: str | None = None) -> None:
    """Trace to ``path`` (or the file named by the environment); no-op when neither is set."""
    global enabled, _fd
    path = path or os.environ.get(ENV)
    if not path:
        return
    _fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    enabled = True


def hop(name: str, nbytes: int) -> None:
    """Record that ``nbytes`` of payload passed hop ``name`` now (small payloads only)."""
    if 0 < nbytes <= MAX_TRACED:
        os.write(_fd, f"{time.monotonic_ns()} {name} {nbytes}\n".encode())


def tcp_payload_len(frame: bytes | memoryview) -> int:
    """The TCP payload length of an Ethernet+IPv4+TCP frame; 0 for anything else."""
    if len(frame) < 54 or frame[12] != 8 or frame[13] != 0 or frame[23] != 6:
        return 0
    ihl = (frame[14] & 0xF) * 4
    total = (frame[16] << 8) | frame[17]
    if len(frame) < 14 + ihl + 20:
        return 0
    thl = (frame[14 + ihl + 12] >> 4) * 4
    return max(0, total - ihl - thl)


def frames(name: str, batch) -> None:
    """Record hop ``name`` for every small TCP frame of ``batch``."""
    for frame in batch:
        n = tcp_payload_len(frame)
        if n:
            hop(name, n)
