"""DnsService and the forwarder against fake upstreams on loopback (never a real resolver)."""

import argparse
import os
import struct

import dnslib
import pytest
import trio
import trio.testing
from dnslib import QTYPE, RCODE, DNSRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rdswitch.config import ConfigError, NetConfig
from rdswitch.host import dns_server
from rdswitch.host.dns_upstream import Upstreams, UpstreamError, forward
from rdswitch.services.dns.authority import DnsAuthority
from rdswitch.services.dns.zones import builtin_zones

NET = NetConfig()
BIG_TXT = [("x%03d-" % i) + "y" * 90 for i in range(32)]  # ~3100 bytes of TXT


class FakeUpstream:
    """A tiny authoritative server on 127.0.0.1 (UDP and TCP on the same port).

    Like a real server it truncates UDP answers larger than the client's EDNS0
    size (or 512) and sets TC; over TCP it answers in full.
    """

    def __init__(self, a_records, *, silent=False, drop_first=0, tcp=True):
        self.a = a_records
        self.silent = silent
        self.drop_first = drop_first  # UDP queries to lose before answering
        self.tcp = tcp  # False: TCP connections are closed at once (a resolver without TCP)
        self.udp_queries = 0
        self.tcp_queries = 0
        self.asked = trio.Event()  # set at the first UDP query, answered or not
        self.port = None

    def reply(self, data: bytes, udp: bool) -> bytes:
        q = DNSRecord.parse(data)
        r = q.reply()
        name = str(q.q.qname).rstrip(".").lower()
        if name == "big.example":
            for t in BIG_TXT:
                r.add_answer(dnslib.RR(q.q.qname, QTYPE.TXT, 1, 77, dnslib.TXT(t)))
        elif name == "servfail.example":
            r.header.rcode = RCODE.SERVFAIL
        elif name in self.a:
            r.add_answer(dnslib.RR(q.q.qname, QTYPE.A, 1, 1234, dnslib.A(self.a[name])))
        else:
            r.header.rcode = RCODE.NXDOMAIN
        out = r.pack()
        limit = 512
        for rr in q.ar:
            if rr.rtype == QTYPE.OPT:
                limit = max(512, rr.rclass)
        if udp and len(out) > limit:
            r.rr = []
            r.header.tc = 1
            out = r.pack()
        return out

    async def run(self, task_status=trio.TASK_STATUS_IGNORED):
        for _ in range(20):
            udp = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
            await udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            try:
                listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
                break
            except OSError:
                udp.close()
        else:
            raise RuntimeError("no free port pair")
        self.port = port
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._udp, udp)
            nursery.start_soon(trio.serve_listeners, self._tcp, listeners)
            task_status.started(self)

    async def _udp(self, sock):
        with sock:
            while True:
                data, addr = await sock.recvfrom(65535)
                self.udp_queries += 1
                self.asked.set()
                if not self.silent and self.udp_queries > self.drop_first:
                    await sock.sendto(self.reply(data, udp=True), addr)

    async def _tcp(self, stream):
        async with stream:
            if not self.tcp:
                return
            buf = b""
            with trio.move_on_after(5):
                while True:
                    chunk = await stream.receive_some()
                    if not chunk:
                        return
                    buf += chunk
                    while len(buf) >= 2 and len(buf) >= 2 + struct.unpack("!H", buf[:2])[0]:
                        n = struct.unpack("!H", buf[:2])[0]
                        msg, buf = buf[2:2 + n], buf[2 + n:]
                        self.tcp_queries += 1
                        if not self.silent:
                            out = self.reply(msg, udp=False)
                            await stream.send_all(struct.pack("!H", len(out)) + out)

    @property
    def addr(self):
        return ("127.0.0.1", self.port)


def query(name, qtype="A", edns=None, qid=4321):
    q = DNSRecord.question(name, qtype)
    q.header.id = qid
    if edns:
        q.add_ar(dnslib.EDNS0(udp_len=edns))
    return q.pack()


def service(upstreams, **kw):
    return dns_server.DnsService(DnsAuthority(builtin_zones(NET), 60), upstreams, **kw)


