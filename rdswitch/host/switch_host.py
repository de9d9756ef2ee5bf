"""The host-switch: sessions on switch ports, and the frame path in one direction.

A frame from a VM goes::

    session reader -> Switch.route -> Gateway.input -> NatShell.handle (NatCore decides)
                                                  \\-> replies --------------\\
    NatCore / FrameBuilder frames -------------------------------------> Egress -> Session.enqueue -> writer

:class:`Egress` is the one way out for every frame the gateway side makes
(ARP, DHCP and ping replies, NAT segments and datagrams): one capture point,
then the switch, then the session's queue.  No lower layer holds a reference
to :class:`HostSwitch`; it is built last, from the parts below it
(:func:`build`).
"""

from __future__ import annotations

import json
import logging
from typing import Callable

import trio

from ..aio import packet_trace, trace
from ..config import NetConfig
from ..framing import FramingError
from ..logs import describe, leaves
from ..services.dhcp import DhcpServer
from ..stack.counters import Counters
from ..stack.frames import FrameBuilder
from ..stack.gateway import Gateway
from ..stack.nat import NatCore, NatPolicy
from ..stack.switch import Switch
from ..wire.errors import MalformedPacket
from .capture import Capture
from .nat import NatShell
from .session import Session

log = logging.getLogger("rdswitch.host")

