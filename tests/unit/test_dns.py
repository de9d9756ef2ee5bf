"""The sans-IO DNS core: authority semantics, truncation, EDNS0, config parsing."""

import ipaddress

import dnslib
import pytest
from dnslib import QTYPE, RCODE, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from rdswitch.config import ConfigError, NetConfig
from rdswitch.services.dns.authority import DnsAuthority
from rdswitch.services.dns.message import OUR_UDP_PAYLOAD, formerr, is_truncated, notimp, servfail, truncate_for_udp, udp_payload_limit
from rdswitch.services.dns.resolvconf import ResolvConf, parse_resolv_conf, parse_server
from rdswitch.services.dns.zones import Zone, add_record, builtin_zones, merge_zones, parse_record_flag, parse_zone_config

NET = NetConfig()


def authority(ttl=60, zones=None):
    return DnsAuthority(zones if zones is not None else builtin_zones(NET), ttl)


def ask(auth, name, qtype="A", edns=None):
    q = DNSRecord.question(name, qtype)
    q.header.id = 0x1234
    if edns:
        q.add_ar(dnslib.EDNS0(udp_len=edns))
    reply = auth.answer(DNSRecord.parse(q.pack()))
    if reply is None:
        return None
    out = DNSRecord.parse(reply.pack())
    assert out.header.id == 0x1234 and out.header.qr == 1
    assert str(out.q.qname).lower() == name.lower().rstrip(".") + "."
    return out


def answers(r, rtype):
    return [str(rr.rdata) for rr in r.rr if rr.rtype == rtype]


@pytest.mark.parametrize("zone", ["rancher-desktop.internal", "docker.internal"])
def test_builtin_a_records(zone):
    a = authority()
    r = ask(a, f"host.{zone}")
    assert r.header.rcode == RCODE.NOERROR and r.header.aa == 1
    assert answers(r, QTYPE.A) == ["192.168.127.254"]
    assert r.rr[0].ttl == 60
    r = ask(a, f"GateWay.{zone}.")  # case-insensitive
    assert answers(r, QTYPE.A) == ["192.168.127.1"]


def test_builtin_zones_follow_subnet():
    a = authority(zones=builtin_zones(NetConfig(subnet="10.9.0.0/16")))
    assert answers(ask(a, "gateway.docker.internal"), QTYPE.A) == ["10.9.0.1"]
    assert answers(ask(a, "host.docker.internal"), QTYPE.A) == ["10.9.0.254"]


@pytest.mark.parametrize("qtype", ["AAAA", "MX", "TXT", "CNAME", "HTTPS", "SOA"])
def test_other_types_of_known_name_are_nodata_with_soa(qtype):
    r = ask(authority(), "host.rancher-desktop.internal", qtype)
    assert r.header.rcode == RCODE.NOERROR
    assert r.rr == []
    assert [rr.rtype for rr in r.auth] == [QTYPE.SOA]
    assert str(r.auth[0].rname) == "rancher-desktop.internal."


def test_unknown_name_in_zone_is_nxdomain_with_soa():
    r = ask(authority(ttl=30), "nothere.rancher-desktop.internal")
    assert r.header.rcode == RCODE.NXDOMAIN and r.header.aa == 1
    assert r.rr == []
    soa = r.auth[0]
    assert soa.rtype == QTYPE.SOA and str(soa.rname) == "rancher-desktop.internal."
    assert soa.ttl == 30 and soa.rdata.times[-1] == 30  # negative-caching TTL
    r = ask(authority(), "deep.nothere.docker.internal", "AAAA")
    assert r.header.rcode == RCODE.NXDOMAIN


def test_apex_soa_ns_and_nodata_for_a():
    a = authority()
    r = ask(a, "docker.internal", "SOA")
    assert r.header.rcode == RCODE.NOERROR and [rr.rtype for rr in r.rr] == [QTYPE.SOA]
    assert str(r.rr[0].rdata.mname) == "gateway.docker.internal."
    r = ask(a, "rancher-desktop.internal", "NS")
    assert answers(r, QTYPE.NS) == ["gateway.rancher-desktop.internal."]
    glue = [rr for rr in r.ar if rr.rtype == QTYPE.A]
    assert [str(g.rdata) for g in glue] == ["192.168.127.1"]
    r = ask(a, "rancher-desktop.internal", "A")
    assert r.header.rcode == RCODE.NOERROR and r.rr == [] and r.auth[0].rtype == QTYPE.SOA
    r = ask(a, "rancher-desktop.internal", "ANY")
    assert {rr.rtype for rr in r.rr} == {QTYPE.SOA, QTYPE.NS}


