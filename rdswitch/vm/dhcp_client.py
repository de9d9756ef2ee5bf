"""A sans-IO DHCP client (RFC 2131 section 4.4): vm-switch configures eth0 with it.

The shell feeds it received UDP payloads (port 68) and timer expiries, and
sends what :meth:`DhcpClient.take_outgoing` returns; it acts on the events
(:class:`Bound` -> configure address/route/MTU/resolv.conf, :class:`Renewed`
-> nothing or refresh, :class:`Lost` -> remove the address).  The core never
reads a clock and has no randomness of its own: ``now`` and the transaction
ids come from the caller.

States: INIT, SELECTING, REQUESTING, REBOOTING (when started with a
remembered address), BOUND, RENEWING, REBINDING.
"""

from __future__ import annotations

import math
from ipaddress import IPv4Address, IPv4Network
from typing import Callable, Union

import attrs

from ..wire import dhcp as wire
from ..wire.errors import MalformedPacket

ZERO = IPv4Address(0)
BROADCAST = IPv4Address("255.255.255.255")

INIT = "INIT"
SELECTING = "SELECTING"
REQUESTING = "REQUESTING"
REBOOTING = "REBOOTING"
BOUND = "BOUND"
RENEWING = "RENEWING"
REBINDING = "REBINDING"

PARAM_REQUEST_LIST = (
    wire.OPT_SUBNET_MASK,
    wire.OPT_ROUTER,
    wire.OPT_DNS,
    wire.OPT_DOMAIN_NAME,
    wire.OPT_MTU,
    wire.OPT_DOMAIN_SEARCH,
)


@attrs.frozen
class Lease:
    ip: IPv4Address
    prefixlen: int
    router: IPv4Address | None
    dns_servers: tuple[IPv4Address, ...]
    mtu: int | None
    search_domains: tuple[str, ...]
    lease_time: int  # seconds; wire.INFINITE_LEASE means forever
    server_id: IPv4Address
    t1: int  # seconds after obtained_at
    t2: int
    obtained_at: float
    domain_name: str | None = None

    @property
    def interface(self):
        """ip/prefixlen as an ``IPv4Interface`` (e.g. 192.168.127.2/24)."""
        from ipaddress import IPv4Interface

        return IPv4Interface(f"{self.ip}/{self.prefixlen}")

    @property
    def infinite(self) -> bool:
        return self.lease_time == wire.INFINITE_LEASE

    @property
    def t1_at(self) -> float:
        return math.inf if self.infinite else self.obtained_at + self.t1

    @property
    def t2_at(self) -> float:
        return math.inf if self.infinite else self.obtained_at + self.t2

    @property
    def expires_at(self) -> float:
        return math.inf if self.infinite else self.obtained_at + self.lease_time


@attrs.frozen
class Bound:
    lease: Lease


@attrs.frozen
class Renewed:
    lease: Lease


@attrs.frozen
class Lost:
    reason: str


Event = Union[Bound, Renewed, Lost]


@attrs.frozen
class Outgoing:
    """A payload to send from src_ip:68 to dst_ip:67 (broadcast: to ff:ff:ff:ff:ff:ff)."""

    payload: bytes
    src_ip: IPv4Address
    dst_ip: IPv4Address
    broadcast: bool


def _classful_prefix(ip: IPv4Address) -> int:
    first = ip.packed[0]
    return 8 if first < 128 else 16 if first < 192 else 24


