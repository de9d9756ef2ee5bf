"""gvisor-tap-vsock's types.Zone over the API: listing it, and merging an AddDNS body into the zones."""

import ipaddress
import re

import pytest
from hypothesis import given, strategies as st

from rdswitch.config import ConfigError, NetConfig
from rdswitch.services.dns.zones import Zone, builtin_zones, merge_zones, parse_incumbent_zone

NET = NetConfig()
IP = ipaddress.IPv4Address


def add(zones, body):
    return merge_zones(zones, [parse_incumbent_zone(body)])


def test_builtin_zones_listed_as_go_types_zone():
    z = builtin_zones(NET)[1].as_incumbent()
    assert z == {"Name": "docker.internal.", "DefaultIP": "", "Records": [
        {"Name": "gateway", "IP": str(NET.gateway_ip)}, {"Name": "host", "IP": str(NET.host_alias_ip)}]}


def test_default_ip_only_zone_is_added_and_answers_every_name():
    zones = add(builtin_zones(NET), {"Name": "apps.test.", "Records": None, "DefaultIP": "10.0.0.7"})
    zone = zones[-1]
    assert zone.name == "apps.test." and zone.lookup("anything") == IP("10.0.0.7")
    assert zone.as_incumbent() == {"Name": "apps.test.", "Records": [], "DefaultIP": "10.0.0.7"}


def test_records_regexps_and_default_merge_like_the_incumbent():
    zones = add([], {"Name": "z.test", "Records": [{"Name": "a", "IP": "10.0.0.1"},
                                                   {"Name": "", "IP": "10.0.0.2", "Regexp": "^db"}]})
    zones = add(zones, {"Name": "Z.test.", "Records": [{"Name": "a", "IP": "10.0.0.3"},
                                                      {"IP": "10.0.0.4", "Regexp": "(?i)web"}], "DefaultIP": ""})
    (zone,) = zones
    assert zone.lookup("a") == IP("10.0.0.3")  # new records win
    assert zone.lookup("my-WEB-2") == IP("10.0.0.4")  # unanchored, as Go's MatchString; newest regexp first
    assert zone.lookup("db7") == IP("10.0.0.2") and zone.lookup("xdb") is None and zone.default_ip is None
    assert zone.as_incumbent()["Records"] == [
        {"Name": "a", "IP": "10.0.0.3"},
        {"Name": "", "IP": "10.0.0.4", "Regexp": "(?i)web"}, {"Name": "", "IP": "10.0.0.2", "Regexp": "^db"}]
    add(zones, {"Name": "z.test.", "DefaultIP": "10.0.0.9"})
    assert zone.lookup("other") == IP("10.0.0.9") and zone.lookup("a") == IP("10.0.0.3")


def test_zone_file_regexps_are_listed_anchored():
    zone = Zone("c.test", {}, [["n[0-9]+", "10.0.0.3"]])
    (rec,) = zone.as_incumbent()["Records"]
    assert rec["Regexp"] == "^(?:n[0-9]+)$"
    assert bool(re.search(rec["Regexp"], "n12")) and not re.search(rec["Regexp"], "xn12")


@pytest.mark.parametrize("body,msg", [
    ([], "JSON object"),
    ({"Records": []}, "zone name"),
    ({"Name": "z.test", "Records": {}}, "list"),
    ({"Name": "z.test", "Records": ["x"]}, "object"),
    ({"Name": "z.test", "Records": [{"Name": "a"}]}, "IPv4"),
    ({"Name": "z.test", "Records": [{"Name": "a", "IP": "::1"}]}, "IPv4"),
    ({"Name": "z.test", "Records": [{"IP": "10.0.0.1"}]}, "Name or a Regexp"),
    ({"Name": "z.test", "Records": [{"IP": "10.0.0.1", "Regexp": {}}]}, "Regexp"),
    ({"Name": "z.test", "Records": [{"IP": "10.0.0.1", "Regexp": "("}]}, "regexp '\\('"),
    ({"Name": "z.test", "Records": [{"Name": "a b", "IP": "10.0.0.1"}]}, "label"),
    ({"Name": "z.test", "DefaultIP": "nope"}, "default IP"),
])
def test_bad_bodies_change_nothing(body, msg):
    zones = builtin_zones(NET)
    before = [z.as_incumbent() for z in zones]
    with pytest.raises(ConfigError, match=msg):
        add(zones, body)
    assert [z.as_incumbent() for z in zones] == before


@given(st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True), st.from_regex(r"[a-z0-9-]{0,20}", fullmatch=True))
def test_regexp_semantics_match_go_find_anywhere(pattern, name):
    zone = parse_incumbent_zone({"Name": "h.test", "Records": [{"IP": "10.0.0.1", "Regexp": pattern}]})
    assert (zone.lookup(name) is not None) == (re.search(pattern, name) is not None)
    assert zone.as_incumbent()["Records"][0]["Regexp"] == pattern
