"""DNS of the virtual gateway: the sans-IO core.

No sockets, no clock, no randomness: DNS messages (bytes or
``dnslib.DNSRecord``) in, DNS messages out.  The trio shells live in
``rdswitch/host/dns_server.py`` (serving) and ``rdswitch/host/dns_upstream.py``
(forwarding to the host's resolvers).

What is answered here (``DnsAuthority.answer``), for every configured zone:

* ``A`` of a known name -> the record (explicit, then regexp, then the zone's
  default IP), with a non-zero TTL;
* any other type of a known name -> NOERROR, no answer, the zone's SOA in the
  authority section (a cacheable "no data" answer, RFC 2308);
* an unknown name inside the zone -> NXDOMAIN with the zone's SOA;
* the zone apex -> SOA and NS (and A if the zone has an ``@`` record);
* ``PTR`` of the reverse name of any explicit record's IP -> the record names.

Everything else is "not ours" (``None``) and is forwarded verbatim upstream.
"""

from __future__ import annotations

import ipaddress
import json
import re
import struct
from typing import Any, Iterable

import attrs
import dnslib
from dnslib import QTYPE, RCODE, RR, DNSRecord

from rdswitch.config import ConfigError, NetConfig

BUILTIN_ZONES = ("rancher-desktop.internal.", "docker.internal.")
DEFAULT_TTL = 60
MIN_UDP_PAYLOAD = 512
# What we announce in our own OPT record: the size the DNS flag day 2020
# recommends, small enough to avoid IP fragmentation on every sane path.
OUR_UDP_PAYLOAD = 1232
APEX = "@"

_LABEL_RE = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
_HEADER = struct.Struct("!HHHHHH")

CLASS_IN = 1
CLASS_ANY = 255
OPCODE_QUERY = 0


# --------------------------------------------------------------------------
# names


def normalize_zone_name(name: str) -> str:
    """``Docker.Internal`` -> ``docker.internal.``; ConfigError if not a valid DNS name."""
    if not isinstance(name, str):
        raise ConfigError(f"invalid zone name {name!r}: not a string")
    text = name.strip().lower().rstrip(".")
    if not text:
        raise ConfigError(f"invalid zone name {name!r}: empty (the root zone cannot be served locally)")
    _check_labels(text, f"zone name {name!r}")
    if len(text) > 253:
        raise ConfigError(f"invalid zone name {name!r}: longer than 253 characters")
    return text + "."


def normalize_record_name(name: str) -> str:
    """A record name relative to its zone: ``Foo`` -> ``foo``, ``a.b`` stays, ``@``/empty is the apex."""
    if not isinstance(name, str):
        raise ConfigError(f"invalid record name {name!r}: not a string")
    text = name.strip().lower().rstrip(".")
    if text in ("", APEX):
        return APEX
    _check_labels(text, f"record name {name!r}")
    return text


def _check_labels(text: str, what: str) -> None:
    for label in text.split("."):
        if not _LABEL_RE.match(label):
            raise ConfigError(
                f"invalid {what}: label {label!r} must be 1-63 letters, digits, '-' or '_' (not starting or ending with '-')"
            )


def parse_ipv4(text: Any, what: str = "IP") -> ipaddress.IPv4Address:
    if isinstance(text, ipaddress.IPv4Address):
        return text
    try:
        return ipaddress.IPv4Address(str(text).strip())
    except ValueError:
        raise ConfigError(f"invalid {what} {text!r}: expected an IPv4 address like 10.0.0.5") from None


def _name_labels(name: str) -> tuple[bytes, ...]:
    return tuple(x.encode() for x in name.rstrip(".").split(".") if x)


# --------------------------------------------------------------------------
# zones


def _compile(pattern: str | re.Pattern) -> re.Pattern:
    if isinstance(pattern, re.Pattern):
        return pattern
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"invalid regexp {pattern!r}: expected a non-empty string")
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        raise ConfigError(f"invalid regexp {pattern!r}: {exc}") from None


