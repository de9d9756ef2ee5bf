"""Windows' DNS settings: the pure conversion, the ctypes structures and walker, the polled source.

Nothing here runs on Windows: the adapters are fake records, or ctypes
structures built in this process's memory, and the registry is a function.
"""

import ctypes
import ipaddress
import logging
import struct
import subprocess
import sys

import pytest
import trio
import trio.testing

from rdswitch.config import NetConfig
from rdswitch.host import dns_server, win_dns
from rdswitch.host.dns_sources import ResolvConfFile, WindowsSystem
from rdswitch.host.dns_upstream import Upstreams
from rdswitch.services.dns.authority import DnsAuthority
from rdswitch.services.dns.resolvconf import ResolvConf
from rdswitch.services.dns.winadapters import (
    IF_TYPE_IEEE80211, IF_TYPE_SOFTWARE_LOOPBACK, IF_TYPE_TUNNEL, Adapter, parse_search_list,
    resolv_conf_from_adapters, sockaddr_ip,
)
from rdswitch.services.dns.zones import builtin_zones

NET = NetConfig()

ETH = Adapter("Ethernet", dns_servers=("192.168.1.1", "fec0:0:0:ffff::1", "fec0:0:0:ffff::2", "fec0:0:0:ffff::3"),
              dns_suffix="home.example", metric=25)
WIFI = Adapter("Wi-Fi", if_type=IF_TYPE_IEEE80211, dns_servers=("192.168.1.1", "2001:db8::53"), metric=35)
VPN = Adapter("Corp VPN", if_type=IF_TYPE_TUNNEL, dns_servers=("10.8.0.53", "10.8.0.54"), dns_suffix="Corp.Example.",
              suffixes=("eng.corp.example", "corp.example"), metric=5)


# -- the pure conversion --------------------------------------------------------------


def test_servers_by_metric_duplicates_removed_site_local_dropped():
    conf = resolv_conf_from_adapters([ETH, WIFI, VPN])
    assert conf.nameservers == (("10.8.0.53", 53), ("10.8.0.54", 53), ("192.168.1.1", 53), ("2001:db8::53", 53))
    assert conf.search == ("corp.example", "eng.corp.example", "home.example")
    # without the VPN: what the home network gives
    assert resolv_conf_from_adapters([ETH, WIFI]) == ResolvConf(
        (("192.168.1.1", 53), ("2001:db8::53", 53)), ("home.example",))


def test_equal_metrics_keep_windows_order():
    a = Adapter("a", dns_servers=("10.0.0.1",), metric=10)
    b = Adapter("b", dns_servers=("10.0.0.2",), metric=10)
    c = Adapter("c", dns_servers=("10.0.0.3",))  # no metric known: last
    assert [s for s, _ in resolv_conf_from_adapters([c, b, a]).nameservers] == ["10.0.0.2", "10.0.0.1", "10.0.0.3"]


def test_down_loopback_and_serverless_adapters_are_skipped():
    adapters = [
        Adapter("down", up=False, dns_servers=("10.1.1.1",), dns_suffix="down.example", metric=1),
        Adapter("Loopback Pseudo-Interface 1", if_type=IF_TYPE_SOFTWARE_LOOPBACK, dns_servers=("127.0.0.1",), metric=75),
        Adapter("Teredo", if_type=IF_TYPE_TUNNEL, dns_suffix="tunnel.example", metric=2),  # routes only
        Adapter("only placeholders", dns_servers=("fec0:0:0:ffff::1",), dns_suffix="ph.example", metric=3),
        Adapter("vEthernet (WSL)", dns_servers=(), metric=4),
        Adapter("ok", dns_servers=("192.0.2.53",), dns_suffix="ok.example", metric=50),
    ]
    assert resolv_conf_from_adapters(adapters) == ResolvConf((("192.0.2.53", 53),), ("ok.example",))
    assert resolv_conf_from_adapters([]) == ResolvConf()


