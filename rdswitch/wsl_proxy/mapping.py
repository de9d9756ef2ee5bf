"""The port-mapping message of wsl-proxy's control socket (sans-IO).

One JSON object per connection, shaped like Docker's ``nat.PortMap``::

    {"remove": false, "ports": {"80/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8080"}]}}

The container-port key ("80/tcp", "53/udp", or "80" meaning tcp) gives the
protocol; the HostPort is both the port we listen on and the port we dial
upstream; the HostIp is the address we listen on, as given ("" is every
address, like Docker's).  Bindings of one port and protocol with different
HostIps (Docker sends "0.0.0.0" and "::") are one forward listening on each.  Like Go's encoding/json (which the incumbent used), object
keys are matched case-insensitively, and a null binding list (a port that is
exposed but not published) simply means "no bindings".

:func:`parse_mapping` never raises anything but :class:`MappingError`.  A
problem with the message as a whole (not JSON, not an object, ``remove`` not
a boolean) rejects it; a problem with one binding (unknown protocol, port out
of range) is reported in :attr:`PortMapping.errors` and the other bindings
still apply.
"""

from __future__ import annotations

import ipaddress
import json
import re

import attrs

#: Largest control message accepted (a real one is a few hundred bytes).
MAX_MESSAGE = 1 << 20
#: Deepest JSON nesting accepted (a real message nests 4 levels).
MAX_DEPTH = 32

PROTOCOLS = ("tcp", "udp")

_PORT_RE = re.compile(r"^[0-9]{1,5}$")


class MappingError(ValueError):
    """A control message is not a valid port mapping; str() is for the log."""


@attrs.frozen(order=True)
class Binding:
    protocol: str  # "tcp" or "udp"
    host_port: int  # listened on (at each host IP), dialled on the upstream address
    container_port: int = attrs.field(default=0, eq=False, order=False)
    #: the addresses to listen on, as the message gave them ("" = every address)
    host_ips: tuple[str, ...] = attrs.field(default=("",), eq=False, order=False)

    @property
    def host_ip(self) -> str:
        return self.host_ips[0] if self.host_ips else ""

    @property
    def key(self) -> tuple[str, int]:
        return (self.protocol, self.host_port)

    def __str__(self) -> str:
        return f"{self.host_port}/{self.protocol}"


@attrs.frozen
class PortMapping:
    remove: bool
    bindings: tuple[Binding, ...] = ()
    errors: tuple[str, ...] = ()  # one message per rejected binding


def _get(obj: dict, name: str):
    """Case-insensitive key lookup, exact match first (Go encoding/json rules)."""
    if name in obj:
        return obj[name]
    low = name.lower()
    for k, v in obj.items():
        if k.lower() == low:
            return v
    return None


