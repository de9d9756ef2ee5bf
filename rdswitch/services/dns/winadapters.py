"""Windows' DNS settings -> ``ResolvConf``, sans-IO: the caller reads the system and passes plain records.

The Windows shell (``rdswitch/host/win_dns.py``) turns what
``GetAdaptersAddresses`` and the registry say into ``Adapter`` records and a
global search list; ``resolv_conf_from_adapters`` decides from them, the same
way for every caller and for the tests:

* adapters that are not up, loopback adapters, and adapters with no usable DNS
  server (a tunnel adapter that only carries routes, a Hyper-V internal switch)
  are skipped -- for search domains too: a suffix is no use without a server
  that knows it;
* the rest in order of their interface metric, lowest first (a VPN adapter
  usually has the lowest), ties in the order Windows listed them;
* servers in that order, duplicates removed; IPv6 site-local ``fec0::/10``
  (Windows' placeholders ``fec0:0:0:ffff::1..3`` when no IPv6 DNS is set),
  link-local IPv6 (useless without the zone), unspecified and multicast
  addresses dropped;
* search domains: the global list (``SearchList``, the policy's first) first,
  then the primary DNS suffix, then per adapter (same order) its
  connection-specific suffix and its own suffix list; lower case, no trailing
  dot, duplicates removed.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Iterable

import attrs

from rdswitch.services.dns.resolvconf import ResolvConf

# IFTYPE values (ipifcons.h)
IF_TYPE_OTHER = 1
IF_TYPE_ETHERNET_CSMACD = 6
IF_TYPE_PPP = 23
IF_TYPE_SOFTWARE_LOOPBACK = 24
IF_TYPE_IEEE80211 = 71
IF_TYPE_TUNNEL = 131
# IF_OPER_STATUS (ifdef.h): IfOperStatusUp
IF_OPER_STATUS_UP = 1
# Windows' address families (ws2def.h); AF_INET6 is not Linux's 10
WIN_AF_INET = 2
WIN_AF_INET6 = 23

NO_METRIC = 0xFFFFFFFF


@attrs.frozen
class Adapter:
    """One network adapter as far as DNS cares (plain data, hashable: a snapshot compares by value)."""

    name: str
    up: bool = True
    if_type: int = IF_TYPE_ETHERNET_CSMACD
    dns_servers: tuple[str, ...] = ()  # addresses as text, v4 or v6, in the adapter's order
    dns_suffix: str = ""  # the connection-specific suffix (IP_ADAPTER_ADDRESSES.DnsSuffix)
    suffixes: tuple[str, ...] = ()  # the adapter's own suffix search list (FirstDnsSuffix chain)
    metric: int = NO_METRIC  # the interface metric (lowest of the enabled families)


def usable_dns_server(text: str) -> str | None:
    """The address as canonical text, or None when it cannot be a DNS server to forward to."""
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0].strip())
    except ValueError:
        return None
    if ip.is_unspecified or ip.is_multicast:
        return None
    if ip.version == 6:
        if ip.is_site_local or ip.is_link_local:
            return None
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
    elif ip == ipaddress.IPv4Address("255.255.255.255"):
        return None
    return str(ip)


def _norm_domain(name: str) -> str:
    return name.strip().rstrip(".").lower()


def parse_search_list(text: str) -> tuple[str, ...]:
    """The registry's ``SearchList`` (REG_SZ, comma separated; some tools use spaces) -> names."""
    out: list[str] = []
    for part in text.replace(",", " ").replace(";", " ").split():
        name = _norm_domain(part)
        if name and name not in out:
            out.append(name)
    return tuple(out)


def sockaddr_ip(raw: bytes) -> str | None:
    """The address in a Windows ``SOCKADDR`` (``sockaddr_in``/``sockaddr_in6``), or None."""
    if len(raw) < 2:
        return None
    (family,) = struct.unpack_from("<H", raw)
    if family == WIN_AF_INET and len(raw) >= 8:
        return str(ipaddress.IPv4Address(raw[4:8]))
    if family == WIN_AF_INET6 and len(raw) >= 24:
        return str(ipaddress.IPv6Address(raw[8:24]))
    return None


def resolv_conf_from_adapters(
    adapters: Iterable[Adapter],
    search_list: Iterable[str] = (),
    primary_suffix: str = "",
    *,
    port: int = 53,
) -> ResolvConf:
    """Nameservers and search domains for the host's adapters (the rules are in the module doc)."""
    chosen: list[tuple[Adapter, list[str]]] = []
    for a in adapters:
        if not a.up or a.if_type == IF_TYPE_SOFTWARE_LOOPBACK:
            continue
        servers = [s for s in (usable_dns_server(t) for t in a.dns_servers) if s is not None]
        if not servers:
            continue
        chosen.append((a, servers))
    chosen.sort(key=lambda pair: pair[0].metric)  # stable: ties keep Windows' order
    nameservers: list[tuple[str, int]] = []
    search: list[str] = []

    def add_domain(name: str) -> None:
        name = _norm_domain(name)
        if name and name not in search:
            search.append(name)

    for name in search_list:
        add_domain(name)
    add_domain(primary_suffix)
    for a, servers in chosen:
        for s in servers:
            if (s, port) not in nameservers:
                nameservers.append((s, port))
        add_domain(a.dns_suffix)
        for name in a.suffixes:
            add_domain(name)
    return ResolvConf(tuple(nameservers), tuple(search))
