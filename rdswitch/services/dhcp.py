"""The gateway's DHCP server, sans-IO.

:meth:`DhcpServer.handle` takes one UDP payload that arrived on port 67 and
the current time, and returns a :class:`DhcpReply` (payload + where to send
it) or ``None`` when there is nothing to say.  Malformed payloads raise
:class:`MalformedPacket`; the caller counts and drops them.

Addresses: static leases by MAC (by default the VM MAC gets ``net.vm_ip``),
everything else from ``net.dhcp_pool`` host numbers, never the gateway, the
host alias (.254), a static address, the network or broadcast address.  The
lease table is kept per MAC for the lifetime of the server, so a client that
restarts gets the same address back; an expired or released address is only
handed to another MAC once no never-used address is left.

We are the only DHCP server on the virtual network and there are no relays,
so messages with a non-zero ``giaddr`` are ignored, and a REQUEST for an
address that is not (or cannot be) the client's lease is NAKed rather than
ignored (RFC 2131 4.3.2 lets an authoritative server do that).
"""

from __future__ import annotations

import logging
from ipaddress import IPv4Address
from typing import Iterable

import attrs

from ..config import ConfigError, NetConfig, format_mac
from ..wire import dhcp as wire
from ..wire.errors import MalformedPacket

log = logging.getLogger(__name__)

BROADCAST_IP = IPv4Address("255.255.255.255")
BROADCAST_MAC = b"\xff" * 6
_ZERO = IPv4Address(0)

__all__ = ["DhcpServer", "DhcpReply", "MalformedPacket"]


@attrs.frozen
class DhcpReply:
    """A reply to send from gateway_ip:67 to dst_ip:68 in a frame to dst_mac."""

    payload: bytes
    dst_ip: IPv4Address
    dst_mac: bytes
    broadcast: bool
    message_type: int = 0


@attrs.define
class _Binding:
    ip: IPv4Address
    expires: float
    bound: bool  # False while only offered, or after RELEASE


