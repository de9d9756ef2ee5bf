"""wsl-proxy: the sans-IO mapping parser and message framer, plus the trio
shell driven in-process over 127.0.0.0/8 only (its UDP flow table is tested
in test_flowtable.py)."""

from __future__ import annotations

import errno
import json
import logging
import socket
import struct

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from rdswitch.wsl_proxy.__main__ import parse_args
from rdswitch.wsl_proxy.mapping import (
    MAX_MESSAGE,
    Binding,
    MappingError,
    MessageFramer,
    PortMapping,
    parse_mapping,
)
from rdswitch.wsl_proxy.proxy import Proxy

# ---------------------------------------------------------------- parse_mapping


def test_parse_spec_example():
    m = parse_mapping(b'{"remove": false, "ports": {"80/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8080"}]}}')
    assert m == PortMapping(False, (Binding("tcp", 8080),), ())
    assert m.bindings[0].container_port == 80
    assert m.bindings[0].host_ip == "127.0.0.1"


def test_parse_remove_udp_and_default_protocol():
    m = parse_mapping(json.dumps({"remove": True, "ports": {"53/udp": [{"HostPort": "5353"}], "22": [{"HostPort": 2222}]}}).encode())
    assert m.remove is True
    assert set(m.bindings) == {Binding("udp", 5353), Binding("tcp", 2222)}
    assert m.errors == ()


def test_parse_joins_the_host_ips_of_one_port():
    m = parse_mapping(b'{"ports": {"80/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8080"}, {"HostIp": "::", "HostPort": "8080"}]}}')
    assert m.bindings == (Binding("tcp", 8080),)
    assert m.bindings[0].host_ips == ("0.0.0.0", "::")
    m = parse_mapping(b'{"ports": {"80/tcp": [{"HostPort": "8080"}], "81/udp": [{"HostIp": "[::1]", "HostPort": "53"}]}}')
    assert [b.host_ips for b in m.bindings] == [("",), ("::1",)]


def test_parse_refuses_a_host_ip_that_is_not_an_address():
    m = parse_mapping(b'{"ports": {"80/tcp": [{"HostIp": "localhost", "HostPort": "8080"}, {"HostPort": "8081"}]}}')
    assert m.bindings == (Binding("tcp", 8081),)
    assert "HostIp of '80/tcp' is not an IP address" in m.errors[0]


