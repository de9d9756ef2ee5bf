"""The NAT's decisions, sans-IO: the flow tables and what each packet from a VM causes.

:class:`NatCore` takes the gateway's events (:class:`TcpIn`, :class:`UdpIn`,
:class:`IcmpEchoIn`, :class:`OffloadIn`) for one session with a ``now``, and
the results of the I/O it asked for (a dial ended, a datagram or an echo
reply came back).  It answers in two ways:

* frames for the virtual network go straight to the ``emit`` sink it was
  built with (the host-switch's one egress path); a refusal is always
  answered this way (a TCP RST, or an ICMP error where RFC 1122 allows one);
* work that needs I/O comes back as *actions* (:class:`Dial`,
  :class:`CancelDial`, :class:`StartLocal`, :class:`UdpOpen`,
  :class:`UdpSend`, :class:`UdpClose`, :class:`ToEndpoint`, :class:`DnsQuery`, :class:`Ping`,
  :class:`OffloadChanged`) for the trio shell to carry out.

It owns every table the NAT has: per session the TCP flows (dialling or
open, each with its :class:`~rdswitch.stack.tcp.TcpConnection`), the UDP
flows, the counts of dials, pings and DNS queries in flight; and for the
whole switch the gateway ports in use (local services, port-forward UDP
endpoints, ephemeral ports).  It reads no clock, opens no socket and
imports no trio; the tests drive it with bytes and a fake clock.
"""

from __future__ import annotations

import argparse
import ipaddress
import random
from typing import Callable

import attrs

from ..config import ConfigError, NetConfig, parse_cidr
from ..wire import icmp, offload, tcp
from .counters import Counters
from .frames import FrameBuilder
from .gateway import IcmpEchoIn, OffloadIn, TcpIn, UdpIn
from .tcp import TcpConnection, rst_for

LINK_LOCAL = ipaddress.IPv4Network("169.254.0.0/16")
#: DNS queries of one session being answered at once; more are dropped (the resolver retries).
MAX_DNS_INFLIGHT = 128
#: Echo requests of one session waiting for the host's reply at once.
MAX_PINGS = 64
#: TCP payload per segment towards a VM whose vm-switch announced offload: the
#: frame (14 + 20 + 20 + payload) stays under the 16-bit framing's 65535 bytes;
#: the VM's kernel cuts it to its MTU (TSO in reverse).
TSO_MSS = 65000 - 40
#: Destinations whose policy answer is remembered (a VM could otherwise grow the cache without bound).
DESTINATION_CACHE = 4096
EPHEMERAL_FIRST = 49152
EPHEMERAL_LAST = 65535

# ---------------------------------------------------------------------------------------------
# Policy


