"""Reading Windows' DNS settings: ``GetAdaptersAddresses`` through ctypes, the search list from the registry.

Importable everywhere: this module only *defines* ctypes structures at import
time.  ``ctypes.WinDLL`` and ``winreg`` are touched only inside
``read_adapters`` and ``read_search_lists``, which only the Windows process
calls.  Walking the adapter list (``adapters_from_list``) is plain pointer
work, so the tests run it on Linux over structures they build in memory.

The structures follow ``iptypes.h`` (``IP_ADAPTER_ADDRESSES_LH``,
``IP_ADAPTER_DNS_SERVER_ADDRESS_XP``, ``IP_ADAPTER_DNS_SUFFIX``) and
``ws2def.h`` (``SOCKET_ADDRESS``), with fixed-width ctypes types: ``ULONG``
is 32 bits on Windows but ``ctypes.c_ulong`` is 64 on Linux, and ``WCHAR`` is
UTF-16 while ``c_wchar`` is 32 bits on Linux -- so strings are read as
UTF-16 by hand.  The 64-bit offsets are checked by ``tests/unit/test_dns_windows.py``.
"""

from __future__ import annotations

import ctypes
import struct
import sys
from ctypes import POINTER, Structure, c_int32, c_uint8, c_uint16, c_uint32, c_uint64, c_void_p

from rdswitch.services.dns.winadapters import IF_OPER_STATUS_UP, NO_METRIC, Adapter, parse_search_list, sockaddr_ip

MAX_ADAPTER_ADDRESS_LENGTH = 8
MAX_DHCPV6_DUID_LENGTH = 130
MAX_DNS_SUFFIX_STRING_LENGTH = 256

# GetAdaptersAddresses flags (iptypes.h)
GAA_FLAG_SKIP_UNICAST = 0x0001
GAA_FLAG_SKIP_ANYCAST = 0x0002
GAA_FLAG_SKIP_MULTICAST = 0x0004
GAA_FLAG_SKIP_DNS_SERVER = 0x0008
GAA_FLAG_INCLUDE_PREFIX = 0x0010
GAA_FLAG_SKIP_FRIENDLY_NAME = 0x0020
# What we ask for: the DNS servers and suffixes, not the (long) address lists.
GAA_FLAGS = GAA_FLAG_SKIP_UNICAST | GAA_FLAG_SKIP_ANYCAST | GAA_FLAG_SKIP_MULTICAST

AF_UNSPEC = 0
ERROR_SUCCESS = 0
ERROR_BUFFER_OVERFLOW = 111
ERROR_NO_DATA = 232

# IP_ADAPTER_ADDRESSES.Flags bits
IP_ADAPTER_IPV4_ENABLED = 0x0080
IP_ADAPTER_IPV6_ENABLED = 0x0100

TCPIP_PARAMETERS = r"SYSTEM\CurrentControlSet\Services\Tcpip\Parameters"
DNS_CLIENT_POLICY = r"SOFTWARE\Policies\Microsoft\Windows NT\DNSClient"


class SOCKET_ADDRESS(Structure):
    _fields_ = [
        ("lpSockaddr", c_void_p),
        ("iSockaddrLength", c_int32),
    ]


class IP_ADAPTER_DNS_SERVER_ADDRESS(Structure):
    pass


IP_ADAPTER_DNS_SERVER_ADDRESS._fields_ = [
    ("Length", c_uint32),  # with Reserved: the union with ULONGLONG Alignment
    ("Reserved", c_uint32),
    ("Next", POINTER(IP_ADAPTER_DNS_SERVER_ADDRESS)),
    ("Address", SOCKET_ADDRESS),
]


class IP_ADAPTER_DNS_SUFFIX(Structure):
    pass


IP_ADAPTER_DNS_SUFFIX._fields_ = [
    ("Next", POINTER(IP_ADAPTER_DNS_SUFFIX)),
    ("String", c_uint16 * MAX_DNS_SUFFIX_STRING_LENGTH),  # WCHAR[], NUL-terminated
]