def test_ptr_for_every_record():
    a = authority()
    r = ask(a, "254.127.168.192.in-addr.arpa", "PTR")
    assert r.header.rcode == RCODE.NOERROR and r.header.aa == 1
    assert answers(r, QTYPE.PTR) == ["host.rancher-desktop.internal.", "host.docker.internal."]
    r = ask(a, "1.127.168.192.in-addr.arpa", "PTR")
    assert answers(r, QTYPE.PTR) == ["gateway.rancher-desktop.internal.", "gateway.docker.internal."]
    # an address we have no record for is not ours
    assert ask(a, "2.127.168.192.in-addr.arpa", "PTR") is None
    assert ask(a, "8.8.8.8.in-addr.arpa", "PTR") is None
    a.add_record("docker.internal", "extra", "10.1.2.3")
    assert answers(ask(a, "3.2.1.10.in-addr.arpa", "PTR"), QTYPE.PTR) == ["extra.docker.internal."]


def test_foreign_names_are_forwarded():
    a = authority()
    for name in ["example.com", "internal", "rancher-desktop.internal.evil.com", "xdocker.internal"]:
        assert ask(a, name) is None


def test_non_query_opcode_or_response_is_not_answered():
    a = authority()
    q = DNSRecord.question("host.docker.internal")
    q.header.opcode = 2
    assert a.answer(q) is None
    q = DNSRecord.question("host.docker.internal")
    q.header.qr = 1
    assert a.answer(q) is None


def test_edns_echoed_last():
    r = ask(authority(), "host.docker.internal", edns=4096)
    assert r.ar[-1].rtype == QTYPE.OPT and r.ar[-1].rclass == OUR_UDP_PAYLOAD
    r = ask(authority(), "host.docker.internal")
    assert r.ar == []


def test_regexp_default_and_empty_non_terminal():
    zone = Zone(
        "example.test.",
        records={"a.b": "10.0.0.1", "@": "10.0.0.9"},
        regexp_records=[["web-[0-9]+", "10.0.0.2"]],
        default_ip=None,
    )
    a = authority(zones=[zone])
    assert answers(ask(a, "a.b.example.test"), QTYPE.A) == ["10.0.0.1"]
    assert answers(ask(a, "WEB-42.example.test"), QTYPE.A) == ["10.0.0.2"]
    assert ask(a, "web-x.example.test").header.rcode == RCODE.NXDOMAIN
    assert ask(a, "xweb-1.example.test").header.rcode == RCODE.NXDOMAIN  # full match only
    r = ask(a, "b.example.test")  # exists (has a child) but no A
    assert r.header.rcode == RCODE.NOERROR and r.rr == []
    assert answers(ask(a, "example.test"), QTYPE.A) == ["10.0.0.9"]
    zone.default_ip = ipaddress.IPv4Address("10.0.0.3")
    assert answers(ask(a, "anything.example.test"), QTYPE.A) == ["10.0.0.3"]
    assert answers(ask(a, "a.b.example.test"), QTYPE.A) == ["10.0.0.1"]  # explicit wins


def test_longest_zone_wins():
    zones = builtin_zones(NET) + [Zone("sub.docker.internal", {"host": "10.0.0.7"})]
    a = authority(zones=zones)
    assert answers(ask(a, "host.sub.docker.internal"), QTYPE.A) == ["10.0.0.7"]
    assert ask(a, "nope.sub.docker.internal").auth[0].rname == "sub.docker.internal."


def test_ttl_validation():
    with pytest.raises(ConfigError, match="TTL"):
        DnsAuthority([], 0)
    assert ask(authority(ttl=3600), "host.docker.internal").rr[0].ttl == 3600


# -- flags and zone file ---------------------------------------------------------


