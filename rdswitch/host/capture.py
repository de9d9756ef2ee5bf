"""``--capture FILE``: every frame through the switch as pcap records (a debugging aid)."""

from __future__ import annotations

import logging
import time

from ..wire import pcap

log = logging.getLogger("rdswitch.host")


class Capture:
    """Every frame that enters the switch, as pcap records (debugging aid)."""

    def __init__(self, path: str) -> None:
        self.failed = False
        self.file = open(path, "wb", buffering=1 << 20)
        self.file.write(pcap.pcap_header())
        self.file.flush()

    def write(self, frames) -> None:
        if self.failed:
            return
        ts = time.time()
        try:
            for frame in frames:
                self.file.write(pcap.pcap_record(bytes(frame), ts))
        except OSError as exc:  # a full disk stops the capture, not the network
            self.failed = True
            log.error("capture stopped: %s", exc)

    def flush(self) -> None:
        try:
            self.file.flush()
        except OSError as exc:
            self.failed = True
            log.error("capture stopped: %s", exc)

    def close(self) -> None:
        self.file.close()
