"""Logging set-up shared by the four processes, and one-line reasons for a failed task tree."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def setup_logging(debug: bool, logfile: str | None, *, stderr_level: int = logging.INFO) -> None:
    """Log to ``logfile`` (if given) and stderr; ``--debug`` makes both verbose.

    A log file that cannot be opened is reported and skipped, not fatal.
    """
    fmt = logging.Formatter(FORMAT)
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.DEBUG if debug else stderr_level)
    err.setFormatter(fmt)
    root.addHandler(err)
    if logfile:
        try:
            fh = logging.FileHandler(logfile)
        except OSError as exc:
            logging.getLogger("rdswitch").warning("cannot open log file %s (%s); logging to stderr only",
                                                  logfile, exc.strerror or exc)
        else:
            fh.setFormatter(fmt)
            root.addHandler(fh)
    for noisy in ("pyroute2", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def leaves(exc: BaseException) -> list[BaseException]:
    """The non-group exceptions inside ``exc`` (itself if it is not a group; trio wraps errors in groups)."""
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
