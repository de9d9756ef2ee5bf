"""Transport URLs (sans-IO): where a connection goes or is accepted.

* ``unix:///abs/path`` (``unix://@name`` = Linux abstract socket)
* ``tcp://HOST:PORT`` (``tcp://[::1]:PORT`` for IPv6; port 0 = any, listen only)
* ``vsock://CID:PORT``; listen with ``vsock://:PORT`` (any CID)
* ``fd://N`` -- an already-open, already-connected descriptor

vsock is what production uses between a VM and its host; unix and TCP
loopback carry the same protocols everywhere else (tests, QEMU, other VMMs).
"""

from __future__ import annotations

import ipaddress
import socket as _stdsocket
from typing import Any

import attrs

from rdswitch.config import ConfigError

VMADDR_CID_ANY = 0xFFFFFFFF
VMADDR_CID_HOST = 2
SCHEMES = ("unix", "tcp", "vsock", "fd")



@attrs.frozen
class Endpoint:
    """A parsed transport URL."""

    scheme: str
    path: str = ""  # unix: filesystem path, or "\0name" for abstract
    host: str = ""  # tcp
    port: int = 0  # tcp, vsock
    cid: int | None = None  # vsock; None = any (listen only)
    fd: int = -1  # fd

    @property
    def family(self) -> int:
        if self.scheme == "unix":
            return _stdsocket.AF_UNIX
        if self.scheme == "tcp":
            return _stdsocket.AF_INET6 if ":" in self.host else _stdsocket.AF_INET
        if self.scheme == "vsock":
            return vsock_family()
        raise ConfigError(f"{self} has no socket family of its own")

    def sockaddr(self, *, listening: bool = False) -> Any:
        if self.scheme == "unix":
            return self.path
        if self.scheme == "tcp":
            return (self.host, self.port)
        if self.scheme == "vsock":
            if self.cid is None:
                if not listening:
                    raise ConfigError(f"cannot dial {self}: the URL has no CID (use vsock://CID:PORT)")
                return (VMADDR_CID_ANY, self.port)
            return (self.cid, self.port)
        raise ConfigError(f"{self} has no socket address")

    def __str__(self) -> str:
        if self.scheme == "unix":
            return "unix://" + (("@" + self.path[1:]) if self.path.startswith("\0") else self.path)
        if self.scheme == "tcp":
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"tcp://{host}:{self.port}"
        if self.scheme == "vsock":
            return f"vsock://{'' if self.cid is None else self.cid}:{self.port}"
        return f"fd://{self.fd}"


def _int(text: str, what: str, url: str, lo: int, hi: int) -> int:
    if not text.isdigit():
        raise ConfigError(f"invalid URL {url!r}: {what} {text!r} is not a number")
    value = int(text)
    if not lo <= value <= hi:
        raise ConfigError(f"invalid URL {url!r}: {what} {value} must be {lo}..{hi}")
    return value


def parse_url(url: str) -> Endpoint:
    """Parse a transport URL; raise ConfigError with a readable message."""
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(
            f"invalid URL {url!r}: expected unix:///path, tcp://HOST:PORT, vsock://CID:PORT or fd://N"
        )
    scheme, rest = url.split("://", 1)
    scheme = scheme.lower()
    if scheme == "unix":
        if not rest:
            raise ConfigError(f"invalid URL {url!r}: no socket path (use unix:///absolute/path)")
        if rest.startswith("@"):
            if len(rest) < 2:
                raise ConfigError(f"invalid URL {url!r}: empty abstract socket name")
            path = "\0" + rest[1:]
        else:
            path = rest
        if len(path.encode()) > 107:
            raise ConfigError(f"invalid URL {url!r}: unix socket path longer than 107 bytes")
        if "\0" in path[1:]:
            raise ConfigError(f"invalid URL {url!r}: NUL byte in path")
        return Endpoint("unix", path=path)
    if scheme == "tcp":
        if rest.startswith("["):
            host, sep, port = rest[1:].partition("]:")
            if not sep:
                raise ConfigError(f"invalid URL {url!r}: expected tcp://[IPv6]:PORT")
        else:
            host, sep, port = rest.rpartition(":")
            if not sep:
                raise ConfigError(f"invalid URL {url!r}: no port (use tcp://HOST:PORT)")
        if not host:
            raise ConfigError(f"invalid URL {url!r}: no host (use tcp://127.0.0.1:PORT)")
        port = port.rstrip("/")
        portnum = _int(port, "port", url, 0, 65535)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not all(part and (part.replace("-", "").isalnum()) for part in host.split(".")):
                raise ConfigError(f"invalid URL {url!r}: {host!r} is not an IP address or host name") from None
        return Endpoint("tcp", host=host, port=portnum)
    if scheme == "vsock":
        cid, sep, port = rest.rstrip("/").rpartition(":")
        if not sep:
            raise ConfigError(f"invalid URL {url!r}: expected vsock://CID:PORT (or vsock://:PORT to listen)")
        cidnum = None if cid in ("", "any") else (VMADDR_CID_HOST if cid == "host" else _int(cid, "CID", url, 0, 0xFFFFFFFF))
        return Endpoint("vsock", cid=cidnum, port=_int(port, "port", url, 0, 0xFFFFFFFF))
    if scheme == "fd":
        return Endpoint("fd", fd=_int(rest.rstrip("/"), "fd", url, 0, 2**31 - 1))
    raise ConfigError(f"invalid URL {url!r}: unknown scheme {scheme!r} (valid: {', '.join(SCHEMES)})")


def vsock_family() -> int:
    fam = getattr(_stdsocket, "AF_VSOCK", None)
    if fam is None:
        raise ConfigError("vsock:// URLs need AF_VSOCK, which this Python/OS does not provide")
    return fam