def test_addresses_of_a_binding_are_as_given():
    proxy = Proxy("127.0.0.2")
    assert proxy.addresses(Binding("tcp", 1)) == [(socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")]
    assert proxy.addresses(Binding("tcp", 1, host_ips=("127.0.0.1",))) == [(socket.AF_INET, "127.0.0.1")]
    assert proxy.addresses(Binding("udp", 1, host_ips=("0.0.0.0", "::", "0.0.0.0"))) == [
        (socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")]


def test_parse_keys_case_insensitive_like_go():
    m = parse_mapping(b'{"Remove": true, "Ports": {"80/TCP": [{"hostIp": "", "hostport": "81"}]}}')
    assert m.remove and m.bindings == (Binding("tcp", 81),)


def test_parse_null_bindings_and_missing_ports_are_empty():
    assert parse_mapping(b'{"ports": {"80/tcp": null}}') == PortMapping(False)
    assert parse_mapping(b'{"remove": false}') == PortMapping(False)
    assert parse_mapping(b'{"ports": null}') == PortMapping(False)


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"", "empty"),
        (b"   ", "empty"),
        (b"{", "invalid JSON"),
        (b"not json", "invalid JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'"x"', "expected a JSON object"),
        (b'{"remove": "yes"}', '"remove" must be true or false'),
        (b'{"ports": [1]}', '"ports" must be an object'),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[" * 5000 + b"]" * 5000, "nested deeper"),
        (b'{"ports": {"80/tcp": [{"HostPort": 1' + b"0" * 5000 + b"}]}}", "invalid JSON"),
        (b" " * (MAX_MESSAGE + 1), "too large"),
    ],
)
def test_parse_rejects_bad_messages_with_clear_errors(data, fragment):
    with pytest.raises(MappingError) as info:
        parse_mapping(data)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "ports, fragment",
    [
        ({"80/sctp": [{"HostPort": "80"}]}, "unknown protocol 'sctp'"),
        ({"80/tcp": [{"HostPort": "0"}]}, "out of range"),
        ({"80/tcp": [{"HostPort": "65536"}]}, "out of range"),
        ({"80/tcp": [{"HostPort": "-1"}]}, "not a port number"),
        ({"80/tcp": [{"HostPort": "8_080"}]}, "not a port number"),
        ({"80/tcp": [{"HostPort": " 80"}]}, "not a port number"),
        ({"80/tcp": [{"HostPort": True}]}, "not a port number"),
        ({"80/tcp": [{"HostPort": 80.5}]}, "not a port number"),
        ({"80/tcp": [{"HostPort": ""}]}, "no HostPort"),
        ({"80/tcp": [{}]}, "no HostPort"),
        ({"80/tcp": ["8080"]}, "not an object"),
        ({"80/tcp": {"HostPort": "1"}}, "must be a list"),
        ({"x/tcp": [{"HostPort": "1"}]}, "not a port number"),
        ({"80/tcp": [{"HostPort": "1", "HostIp": 5}]}, "HostIp"),
    ],
)
def test_bad_binding_is_reported_and_the_others_still_apply(ports, fragment):
    ports = {**ports, "443/tcp": [{"HostPort": "8443"}]}
    m = parse_mapping(json.dumps({"ports": ports}).encode())
    assert m.bindings == (Binding("tcp", 8443),)
    assert len(m.errors) == 1 and fragment in m.errors[0], m.errors


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=20,
)
_binding = st.dictionaries(st.sampled_from(["HostIp", "HostPort", "hostport", "x"]), _json | st.text("0123456789", max_size=6), max_size=3)
_mapping = st.fixed_dictionaries(
    {},
    optional={
        "remove": _json,
        "ports": st.dictionaries(st.text("0123456789/tcpudx", max_size=8), st.none() | st.lists(_binding | _json, max_size=3), max_size=4) | _json,
    },
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_raise_anything_but_mapping_error(data):
    try:
        m = parse_mapping(data)
    except MappingError as exc:
        assert str(exc)
    else:
        assert isinstance(m, PortMapping)


@settings(max_examples=300, deadline=None)
@given(_mapping)
def test_random_json_never_raises_anything_but_mapping_error(obj):
    try:
        m = parse_mapping(json.dumps(obj).encode())
    except MappingError as exc:
        assert str(exc)
        return
    for b in m.bindings:
        assert b.protocol in ("tcp", "udp") and 0 < b.host_port < 65536
    assert len(set(m.bindings)) == len(m.bindings)


# ---------------------------------------------------------------- MessageFramer


def _frame(chunks):
    f = MessageFramer()
    for c in chunks:
        out = f.feed(c)
        if out is not None:
            return out
    return f.eof()


@settings(max_examples=200, deadline=None)
@given(_mapping, st.lists(st.integers(1, 50), max_size=20), st.binary(max_size=20))
def test_framer_finds_the_object_however_it_is_split(obj, cuts, trailer):
    msg = json.dumps(obj).encode()
    data = b" \n" + msg + trailer
    chunks, i = [], 0
    for c in cuts:
        chunks.append(data[i : i + c])
        i += c
    chunks.append(data[i:])
    assert _frame(chunks).strip() == msg


def test_framer_braces_inside_strings_do_not_end_the_message():
    msg = b'{"ports": {"80/tcp": [{"HostIp": "}\\"}", "HostPort": "1"}]}}'
    assert _frame([msg[:20], msg[20:] + b"{junk"]) == msg


def test_framer_returns_non_object_at_once_and_partial_at_eof():
    f = MessageFramer()
    assert f.feed(b"garbage") == b"garbage"  # no need to wait for EOF to reject it
    f = MessageFramer()
    assert f.feed(b'{"remove": tr') is None
    assert f.eof() == b'{"remove": tr'


def test_framer_limits_size():
    f = MessageFramer(limit=100)
    with pytest.raises(MappingError, match="too large"):
        for _ in range(10):
            f.feed(b'{"a": "' + b"x" * 50)


# ---------------------------------------------------------------- flags


def test_flags_single_dash_long_and_kebab():
    a = parse_args(["-socketFile", "/tmp/x.sock", "-upstreamAddress=10.0.0.1", "-logfile", "/tmp/l", "-debug"])
    assert (a.socket_file, a.upstream, a.logfile, a.debug) == ("/tmp/x.sock", "10.0.0.1", "/tmp/l", True)
    a = parse_args(["--socket-file", "/tmp/y", "--upstream-address", "[::1]", "-debug=false"])
    assert (a.socket_file, a.upstream, a.debug) == ("/tmp/y", "::1", False)
    a = parse_args([])
    assert (a.socket_file, a.upstream, a.logfile) == ("/run/wsl-proxy.sock", "192.168.143.1", "/var/log/wsl-proxy.log")
    assert a.udp_buffer == 8 << 20
    # network-setup's --veth-subnet gives the upstream too (its .1, the namespace end)
    assert parse_args(["--veth-subnet", "10.77.0.0/24", "-udpBuffer", "65536"]).upstream == "10.77.0.1"
    # the first layout, one flag away
    assert parse_args(["-upstreamAddress", "192.168.1.2"]).upstream == "192.168.1.2"
    # Go's bool spellings, and yes/no like network-setup (the two copies of this once differed)
    assert [parse_args([f"-debug={v}"]).debug for v in ("True", "1", "t", "yes", "FALSE", "0", "no")] == [
        True, True, True, True, False, False, False]


@pytest.mark.parametrize("argv,needle", [
    (["--veth-subnet", "10.0.0.0/24", "-upstreamAddress", "10.0.0.1"], "not both"),
    (["--veth-subnet", "10.0.0.1/24"], "--veth-subnet"),
    (["-udpBuffer", "0"], "must be"),
])
def test_flags_veth_subnet_and_udp_buffer_errors(argv, needle, capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2 and needle in capsys.readouterr().err


def test_flags_bad_upstream_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["-upstreamAddress", "not an address!"])
    assert info.value.code == 2
    assert "invalid upstream address" in capsys.readouterr().err


# ---------------------------------------------------------------- the trio shell, in-process on 127/8
# The proxy listens on 127.0.0.1:P and pipes to 127.0.0.2:P (loopback, but a
# different address, like the namespace's veth).

UP = "127.0.0.2"
V4_ONLY = ((socket.AF_INET, "127.0.0.1"),)


def free_port(kind=socket.SOCK_STREAM) -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket(socket.AF_INET, kind) as s2:
                s2.bind((UP, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port")


async def tcp_upstream(port, nursery, handler):
    listeners = await trio.open_tcp_listeners(port, host=UP)
    nursery.start_soon(trio.serve_listeners, handler, listeners)


async def echo_handler(stream):
    await echo_handler_rest(stream, await stream.receive_some(65536))


async def echo_handler_rest(stream, data):
    """Echo ``data`` (already read), then everything else until EOF."""
    while data:
        await stream.send_all(data)
        data = await stream.receive_some(65536)
    await stream.send_eof()


async def assert_closed(stream) -> None:
    """The proxy has closed ``stream`` (EOF or a reset, within 5 s); close our end too."""
    with trio.fail_after(5):
        try:
            assert await stream.receive_some(10) == b""
        except trio.BrokenResourceError:
            pass
    await stream.aclose()


def run_with_proxy(test, clock=None, **kw):
    async def main():
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                proxy = Proxy(UP, any_address=V4_ONLY, **kw)
                await nursery.start(proxy.serve, _IdleListener())
                await test(proxy, nursery)
                nursery.cancel_scope.cancel()

    trio.run(main, clock=clock)


class _IdleListener(trio.abc.Listener):
    async def accept(self):
        await trio.sleep_forever()

    async def aclose(self):
        pass


def test_tcp_forward_half_close_and_remove_closes_open_connections():
    port = free_port()

    async def test(proxy, nursery):
        await tcp_upstream(port, nursery, echo_handler)
        await proxy.apply(PortMapping(False, (Binding("tcp", port),)))
        # a request, then our half-close: the echo server must still answer it
        s = await trio.open_tcp_stream("127.0.0.1", port)
        await s.send_all(b"hello")
        await s.send_eof()
        got = b""
        while chunk := await s.receive_some(100):
            got += chunk
        assert got == b"hello"  # and then EOF: the upstream's half-close came back
        await s.aclose()
        # an open connection is closed by remove
        s = await trio.open_tcp_stream("127.0.0.1", port)
        await s.send_all(b"x")
        assert await s.receive_some(10) == b"x"
        await proxy.apply(PortMapping(True, (Binding("tcp", port),)))
        assert proxy.ports == {}
        await assert_closed(s)
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", port)

    run_with_proxy(test)


def test_readd_is_idempotent_and_port_in_use_is_logged(caplog):
    port, busy_port = free_port(), free_port()
    caplog.set_level(logging.INFO, logger="rdswitch.wsl_proxy")

    async def test(proxy, nursery):
        await tcp_upstream(port, nursery, echo_handler)
        for _ in range(3):
            await proxy.apply(PortMapping(False, (Binding("tcp", port),)))
        assert list(proxy.ports) == [("tcp", port)]
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", busy_port))
            busy.listen()
            await proxy.apply(PortMapping(False, (Binding("tcp", busy_port),)))
        assert ("tcp", busy_port) not in proxy.ports
        s = await trio.open_tcp_stream("127.0.0.1", port)
        await s.send_all(b"still")
        assert await s.receive_some(10) == b"still"
        await s.aclose()

    run_with_proxy(test)
    in_use = [r for r in caplog.records if "already in use" in r.getMessage()]
    assert len(in_use) == 1 and in_use[0].levelno == logging.ERROR and str(busy_port) in in_use[0].getMessage()


def test_upstream_reset_ends_that_connection_only():
    """An error on one side of a pipe (here a RST from upstream) ends both
    directions of that connection; the proxy and the port go on."""
    port = free_port()

    async def handler(stream):
        data = await stream.receive_some(100)
        if data == b"reset":
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await stream.aclose()  # linger 0: the close is a RST
            return
        await echo_handler_rest(stream, data)

    async def test(proxy, nursery):
        await tcp_upstream(port, nursery, handler)
        await proxy.apply(PortMapping(False, (Binding("tcp", port),)))
        s = await trio.open_tcp_stream("127.0.0.1", port)
        await s.send_all(b"reset")
        await assert_closed(s)
        await trio.testing.wait_all_tasks_blocked()
        assert proxy.ports[("tcp", port)].connections == 0
        s = await trio.open_tcp_stream("127.0.0.1", port)
        await s.send_all(b"fine")
        with trio.fail_after(5):
            assert await s.receive_some(10) == b"fine"
        await s.aclose()

    run_with_proxy(test)


def test_control_socket_retries_transient_accept_errors():
    """EMFILE from accept() is waited out; the next connection is served."""

    class FlakyListener(trio.abc.Listener):
        def __init__(self, stream):
            self.results = [OSError(errno.EMFILE, "Too many open files"), stream]

        async def accept(self):
            await trio.lowlevel.checkpoint()
            if not self.results:
                await trio.sleep_forever()
            result = self.results.pop(0)
            if isinstance(result, BaseException):
                raise result
            return result

        async def aclose(self):
            pass

    port = free_port()

    async def main():
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                ours, theirs = trio.testing.memory_stream_pair()
                listener = FlakyListener(theirs)
                proxy = Proxy(UP, any_address=V4_ONLY)
                await nursery.start(proxy.serve, listener)
                await ours.send_all(json.dumps({"ports": {"80/tcp": [{"HostPort": str(port)}]}}).encode())
                assert await ours.receive_some(10) == b""  # closed once applied
                assert list(proxy.ports) == [("tcp", port)]
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_upstream_refused_closes_the_client():
    port = free_port()  # nothing listens on 127.0.0.2:port

    async def test(proxy, nursery):
        await proxy.apply(PortMapping(False, (Binding("tcp", port),)))
        for _ in range(20):
            s = await trio.open_tcp_stream("127.0.0.1", port)
            await assert_closed(s)
        await trio.testing.wait_all_tasks_blocked()  # the proxy's side has finished too
        assert proxy.ports[("tcp", port)].connections == 0

    run_with_proxy(test)


def test_udp_forward_flows_and_idle_timeout():
    port = free_port(socket.SOCK_DGRAM)
    # Real time runs on (MockClock rate 1) for the sockets; the idle timeout passes
    # by a jump of the clock, so it is long enough never to expire a flow early.
    IDLE = 5.0

    async def test(proxy, nursery):
        up = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await up.bind((UP, port))

        async def udp_echo():
            with up:
                while True:
                    data, addr = await up.recvfrom(65536)
                    await up.sendto(data.upper(), addr)

        nursery.start_soon(udp_echo)
        await proxy.apply(PortMapping(False, (Binding("udp", port),)))
        entry = proxy.ports[("udp", port)]
        clients = []
        for i in range(3):
            c = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            await c.connect(("127.0.0.1", port))
            clients.append(c)
            await c.send(b"ping%d" % i)
            with trio.fail_after(5):
                assert await c.recv(100) == b"PING%d" % i
        # at most 2 flows per port: the least recently used was evicted
        await trio.testing.wait_all_tasks_blocked()  # its task has ended
        assert entry.connections == 2
        # idle flows close their upstream sockets: move the clock past the idle timeout
        trio.lowlevel.current_clock().jump(IDLE + 1)
        await trio.testing.wait_all_tasks_blocked()  # the reaper ran and the flows ended
        assert entry.connections == 0
        # a client that comes back gets a fresh flow
        await clients[0].send(b"again")
        with trio.fail_after(5):
            assert await clients[0].recv(100) == b"AGAIN"
        for c in clients:
            c.close()
        await proxy.apply(PortMapping(True, (Binding("udp", port),)))
        assert entry.connections == 0 and entry.done.is_set()

    run_with_proxy(test, clock=trio.testing.MockClock(rate=1.0), udp_idle_timeout=IDLE, udp_max_flows=2)


def test_bind_error_other_than_in_use_is_reported():
    async def test(proxy, nursery):
        # not ours: EADDRNOTAVAIL
        ok = await proxy.add_port(Binding("tcp", free_port(), host_ips=("192.0.2.123",)))
        assert ok is False and proxy.ports == {}

    run_with_proxy(test)


def test_control_socket_needs_no_half_close(tmp_path):
    """Like the incumbent's streaming decoder: a client that writes one JSON
    object and waits (without shutting down its side) gets it applied, and the
    proxy then closes the connection."""
    port = free_port()
    path = str(tmp_path / "ctl.sock")

    async def main():
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                sock = trio.socket.socket(socket.AF_UNIX)
                await sock.bind(path)
                sock.listen()
                proxy = Proxy(UP, any_address=V4_ONLY)
                await nursery.start(proxy.serve, trio.SocketListener(sock))
                client = await trio.open_unix_socket(path)
                await client.send_all(json.dumps({"ports": {"80/tcp": [{"HostPort": str(port)}]}}).encode())
                assert await client.receive_some(10) == b""  # closed once applied
                await client.aclose()
                assert list(proxy.ports) == [("tcp", port)]
                nursery.cancel_scope.cancel()
            assert proxy.ports == {}
            with pytest.raises(ConnectionRefusedError):  # stopping the proxy closed the listener
                socket.create_connection(("127.0.0.1", port), timeout=2).close()

    trio.run(main)