def test_record_flag_into_existing_and_new_zone():
    zones = builtin_zones(NET)
    name, ip = parse_record_flag("Foo.Rancher-Desktop.Internal=10.0.0.5")
    z = add_record(zones, name, ip)
    assert z.name == "rancher-desktop.internal." and z.records["foo"] == ipaddress.IPv4Address("10.0.0.5")
    z = add_record(zones, "db.corp.test", "10.0.0.6")
    assert z.name == "corp.test." and z.records == {"db": ipaddress.IPv4Address("10.0.0.6")}
    a = authority(zones=zones)
    assert answers(ask(a, "foo.rancher-desktop.internal"), QTYPE.A) == ["10.0.0.5"]
    assert answers(ask(a, "db.corp.test"), QTYPE.A) == ["10.0.0.6"]


@pytest.mark.parametrize("bad", ["foo", "=1.2.3.4", "foo.internal=1.2.3", "foo.internal=::1", "fo o.internal=1.2.3.4", "-x.internal=1.2.3.4"])
def test_record_flag_errors(bad):
    with pytest.raises(ConfigError, match="invalid"):
        name, ip = parse_record_flag(bad)


def test_zone_file():
    text = """{"zones": [
      {"name": "corp.test", "records": {"db": "10.0.0.1", "@": "10.0.0.2"},
       "regexp": [["n[0-9]+", "10.0.0.3"]], "default_ip": "10.0.0.4"},
      {"name": "docker.internal.", "records": {"extra": "10.0.0.5"}}
    ]}"""
    extra = parse_zone_config(text)
    zones = merge_zones(builtin_zones(NET), extra)
    assert [z.name for z in zones] == ["rancher-desktop.internal.", "docker.internal.", "corp.test."]
    a = authority(zones=zones)
    assert answers(ask(a, "extra.docker.internal"), QTYPE.A) == ["10.0.0.5"]
    assert answers(ask(a, "host.docker.internal"), QTYPE.A) == ["192.168.127.254"]
    assert answers(ask(a, "n7.corp.test"), QTYPE.A) == ["10.0.0.3"]
    assert answers(ask(a, "zzz.corp.test"), QTYPE.A) == ["10.0.0.4"]
    assert zones[2].to_dict() == {
        "name": "corp.test.", "records": {"db": "10.0.0.1", "@": "10.0.0.2"},
        "regexp": [["n[0-9]+", "10.0.0.3"]], "default_ip": "10.0.0.4",
    }


