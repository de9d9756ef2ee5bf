"""Counters of a session or of the gateway: totals and drops by reason (sans-IO)."""

from __future__ import annotations

import collections


class Counters:
    """Per-session (or per-gateway) counters; a plain dict view for the API."""

    def __init__(self) -> None:
        self.values: collections.Counter[str] = collections.Counter()
        self.drops: collections.Counter[str] = collections.Counter()

    def drop(self, reason: str, n: int = 1) -> None:
        self.drops[reason] += n

    def as_dict(self) -> dict:
        return {**self.values, "drops": dict(self.drops)}