def test_unusable_server_addresses_dropped():
    a = Adapter("x", dns_servers=("fe80::1", "fe80::1%12", "0.0.0.0", "::", "224.0.0.251", "255.255.255.255",
                                  "garbage", "::ffff:192.0.2.7", "127.0.0.1", "169.254.169.253"))
    assert [s for s, _ in resolv_conf_from_adapters([a]).nameservers] == ["192.0.2.7", "127.0.0.1", "169.254.169.253"]


def test_search_list_first_then_primary_then_adapters_in_order():
    conf = resolv_conf_from_adapters([ETH, VPN], ["Global.Example", "corp.example"], "pc.Domain.Example.")
    assert conf.search == ("global.example", "corp.example", "pc.domain.example", "eng.corp.example", "home.example")


def test_parse_search_list():
    assert parse_search_list("") == ()
    assert parse_search_list("a.example,B.Example., a.example ,, c.example") == ("a.example", "b.example", "c.example")
    assert parse_search_list("x.example y.example") == ("x.example", "y.example")


def test_sockaddr_ip():
    v4 = struct.pack("<HH4s8x", 2, 53, ipaddress.IPv4Address("10.8.0.53").packed)
    v6 = struct.pack("<HHI16sI", 23, 53, 0, ipaddress.IPv6Address("2001:db8::53").packed, 0)
    assert sockaddr_ip(v4) == "10.8.0.53"
    assert sockaddr_ip(v6) == "2001:db8::53"
    assert sockaddr_ip(struct.pack("<HH4s8x", 10, 0, b"\0" * 4)) is None  # Linux's AF_INET6 is not Windows'
    assert sockaddr_ip(b"") is None and sockaddr_ip(v6[:10]) is None


# -- the ctypes structures --------------------------------------------------------------

# IP_ADAPTER_ADDRESSES_LH on x64, from tailscale/winipcfg-go constants_amd64.go (WireGuard LLC's
# winipcfg, whose offsets were taken with offsetof() against the Windows SDK's iptypes.h); they agree
# with Microsoft's documented field order and the MSVC x64 alignment rules (pointers and ULONG64 at 8,
# ULONG at 4, the 16-byte GUID at 4).
AMD64_OFFSETS = {
    "IfIndex": 4, "Next": 8, "AdapterName": 16, "FirstUnicastAddress": 24, "FirstAnycastAddress": 32,
    "FirstMulticastAddress": 40, "FirstDnsServerAddress": 48, "DnsSuffix": 56, "Description": 64,
    "FriendlyName": 72, "PhysicalAddress": 80, "PhysicalAddressLength": 88, "Flags": 92, "Mtu": 96,
    "IfType": 100, "OperStatus": 104, "Ipv6IfIndex": 108, "ZoneIndices": 112, "FirstPrefix": 176,
    "TransmitLinkSpeed": 184, "ReceiveLinkSpeed": 192, "FirstWinsServerAddress": 200, "FirstGatewayAddress": 208,
    "Ipv4Metric": 216, "Ipv6Metric": 220, "Luid": 224, "Dhcpv4Server": 232, "CompartmentId": 248,
    "NetworkGuid": 252, "ConnectionType": 268, "TunnelType": 272, "Dhcpv6Server": 280, "Dhcpv6ClientDuid": 296,
    "Dhcpv6ClientDuidLength": 428, "Dhcpv6Iaid": 432, "FirstDnsSuffix": 440,
}

needs_64bit = pytest.mark.skipif(ctypes.sizeof(ctypes.c_void_p) != 8, reason="the checked layout is the 64-bit one")


@needs_64bit
def test_ip_adapter_addresses_has_the_x64_layout():
    S = win_dns.IP_ADAPTER_ADDRESSES
    got = {name: getattr(S, name).offset for name in AMD64_OFFSETS}
    assert got == AMD64_OFFSETS
    assert ctypes.sizeof(S) == 448