def _records_converter(value: Any) -> dict[str, ipaddress.IPv4Address]:
    if not isinstance(value, dict):
        raise ConfigError(f"invalid records {value!r}: expected a mapping of name to IP")
    return {normalize_record_name(k): parse_ipv4(v, f"IP of record {k!r}") for k, v in value.items()}


def _regexp_converter(value: Any) -> list[tuple[re.Pattern, ipaddress.IPv4Address]]:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"invalid regexp records {value!r}: expected a list of [pattern, ip] pairs")
    out = []
    for item in value:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ConfigError(f"invalid regexp record {item!r}: expected [pattern, ip]")
        out.append((_compile(item[0]), parse_ipv4(item[1], f"IP of regexp record {item[0]!r}")))
    return out


def _opt_ip(value: Any) -> ipaddress.IPv4Address | None:
    return None if value is None or value == "" else parse_ipv4(value, "default IP")


@attrs.define
class Zone:
    """A locally served zone.

    ``records`` maps a name relative to the zone (``"host"``, ``"a.b"``, or
    ``"@"`` for the apex) to an IPv4 address.  ``regexp_records`` are tried in
    order against the relative name (full match, case-insensitive) when no
    explicit record matches; then ``default_ip`` answers every other name of
    the zone.  Without a match the name does not exist (NXDOMAIN).
    """

    name: str = attrs.field(converter=normalize_zone_name)
    records: dict[str, ipaddress.IPv4Address] = attrs.field(factory=dict, converter=_records_converter)
    regexp_records: list[tuple[re.Pattern, ipaddress.IPv4Address]] = attrs.field(factory=list, converter=_regexp_converter)
    default_ip: ipaddress.IPv4Address | None = attrs.field(default=None, converter=_opt_ip)

    @property
    def labels(self) -> tuple[bytes, ...]:
        return _name_labels(self.name)

    def fqdn(self, relname: str) -> str:
        return self.name if relname == APEX else f"{relname}.{self.name}"

    def lookup(self, relname: str) -> ipaddress.IPv4Address | None:
        """The IP of a relative name, or None if the name has no A record."""
        ip = self.records.get(relname)
        if ip is not None:
            return ip
        if relname == APEX:
            return None
        for pattern, rip in self.regexp_records:
            if pattern.fullmatch(relname):
                return rip
        return self.default_ip

    def exists(self, relname: str) -> bool:
        """Does the name exist (possibly without an A record: apex, empty non-terminal)?"""
        if relname == APEX or self.lookup(relname) is not None:
            return True
        suffix = "." + relname
        return any(k.endswith(suffix) for k in self.records)

    def to_dict(self) -> dict:
        """JSON-able form, the same shape the zone file uses."""
        return {
            "name": self.name,
            "records": {k: str(v) for k, v in self.records.items()},
            "regexp": [[p.pattern, str(ip)] for p, ip in self.regexp_records],
            "default_ip": None if self.default_ip is None else str(self.default_ip),
        }


def builtin_zones(net: NetConfig) -> list[Zone]:
    """``rancher-desktop.internal.`` and ``docker.internal.``, each with gateway and host."""
    return [Zone(name, {"gateway": net.gateway_ip, "host": net.host_alias_ip}) for name in BUILTIN_ZONES]


def find_zone(zones: Iterable[Zone], fqdn: str) -> Zone | None:
    """The zone (longest suffix match) that holds ``fqdn``."""
    labels = _name_labels(fqdn.lower())
    best = None
    for zone in zones:
        zl = zone.labels
        if len(labels) >= len(zl) and labels[len(labels) - len(zl):] == zl:
            if best is None or len(zl) > len(best.labels):
                best = zone
    return best