@pytest.mark.parametrize(
    "text,msg",
    [
        ("not json", "not JSON"),
        ("[]", "expected an object"),
        ('{"zones": [1]}', "not an object"),
        ('{"zones": [{"records": {}}]}', "no name"),
        ('{"zones": [{"name": "a..b"}]}', "label"),
        ('{"zones": [{"name": "x.test", "records": {"a": "999.1.1.1"}}]}', "IPv4"),
        ('{"zones": [{"name": "x.test", "records": []}]}', "mapping"),
        ('{"zones": [{"name": "x.test", "regexp": [["(", "1.1.1.1"]]}]}', "regexp"),
        ('{"zones": [{"name": "x.test", "regexp": ["a"]}]}', "pattern, ip"),
        ('{"zones": [{"name": "x.test", "default_ip": "nope"}]}', "default IP"),
        ('{"zones": [{"name": "x.test", "bogus": 1}]}', "unknown keys"),
        ('{"zones": [{"name": "."}]}', "root"),
    ],
)
def test_zone_file_errors(text, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_zone_config(text)


# -- raw helpers -----------------------------------------------------------------


def big_reply(n=150, edns=None):
    q = DNSRecord.question("big.example", "A")
    if edns:
        q.add_ar(dnslib.EDNS0(udp_len=edns))
    r = q.reply()
    for i in range(n):
        r.add_answer(dnslib.RR("big.example", QTYPE.A, 1, 300, dnslib.A(f"10.0.{i // 256}.{i % 256}")))
    if edns:
        r.add_ar(dnslib.EDNS0(udp_len=4096))
    return q, r.pack()


def test_truncate_small_reply_untouched():
    _, data = big_reply(3)
    assert truncate_for_udp(data, 512) is data


def test_truncate_sets_tc_and_drops_records():
    q, data = big_reply(150)
    assert len(data) > 2000
    out = truncate_for_udp(data, udp_payload_limit(q))
    assert len(out) <= 512 and is_truncated(out)
    r = DNSRecord.parse(out)
    assert r.header.tc == 1 and r.header.id == q.header.id and r.rr == []
    assert str(r.q.qname) == "big.example."


def test_truncate_honours_edns_and_keeps_opt():
    q, data = big_reply(150, edns=4096)
    limit = udp_payload_limit(DNSRecord.parse(q.pack()))
    assert limit == 4096
    assert truncate_for_udp(data, limit) is data  # fits
    q, data = big_reply(150, edns=1232)
    out = truncate_for_udp(data, udp_payload_limit(q))
    r = DNSRecord.parse(out)
    assert r.header.tc == 1 and [rr.rtype for rr in r.ar] == [QTYPE.OPT]


def test_udp_payload_limit_floor():
    q = DNSRecord.question("x.test")
    assert udp_payload_limit(q) == 512
    q.add_ar(dnslib.EDNS0(udp_len=100))
    assert udp_payload_limit(q) == 512
    assert udp_payload_limit(None) == 512


def test_servfail_and_formerr():
    q = DNSRecord.question("example.com", "MX")
    q.header.id = 77
    r = DNSRecord.parse(servfail(q.pack()))
    assert r.header.rcode == RCODE.SERVFAIL and r.header.id == 77 and r.header.qr == 1
    assert r.header.rd == 1 and str(r.q.qname) == "example.com." and r.q.qtype == QTYPE.MX
    r = DNSRecord.parse(formerr(b"\x00\x4d\x01\x00\x00\x01" + b"\x00" * 6 + b"\x05ab"))
    assert r.header.rcode == RCODE.FORMERR and r.header.id == 77 and r.questions == []
    assert formerr(b"\x00\x01\x00") is None  # not even a header
    assert formerr(b"\x00\x01\x80\x00" + b"\x00" * 8) is None  # a response: never answer
    assert DNSRecord.parse(notimp(q.pack())).header.rcode == RCODE.NOTIMP


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(0, 70000))
def test_helpers_never_crash(data, limit):
    for f in (formerr, servfail, notimp):
        out = f(data)
        assert out is None or (len(out) >= 12 and out[2] & 0x80)
    out = truncate_for_udp(data, limit)
    assert len(out) <= max(512, limit) or out is data


# -- resolv.conf -----------------------------------------------------------------


def test_parse_resolv_conf():
    text = """# generated by NetworkManager
domain old.example
search corp.example Lab.Example.  corp.example
nameserver 10.0.0.53
nameserver 10.0.0.53
nameserver  fe80::1%eth0
nameserver 127.0.0.1:5353   ; extension
nameserver [::1]:5300
nameserver bogus
options edns0 timeout:1
"""
    conf = parse_resolv_conf(text)
    assert conf.nameservers == (("10.0.0.53", 53), ("fe80::1", 53), ("127.0.0.1", 5353), ("::1", 5300))
    assert conf.search == ("corp.example", "lab.example")
    assert parse_resolv_conf("search a.b\ndomain c.d\n").search == ("c.d",)  # last wins
    assert parse_resolv_conf("") == ResolvConf()


@pytest.mark.parametrize("bad", ["", "1.2.3.4:0", "1.2.3.4:x", "[::1", "[::1]x", "host.name", "1.2.3.4:70000"])
def test_parse_server_errors(bad):
    with pytest.raises(ConfigError, match="invalid DNS server"):
        parse_server(bad)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=400))
def test_parse_resolv_conf_never_crashes(text):
    conf = parse_resolv_conf(text)
    for ip, port in conf.nameservers:
        ipaddress.ip_address(ip)
        assert 0 < port < 65536


def test_parse_server_port_errors_name_the_server_and_the_port():
    with pytest.raises(ConfigError, match=r"invalid DNS server '1\.2\.3\.4:x': invalid port 'x': not a number"):
        parse_server("1.2.3.4:x")
    with pytest.raises(ConfigError, match=r"invalid DNS server '\[::1\]:0': invalid port '0': must be 1\.\.65535"):
        parse_server("[::1]:0")