@needs_64bit
def test_dns_server_suffix_and_socket_address_layouts():
    # same source: IP_ADAPTER_DNS_SERVER_ADDRESS_XP 32 bytes (Next 8, Address 16),
    # IP_ADAPTER_DNS_SUFFIX 520 (String 8), SOCKET_ADDRESS 16 (iSockaddrLength 8)
    assert ctypes.sizeof(win_dns.IP_ADAPTER_DNS_SERVER_ADDRESS) == 32
    assert win_dns.IP_ADAPTER_DNS_SERVER_ADDRESS.Next.offset == 8
    assert win_dns.IP_ADAPTER_DNS_SERVER_ADDRESS.Address.offset == 16
    assert ctypes.sizeof(win_dns.IP_ADAPTER_DNS_SUFFIX) == 520
    assert win_dns.IP_ADAPTER_DNS_SUFFIX.String.offset == 8
    assert ctypes.sizeof(win_dns.SOCKET_ADDRESS) == 16
    assert win_dns.SOCKET_ADDRESS.iSockaddrLength.offset == 8


def _wstr(text, keep):
    buf = ctypes.create_string_buffer((text + "\0").encode("utf-16-le"))
    keep.append(buf)
    return ctypes.addressof(buf)


def _sockaddr(ip, keep):
    ip = ipaddress.ip_address(ip)
    if ip.version == 4:
        raw = struct.pack("<HH4s8x", 2, 0x3500, ip.packed)
    else:
        raw = struct.pack("<HHI16sI", 23, 0x3500, 0, ip.packed, 0)
    buf = ctypes.create_string_buffer(raw, len(raw))
    keep.append(buf)
    return ctypes.addressof(buf), len(raw)


def _linked(nodes):
    for a, b in zip(nodes, nodes[1:]):
        a.Next = ctypes.pointer(b)
    return ctypes.pointer(nodes[0]) if nodes else None


def _fake_adapter(keep, *, friendly, guid, servers, suffix="", suffixes=(), oper=1, if_type=6,
                  v4_metric=0, v6_metric=0, flags=0x180):
    aa = win_dns.IP_ADAPTER_ADDRESSES()
    aa.Length = ctypes.sizeof(aa)
    name = ctypes.create_string_buffer(guid.encode())
    keep.append(name)
    aa.AdapterName = ctypes.addressof(name)
    aa.FriendlyName = _wstr(friendly, keep) if friendly else None
    aa.DnsSuffix = _wstr(suffix, keep)
    dns = []
    for s in servers:
        node = win_dns.IP_ADAPTER_DNS_SERVER_ADDRESS()
        node.Address.lpSockaddr, node.Address.iSockaddrLength = _sockaddr(s, keep)
        dns.append(node)
    if dns:
        aa.FirstDnsServerAddress = _linked(dns)
    sfx = []
    for text in suffixes:
        node = win_dns.IP_ADAPTER_DNS_SUFFIX()
        units = text.encode("utf-16-le")
        ctypes.memmove(node.String, units, len(units))
        sfx.append(node)
    if sfx:
        aa.FirstDnsSuffix = _linked(sfx)
    aa.OperStatus, aa.IfType, aa.Flags = oper, if_type, flags
    aa.Ipv4Metric, aa.Ipv6Metric = v4_metric, v6_metric
    return aa


def test_walking_an_adapter_list_built_in_memory():
    keep = []
    nodes = [
        _fake_adapter(keep, friendly="Ethernet", guid="{E}", servers=["192.168.1.1", "fec0:0:0:ffff::1"],
                      suffix="home.example", v4_metric=25, v6_metric=30),
        _fake_adapter(keep, friendly="Zürich VPN", guid="{V}", servers=["10.8.0.53", "2001:db8::53"],
                      suffix="corp.example", suffixes=["eng.corp.example", "ops.corp.example"], if_type=131,
                      v4_metric=40, v6_metric=5, flags=0x80),  # IPv6 not enabled: its metric is ignored
        _fake_adapter(keep, friendly="", guid="{D}", servers=[], oper=2),
    ]
    adapters = win_dns.adapters_from_list(_linked(nodes))
    assert adapters == [
        Adapter("Ethernet", True, 6, ("192.168.1.1", "fec0:0:0:ffff::1"), "home.example", (), 25),
        Adapter("Zürich VPN", True, 131, ("10.8.0.53", "2001:db8::53"), "corp.example",
                ("eng.corp.example", "ops.corp.example"), 40),
        Adapter("{D}", False, 6, (), "", (), win_dns.NO_METRIC),
    ]
    assert win_dns.adapters_from_list(None) == []
    conf = resolv_conf_from_adapters(adapters)
    assert conf.nameservers[0] == ("192.168.1.1", 53)  # metric 25 < 40