class IP_ADAPTER_ADDRESSES(Structure):
    pass


IP_ADAPTER_ADDRESSES._fields_ = [
    ("Length", c_uint32),  # with IfIndex: the union with ULONGLONG Alignment
    ("IfIndex", c_uint32),
    ("Next", POINTER(IP_ADAPTER_ADDRESSES)),
    ("AdapterName", c_void_p),  # PCHAR: the adapter's GUID, ASCII
    ("FirstUnicastAddress", c_void_p),
    ("FirstAnycastAddress", c_void_p),
    ("FirstMulticastAddress", c_void_p),
    ("FirstDnsServerAddress", POINTER(IP_ADAPTER_DNS_SERVER_ADDRESS)),
    ("DnsSuffix", c_void_p),  # PWCHAR
    ("Description", c_void_p),  # PWCHAR
    ("FriendlyName", c_void_p),  # PWCHAR
    ("PhysicalAddress", c_uint8 * MAX_ADAPTER_ADDRESS_LENGTH),
    ("PhysicalAddressLength", c_uint32),
    ("Flags", c_uint32),
    ("Mtu", c_uint32),
    ("IfType", c_uint32),
    ("OperStatus", c_uint32),  # IF_OPER_STATUS, an enum (int)
    ("Ipv6IfIndex", c_uint32),
    ("ZoneIndices", c_uint32 * 16),
    ("FirstPrefix", c_void_p),
    ("TransmitLinkSpeed", c_uint64),
    ("ReceiveLinkSpeed", c_uint64),
    ("FirstWinsServerAddress", c_void_p),
    ("FirstGatewayAddress", c_void_p),
    ("Ipv4Metric", c_uint32),
    ("Ipv6Metric", c_uint32),
    ("Luid", c_uint64),  # IF_LUID
    ("Dhcpv4Server", SOCKET_ADDRESS),
    ("CompartmentId", c_uint32),
    ("NetworkGuid", c_uint32 * 4),  # GUID: 16 bytes, 4-aligned
    ("ConnectionType", c_uint32),
    ("TunnelType", c_uint32),
    ("Dhcpv6Server", SOCKET_ADDRESS),
    ("Dhcpv6ClientDuid", c_uint8 * MAX_DHCPV6_DUID_LENGTH),
    ("Dhcpv6ClientDuidLength", c_uint32),
    ("Dhcpv6Iaid", c_uint32),
    ("FirstDnsSuffix", POINTER(IP_ADAPTER_DNS_SUFFIX)),
]


def _utf16_at(address: int | None, limit: int = 1024) -> str:
    """A NUL-terminated UTF-16 string at ``address`` (None/0: ""), at most ``limit`` units."""
    if not address:
        return ""
    units = ctypes.cast(address, POINTER(c_uint16))
    out = []
    for i in range(limit):
        u = units[i]
        if u == 0:
            break
        out.append(u)
    return _utf16(out)


def _utf16(units: list[int]) -> str:
    return struct.pack(f"<{len(units)}H", *units).decode("utf-16-le", errors="replace")


def _utf16_array(array) -> str:
    units = []
    for u in array:
        if u == 0:
            break
        units.append(u)
    return _utf16(units)


def _metric(aa: IP_ADAPTER_ADDRESSES) -> int:
    metrics = []
    if aa.Flags & IP_ADAPTER_IPV4_ENABLED and aa.Ipv4Metric:
        metrics.append(aa.Ipv4Metric)
    if aa.Flags & IP_ADAPTER_IPV6_ENABLED and aa.Ipv6Metric:
        metrics.append(aa.Ipv6Metric)
    if not metrics:
        metrics = [m for m in (aa.Ipv4Metric, aa.Ipv6Metric) if m]
    return min(metrics) if metrics else NO_METRIC


def _has(aa: IP_ADAPTER_ADDRESSES, field: str) -> bool:
    """Whether the structure Windows filled in is long enough to hold ``field`` (``Length`` says how long)."""
    f = getattr(IP_ADAPTER_ADDRESSES, field)
    return aa.Length >= f.offset + f.size


