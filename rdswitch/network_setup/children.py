"""Starting and stopping network-setup's child processes (trio)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal

import trio

log = logging.getLogger("rdswitch.network_setup")


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc; empty if it is gone)."""
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    out += [int(x) for x in f.read().split()]
    except OSError:
        return []
    return out


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


async def stop_process(proc: trio.Process, name: str, timeout: float, *, with_children: bool = False) -> None:
    """SIGTERM (also to its children when ``with_children``), wait ``timeout`` s, then SIGKILL; reap.

    ``with_children`` is for ``unshare --fork``: unshare ignores SIGTERM while
    it waits, and its child is pid 1 of a new pid namespace, which only dies of
    signals it handles -- or of SIGKILL, which takes the whole namespace along.
    """
    if proc.returncode is not None:
        return
    kids = child_pids(proc.pid) if with_children else []
    log.info("stopping %s (pid %d%s)", name, proc.pid, f", children {kids}" if kids else "")
    for pid in kids:
        _signal(pid, signal.SIGTERM)
    _signal(proc.pid, signal.SIGTERM)
    with trio.move_on_after(timeout):
        await proc.wait()
        return
    kids = child_pids(proc.pid) if with_children else []
    log.warning("%s (pid %d) did not exit within %gs of SIGTERM; killing it", name, proc.pid, timeout)
    for pid in kids:
        _signal(pid, signal.SIGKILL)
    _signal(proc.pid, signal.SIGKILL)
    with trio.move_on_after(5):
        await proc.wait()
        return
    log.error("%s (pid %d) survived SIGKILL for 5s", name, proc.pid)