def closed_udp_port():
    import socket
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def tcp_exchange(svc, messages, *, timeout=5):
    """Send messages over an in-memory stream to serve_stream; return the replies (by ID)."""
    client, server = trio.testing.memory_stream_pair()
    replies = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(svc.serve_stream, server)
        await client.send_all(b"".join(struct.pack("!H", len(m)) + m for m in messages))
        buf = b""
        with trio.fail_after(timeout):
            while len(replies) < len(messages):
                chunk = await client.receive_some()
                assert chunk, "server closed early"
                buf += chunk
                while len(buf) >= 2 and len(buf) >= 2 + struct.unpack("!H", buf[:2])[0]:
                    n = struct.unpack("!H", buf[:2])[0]
                    msg, buf = buf[2:2 + n], buf[2 + n:]
                    replies[struct.unpack("!H", msg[:2])[0]] = msg
        await client.send_eof()
        with trio.fail_after(timeout):
            assert await client.receive_some() == b""  # server closes after EOF
    return replies


# -- forwarding ----------------------------------------------------------------------


def test_forward_keeps_ttl_and_id_and_local_answers_stay_local():
    async def main():
        async with trio.open_nursery() as nursery:
            up = await nursery.start(FakeUpstream({"known.example": "10.1.1.1"}).run)
            svc = service(Upstreams([up.addr]))
            r = DNSRecord.parse(await svc.handle_udp(query("known.example", qid=999), ("192.168.127.2", 5555)))
            assert r.header.id == 999 and r.header.rcode == RCODE.NOERROR
            assert [(str(x.rdata), x.ttl) for x in r.rr] == [("10.1.1.1", 1234)]
            r = DNSRecord.parse(await svc.handle_udp(query("missing.example"), None))
            assert r.header.rcode == RCODE.NXDOMAIN  # upstream's NXDOMAIN passes through
            n = up.udp_queries
            r = DNSRecord.parse(await svc.handle_udp(query("host.rancher-desktop.internal"), None))
            assert str(r.rr[0].rdata) == "192.168.127.254" and up.udp_queries == n
            assert svc.stats["forwarded"] == 2 and svc.stats["local"] == 1 and svc.stats["queries"] == 3
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_big_answer_truncated_over_udp_and_full_over_tcp():
    async def main():
        async with trio.open_nursery() as nursery:
            up = await nursery.start(FakeUpstream({}).run)
            svc = service(Upstreams([up.addr]))
            # plain UDP client (512): forwarder fetches the full answer over TCP, we truncate
            out = await svc.handle_udp(query("big.example", "TXT"), None)
            assert len(out) <= 512
            r = DNSRecord.parse(out)
            assert r.header.tc == 1 and r.rr == [] and r.header.id == 4321
            assert up.tcp_queries == 1 and svc.stats["truncated"] == 1
            # the client retries over TCP: the full answer
            replies = await tcp_exchange(svc, [query("big.example", "TXT", qid=7)])
            full = replies[7]
            assert len(full) > 3000
            r = DNSRecord.parse(full)
            assert r.header.tc == 0 and [str(x.rdata).strip('"') for x in r.rr] == BIG_TXT
            assert r.rr[0].ttl == 77
            # an EDNS0 client that accepts 4096 bytes gets it all over UDP
            r = DNSRecord.parse(await svc.handle_udp(query("big.example", "TXT", edns=4096), None))
            assert r.header.tc == 0 and len(r.rr) == len(BIG_TXT)
            # ... and one that accepts 1232 gets TC with its OPT echoed by upstream
            r = DNSRecord.parse(await svc.handle_udp(query("big.example", "TXT", edns=1232), None))
            assert r.header.tc == 1 and r.rr == []
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_upstream_down_is_servfail_without_waiting_for_a_timeout():
    # closed port: the ICMP unreachable fails the exchange at once.  The timeouts are far
    # longer than the test could take: a SERVFAIL that waited for them says "timeout".
    async def main():
        port = closed_udp_port()
        svc = service(Upstreams([("127.0.0.1", port)]), timeout_per_server=30, total_timeout=30)
        r = DNSRecord.parse(await svc.handle_udp(query("known.example", qid=55), None))
        assert r.header.rcode == RCODE.SERVFAIL and r.header.id == 55
        assert str(r.q.qname) == "known.example."
        with pytest.raises(UpstreamError) as err:
            await forward(query("known.example"), [("127.0.0.1", port)], timeout_per_server=30, total_timeout=30)
        assert "refused" in str(err.value).lower() and "timeout" not in str(err.value)

    trio.run(main)


