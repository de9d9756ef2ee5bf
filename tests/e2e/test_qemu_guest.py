"""A real VM: a Linux guest in QEMU whose virtio-net NIC is connected to host-switch.

The guest is Debian's kernel plus a busybox initramfs (scripts/build-guest); its
/init takes a DHCP lease with udhcpc, checks the MTU, pings the gateway and the
.254 host alias, looks names up through the gateway, downloads a file from an
HTTP server on the host's 127.0.0.1 (via .254), uploads it back, and serves one
connection that the test makes through a ``--port-forward``.  It prints what it
saw as ``RDTEST <key> <value>`` lines on the serial console, which the test
reads (and synchronises on), then powers off.

Three ways QEMU connects: ``-netdev stream`` (unix socket, ``--framing qemu``),
``-netdev socket`` (TCP, ``--framing qemu``) and ``-netdev dgram`` (unix
datagrams, ``--framing dgram``).

TCG by default (a nested /dev/kvm can be slower than TCG, or hang);
RDSWITCH_QEMU_ACCEL=kvm picks KVM.  RDSWITCH_GUEST_TIMEOUT bounds each boot (s).
"""

import base64
import hashlib
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

import nsutil
from testbed import free_port, stop

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
QEMU = shutil.which("qemu-system-x86_64")
ACCEL = os.environ.get("RDSWITCH_QEMU_ACCEL", "tcg")
BOOT_TIMEOUT = float(os.environ.get("RDSWITCH_GUEST_TIMEOUT", "240"))
GUEST_MAC = "5a:94:ef:e4:0c:ee"  # the static lease .2
GUEST_IP = "192.168.127.2"
GUEST_PORT = 8080
MTU = 1400  # not QEMU's default 1500: proves the guest took the MTU from our DHCP
UPSTREAM_NAME, UPSTREAM_IP = "known.example", "10.11.12.13"

pytestmark = pytest.mark.timeout(BOOT_TIMEOUT + 420)  # the first test also builds the guest


@pytest.fixture(scope="module")
def guest_image():
    if not QEMU:
        pytest.skip("qemu-system-x86_64 is not installed (scripts/setup installs qemu-system-x86)")
    backends = subprocess.run([QEMU, "-netdev", "help"], capture_output=True, text=True, timeout=30).stdout.split()
    missing = [b for b in ("stream", "socket", "dgram") if b not in backends]
    if missing:
        pytest.skip(f"this QEMU has no -netdev {', '.join(missing)} (needs QEMU 7.2 or later)")
    if ACCEL == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("RDSWITCH_QEMU_ACCEL=kvm but /dev/kvm is not usable")
    res = subprocess.run([os.path.join(REPO, "scripts", "build-guest")], capture_output=True, text=True, timeout=600)
    if res.returncode == 77:
        pytest.skip("no guest kernel/initramfs: " + (res.stderr.strip().splitlines() or ["?"])[-1])
    assert res.returncode == 0, f"scripts/build-guest failed:\n{res.stderr}"
    paths = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
    return paths["kernel"], paths["initrd"]


@pytest.fixture(scope="module")
def fake_upstream():
    port = free_port()
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "fake_dns.py"), "127.0.0.1", str(port), UPSTREAM_IP])
    try:
        def answers():
            if p.poll() is not None:
                raise RuntimeError(f"fake_dns.py exited {p.returncode}")
            return UPSTREAM_IP in subprocess.run(
                ["dig", "@127.0.0.1", "-p", str(port), "+time=1", "+tries=1", "+short", UPSTREAM_NAME],
                capture_output=True, text=True, timeout=10).stdout
        nsutil.wait_for(answers, 15, what="fake DNS")
        yield f"127.0.0.1:{port}"
    finally:
        stop(p)


class HostHttp:
    """An HTTP server on the host's 127.0.0.1: GET /blob, POST /upload (base64) answers its sha256."""

    def __init__(self) -> None:
        self.blob = os.urandom(2 * 1024 * 1024 + 12345)
        self.sha = hashlib.sha256(self.blob).hexdigest()
        self.uploads: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path != "/blob":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(outer.blob)))
                self.end_headers()
                self.wfile.write(outer.blob)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                try:
                    digest = hashlib.sha256(base64.b64decode(body, validate=False)).hexdigest()
                except ValueError:
                    digest = "undecodable"
                outer.uploads.append(digest)
                reply = digest.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def host_http():
    h = HostHttp()
    try:
        yield h
    finally:
        h.close()


