"""Parsing of port-forward requests (API bodies and --port-forward flags)."""

import ipaddress

import pytest
from hypothesis import given, strategies as st

from rdswitch.config import ConfigError
from rdswitch.services.forwarder import Forward, parse_expose, parse_port_forward_flag, parse_unexpose

NET = ipaddress.IPv4Network("192.168.127.0/24")


def test_expose_shapes():
    f = parse_expose({"local": "127.0.0.1:8080", "remote": "192.168.127.2:80"}, None, NET)
    assert f == Forward("127.0.0.1:8080", "tcp", "192.168.127.2", 80, "127.0.0.1", 8080)
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
    ({"local": "::1:80", "remote": "192.168.127.2:80"}, "brackets"),
    ({"local": "[::1]80", "remote": "192.168.127.2:80"}, "IPv6"),
    ({"local": "[localhost]:80", "remote": "192.168.127.2:80"}, "not an IPv6 address"),
    ({"local": "bad host!:80", "remote": "192.168.127.2:80"}, "neither an IP address nor a host name"),
    ({"local": "1.2.3:80", "remote": "192.168.127.2:80"}, "neither"),
    ({"local": "127.0.0.1:80", "remote": "[::1]:80"}, "not an IPv4 address"),
    ({"local": "127.0.0.1:80", "remote": "vm.example:80"}, "not an IPv4 address"),
    ({"local": "relative.sock", "remote": "tcp://192.168.127.2:80", "protocol": "unix"}, "absolute socket path"),
    ({"local": "/run/x.sock", "remote": "192.168.127.2:80", "protocol": "unix"}, "tcp://IP:PORT"),
    ({"local": "/run/x.sock", "remote": "ssh-tunnel://core@192.168.127.2/run/p.sock", "protocol": "unix"},
     "ssh-tunnel:// is not supported"),
    ({"local": "/run/x.sock", "remote": "tcp://10.0.0.1:80", "protocol": "unix"}, "outside the virtual subnet"),
    ({"local": "/run/x.sock", "remote": "tcp://192.168.127.2:80", "protocol": "npipe"}, "protocol"),
    ({"local": "127.0.0.1:80", "remote": "8.8.8.8:80"}, "outside the virtual subnet"),
    ({"local": "127.0.0.1:80", "remote": ":80"}, "caller"),
    ({"local": "127.0.0.1:80", "remote": "192.168.127.2:80", "protocol": "sctp"}, "protocol"),
])
def test_expose_errors(body, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_expose(body, None, NET)


@pytest.mark.parametrize("local,host,port", [
    ("127.0.0.1:8080", "127.0.0.1", 8080),
    (":8080", "", 8080),  # what net.JoinHostPort("", port) gives: every address
    ("0.0.0.0:8080", "0.0.0.0", 8080),
    ("localhost:8080", "localhost", 8080),
    ("LocalHost.:8080", "LocalHost.", 8080),
    ("[::1]:8080", "::1", 8080),
    ("[::]:8080", "::", 8080),
    ("[0:0::1]:8080", "::1", 8080),
    ("[fe80::1%eth0]:8080", "fe80::1%eth0", 8080),
    ("host.example:1", "host.example", 1),
])
def test_every_local_form(local, host, port):
    """The local string names the forward as sent; its parts say where to listen."""
    for proto in ("tcp", "udp"):
        f = parse_expose({"local": local, "remote": "192.168.127.2:80", "protocol": proto}, None, NET)
        assert (f.local, f.local_host, f.local_port, f.key) == (local, host, port, (local, proto))
        assert f.as_json()["local"] == local
        assert parse_unexpose({"local": local, "protocol": proto}) == f.key


def test_unix_forward():
    body = {"local": "/run/podman.sock", "remote": "tcp://192.168.127.2:2375", "protocol": "unix"}
    f = parse_expose(body, None, NET)
    assert (f.local_host, f.remote_ip, f.remote_port, f.key) == ("/run/podman.sock", "192.168.127.2", 2375,
                                                                 ("/run/podman.sock", "unix"))
    assert f.as_json() == body
    f = parse_expose(dict(body, remote="tcp://:22/"), "192.168.127.5", NET)
    assert f.remote == "tcp://192.168.127.5:22"


def test_unexpose_keeps_the_string():
    # the incumbent's key is protocol/local as sent: ":80" and "0.0.0.0:80" are different forwards
    assert parse_unexpose({"local": ":80"}) == (":80", "tcp")
    assert parse_unexpose({"local": "/run/x.sock", "protocol": "unix"}) == ("/run/x.sock", "unix")
    for bad in ({"local": ""}, {"local": 80}, {}, {"local": ":80", "protocol": "sctp"}):
        with pytest.raises(ConfigError):
            parse_unexpose(bad)


def test_port_forward_flag_forms():
    assert parse_port_forward_flag("[::1]:2222=192.168.127.2:22", NET).local_host == "::1"
    assert parse_port_forward_flag(":2222=192.168.127.2:22/udp", NET).key == (":2222", "udp")
    with pytest.raises(ConfigError, match="tcp or udp"):
        parse_port_forward_flag("127.0.0.1:1=192.168.127.2:22/unix", NET)


@given(st.sampled_from(["", "127.0.0.1", "localhost", "[::1]", "[::]", "h.example"]), st.integers(-5, 70000),
       st.sampled_from(["tcp", "udp", "TCP", None]))
def test_local_port_range(host, port, proto):
    body = {"local": f"{host}:{port}", "remote": "192.168.127.2:80", "protocol": proto}
    if 0 < port < 65536:
        f = parse_expose(body, None, NET)
        assert f.local_port == port and f.local == body["local"] and f.protocol == (proto or "tcp").lower()
    else:
        with pytest.raises(ConfigError, match="1..65535|not a number"):
            parse_expose(body, None, NET)


@given(st.text(max_size=40))
def test_any_local_text_parses_or_is_refused_clearly(text):
    for proto in ("tcp", "unix"):
        remote = "tcp://192.168.127.2:80" if proto == "unix" else "192.168.127.2:80"
        try:
            f = parse_expose({"local": text, "remote": remote, "protocol": proto}, None, NET)
        except ConfigError as exc:
            assert "local" in str(exc), exc
        else:
            assert f.local == text


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
