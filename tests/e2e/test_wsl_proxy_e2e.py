"""wsl-proxy end to end: the real process, a namespace holding the upstream
address behind a veth (like network-setup's veth-rd-ns with 192.168.143.1), servers
inside it, curl and sockets against 127.0.0.1 / ::1 and the other host IPs a mapping gives."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import nsutil

ROOT = Path(__file__).resolve().parents[2]
PYTHON = str(ROOT / ".venv" / "bin" / "python")
# The namespace's address: in production 192.168.143.1 (the proxy's default); here a /24 of the
# benchmarking range unique to this run, so no network of the host is ever touched.
PREFIX = nsutil.unique_prefix()
UPSTREAM = f"{PREFIX}.2"

# TCP echo + UDP echo, run inside the namespace (a test fixture; threads are fine here)
ECHO_SERVER = r"""
import socket, sys, threading
host, tport, uport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def handle(c):
    with c:
        while True:
            d = c.recv(65536)
            if not d:
                c.shutdown(socket.SHUT_WR)
                return
            c.sendall(d)
def tcp():
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, tport)); s.listen(128)
    while True:
        c, _ = s.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()
def udp():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind((host, uport))
    while True:
        d, a = u.recvfrom(65536)
        u.sendto(d.upper(), a)
threading.Thread(target=udp, daemon=True).start()
tcp()
"""


def free_port(kind=socket.SOCK_STREAM) -> int:
    """A port free on 127.0.0.1 and ::1 in our namespace."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket(socket.AF_INET6, kind) as s6:
                s6.bind(("::1", port))
        except OSError as exc:
            if "in use" in str(exc):
                continue
        return port
    raise RuntimeError("no free port")


def _connectable(host, port):
    try:
        socket.create_connection((host, port), timeout=0.5).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def upstream():
    """A namespace holding UPSTREAM behind a veth; HTTP, TCP echo and UDP echo servers in it."""
    http_port, echo_port, udp_port = free_port(), free_port(), free_port(socket.SOCK_DGRAM)
    with nsutil.netns("rdwp") as ns, nsutil.veth_pair(ns, f"{PREFIX}.1/24", f"{UPSTREAM}/24"):
        procs = []
        try:
            procs.append(subprocess.Popen(nsutil.ns_cmd(ns, [sys.executable, "-m", "http.server", "--bind", UPSTREAM, str(http_port)]),
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT))
            procs.append(subprocess.Popen(nsutil.ns_cmd(ns, [sys.executable, "-c", ECHO_SERVER, UPSTREAM, str(echo_port), str(udp_port)]),
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            nsutil.wait_for(lambda: _connectable(UPSTREAM, http_port) and _connectable(UPSTREAM, echo_port), what="servers in the namespace")
            yield {"ns": ns, "http": http_port, "echo": echo_port, "udp": udp_port}
        finally:
            for p in procs:
                p.kill()
                p.wait(5)


class ProxyProc:
    def __init__(self, tmp: Path, extra=()):
        self.sock = tmp / "wsl-proxy.sock"
        self.log = tmp / "wsl-proxy.log"
        self.proc = subprocess.Popen([PYTHON, "-m", "rdswitch.wsl_proxy", "-socketFile", str(self.sock), "-logfile", str(self.log), *extra],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)

    def send(self, mapping) -> None:
        """Send one message; returns once the proxy has applied it and closed."""
        data = mapping if isinstance(mapping, bytes) else json.dumps(mapping).encode()
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(self.sock))
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            for _ in range(100):
                if not s.recv(4096):
                    break

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def fds(self) -> int:
        return nsutil.fd_count(self.proc.pid)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        with contextlib.suppress(Exception):
            self.proc.stderr.close()


@pytest.fixture
def proxy(tmp_path):
    # a stale socket file left by a dead proxy must be replaced
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "wsl-proxy.sock"))
    stale.close()
    p = ProxyProc(tmp_path, extra=["-upstreamAddress", UPSTREAM, "--udp-idle-timeout", "0.5"])
    try:
        nsutil.wait_for(lambda: p.proc.poll() is not None or "listening on" in p.log_text(), what="proxy start")
        assert p.proc.poll() is None, p.proc.stderr.read().decode()
        yield p
    finally:
        p.stop()