class Guest:
    def __init__(self, serial: str, proc: subprocess.Popen, qemu_log: str) -> None:
        self.serial = serial
        self.proc = proc
        self.qemu_log = qemu_log

    def lines(self) -> list[str]:
        try:
            with open(self.serial, "rb") as f:
                text = f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return []
        return [l.strip("\r") for l in text.split("\n")]

    def facts(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for line in self.lines():
            if line.startswith("RDTEST "):
                key, _, rest = line[len("RDTEST "):].partition(" ")
                out.setdefault(key, []).append(rest)
        return out

    def wait_fact(self, key: str, deadline: float) -> str:
        def seen():
            facts = self.facts()
            if key in facts:
                return facts[key][0] or "(empty)"
            if self.proc.poll() is not None:
                raise AssertionError(f"QEMU exited {self.proc.returncode} before the guest said {key!r}:\n{self.tail()}")
            return None
        return nsutil.wait_for(seen, max(0.0, deadline - time.monotonic()), interval=0.1, what=f"guest line RDTEST {key}")

    def tail(self) -> str:
        with open(self.qemu_log, errors="replace") as f:
            qemu = f.read()[-2000:]
        return "--- serial\n" + "\n".join(self.lines()[-60:]) + "\n--- qemu\n" + qemu


def netdev_and_host_args(transport: str, tmp: str, hs_sock: str) -> tuple[list[str], str]:
    """(host-switch extra args, QEMU -netdev value) for a transport; hs_sock is the testbed's unix listener."""
    if transport == "stream":
        return ["--framing", "qemu"], f"stream,id=n0,server=off,addr.type=unix,addr.path={hs_sock}"
    if transport == "socket":
        port = free_port()
        return (["--framing", "qemu", "--listen", f"tcp://127.0.0.1:{port}"],
                f"socket,id=n0,connect=127.0.0.1:{port}")
    if transport == "dgram":
        local = os.path.join(tmp, "qemu-dgram.sock")
        return ["--framing", "dgram"], (f"dgram,id=n0,local.type=unix,local.path={local},"
                                        f"remote.type=unix,remote.path={hs_sock}")
    raise ValueError(transport)


@pytest.mark.parametrize("transport", ["stream", "socket", "dgram"])
def test_linux_guest_over_qemu_netdev(bed, guest_image, fake_upstream, host_http, transport, record_property):
    kernel, initrd = guest_image
    fwd_port = free_port()
    hs_sock = os.path.join(bed.tmp, f"hs{len(bed.hosts)}.sock")  # the name testbed gives the first host-switch
    extra, netdev = netdev_and_host_args(transport, bed.tmp, hs_sock)
    hs = bed.host_switch("--mtu", str(MTU), "--dns-upstream", fake_upstream,
                         "--port-forward", f"127.0.0.1:{fwd_port}={GUEST_IP}:{GUEST_PORT}", *extra)
    assert hs.sock == hs_sock
    url = extra[-1] if transport == "socket" else hs.url
    nsutil.wait_for(lambda: f"listening on {url}" in hs.read_log(), 15, what=f"host-switch listening on {url}")

    serial = os.path.join(bed.tmp, f"serial-{transport}.log")
    qemu_log = os.path.join(bed.tmp, f"qemu-{transport}.log")
    append = (f"console=ttyS0 quiet panic=-1 rdtest.http={host_http.port} rdtest.dns={UPSTREAM_NAME} "
              f"rdtest.listen={GUEST_PORT}")
    cmd = [QEMU, "-accel", ACCEL, "-m", "256M", "-smp", "1", "-nodefaults", "-display", "none", "-monitor", "none",
           "-no-reboot", "-kernel", kernel, "-initrd", initrd, "-append", append, "-serial", f"file:{serial}",
           "-netdev", netdev, "-device", f"virtio-net-pci,netdev=n0,mac={GUEST_MAC},romfile="]
    started = time.monotonic()
    deadline = started + BOOT_TIMEOUT
    with open(qemu_log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    bed._stack.callback(lambda: (proc.kill(), proc.wait(10)) if proc.poll() is None else None)
    guest = Guest(serial, proc, qemu_log)
    try:
        guest.wait_fact("listening", deadline)  # every check before the forward has run
        token = uuid.uuid4().hex
        with socket.create_connection(("127.0.0.1", fwd_port), timeout=30) as s:
            s.sendall(f"hello-{token}\n".encode())
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                reply += chunk
        assert reply.decode() == f"guest-echo:hello-{token}\n"
        guest.wait_fact("done", deadline)
        try:
            proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise AssertionError("the guest did not power off in time")
        wall = time.monotonic() - started
    except BaseException:
        print(guest.tail())
        raise

    facts = guest.facts()
    detail = guest.tail()
    boot = float(facts["boot"][0].split("=")[1])
    done = float(facts["done"][0].split("=")[1])
    record_property("guest_wall_seconds", round(wall, 1))
    print(f"\n{transport}: QEMU ({ACCEL}) ran {wall:.1f}s wall; guest /init started at {boot:.1f}s uptime, "
          f"checks done at {done:.1f}s")
    assert "insmod-failed" not in facts, detail
    assert facts["lease"] == ["rc=0"], detail
    dhcp = facts["dhcp"][0]
    assert dhcp.startswith("bound ip=192.168.127.2 ") and "router=192.168.127.1" in dhcp, detail
    assert "dns=192.168.127.1" in dhcp and f"mtu={MTU}" in dhcp, detail
    assert facts["addr"] == ["192.168.127.2/24"], detail
    assert facts["mtu"] == [str(MTU)], detail
    assert facts["route"][0].startswith("default via 192.168.127.1 dev eth0"), detail
    for key in ("ping-gateway", "ping-host"):
        assert facts[key][0].startswith("rc=0 ") and "2 packets received" in facts[key][0], detail
    internal = "\n".join(facts["dns-internal"])
    assert "host.rancher-desktop.internal" in internal and "Address: 192.168.127.254" in internal, detail
    upstream = "\n".join(facts["dns-upstream"])
    assert UPSTREAM_NAME in upstream and f"Address: {UPSTREAM_IP}" in upstream, detail
    assert facts["download"] == [f"rc=0 sha256={host_http.sha} bytes={len(host_http.blob)}"], detail
    assert facts["upload"] == [f"rc=0 reply={host_http.sha}"], detail
    assert host_http.sha in host_http.uploads
    assert facts["forward"] == ["served"], detail
    log = hs.read_log()
    assert "session started" in log
    if transport == "dgram":
        assert "qemu-dgram.sock" in log  # the link answers QEMU's own datagram socket