def test_silent_upstreams_servfail_at_the_total_timeout():
    # Nobody ever answers, so every wait ends on the clock: virtual time, exact bounds.
    async def main():
        async with trio.open_nursery() as nursery:
            mute = await nursery.start(FakeUpstream({}, silent=True).run)
            mute2 = await nursery.start(FakeUpstream({}, silent=True).run)
            svc = service(Upstreams([mute.addr, mute2.addr, mute.addr]), timeout_per_server=1.0, total_timeout=2.5)
            t0 = trio.current_time()
            r = DNSRecord.parse(await svc.handle_udp(query("known.example"), None))
            # 1 s for each of the first two, the third cut short by the total bound
            assert r.header.rcode == RCODE.SERVFAIL and trio.current_time() - t0 == pytest.approx(2.5)
            assert svc.stats["servfail"] == 1
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_next_server_on_timeout_and_on_servfail():
    async def main():
        async with trio.open_nursery() as nursery:
            mute = await nursery.start(FakeUpstream({}, silent=True).run)
            good = await nursery.start(FakeUpstream({"known.example": "10.2.2.2", "servfail.example": "1.1.1.1"}).run)
            # Only the per-server timeout can move on from the mute server: without it the
            # forwarder would sit there for the whole total_timeout and then fail.
            out = await forward(query("known.example"), [mute.addr, good.addr], timeout_per_server=0.3, total_timeout=30)
            assert DNSRecord.parse(out).rr[0].rdata == dnslib.A("10.2.2.2")
            with trio.fail_after(5):
                await mute.asked.wait()  # it was asked first (and never answered)
            assert good.udp_queries == 1
            # SERVFAIL from every server is passed through (it is still not NXDOMAIN)
            out = await forward(query("servfail.example"), [good.addr, good.addr])
            assert DNSRecord.parse(out).header.rcode == RCODE.SERVFAIL and good.udp_queries == 3
            with pytest.raises(UpstreamError, match="no upstream"):
                await forward(query("x.example"), [])
            with pytest.raises(UpstreamError, match="refusing"):
                await forward(b"\x00", [good.addr])
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_resolv_conf_change_is_followed_without_restart(tmp_path):
    path = tmp_path / "resolv.conf"
    now = [0.0]  # Upstreams' clock: only the re-check rate limit reads it

    async def main():
        async with trio.open_nursery() as nursery:
            a = await nursery.start(FakeUpstream({"switch.example": "10.0.0.1"}).run)
            b = await nursery.start(FakeUpstream({"switch.example": "10.0.0.2"}).run)
            path.write_text(f"search first.example\nnameserver 127.0.0.1:{a.port}\n")
            upstreams = Upstreams(resolv_conf=path, recheck_interval=0.25, clock=lambda: now[0])
            svc = service(upstreams)

            async def answer():
                r = DNSRecord.parse(await svc.handle_udp(query("switch.example"), None))
                return str(r.rr[0].rdata)

            assert await answer() == "10.0.0.1"
            assert svc.search_domains() == ["first.example"]
            # a VPN rewrites the file (same length, so only mtime/inode tell)
            tmp = tmp_path / "resolv.new"
            tmp.write_text(f"search second.example\nnameserver 127.0.0.1:{b.port}\n")
            os.replace(tmp, path)
            now[0] += 0.1  # within recheck_interval of the last check: not even stat'ed
            assert await answer() == "10.0.0.1"
            now[0] += 0.15  # recheck_interval since the last check: the next query sees the new file
            assert await answer() == "10.0.0.2"
            assert svc.search_domains() == ["second.example"]
            # the file vanishing keeps the last known servers
            path.unlink()
            now[0] += 1.0
            assert await answer() == "10.0.0.2"
            assert svc.search_domains() == ["second.example"]
            nursery.cancel_scope.cancel()

    trio.run(main)


def _rewrite(path, text):
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    os.replace(tmp, path)  # a new inode, as a VPN client or resolvconf(8) does it


