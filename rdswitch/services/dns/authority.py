"""The local DNS authority, sans-IO: answers queries from the zones.

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
from typing import Any

import dnslib
from dnslib import QTYPE, RCODE, RR, DNSRecord

from rdswitch.config import ConfigError
from rdswitch.services.dns.message import OPCODE_QUERY, OUR_UDP_PAYLOAD, client_edns
from rdswitch.services.dns.zones import (
    APEX, Zone, find_zone, normalize_record_name, normalize_zone_name, parse_ipv4, zone_of_labels,
)

DEFAULT_TTL = 60
CLASS_IN = 1
CLASS_ANY = 255


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
        zone = zone_of_labels(self.zones, labels)
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
