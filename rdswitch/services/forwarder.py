"""Port-forward requests: parsing and validation (sans-IO).

The API's JSON bodies and ``--port-forward`` flags become :class:`Forward`
values here; the host shell (``host/forwarder.py``) does the listening.
"""

from __future__ import annotations

import ipaddress

import attrs

from ..config import ConfigError, parse_port

PROTOCOLS = ("tcp", "udp")


@attrs.frozen(order=True)
class Forward:
    local_ip: str
    local_port: int
    protocol: str
    remote_ip: str
    remote_port: int

    @property
    def local(self) -> str:
        return f"{self.local_ip}:{self.local_port}"

    @property
    def remote(self) -> str:
        return f"{self.remote_ip}:{self.remote_port}"

    @property
    def key(self) -> tuple[str, str]:
        return (self.local, self.protocol)

    def as_json(self) -> dict:
        return {"local": self.local, "remote": self.remote, "protocol": self.protocol}


def _split_hostport(text, what: str, *, allow_no_ip: bool = False) -> tuple[str | None, int]:
    if not isinstance(text, str) or not text:
        raise ConfigError(f"{what}: expected a string like 127.0.0.1:8080, got {text!r}")
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ConfigError(f"{what}: {text!r} has no port (expected IP:PORT)")
    port_num = parse_port(port, f"{what} port")
    if host.startswith("[") and host.endswith("]"):
        raise ConfigError(f"{what}: IPv6 is not supported ({text!r})")
    if host == "":
        if allow_no_ip:
            return None, port_num
        raise ConfigError(f"{what}: {text!r} has no IP address")
    try:
        ip = ipaddress.IPv4Address(host)
    except ValueError:
        raise ConfigError(f"{what}: {host!r} is not an IPv4 address") from None
    return str(ip), port_num


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
    local_ip, local_port = _split_hostport(body.get("local"), "local")
    remote_ip, remote_port = _split_hostport(body.get("remote"), "remote", allow_no_ip=True)
    if remote_ip is None:
        if caller_ip is None:
            raise ConfigError("remote: no IP given and the caller's IP is unknown")
        remote_ip = caller_ip
    if ipaddress.IPv4Address(remote_ip) not in subnet:
        raise ConfigError(f"remote: {remote_ip} is outside the virtual subnet {subnet}")
    return Forward(local_ip, local_port, protocol, remote_ip, remote_port)


def parse_unexpose(body) -> tuple[str, str]:
    if not isinstance(body, dict):
        raise ConfigError("body must be a JSON object with local and protocol")
    protocol = parse_protocol(body.get("protocol"))
    ip, port = _split_hostport(body.get("local"), "local")
    return (f"{ip}:{port}", protocol)


def parse_port_forward_flag(text: str, subnet: ipaddress.IPv4Network) -> Forward:
    """``127.0.0.1:2222=192.168.127.2:22`` with an optional ``/udp`` (or ``/tcp``) suffix."""
    proto = "tcp"
    if "/" in text:
        text, proto = text.rsplit("/", 1)
    local, sep, remote = text.partition("=")
    if not sep:
        raise ConfigError(f"--port-forward {text!r}: expected LOCAL_IP:PORT=REMOTE_IP:PORT[/udp]")
    return parse_expose({"local": local, "remote": remote, "protocol": proto}, None, subnet)