def add_record(zones: list[Zone], fqdn: str, ip: Any) -> Zone:
    """Add ``fqdn -> ip`` to the zone holding it; create a zone (the parent domain) if none does.

    ``fqdn`` may name an existing zone itself (its apex).  Returns the zone.
    """
    if not isinstance(fqdn, str):
        raise ConfigError(f"invalid record name {fqdn!r}: not a string")
    name = normalize_zone_name(fqdn)  # validates the whole name
    addr = parse_ipv4(ip, f"IP of record {fqdn!r}")
    zone = find_zone(zones, name)
    if zone is None:
        labels = name.rstrip(".").split(".")
        if len(labels) < 2:
            raise ConfigError(f"invalid record name {fqdn!r}: needs a zone, like foo.rancher-desktop.internal")
        zone = Zone(".".join(labels[1:]))
        zones.append(zone)
    rel = name[: -len(zone.name)].rstrip(".") or APEX
    zone.records[rel] = addr
    return zone


def parse_record_flag(text: str) -> tuple[str, ipaddress.IPv4Address]:
    """``--dns-record foo.rancher-desktop.internal=10.0.0.5`` -> (name, ip)."""
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(f"invalid --dns-record {text!r}: expected NAME=IP, like foo.rancher-desktop.internal=10.0.0.5")
    name, _, ip = text.partition("=")
    name = name.strip()
    if not name:
        raise ConfigError(f"invalid --dns-record {text!r}: the name is empty")
    normalize_zone_name(name)
    return name, parse_ipv4(ip, f"IP in --dns-record {text!r}")


def parse_zone_config(text: str) -> list[Zone]:
    """The zone file: ``{"zones": [{"name", "records": {label: ip}, "regexp": [[pat, ip]], "default_ip"}]}``."""
    try:
        data = json.loads(text)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"invalid DNS zone file: not JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("zones"), list):
        raise ConfigError('invalid DNS zone file: expected an object {"zones": [...]}')
    zones = []
    for i, item in enumerate(data["zones"]):
        if not isinstance(item, dict):
            raise ConfigError(f"invalid DNS zone file: zone #{i} is not an object")
        unknown = set(item) - {"name", "records", "regexp", "default_ip"}
        if unknown:
            raise ConfigError(f"invalid DNS zone file: zone #{i} has unknown keys {sorted(unknown)}")
        if "name" not in item:
            raise ConfigError(f"invalid DNS zone file: zone #{i} has no name")
        try:
            zones.append(
                Zone(
                    item["name"],
                    {} if item.get("records") is None else item["records"],
                    [] if item.get("regexp") is None else item["regexp"],
                    item.get("default_ip"),
                )
            )
        except ConfigError as exc:
            raise ConfigError(f"invalid DNS zone file, zone #{i}: {exc}") from None
    return zones


def merge_zones(base: list[Zone], extra: Iterable[Zone]) -> list[Zone]:
    """Zones of ``extra`` with the name of a ``base`` zone extend it (their records win); others are appended."""
    out = list(base)
    for zone in extra:
        same = next((z for z in out if z.name == zone.name), None)
        if same is None:
            out.append(zone)
        else:
            same.records.update(zone.records)
            same.regexp_records = zone.regexp_records + same.regexp_records
            if zone.default_ip is not None:
                same.default_ip = zone.default_ip
    return out


# --------------------------------------------------------------------------
# the authority


def _reverse_labels(ip: ipaddress.IPv4Address) -> tuple[bytes, ...]:
    return tuple(str(b).encode() for b in reversed(ip.packed)) + (b"in-addr", b"arpa")