class DhcpServer:
    def __init__(
        self,
        net: NetConfig,
        *,
        static_leases: dict[bytes, IPv4Address] | None = None,
        lease_time: int = 3600,
        dns_servers: Iterable[IPv4Address] | None = None,
        search_domains: Iterable[str] = (),
        pool: range | None = None,
        offer_hold: float = 60.0,
        decline_hold: float = 600.0,
    ):
        """``pool`` overrides ``net.dhcp_pool`` (host numbers); ``offer_hold`` is
        how long an offered address stays reserved; ``decline_hold`` how long a
        DECLINEd address is kept out of the pool.  ``search_domains`` (option
        119) is data: the host process replaces it with :meth:`set_search_domains`
        when the host's resolver config changes, never from the frame path."""
        if not 60 <= lease_time < wire.INFINITE_LEASE:
            raise ConfigError(f"invalid DHCP lease time {lease_time}: must be 60 .. {wire.INFINITE_LEASE - 1} seconds")
        self.net = net
        self.server_id = net.gateway_ip
        self.lease_time = int(lease_time)
        self.dns_servers = tuple(IPv4Address(a) for a in (dns_servers if dns_servers is not None else (net.gateway_ip,)))
        self.set_search_domains(search_domains)
        self.offer_hold = offer_hold
        self.decline_hold = decline_hold

        reserved = {net.subnet.network_address, net.subnet.broadcast_address, *net.gateway_ips}
        static: dict[bytes, IPv4Address] = {net.vm_mac: net.vm_ip}
        if static_leases is None and net.static_leases:
            static_leases = dict(net.static_leases)
        for mac, ip in (static_leases or {}).items():
            ip = IPv4Address(ip)
            if len(mac) != 6:
                raise ConfigError(f"invalid static lease MAC {mac!r}: need 6 bytes")
            if ip not in net.subnet or ip in reserved:
                raise ConfigError(f"invalid static lease {format_mac(mac)} -> {ip}: not a usable address of {net.subnet}")
            # an explicit lease for the VM's address replaces the default one
            for other, other_ip in list(static.items()):
                if other_ip == ip and other != mac:
                    if other == net.vm_mac and net.vm_mac not in (static_leases or {}):
                        del static[other]
                    else:
                        raise ConfigError(f"static leases {format_mac(other)} and {format_mac(mac)} both want {ip}")
            static[mac] = ip
        self._static = static
        self._static_ips = set(static.values())
        self._reserved = reserved | self._static_ips

        pool = net.dhcp_pool if pool is None else pool
        base = int(net.subnet.network_address)
        self._pool: list[IPv4Address] = []
        for n in pool:
            ip = IPv4Address(base + n) if 0 <= base + n < 2**32 else None
            if ip is not None and ip in net.subnet and ip not in self._reserved:
                self._pool.append(ip)
        self._pool_set = set(self._pool)

        self._bindings: dict[bytes, _Binding] = {}
        self._owner: dict[IPv4Address, bytes] = {}
        self._declined: dict[IPv4Address, float] = {}
        self._now = 0.0

    # ------------------------------------------------------------------ API

    def leases(self, now: float | None = None) -> dict[str, str]:
        """``{"ip": "mac"}``: static leases plus unexpired bound pool leases, sorted by IP."""
        return {str(ip): format_mac(mac) for ip, mac in sorted(self.lease_table(now).items())}

    def lease_table(self, now: float | None = None) -> dict[IPv4Address, bytes]:
        """``{ip: mac}`` of :meth:`leases`, unformatted."""
        now = self._now if now is None else now
        out = {ip: mac for mac, ip in self._static.items()}
        out.update((b.ip, mac) for mac, b in self._bindings.items() if b.bound and b.expires > now)
        return out

    def holder(self, ip: bytes) -> bytes | None:
        """The MAC whose lease (static, or bound and unexpired) ``ip`` is, if any (``ip``: 4 raw bytes)."""
        addr = IPv4Address(ip)
        if addr in self._static_ips:
            return next(mac for mac, sip in self._static.items() if sip == addr)
        mac = self._owner.get(addr)
        if mac is None:
            return None
        b = self._bindings.get(mac)
        return mac if b is not None and b.bound and b.expires > self._now else None

    def search_domains(self) -> list[str]:
        """The search domains announced in option 119 (the encodable ones)."""
        return list(self._search_domains)

    def set_search_domains(self, domains: Iterable[str]) -> None:
        """Announce ``domains`` in option 119 from now on (none: no option 119).

        Names that cannot be encoded are skipped with a warning.  Replies that
        follow use the new list; clients see it when they next renew.
        """
        if isinstance(domains, (str, bytes)) or callable(domains):
            raise TypeError(f"search domains must be a sequence of names, not {type(domains).__name__}")
        out = []
        for name in domains:
            if wire.is_valid_domain(name):
                out.append(name)
            else:
                log.warning("dhcp: skipping unencodable search domain %r", name)
        self._search_domains = tuple(out)
        self._search_option = wire.encode_domain_search(out) if out else None

    def handle(self, payload: bytes, now: float) -> DhcpReply | None:
        self._now = now
        msg = wire.parse(payload)  # raises MalformedPacket
        if msg.op != wire.BOOTREQUEST or msg.htype != wire.HTYPE_ETHERNET or msg.hlen != 6:
            return None
        if msg.giaddr != _ZERO:
            return None  # no relays on the virtual network
        mac = msg.chaddr
        if mac[0] & 1:
            return None  # a multicast "client" address is nonsense
        self._expire_declines(now)
        t = msg.message_type
        if t == wire.DISCOVER:
            return self._discover(msg, mac, now)
        if t == wire.REQUEST:
            return self._request(msg, mac, now)
        if t == wire.RELEASE:
            self._release(msg, mac, now)
            return None
        if t == wire.DECLINE:
            self._decline(msg, mac, now)
            return None
        if t == wire.INFORM:
            return self._inform(msg, mac)
        return None

    # ------------------------------------------------------------ allocation

    def _usable_by(self, ip: IPv4Address, mac: bytes, now: float) -> bool:
        """Could ``ip`` be this MAC's lease right now?"""
        if mac in self._static:
            return ip == self._static[mac]
        if ip not in self._pool_set or ip in self._declined:
            return False
        owner = self._owner.get(ip)
        if owner is None or owner == mac:
            return True
        return self._bindings[owner].expires <= now

    def _allocate(self, mac: bytes, now: float, requested: IPv4Address | None) -> IPv4Address | None:
        if mac in self._static:
            return self._static[mac]
        b = self._bindings.get(mac)
        if b is not None and b.ip not in self._declined:
            return b.ip
        if requested is not None and self._usable_by(requested, mac, now):
            return requested
        for ip in self._pool:
            if ip not in self._owner and ip not in self._declined:
                return ip
        # No never-used address left: reclaim the longest-expired one.
        expired = [(self._bindings[o].expires, ip) for ip, o in self._owner.items() if self._bindings[o].expires <= now and ip not in self._declined]
        if expired:
            return min(expired)[1]
        return None

    def _assign(self, mac: bytes, ip: IPv4Address, expires: float, bound: bool) -> None:
        if mac in self._static:
            return
        old = self._bindings.get(mac)
        if old is not None and old.ip != ip:
            self._owner.pop(old.ip, None)
        prev_owner = self._owner.get(ip)
        if prev_owner is not None and prev_owner != mac:
            del self._bindings[prev_owner]
        self._owner[ip] = mac
        if old is not None and old.ip == ip:
            old.expires = max(old.expires, expires) if not bound else expires
            old.bound = old.bound or bound
        else:
            self._bindings[mac] = _Binding(ip, expires, bound)

    def _forget(self, mac: bytes) -> None:
        b = self._bindings.pop(mac, None)
        if b is not None:
            self._owner.pop(b.ip, None)

    def _expire_declines(self, now: float) -> None:
        for ip in [ip for ip, until in self._declined.items() if until <= now]:
            del self._declined[ip]

    def _current_lease(self, mac: bytes, now: float) -> IPv4Address | None:
        if mac in self._static:
            return self._static[mac]
        b = self._bindings.get(mac)
        return b.ip if b is not None else None

    # -------------------------------------------------------------- messages

    def _discover(self, msg: wire.DhcpMessage, mac: bytes, now: float) -> DhcpReply | None:
        ip = self._allocate(mac, now, msg.requested_ip)
        if ip is None:
            log.warning("dhcp: pool exhausted, no offer for %s", format_mac(mac))
            return None
        self._assign(mac, ip, now + self.offer_hold, bound=False)
        return self._reply(msg, wire.OFFER, yiaddr=ip, lease=True)

    def _request(self, msg: wire.DhcpMessage, mac: bytes, now: float) -> DhcpReply | None:
        server_id = msg.server_id
        requested = msg.requested_ip
        if server_id is not None:
            # SELECTING: the client answers an offer.
            if server_id != self.server_id:
                b = self._bindings.get(mac)
                if b is not None and not b.bound:
                    self._forget(mac)  # it chose another server
                return None
            if requested is None:
                requested = msg.ciaddr if msg.ciaddr != _ZERO else None
            if requested is None:
                return self._nak(msg, "REQUEST without a requested address")
            if requested != self._allocate(mac, now, requested):
                return self._nak(msg, f"{requested} is not your offered address")
            ip = requested
        elif requested is not None or msg.ciaddr != _ZERO:
            # INIT-REBOOT (the client asks for the address it remembers), or
            # RENEWING (unicast) / REBINDING (broadcast) with the address in ciaddr.
            ip = requested if requested is not None else msg.ciaddr
            if ip not in self.net.subnet:
                return self._nak(msg, f"{ip} is not on {self.net.subnet}")
            current = self._current_lease(mac, now)
            if current is not None and current != ip:
                return self._nak(msg, f"{ip} is not your lease")
            if not self._usable_by(ip, mac, now):
                return self._nak(msg, f"{ip} is not available")
        else:
            return self._nak(msg, "REQUEST without a requested address")
        self._assign(mac, ip, now + self.lease_time, bound=True)
        return self._reply(msg, wire.ACK, yiaddr=ip, lease=True)

    def _release(self, msg: wire.DhcpMessage, mac: bytes, now: float) -> None:
        if msg.server_id is not None and msg.server_id != self.server_id:
            return
        b = self._bindings.get(mac)
        if b is not None and b.ip == msg.ciaddr:
            # Keep the record so this MAC gets the address back if nobody
            # else needs it; it is reclaimable from now on.
            b.bound = False
            b.expires = now

    def _decline(self, msg: wire.DhcpMessage, mac: bytes, now: float) -> None:
        if msg.server_id is not None and msg.server_id != self.server_id:
            return
        ip = msg.requested_ip
        b = self._bindings.get(mac)
        if ip is None or b is None or b.ip != ip:
            return  # static addresses and addresses we never gave this MAC
        log.warning("dhcp: %s declined %s (address in use?)", format_mac(mac), ip)
        self._forget(mac)
        self._declined[ip] = now + self.decline_hold

    def _inform(self, msg: wire.DhcpMessage, mac: bytes) -> DhcpReply | None:
        if msg.ciaddr == _ZERO or msg.ciaddr not in self.net.subnet:
            return None
        return self._reply(msg, wire.ACK, yiaddr=_ZERO, lease=False)

    # --------------------------------------------------------------- replies

    def _options(self, mtype: int, lease: bool) -> dict[int, bytes]:
        opts = {
            wire.OPT_MESSAGE_TYPE: bytes([mtype]),
            wire.OPT_SERVER_ID: wire.encode_ip(self.server_id),
        }
        if lease:
            opts[wire.OPT_LEASE_TIME] = wire.encode_u32(self.lease_time)
            opts[wire.OPT_T1] = wire.encode_u32(self.lease_time // 2)
            opts[wire.OPT_T2] = wire.encode_u32(self.lease_time * 7 // 8)
        opts[wire.OPT_SUBNET_MASK] = wire.encode_ip(self.net.netmask)
        opts[wire.OPT_ROUTER] = wire.encode_ip(self.net.gateway_ip)
        if self.dns_servers:
            opts[wire.OPT_DNS] = wire.encode_ips(self.dns_servers)
        opts[wire.OPT_MTU] = wire.encode_u16(self.net.mtu)
        if self._search_option is not None:
            opts[wire.OPT_DOMAIN_SEARCH] = self._search_option
        return opts

    def _reply(self, req: wire.DhcpMessage, mtype: int, *, yiaddr: IPv4Address, lease: bool) -> DhcpReply:
        opts = self._options(mtype, lease)
        if req.client_id is not None:
            opts[wire.OPT_CLIENT_ID] = req.client_id  # RFC 6842
        msg = _reply_to(req, opts, ciaddr=req.ciaddr if mtype == wire.ACK else _ZERO, yiaddr=yiaddr)
        # RFC 2131 4.1 (giaddr is always zero here)
        if req.ciaddr != _ZERO:
            dst_ip, dst_mac, bcast = req.ciaddr, req.chaddr, False
        elif req.broadcast:
            dst_ip, dst_mac, bcast = BROADCAST_IP, BROADCAST_MAC, True
        else:
            dst_ip, dst_mac, bcast = yiaddr, req.chaddr, False
        return DhcpReply(wire.build(msg), dst_ip, dst_mac, bcast, mtype)

    def _nak(self, req: wire.DhcpMessage, why: str) -> DhcpReply:
        log.info("dhcp: NAK to %s: %s", format_mac(req.chaddr), why)
        msg = _reply_to(req, {
            wire.OPT_MESSAGE_TYPE: bytes([wire.NAK]),
            wire.OPT_SERVER_ID: wire.encode_ip(self.server_id),
            wire.OPT_MESSAGE: why.encode("utf-8"),
        })
        return DhcpReply(wire.build(msg), BROADCAST_IP, BROADCAST_MAC, True, wire.NAK)


def _reply_to(req: wire.DhcpMessage, options: dict[int, bytes], *,
              ciaddr: IPv4Address = _ZERO, yiaddr: IPv4Address = _ZERO) -> wire.DhcpMessage:
    """A BOOTREPLY to ``req``: its transaction, hardware address, flags and relay field."""
    return wire.DhcpMessage(
        op=wire.BOOTREPLY,
        htype=req.htype,
        hlen=req.hlen,
        xid=req.xid,
        flags=req.flags,
        ciaddr=ciaddr,
        yiaddr=yiaddr,
        giaddr=req.giaddr,
        chaddr=req.chaddr,
        options=options,
    )
