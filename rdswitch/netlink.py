"""pyroute2 helpers shared by vm-switch and network-setup (blocking).

pyroute2's sync ``IPRoute``/``NetNS`` must be created, used and closed in one
thread (its async API does not run under trio).  So the functions that open
their own ``IPRoute`` are meant to run whole inside one
``trio.to_thread.run_sync`` call, and the ones that take an open ``ipr`` are
for such functions to call in that same thread.
"""

from __future__ import annotations

from pyroute2 import IPRoute


def link_index(ipr: IPRoute, name: str) -> int | None:
    """The index of interface ``name`` in ``ipr``'s namespace, or None."""
    idx = ipr.link_lookup(ifname=name)
    return idx[0] if idx else None


def link_exists(name: str) -> bool:
    """Whether interface ``name`` exists in this thread's network namespace."""
    with IPRoute() as ipr:
        return link_index(ipr, name) is not None


def loopback_up(ipr: IPRoute) -> None:
    """Bring ``lo`` up in ``ipr``'s namespace (a new namespace starts with it down)."""
    lo = link_index(ipr, "lo")
    if lo is not None:
        ipr.link("set", index=lo, state="up")