class DnsAuthority:
    """Answers queries for the local zones; ``None`` means "not ours, forward it"."""

    def __init__(self, zones: list[Zone], ttl: int = DEFAULT_TTL, nameserver: str | None = None):
        if not isinstance(ttl, int) or not 0 < ttl <= 2**31 - 1:
            raise ConfigError(f"invalid DNS TTL {ttl!r}: must be 1..2147483647 seconds")
        self.zones = zones
        self.ttl = ttl
        self._nameserver = nameserver
        self._ptr: dict[tuple[bytes, ...], list[str]] = {}
        self.rebuild()

    # -- configuration --------------------------------------------------------

    def rebuild(self) -> None:
        """Recompute the reverse index (call after changing ``zones``)."""
        ptr: dict[tuple[bytes, ...], list[str]] = {}
        for zone in self.zones:
            for rel, ip in zone.records.items():
                ptr.setdefault(_reverse_labels(ip), []).append(zone.fqdn(rel))
        self._ptr = ptr

    def add_record(self, zone: str, name: str, ip: Any) -> Zone:
        """Add ``name`` (relative to ``zone``, ``@`` = apex) -> ``ip``; creates the zone if needed."""
        zname = normalize_zone_name(zone)
        rel = normalize_record_name(name)
        addr = parse_ipv4(ip, f"IP of record {name!r}")
        z = next((x for x in self.zones if x.name == zname), None)
        if z is None:
            z = Zone(zname)
            self.zones.append(z)
        z.records[rel] = addr
        self.rebuild()
        return z

    def nameserver_for(self, zone: Zone) -> str:
        """The zone's own ``gateway`` name if it has one, else the global nameserver name."""
        if self._nameserver:
            return self._nameserver
        return zone.fqdn("gateway") if "gateway" in zone.records else self.nameserver

    @property
    def nameserver(self) -> str:
        if self._nameserver:
            return self._nameserver
        for zone in self.zones:
            if "gateway" in zone.records:
                return zone.fqdn("gateway")
        return "ns." + (self.zones[0].name if self.zones else "rancher-desktop.internal.")

    def soa(self, zone: Zone) -> RR:
        times = (1, 3600, 600, 86400, self.ttl)  # serial, refresh, retry, expire, negative TTL
        return RR(zone.name, QTYPE.SOA, CLASS_IN, self.ttl, dnslib.SOA(self.nameserver_for(zone), "hostmaster." + zone.name, times))

    # -- answering -------------------------------------------------------------

    def answer(self, query: DNSRecord) -> DNSRecord | None:
        h = query.header
        if h.qr or h.opcode != OPCODE_QUERY or len(query.questions) != 1:
            return None
        q = query.q
        if q.qclass not in (CLASS_IN, CLASS_ANY):
            return None
        labels = tuple(x.lower() for x in q.qname.label)
        if len(labels) >= 2 and labels[-2:] == (b"in-addr", b"arpa"):
            return self._answer_reverse(query, labels)
        zone = None
        for z in self.zones:
            zl = z.labels
            if len(labels) >= len(zl) and labels[len(labels) - len(zl):] == zl:
                if zone is None or len(zl) > len(zone.labels):
                    zone = z
        if zone is None:
            return None
        rel_labels = labels[: len(labels) - len(zone.labels)]
        reply = self._reply(query)
        if any(b"." in x for x in rel_labels):
            relname = None  # a label with a literal dot cannot be one of ours
        else:
            relname = ".".join(x.decode("latin-1") for x in rel_labels) or APEX
        if relname is None or not zone.exists(relname):
            reply.header.rcode = RCODE.NXDOMAIN
            reply.add_auth(self.soa(zone))
            return self._finish(query, reply)
        qtype = q.qtype
        qname = q.qname
        ip = zone.lookup(relname)
        if qtype in (QTYPE.A, QTYPE.ANY) and ip is not None:
            reply.add_answer(RR(qname, QTYPE.A, CLASS_IN, self.ttl, dnslib.A(str(ip))))
        if relname == APEX and qtype in (QTYPE.SOA, QTYPE.ANY):
            reply.add_answer(self.soa(zone))
        if relname == APEX and qtype in (QTYPE.NS, QTYPE.ANY):
            ns = self.nameserver_for(zone)
            reply.add_answer(RR(qname, QTYPE.NS, CLASS_IN, self.ttl, dnslib.NS(ns)))
            ns_ip = self._lookup_fqdn(ns)
            if ns_ip is not None:
                reply.add_ar(RR(ns, QTYPE.A, CLASS_IN, self.ttl, dnslib.A(str(ns_ip))))
        if not reply.rr:
            reply.add_auth(self.soa(zone))  # NOERROR, no data
        return self._finish(query, reply)

    def _lookup_fqdn(self, fqdn: str) -> ipaddress.IPv4Address | None:
        zone = find_zone(self.zones, fqdn)
        if zone is None:
            return None
        rel = fqdn.lower().rstrip(".")[: -len(zone.name.rstrip("."))].rstrip(".") or APEX
        return zone.lookup(rel)

    def _answer_reverse(self, query: DNSRecord, labels: tuple[bytes, ...]) -> DNSRecord | None:
        names = self._ptr.get(labels)
        if not names:
            return None
        reply = self._reply(query)
        if query.q.qtype in (QTYPE.PTR, QTYPE.ANY):
            for name in names:
                reply.add_answer(RR(query.q.qname, QTYPE.PTR, CLASS_IN, self.ttl, dnslib.PTR(name)))
        return self._finish(query, reply)

    def _reply(self, query: DNSRecord) -> DNSRecord:
        reply = DNSRecord(
            dnslib.DNSHeader(id=query.header.id, qr=1, aa=1, ra=1, rd=query.header.rd),
            q=query.q,
        )
        return reply

    @staticmethod
    def _finish(query: DNSRecord, reply: DNSRecord) -> DNSRecord:
        if client_edns(query) is not None:
            reply.add_ar(dnslib.EDNS0(udp_len=OUR_UDP_PAYLOAD))  # OPT goes last
        return reply