def test_keep_search_domains_applies_each_change_of_the_resolv_conf(tmp_path):
    path = tmp_path / "resolv.conf"
    path.write_text("search first.example\nnameserver 127.0.0.1\n")
    svc = service(Upstreams(resolv_conf=path))
    clock = trio.testing.MockClock(autojump_threshold=0)

    async def main():
        send, applied = trio.open_memory_channel(100)

        async def quiet_for(seconds):
            with trio.move_on_after(seconds):
                got = await applied.receive()
                pytest.fail(f"apply({got}) without a change of the search line")

        async with trio.open_nursery() as nursery:
            await nursery.start(svc.keep_search_domains, send.send_nowait, 1.0)
            assert applied.receive_nowait() == ["first.example"]  # at once, before started()
            await quiet_for(10)  # unchanged file: no calls
            _rewrite(path, "search second.example other.example\nnameserver 127.0.0.1\n")
            with trio.fail_after(1.5):  # by the next check, at most one interval away (virtual time)
                assert await applied.receive() == ["second.example", "other.example"]
            _rewrite(path, "search second.example other.example\nnameserver 127.0.0.9\n")
            await quiet_for(10)  # only the servers changed: nothing for DHCP
            path.unlink()
            await quiet_for(10)  # a vanished file keeps the last known list
            path.write_text("nameserver 127.0.0.1\n")
            with trio.fail_after(1.5):
                assert await applied.receive() == []  # no search line any more: option 119 goes away
            nursery.cancel_scope.cancel()

    trio.run(main, clock=clock)


def test_keep_search_domains_with_fixed_domains_applies_once_and_returns(tmp_path):
    path = tmp_path / "resolv.conf"
    path.write_text("search from-file.example\nnameserver 127.0.0.1\n")
    svc = service(Upstreams(resolv_conf=path), search=["fixed.example"])
    calls = []

    async def main():
        with trio.fail_after(1):  # virtual: returns without ever sleeping
            await svc.keep_search_domains(calls.append, 1.0)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert calls == [["fixed.example"]]


# -- TCP ---------------------------------------------------------------------------


def test_serve_stream_pipelined_queries_and_formerr():
    async def main():
        svc = service(Upstreams([]))
        msgs = [
            query("host.docker.internal", qid=1),
            query("gateway.rancher-desktop.internal", "AAAA", qid=2),
            query("elsewhere.example", qid=3),  # no upstreams -> SERVFAIL
            b"\x00\x04\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07garbage",  # malformed
        ]
        replies = await tcp_exchange(svc, msgs)
        assert str(DNSRecord.parse(replies[1]).rr[0].rdata) == "192.168.127.254"
        r2 = DNSRecord.parse(replies[2])
        assert r2.header.rcode == RCODE.NOERROR and r2.rr == []
        assert DNSRecord.parse(replies[3]).header.rcode == RCODE.SERVFAIL
        assert DNSRecord.parse(replies[4]).header.rcode == RCODE.FORMERR
        assert svc.stats["tcp"] == 4 and svc.stats["tcp_connections"] == 1

    trio.run(main)


def test_serve_stream_idle_timeout_closes():
    async def main():
        svc = service(Upstreams([]), tcp_idle_timeout=0.2)
        client, server = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(svc.serve_stream, server)
            await client.send_all(b"\x00")  # half a length prefix, then silence
            t0 = trio.current_time()
            with trio.fail_after(2):
                assert await client.receive_some() == b""
            assert trio.current_time() - t0 == pytest.approx(0.2)  # virtual time: exactly the idle timeout

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_serve_stream_peer_reset_does_not_raise():
    async def main():
        svc = service(Upstreams([]))
        client, server = trio.testing.memory_stream_pair()
        msg = query("host.docker.internal")
        await client.send_all(struct.pack("!H", len(msg)) + msg)
        await client.aclose()
        with trio.fail_after(2):
            await svc.serve_stream(server)  # returns quietly

    trio.run(main)