def tcp_mapping(port, remove=False, proto="tcp"):
    return {"remove": remove, "ports": {f"80/{proto}": [{"HostIp": "0.0.0.0", "HostPort": str(port)}, {"HostIp": "::", "HostPort": str(port)}]}}


def curl(url):
    return subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", url],
                          capture_output=True, text=True, timeout=10)


def echo_once(port, payload=b"x", host="127.0.0.1"):
    with socket.create_connection((host, port), timeout=5) as c:
        c.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = c.recv(65536)
            assert chunk, "proxy closed the connection early"
            got += chunk
        return got


def wait_closed(conn: socket.socket, timeout=5) -> bool:
    """True once the peer closed (EOF or reset) within ``timeout``."""
    conn.settimeout(timeout)
    try:
        return conn.recv(100) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_forward_then_remove(proxy, upstream):
    assert stat.S_IMODE(os.stat(proxy.sock).st_mode) == 0o600
    hp, ep = upstream["http"], upstream["echo"]
    assert curl(f"http://127.0.0.1:{hp}/").stdout == "000"  # not forwarded yet
    proxy.send(tcp_mapping(hp))
    proxy.send(tcp_mapping(ep))
    assert curl(f"http://127.0.0.1:{hp}/").stdout == "200"
    assert curl(f"http://[::1]:{hp}/").stdout == "200"
    assert echo_once(ep, b"hello" * 10000) == b"hello" * 10000

    open_conn = socket.create_connection(("127.0.0.1", ep), timeout=5)
    try:
        open_conn.sendall(b"ping")
        assert open_conn.recv(10) == b"ping"
        proxy.send(tcp_mapping(ep, remove=True))
        proxy.send(tcp_mapping(hp, remove=True))
        assert wait_closed(open_conn), "open connection survived the remove"
    finally:
        open_conn.close()
    r = curl(f"http://127.0.0.1:{hp}/")
    assert r.returncode == 7 and r.stdout == "000"  # curl: couldn't connect (refused)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", ep), timeout=5)
    assert "stopped forwarding" in proxy.log_text()


def test_no_fd_leak_over_1000_connections(proxy, upstream):
    ep, up = upstream["echo"], upstream["udp"]
    refused = free_port()  # nothing listens there in the namespace
    proxy.send(tcp_mapping(ep))
    proxy.send(tcp_mapping(refused))
    proxy.send(tcp_mapping(up, proto="udp"))
    for _ in range(5):
        assert echo_once(ep) == b"x"
    # the proxy has closed both sockets of those connections: only its listeners are left
    nsutil.wait_for(lambda: {state for state, _l, _r in nsutil.tcp_sockets(proxy.proc.pid)} == {"LISTEN"}, 10,
                    what="the proxy closing its finished connections")
    baseline = proxy.fds()

    for i in range(1000):
        assert echo_once(ep, b"%d" % i) == b"%d" % i
    # upstream refusing: each client is closed and nothing stays open
    for _ in range(100):
        with socket.create_connection(("127.0.0.1", refused), timeout=5) as c:
            assert wait_closed(c)
    # UDP flows idle out (0.5 s here) and close their upstream sockets
    for i in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.settimeout(5)
            u.sendto(b"dns%d" % i, ("127.0.0.1", up))
            assert u.recv(100) == b"DNS%d" % i
    assert proxy.fds() > baseline  # the UDP flows are open right now: the count can move

    nsutil.wait_for(lambda: proxy.fds() <= baseline, timeout=10, what=f"fd count back to {baseline} (now {proxy.fds()})")
    assert echo_once(ep) == b"x"


def test_bad_input_does_not_disturb_a_forward(proxy, upstream):
    ep = upstream["echo"]
    proxy.send(tcp_mapping(ep))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        busy_port = busy.getsockname()[1]
        proxy.send(b"{this is not json")
        proxy.send(b'{"ports": {"80/sctp": [{"HostPort": "9"}]}}')
        proxy.send(b'{"ports": {"80/tcp": [{"HostPort": "70000"}]}}')
        proxy.send(tcp_mapping(busy_port))
        proxy.send(tcp_mapping(ep))  # re-adding is idempotent
        assert echo_once(ep, b"still here") == b"still here"
    log = proxy.log_text()
    assert "rejected port mapping: invalid JSON" in log
    assert "unknown protocol 'sctp'" in log
    assert "70000 is out of range" in log
    assert f"port {busy_port}/tcp is already in use on 0.0.0.0" in log
    assert log.count(f"forwarding {ep}/tcp on 0.0.0.0") == 1
    assert proxy.proc.poll() is None


