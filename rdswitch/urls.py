"""Transport URLs (sans-IO): where a connection goes or is accepted.

* ``unix:///abs/path`` (``unix://@name`` = Linux abstract socket)
* ``tcp://HOST:PORT`` (``tcp://[::1]:PORT`` for IPv6; port 0 = any, listen only)
* ``vsock://CID:PORT``; listen with ``vsock://:PORT`` (any CID)
* ``hvsock://VMID:PORT`` -- a Hyper-V socket (Windows' side of AF_VSOCK): VMID
  is the VM's GUID, PORT the vsock port, whose Hyper-V service id is
  :func:`hvsock_guid` (``%08x-facb-11e6-bd58-64006a7986d3``); listen with
  ``hvsock://:PORT`` (any VM: the wildcard GUID)
* ``fd://N`` -- an already-open, already-connected descriptor

vsock is what production uses between a VM and its host (hvsock on Windows);
unix and TCP loopback carry the same protocols everywhere else (tests, QEMU,
other VMMs).  :func:`peer_identity` says which VM a URL names: the part the
host compares to admit only the VM that passed the handshake.
"""

from __future__ import annotations

import ipaddress
import socket as _stdsocket
import uuid
from typing import Any

import attrs

from rdswitch.config import ConfigError

VMADDR_CID_ANY = 0xFFFFFFFF
VMADDR_CID_HOST = 2
SCHEMES = ("unix", "tcp", "vsock", "hvsock", "fd")

#: The Hyper-V service id of vsock port P: P in the first field of this GUID
#: (Microsoft's template for Linux guests' AF_VSOCK ports).
HVSOCK_GUID_TEMPLATE = "%08x-facb-11e6-bd58-64006a7986d3"
_HVSOCK_GUID_TAIL = "-facb-11e6-bd58-64006a7986d3"
#: HV_GUID_WILDCARD (= HV_GUID_ZERO): a listener bound to it accepts every partition.
HV_GUID_WILDCARD = "00000000-0000-0000-0000-000000000000"
#: The protocol of a Hyper-V stream socket (HV_PROTOCOL_RAW in hvsocket.h, socket.HV_PROTOCOL_RAW in Python 3.12+).
HV_PROTOCOL_RAW = 1


def hvsock_guid(port: int) -> str:
    """The Hyper-V service id (a GUID string, lower case) of vsock port ``port``."""
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 0xFFFFFFFF:
        raise ValueError(f"vsock port {port!r} must be 0..4294967295")
    return HVSOCK_GUID_TEMPLATE % port


def hvsock_port(service_id: str) -> int:
    """The vsock port a Hyper-V service id stands for; ValueError if it is not of the vsock template."""
    guid = normalize_guid(service_id)
    head, tail = guid[:8], guid[8:]
    if tail != _HVSOCK_GUID_TAIL:
        raise ValueError(f"service id {service_id!r} is not a vsock port (not of the form {HVSOCK_GUID_TEMPLATE})")
    return int(head, 16)


def normalize_guid(text: str) -> str:
    """A GUID as Windows may spell it (upper case, in braces) -> lower case, no braces; ValueError if not a GUID."""
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a GUID")
    stripped = text.strip()
    if stripped.startswith("{") and stripped.endswith("}"):
        stripped = stripped[1:-1]
    if len(stripped) != 36 or stripped.count("-") != 4:
        raise ValueError(f"{text!r} is not a GUID (expected xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)")
    return str(uuid.UUID(stripped))



