"""The vsock handshake of the wire contract (docs/wire-contract.md), over streams by URL.

VM side (network-setup): :func:`serve_handshake` listens (vsock port 6669 in
production), writes the 53-byte signature to every connection and returns
once a connection sends ``READY``.  Then the VM dials the host data port.

Host side (host-switch): :func:`find_vm` dials every candidate about once a
second until one answers with the exact signature; the host then listens on
its data URL and calls :func:`signal_ready` on the VM it found.

The pure parts (:func:`check_signature`, :func:`hvsock_guid`) are plain
functions; the rest are thin trio shells over :mod:`rdswitch.aio.connect`.
"""

from __future__ import annotations

import logging

import trio

from rdswitch.config import HANDSHAKE_PORT, READY, SIGNATURE
from rdswitch.aio.connect import dial_stream, listen_stream
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

HVSOCK_GUID_TEMPLATE = "%08x-facb-11e6-bd58-64006a7986d3"


class HandshakeError(Exception):
    """The handshake failed; str() is a message for the user."""


def check_signature(data: bytes) -> bool:
    """True only for the exact signature phrase."""
    return bytes(data) == SIGNATURE


def check_ready(data: bytes) -> bool:
    return bytes(data) == READY


def hvsock_guid(port: int) -> str:
    """The Hyper-V socket service GUID for a vsock port (the wire contract's template)."""
    if not isinstance(port, int) or not 0 <= port <= 0xFFFFFFFF:
        raise ValueError(f"vsock port {port!r} must be 0..4294967295")
    return HVSOCK_GUID_TEMPLATE % port


def vsock_handshake_url(cid: int, port: int = HANDSHAKE_PORT) -> str:
    return f"vsock://{cid}:{port}"


async def probe(url: str, *, timeout: float = PROBE_TIMEOUT) -> bool:
    """Dial url and tell whether it answers with the signature."""
    with trio.move_on_after(timeout):
        try:
            stream = await dial_stream(url)
        except OSError as exc:
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


async def find_vm(candidates: list[str], *, interval: float = 1.0, give_up: float = GIVE_UP, probe_timeout: float = PROBE_TIMEOUT) -> str:
    """Probe every candidate about once per interval; return the first that answers.

    Raises HandshakeError after ``give_up`` seconds without an answer.
    """
    if not candidates:
        raise HandshakeError("no candidate VMs to look for")
    with trio.move_on_after(give_up):
        while True:  # bounded by give_up
            deadline = trio.current_time() + interval
            found: list[str] = []
            async with trio.open_nursery() as nursery:

                async def one(url: str) -> None:
                    if await probe(url, timeout=probe_timeout) and not found:
                        found.append(url)
                        nursery.cancel_scope.cancel()

                for url in candidates:
                    nursery.start_soon(one, url)
            if found:
                log.info("handshake: found the VM at %s", found[0])
                return found[0]
            await trio.sleep_until(deadline)
    raise HandshakeError(f"no VM answered the handshake within {give_up:g}s (tried {', '.join(candidates)})")


async def keep_finding_vm(candidates: list[str], *, interval: float = 1.0, give_up: float = GIVE_UP,
                          max_interval: float = MAX_INTERVAL, probe_timeout: float = PROBE_TIMEOUT) -> str:
    """:func:`find_vm` that never gives up for good (a long-running host-switch outlives a slow VM).

    Each ``give_up`` period without an answer is logged once, and the interval
    between rounds doubles, up to ``max_interval``.
    """
    if not candidates:
        raise HandshakeError("no candidate VMs to look for")
    while True:
        try:
            return await find_vm(candidates, interval=interval, give_up=give_up, probe_timeout=probe_timeout)
        except HandshakeError as exc:
            interval = min(interval * 2, max(max_interval, interval))
            log.warning("%s; still looking (a round every %gs)", exc, interval)


async def signal_ready(url: str, *, timeout: float = READY_TIMEOUT) -> None:
    """Tell the VM at url that the host listens for the data connection.

    Reads the signature the VM writes on every connection first (so it is
    the right peer and no unread data makes our close a reset), writes READY
    and waits (bounded) for the VM to close.
    """
    try:
        with trio.fail_after(timeout):
            stream = await dial_stream(url)
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
    except (OSError, trio.BrokenResourceError) as exc:
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
