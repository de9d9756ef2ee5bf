"""Port-forward requests: parsing and validation (sans-IO).

The API's JSON bodies and ``--port-forward`` flags become :class:`Forward`
values here; the host shell (``host/forwarder.py``) does the listening.

``local`` is kept exactly as the client sent it (it names the forward, as it
does for gvisor-tap-vsock's clients); its parts say where to listen:

* ``":8080"``: every IPv4 and IPv6 address of the host;
* ``"127.0.0.1:8080"``, ``"[::1]:8080"``, ``"[::]:8080"``: that address
  (``[::]`` takes IPv4 too, like ``":8080"``);
* ``"localhost:8080"``: 127.0.0.1 and ::1; another host name: whatever the
  host's resolver gives for it;
* protocol ``unix``: a socket file path, with ``remote`` ``tcp://IP:PORT``.
"""

from __future__ import annotations

import ipaddress
import re

import attrs

from ..config import ConfigError, parse_port

PROTOCOLS = ("tcp", "udp", "unix")

_HOSTNAME_RE = re.compile(r"^(?=.{1,253}\.?$)[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*\.?$",
                          re.IGNORECASE)


@attrs.frozen(order=True)
class Forward:
    local: str  # as the client sent it
    protocol: str
    remote_ip: str
    remote_port: int
    local_host: str = ""  # "" = every address; an IP literal or a host name; the socket path for unix
    local_port: int = 0  # 0 for unix

    @property
    def remote(self) -> str:
        text = f"{self.remote_ip}:{self.remote_port}"
        return f"tcp://{text}" if self.protocol == "unix" else text

    @property
    def key(self) -> tuple[str, str]:
        return (self.local, self.protocol)

    def as_json(self) -> dict:
        return {"local": self.local, "remote": self.remote, "protocol": self.protocol}


def split_hostport(text, what: str) -> tuple[str, int]:
    """``"h:p"``, ``"[v6]:p"`` or ``":p"`` -> (host, port) with host ``""`` for none (as Go's net.SplitHostPort)."""
    if not isinstance(text, str) or not text:
        raise ConfigError(f"{what}: expected a string like 127.0.0.1:8080, got {text!r}")
    if text.startswith("["):
        host, sep, port = text[1:].partition("]")
        if not sep or not port.startswith(":"):
            raise ConfigError(f"{what}: {text!r} is not [IPv6]:PORT")
        port = port[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{what}: {host!r} in brackets is not an IPv6 address") from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ConfigError(f"{what}: {text!r} has no port (expected HOST:PORT)")
        if ":" in host:
            raise ConfigError(f"{what}: {text!r}: an IPv6 address needs brackets, like [::1]:8080")
    return host, parse_port(port, f"{what} port")


def parse_local_host(host: str, what: str = "local") -> str:
    """Check a listening host: ``""``, an IP literal (IPv6 without brackets here) or a host name."""
    if host == "":
        return host
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _HOSTNAME_RE.match(host) or host.replace(".", "").isdigit():
        raise ConfigError(f"{what}: {host!r} is neither an IP address nor a host name")
    return host


def _remote(text, caller_ip: str | None, subnet: ipaddress.IPv4Network) -> tuple[str, int]:
    host, port = split_hostport(text, "remote")
    if host == "":
        if caller_ip is None:
            raise ConfigError("remote: no IP given and the caller's IP is unknown")
        host = caller_ip
    try:
        ip = ipaddress.IPv4Address(host)
    except ValueError:
        raise ConfigError(f"remote: {host!r} is not an IPv4 address (the VM side is IPv4)") from None
    if ip not in subnet:
        raise ConfigError(f"remote: {ip} is outside the virtual subnet {subnet}")
    return str(ip), port


def _unix_remote(text) -> str:
    """``tcp://IP:PORT`` (a trailing ``/`` allowed) -> ``IP:PORT``."""
    if not isinstance(text, str) or "://" not in text:
        raise ConfigError(f"remote: expected tcp://IP:PORT for a unix forward, got {text!r}")
    scheme, _, rest = text.partition("://")
    if scheme != "tcp":
        raise ConfigError(f"remote: {scheme}:// is not supported for a unix forward (only tcp://IP:PORT)")
    return rest[:-1] if rest.endswith("/") else rest


def parse_protocol(value) -> str:
    proto = "tcp" if value in (None, "") else value
    if not isinstance(proto, str) or proto.lower() not in PROTOCOLS:
        raise ConfigError(f"protocol: {value!r} is not one of {', '.join(PROTOCOLS)}")
    return proto.lower()


def parse_expose(body, caller_ip: str | None, subnet: ipaddress.IPv4Network) -> Forward:
    """``{"local": "127.0.0.1:8080", "remote": "192.168.127.2:80", "protocol": "tcp"}``.

    A remote without IP (``":80"``) means the caller's IP.  The remote must be
    inside the virtual subnet (forwards go into a VM, never elsewhere).
    """
    if not isinstance(body, dict):
        raise ConfigError("body must be a JSON object with local, remote and protocol")
    protocol = parse_protocol(body.get("protocol"))
    local = body.get("local")
    if protocol == "unix":
        if not isinstance(local, str) or not local.startswith("/") or "\0" in local:
            raise ConfigError(f"local: a unix forward needs an absolute socket path, got {local!r}")
        remote_ip, remote_port = _remote(_unix_remote(body.get("remote")), caller_ip, subnet)
        return Forward(local, protocol, remote_ip, remote_port, local, 0)
    host, port = split_hostport(local, "local")
    remote_ip, remote_port = _remote(body.get("remote"), caller_ip, subnet)
    return Forward(local, protocol, remote_ip, remote_port, parse_local_host(host), port)


def parse_unexpose(body) -> tuple[str, str]:
    """The forward's key: ``local`` exactly as it was exposed, and the protocol."""
    if not isinstance(body, dict):
        raise ConfigError("body must be a JSON object with local and protocol")
    protocol = parse_protocol(body.get("protocol"))
    local = body.get("local")
    if not isinstance(local, str) or not local:
        raise ConfigError(f"local: expected the local address of a forward, got {local!r}")
    return (local, protocol)


def parse_port_forward_flag(text: str, subnet: ipaddress.IPv4Network) -> Forward:
    """``127.0.0.1:2222=192.168.127.2:22`` with an optional ``/udp`` (or ``/tcp``) suffix."""
    proto = "tcp"
    if "/" in text:
        text, proto = text.rsplit("/", 1)
        if proto.lower() not in ("tcp", "udp"):
            raise ConfigError(f"--port-forward: {proto!r} is not tcp or udp")
    local, sep, remote = text.partition("=")
    if not sep:
        raise ConfigError(f"--port-forward {text!r}: expected LOCAL_IP:PORT=REMOTE_IP:PORT[/udp]")
    return parse_expose({"local": local, "remote": remote, "protocol": proto}, None, subnet)