# --------------------------------------------------------------------------
# raw-message helpers (work on bytes so that they cope with what dnslib cannot parse)


def client_edns(query: DNSRecord) -> int | None:
    """The client's advertised EDNS0 UDP payload size, or None without an OPT record."""
    for rr in query.ar:
        if rr.rtype == QTYPE.OPT:
            return rr.rclass
    return None


def udp_payload_limit(query: DNSRecord | None) -> int:
    """How large a UDP reply this client accepts: its EDNS0 size, never below 512."""
    size = client_edns(query) if query is not None else None
    if size is None:
        return MIN_UDP_PAYLOAD
    return max(MIN_UDP_PAYLOAD, min(size, 65535))


def _question_end(data: bytes) -> int | None:
    """Offset just past the first question, or None if it cannot be walked (no compression allowed)."""
    pos = 12
    for _ in range(128):
        if pos >= len(data):
            return None
        n = data[pos]
        if n == 0:
            pos += 1
            break
        if n & 0xC0:
            return None
        pos += 1 + n
    else:
        return None
    pos += 4
    return pos if pos <= len(data) else None


def _error_reply(query_bytes: bytes, rcode: int, keep_question: bool) -> bytes | None:
    if len(query_bytes) < 12:
        return None
    qid, flags, qdcount, _, _, _ = _HEADER.unpack_from(query_bytes)
    if flags & 0x8000:  # a response: never answer it (no reflection loops)
        return None
    opcode = (flags >> 11) & 0xF
    rd = flags & 0x0100
    out_flags = 0x8000 | (opcode << 11) | rd | 0x0080 | (rcode & 0xF)
    question = b""
    if keep_question and qdcount == 1:
        end = _question_end(query_bytes)
        if end is not None:
            question = query_bytes[12:end]
    return _HEADER.pack(qid, out_flags, 1 if question else 0, 0, 0, 0) + question


def formerr(query_bytes: bytes) -> bytes | None:
    """FORMERR for a message we could not parse; None (drop it) if not even a query header."""
    return _error_reply(query_bytes, RCODE.FORMERR, keep_question=False)


def servfail(query_bytes: bytes) -> bytes | None:
    """SERVFAIL echoing the question (when it can be found); None if not a query."""
    return _error_reply(query_bytes, RCODE.SERVFAIL, keep_question=True)


def notimp(query_bytes: bytes) -> bytes | None:
    return _error_reply(query_bytes, RCODE.NOTIMP, keep_question=True)