@attrs.frozen
class Endpoint:
    """A parsed transport URL."""

    scheme: str
    path: str = ""  # unix: filesystem path, or "\0name" for abstract
    host: str = ""  # tcp
    port: int = 0  # tcp, vsock
    cid: int | None = None  # vsock; None = any (listen only)
    fd: int = -1  # fd
    vm_id: str | None = None  # hvsock: the VM's GUID (normalized); None = any (listen only)

    @property
    def family(self) -> int:
        if self.scheme == "unix":
            return _stdsocket.AF_UNIX
        if self.scheme == "tcp":
            return _stdsocket.AF_INET6 if ":" in self.host else _stdsocket.AF_INET
        if self.scheme == "vsock":
            return vsock_family()
        if self.scheme == "hvsock":
            return hyperv_family()
        raise ConfigError(f"{self} has no socket family of its own")

    @property
    def proto(self) -> int:
        """The protocol argument for socket(): HV_PROTOCOL_RAW for hvsock, 0 for the rest."""
        if self.scheme == "hvsock":
            return getattr(_stdsocket, "HV_PROTOCOL_RAW", HV_PROTOCOL_RAW)
        return 0

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
        if self.scheme == "hvsock":  # Python's AF_HYPERV address: (vm_id, service_id) as strings
            if self.vm_id is None:
                if not listening:
                    raise ConfigError(f"cannot dial {self}: the URL has no VM id (use hvsock://VMID:PORT)")
                return (HV_GUID_WILDCARD, hvsock_guid(self.port))
            return (self.vm_id, hvsock_guid(self.port))
        raise ConfigError(f"{self} has no socket address")

    def __str__(self) -> str:
        if self.scheme == "unix":
            return "unix://" + (("@" + self.path[1:]) if self.path.startswith("\0") else self.path)
        if self.scheme == "tcp":
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"tcp://{host}:{self.port}"
        if self.scheme == "vsock":
            return f"vsock://{'' if self.cid is None else self.cid}:{self.port}"
        if self.scheme == "hvsock":
            return f"hvsock://{self.vm_id or ''}:{self.port}"
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
            f"invalid URL {url!r}: expected unix:///path, tcp://HOST:PORT, vsock://CID:PORT, hvsock://VMID:PORT or fd://N"
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
    if scheme == "hvsock":
        vm, sep, port = rest.rstrip("/").rpartition(":")
        if not sep:
            raise ConfigError(f"invalid URL {url!r}: expected hvsock://VMID:PORT (or hvsock://:PORT to listen)")
        vm_id = None
        if vm not in ("", "any", "*"):
            try:
                vm_id = normalize_guid(vm)
            except ValueError:
                raise ConfigError(f"invalid URL {url!r}: VM id {vm!r} is not a GUID") from None
            if vm_id == HV_GUID_WILDCARD:
                vm_id = None
        return Endpoint("hvsock", vm_id=vm_id, port=_int(port, "port", url, 0, 0xFFFFFFFF))
    if scheme == "fd":
        return Endpoint("fd", fd=_int(rest.rstrip("/"), "fd", url, 0, 2**31 - 1))
    raise ConfigError(f"invalid URL {url!r}: unknown scheme {scheme!r} (valid: {', '.join(SCHEMES)})")


def peer_identity(url: str) -> str | None:
    """Which VM a URL (a candidate, or a peer's address) names: ``vsock:CID`` or ``hvsock:GUID``.

    None for URLs that name no VM (unix, tcp, fd, a listening URL without a
    CID or VM id, or text that is no URL).  Two URLs name the same VM when
    their identities are equal and not None; the port does not matter (a
    peer dials from a port of its own).
    """
    try:
        ep = parse_url(url)
    except ConfigError:
        return None
    if ep.scheme == "vsock" and ep.cid is not None:
        return f"vsock:{ep.cid}"
    if ep.scheme == "hvsock" and ep.vm_id is not None:
        return f"hvsock:{ep.vm_id}"
    return None


def hyperv_family() -> int:
    fam = getattr(_stdsocket, "AF_HYPERV", None)
    if fam is None:
        raise ConfigError("hvsock:// URLs need AF_HYPERV: Windows and Python 3.12 or later")
    return fam


def vsock_family() -> int:
    fam = getattr(_stdsocket, "AF_VSOCK", None)
    if fam is None:
        raise ConfigError("vsock:// URLs need AF_VSOCK, which this Python/OS does not provide")
    return fam

