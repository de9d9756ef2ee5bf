"""``rdswitch gvproxy`` as podman machine runs gvproxy: the real command lines, a VM in a namespace on the
qemu socket (vm-switch with the qemu framing), OpenSSH's sshd inside it started here with a throw-away key.

The "VM" has its own mount namespace for sshd (a tmpfs on /run, a passwd with the user ``core``), so
``-forward-dest /run/podman/podman.sock`` is exactly podman's path without touching this machine's /run;
a tiny HTTP server there stands in for podman's API socket.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading

import pytest

import nsutil
from testbed import PY, REPO, free_port, stop

VM_MAC = "5a:94:ef:e4:0c:ee"
VM_IP = "192.168.127.2"
GATEWAY = "192.168.127.1"
SSHD = "/usr/sbin/sshd"

pytestmark = pytest.mark.skipif(not (os.path.exists(SSHD) and shutil.which("ssh")),
                                reason="needs OpenSSH (scripts/setup installs openssh-server and openssh-client)")

FAKE_PODMAN = r"""
import os, socket, sys, threading
path = sys.argv[1]
s = socket.socket(socket.AF_UNIX); s.bind(path); os.chmod(path, 0o777); s.listen(16)
def serve(c):
    with c:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = c.recv(4096)
            if not chunk:
                return
            data += chunk
        body = b"OK" if data.startswith(b"GET /_ping ") else b"podman in the VM"
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

WEB = r"""
import http.server, socketserver, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"web in the VM"
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
socketserver.TCPServer.allow_reuse_address = True
http.server.HTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
"""


def keygen(path: str) -> str:
    nsutil.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "rdswitch-test", "-f", path])
    return path


