"""resolv.conf parsing, sans-IO: the caller reads the file and passes its text."""

from __future__ import annotations

import ipaddress

import attrs

from rdswitch.config import ConfigError, parse_port


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
    """``parse_port``, with the whole server spec in the message: "invalid DNS server '1.2.3.4:x': invalid port 'x': ..."."""
    try:
        return parse_port(p)
    except ConfigError as exc:
        raise ConfigError(f"invalid DNS server {text!r}: {exc}") from None


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