def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_port_number(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise MappingError(f"{what} {_short(value)} is not a port number")
    text = str(value)
    if not _PORT_RE.match(text):
        raise MappingError(f"{what} {_short(value)} is not a port number")
    port = int(text)
    if not 0 < port < 65536:
        raise MappingError(f"{what} {port} is out of range (1..65535)")
    return port


def parse_port_key(key: str) -> tuple[int, str]:
    """'80/tcp' -> (80, 'tcp'); '80' -> (80, 'tcp')."""
    number, _, proto = key.partition("/")
    proto = (proto or "tcp").lower()
    if proto not in PROTOCOLS:
        raise MappingError(f"unknown protocol {_short(proto)} in port {_short(key)} (expected tcp or udp)")
    return _parse_port_number(number, f"container port in {_short(key)}:"), proto


def _parse_binding(key: str, proto: str, cport: int, item) -> Binding:
    if not isinstance(item, dict):
        raise MappingError(f"binding for {_short(key)} is not an object: {_short(item)}")
    host_port = _get(item, "HostPort")
    if host_port is None or host_port == "":
        raise MappingError(f"binding for {_short(key)} has no HostPort")
    port = _parse_port_number(host_port, f"HostPort of {_short(key)}:")
    host_ip = _get(item, "HostIp")
    if host_ip is not None and not isinstance(host_ip, str):
        raise MappingError(f"HostIp of {_short(key)} is not a string: {_short(host_ip)}")
    host_ip = (host_ip or "").strip()
    if host_ip.startswith("[") and host_ip.endswith("]"):
        host_ip = host_ip[1:-1]
    if host_ip:
        try:
            host_ip = str(ipaddress.ip_address(host_ip))
        except ValueError:
            raise MappingError(f"HostIp of {_short(key)} is not an IP address: {_short(host_ip)}") from None
    return Binding(proto, port, cport, (host_ip,))


def parse_mapping(data: bytes) -> PortMapping:
    """Parse one control message; raises only :class:`MappingError`."""
    if len(data) > MAX_MESSAGE:
        raise MappingError(f"message too large ({len(data)} bytes, limit {MAX_MESSAGE})")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MappingError(f"message is not UTF-8: {exc.reason} at byte {exc.start}") from None
    if not text.strip():
        raise MappingError("empty message (expected a JSON port mapping)")
    if _max_depth(text) > MAX_DEPTH:
        raise MappingError(f"invalid JSON: nested deeper than {MAX_DEPTH} levels")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MappingError(f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer with too many digits
        raise MappingError(f"invalid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise MappingError(f"expected a JSON object, got {type(obj).__name__}")

    remove = _get(obj, "remove")
    if remove is None:
        remove = False
    if not isinstance(remove, bool):
        raise MappingError(f'"remove" must be true or false, got {_short(remove)}')
    ports = _get(obj, "ports")
    if ports is None:
        return PortMapping(remove)
    if not isinstance(ports, dict):
        raise MappingError(f'"ports" must be an object like {{"80/tcp": [...]}}, got {type(ports).__name__}')

    bindings: list[Binding] = []
    errors: list[str] = []
    for key, items in ports.items():
        try:
            cport, proto = parse_port_key(key)
            if items is None:
                continue  # exposed, not published
            if not isinstance(items, list):
                raise MappingError(f"bindings of {_short(key)} must be a list, got {type(items).__name__}")
        except MappingError as exc:
            errors.append(str(exc))
            continue
        for item in items:
            try:
                b = _parse_binding(key, proto, cport, item)
            except MappingError as exc:
                errors.append(str(exc))
                continue
            for i, other in enumerate(bindings):
                if other == b:  # one port and protocol: one forward listening on every host IP given
                    if b.host_ip not in other.host_ips:
                        bindings[i] = attrs.evolve(other, host_ips=other.host_ips + b.host_ips)
                    break
            else:
                bindings.append(b)
    return PortMapping(remove, tuple(bindings), tuple(errors))


def _max_depth(text: str) -> int:
    """Bracket nesting depth outside strings (guards json.loads' recursion)."""
    depth = best = 0
    in_str = esc = False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            best = max(best, depth)
        elif ch in "]}":
            depth -= 1
    return best


class MessageFramer:
    """Finds the end of the first JSON value on a stream, so a client need not
    half-close its side (the incumbent used a streaming JSON decoder).

    :meth:`feed` returns the message bytes once a top-level object closes (or
    at once when the input cannot be an object, so the parser can say why);
    :meth:`eof` returns whatever arrived.  Raises :class:`MappingError` when
    the message grows past ``limit``.
    """

    def __init__(self, limit: int = MAX_MESSAGE):
        self.limit = limit
        self._buf = bytearray()
        self._scanned = 0
        self._depth = 0
        self._started = False
        self._in_str = False
        self._esc = False
        self.done = False

    def feed(self, data: bytes) -> bytes | None:
        if self.done:
            return None
        self._buf += data
        buf = self._buf
        i = self._scanned
        while i < len(buf):
            c = buf[i]
            i += 1
            if not self._started:
                if c in b" \t\r\n":
                    continue
                if c != 0x7B:  # '{'
                    self.done = True
                    return bytes(buf)
                self._started = True
                self._depth = 1
            elif self._in_str:
                if self._esc:
                    self._esc = False
                elif c == 0x5C:  # backslash
                    self._esc = True
                elif c == 0x22:
                    self._in_str = False
            elif c == 0x22:
                self._in_str = True
            elif c in b"{[":
                self._depth += 1
            elif c in b"}]":
                self._depth -= 1
                if self._depth == 0:
                    self.done = True
                    return bytes(buf[:i])
        self._scanned = i
        if len(buf) > self.limit:
            self.done = True
            raise MappingError(f"message too large (over {self.limit} bytes)")
        return None

    def eof(self) -> bytes:
        self.done = True
        return bytes(self._buf)
