"""Logging set-up shared by the four processes."""

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