def adapters_from_list(first, *, limit: int = 1024) -> list[Adapter]:
    """Walk an ``IP_ADAPTER_ADDRESSES`` linked list (a ctypes pointer) into ``Adapter`` records.

    Fields past the structure's ``Length`` (an older, shorter version) are not read.
    """
    out: list[Adapter] = []
    node = first
    while node and len(out) < limit:
        aa = node.contents
        servers = []
        dns = aa.FirstDnsServerAddress
        while dns and len(servers) < 64:
            sa = dns.contents.Address
            if sa.lpSockaddr and 0 < sa.iSockaddrLength <= 128:
                ip = sockaddr_ip(ctypes.string_at(sa.lpSockaddr, sa.iSockaddrLength))
                if ip is not None:
                    servers.append(ip)
            dns = dns.contents.Next
        suffixes = []
        suffix = aa.FirstDnsSuffix if _has(aa, "FirstDnsSuffix") else None
        while suffix and len(suffixes) < 64:
            text = _utf16_array(suffix.contents.String)
            if text:
                suffixes.append(text)
            suffix = suffix.contents.Next
        name = _utf16_at(aa.FriendlyName) or (ctypes.string_at(aa.AdapterName).decode("ascii", "replace") if aa.AdapterName else "")
        out.append(Adapter(
            name=name,
            up=aa.OperStatus == IF_OPER_STATUS_UP,
            if_type=aa.IfType,
            dns_servers=tuple(servers),
            dns_suffix=_utf16_at(aa.DnsSuffix),
            suffixes=tuple(suffixes),
            metric=_metric(aa) if _has(aa, "Ipv6Metric") else NO_METRIC,
        ))
        node = aa.Next
    return out


def read_adapters() -> list[Adapter]:
    """The host's adapters from ``GetAdaptersAddresses`` (Windows only; OSError on failure)."""
    if sys.platform != "win32":
        raise OSError("GetAdaptersAddresses is only available on Windows")
    iphlpapi = ctypes.WinDLL("iphlpapi")
    gaa = iphlpapi.GetAdaptersAddresses
    gaa.argtypes = [c_uint32, c_uint32, c_void_p, c_void_p, POINTER(c_uint32)]
    gaa.restype = c_uint32
    size = c_uint32(16 * 1024)  # Microsoft recommends starting at 15 KB
    for _ in range(8):  # the list can grow between the calls (an adapter comes up)
        buf = ctypes.create_string_buffer(size.value)
        rc = gaa(AF_UNSPEC, GAA_FLAGS, None, buf, ctypes.byref(size))
        if rc == ERROR_SUCCESS:
            return adapters_from_list(ctypes.cast(buf, POINTER(IP_ADAPTER_ADDRESSES)))  # buf alive until here
        if rc == ERROR_NO_DATA:
            return []
        if rc != ERROR_BUFFER_OVERFLOW:
            raise OSError(rc, f"GetAdaptersAddresses failed with error {rc}")
    raise OSError(ERROR_BUFFER_OVERFLOW, "GetAdaptersAddresses: the adapter list kept growing")


def read_search_lists() -> tuple[tuple[str, ...], str]:
    """(global search list, primary DNS suffix) from the registry (Windows only).

    The policy's ``SearchList`` (Group Policy) comes before the local one; a
    missing key or value is an empty list.
    """
    import winreg  # Windows only: never at import time

    def value(path: str, name: str) -> str:
        try:
            with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, path) as key:
                v, _kind = winreg.QueryValueEx(key, name)
        except OSError:  # FileNotFoundError: no such key or value
            return ""
        return v if isinstance(v, str) else ""

    names: list[str] = []
    for path in (DNS_CLIENT_POLICY, TCPIP_PARAMETERS):
        for n in parse_search_list(value(path, "SearchList")):
            if n not in names:
                names.append(n)
    primary = value(TCPIP_PARAMETERS, "Domain") or value(TCPIP_PARAMETERS, "NV Domain")
    return tuple(names), primary
