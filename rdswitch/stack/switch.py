"""The L2 switch: MAC learning and flooding, sans-IO.

Ports are opaque hashable ids (the host process uses its session objects and
one id for the gateway).  ``route`` learns the source MAC and returns the
ports a frame goes out of; it never returns the ingress port.

Port security: a MAC lives on one port until that port is removed.  A frame
from another port that claims it (a pinned MAC such as the gateway's, or a
MAC another VM's session holds) goes nowhere and is counted in ``spoofed``,
so no VM can take over another VM's address or its traffic by sending one
frame from its MAC.
"""

from __future__ import annotations

from typing import Hashable, Iterable


class Switch:
    def __init__(self, max_macs_per_port: int = 256) -> None:
        self._ports: list[Hashable] = []
        self._mac_table: dict[bytes, Hashable] = {}
        self._pinned: dict[bytes, Hashable] = {}
        self._macs_per_port: dict[Hashable, int] = {}
        self.max_macs_per_port = max_macs_per_port
        self.refused_learning = 0  # frames whose source MAC was not learnt (pinned elsewhere, or port full)
        self.spoofed = 0  # frames dropped: their source MAC lives on another port
        #: counts changes of the MAC table (a MAC learnt, a port's MACs forgotten)
        self.generation = 0

    @property
    def ports(self) -> tuple[Hashable, ...]:
        return tuple(self._ports)

    def add_port(self, port: Hashable) -> None:
        if port not in self._ports:
            self._ports.append(port)

    def remove_port(self, port: Hashable) -> None:
        if port in self._ports:
            self._ports.remove(port)
        for mac in [m for m, p in self._mac_table.items() if p is port and m not in self._pinned]:
            del self._mac_table[mac]
            self.generation += 1
        self._macs_per_port.pop(port, None)

    def pin(self, mac: bytes, port: Hashable) -> None:
        """``mac`` lives on ``port`` for good: frames from elsewhere claiming it are not learnt."""
        self._pinned[mac] = port
        self._mac_table[mac] = port

    def learn(self, mac: bytes, port: Hashable) -> bool:
        """Learn ``mac`` on ``port`` unless it is multicast or the port has too many.

        False when ``mac`` lives on another port (pinned there, or learnt
        there and that port is still up): the frame claiming it is a spoof.
        """
        if mac[0] & 1:
            return True
        old = self._mac_table.get(mac)
        if old is port:
            return True
        if old is not None:  # pinned elsewhere, or another port's: removed ports forget their MACs
            self.refused_learning += 1
            return False
        count = self._macs_per_port.get(port, 0)
        if count >= self.max_macs_per_port:
            self.refused_learning += 1
            return True
        self._macs_per_port[port] = count + 1
        self._mac_table[mac] = port
        self.generation += 1
        return True

    def lookup(self, mac: bytes) -> Hashable | None:
        return self._mac_table.get(mac)

    def macs(self) -> dict[bytes, Hashable]:
        return dict(self._mac_table)

    def route(self, in_port: Hashable, frame: bytes | memoryview, flood_unknown: bool = True) -> Iterable[Hashable]:
        """Learn ``frame``'s source on ``in_port``; return its egress ports.

        ``frame`` must be at least 14 bytes (callers drop shorter ones).  A
        unicast frame for an unknown MAC is flooded like a hardware switch
        does, unless ``flood_unknown`` is false (the gateway's own frames: a
        reply to a VM that has gone must not reach the other VMs).
        """
        src = bytes(frame[6:12])
        if self._mac_table.get(src) is not in_port and not self.learn(src, in_port):
            self.spoofed += 1
            return ()
        dst = bytes(frame[0:6])
        if not dst[0] & 1:
            out = self._mac_table.get(dst)
            if out is not None:
                return () if out is in_port else (out,)
            if not flood_unknown:
                return ()
        return [p for p in self._ports if p is not in_port]