@attrs.frozen
class NatPolicy:
    """Where flows may go and how many there may be (plain data, from the command line)."""

    net: NetConfig
    allow_outbound: tuple[ipaddress.IPv4Network, ...] = (ipaddress.IPv4Network("0.0.0.0/0"),)
    allow_link_local: bool = False
    connect_timeout: float = 10.0
    max_pending_dials: int = 256
    udp_idle_timeout: float = 90.0
    max_udp_flows: int = 1024
    tcp_buffer: int = 0
    max_tcp_flows: int = 4096

    @classmethod
    def from_args(cls, args: argparse.Namespace, net: NetConfig) -> "NatPolicy":
        allow = tuple(parse_cidr(c) for c in args.allow_outbound) or attrs.fields(cls).allow_outbound.default
        for name in ("connect_timeout", "udp_idle_timeout"):
            if getattr(args, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")
        for name in ("max_pending_dials", "max_udp_flows", "max_tcp_flows"):
            if getattr(args, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        return cls(net, allow, args.allow_link_local, args.connect_timeout, args.max_pending_dials,
                   args.udp_idle_timeout, args.max_udp_flows, args.tcp_buffer, args.max_tcp_flows)

    def destination(self, dst: bytes) -> tuple[str | None, str]:
        """Map a virtual destination to the host address to dial: ``(ip, "")`` or ``(None, reason)``."""
        addr = ipaddress.IPv4Address(dst)
        real = self.net.nat_table.get(addr)
        if real is None:
            if addr.is_loopback:
                return None, "loopback"  # the host's loopback only through the NAT table (.254)
            real = addr
        if real in LINK_LOCAL and not self.allow_link_local:
            return None, "link-local"
        if (real.is_multicast or real == ipaddress.IPv4Address("255.255.255.255") or real.is_unspecified
                or addr == self.net.subnet.broadcast_address):
            return None, "not-unicast"
        if addr in self.net.subnet and addr not in self.net.nat_table:
            return None, "virtual-subnet"
        if not any(real in n for n in self.allow_outbound):
            return None, "outbound-denied"
        return str(real), ""

    @property
    def tcp_buffer_size(self) -> int:
        if self.tcp_buffer:
            return self.tcp_buffer
        return max(1 << 20, 32 * (self.net.mtu - 40))


# ---------------------------------------------------------------------------------------------
# Flows


@attrs.define(eq=False, slots=True)
class TcpFlow:
    """One TCP connection between a VM and the gateway side (a host socket, a local service, a forward)."""

    sid: int
    key: tuple[bytes, int, bytes, int]  # (vm_ip, vm_port, gateway-side ip, gateway-side port)
    vm_mac: bytes
    partial: bool  # frames towards the VM carry partial checksums (offload)
    syn: tcp.Segment | None = None  # the VM's SYN, kept while we dial
    dst: tuple[str, int] | None = None  # the host address dialled for it
    conn: TcpConnection | None = None  # None while dialling
    abandoned: bool = False  # the VM reset its SYN while we dialled
    handle: object = None  # the shell's object for this flow (its stream); opaque here

    @property
    def dialling(self) -> bool:
        return self.conn is None


@attrs.define(eq=False, slots=True)
class UdpFlow:
    """One VM (ip, port) -> destination flow, carried by one host UDP socket of the shell's."""

    sid: int
    key: tuple[bytes, int, bytes, int]  # (vm_ip, vm_port, virtual dst ip, dst port)
    vm_mac: bytes
    dst: tuple[str, int]
    last_activity: float
    handle: object = None


@attrs.define(eq=False, slots=True)
class UdpEndpoint:
    """A gateway UDP port of one session that delivers to the shell (a port forward's client).

    Only datagrams from ``remote`` (the VM's ip and port the forward sends to) are accepted.
    """

    sid: int
    port: int
    remote: tuple[bytes, int]
    handle: object = None


@attrs.define(eq=False, slots=True)
class SessionState:
    sid: int
    counters: Counters
    offload: bool = False
    tcp: dict = attrs.field(factory=dict)  # key -> TcpFlow
    udp: dict = attrs.field(factory=dict)  # key -> UdpFlow, least recently active first
    endpoints: dict = attrs.field(factory=dict)  # gateway port -> UdpEndpoint
    pending_dials: int = 0
    pings: int = 0
    dns_queries: int = 0


# ---------------------------------------------------------------------------------------------
# Actions for the shell


@attrs.frozen(slots=True)
class Dial:
    """Dial ``flow.dst`` from the host; report with :meth:`NatCore.dial_done`."""

    flow: TcpFlow


@attrs.frozen(slots=True)
class CancelDial:
    """The VM gave up on the SYN of ``flow``: stop dialling (then report ``"abandoned"``)."""

    flow: TcpFlow


@attrs.frozen(slots=True)
class StartLocal:
    """A connection to the gateway's own TCP service on ``port`` was accepted: serve it."""

    flow: TcpFlow
    port: int


@attrs.frozen(slots=True)
class UdpOpen:
    """Open the host socket of a new UDP flow (report a failure with :meth:`NatCore.udp_closed`)."""

    flow: UdpFlow


@attrs.frozen(slots=True)
class UdpSend:
    flow: UdpFlow
    payload: bytes | memoryview


@attrs.frozen(slots=True)
class UdpClose:
    """The flow was evicted from a full table (the least recently active one): close its host socket."""

    flow: UdpFlow


@attrs.frozen(slots=True)
class ToEndpoint:
    endpoint: UdpEndpoint
    payload: bytes | memoryview


@attrs.frozen(slots=True)
class DnsQuery:
    """Answer a DNS query to the gateway; reply with :meth:`NatCore.udp_to_vm`, then :meth:`NatCore.dns_done`."""

    sid: int
    vm_mac: bytes
    vm_ip: bytes
    vm_port: int
    query: bytes


@attrs.frozen(slots=True)
class Ping:
    """Send an echo request to ``dst`` from the host; then :meth:`NatCore.ping_reply` and :meth:`NatCore.ping_done`."""

    sid: int
    vm_mac: bytes
    vm_ip: bytes
    virtual_dst: bytes
    dst: str
    msg: icmp.IcmpMessage


@attrs.frozen(slots=True)
class OffloadChanged:
    sid: int
    offload: bool


Action = Dial | CancelDial | StartLocal | UdpOpen | UdpSend | UdpClose | ToEndpoint | DnsQuery | Ping | OffloadChanged
_NONE: tuple = ()

# ---------------------------------------------------------------------------------------------
# The core


class NatCore:
    def __init__(self, policy: NatPolicy, frames: FrameBuilder, emit: Callable[[list[bytes]], None], *,
                 dns: bool = True, rng: random.Random | None = None) -> None:
        self.policy = policy
        self.frames = frames
        self.emit = emit
        self.dns = dns
        self.rng = rng or random.Random()
        net = policy.net
        self.gateway_ip = net.gateway_ip.packed
        self.mss = net.mtu - 40
        self.sessions: dict[int, SessionState] = {}
        self.local_tcp_ports: set[int] = set()
        #: TCP endpoints of the host-switch itself (the host's API, the VMs' data listeners): (ip, port), and
        #: ("", port) for every address.  No VM flow reaches them: through the .254 alias a VM would otherwise
        #: talk to the host's API (every power) or open more sessions of its own.
        self.host_only: set[tuple[str, int]] = set()
        self._destinations: dict[bytes, tuple[str | None, str]] = {}
        self._next_ephemeral = EPHEMERAL_FIRST
        # TCP flows fed segments during the current batch of frames: the shell
        # transmits their answers once per batch (one ACK per flow, not per segment).
        self.dirty: set[TcpFlow] = set()

    def protect(self, ip: str | None, port: int) -> None:
        """Keep VMs away from the host-switch's own listener at ``ip:port`` (None: a wildcard or a name)."""
        self.host_only.add((ip or "", port))

    def destination(self, dst: bytes) -> tuple[str | None, str]:
        """``NatPolicy.destination``, remembered: the policy never changes, and building
        ``ipaddress`` objects for every new flow is a measurable part of a connection's cost."""
        found = self._destinations.get(dst)
        if found is None:
            if len(self._destinations) >= DESTINATION_CACHE:
                self._destinations.clear()
            found = self._destinations[dst] = self.policy.destination(dst)
        return found

    # ---- sessions --------------------------------------------------------------------------
    def open_session(self, sid: int, counters: Counters) -> SessionState:
        state = self.sessions[sid] = SessionState(sid, counters)
        return state

    def close_session(self, sid: int) -> list[TcpFlow]:
        """Forget a session; returns its TCP flows that have a connection (the shell aborts their streams)."""
        state = self.sessions.pop(sid, None)
        if state is None:
            return []
        flows = [f for f in state.tcp.values() if f.conn is not None]
        for f in flows:
            self.dirty.discard(f)
        state.tcp.clear()
        state.udp.clear()
        state.endpoints.clear()
        return flows

    def add_local_service(self, port: int) -> None:
        """The gateway IP serves TCP on ``port`` (DNS, the API); SYNs to it become :class:`StartLocal`."""
        self.local_tcp_ports.add(port)

    # ---- input from the gateway ---------------------------------------------------------------
    def handle(self, sid: int, event, now: float):
        """One event of session ``sid``; returns the actions for the shell (often none)."""
        state = self.sessions.get(sid)
        if state is None:
            return _NONE
        kind = type(event)
        if kind is TcpIn:
            return self._tcp_in(state, event, now)
        if kind is UdpIn:
            return self._udp_in(state, event, now)
        if kind is IcmpEchoIn:
            return self._icmp_in(state, event)
        if kind is OffloadIn:
            ok = bool(event.flags & offload.FLAG_PARTIAL_CSUM_TSO)
            if ok == state.offload:
                return _NONE
            state.offload = ok
            return [OffloadChanged(sid, ok)]
        return _NONE

    # ---- TCP ------------------------------------------------------------------------------------
    def _tcp_in(self, state: SessionState, ev: TcpIn, now: float):
        seg = ev.seg
        key = (ev.src_ip, seg.src_port, ev.dst_ip, seg.dst_port)
        flow = state.tcp.get(key)
        if flow is not None:
            conn = flow.conn
            if conn is None:  # dialling
                if seg.flags & tcp.RST and not flow.abandoned:  # the VM gave up: stop dialling
                    flow.abandoned = True
                    return [CancelDial(flow)]
                return _NONE  # a retransmitted SYN: the answer comes when the dial ends
            conn.receive_segment(seg, now)
            self.dirty.add(flow)
            return _NONE
        if seg.flags & (tcp.SYN | tcp.ACK | tcp.RST) != tcp.SYN:
            rst = rst_for(seg)  # no flow: answer anything but a RST with a RST
            if rst is not None:
                self._send_segment(ev.src_mac, ev.dst_ip, ev.src_ip, rst, state.offload)
            return _NONE
        if ev.dst_ip == self.gateway_ip:
            return self._accept_local(state, ev, key, now)
        dst, reason = self.destination(ev.dst_ip)
        if dst is None:
            return self._refuse_syn(state, ev, reason)
        if self.host_only and ((dst, seg.dst_port) in self.host_only or ("", seg.dst_port) in self.host_only):
            return self._refuse_syn(state, ev, "host-only")
        if len(state.tcp) >= self.policy.max_tcp_flows:
            return self._refuse_syn(state, ev, "flow-limit")
        if state.pending_dials >= self.policy.max_pending_dials:
            state.counters.drop("tcp-dial-limit")  # the VM retransmits its SYN
            return _NONE
        flow = TcpFlow(state.sid, key, ev.src_mac, state.offload, syn=attrs.evolve(seg, payload=b""),
                       dst=(dst, seg.dst_port))
        state.tcp[key] = flow
        state.pending_dials += 1
        return [Dial(flow)]

    def _refuse_syn(self, state: SessionState, ev: TcpIn, reason: str):
        state.counters.drop(f"tcp-{reason}")
        self._send_segment(ev.src_mac, ev.dst_ip, ev.src_ip, rst_for(ev.seg), state.offload)
        return _NONE

    def _send_segment(self, vm_mac: bytes, local_ip: bytes, vm_ip: bytes, seg: tcp.Segment, partial: bool) -> None:
        self.emit([self.frames.tcp_frame(vm_mac, local_ip, vm_ip, seg, partial)])

    def _new_conn(self, state: SessionState, syn: tcp.Segment, now: float) -> TcpConnection:
        size = self.policy.tcp_buffer_size
        conn = TcpConnection.from_syn(syn, now, iss=self.rng.getrandbits(32), mss=self.mss,
                                      rcv_buffer=size, snd_buffer=size)
        if state.offload:
            conn.tso_mss = TSO_MSS
        return conn

    def _accept_local(self, state: SessionState, ev: TcpIn, key: tuple, now: float):
        port = ev.seg.dst_port
        if port not in self.local_tcp_ports:
            return self._refuse_syn(state, ev, "closed-port")
        if len(state.tcp) >= self.policy.max_tcp_flows:
            return self._refuse_syn(state, ev, "flow-limit")
        flow = TcpFlow(state.sid, key, ev.src_mac, state.offload, conn=self._new_conn(state, ev.seg, now))
        flow.conn.accept(now)
        state.tcp[key] = flow
        state.counters.values["tcp_local_total"] += 1
        return [StartLocal(flow, port)]

    def dial_done(self, flow: TcpFlow, failure: str | None, now: float) -> TcpConnection | None:
        """The host dial for ``flow`` ended: ``failure`` is None (connected), "refused", "failed",
        "timeout" or "abandoned".  Returns the accepted connection (its SYN-ACK queued) or None."""
        state = self.sessions.get(flow.sid)
        if state is None:
            return None
        state.pending_dials -= 1
        # Nothing went to the VM for this flow yet: its checksums follow the offload of now, as
        # its segment size does (_new_conn), not that of its SYN (a VM that reconnects sends
        # SYNs before its vm-switch announces offload).
        flow.partial = state.offload
        if failure is None and not flow.abandoned and state.tcp.get(flow.key) is flow:
            flow.conn = self._new_conn(state, flow.syn, now)
            flow.conn.accept(now)
            flow.syn = None
            state.counters.values["tcp_flows_total"] += 1
            return flow.conn
        if state.tcp.get(flow.key) is flow:
            del state.tcp[flow.key]
        if flow.abandoned or failure == "abandoned":
            state.counters.drop("tcp-dial-abandoned")
        elif failure is not None:  # refused, failed or timed out: the VM's connect fails now, as refused
            state.counters.drop(f"tcp-dial-{failure}")
            vm_ip, _vm_port, local_ip, _port = flow.key
            self._send_segment(flow.vm_mac, local_ip, vm_ip, rst_for(flow.syn), flow.partial)
        return None

    def transmit(self, flow: TcpFlow, segments: list[tcp.Segment]) -> None:
        """Frames for segments the flow's connection produced (the stream's transmit callable)."""
        vm_ip, _vm_port, local_ip, _port = flow.key
        build = self.frames.tcp_frame
        mac = flow.vm_mac
        partial = flow.partial
        self.emit([build(mac, local_ip, vm_ip, seg, partial) for seg in segments])

    def flow_closed(self, flow: TcpFlow) -> None:
        """The flow's connection is closed for good (or its task ended): forget it."""
        self.dirty.discard(flow)
        state = self.sessions.get(flow.sid)
        if state is not None and state.tcp.get(flow.key) is flow:
            del state.tcp[flow.key]

    def take_dirty(self) -> set[TcpFlow]:
        dirty = self.dirty
        self.dirty = set()
        return dirty

    # ---- TCP into a VM (port forwarding) -----------------------------------------------------
    def ephemeral_port(self, in_use: Callable[[int], bool] = lambda p: False) -> int:
        """A gateway-side port (49152..65535) that is no local service and for which ``in_use`` is false."""
        for _ in range(EPHEMERAL_LAST - EPHEMERAL_FIRST + 1):
            p = self._next_ephemeral
            self._next_ephemeral = EPHEMERAL_FIRST if p >= EPHEMERAL_LAST else p + 1
            if not in_use(p) and p not in self.local_tcp_ports:
                return p
        raise OSError(98, "no free gateway port")  # EADDRINUSE

    def connect_to_vm(self, sid: int, vm_mac: bytes, vm_ip: bytes, vm_port: int, now: float) -> TcpFlow:
        """An active open from the gateway IP to ``vm_ip:vm_port`` (its SYN queued on ``flow.conn``)."""
        state = self.sessions[sid]
        gw = self.gateway_ip
        local_port = self.ephemeral_port(lambda p: (vm_ip, vm_port, gw, p) in state.tcp)
        key = (vm_ip, vm_port, gw, local_port)
        size = self.policy.tcp_buffer_size
        conn = TcpConnection.connect(local_port, vm_port, now, iss=self.rng.getrandbits(32), mss=self.mss,
                                     rcv_buffer=size, snd_buffer=size)
        if state.offload:
            conn.tso_mss = TSO_MSS
        flow = state.tcp[key] = TcpFlow(sid, key, vm_mac, state.offload, conn=conn)
        return flow

    # ---- UDP ------------------------------------------------------------------------------------
    def _udp_in(self, state: SessionState, ev: UdpIn, now: float):
        if ev.dst_ip == self.gateway_ip:
            endpoint = state.endpoints.get(ev.dst_port)
            if endpoint is not None:
                if endpoint.remote != (ev.src_ip, ev.src_port):
                    state.counters.drop("udp-endpoint-foreign-source")
                    return _NONE
                return [ToEndpoint(endpoint, ev.payload)]
            if ev.dst_port == 53 and self.dns:
                if state.dns_queries >= MAX_DNS_INFLIGHT:
                    state.counters.drop("dns-inflight-limit")  # the resolver retries
                    return _NONE
                state.dns_queries += 1
                return [DnsQuery(state.sid, ev.src_mac, ev.src_ip, ev.src_port, bytes(ev.payload))]
            state.counters.drop("udp-closed-port")
            self.emit([self.frames.icmp_unreachable(ev.src_mac, self.gateway_ip, ev.src_ip, icmp.PORT_UNREACH,
                                                    ev.ip_packet)])
            return _NONE
        key = (ev.src_ip, ev.src_port, ev.dst_ip, ev.dst_port)
        udp_flows = state.udp
        flow = udp_flows.pop(key, None)
        if flow is not None:
            udp_flows[key] = flow  # now the most recently active (dicts keep insertion order)
            flow.last_activity = now
            return [UdpSend(flow, ev.payload)]
        dst, reason = self.destination(ev.dst_ip)
        if dst is None:
            state.counters.drop(f"udp-{reason}")
            if reason != "not-unicast":  # never answer broadcast/multicast with ICMP errors (RFC 1122)
                self.emit([self.frames.icmp_unreachable(ev.src_mac, self.gateway_ip, ev.src_ip, icmp.ADMIN_PROHIBITED,
                                                        ev.ip_packet)])
            return _NONE
        actions = []
        while len(udp_flows) >= self.policy.max_udp_flows:
            # A full table evicts the least recently active flow (as conntrack does): a new flow
            # is never refused while idle ones linger.
            victim = udp_flows.pop(next(iter(udp_flows)))
            state.counters.drop("udp-flow-evicted")
            actions.append(UdpClose(victim))
        flow = udp_flows[key] = UdpFlow(state.sid, key, ev.src_mac, (dst, ev.dst_port), now)
        state.counters.values["udp_flows_total"] += 1
        actions += (UdpOpen(flow), UdpSend(flow, ev.payload))
        return actions

    def udp_reply(self, flow: UdpFlow, payload: bytes | memoryview, now: float) -> None:
        """A datagram came back on ``flow``'s host socket: into the VM, from the address it wrote to."""
        flow.last_activity = now
        state = self.sessions.get(flow.sid)
        if state is not None and state.udp.get(flow.key) is flow:  # (not an evicted flow's late reply)
            del state.udp[flow.key]
            state.udp[flow.key] = flow  # now the most recently active
        vm_ip, vm_port, virt_ip, virt_port = flow.key
        self.udp_to_vm(flow.sid, flow.vm_mac, virt_port, vm_ip, vm_port, payload, src_ip=virt_ip)

    def udp_expired(self, flow: UdpFlow, now: float) -> bool:
        return now >= flow.last_activity + self.policy.udp_idle_timeout

    def udp_closed(self, flow: UdpFlow) -> None:
        state = self.sessions.get(flow.sid)
        if state is not None and state.udp.get(flow.key) is flow:
            del state.udp[flow.key]

    def udp_to_vm(self, sid: int, vm_mac: bytes, src_port: int, vm_ip: bytes, vm_port: int,
                  payload: bytes | memoryview, src_ip: bytes | None = None) -> None:
        """A datagram into a VM (from the gateway IP unless ``src_ip``), fragmented to the MTU if needed."""
        frames = self.frames.udp_frames(vm_mac, src_ip or self.gateway_ip, src_port, vm_ip, vm_port, payload)
        if frames is None:
            state = self.sessions.get(sid)
            if state is not None:
                state.counters.drop("udp-too-large")
            return
        self.emit(frames)

    def dns_done(self, sid: int) -> None:
        state = self.sessions.get(sid)
        if state is not None:
            state.dns_queries -= 1

    def open_endpoint(self, sid: int, remote_ip: bytes, remote_port: int) -> UdpEndpoint:
        """A gateway UDP port of session ``sid`` whose datagrams from ``remote_ip:remote_port`` go to the shell."""
        state = self.sessions[sid]
        port = self.ephemeral_port(lambda p: any(p in s.endpoints for s in self.sessions.values()))
        ep = state.endpoints[port] = UdpEndpoint(sid, port, (remote_ip, remote_port))
        return ep

    def close_endpoint(self, ep: UdpEndpoint) -> None:
        state = self.sessions.get(ep.sid)
        if state is not None and state.endpoints.get(ep.port) is ep:
            del state.endpoints[ep.port]

    # ---- ICMP -----------------------------------------------------------------------------------
    def _icmp_in(self, state: SessionState, ev: IcmpEchoIn):
        dst, reason = self.destination(ev.dst_ip)
        if dst is None:
            state.counters.drop(f"icmp-{reason}")
            return _NONE
        if state.pings >= MAX_PINGS:
            state.counters.drop("icmp-limit")
            return _NONE
        state.pings += 1
        return [Ping(state.sid, ev.src_mac, ev.src_ip, ev.dst_ip, dst, ev.msg)]

    def ping_reply(self, ping: Ping, payload: bytes | memoryview) -> None:
        """The host got the real echo reply: the VM gets one from the address it pinged."""
        frames = self.frames.echo_reply(ping.vm_mac, ping.virtual_dst, ping.vm_ip, ping.msg, payload)
        state = self.sessions.get(ping.sid)
        if frames:
            self.emit(frames)
            if state is not None:
                state.counters.values["icmp_echo_forwarded"] += 1

    def ping_done(self, ping: Ping, failure: str | None = None) -> None:
        state = self.sessions.get(ping.sid)
        if state is not None:
            state.pings -= 1
            if failure:
                state.counters.drop(f"icmp-{failure}")
