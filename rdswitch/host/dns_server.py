"""The gateway's DNS server (trio shell around the ``rdswitch.services.dns`` modules).

``DnsService`` answers one DNS message at a time from whatever transport the
gateway hands it: ``handle_udp`` for a datagram, ``serve_stream`` for a
DNS-over-TCP connection (any ``trio.abc.Stream``, e.g. a virtual TCP stream).
Local zones first, everything else forwarded to the host's resolvers; every
failure becomes a DNS answer (FORMERR, SERVFAIL) or a dropped datagram, never
an exception out of the service.
"""

from __future__ import annotations

import argparse
import logging
import struct
import sys
from typing import Any, Awaitable, Callable

import dnslib
import trio

from rdswitch.config import ConfigError, NetConfig
from rdswitch.host.dns_sources import DEFAULT_RESOLV_CONF, WINDOWS_RECHECK_INTERVAL, DnsSource, ResolvConfFile, WindowsSystem
from rdswitch.host.dns_upstream import Upstreams, UpstreamError, forward
from rdswitch.services.dns import message
from rdswitch.services.dns.authority import DEFAULT_TTL, DnsAuthority
from rdswitch.services.dns.resolvconf import parse_server
from rdswitch.services.dns.zones import (
    add_record, builtin_zones, merge_zones, normalize_record_name, normalize_zone_name, parse_incumbent_zone,
    parse_record_flag, parse_zone_config,
)
from rdswitch.services.policy import HOST, Caller, DnsAdd, DnsState, PolicyRefused, Refusal

log = logging.getLogger(__name__)

STAT_KEYS = (
    "queries", "udp", "tcp", "local", "forwarded", "servfail", "formerr", "notimp",
    "dropped", "truncated", "tcp_connections",
)


