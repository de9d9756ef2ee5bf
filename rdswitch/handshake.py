"""The vsock handshake of the wire contract (docs/wire-contract.md), over streams by URL.

VM side (network-setup): :func:`serve_handshake` listens (vsock port 6669 in
production), writes the 53-byte signature to every connection and returns
once a connection sends ``READY``.  Then the VM dials the host data port.

Host side (host-switch): :func:`find_vm` dials every candidate about once a
second until one answers with the exact signature; the host then listens on
its data URL and calls :func:`signal_ready` on the VM it found.

The candidates are a list of URLs or a function that lists them, called
again for every round (on Windows: the VMs the registry lists now; a VM that
has gone since is a probe that fails, nothing more).  Every shell takes a
``dial`` (default :func:`rdswitch.aio.connect.dial_stream`), so the tests run
the handshake over a fake transport.

The pure parts (:func:`check_signature`, :func:`hvsock_guid`,
:func:`hvsock_port`, :func:`refusal`) are plain functions; the rest are thin
trio shells over :mod:`rdswitch.aio.connect`.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable, Union

import trio

from rdswitch.config import HANDSHAKE_PORT, READY, SIGNATURE, ConfigError
from rdswitch.aio.connect import dial_stream, listen_stream
from rdswitch.urls import HVSOCK_GUID_TEMPLATE, hvsock_guid, hvsock_port, peer_identity
from rdswitch.aio.tasks import accept_loop, read_exactly

log = logging.getLogger(__name__)

#: Seconds a single probe (dial + read of the signature) may take.
PROBE_TIMEOUT = 2.0
#: Seconds the VM side waits for READY on one connection.
READY_TIMEOUT = 10.0
#: Give-up time for the whole handshake: 5 minutes, as the wire contract says.
GIVE_UP = 300.0
#: The longest interval between rounds of probes once :func:`keep_finding_vm` has backed off.
MAX_INTERVAL = 30.0

__all__ = ["HVSOCK_GUID_TEMPLATE", "hvsock_guid", "hvsock_port", "check_signature", "check_ready", "refusal",
           "probe", "find_vm", "keep_finding_vm", "signal_ready", "serve_handshake", "HandshakeError"]

#: Dials a URL and returns a byte stream (dial_stream, or a fake in tests).
Dial = Callable[[str], Awaitable[trio.abc.Stream]]
#: The candidate VMs: a fixed list of URLs, or a function listing them now (called every round).
Candidates = Union[list[str], Callable[[], list[str]]]


class HandshakeError(Exception):
    """The handshake failed; str() is a message for the user."""


def check_signature(data: bytes) -> bool:
    """True only for the exact signature phrase."""
    return bytes(data) == SIGNATURE


def check_ready(data: bytes) -> bool:
    return bytes(data) == READY


def refusal(handshake_used: bool, found: str | None, peer: str) -> str | None:
    """Why a data connection from ``peer`` (a URL: the accepted socket's peer address) is refused, or None.

    Without a handshake everyone is admitted (as before).  With one, only the
    VM that passed it (``found``, the candidate URL that answered) may open a
    session: over vsock the peer's CID must be the candidate's, over hvsock
    its VM id.  Candidates that name no VM (unix, tcp: tests and the sandbox)
    leave nothing to compare, so their peers are admitted once a VM was found.
    """
    if not handshake_used:
        return None
    if found is None:
        return "no VM has passed the handshake yet"
    expected = peer_identity(found)
    if expected is None:
        return None
    if peer_identity(peer) != expected:
        return f"it is not the VM that passed the handshake ({found})"
    return None


def _listed(candidates: Candidates) -> list[str]:
    """This round's candidates; a lister that fails gives none this round (logged), not the end."""
    if not callable(candidates):
        return list(candidates)
    try:
        return list(candidates())
    except (OSError, ConfigError) as exc:
        log.warning("handshake: cannot list the candidate VMs: %s", exc)
        return []


def vsock_handshake_url(cid: int, port: int = HANDSHAKE_PORT) -> str:
    return f"vsock://{cid}:{port}"


async def probe(url: str, *, timeout: float = PROBE_TIMEOUT, dial: Dial = dial_stream) -> bool:
    """Dial url and tell whether it answers with the signature."""
    with trio.move_on_after(timeout):
        try:
            stream = await dial(url)
        except (OSError, ConfigError) as exc:
            log.debug("handshake probe %s: %s", url, exc)
            return False
        try:
            data = await read_exactly(stream, len(SIGNATURE))
        except (trio.BrokenResourceError, OSError) as exc:
            log.debug("handshake probe %s: %s", url, exc)
            return False
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()
        if check_signature(data):
            return True
        log.debug("handshake probe %s: wrong signature %r", url, data[:64])
    return False


async def find_vm(candidates: Candidates, *, interval: float = 1.0, give_up: float = GIVE_UP,
                  probe_timeout: float = PROBE_TIMEOUT, dial: Dial = dial_stream) -> str:
    """Probe every candidate about once per interval; return the first that answers.

    ``candidates`` is a list, or a function called at the start of every
    round (a round with none listed just waits for the next).  Raises
    HandshakeError after ``give_up`` seconds without an answer.
    """
    if not callable(candidates) and not candidates:
        raise HandshakeError("no candidate VMs to look for")
    tried: set[str] = set()
    with trio.move_on_after(give_up):
        while True:  # bounded by give_up
            deadline = trio.current_time() + interval
            found: list[str] = []
            this_round = _listed(candidates)
            tried.update(this_round)
            async with trio.open_nursery() as nursery:

                async def one(url: str) -> None:
                    if await probe(url, timeout=probe_timeout, dial=dial) and not found:
                        found.append(url)
                        nursery.cancel_scope.cancel()

                for url in this_round:
                    nursery.start_soon(one, url)
            if found:
                log.info("handshake: found the VM at %s", found[0])
                return found[0]
            await trio.sleep_until(deadline)
    what = f"tried {', '.join(sorted(tried))}" if tried else "no candidate VM was listed"
    raise HandshakeError(f"no VM answered the handshake within {give_up:g}s ({what})")


async def keep_finding_vm(candidates: Candidates, *, interval: float = 1.0, give_up: float = GIVE_UP,
                          max_interval: float = MAX_INTERVAL, probe_timeout: float = PROBE_TIMEOUT,
                          dial: Dial = dial_stream) -> str:
    """:func:`find_vm` that never gives up for good (a long-running host-switch outlives a slow VM).

    Each ``give_up`` period without an answer is logged once, and the interval
    between rounds doubles, up to ``max_interval``.
    """
    if not callable(candidates) and not candidates:
        raise HandshakeError("no candidate VMs to look for")
    while True:
        try:
            return await find_vm(candidates, interval=interval, give_up=give_up, probe_timeout=probe_timeout, dial=dial)
        except HandshakeError as exc:
            interval = min(interval * 2, max(max_interval, interval))
            log.warning("%s; still looking (a round every %gs)", exc, interval)


async def signal_ready(url: str, *, timeout: float = READY_TIMEOUT, dial: Dial = dial_stream) -> None:
    """Tell the VM at url that the host listens for the data connection.

    Reads the signature the VM writes on every connection first (so it is
    the right peer and no unread data makes our close a reset), writes READY
    and waits (bounded) for the VM to close.
    """
    try:
        with trio.fail_after(timeout):
            stream = await dial(url)
            try:
                data = await read_exactly(stream, len(SIGNATURE))
                if not check_signature(data):
                    raise HandshakeError(f"{url} did not send the handshake signature (got {data[:64]!r})")
                await stream.send_all(READY)
                # The VM closes after reading READY; wait for that (bounded).
                for _ in range(64):
                    if not await stream.receive_some(4096):
                        break
            finally:
                with trio.CancelScope(shield=True):
                    await stream.aclose()
    except trio.TooSlowError:
        raise HandshakeError(f"sending READY to {url} timed out after {timeout:g}s") from None
    except (OSError, ConfigError, trio.BrokenResourceError) as exc:
        raise HandshakeError(f"sending READY to {url} failed: {exc}") from None


async def serve_handshake(listen_url: str, *, ready_timeout: float = READY_TIMEOUT, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """VM side: answer probes with the signature until a host sends READY.

    ``task_status.started`` reports the bound URL.  Returns (and stops
    listening) once READY arrived.
    """
    listener = await listen_stream(listen_url)
    try:
        task_status.started(listener.url)
        log.info("handshake: listening on %s", listener.url)
        got_ready = trio.Event()
        async with trio.open_nursery() as nursery:

            async def handle(stream: trio.abc.Stream) -> None:
                try:
                    with trio.move_on_after(ready_timeout):
                        await stream.send_all(SIGNATURE)
                        data = await read_exactly(stream, len(READY))
                        if check_ready(data):
                            got_ready.set()
                            nursery.cancel_scope.cancel()
                        elif data:
                            log.warning("handshake: unexpected bytes %r", data[:64])
                except (trio.BrokenResourceError, OSError) as exc:
                    log.debug("handshake connection: %s", exc)
                finally:
                    with trio.CancelScope(shield=True):
                        await stream.aclose()

            # ends when READY cancels the nursery
            nursery.start_soon(accept_loop, listener, handle, nursery, "handshake", log)
        if not got_ready.is_set():  # pragma: no cover - only a cancel gets here
            return
        log.info("handshake: READY received")
    finally:
        with trio.CancelScope(shield=True):
            await listener.aclose()