def test_real_loopback_udp_and_tcp():
    async def main():
        async with trio.open_nursery() as nursery:
            up = await nursery.start(FakeUpstream({"known.example": "10.1.1.1"}).run)
            svc = service(Upstreams([up.addr]))
            usock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
            await usock.bind(("127.0.0.1", 0))
            await nursery.start(svc.serve_udp_socket, usock)
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            await nursery.start(trio.serve_listeners, svc.serve_stream, listeners)
            uaddr = usock.getsockname()
            taddr = listeners[0].socket.getsockname()
            for name, want in [("known.example", "10.1.1.1"), ("gateway.docker.internal", "192.168.127.1")]:
                with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as c:
                    await c.connect(uaddr)
                    await c.send(query(name))
                    with trio.fail_after(3):
                        r = DNSRecord.parse(await c.recv(65535))
                    assert str(r.rr[0].rdata) == want
                stream = await trio.open_tcp_stream(*taddr)
                async with stream:
                    m = query(name, qid=9)
                    await stream.send_all(struct.pack("!H", len(m)) + m)
                    buf = b""
                    with trio.fail_after(3):
                        while len(buf) < 2 or len(buf) < 2 + struct.unpack("!H", buf[:2])[0]:
                            chunk = await stream.receive_some()
                            assert chunk
                            buf += chunk
                    assert str(DNSRecord.parse(buf[2:]).rr[0].rdata) == want
            nursery.cancel_scope.cancel()

    trio.run(main)


# -- malformed input -------------------------------------------------------------------


MALFORMED_SVC = service(Upstreams([]))


def _mangle(data: bytes, cut: int, flips: list) -> bytes:
    b = bytearray(data[: max(0, min(cut, len(data)))] if cut >= 0 else data)
    for pos, val in flips:
        if b:
            b[pos % len(b)] = val
    return bytes(b)


malformed = st.one_of(
    st.binary(max_size=300),
    st.builds(
        _mangle,
        st.sampled_from([query("host.docker.internal"), query("example.com", "AAAA", edns=4096), query("254.127.168.192.in-addr.arpa", "PTR")]),
        st.integers(-1, 80),
        st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=4),
    ),
)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(malformed)
def test_malformed_queries_get_formerr_or_are_dropped(data):
    reply = trio.run(MALFORMED_SVC.handle_udp, data, ("192.168.127.2", 1234))
    if reply is None:
        return
    assert len(reply) >= 12 and reply[:2] == data[:2] and reply[2] & 0x80  # a response to this ID
    assert len(reply) <= 512 or reply is None
    try:
        DNSRecord.parse(data)
        parsed = True
    except Exception:
        parsed = False
    if not parsed:
        assert reply[3] & 0x0F == RCODE.FORMERR


def test_good_query_after_malformed_flood():
    import random
    rnd = random.Random(1)
    svc = service(Upstreams([]))

    async def main():
        for _ in range(1000):
            await svc.handle_udp(bytes(rnd.randrange(256) for _ in range(rnd.randrange(40))), None)
        r = DNSRecord.parse(await svc.handle_udp(query("host.docker.internal"), None))
        assert str(r.rr[0].rdata) == "192.168.127.254"
        assert svc.stats["formerr"] + svc.stats["dropped"] > 500

    trio.run(main)


def test_response_and_unknown_opcode():
    async def main():
        svc = service(Upstreams([]))
        q = DNSRecord.question("host.docker.internal")
        q.header.qr = 1
        assert await svc.handle_udp(q.pack(), None) is None
        q = DNSRecord.question("host.docker.internal")
        q.header.opcode = 4  # NOTIFY
        assert DNSRecord.parse(await svc.handle_udp(q.pack(), None)).header.rcode == RCODE.NOTIMP
        q = DNSRecord.question("host.docker.internal")
        q.add_question(dnslib.DNSQuestion("gateway.docker.internal"))
        assert DNSRecord.parse(await svc.handle_udp(q.pack(), None)).header.rcode == RCODE.FORMERR

    trio.run(main)


# -- flags and management ---------------------------------------------------------------


def parse(argv):
    p = argparse.ArgumentParser()
    dns_server.add_arguments(p)
    return p.parse_args(argv)