class DnsService:
    def __init__(
        self,
        authority: DnsAuthority,
        upstreams: Upstreams,
        *,
        search: list[str] | None = None,
        timeout_per_server: float = 1.0,
        total_timeout: float = 2.5,
        tcp_idle_timeout: float = 10.0,
        tcp_max_inflight: int = 16,
        forwarder: Callable[..., Awaitable[bytes]] = forward,
    ):
        self.authority = authority
        self.upstreams = upstreams
        self._search = list(search) if search else None
        self.timeout_per_server = timeout_per_server
        self.total_timeout = total_timeout
        self.tcp_idle_timeout = tcp_idle_timeout
        self.tcp_max_inflight = tcp_max_inflight
        self._forward = forwarder
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        #: the records VMs added through the API: (zone, name) -> who (a record the host sets again is the host's)
        self.vm_owners: dict[tuple[str, str], Caller] = {}

    # -- one message --------------------------------------------------------------

    async def handle(self, data: bytes, *, tcp: bool = False) -> bytes | None:
        """The reply to one DNS message (full size), or None to drop it.  Never raises."""
        return (await self._answer(data))[0]

    async def _answer(self, data: bytes) -> tuple[bytes | None, dnslib.DNSRecord | None]:
        self.stats["queries"] += 1
        query = None
        try:
            try:
                query = dnslib.DNSRecord.parse(data)
            except Exception:
                query = None
            return await self._handle(data, query), query
        except (trio.Cancelled, KeyboardInterrupt):
            raise
        except Exception:  # a bug of ours must not take the server down
            log.exception("DNS: internal error answering a %d-byte query", len(data))
            self.stats["servfail"] += 1
            return message.servfail(data), query

    async def _handle(self, data: bytes, query: dnslib.DNSRecord | None) -> bytes | None:
        if query is None or (not query.header.qr and query.header.opcode == message.OPCODE_QUERY and len(query.questions) != 1):
            reply = message.formerr(data)
            self.stats["formerr" if reply else "dropped"] += 1
            return reply
        if query.header.qr:
            self.stats["dropped"] += 1
            return None
        if query.header.opcode != message.OPCODE_QUERY:
            self.stats["notimp"] += 1
            return message.notimp(data)
        local = self.authority.answer(query)
        if local is not None:
            self.stats["local"] += 1
            return local.pack()
        self.stats["forwarded"] += 1
        try:
            # UDP first even for TCP clients (some home-router resolvers have no TCP);
            # the forwarder switches to TCP when the answer is truncated.
            return await self._forward(
                data, self.upstreams, timeout_per_server=self.timeout_per_server, total_timeout=self.total_timeout
            )
        except UpstreamError as exc:
            log.warning("DNS: %s -> SERVFAIL for %s", exc, query.q.qname)
            self.stats["servfail"] += 1
            return message.servfail(data)

    async def handle_udp(self, data: bytes, client_addr: Any = None) -> bytes | None:
        """The UDP reply to a datagram (truncated with TC to the client's EDNS0 size), or None."""
        self.stats["udp"] += 1
        reply, query = await self._answer(data)
        if reply is None:
            return None
        limit = message.udp_payload_limit(query)
        if len(reply) > limit:
            self.stats["truncated"] += 1
            reply = message.truncate_for_udp(reply, limit)
        return reply

    # -- transports -----------------------------------------------------------------

    async def serve_stream(self, stream: trio.abc.Stream) -> None:
        """DNS over TCP (RFC 7766) on any stream: length-prefixed messages, several per
        connection, answered concurrently (up to ``tcp_max_inflight``) and possibly out
        of order; closes the stream after ``tcp_idle_timeout`` idle seconds, at EOF, or
        on a malformed message.  Never raises (except Cancelled)."""
        self.stats["tcp_connections"] += 1
        send_lock = trio.Lock()
        limit = trio.Semaphore(self.tcp_max_inflight)

        async def answer(msg: bytes, scope: trio.CancelScope) -> None:
            try:
                reply = await self.handle(msg, tcp=True)
                if reply is None or len(reply) > 65535:
                    scope.cancel()  # not a query we can answer: drop the connection
                    return
                # A client that stops reading must not hold the connection (and
                # its tasks) forever: a reply that cannot be sent in time ends it.
                with trio.move_on_after(self.tcp_idle_timeout) as sending:
                    async with send_lock:
                        await stream.send_all(struct.pack("!H", len(reply)) + reply)
                if sending.cancelled_caught:
                    scope.cancel()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                scope.cancel()
            finally:
                limit.release()

        try:
            async with trio.open_nursery() as nursery:
                buf = bytearray()
                while True:
                    while len(buf) >= 2 and len(buf) >= 2 + struct.unpack_from("!H", buf)[0]:
                        n = struct.unpack_from("!H", buf)[0]
                        msg, buf = bytes(buf[2:2 + n]), buf[2 + n:]
                        self.stats["tcp"] += 1
                        with trio.move_on_after(self.tcp_idle_timeout) as waiting:
                            await limit.acquire()
                        if waiting.cancelled_caught:  # replies stuck: the client is not reading
                            nursery.cancel_scope.cancel()
                            return
                        nursery.start_soon(answer, msg, nursery.cancel_scope)
                    with trio.move_on_after(self.tcp_idle_timeout) as idle:
                        chunk = await stream.receive_some(65536)
                    if idle.cancelled_caught or not chunk:
                        break
                    buf += chunk
                    if len(buf) > 2 * 65537:
                        break
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            log.exception("DNS: TCP connection failed")
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(1):
                    try:
                        await stream.aclose()
                    except Exception:
                        pass

    async def serve_udp_socket(self, sock, *, max_inflight: int = 256, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve a bound trio UDP socket (for tests, benchmarks and a host-port listener).

        Each datagram is answered in its own task; beyond ``max_inflight`` concurrent
        queries datagrams are dropped (the client retries) rather than queued."""
        task_status.started()
        inflight = 0

        async def one(data: bytes, addr: Any) -> None:
            nonlocal inflight
            try:
                reply = await self.handle_udp(data, addr)
                if reply is not None:
                    try:
                        await sock.sendto(reply, addr)
                    except OSError as exc:
                        log.debug("DNS: cannot reply to %s: %s", addr, exc)
            finally:
                inflight -= 1

        async with trio.open_nursery() as nursery:
            while True:
                try:
                    data, addr = await sock.recvfrom(65535)
                except OSError as exc:  # e.g. ICMP errors reported on the socket
                    log.debug("DNS: recvfrom: %s", exc)
                    continue
                if inflight >= max_inflight:
                    self.stats["dropped"] += 1
                    continue
                inflight += 1
                nursery.start_soon(one, data, addr)

    # -- management (for the HTTP API and DHCP) ------------------------------------

    def search_domains(self, *, refresh: bool = False) -> list[str]:
        """Search domains for DHCP option 119: ``--dns-search`` or the source's (resolv.conf search line,
        Windows' suffixes), no trailing dots.

        ``refresh`` checks the source now rather than at most every ``recheck_interval``.
        """
        if self._search is not None:
            return list(self._search)
        if refresh:
            self.upstreams.reload()
        return self.upstreams.search()

    async def keep_search_domains(
        self,
        apply: Callable[[list[str]], None],
        interval: float = 1.0,
        *,
        task_status=trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keep DHCP's search domains in step with the host, off the frame path.

        Calls ``apply(domains)`` at once, then again whenever the source's
        search domains change (checked every ``interval`` seconds, or the
        source's ``recheck_interval`` if longer: Windows is polled, not
        stat'ed); e.g.
        ``nursery.start_soon(dns.keep_search_domains, dhcp.set_search_domains)``.
        With ``--dns-search`` or no source nothing can change: one call,
        and the task returns.
        """
        current = self.search_domains(refresh=True)
        apply(list(current))
        task_status.started()
        source = self.upstreams.source
        if self._search is not None or source is None:
            return
        interval = max(interval, self.upstreams.recheck_interval)
        while True:
            await trio.sleep(interval)
            domains = self.search_domains(refresh=True)
            if domains != current:
                log.info("DHCP search domains now %s (from %s)", domains, source.description)
                current = domains
                apply(list(domains))

    def all_zones(self) -> list[dict]:
        """Every local zone as ``{"name", "records": {name: ip}, "regexp": [[pattern, ip]], "default_ip"}``."""
        return [z.to_dict() for z in self.authority.zones]

    def incumbent_zones(self) -> list[dict]:
        """Every local zone in gvisor-tap-vsock's ``types.Zone`` JSON shape (``GET /services/dns/all``)."""
        return [z.as_incumbent() for z in self.authority.zones]

    def add_record(self, zone: str, name: str, ip: str, owner: Caller = HOST,
                   admit: Callable[[DnsAdd], Refusal | None] | None = None) -> dict:
        """Add/replace a record at run time; raises ConfigError (clear message) for bad input.

        ``admit`` (a VM's request) may refuse it (PolicyRefused) before anything changes.
        """
        zname, rel = normalize_zone_name(zone), normalize_record_name(name)
        self._admit(admit, DnsAdd(zname, (rel,)))
        out = self.authority.add_record(zname, rel, ip).to_dict()
        self._own(zname, (rel,), owner)
        return out

    def add_zone(self, body: Any, owner: Caller = HOST, admit: Callable[[DnsAdd], Refusal | None] | None = None) -> None:
        """gvisor-tap-vsock's ``AddDNS`` body: add or extend a zone (records, regexp records, default IP).

        Its records take precedence over the zone's; a DefaultIP replaces the
        zone's.  Nothing changes unless all of it is valid (ConfigError) and
        ``admit`` lets it through.
        """
        zone = parse_incumbent_zone(body)
        self._admit(admit, DnsAdd(zone.name, tuple(zone.records), len(zone.regexp_records), zone.default_ip is not None))
        self.authority.zones[:] = merge_zones(self.authority.zones, [zone])
        self.authority.rebuild()
        self._own(zone.name, tuple(zone.records), owner)

    @staticmethod
    def _admit(admit, req: DnsAdd) -> None:
        refusal = admit(req) if admit is not None else None
        if refusal is not None:
            raise PolicyRefused(refusal)

    def _own(self, zone: str, names, owner: Caller) -> None:
        for name in names:
            if owner.is_host:
                self.vm_owners.pop((zone, name), None)
            else:
                self.vm_owners[(zone, name)] = owner

    def vm_state(self) -> DnsState:
        """The zones and the owner of every record, for the VM policy."""
        owners = {(z.name, rel): "host" for z in self.authority.zones for rel in z.records}
        owners.update((key, c.owner) for key, c in self.vm_owners.items() if key in owners)
        return DnsState(frozenset(z.name for z in self.authority.zones), owners)

    def session_ended(self, session: int, keep: bool) -> None:
        """A VM's session is over: the records it added go (logged), or stay when ``keep``."""
        gone = [key for key, c in self.vm_owners.items() if c.session == session]
        if not gone or keep:
            return
        zones = {z.name: z for z in self.authority.zones}
        for zone, name in gone:
            caller = self.vm_owners.pop((zone, name))
            if zone in zones and zones[zone].records.pop(name, None) is not None:
                log.info("removed DNS record %s of %s: its session ended", zones[zone].fqdn(name), caller.owner)
        self.authority.rebuild()


# -- flags -------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("DNS")
    if _windows():
        source_help = "the DNS servers of --dns-resolv-conf, or of Windows' network adapters"
        conf_help = ("resolver file to forward to, re-read when it changes; without it, Windows' own settings: "
                     "the DNS servers of the adapters that are up, lowest interface metric first, their DNS "
                     f"suffixes and the registry's SearchList, polled every {WINDOWS_RECHECK_INTERVAL:g} s")
    else:
        source_help = "the nameservers of --dns-resolv-conf"
        conf_help = f"resolver file to forward to, re-read when it changes (default: {DEFAULT_RESOLV_CONF})"
    g.add_argument("--dns-upstream", action="append", default=[], metavar="IP[:PORT]",
                   help=f"upstream DNS server (repeatable); default: {source_help}")
    g.add_argument("--dns-resolv-conf", default=None, metavar="PATH", help=conf_help)
    g.add_argument("--dns-ttl", type=int, default=DEFAULT_TTL, metavar="SECONDS",
                   help="TTL of the local records (default: %(default)s)")
    g.add_argument("--dns-zone-file", metavar="PATH",
                   help='JSON {"zones": [{"name", "records": {label: ip}, "regexp": [[pattern, ip]], "default_ip"}]}')
    g.add_argument("--dns-record", action="append", default=[], metavar="NAME=IP",
                   help="extra local record, e.g. foo.rancher-desktop.internal=10.0.0.5 (repeatable)")
    g.add_argument("--dns-search", action="append", default=[], metavar="DOMAIN",
                   help="search domain announced by DHCP (repeatable); default: the resolv.conf search line"
                        + (" (Windows: the system's DNS suffixes)" if _windows() else ""))


def _windows() -> bool:
    return sys.platform == "win32"


def dns_source(args: argparse.Namespace) -> DnsSource:
    """``--dns-resolv-conf PATH`` when given; else Windows' settings on Windows, /etc/resolv.conf elsewhere."""
    path = getattr(args, "dns_resolv_conf", None)
    if path is not None:
        return ResolvConfFile(path)
    if _windows():
        return WindowsSystem()
    return ResolvConfFile(DEFAULT_RESOLV_CONF)


def from_args(args: argparse.Namespace, net: NetConfig) -> DnsService:
    """Build the service from parsed flags; ConfigError with a clear message for bad values."""
    zones = builtin_zones(net)
    if args.dns_zone_file:
        try:
            with open(args.dns_zone_file, encoding="utf-8") as f:
                text = f.read(1 << 22)
        except OSError as exc:
            raise ConfigError(f"cannot read --dns-zone-file {args.dns_zone_file!r}: {exc.strerror or exc}") from None
        zones = merge_zones(zones, parse_zone_config(text))
    for flag in args.dns_record:
        name, ip = parse_record_flag(flag)
        add_record(zones, name, ip)
    authority = DnsAuthority(zones, args.dns_ttl)
    servers = [parse_server(s) for s in args.dns_upstream]
    upstreams = Upstreams(servers or None, source=dns_source(args))
    search = []
    for d in args.dns_search:
        search.append(normalize_zone_name(d).rstrip("."))
    return DnsService(authority, upstreams, search=search or None)