class DhcpClient:
    MAX_BACKOFF = 8.0
    REQUEST_TRIES = 4  # REQUESTING / REBOOTING attempts before starting over
    MIN_RENEW_RETRY = 60.0  # RFC 2131 4.4.5

    def __init__(
        self,
        mac: bytes,
        *,
        xid: int,
        hostname: str | None = None,
        new_xid: Callable[[], int] | None = None,
        broadcast_flag: bool = False,
    ):
        """``xid`` is the first transaction id; ``new_xid`` (e.g.
        ``lambda: random.getrandbits(32)``) supplies the next ones, else they
        count up.  ``broadcast_flag`` asks the server to broadcast its replies
        (for stacks that drop unicast to an unconfigured interface)."""
        if len(mac) != 6:
            raise ValueError(f"MAC must be 6 bytes, got {len(mac)}")
        self.mac = bytes(mac)
        self.xid = xid & 0xFFFFFFFF
        self.hostname = hostname
        self._new_xid = new_xid
        self._broadcast_flag = broadcast_flag
        self.state = INIT
        self.lease: Lease | None = None
        self._out: list[Outgoing] = []
        self._deadline: float | None = None
        self._tries = 0
        self._exchange_start = 0.0
        self._offer: tuple[IPv4Address, IPv4Address] | None = None  # (yiaddr, server id)
        self._reboot_ip: IPv4Address | None = None
        self._request_sent_at = 0.0
        self._xid_fresh = True  # the xid given to __init__ is not used yet

    # ------------------------------------------------------------ public API

    def start(self, now: float, *, requested_ip: IPv4Address | None = None) -> None:
        """Begin: DISCOVER, or with ``requested_ip`` (a remembered address) INIT-REBOOT."""
        self.lease = None
        self._offer = None
        if requested_ip is not None:
            self._reboot_ip = IPv4Address(requested_ip)
            self._begin_exchange(now)
            self.state = REBOOTING
            self._send_request(now)
        else:
            self._restart(now)

    def next_timeout(self) -> float | None:
        if self._deadline is None or math.isinf(self._deadline):
            return None
        return self._deadline

    def take_outgoing(self) -> list[Outgoing]:
        out, self._out = self._out, []
        return out

    def release(self, now: float) -> list[Event]:
        """Give the lease back (e.g. on shutdown); the client goes to INIT and stays there."""
        lease = self.lease
        if lease is None or self.state not in (BOUND, RENEWING, REBINDING):
            return []
        msg = self._message(wire.RELEASE, now, ciaddr=lease.ip)
        msg.options[wire.OPT_SERVER_ID] = wire.encode_ip(lease.server_id)
        self._out.append(Outgoing(wire.build(msg), lease.ip, lease.server_id, False))
        self.lease = None
        self.state = INIT
        self._deadline = None
        return [Lost("released")]

    def handle_timeout(self, now: float) -> list[Event]:
        if self._deadline is None or now < self._deadline:
            return []
        if self.state == SELECTING:
            self._tries += 1
            self._send_discover(now)
            return []
        if self.state in (REQUESTING, REBOOTING):
            if self._tries >= self.REQUEST_TRIES:
                self._restart(now)
                return []
            self._tries += 1
            self._send_request(now)
            return []
        lease = self.lease
        if lease is None or self.state not in (BOUND, RENEWING, REBINDING):
            self._deadline = None
            return []
        if now >= lease.expires_at:
            self._restart(now)
            return [Lost("lease expired")]
        if now >= lease.t2_at and self.state != REBINDING:
            self.state = REBINDING
            self._begin_exchange(now)
        elif now >= lease.t1_at and self.state == BOUND:
            self.state = RENEWING
            self._begin_exchange(now)
        elif self.state == BOUND:
            self._deadline = lease.t1_at
            return []
        self._send_request(now)
        return []

    def receive(self, payload: bytes, now: float) -> list[Event]:
        try:
            msg = wire.parse(payload)
        except MalformedPacket:
            return []
        if msg.op != wire.BOOTREPLY or msg.xid != self.xid or msg.hlen != 6 or msg.chaddr != self.mac:
            return []
        t = msg.message_type
        if t == wire.OFFER and self.state == SELECTING:
            return self._on_offer(msg, now)
        if t == wire.ACK and self.state in (REQUESTING, REBOOTING, RENEWING, REBINDING):
            return self._on_ack(msg, now)
        if t == wire.NAK and self.state in (REQUESTING, REBOOTING, RENEWING, REBINDING):
            if self.state == REQUESTING and self._offer and msg.server_id not in (None, self._offer[1]):
                return []  # a NAK from a server we did not select
            why = msg.message or "no reason given"
            self._restart(now)
            return [Lost(f"NAK from server: {why}")]
        return []

    # -------------------------------------------------------------- internals

    def _begin_exchange(self, now: float) -> None:
        if self._xid_fresh:
            self._xid_fresh = False
        else:
            self.xid = (self._new_xid() if self._new_xid else self.xid + 1) & 0xFFFFFFFF
        self._exchange_start = now
        self._tries = 0

    def _restart(self, now: float) -> None:
        self.lease = None
        self._offer = None
        self._reboot_ip = None
        self.state = SELECTING
        self._begin_exchange(now)
        self._send_discover(now)

    def _backoff(self) -> float:
        return min(2.0 ** self._tries, self.MAX_BACKOFF)

    def _message(self, mtype: int, now: float, *, ciaddr: IPv4Address = ZERO) -> wire.DhcpMessage:
        opts = {
            wire.OPT_MESSAGE_TYPE: bytes([mtype]),
            wire.OPT_CLIENT_ID: b"\x01" + self.mac,
        }
        secs = max(0, min(int(now - self._exchange_start), 0xFFFF))
        return wire.DhcpMessage(
            op=wire.BOOTREQUEST,
            xid=self.xid,
            secs=secs,
            flags=wire.FLAG_BROADCAST if self._broadcast_flag and ciaddr == ZERO else 0,
            ciaddr=ciaddr,
            chaddr=self.mac,
            options=opts,
        )

    def _add_params(self, msg: wire.DhcpMessage) -> None:
        if self.hostname:
            msg.options[wire.OPT_HOSTNAME] = self.hostname.encode("utf-8")
        msg.options[wire.OPT_PARAM_REQUEST_LIST] = bytes(PARAM_REQUEST_LIST)

    def _send_discover(self, now: float) -> None:
        msg = self._message(wire.DISCOVER, now)
        self._add_params(msg)
        self._out.append(Outgoing(wire.build(msg), ZERO, BROADCAST, True))
        self._deadline = now + self._backoff()

    def _send_request(self, now: float) -> None:
        self._request_sent_at = now if self._tries == 0 or self.state not in (REQUESTING, REBOOTING) else self._request_sent_at
        if self.state == REQUESTING:
            assert self._offer is not None
            msg = self._message(wire.REQUEST, now)
            msg.options[wire.OPT_REQUESTED_IP] = wire.encode_ip(self._offer[0])
            msg.options[wire.OPT_SERVER_ID] = wire.encode_ip(self._offer[1])
            self._add_params(msg)
            out = Outgoing(wire.build(msg), ZERO, BROADCAST, True)
            self._deadline = now + self._backoff()
        elif self.state == REBOOTING:
            assert self._reboot_ip is not None
            msg = self._message(wire.REQUEST, now)
            msg.options[wire.OPT_REQUESTED_IP] = wire.encode_ip(self._reboot_ip)
            self._add_params(msg)
            out = Outgoing(wire.build(msg), ZERO, BROADCAST, True)
            self._deadline = now + self._backoff()
        else:
            lease = self.lease
            assert lease is not None and self.state in (RENEWING, REBINDING)
            self._request_sent_at = now
            msg = self._message(wire.REQUEST, now, ciaddr=lease.ip)
            self._add_params(msg)
            if self.state == RENEWING:
                out = Outgoing(wire.build(msg), lease.ip, lease.server_id, False)
                until = lease.t2_at
            else:
                out = Outgoing(wire.build(msg), lease.ip, BROADCAST, True)
                until = lease.expires_at
            self._deadline = min(until, now + max(self.MIN_RENEW_RETRY, (until - now) / 2))
        self._out.append(out)

    def _on_offer(self, msg: wire.DhcpMessage, now: float) -> list[Event]:
        if msg.yiaddr == ZERO or msg.server_id is None:
            return []  # unusable offer
        self._offer = (msg.yiaddr, msg.server_id)
        self.state = REQUESTING
        self._tries = 0
        self._send_request(now)
        return []

    def _on_ack(self, msg: wire.DhcpMessage, now: float) -> list[Event]:
        lease_time = msg.lease_time
        if msg.yiaddr == ZERO or lease_time is None:
            return []  # an ACK without an address or lease time is of no use
        if self.state == REQUESTING:
            assert self._offer is not None
            if msg.server_id not in (None, self._offer[1]):
                return []
        old = self.lease
        server_id = msg.server_id or (old.server_id if old else None) or (self._offer[1] if self._offer else None)
        if server_id is None:
            return []
        new = self._make_lease(msg, lease_time, server_id, self._request_sent_at)
        self._offer = None
        self._reboot_ip = None
        self.lease = new
        self.state = BOUND
        self._tries = 0
        self._deadline = new.t1_at
        if old is not None and old.ip == new.ip:
            return [Renewed(new)]
        if old is not None:
            return [Lost(f"server moved us from {old.ip} to {new.ip}"), Bound(new)]
        return [Bound(new)]

    @staticmethod
    def _make_lease(msg: wire.DhcpMessage, lease_time: int, server_id: IPv4Address, obtained_at: float) -> Lease:
        prefixlen = msg.prefixlen
        if prefixlen is None:
            prefixlen = _classful_prefix(msg.yiaddr)
        t2 = msg.t2 if msg.t2 is not None else lease_time * 7 // 8
        t1 = msg.t1 if msg.t1 is not None else lease_time // 2
        t2 = min(t2, lease_time)
        t1 = min(t1, t2)
        routers = [r for r in msg.routers if r in IPv4Network(f"{msg.yiaddr}/{prefixlen}", strict=False)] or list(msg.routers)
        return Lease(
            ip=msg.yiaddr,
            prefixlen=prefixlen,
            router=routers[0] if routers else None,
            dns_servers=msg.dns_servers,
            mtu=msg.mtu,
            search_domains=msg.search_domains,
            lease_time=lease_time,
            server_id=server_id,
            t1=t1,
            t2=t2,
            obtained_at=obtained_at,
            domain_name=msg.domain_name,
        )
