"""gvproxy's ``-notification`` socket: one JSON message per connection, best effort (trio).

The messages and their fields are gvisor-tap-vsock's ``types.NotificationMessage``::

    {"notification_type": "ready"}                                   once every listener is up
    {"notification_type": "connection_established", "mac_address": "5a:94:ef:e4:0c:ee"}
    {"notification_type": "connection_closed", "mac_address": "5a:94:ef:e4:0c:ee"}

``connection_established`` goes out when the switch first learns a VM's MAC
(its first frame), ``connection_closed`` for each of a VM's MACs when its
connection ends.  Sending never waits on the network: messages queue (at
most 100, then they are dropped with a warning, as gvproxy does) and one task
delivers them, each on a new connection; a missing or slow listener costs a
log line, never a frame.
"""

from __future__ import annotations

import json
import logging

import trio

from ..config import format_mac

log = logging.getLogger("rdswitch.gvproxy")

QUEUE = 100
SEND_TIMEOUT = 2.0


class Notifier:
    def __init__(self, path: str) -> None:
        self.path = path
        self._send, self._receive = trio.open_memory_channel(QUEUE)
        self.sent = 0

    def notify(self, kind: str, mac: bytes | None = None) -> None:
        msg = {"notification_type": kind}
        if mac is not None:
            msg["mac_address"] = format_mac(mac)
        try:
            self._send.send_nowait(msg)
        except trio.WouldBlock:
            log.warning("unable to send notification %s: %d are waiting already", kind, QUEUE)

    async def deliver(self) -> None:
        """Send each queued message on its own connection, until cancelled."""
        async for msg in self._receive:
            data = json.dumps(msg, separators=(",", ":")).encode() + b"\n"  # as Go's json.Encoder writes it
            try:
                with trio.fail_after(SEND_TIMEOUT):
                    stream = await trio.open_unix_socket(self.path)
                    async with stream:
                        await stream.send_all(data)
                self.sent += 1
            except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
                log.error("failed to send notification %s to %s: %s", msg["notification_type"], self.path,
                          exc.strerror if isinstance(exc, OSError) and exc.strerror else exc or "timed out")

    async def watch(self, hs) -> None:
        """connection_established / connection_closed as the switch learns and forgets VMs' MACs."""
        known: set[bytes] = set()
        while True:
            changed = hs.macs_changed  # take the event before reading: a change after this wakes us
            current = set(hs.vm_macs())
            for mac in sorted(current - known):
                self.notify("connection_established", mac)
            for mac in sorted(known - current):
                self.notify("connection_closed", mac)
            known = current
            await changed.wait()
