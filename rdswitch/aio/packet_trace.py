"""Per-packet tracing, switched on and off at run time with SIGUSR1 (like the incumbent's vm-switch).

Off by default (``--trace-packets`` starts it on).  Each SIGUSR1 flips it and
logs the new state; while on, every frame a process moves gets one INFO line
(:func:`rdswitch.wire.summary.summary`)::

    rdswitch.packets INFO <session 1 unix://...> from VM: 5a:94:ef:e4:0c:ee > ff:ff:ff:ff:ff:ff ARP who-has ...

``enabled`` is a plain module attribute that a frame path reads once per
batch (a trio task, or a frame pump's threads alike): off, it costs one
attribute load; nothing else is locked or woken.  ``kill -USR1 PID`` of
host-switch or vm-switch toggles it; on Windows (no SIGUSR1) only the flag
works.
"""

from __future__ import annotations

import logging
import signal

import trio

from ..wire.summary import summary

log = logging.getLogger("rdswitch.packets")

#: Read on the frame paths; written only by :func:`set_enabled`.
enabled = False


def set_enabled(on: bool, why: str) -> None:
    global enabled
    enabled = bool(on)
    log.info("per-packet tracing is now %s (%s)", "on" if enabled else "off", why)


def frames(where: str, batch) -> None:
    """One log line per frame of ``batch`` (call it only when :data:`enabled`)."""
    for frame in batch:
        log.info("%s: %s", where, summary(frame))


async def follow_sigusr1(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Flip :data:`enabled` on every SIGUSR1 until cancelled (started: the signal is ours from then on)."""
    sig = getattr(signal, "SIGUSR1", None)
    if sig is None:  # Windows
        task_status.started()
        return
    with trio.open_signal_receiver(sig) as signals:
        task_status.started()
        async for _ in signals:
            set_enabled(not enabled, "SIGUSR1")