EXPECTED_SESSION_ERRORS = (FramingError, trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class _GatewayPort:
    def __repr__(self) -> str:
        return "<gateway>"


class Egress:
    """Frames from the gateway side into the virtual network: capture, switch, session queue."""

    def __init__(self, switch: Switch, gw_port: _GatewayPort, counters: Counters, capture: Capture | None) -> None:
        self.switch = switch
        self.gw_port = gw_port
        self.counters = counters
        self.capture = capture

    def __call__(self, frames: list[bytes]) -> None:
        if self.capture is not None:
            self.capture.write(frames)
        route = self.switch.route
        gw = self.gw_port
        current = None  # frames for one session go out together (one send)
        group: list[bytes] = []
        for frame in frames:
            outs = route(gw, frame, False)
            if len(outs) == 1:
                out = outs[0]
                if out is current:
                    group.append(frame)
                    continue
                if current is not None:
                    current.send(group)
                current, group = out, [frame]
                continue
            if current is not None:  # keep the order of what went before
                current.send(group)
                current, group = None, []
            if not outs:
                self.counters.drop("egress-unknown-mac")  # the VM has gone: nobody else gets its frames
            for out in outs:  # broadcast
                out.send([frame])
        if current is not None:
            current.send(group)


class HostSwitch:
    def __init__(self, net: NetConfig, switch: Switch, gw_port: _GatewayPort, gateway: Gateway, nat: NatShell,
                 egress: Egress, counters: Counters) -> None:
        self.net = net
        self.switch = switch
        self.gw_port = gw_port
        self.gateway = gateway
        self.dhcp = gateway.dhcp
        self.nat = nat
        self.egress = egress
        self.counters = counters
        self.capture = egress.capture
        self.sessions: dict[int, Session] = {}
        self.sessions_changed = trio.Event()
        #: called with a session's id when it has ended (its forwards and DNS records of the API go)
        self.session_closed_hooks: list[Callable[[int], None]] = []
        #: set (and replaced) whenever the switch learns or forgets a VM's MAC
        self.macs_changed = trio.Event()
        self._macs_seen = switch.generation

    # ---- the frame path ------------------------------------------------------------------
    def from_vm(self, session: Session, frames: list) -> None:
        """Frames received from ``session``'s VM: switch them (sync, the hot path; one ``now`` per batch)."""
        if self.capture:
            self.capture.write(frames)
        if packet_trace.enabled:
            packet_trace.frames(f"{session!r} from VM", frames)
        counters = session.counters
        values = counters.values
        values["frames_in"] += len(frames)
        route = self.switch.route
        gw = self.gw_port
        gateway_input = self.gateway.input
        nat_handle = self.nat.handle
        egress = self.egress
        now = trio.current_time()
        nbytes = 0
        for frame in frames:
            nbytes += len(frame)
            if len(frame) < 14:
                counters.drop("ethernet-truncated")
                continue
            for out in route(session, frame):
                if out is not gw:
                    out.enqueue(frame)
                    continue
                try:
                    replies, event = gateway_input(frame, now)
                    if replies:
                        egress(replies)
                    if event is not None:
                        nat_handle(session, event, now)
                        if trace.enabled:
                            trace.frames("hs.nat", (frame,))
                except MalformedPacket as exc:
                    counters.drop(exc.reason)
                    log.debug("%r: dropped malformed frame: %s", session, exc)
                except Exception:  # noqa: BLE001 - a bug in one flow must not end the session
                    counters.drop("stack-error")
                    log.exception("%r: error handling a frame", session)
        values["bytes_in"] += nbytes
        self.nat.flush(now)
        if self.switch.generation != self._macs_seen:  # a new VM MAC (rare): tell whoever watches
            self._macs_news()

    def session_for(self, vm_ip: bytes) -> tuple[Session, bytes] | None:
        """The session and MAC that hold ``vm_ip``, if any VM has used it."""
        mac = self.gateway.neighbors.get(vm_ip)
        if mac is None:
            return None
        session = self.switch.lookup(mac)
        if not isinstance(session, Session) or session.closed:
            return None
        return session, mac

    def lease_holders(self) -> dict[str, int | None]:
        """Every DHCP lease -> the id of the live session whose switch port holds its MAC (None: none does).

        The switch keeps a MAC on one port while that port is up, so this says
        which VM an address really belongs to, whatever source IP a frame claims.
        """
        out: dict[str, int | None] = {}
        for ip, mac in self.dhcp.lease_table().items():
            port = self.switch.lookup(mac)
            out[str(ip)] = port.id if isinstance(port, Session) and not port.closed else None
        return out

    # ---- sessions ------------------------------------------------------------------------
    async def run_session(self, link) -> None:
        """Serve one VM connection until it ends; everything it owns ends with it."""
        reason = "connection closed by the VM"
        session = None
        try:
            async with trio.open_nursery() as nursery:
                session = Session(link, nursery, getattr(link, "peer", "?"))
                self.sessions[session.id] = session
                self.switch.add_port(session)
                self.nat.session_opened(session)
                self._changed()
                log.info("%r: session started", session)
                nursery.start_soon(session.writer)
                try:
                    await self._reader(session)
                finally:
                    nursery.cancel_scope.cancel()
        except Exception as exc:  # noqa: BLE001 - any failure ends this session only
            reason = describe(exc)
            if not all(isinstance(e, EXPECTED_SESSION_ERRORS) for e in leaves(exc)):
                log.error("%r: session failed unexpectedly", session, exc_info=exc)
        finally:
            if session is not None:
                session.close()
                self.switch.remove_port(session)
                self.sessions.pop(session.id, None)
                self.nat.session_closed(session)
                for hook in self.session_closed_hooks:
                    try:
                        hook(session.id)
                    except Exception:  # noqa: BLE001 - one hook's bug does not stop the teardown
                        log.exception("%r: error in a session-closed hook", session)
                self._changed()
                if self.capture:
                    self.capture.flush()
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(1):
                        await link.aclose()
                log.info("%r: session ended: %s", session, reason)
                log.info("%r: session stats %s", session, json.dumps(session.counters.as_dict(), sort_keys=True))

    def _changed(self) -> None:
        self.sessions_changed.set()
        self.sessions_changed = trio.Event()
        self._macs_news()

    def _macs_news(self) -> None:
        self._macs_seen = self.switch.generation
        self.macs_changed.set()
        self.macs_changed = trio.Event()

    def vm_macs(self) -> dict[bytes, Session]:
        """Every MAC the switch has learnt on a VM's port, and that VM's session."""
        return {mac: port for mac, port in self.switch.macs().items() if isinstance(port, Session)}

    async def _reader(self, session: Session) -> None:
        receive = session.link.receive_batch
        while True:
            frames = await receive()
            if not frames:
                return
            if trace.enabled:
                trace.frames("hs.link_read", frames)
            self.from_vm(session, frames)

    def stats(self) -> dict:
        return {
            "gateway": self.counters.as_dict(),
            "switch": {"spoofed_frames": self.switch.spoofed, "refused_learning": self.switch.refused_learning},
            "sessions": {str(s.id): {"peer": s.peer, **s.counters.as_dict()} for s in self.sessions.values()},
        }


def build(net: NetConfig, policy: NatPolicy, *, dns=None, capture: str | None = None,
          search_domains=(), dns_servers=None) -> HostSwitch:
    """The host-switch from the bottom up: switch and frames, gateway, egress, NAT, then the shell on top."""
    counters = Counters()
    switch = Switch()
    gw_port = _GatewayPort()
    switch.add_port(gw_port)
    switch.pin(net.gateway_mac, gw_port)  # no VM can steal the gateway's MAC
    frames = FrameBuilder(net, counters)
    dhcp = DhcpServer(net, search_domains=search_domains,
                      dns_servers=dns_servers if dns_servers is not None else (net.gateway_ip,))
    gateway = Gateway(net, dhcp, counters, frames)
    egress = Egress(switch, gw_port, counters, Capture(capture) if capture else None)
    nat = NatShell(NatCore(policy, frames, egress, dns=dns is not None), dns=dns)
    return HostSwitch(net, switch, gw_port, gateway, nat, egress, counters)
