"""Small trio building blocks every process uses: the accept loop, pipe, read-exactly."""

from __future__ import annotations

import errno
import logging
from typing import Awaitable, Callable

import trio

#: accept() errors that mean "out of resources right now", not "listener broken".
TRANSIENT_ACCEPT_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED})
#: Pause after a transient accept error, so a full fd table does not spin the loop.
ACCEPT_BACKOFF = 0.1
#: Bytes asked for per receive when piping two streams.
PIPE_CHUNK = 1 << 18


async def accept_loop(listener: trio.abc.Listener, handler: Callable[[object], Awaitable[None]],
                      nursery: trio.Nursery, what: str, log: logging.Logger) -> None:
    """Accept connections until cancelled; start ``handler(conn)`` in ``nursery`` for each.

    A transient error (EMFILE and friends, or a trio.BrokenResourceError from a
    virtual listener) is logged and retried after a short back-off; any other
    OSError ends the loop by raising it (the listener is broken).
    """
    while True:
        try:
            conn = await listener.accept()
        except (OSError, trio.BrokenResourceError) as exc:
            if isinstance(exc, OSError) and exc.errno not in TRANSIENT_ACCEPT_ERRORS:
                raise
            log.warning("%s: accept failed: %s; retrying", what, exc)
            await trio.sleep(ACCEPT_BACKOFF)
            continue
        nursery.start_soon(handler, conn)


async def pipe(a: trio.abc.HalfCloseableStream, b: trio.abc.HalfCloseableStream, chunk: int = PIPE_CHUNK) -> None:
    """Copy both ways, carrying half-close; return when both directions have ended.

    An error in either direction ends both and is raised (the caller closes the streams).
    """

    async def one_way(src: trio.abc.HalfCloseableStream, dst: trio.abc.HalfCloseableStream) -> None:
        while True:
            data = await src.receive_some(chunk)
            if not data:
                break
            await dst.send_all(data)
        await dst.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one_way, a, b)
        nursery.start_soon(one_way, b, a)


async def read_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    """``n`` bytes from ``stream``; fewer only if the peer closed first."""
    got = bytearray()
    while len(got) < n:  # bounded: each pass adds >= 1 byte or returns
        chunk = await stream.receive_some(n - len(got))
        if not chunk:
            break
        got += chunk
    return bytes(got)