def test_sigterm_closes_everything_and_removes_the_socket(proxy, upstream):
    ep, up = upstream["echo"], upstream["udp"]
    proxy.send(tcp_mapping(ep))
    proxy.send(tcp_mapping(up, proto="udp"))
    conn = socket.create_connection(("127.0.0.1", ep), timeout=5)
    try:
        conn.sendall(b"a")
        assert conn.recv(10) == b"a"
        proxy.proc.send_signal(signal.SIGTERM)
        assert proxy.proc.wait(10) == 0
        assert wait_closed(conn)
    finally:
        conn.close()
    assert not proxy.sock.exists()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", ep), timeout=5)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:  # the UDP port is free again
        u.bind(("127.0.0.1", up))
    assert "received SIGTERM" in proxy.log_text()


def test_refuses_to_replace_a_file_that_is_not_a_socket(tmp_path):
    (tmp_path / "wsl-proxy.sock").write_text("precious")
    p = ProxyProc(tmp_path)
    try:
        assert p.proc.wait(10) == 1
        assert "is not a socket; refusing to replace it" in p.proc.stderr.read().decode()
        assert (tmp_path / "wsl-proxy.sock").read_text() == "precious"
    finally:
        p.stop()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_host_ip_is_bound_as_given(proxy, upstream):
    """HostIp 127.0.0.1 listens there only; "" (or 0.0.0.0) listens on every address, here 127.0.0.5 too."""
    ep, hp = upstream["echo"], upstream["http"]
    proxy.send({"ports": {"80/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(ep)}]}})
    proxy.send({"ports": {"80/tcp": [{"HostIp": "", "HostPort": str(hp)}]}})
    assert echo_once(ep, b"loop") == b"loop"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.5", ep), timeout=5)
    assert curl(f"http://127.0.0.5:{hp}/").stdout == "200"
    assert curl(f"http://[::1]:{hp}/").stdout == "200"
    log = proxy.log_text()
    assert f"forwarding {ep}/tcp on 127.0.0.1 to {UPSTREAM}:{ep}" in log
    assert f"forwarding {hp}/tcp on 0.0.0.0, :: to {UPSTREAM}:{hp}" in log or \
        f"forwarding {hp}/tcp on 0.0.0.0 to {UPSTREAM}:{hp}" in log  # a host without IPv6


def test_udp_flood_keeps_memory_bounded(tmp_path, upstream):
    """50 000 datagrams from 400 client sockets at a published UDP port: the flows stay within
    --udp-max-flows, the proxy's memory grows by a few MiB at most, and the port still echoes."""
    up = upstream["udp"]
    p = ProxyProc(tmp_path, extra=["-upstreamAddress", UPSTREAM, "--udp-max-flows", "32", "-udpBuffer", str(1 << 20)])
    try:
        nsutil.wait_for(lambda: p.proc.poll() is not None or "listening on" in p.log_text(), what="proxy start")
        p.send(tcp_mapping(up, proto="udp"))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.settimeout(5)
            u.sendto(b"warm", ("127.0.0.1", up))
            assert u.recv(100) == b"WARM"
        before = rss_kib(p.proc.pid)
        clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(400)]
        try:
            for c in clients:
                c.setblocking(False)
            payload = b"f" * 1200
            sent = 0
            for i in range(50_000):
                try:
                    clients[i % len(clients)].sendto(payload, ("127.0.0.1", up))
                    sent += 1
                except BlockingIOError:
                    pass
        finally:
            for c in clients:
                c.close()
        assert sent > 10_000
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:  # still answers after the flood
            u.settimeout(5)
            nsutil.wait_for(lambda: (u.sendto(b"after", ("127.0.0.1", up)), _recv_or_none(u))[1] == b"AFTER", 20,
                            what="an echo after the flood")
        grown = rss_kib(p.proc.pid) - before
        assert grown < 24 * 1024, f"RSS grew by {grown} KiB"
        assert nsutil.fd_count(p.proc.pid) < 32 + 40  # the flows' upstream sockets stay within --udp-max-flows
    finally:
        p.stop()


def _recv_or_none(u: socket.socket):
    u.settimeout(0.5)
    try:
        return u.recv(100)
    except socket.timeout:
        return None