class Vm:
    """A namespace whose eth0 is vm-switch's tap on gvproxy's qemu socket, with sshd and servers inside."""

    def __init__(self, bed, tmp: str, qemu_sock: str, key: str) -> None:
        self.bed, self.tmp, self.qemu_sock = bed, tmp, qemu_sock
        self.ns = bed.namespace()
        self.log = os.path.join(tmp, "vm-switch.log")
        self.proc: subprocess.Popen | None = None
        self.start_switch()
        self.start_sshd(key)

    def start_switch(self) -> None:
        self.proc = subprocess.Popen(nsutil.ns_cmd(self.ns, [PY, "-m", "rdswitch.vm", "--connect", f"unix://{self.qemu_sock}",
                                                             "--framing", "qemu", "--tap-mac-address", VM_MAC,
                                                             "--logfile", self.log, "--retry-interval", "0.2"]),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
        self.bed._stack.callback(stop, self.proc)

    def kill_switch(self) -> None:
        self.proc.kill()
        self.proc.wait(5)
        nsutil.wait_for(lambda: "eth0" not in self.run(["ip", "-o", "link"]).stdout, 10, what="eth0 gone")

    def start_sshd(self, key: str) -> None:
        t = self.tmp
        hostkey = keygen(os.path.join(t, "hostkey"))
        shutil.copy(key + ".pub", os.path.join(t, "authorized_keys"))
        with open("/etc/passwd") as f:
            passwd = f.read()
        with open(os.path.join(t, "passwd"), "w") as f:  # the VM's user: podman machine's "core"
            f.write(passwd.rstrip("\n") + f"\ncore:x:4242:4242:core:{t}:/bin/sh\n")
        os.chmod(t, 0o755)
        with open(os.path.join(t, "sshd_config"), "w") as f:
            f.write(f"Port 22\nListenAddress 0.0.0.0\nHostKey {hostkey}\nAuthorizedKeysFile {t}/authorized_keys\n"
                    "StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                    "PermitRootLogin no\nAllowStreamLocalForwarding yes\nAllowTcpForwarding yes\nPidFile none\n"
                    "LogLevel VERBOSE\n")
        for name, text in (("fake_podman.py", FAKE_PODMAN), ("web.py", WEB)):
            with open(os.path.join(t, name), "w") as f:
                f.write(text)
        script = (f"mount -t tmpfs tmpfs /run && mkdir -p /run/sshd /run/podman && chmod 755 /run/podman && "
                  f"mount --bind {t}/passwd /etc/passwd && "
                  f"{{ {PY} {t}/fake_podman.py /run/podman/podman.sock & }} && "
                  f"{{ {PY} {t}/web.py 8080 & }} && exec {SSHD} -D -e -f {t}/sshd_config")
        err = open(os.path.join(t, "sshd.log"), "w")
        self.sshd = subprocess.Popen(nsutil.ns_cmd(self.ns, ["unshare", "--mount", "--propagation", "private",
                                                             "sh", "-c", script]),
                                     stdout=err, stderr=err)
        err.close()
        self.bed._stack.callback(stop, self.sshd)
        for port in (22, 8080):
            nsutil.wait_for(lambda: self.sshd.poll() is None and self.run(
                ["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}"], check=False).returncode == 0, 15,
                what=f"port {port} in the VM")

    def run(self, cmd, check=True, timeout=30):
        return nsutil.ns_run(self.ns, cmd, check=check, timeout=timeout)

    def address(self) -> str:
        def lease():
            if self.proc.poll() is not None:
                raise RuntimeError(f"vm-switch exited {self.proc.returncode}")
            out = self.run(["ip", "-4", "-o", "addr", "show", "dev", "eth0"], check=False).stdout.split()
            return out[out.index("inet") + 1] if "inet" in out else None
        return nsutil.wait_for(lease, 20, what="the DHCP lease")


class Gvproxy:
    def __init__(self, bed, argv: list[str], log: str) -> None:
        # every test's host-switch: outbound only to loopback, DNS upstream a closed loopback port
        self.argv = [PY, "-m", "rdswitch", "gvproxy", *argv, "--allow-outbound", "127.0.0.0/8",
                     "--dns-upstream", f"127.0.0.1:{free_port(kind=socket.SOCK_DGRAM)}"]
        self.logfile = log
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
        bed._stack.callback(self.close)

    def log(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            with open(self.logfile) as f:
                return f.read()
        return ""

    def wait_log(self, text: str, count: int = 1, timeout: float = 30) -> str:
        def seen():
            if self.proc.poll() is not None:
                raise RuntimeError(f"gvproxy exited {self.proc.returncode}: {self.proc.stderr.read().decode()}\n{self.log()}")
            return self.log().count(text) >= count
        nsutil.wait_for(seen, timeout, what=f"{text!r} x{count} in the gvproxy log")
        return self.log()

    def close(self) -> None:
        stop(self.proc)
        with contextlib.suppress(Exception):
            self.proc.stderr.close()


def http_get_unix(path: str, url: str) -> tuple[int, bytes]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(f"GET {url} HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n".encode())
        resp = http.client.HTTPResponse(s)
        resp.begin()
        return resp.status, resp.read()


def dig(vm: Vm, name: str) -> str:
    return vm.run(["dig", "+short", "+time=2", "+tries=2", f"@{GATEWAY}", name, "A"]).stdout.strip()


def banner(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        return c.recv(64)


@pytest.fixture
def tmp(bed):
    return bed.tmp


def test_podman_machine_command_line(bed, tmp):
    """The command line podman machine runs, as is (plus the test bed's allow-list and DNS upstream)."""
    key = keygen(os.path.join(tmp, "key"))
    ssh_port = free_port()
    p = {n: os.path.join(tmp, n) for n in ("api.sock", "qemu.sock", "gvproxy.pid", "gvproxy.log", "podman.sock")}
    gv = Gvproxy(bed, ["-listen", f"unix://{p['api.sock']}", "-mtu", "1500", "-ssh-port", str(ssh_port),
                       "-listen-qemu", f"unix://{p['qemu.sock']}", "-pid-file", p["gvproxy.pid"],
                       "-log-file", p["gvproxy.log"], "-forward-sock", p["podman.sock"],
                       "-forward-dest", "/run/podman/podman.sock", "-forward-user", "core",
                       "-forward-identity", key], p["gvproxy.log"])
    gv.wait_log("listening on unix://" + p["qemu.sock"])
    with open(p["gvproxy.pid"]) as f:
        assert f.read() == str(gv.proc.pid)  # the pid file: gvproxy's pid, no newline

    vm = Vm(bed, tmp, p["qemu.sock"], key)
    assert vm.address() == f"{VM_IP}/24"  # the lease: the VM MAC's static .2
    assert banner(ssh_port).startswith(b"SSH-2.0-OpenSSH")  # -ssh-port: 127.0.0.1:N -> the VM's :22
    status, body = http_get_unix(p["api.sock"], "/services/forwarder/all")
    assert status == 200 and {"local": f"127.0.0.1:{ssh_port}", "remote": f"{VM_IP}:22", "protocol": "tcp", "owner": "host"} in json.loads(body)
    assert json.loads(http_get_unix(p["api.sock"], "/leases")[1]) == {VM_IP: VM_MAC}
    assert list(json.loads(http_get_unix(p["api.sock"], "/cam")[1])) == [VM_MAC]
    assert dig(vm, "host.containers.internal") == "192.168.127.254"  # gvproxy's default zones
    assert dig(vm, "gateway.docker.internal") == GATEWAY

    # -forward-sock: the host socket reaches podman's socket in the VM, through OpenSSH both ends
    gv.wait_log(": up", timeout=60)
    assert os.stat(p["podman.sock"]).st_mode & 0o777 == 0o600
    assert http_get_unix(p["podman.sock"], "/_ping") == (200, b"OK")
    assert http_get_unix(p["podman.sock"], "/v4.0.0/libpod/info") == (200, b"podman in the VM")

    # the VM "reboots": its connection ends, it comes back; the forward reconnects by itself
    vm.kill_switch()
    gv.wait_log("the connection to the VM ended")
    vm.start_switch()
    assert vm.address() == f"{VM_IP}/24"
    gv.wait_log(": up", count=2, timeout=60)
    assert http_get_unix(p["podman.sock"], "/_ping") == (200, b"OK")

    gv.proc.send_signal(signal.SIGTERM)
    assert gv.proc.wait(15) == 0
    for name in ("gvproxy.pid", "podman.sock", "qemu.sock", "api.sock"):
        assert not os.path.exists(p[name]), name  # removed at exit
    assert "Traceback" not in gv.log()


CONFIG = """
log-level: debug
stack:
  mtu: 1400
  subnet: 192.168.127.0/24
  gatewayIP: 192.168.127.1
  gatewayMacAddress: 5a:94:ef:e4:0c:dd
  dns:
    - name: apps.test.
      records:
        - name: web
          ip: 10.11.0.5
        - regexp: '^db-[0-9]+$'
          ip: 10.11.0.6
      defaultIP: 10.11.0.9
  dnsSearchDomains: [apps.test]
  forwards:
    127.0.0.1:{web}: 192.168.127.2:8080
  nat:
    192.168.127.254: 127.0.0.1
  gatewayVirtualIPs: [192.168.127.254]
  dhcpStaticLeases:
    192.168.127.2: 5a:94:ef:e4:0c:ee
  colour: blue
forwards:
  - socket: {tmp}/wrong-user.sock
    dest: /run/podman/podman.sock
    user: nosuchuser
    identity: {key}
"""


class NotificationListener:
    def __init__(self, path: str) -> None:
        self.path = path
        self.messages: list[dict] = []
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(path)
        self.sock.listen(16)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with c:
                c.settimeout(5)
                data = b""
                with contextlib.suppress(OSError):
                    while chunk := c.recv(4096):
                        data += chunk
                self.messages.append(json.loads(data))

    def types(self) -> list[str]:
        return [m["notification_type"] for m in self.messages]

    def close(self) -> None:
        self.sock.close()


def test_config_file_and_notifications(bed, tmp):
    key = keygen(os.path.join(tmp, "key"))
    web = free_port()
    cfg = os.path.join(tmp, "gvproxy.yaml")
    with open(cfg, "w") as f:
        f.write(CONFIG.format(web=web, tmp=tmp, key=key))
    qemu, log = os.path.join(tmp, "qemu.sock"), os.path.join(tmp, "gvproxy.log")
    listener = NotificationListener(os.path.join(tmp, "notify.sock"))
    bed._stack.callback(listener.close)
    gv = Gvproxy(bed, ["-config", cfg, "-listen-qemu", f"unix://{qemu}", "-notification", f"unix://{listener.path}",
                       "-log-file", log, "-ssh-port", "2222"], log)
    text = gv.wait_log("listening on unix://" + qemu)
    assert "unknown keys ignored: stack.colour" in text  # a warning naming the key
    assert 'CLI argument "-ssh-port" is unavailable with config file' in text
    nsutil.wait_for(lambda: listener.types()[:1] == ["ready"], 10, what="the ready notification")

    vm = Vm(bed, tmp, qemu, key)
    assert vm.address() == f"{VM_IP}/24"
    nsutil.wait_for(lambda: {"notification_type": "connection_established", "mac_address": VM_MAC} in listener.messages,
                    10, what="connection_established")
    assert vm.run(["ip", "-o", "link", "show", "eth0"]).stdout.split("mtu ")[1].split()[0] == "1400"  # stack.mtu
    # a config forward and a config DNS zone answering
    with socket.create_connection(("127.0.0.1", web), timeout=10) as c:
        c.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert c.makefile("rb").read().endswith(b"web in the VM")
    assert dig(vm, "web.apps.test") == "10.11.0.5"
    assert dig(vm, "db-42.apps.test") == "10.11.0.6"
    assert dig(vm, "anything.apps.test") == "10.11.0.9"
    # no -ssh-port forward with -config (gvproxy's rule): the file's forwards only
    assert f"forwarding 127.0.0.1:{web}/tcp" in gv.log() and "forwarding 127.0.0.1:2222" not in gv.log()

    # a wrong user: one clear line, then quiet retries, and the process goes on
    gv.wait_log("retrying in", count=3, timeout=60)
    refusals = [ln for ln in gv.log().splitlines() if "refused user 'nosuchuser'" in ln]
    errors = [ln for ln in refusals if " ERROR " in ln]
    assert len(errors) == 1 and "Permission denied" in errors[0], refusals
    assert len([ln for ln in refusals if " DEBUG " in ln and "retrying in" in ln]) >= 2, refusals  # quiet retries
    assert gv.proc.poll() is None

    vm.kill_switch()
    nsutil.wait_for(lambda: {"notification_type": "connection_closed", "mac_address": VM_MAC} in listener.messages,
                    10, what="connection_closed")
    assert listener.types().index("ready") == 0
    gv.proc.send_signal(signal.SIGTERM)
    assert gv.proc.wait(15) == 0
    assert not os.path.exists(os.path.join(tmp, "wrong-user.sock"))


def test_missing_notification_listener_never_blocks_the_network(bed, tmp):
    qemu, log = os.path.join(tmp, "qemu.sock"), os.path.join(tmp, "gvproxy.log")
    gv = Gvproxy(bed, ["-listen-qemu", f"unix://{qemu}", "-notification", f"unix://{tmp}/nobody.sock",
                       "-log-file", log, "-ssh-port", "-1"], log)
    gv.wait_log("listening on unix://" + qemu)
    ns = bed.namespace()
    vm = subprocess.Popen(nsutil.ns_cmd(ns, [PY, "-m", "rdswitch.vm", "--connect", f"unix://{qemu}", "--framing", "qemu"]),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    bed._stack.callback(stop, vm)
    nsutil.wait_for(lambda: "inet 192.168.127.2/24" in nsutil.ns_run(ns, ["ip", "-4", "-o", "addr"]).stdout, 20,
                    what="the lease")
    nsutil.ns_run(ns, ["ping", "-c", "1", "-W", "2", GATEWAY])
    gv.wait_log("failed to send notification connection_established")
    assert "failed to send notification ready" in gv.log()
    assert "forwarding 127.0.0.1:2222" not in gv.log()  # -ssh-port -1: no forward


@pytest.mark.parametrize("config,needle", [
    ("stack:\n  mtu: big\n", "stack.mtu: expected an integer, got 'big'"),
    ("stack:\n  dns: {name: x}\n", "stack.dns: expected a list"),
    ("listen: unix:///x\n", "listen: expected a list"),
    ("stack:\n  forwards: [a, b]\n", "stack.forwards: expected a mapping"),
    ("ec2-metadata-access: maybe\n", "ec2-metadata-access: expected true or false"),
    ("stack:\n  dns:\n    - name: z.test.\n      records: [{name: a, ip: nope}]\n", "stack.dns[0]"),
    ("stack: [\n", "not valid YAML"),
])
def test_config_errors_exit_2_with_one_line(tmp_path, config, needle):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(config)
    res = subprocess.run([PY, "-m", "rdswitch", "gvproxy", "-config", str(cfg), "-listen-qemu",
                          f"unix://{tmp_path}/q.sock"], capture_output=True, text=True, timeout=30, cwd=REPO)
    assert res.returncode == 2, res
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "q.sock").exists()


def test_install_launcher(tmp_path):
    d = tmp_path / "helpers"
    res = subprocess.run([PY, "-m", "rdswitch", "gvproxy", "--install", str(d)], capture_output=True, text=True,
                         timeout=30, cwd=REPO)
    assert res.returncode == 0, res
    assert "helper_binaries_dir" in res.stdout
    launcher = d / "gvproxy"
    assert os.access(launcher, os.X_OK)
    out = subprocess.run([str(launcher), "-version"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.startswith("gvproxy version v0.8.9"), out


def test_listen_stdio(bed, tmp):
    """-listen-stdio: the VM's frames on gvproxy's stdin/stdout (here a socketpair whose other end is
    vm-switch's fd 3, in the stdio framing)."""
    ours, theirs = socket.socketpair()
    log = os.path.join(tmp, "gvproxy.log")
    argv = [PY, "-m", "rdswitch", "gvproxy", "-listen-stdio", "accept", "-ssh-port", "-1", "-log-file", log,
            "--allow-outbound", "127.0.0.0/8", "--dns-upstream", f"127.0.0.1:{free_port(kind=socket.SOCK_DGRAM)}"]
    gv = subprocess.Popen(argv, stdin=ours.fileno(), stdout=ours.fileno(), stderr=subprocess.DEVNULL, cwd=REPO)
    bed._stack.callback(stop, gv)
    ns = bed.namespace()
    vm = subprocess.Popen(nsutil.ns_cmd(ns, [PY, "-c", "import os, sys; os.dup2(int(sys.argv[1]), 3); "
                                                 "os.execvp(sys.argv[2], sys.argv[2:])", str(theirs.fileno()),
                                             PY, "-m", "rdswitch.vm", "--tap-mac-address", VM_MAC]),
                          pass_fds=(theirs.fileno(),), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    bed._stack.callback(stop, vm)
    ours.close()
    theirs.close()
    nsutil.wait_for(lambda: f"inet {VM_IP}/24" in nsutil.ns_run(ns, ["ip", "-4", "-o", "addr"]).stdout, 20,
                    what="the lease over stdio")
    nsutil.ns_run(ns, ["ping", "-c", "1", "-W", "2", GATEWAY])
    with open(log) as f:
        assert "serving the VM connection on stdin/stdout" in f.read()
