"""A table of flows with an idle timeout and an LRU bound (sans-IO: the caller passes ``now``).

A flow is whatever the caller keeps per key (wsl-proxy: one client address
on one localhost UDP listener, carried by its own upstream socket).  Flows
idle out after ``idle_timeout`` seconds without activity (``add``, ``get``, ``touch``),
and at most ``max_flows`` exist: adding one beyond that evicts the least
recently used.  The table only says which flows to close; the caller closes them.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class FlowTable(Generic[K, V]):
    def __init__(self, idle_timeout: float, max_flows: int):
        if idle_timeout <= 0:
            raise ValueError("idle_timeout must be positive")
        if max_flows < 1:
            raise ValueError("max_flows must be at least 1")
        self.idle_timeout = idle_timeout
        self.max_flows = max_flows
        # least recently used first; value is (flow, last activity)
        self._flows: OrderedDict[K, tuple[V, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._flows)

    def __contains__(self, key: K) -> bool:
        return key in self._flows

    def values(self) -> list[V]:
        return [v for v, _ in self._flows.values()]

    def get(self, key: K, now: float) -> V | None:
        """The flow for ``key`` (marking it active), or None."""
        entry = self._flows.get(key)
        if entry is None:
            return None
        self._flows[key] = (entry[0], now)
        self._flows.move_to_end(key)
        return entry[0]

    def touch(self, key: K, now: float) -> None:
        self.get(key, now)

    def add(self, key: K, flow: V, now: float) -> list[V]:
        """Insert a flow; returns the flows evicted to stay within ``max_flows``
        (the caller closes them).  Replacing a key evicts its old flow."""
        evicted: list[V] = []
        old = self._flows.pop(key, None)
        if old is not None and old[0] is not flow:
            evicted.append(old[0])
        while len(self._flows) >= self.max_flows:
            _, (victim, _) = self._flows.popitem(last=False)
            evicted.append(victim)
        self._flows[key] = (flow, now)
        return evicted

    def remove(self, key: K, flow: V | None = None) -> None:
        """Forget ``key`` (only if it still maps to ``flow``, when given)."""
        entry = self._flows.get(key)
        if entry is not None and (flow is None or entry[0] is flow):
            del self._flows[key]

    def expire(self, now: float) -> list[V]:
        """Remove and return every flow idle for ``idle_timeout`` or longer."""
        out: list[V] = []
        while self._flows:
            key, (flow, last) = next(iter(self._flows.items()))
            if now - last < self.idle_timeout:
                break
            del self._flows[key]
            out.append(flow)
        return out

    def next_expiry(self) -> float | None:
        if not self._flows:
            return None
        _, last = next(iter(self._flows.values()))
        return last + self.idle_timeout