def test_the_real_readers_refuse_off_windows():
    if sys.platform == "win32":
        pytest.skip("this is Windows")
    with pytest.raises(OSError, match="only available on Windows"):
        win_dns.read_adapters()


def test_modules_import_with_sys_platform_win32_and_touch_no_windows_api():
    code = (
        "import sys, trio, ctypes\n"
        "sys.platform = 'win32'\n"
        "import rdswitch.host.win_dns, rdswitch.host.dns_sources, rdswitch.host.dns_server, rdswitch.host.dns_upstream\n"
        "import rdswitch.services.dns.winadapters\n"
        "assert 'winreg' not in sys.modules and not hasattr(ctypes, 'WinDLL') and not hasattr(ctypes, 'windll')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


# -- the source, followed by Upstreams and DHCP ------------------------------------------------


class FakeWindows:
    """What GetAdaptersAddresses and the registry say; a test changes it between reads."""

    def __init__(self):
        self.adapters = [ETH]
        self.search_list = ()
        self.reads = 0
        self.fail = False

    def read_adapters(self):
        self.reads += 1
        if self.fail:
            raise OSError(1168, "GetAdaptersAddresses failed with error 1168")
        return list(self.adapters)

    def read_search_lists(self):
        return tuple(self.search_list), ""

    def source(self, **kw):
        return WindowsSystem(self.read_adapters, self.read_search_lists, **kw)


def test_upstreams_follow_a_vpn_coming_up_and_going_away(caplog):
    win = FakeWindows()
    now = [0.0]
    up = Upstreams(source=win.source(recheck_interval=2.0), clock=lambda: now[0])
    assert up.recheck_interval == 2.0 and up.path is None
    assert up.current() == [("192.168.1.1", 53)] and up.search() == ["home.example"]
    assert win.reads == 1
    win.adapters = [ETH, VPN]  # the VPN connects
    now[0] += 1.0
    assert up.current() == [("192.168.1.1", 53)] and win.reads == 1  # within the interval: not read
    now[0] += 1.0
    with caplog.at_level(logging.INFO, logger="rdswitch.host.dns_upstream"):
        assert up.current() == [("10.8.0.53", 53), ("10.8.0.54", 53), ("192.168.1.1", 53)]
    assert "the Windows network adapters" in caplog.text
    assert up.search() == ["corp.example", "eng.corp.example", "home.example"]
    win.fail = True  # a failing read keeps the last known servers
    now[0] += 5
    assert up.current()[0] == ("10.8.0.53", 53)
    win.fail = False
    win.adapters = [ETH]  # disconnected
    now[0] += 5
    assert up.current() == [("192.168.1.1", 53)] and up.search() == ["home.example"]


def test_fixed_servers_take_search_domains_from_windows():
    win = FakeWindows()
    win.search_list = ("global.example",)
    up = Upstreams([("9.9.9.9", 53)], source=win.source())
    assert up.current() == [("9.9.9.9", 53)]
    assert up.search() == ["global.example", "home.example"]


def test_keep_search_domains_follows_windows_with_mock_clock():
    win = FakeWindows()
    svc = dns_server.DnsService(DnsAuthority(builtin_zones(NET)), Upstreams(source=win.source(recheck_interval=2.0)))
    clock = trio.testing.MockClock(autojump_threshold=0)

    async def main():
        send, applied = trio.open_memory_channel(100)

        async def quiet_for(seconds):
            with trio.move_on_after(seconds):
                got = await applied.receive()
                pytest.fail(f"apply({got}) without a change")

        async with trio.open_nursery() as nursery:
            await nursery.start(svc.keep_search_domains, send.send_nowait, 1.0)
            assert applied.receive_nowait() == ["home.example"]
            await quiet_for(10)
            reads = win.reads
            assert 4 <= reads <= 7  # every 2 s (the source's interval), not every 1 s
            win.adapters = [ETH, VPN]
            with trio.fail_after(2.5):  # by the next poll (virtual time)
                assert await applied.receive() == ["corp.example", "eng.corp.example", "home.example"]
            win.adapters = [ETH, Adapter("Corp VPN", if_type=IF_TYPE_TUNNEL, dns_servers=("10.9.9.9",),
                                         dns_suffix="corp.example", suffixes=("eng.corp.example",), metric=5)]
            await quiet_for(10)  # only a server changed: nothing for DHCP
            win.search_list = ("policy.example",)
            with trio.fail_after(2.5):
                assert await applied.receive() == ["policy.example", "corp.example", "eng.corp.example", "home.example"]
            win.adapters = [ETH]
            win.search_list = ()
            with trio.fail_after(2.5):
                assert await applied.receive() == ["home.example"]
            nursery.cancel_scope.cancel()

    trio.run(main, clock=clock)


# -- flags ------------------------------------------------------------------------------


def parse(argv):
    import argparse

    p = argparse.ArgumentParser()
    dns_server.add_arguments(p)
    return p.parse_args(argv)


def test_default_source_is_resolv_conf_off_windows(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    src = dns_server.dns_source(parse([]))
    assert isinstance(src, ResolvConfFile) and src.path == "/etc/resolv.conf"


def test_default_source_on_windows_is_the_system_and_an_explicit_file_still_wins(monkeypatch, tmp_path):
    win = FakeWindows()
    win.adapters = [ETH, VPN]
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(win_dns, "read_adapters", win.read_adapters)
    monkeypatch.setattr(win_dns, "read_search_lists", win.read_search_lists)
    svc = dns_server.from_args(parse([]), NET)
    assert isinstance(svc.upstreams.source, WindowsSystem)
    assert svc.upstreams.current()[0] == ("10.8.0.53", 53)
    assert svc.search_domains() == ["corp.example", "eng.corp.example", "home.example"]
    rc = tmp_path / "resolv.conf"
    rc.write_text("search file.example\nnameserver 192.0.2.1\n")
    svc = dns_server.from_args(parse(["--dns-resolv-conf", str(rc)]), NET)
    assert isinstance(svc.upstreams.source, ResolvConfFile)
    assert svc.upstreams.current() == [("192.0.2.1", 53)] and svc.search_domains() == ["file.example"]


def test_help_says_which_default(monkeypatch):
    import argparse

    for platform, needle in (("win32", "Windows' own settings"), ("linux", "/etc/resolv.conf")):
        monkeypatch.setattr(sys, "platform", platform)
        p = argparse.ArgumentParser()
        dns_server.add_arguments(p)
        assert needle in " ".join(p.format_help().split())


def test_windows_source_off_windows_gives_no_servers_and_one_warning(caplog):
    with caplog.at_level(logging.WARNING):
        up = Upstreams(source=WindowsSystem())
    if sys.platform != "win32":
        assert up.current() == [] and up.search() == []
        assert "cannot read the Windows network adapters" in caplog.text


def test_a_short_structure_is_not_read_past_its_length():
    keep = []
    aa = _fake_adapter(keep, friendly="old", guid="{O}", servers=["10.0.0.1"], suffixes=["x.example"], v4_metric=7)
    aa.Length = win_dns.IP_ADAPTER_ADDRESSES.Ipv4Metric.offset  # an XP-sized structure
    (adapter,) = win_dns.adapters_from_list(ctypes.pointer(aa))
    assert adapter.dns_servers == ("10.0.0.1",) and adapter.suffixes == () and adapter.metric == win_dns.NO_METRIC


def test_an_unexpected_reader_error_keeps_the_last_servers(caplog):
    win = FakeWindows()
    now = [0.0]
    up = Upstreams(source=win.source(), clock=lambda: now[0])
    win.read_search_lists = lambda: 1 / 0  # a bug or surprising data, not an OSError
    up.source._read_search_lists = win.read_search_lists
    now[0] += 10
    with caplog.at_level(logging.WARNING):
        assert up.current() == [("192.168.1.1", 53)]
    assert "ZeroDivisionError" in caplog.text