def truncate_for_udp(reply_bytes: bytes, client_max: int) -> bytes:
    """The reply if it fits in ``client_max`` bytes; else header + question + OPT with TC set.

    Answers, authority and other additional records are dropped so that the
    client retries over TCP (RFC 7766) instead of using a partial answer.
    """
    limit = max(MIN_UDP_PAYLOAD, client_max)
    if len(reply_bytes) <= limit or len(reply_bytes) < 12:
        return reply_bytes
    qid, flags, qdcount, _, _, _ = _HEADER.unpack_from(reply_bytes)
    flags |= 0x0200
    question = b""
    if qdcount == 1:
        end = _question_end(reply_bytes)
        if end is not None:
            question = reply_bytes[12:end]
    opt = b""
    try:
        parsed = DNSRecord.parse(reply_bytes)
    except Exception:
        parsed = None
    if parsed is not None:
        opts = [rr for rr in parsed.ar if rr.rtype == QTYPE.OPT]
        if opts:
            buf = dnslib.DNSBuffer()
            opts[0].pack(buf)
            opt = bytes(buf.data)
    out = _HEADER.pack(qid, flags, 1 if question else 0, 0, 0, 1 if opt else 0) + question + opt
    return out if len(out) <= limit else _HEADER.pack(qid, flags, 0, 0, 0, 0)


def is_truncated(reply_bytes: bytes) -> bool:
    return len(reply_bytes) >= 4 and bool(reply_bytes[2] & 0x02)


def rcode_of(reply_bytes: bytes) -> int:
    return reply_bytes[3] & 0x0F if len(reply_bytes) >= 4 else RCODE.FORMERR


# --------------------------------------------------------------------------
# resolv.conf


@attrs.frozen
class ResolvConf:
    nameservers: tuple[tuple[str, int], ...] = ()
    search: tuple[str, ...] = ()


def parse_server(text: str, default_port: int = 53) -> tuple[str, int]:
    """``1.2.3.4``, ``1.2.3.4:5353``, ``::1``, ``[::1]:5353`` -> (ip, port)."""
    if not isinstance(text, str):
        raise ConfigError(f"invalid DNS server {text!r}: not a string")
    s = text.strip()
    host, port = s, default_port
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            raise ConfigError(f"invalid DNS server {text!r}: missing ']'")
        host, rest = s[1:end], s[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"invalid DNS server {text!r}: expected [IPv6]:PORT")
            port = _port(rest[1:], text)
    elif s.count(":") == 1:
        host, p = s.split(":")
        port = _port(p, text)
    host = host.split("%", 1)[0] if ":" in host else host  # drop an IPv6 zone id
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"invalid DNS server {text!r}: expected IP or IP:PORT") from None
    return str(ip), port


def _port(p: str, text: str) -> int:
    try:
        port = int(p)
    except ValueError:
        raise ConfigError(f"invalid DNS server {text!r}: port {p!r} is not a number") from None
    if not 0 < port < 65536:
        raise ConfigError(f"invalid DNS server {text!r}: port must be 1..65535")
    return port


def parse_resolv_conf(text: str) -> ResolvConf:
    """Nameservers and search domains, as glibc reads them (the last search/domain line wins).

    As an extension a nameserver may carry a port (``127.0.0.1:5353``,
    ``[::1]:5353``); glibc ignores such lines.  Bad lines are skipped.
    """
    servers: list[tuple[str, int]] = []
    search: list[str] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].split(";", 1)[0].strip()
        parts = line.split()
        if len(parts) < 2:
            continue
        key = parts[0]
        if key == "nameserver":
            try:
                server = parse_server(parts[1])
            except ConfigError:
                continue
            if server not in servers:
                servers.append(server)
        elif key in ("search", "domain"):
            names = parts[1:] if key == "search" else parts[1:2]
            search = []
            for n in names:
                n = n.rstrip(".").lower()
                if n and n not in search:
                    search.append(n)
    return ResolvConf(tuple(servers), tuple(search))
