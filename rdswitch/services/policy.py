"""What a VM may ask of the host through the gateway's API (sans-IO).

The API has two callers with two powers:

* the **host** (the ``--api-listen`` sockets): everything, as always;
* a **VM** (gateway:80 inside the network, where any process in the VM or in
  one of its containers can reach it): only what the VM policy grants.

Every decision is a pure function of the request, the caller, the policy and
the current state handed in by the shell (which session holds each DHCP
lease, who owns each live forward and DNS record): it answers ``None``
(allowed) or a :class:`Refusal` with a reason code, an HTTP status and a
message that names the flag granting what was refused.  No socket, no clock,
no file: the unix path is checked lexically here, and the shell creates the
socket without following symlinks (``aio/connect.py``).

Who a VM caller is: the session its connection arrived on (which data
connection the frames came through: a VM cannot forge that) and the source
IP of the connection, which counts only when it is a DHCP lease whose MAC the
switch holds on that same session (``own_addresses``).
"""

from __future__ import annotations

import ipaddress
import os
from typing import Iterable, Mapping

import attrs

from ..config import ConfigError, NetConfig

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

V4_ANY = ipaddress.IPv4Address("0.0.0.0")
V6_ANY = ipaddress.IPv6Address("::")
LOOPBACKS = (ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1"))
ANY = (ipaddress.IPv4Network("0.0.0.0/0"), ipaddress.IPv6Network("::/0"))

#: reason code -> HTTP status.  Each code is named after the flag that would grant it.
REASONS = {
    "vm-caller": 403,  # the source IP is not a lease of the caller's own session
    "vm-expose-address": 403,
    "vm-expose-ports": 403,
    "vm-expose-unix-dir": 403,
    "vm-expose-remote": 403,  # also --vm-expose-cross-vm
    "vm-max-forwards": 429,
    "vm-not-owner": 403,
    "vm-dns": 403,
    "vm-max-dns-records": 429,
}


@attrs.frozen
class Caller:
    """Who sent an API request: the host (``ip`` None) or a VM (its source IP and its session)."""

    ip: str | None = None
    session: int | None = None

    @property
    def is_host(self) -> bool:
        return self.ip is None

    @property
    def owner(self) -> str:
        """What ``GET /services/forwarder/all`` shows: ``"host"`` or the VM's IP."""
        return "host" if self.ip is None else self.ip


HOST = Caller()


@attrs.frozen
class Refusal:
    reason: str
    message: str

    @property
    def status(self) -> int:
        return REASONS[self.reason]

    def as_json(self) -> dict:
        return {"error": self.message, "reason": self.reason}


class PolicyRefused(Exception):
    """Raised by the shell when a refusal comes up where it cannot be returned (at commit time)."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal


def _refuse(reason: str, message: str) -> Refusal:
    assert reason in REASONS, reason
    return Refusal(reason, message)


@attrs.frozen
class VmPolicy:
    """The flags of "what a VM may ask" (defaults: Rancher Desktop's non-admin behaviour)."""

    net: NetConfig = attrs.field(factory=NetConfig)
    #: host addresses a VM may listen on; a family's wildcard (0.0.0.0, ::) covers every address of it
    addresses: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(a) for a in LOOPBACKS)
    #: inclusive port ranges a VM may listen on
    ports: tuple[tuple[int, int], ...] = ((1024, 65535),)
    #: directories (absolute, normalised) under which a VM may create unix sockets; none by default
    unix_dirs: tuple[str, ...] = ()
    #: a VM may forward to another VM's lease, not only to its own
    cross_vm: bool = False
    max_forwards: int = 256
    forwards_outlive_session: bool = False
    max_dns_records: int = 64

    def allows_address(self, ip: IPAddress) -> bool:
        wildcard = V4_ANY if ip.version == 4 else V6_ANY
        for net in self.addresses:
            if net.version != ip.version:
                continue
            if ip in net or (net.num_addresses == 1 and net.network_address == wildcard):
                return True
        return False

    def allows_port(self, port: int) -> bool:
        return any(lo <= port <= hi for lo, hi in self.ports)

    def describe_addresses(self) -> str:
        if all(n in self.addresses for n in ANY):
            return "any"
        return ", ".join(str(n.network_address) if n.num_addresses == 1 else str(n) for n in self.addresses) or "none"

    def describe_ports(self) -> str:
        return format_port_ranges(self.ports) or "none"


@attrs.frozen
class State:
    """What the shell knows right now."""

    #: every DHCP lease (IP text) -> the id of the session whose switch port holds its MAC (None: no live session)
    leases: Mapping[str, int | None] = attrs.field(factory=dict)
    #: (local, protocol) of every live forward -> its owner ("host" or a VM's IP)
    owners: Mapping[tuple[str, str], str] = attrs.field(factory=dict)


# ---- who the caller is -----------------------------------------------------------------------------


def own_addresses(caller: Caller, leases: Mapping[str, int | None]) -> frozenset[str]:
    """The leases whose MAC lives on the caller's own session (a VM may hold several: macvlan containers)."""
    if caller.session is None:
        return frozenset()
    return frozenset(ip for ip, sid in leases.items() if sid == caller.session)


def check_caller(caller: Caller, leases: Mapping[str, int | None]) -> Refusal | None:
    if caller.is_host or caller.ip in own_addresses(caller, leases):
        return None
    return _refuse("vm-caller", f"the source address {caller.ip} is not a DHCP lease of this VM's connection; "
                                "a VM may change forwards and DNS records only from its own leased address")


# ---- expose ----------------------------------------------------------------------------------------


def is_localhost(host: str) -> bool:
    """``localhost`` in any case, with or without the root dot: both loopbacks, whatever /etc/hosts says."""
    return host.lower().rstrip(".") == "localhost"


def listen_addresses(host: str) -> tuple[IPAddress, ...] | None:
    """The addresses a forward's local host listens on; None for a host name only a resolver can answer.

    ``""`` and ``::`` are one dual-stack socket: every IPv4 and every IPv6
    address.  An IPv4-mapped IPv6 address (``::ffff:0.0.0.0``) is the IPv4
    address it maps.
    """
    if host in ("", "::"):
        return (V4_ANY, V6_ANY)
    if is_localhost(host):
        return LOOPBACKS
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return (ip.ipv4_mapped,)
    return (ip,)


def _check_address(host: str, policy: VmPolicy) -> Refusal | None:
    addrs = listen_addresses(host)
    if addrs is None:
        return _refuse("vm-expose-address", f"{host!r} is a host name: a VM may listen only on IP addresses or "
                                            "localhost (a name could resolve to any address of the host)")
    for ip in addrs:
        if not policy.allows_address(ip):
            what = "every address of the host" if host in ("", "::") else f"{ip}"
            return _refuse("vm-expose-address",
                           f"a VM may not listen on {what} (allowed: {policy.describe_addresses()}); "
                           f"--vm-expose-address {ip if host not in ('', '::') else 'any'} allows it")
    return None


def _check_remote(ip: str, own: frozenset[str], caller: Caller, policy: VmPolicy,
                  leases: Mapping[str, int | None]) -> Refusal | None:
    net = policy.net
    addr = ipaddress.IPv4Address(ip)
    if addr in (net.gateway_ip, net.host_alias_ip):
        name = "the gateway" if addr == net.gateway_ip else "the host alias"
        return _refuse("vm-expose-remote", f"remote {ip} is {name}, not a VM: forwards go into a VM")
    if addr in (net.subnet.network_address, net.subnet.broadcast_address):
        return _refuse("vm-expose-remote", f"remote {ip} is not a host address of {net.subnet}")
    if ip in own:
        return None
    if ip in leases:
        if policy.cross_vm:
            return None
        return _refuse("vm-expose-remote", f"remote {ip} is another VM's address; a VM may forward only to its own "
                                           f"({', '.join(sorted(own)) or caller.ip}); --vm-expose-cross-vm allows it")
    return _refuse("vm-expose-remote", f"remote {ip} is not a DHCP lease: no VM holds it")


def unix_location(path: str, policy: VmPolicy) -> tuple[str, tuple[str, ...]] | Refusal:
    """(the allowed directory, the path's components below it) or why not: checked on the text alone.

    No ``.`` or ``..`` component, no empty one (``//``, a trailing ``/``): a
    lexical ``..`` says nothing once a symlink is on the way, so it is
    refused rather than resolved.  The shell then walks the components
    without following symlinks and creates the socket exclusively.
    """
    if not policy.unix_dirs:
        return _refuse("vm-expose-unix-dir", "a VM may not create unix sockets on the host; "
                                             "--vm-expose-unix-dir DIR allows it under DIR")
    allowed = ", ".join(policy.unix_dirs)
    parts = path.split("/")[1:] if path.startswith("/") else None
    if parts is None or any(p in ("", ".", "..") for p in parts) or "\0" in path:
        return _refuse("vm-expose-unix-dir", f"{path!r}: a VM's socket path must be a plain absolute path "
                                             f"(no '.', '..', '//' or trailing '/') under {allowed}")
    for top in policy.unix_dirs:
        head = [p for p in top.split("/") if p]
        if len(parts) > len(head) and parts[:len(head)] == head:
            return top, tuple(parts[len(head):])
    return _refuse("vm-expose-unix-dir", f"{path!r} is not under {allowed}; --vm-expose-unix-dir DIR allows another "
                                         "directory")


def check_expose(fwd, caller: Caller, policy: VmPolicy, state: State) -> Refusal | None:
    """May ``caller`` create the forward ``fwd`` (a :class:`~rdswitch.services.forwarder.Forward`)?"""
    if caller.is_host:
        return None
    refusal = check_caller(caller, state.leases)
    if refusal is not None:
        return refusal
    if fwd.protocol == "unix":
        where = unix_location(fwd.local_host, policy)
        if isinstance(where, Refusal):
            return where
    else:
        refusal = _check_address(fwd.local_host, policy)
        if refusal is not None:
            return refusal
        if not policy.allows_port(fwd.local_port):
            return _refuse("vm-expose-ports", f"a VM may not listen on port {fwd.local_port} (allowed: "
                                              f"{policy.describe_ports()}); --vm-expose-ports sets the range")
    own = own_addresses(caller, state.leases)
    refusal = _check_remote(fwd.remote_ip, own, caller, policy, state.leases)
    if refusal is not None:
        return refusal
    if fwd.key not in state.owners:  # (the same key: an identical repeat is a no-op, another forward a conflict)
        live = sum(1 for owner in state.owners.values() if owner in own)
        if live >= policy.max_forwards:
            return _refuse("vm-max-forwards", f"this VM has {live} forwards, the most it may have; "
                                              "--vm-max-forwards raises the limit")
    return None


def check_unexpose(owner: str, key: tuple[str, str], caller: Caller, leases: Mapping[str, int | None]) -> Refusal | None:
    """A VM may remove only forwards it created (by any of its own leases); the host may remove any."""
    if caller.is_host:
        return None
    refusal = check_caller(caller, leases)
    if refusal is not None:
        return refusal
    if owner in own_addresses(caller, leases):
        return None
    return _refuse("vm-not-owner", f"{key[0]}/{key[1]} was exposed by {owner}; a VM may remove only its own forwards")


# ---- DNS -------------------------------------------------------------------------------------------


@attrs.frozen
class DnsAdd:
    """What a ``POST /services/dns/add`` asks for, reduced to what the policy looks at."""

    zone: str  # normalised, with the root dot
    names: tuple[str, ...] = ()  # record names relative to the zone ("@": the apex)
    regexps: int = 0
    default_ip: bool = False


@attrs.frozen
class DnsState:
    zones: frozenset[str] = frozenset()
    #: (zone, name) of every record -> its owner ("host", or the IP of the VM that added it)
    owners: Mapping[tuple[str, str], str] = attrs.field(factory=dict)


def check_dns_add(req: DnsAdd, caller: Caller, policy: VmPolicy, leases: Mapping[str, int | None],
                  dns: DnsState) -> Refusal | None:
    """A VM may add named A records to the zones the host serves, within a bound; nothing else.

    No regexp records (Python's ``re`` can take exponential time on a
    crafted pattern, and every query of every VM would run it), no default
    IP (it would answer every other name of the zone), no new zones (a local
    zone takes its whole domain away from the real resolvers), and no
    replacing a record it did not add.
    """
    if caller.is_host:
        return None
    refusal = check_caller(caller, leases)
    if refusal is not None:
        return refusal
    if req.regexps or req.default_ip:
        return _refuse("vm-dns", "a VM may add only named A records (no Regexp, no DefaultIP); the host's API or "
                                 "--dns-zone-file can add the rest")
    if req.zone not in dns.zones:
        return _refuse("vm-dns", f"{req.zone} is not a local zone; a VM may add names only to the zones the host "
                                 "serves (built-in, --dns-zone-file, --dns-record)")
    own = own_addresses(caller, leases)
    new = 0
    for name in dict.fromkeys(req.names):
        owner = dns.owners.get((req.zone, name))
        if owner is None:
            new += 1
        elif owner not in own:
            shown = req.zone if name == "@" else f"{name}.{req.zone}"
            return _refuse("vm-dns", f"{shown} exists (added by {owner}); a VM may replace only records it added")
    held = sum(1 for owner in dns.owners.values() if owner in own)
    if new and held + new > policy.max_dns_records:
        return _refuse("vm-max-dns-records", f"this VM would hold {held + new} DNS records, more than "
                                             f"{policy.max_dns_records}; --vm-max-dns-records raises the limit")
    return None


# ---- the log of refusals ------------------------------------------------------------------------------


class RefusalLog:
    """A token bucket for log lines: ``burst`` lines at once, then ``burst`` per ``period`` seconds."""

    def __init__(self, burst: int = 10, period: float = 60.0) -> None:
        self.burst = burst
        self.rate = burst / period
        self._tokens = float(burst)
        self._last: float | None = None
        self.suppressed = 0

    def allow(self, now: float) -> tuple[bool, int]:
        """(log this refusal?, how many refusals went unlogged before it)."""
        if self._last is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            skipped, self.suppressed = self.suppressed, 0
            return True, skipped
        self.suppressed += 1
        return False, 0


# ---- flag values ------------------------------------------------------------------------------------


def parse_expose_addresses(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    """``--vm-expose-address`` values: IP addresses, CIDRs, or ``any``."""
    out: list[IPNetwork] = []
    for text in values:
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"--vm-expose-address {text!r}: expected an IP address, a CIDR or 'any'")
        text = text.strip()
        if text.lower() == "any":
            nets = list(ANY)
        else:
            try:
                nets = [ipaddress.ip_network(text.strip("[]"), strict=False)]
            except ValueError:
                raise ConfigError(f"--vm-expose-address {text!r}: not an IP address, a CIDR or 'any'") from None
        for net in nets:
            if net.version == 6 and net.num_addresses == 1 and net.network_address.ipv4_mapped is not None:
                net = ipaddress.ip_network(net.network_address.ipv4_mapped)
            if net not in out:
                out.append(net)
    return tuple(out)


def parse_port_ranges(text: str) -> tuple[tuple[int, int], ...]:
    """``--vm-expose-ports``: ``1024-65535``, ``8000``, ``80,443,8000-9000``."""
    out = []
    for item in str(text).split(","):
        lo, sep, hi = item.strip().partition("-")
        try:
            first = int(lo)
            last = int(hi) if sep else first
        except ValueError:
            raise ConfigError(f"--vm-expose-ports {text!r}: expected ports or ranges like 1024-65535,80") from None
        if not (1 <= first <= last <= 65535):
            raise ConfigError(f"--vm-expose-ports {text!r}: {item.strip()!r} is not a range within 1-65535")
        out.append((first, last))
    return tuple(sorted(set(out)))


def format_port_ranges(ranges: Iterable[tuple[int, int]]) -> str:
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges)


def parse_unix_dir(text: str) -> str:
    """An absolute directory, normalised (``//``, ``/./``, a trailing ``/`` and ``..`` removed, lexically)."""
    if not isinstance(text, str) or not text.startswith("/") or "\0" in text:
        raise ConfigError(f"--vm-expose-unix-dir {text!r}: expected an absolute directory path")
    norm = os.path.normpath(text)
    if norm.startswith("//"):
        norm = "/" + norm.lstrip("/")
    if norm == "/":
        raise ConfigError("--vm-expose-unix-dir /: the whole filesystem is not a directory to grant a VM")
    return norm


def parse_limit(value, flag: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{flag} {value!r}: not a number") from None
    if n < 0:
        raise ConfigError(f"{flag} {value!r}: must be 0 or more")
    return n
