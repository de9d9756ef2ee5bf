"""The L2 switch: MAC learning and flooding, sans-IO.

Ports are opaque hashable ids (the host process uses its session objects and
one id for the gateway).  ``route`` learns the source MAC and returns the
ports a frame goes out of; it never returns the ingress port.
"""

from __future__ import annotations

from typing import Hashable, Iterable


class Switch:
    def __init__(self) -> None:
        self._ports: list[Hashable] = []
        self._mac_table: dict[bytes, Hashable] = {}

    @property
    def ports(self) -> tuple[Hashable, ...]:
        return tuple(self._ports)

    def add_port(self, port: Hashable) -> None:
        if port not in self._ports:
            self._ports.append(port)

    def remove_port(self, port: Hashable) -> None:
        if port in self._ports:
            self._ports.remove(port)
        for mac in [m for m, p in self._mac_table.items() if p is port or p == port]:
            del self._mac_table[mac]

    def learn(self, mac: bytes, port: Hashable) -> None:
        if not mac[0] & 1:
            self._mac_table[mac] = port

    def lookup(self, mac: bytes) -> Hashable | None:
        return self._mac_table.get(mac)

    def macs(self) -> dict[bytes, Hashable]:
        return dict(self._mac_table)

    def route(self, in_port: Hashable, frame: bytes | memoryview) -> Iterable[Hashable]:
        """Learn ``frame``'s source on ``in_port``; return its egress ports.

        ``frame`` must be at least 14 bytes (callers drop shorter ones).
        """
        src = bytes(frame[6:12])
        if not src[0] & 1 and self._mac_table.get(src) is not in_port:
            self._mac_table[src] = in_port
        dst = bytes(frame[0:6])
        if not dst[0] & 1:
            out = self._mac_table.get(dst)
            if out is not None:
                return () if out is in_port else (out,)
        return [p for p in self._ports if p is not in_port]
