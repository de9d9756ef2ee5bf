"""Locally served DNS zones, sans-IO: zone data, names, and parsing the zone
file (its text: the caller reads it) and the ``--dns-record`` flag."""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Any, Iterable

import attrs

from rdswitch.config import ConfigError, NetConfig

BUILTIN_ZONES = ("rancher-desktop.internal.", "docker.internal.")
APEX = "@"

_LABEL_RE = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")


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


    def as_incumbent(self) -> dict:
        """gvisor-tap-vsock's ``types.Zone`` as JSON: ``{"Name", "Records": [{"Name", "IP", "Regexp"?}], "DefaultIP"}``.

        Explicit records come first, then the regexp ones (``"Name": ""``), in the
        order they are tried; each ``Regexp`` is an RE2 pattern that Go's
        unanchored ``MatchString`` matches exactly as this zone does.  No
        default IP is ``""`` (how Go encodes a nil ``net.IP``).
        """
        records = [{"Name": rel, "IP": str(ip)} for rel, ip in self.records.items()]
        records += [{"Name": "", "IP": str(ip), "Regexp": _unanchored_text(p.pattern)} for p, ip in self.regexp_records]
        return {"Name": self.name, "Records": records, "DefaultIP": "" if self.default_ip is None else str(self.default_ip)}


# Go's regexp.MatchString finds the pattern anywhere in the name; our zones
# match a whole name.  A pattern that came from the API is stored wrapped so
# that a full match means "found anywhere", and listed unwrapped again.
# Global flags such as Go's leading ``(?i)`` must stay in front.
_SEARCH_HEAD, _SEARCH_TAIL = ".*?(?:", ").*"
_FLAGS_RE = re.compile(r"^\(\?[aiLmsux]+\)")


def _search_pattern(pattern: str) -> str:
    flags = _FLAGS_RE.match(pattern)
    head = flags.group(0) if flags else ""
    return head + _SEARCH_HEAD + pattern[len(head):] + _SEARCH_TAIL


def _unanchored_text(pattern: str) -> str:
    flags = _FLAGS_RE.match(pattern)
    head = flags.group(0) if flags else ""
    body = pattern[len(head):]
    if body.startswith(_SEARCH_HEAD) and body.endswith(_SEARCH_TAIL):
        return head + body[len(_SEARCH_HEAD):-len(_SEARCH_TAIL)]
    return f"{head}^(?:{body})$"


def _text(value: Any, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"invalid {what} {value!r}: expected a string")
    return value


def parse_incumbent_zone(body: Any) -> Zone:
    """A ``POST /services/dns/add`` body in gvisor-tap-vsock's ``types.Zone`` shape -> a Zone to merge.

    ``{"Name": "zone.", "Records": [{"Name": "foo", "IP": "10.0.0.5"}, {"IP": "10.0.0.6", "Regexp": "^db-"}],
    "DefaultIP": "10.0.0.7"}``: each record needs an IP and a Name, a Regexp or both; ``"DefaultIP": ""``
    (a nil ``net.IP``) or no DefaultIP keeps the zone's default.  Every field is checked before
    anything changes (ConfigError with a clear message).
    """
    if not isinstance(body, dict):
        raise ConfigError("body must be a JSON object like {\"Name\": \"zone.\", \"Records\": [...], \"DefaultIP\": \"\"}")
    records = body.get("Records")
    if records is None:
        records = []
    if not isinstance(records, list):
        raise ConfigError(f"invalid Records {records!r}: expected a list of {{Name, IP, Regexp}}")
    named: dict[str, Any] = {}
    regexps = []
    for rec in records:
        if not isinstance(rec, dict):
            raise ConfigError(f"invalid record {rec!r}: expected an object with Name, IP and/or Regexp")
        name, pattern = _text(rec.get("Name"), "record Name"), _text(rec.get("Regexp"), "record Regexp")
        ip = parse_ipv4(rec.get("IP"), f"IP of record {name or pattern!r}")
        if not name and not pattern:
            raise ConfigError(f"invalid record {rec!r}: it needs a Name or a Regexp")
        if name:
            named.setdefault(name, ip)  # the first of two records with one name wins, as in the incumbent
        if pattern:
            _compile(pattern)  # its own error message, not the wrapped pattern's
            regexps.append((_search_pattern(pattern), ip))
    return Zone(_text(body.get("Name"), "zone Name"), named, regexps, _text(body.get("DefaultIP"), "DefaultIP"))


def builtin_zones(net: NetConfig) -> list[Zone]:
    """``rancher-desktop.internal.`` and ``docker.internal.``, each with gateway and host."""
    return [Zone(name, {"gateway": net.gateway_ip, "host": net.host_alias_ip}) for name in BUILTIN_ZONES]


def find_zone(zones: Iterable[Zone], fqdn: str) -> Zone | None:
    """The zone (longest suffix match) that holds ``fqdn``."""
    return zone_of_labels(zones, _name_labels(fqdn.lower()))


def zone_of_labels(zones: Iterable[Zone], labels: tuple[bytes, ...]) -> Zone | None:
    """The zone (longest suffix match) that holds the lower-case name ``labels``."""
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