def test_from_args(tmp_path):
    zf = tmp_path / "zones.json"
    zf.write_text('{"zones": [{"name": "corp.test", "records": {"db": "10.0.0.1"}}]}')
    rc = tmp_path / "resolv.conf"
    rc.write_text("search a.example b.example\nnameserver 127.0.0.1\n")
    args = parse(["--dns-ttl", "120", "--dns-zone-file", str(zf), "--dns-record", "foo.rancher-desktop.internal=10.0.0.5",
                  "--dns-resolv-conf", str(rc)])
    svc = dns_server.from_args(args, NET)
    assert svc.search_domains() == ["a.example", "b.example"]
    assert svc.upstreams.current() == [("127.0.0.1", 53)]

    async def main():
        r = DNSRecord.parse(await svc.handle_udp(query("foo.rancher-desktop.internal"), None))
        assert str(r.rr[0].rdata) == "10.0.0.5" and r.rr[0].ttl == 120
        r = DNSRecord.parse(await svc.handle_udp(query("db.corp.test"), None))
        assert str(r.rr[0].rdata) == "10.0.0.1"

    trio.run(main)
    names = [z["name"] for z in svc.all_zones()]
    assert names == ["rancher-desktop.internal.", "docker.internal.", "corp.test."]
    assert svc.all_zones()[0]["records"]["foo"] == "10.0.0.5"
    z = svc.add_record("docker.internal", "new", "10.0.0.9")
    assert z["records"]["new"] == "10.0.0.9"
    with pytest.raises(ConfigError, match="IPv4"):
        svc.add_record("docker.internal", "bad", "nope")

    args = parse(["--dns-upstream", "127.0.0.1:5353", "--dns-upstream", "[::1]", "--dns-search", "X.Example."])
    svc = dns_server.from_args(args, NET)
    assert svc.upstreams.current() == [("127.0.0.1", 5353), ("::1", 53)]
    assert svc.search_domains() == ["x.example"]


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["--dns-upstream", "nope"], "DNS server"),
        (["--dns-record", "foo"], "NAME=IP"),
        (["--dns-ttl", "0"], "TTL"),
        (["--dns-zone-file", "/nonexistent/zones.json"], "cannot read"),
        (["--dns-search", "bad..name"], "label"),
    ],
)
def test_from_args_errors(argv, msg):
    with pytest.raises(ConfigError, match=msg):
        dns_server.from_args(parse(argv), NET)


def test_fixed_upstreams_still_take_search_domains_from_resolv_conf(tmp_path):
    rc = tmp_path / "resolv.conf"
    rc.write_text("search corp.example\nnameserver 127.0.0.9\n")
    svc = dns_server.from_args(parse(["--dns-upstream", "127.0.0.1:5353", "--dns-resolv-conf", str(rc)]), NET)
    assert svc.upstreams.current() == [("127.0.0.1", 5353)]
    assert svc.search_domains() == ["corp.example"]
    svc = dns_server.from_args(parse(["--dns-resolv-conf", str(tmp_path / "missing")]), NET)
    assert svc.upstreams.current() == [] and svc.search_domains() == []


def test_a_lost_datagram_is_retried_not_servfailed():
    async def main():
        async with trio.open_nursery() as nursery:
            lossy = await nursery.start(FakeUpstream({"known.example": "10.3.3.3"}, drop_first=1).run)
            out = await forward(query("known.example"), [lossy.addr], timeout_per_server=0.4, total_timeout=2.0)
            assert DNSRecord.parse(out).rr[0].rdata == dnslib.A("10.3.3.3")
            assert lossy.udp_queries == 2
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_truncated_answer_kept_when_upstream_has_no_tcp():
    async def main():
        async with trio.open_nursery() as nursery:
            no_tcp = await nursery.start(FakeUpstream({}, tcp=False).run)
            out = await forward(query("big.example", "TXT"), [no_tcp.addr], timeout_per_server=0.5)
            assert DNSRecord.parse(out).header.tc == 1  # the client can still retry over TCP itself
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_tcp_client_that_never_reads_is_dropped():
    async def main():
        svc = dns_server.DnsService(DnsAuthority(builtin_zones(NET)), Upstreams([]), tcp_idle_timeout=0.5,
                                     tcp_max_inflight=2)
        client, server = trio.testing.lockstep_stream_pair()  # no buffering: replies block until read
        msg = query("host.rancher-desktop.internal")
        framed = (struct.pack("!H", len(msg)) + msg) * 8
        with trio.fail_after(5):  # virtual time: a few idle timeouts, not forever
            async with trio.open_nursery() as nursery:
                nursery.start_soon(svc.serve_stream, server)
                with trio.move_on_after(0.2):
                    await client.send_all(framed)  # the server stops reading once its replies block
        # serve_stream returned by itself within the bound: nothing left running for this client

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
