"""The host-switch: sessions on switch ports, the gateway port, and the frame path.

Frames from a VM go through the L2 switch; those for the gateway go to the
sans-IO :class:`Gateway`, whose replies come back through the switch and
whose events (TCP/UDP/ICMP flows, DNS) go to the :class:`NetStack` shell.
"""

from __future__ import annotations

import json
import logging

import trio

from ..config import NetConfig
from ..logs import describe, leaves
from ..framing import FramingError
from ..services.dhcp import DhcpServer
from ..stack.counters import Counters
from ..stack.gateway import Gateway
from ..stack.switch import Switch
from ..wire.errors import MalformedPacket
from .capture import Capture
from .session import Port

log = logging.getLogger("rdswitch.host")

EXPECTED_SESSION_ERRORS = (FramingError, trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class _GatewayPort:
    def __repr__(self) -> str:
        return "<gateway>"


class HostSwitch:
    def __init__(self, net: NetConfig, *, capture: str | None = None, search_domains=(), dns_servers=None) -> None:
        self.net = net
        self.switch = Switch()
        self.gw_port = _GatewayPort()
        self.switch.add_port(self.gw_port)
        self.switch.pin(net.gateway_mac, self.gw_port)  # no VM can steal the gateway's MAC
        self.counters = Counters()
        self.dhcp = DhcpServer(net, search_domains=search_domains,
                               dns_servers=dns_servers if dns_servers is not None else (net.gateway_ip,))
        self.gateway = Gateway(net, self.dhcp, self.counters)
        self.stack = None  # set by the process: handles gateway events (NAT, DNS, API)
        self.capture = Capture(capture) if capture else None
        self.sessions: dict[int, Port] = {}

    # ---- the frame path ------------------------------------------------------------------
    def from_vm(self, port: Port, frames: list) -> None:
        """Frames received from ``port``'s VM: switch them (sync, the hot path)."""
        if self.capture:
            self.capture.write(frames)
        values = port.counters.values
        values["frames_in"] += len(frames)
        route = self.switch.route
        gw = self.gw_port
        now = trio.current_time()
        nbytes = 0
        for frame in frames:
            nbytes += len(frame)
            if len(frame) < 14:
                port.counters.drop("ethernet-truncated")
                continue
            for out in route(port, frame):
                if out is gw:
                    self._to_gateway(port, frame, now)
                else:
                    out.enqueue(frame)
        values["bytes_in"] += nbytes
        if self.stack is not None and self.stack.dirty:
            self.stack.flush_dirty()

    def _to_gateway(self, port: Port, frame, now: float) -> None:
        try:
            replies, event = self.gateway.input(frame, now)
        except MalformedPacket as exc:
            port.counters.drop(exc.reason)
            log.debug("%r: dropped malformed frame: %s", port, exc)
            return
        if replies:
            self.from_gateway(replies)
        if event is not None and self.stack is not None:
            try:
                self.stack.handle(port, event)
            except Exception:  # noqa: BLE001 - a bug in one flow must not end the session
                port.counters.drop("stack-error")
                log.exception("%r: error handling %s", port, type(event).__name__)

    def from_gateway(self, frames: list) -> None:
        """Frames the gateway (or a NAT flow) sends into the virtual network."""
        if self.capture:
            self.capture.write(frames)
        route = self.switch.route
        gw = self.gw_port
        for frame in frames:
            for out in route(gw, frame):
                out.enqueue(frame)

    def send_to(self, port: Port, frame: bytes) -> None:
        """Send a gateway frame straight to a known port (skips the MAC lookup)."""
        if self.capture:
            self.capture.write((frame,))
        port.enqueue(frame)

    # ---- sessions ------------------------------------------------------------------------
    async def run_session(self, link) -> None:
        """Serve one VM connection until it ends; everything it owns ends with it."""
        reason = "connection closed by the VM"
        port = None
        try:
            async with trio.open_nursery() as nursery:
                port = Port(link, nursery, getattr(link, "peer", "?"))
                self.sessions[port.id] = port
                self.switch.add_port(port)
                log.info("%r: session started", port)
                nursery.start_soon(port.writer)
                try:
                    await self._reader(port)
                finally:
                    nursery.cancel_scope.cancel()
        except Exception as exc:  # noqa: BLE001 - any failure ends this session only
            reason = describe(exc)
            if not all(isinstance(e, EXPECTED_SESSION_ERRORS) for e in leaves(exc)):
                log.error("%r: session failed unexpectedly", port, exc_info=exc)
        finally:
            if port is not None:
                port.close()
                self.switch.remove_port(port)
                self.sessions.pop(port.id, None)
                if self.stack is not None:
                    self.stack.session_closed(port)
                if self.capture:
                    self.capture.flush()
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(1):
                        await link.aclose()
                log.info("%r: session ended: %s", port, reason)
                log.info("%r: session stats %s", port, json.dumps(port.counters.as_dict(), sort_keys=True))

    async def _reader(self, port: Port) -> None:
        receive = port.link.receive_batch
        while True:
            frames = await receive()
            if not frames:
                return
            self.from_vm(port, frames)

    def stats(self) -> dict:
        return {
            "gateway": self.counters.as_dict(),
            "sessions": {str(p.id): {"peer": p.peer, **p.counters.as_dict()} for p in self.sessions.values()},
        }
