"""Helpers for reporting why a task tree ended (trio wraps errors in groups)."""

from __future__ import annotations


def leaves(exc: BaseException) -> list[BaseException]:
    """The non-group exceptions inside ``exc`` (itself if it is not a group)."""
    if isinstance(exc, BaseExceptionGroup):
        out: list[BaseException] = []
        for e in exc.exceptions:
            out.extend(leaves(e))
        return out
    return [exc]


def describe(exc: BaseException) -> str:
    """One line naming every distinct leaf error, for a log message."""
    seen = []
    for e in leaves(exc):
        text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        if text not in seen:
            seen.append(text)
    return "; ".join(seen)
