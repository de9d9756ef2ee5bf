"""Parsing of port-forward requests (API bodies and --port-forward flags)."""

import ipaddress

import pytest
from hypothesis import given, strategies as st

from rdswitch.config import ConfigError
from rdswitch.services.forwarder import Forward, parse_expose, parse_port_forward_flag, parse_unexpose

NET = ipaddress.IPv4Network("192.168.127.0/24")


def test_expose_shapes():
    f = parse_expose({"local": "127.0.0.1:8080", "remote": "192.168.127.2:80"}, None, NET)
    assert f == Forward("127.0.0.1", 8080, "tcp", "192.168.127.2", 80)
    assert f.as_json() == {"local": "127.0.0.1:8080", "remote": "192.168.127.2:80", "protocol": "tcp"}
    f = parse_expose({"local": "0.0.0.0:53", "remote": ":53", "protocol": "UDP"}, "192.168.127.3", NET)
    assert (f.remote, f.protocol) == ("192.168.127.3:53", "udp")
    assert parse_unexpose({"local": "127.0.0.1:8080"}) == ("127.0.0.1:8080", "tcp")
    assert parse_port_forward_flag("127.0.0.1:2222=192.168.127.2:22", NET).local == "127.0.0.1:2222"
    assert parse_port_forward_flag("127.0.0.1:5353=192.168.127.2:53/udp", NET).protocol == "udp"


@pytest.mark.parametrize("body,msg", [
    ([], "JSON object"),
    ({"local": "127.0.0.1", "remote": "192.168.127.2:80"}, "no port"),
    ({"local": "127.0.0.1:0", "remote": "192.168.127.2:80"}, "1..65535"),
    ({"local": "localhost:80", "remote": "192.168.127.2:80"}, "IPv4"),
    ({"local": "127.0.0.1:80", "remote": "8.8.8.8:80"}, "outside the virtual subnet"),
    ({"local": "127.0.0.1:80", "remote": ":80"}, "caller"),
    ({"local": "127.0.0.1:80", "remote": "192.168.127.2:80", "protocol": "sctp"}, "protocol"),
])
def test_expose_errors(body, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_expose(body, None, NET)


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=30),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(["local", "remote", "protocol", "x"]), c, max_size=4),
                    max_leaves=8), st.none() | st.just("192.168.127.9"))
def test_random_bodies_only_raise_config_error(body, caller):
    try:
        parse_expose(body, caller, NET)
    except ConfigError:
        pass
    try:
        parse_unexpose(body)
    except ConfigError:
        pass
