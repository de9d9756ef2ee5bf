"""network-setup end to end: handshake with a real host-switch over unix sockets,
namespace + veth + vm-switch + init under unshare, DHCP and ping through the
gateway, and a complete teardown on SIGTERM or when vm-switch dies.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

import nsutil
import pytest
from testbed import PY, REPO

NS_DIR = "/run/netns"


class NetworkSetup:
    """A network-setup process with unique names; cleans everything up in close()."""

    def __init__(self, tmp: str, host_url: str, *extra: str, hs_sock: str | None = None) -> None:
        self.tmp = tmp
        self.ns = nsutil.unique_name("rdns")
        self.veth_host = nsutil.unique_name("vh")
        self.veth_ns = nsutil.unique_name("vn")
        # veth addresses of our own (the contract's defaults 192.168.1.1/.2 are unit-tested): a host whose
        # LAN is 192.168.1.0/24 must not get a competing route from a test
        self.prefix = nsutil.unique_prefix()
        self.hs_url = f"unix://{hs_sock or os.path.join(tmp, 'hs.sock')}"
        self.pid_file = os.path.join(tmp, "init.pid")
        self.log = os.path.join(tmp, "ns.log")
        self.vm_log = os.path.join(tmp, "vm.log")
        self.args = [PY, "-m", "rdswitch.network_setup", "--debug", "--handshake-listen", self.hs_url,
                     "--host-url", host_url, "--netns", self.ns, "--veth-host-name", self.veth_host,
                     "--veth-ns-name", self.veth_ns, "--veth-host-address", f"{self.prefix}.1/24",
                     "--veth-ns-address", f"{self.prefix}.2/24", "--pid-file", self.pid_file, "--unshare-arg", "sleep 600",
                     "--logfile", self.log, "--vm-switch-logfile", self.vm_log, *extra]
        self.proc: subprocess.Popen | None = None
        self.init_pids: list[int] = []

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)

    def read_log(self) -> str:
        out = []
        for path in (self.log, self.vm_log):
            with contextlib.suppress(FileNotFoundError):
                with open(path) as f:
                    out.append(f"--- {path}\n{f.read()[-4000:]}")
        return "\n".join(out)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"network-setup exited {self.proc.returncode}:\n{self.read_log()}")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        for pid in self.init_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        nsutil.delete_netns(self.ns)
        nsutil.run(["ip", "link", "del", self.veth_host], check=False)


@pytest.fixture
def setup_factory(bed):
    made: list[NetworkSetup] = []

    def make(host_url: str, *extra: str, hs_sock: str | None = None) -> NetworkSetup:
        ns = NetworkSetup(bed.tmp, host_url, *extra, hs_sock=hs_sock)
        made.append(ns)
        return ns

    try:
        yield make
    finally:
        for ns in made:
            ns.close()


def ipv4_of(ns: str, dev: str) -> str | None:
    out = nsutil.ns_run(ns, ["ip", "-4", "-o", "addr", "show", "dev", dev], check=False).stdout.split()
    return out[out.index("inet") + 1] if "inet" in out else None


def host_ipv4_of(dev: str) -> str | None:
    out = nsutil.run(["ip", "-4", "-o", "addr", "show", "dev", dev], check=False).stdout.split()
    return out[out.index("inet") + 1] if "inet" in out else None


def link_exists(dev: str) -> bool:
    return nsutil.run(["ip", "link", "show", dev], check=False).returncode == 0


def proc_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode() for a in f.read().split(b"\0") if a]


def netns_inode(path: str) -> int:
    return os.stat(path).st_ino


def read_pid_file(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def start_and_wait_ready(bed, make, *extra):
    hs = bed.host_switch("--handshake", f"unix://{bed.tmp}/hs.sock")
    ns = make(hs.url, *extra)
    ns.start()

    def has_address():
        ns.check_alive()
        return os.path.exists(os.path.join(NS_DIR, ns.ns)) and ipv4_of(ns.ns, "eth0")

    try:
        addr = nsutil.wait_for(has_address, 30, what="eth0 address from DHCP in the network-setup namespace")
    except TimeoutError:
        raise AssertionError(f"no DHCP address:\n{ns.read_log()}\n{hs.read_log()[-3000:]}") from None
    pid = nsutil.wait_for(lambda: read_pid_file(ns.pid_file), 10, what="init pid file")
    ns.init_pids.append(pid)

    def init_children():
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]

    ns.init_pids += nsutil.wait_for(init_children, 10, what="unshare's child")
    return hs, ns, addr, pid


def test_network_setup_full_cycle(bed, setup_factory):
    hs, ns, addr, init_pid = start_and_wait_ready(bed, setup_factory)
    assert addr == "192.168.127.2/24"
    assert "found the VM" in hs.read_log()

    # the gateway answers through vm-switch and the host-switch
    res = nsutil.ns_run(ns.ns, ["ping", "-c", "2", "-W", "2", "192.168.127.1"], check=False)
    assert res.returncode == 0, res.stdout + res.stderr

    # the veth pair
    assert ipv4_of(ns.ns, ns.veth_ns) == f"{ns.prefix}.2/24"
    assert host_ipv4_of(ns.veth_host) == f"{ns.prefix}.1/24"
    res = nsutil.run(["ping", "-c", "1", "-W", "2", "-I", ns.veth_host, f"{ns.prefix}.2"], check=False)
    assert res.returncode == 0, res.stdout + res.stderr

    # the pid file names unshare, whose child (the "init") runs in the namespace
    assert cmdline(init_pid)[:6] == ["unshare", "--pid", "--mount-proc", "--fork", "--propagation", "slave"]
    assert cmdline(init_pid)[6:] == ["sleep", "600"]
    kids = [p for p in ns.init_pids if p != init_pid]
    assert len(kids) == 1 and cmdline(kids[0]) == ["sleep", "600"]
    ns_ino = netns_inode(os.path.join(NS_DIR, ns.ns))
    assert netns_inode(f"/proc/{kids[0]}/ns/net") == ns_ino
    assert netns_inode(f"/proc/{kids[0]}/ns/pid") != netns_inode("/proc/self/ns/pid")
    assert netns_inode("/proc/self/ns/net") != ns_ino

    # SIGTERM: a clean, complete, quick teardown
    t0 = time.monotonic()
    ns.proc.send_signal(signal.SIGTERM)
    assert ns.proc.wait(10) == 0, ns.read_log()
    assert time.monotonic() - t0 < 8
    assert not os.path.exists(os.path.join(NS_DIR, ns.ns))
    assert not link_exists(ns.veth_host)
    assert not os.path.exists(ns.pid_file)
    for pid in ns.init_pids:
        nsutil.wait_for(lambda: not proc_alive(pid), 5, what=f"pid {pid} to exit")
    nsutil.wait_for(lambda: "session ended" in hs.read_log(), 10, what="host-switch to log the session's end")
    log = ns.read_log()
    assert "removed network namespace" in log and "Traceback" not in log


def test_stale_host_veth_is_removed_at_start(bed, setup_factory):
    """Also: incumbent single-dash flags, and -vm-switch-path naming another vm-switch program."""
    hs = bed.host_switch("--handshake", f"unix://{bed.tmp}/hs.sock")
    marker = os.path.join(bed.tmp, "wrapper-ran")
    wrapper = os.path.join(bed.tmp, "vm-switch-wrapper")
    with open(wrapper, "w") as f:
        f.write(f'#!/bin/sh\necho "$@" > {marker}\nexec {PY} -m rdswitch.vm "$@"\n')
    os.chmod(wrapper, 0o755)
    ns = setup_factory(hs.url, "-vm-switch-path", wrapper, "-tap-interface", "eth9", "-debug=true")
    stale_peer = nsutil.unique_name("vs")
    nsutil.run(["ip", "link", "add", ns.veth_host, "type", "veth", "peer", "name", stale_peer])
    old_index = int(open(f"/sys/class/net/{ns.veth_host}/ifindex").read())
    ns.start()
    # the stale pair goes (both ends), a new host end appears with the new address
    nsutil.wait_for(lambda: ns.check_alive() or not link_exists(stale_peer), 15, what="stale veth removal")

    def fresh():
        ns.check_alive()
        if not link_exists(ns.veth_host):
            return False
        return int(open(f"/sys/class/net/{ns.veth_host}/ifindex").read()) != old_index and host_ipv4_of(ns.veth_host)

    assert nsutil.wait_for(fresh, 20, what="the new host veth") == f"{ns.prefix}.1/24"
    assert "removed stale" in ns.read_log()
    assert nsutil.wait_for(lambda: ns.check_alive() or ipv4_of(ns.ns, "eth9"), 20, what="DHCP on eth9") == "192.168.127.2/24"
    with open(marker) as f:
        assert "--tap-interface eth9" in f.read()
    ns.proc.send_signal(signal.SIGTERM)
    assert ns.proc.wait(10) == 0, ns.read_log()
    assert not link_exists(ns.veth_host)


def test_host_switch_restart_reconnects_without_touching_the_distro(bed, setup_factory):
    """The host-switch going away ends vm-switch (an inherited fd cannot be re-dialled); network-setup
    keeps the namespace and the distro, answers the next handshake and starts a new vm-switch."""
    hs, ns, _addr, init_pid = start_and_wait_ready(bed, setup_factory)
    hs.proc.send_signal(signal.SIGTERM)
    hs.proc.wait(10)
    nsutil.wait_for(lambda: "waiting for the host's handshake again" in ns.read_log(), 15, what="reconnect wait")
    ns.check_alive()
    assert proc_alive(init_pid) and os.path.exists(os.path.join(NS_DIR, ns.ns))
    # the host comes back on the same sockets
    hs2 = subprocess.Popen(hs.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    bed._stack.callback(lambda: (hs2.poll() is None and hs2.kill(), hs2.wait(5)))

    def ping_ok():
        ns.check_alive()
        return nsutil.ns_run(ns.ns, ["ping", "-c", "1", "-W", "1", "192.168.127.1"], check=False).returncode == 0

    nsutil.wait_for(ping_ok, 30, what="networking back through the new host-switch")
    assert proc_alive(init_pid)  # the same distro, never restarted


def test_vm_switch_crash_is_repaired_by_a_new_handshake(bed, setup_factory):
    """vm-switch dying while the host-switch lives: the host looks for the VM again, network-setup
    answers and starts a new vm-switch."""
    hs, ns, _addr, init_pid = start_and_wait_ready(bed, setup_factory)
    vm_switch = [p for p in map(int, nsutil.run(["ip", "netns", "pids", ns.ns]).stdout.split())
                 if "rdswitch.vm" in " ".join(cmdline(p))]
    assert len(vm_switch) == 1
    os.kill(vm_switch[0], signal.SIGKILL)
    nsutil.wait_for(lambda: "looking for the VM again" in hs.read_log(), 15, what="the host's second handshake")

    def ping_ok():
        ns.check_alive()
        return nsutil.ns_run(ns.ns, ["ping", "-c", "1", "-W", "1", "192.168.127.1"], check=False).returncode == 0

    nsutil.wait_for(ping_ok, 30, what="networking back through a new vm-switch")
    assert proc_alive(init_pid)


def test_init_exit_tears_everything_down(bed, setup_factory):
    """The distro's init ending ends network-setup: namespace, veth, pid file and vm-switch go."""
    hs, ns, _addr, init_pid = start_and_wait_ready(bed, setup_factory)
    for pid in ns.init_pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert ns.proc.wait(15) == 1, ns.read_log()
    assert not os.path.exists(os.path.join(NS_DIR, ns.ns))
    assert not link_exists(ns.veth_host)
    assert not os.path.exists(ns.pid_file)
    assert "init (unshare" in ns.read_log() and "shutting down" in ns.read_log()


def test_sigterm_while_waiting_for_the_handshake(bed, setup_factory, tmp_path):
    # no host-switch at all: network-setup waits in the handshake
    ns = setup_factory(f"unix://{tmp_path}/nothing.sock")
    ns.start()
    hs_sock = ns.hs_url[len("unix://"):]
    nsutil.wait_for(lambda: ns.check_alive() or os.path.exists(hs_sock), 15, what="handshake socket")
    ns.proc.send_signal(signal.SIGTERM)
    assert ns.proc.wait(10) == 0, ns.read_log()
    assert not os.path.exists(hs_sock)
    assert not os.path.exists(os.path.join(NS_DIR, ns.ns))
    assert not os.path.exists(ns.pid_file)


def test_host_not_listening_after_ready_is_a_clean_failure(bed, setup_factory, tmp_path):
    """READY arrives but the data URL is dead: a clear error, exit 1, nothing left behind."""
    import socket

    from rdswitch.config import READY, SIGNATURE

    hs_sock = str(tmp_path / "hs.sock")
    ns = setup_factory(f"unix://{tmp_path}/nothing.sock", "--dial-attempts", "2", hs_sock=hs_sock)
    ns.start()
    nsutil.wait_for(lambda: ns.check_alive() or os.path.exists(hs_sock), 15, what="handshake socket")
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(hs_sock)
        got = b""
        for _ in range(10):
            if len(got) >= len(SIGNATURE):
                break
            got += s.recv(64)
        assert got == SIGNATURE
        s.sendall(READY)
    assert ns.proc.wait(15) == 1, ns.read_log()
    log = ns.read_log()
    assert "cannot open the data connection" in log and "Traceback" not in log
    assert not os.path.exists(os.path.join(NS_DIR, ns.ns))
    assert not link_exists(ns.veth_host)


def test_unusable_handshake_url_is_a_clear_error(tmp_path):
    ns_name = nsutil.unique_name("rdns")
    # unique veth names: step 1 removes a stale host veth of that name, and the default
    # (veth-rd0) may be a real Rancher Desktop's on the machine running the tests
    res = subprocess.run([PY, "-m", "rdswitch.network_setup", "--handshake-listen", f"unix://{tmp_path}/no/dir/hs.sock",
                          "--host-url", f"unix://{tmp_path}/no/data.sock", "--netns", ns_name,
                          "--veth-host-name", nsutil.unique_name("vh"), "--veth-ns-name", nsutil.unique_name("vn"),
                          "--logfile", "", "--vm-switch-logfile", "", "--pid-file", ""],
                         capture_output=True, text=True, timeout=30, cwd=REPO)
    try:
        assert res.returncode == 1
        assert "cannot answer the handshake" in res.stderr and "Traceback" not in res.stderr
        assert not os.path.exists(os.path.join(NS_DIR, ns_name))
    finally:
        nsutil.delete_netns(ns_name)


def _dummy(ns: str, cidr: str, name: str | None = None) -> str:
    """An interface in ``ns`` carrying ``cidr``: a dummy, or a veth pair inside ``ns`` on a kernel without
    the dummy driver (this machine's has none)."""
    name = name or nsutil.unique_name("dm")
    res = nsutil.ns_run(ns, ["ip", "link", "add", name, "type", "dummy"], check=False)
    if res.returncode != 0:
        nsutil.ns_run(ns, ["ip", "link", "add", name, "type", "veth", "peer", "name", nsutil.unique_name("dp")])
    nsutil.ns_run(ns, ["ip", "addr", "add", cidr, "dev", name])
    nsutil.ns_run(ns, ["ip", "link", "set", name, "up"])
    return name


def test_veth_subnet_in_use_is_refused_before_anything_is_made(tmp_path):
    """A network of the host on 192.168.143.0/24 (a dummy interface in a test namespace standing in
    for a LAN): network-setup and the sandbox exit 2 with one line naming the route and a free subnet,
    and create nothing; the suggested subnet gets past the check."""
    with nsutil.netns("rdcol") as host:
        lan = _dummy(host, "192.168.143.7/24")
        ns_name = nsutil.unique_name("rdns")
        hs_sock = tmp_path / "hs.sock"
        base = [PY, "-m", "rdswitch.network_setup", "--handshake-listen", f"unix://{hs_sock}",
                "--host-url", f"unix://{tmp_path}/data.sock", "--netns", ns_name, "--logfile", "",
                "--vm-switch-logfile", "", "--pid-file", ""]
        try:
            res = nsutil.ns_run(host, base, check=False, cwd=REPO)
            assert res.returncode == 2, res
            lines = res.stderr.strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
            assert f"overlaps the route 192.168.143.0/24 dev {lan}" in lines[0], lines[0]
            assert "pick a free subnet, e.g. --veth-subnet 192.168.144.0/24" in lines[0], lines[0]
            assert not hs_sock.exists() and not os.path.exists(os.path.join(NS_DIR, ns_name))
            assert "veth-rd-wsl" not in nsutil.ns_run(host, ["ip", "-o", "link"]).stdout

            res = nsutil.ns_run(host, [PY, "-m", "rdswitch", "sandbox", "--", "true"], check=False, cwd=REPO,
                                stdin=subprocess.DEVNULL)
            assert res.returncode == 2, res
            lines = res.stderr.strip().splitlines()
            assert len(lines) == 1 and f"route 192.168.143.0/24 dev {lan}" in lines[0], res.stderr
            assert "--veth-subnet 192.168.144.0/24" in lines[0]

            # the suggestion is free: network-setup goes on to wait for the handshake
            proc = subprocess.Popen(nsutil.ns_cmd(host, [*base, "--veth-subnet", "192.168.144.0/24"]),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
            try:
                nsutil.wait_for(lambda: proc.poll() is not None or hs_sock.exists(), 15, what="handshake socket")
                assert proc.poll() is None, proc.stderr.read().decode()
            finally:
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(15) == 0
                proc.stderr.close()
        finally:
            nsutil.delete_netns(ns_name)


def test_our_own_stale_veth_is_no_collision(tmp_path):
    """A veth-rd-wsl left by a dead network-setup carries the veth subnet: it is not a LAN, it is removed."""
    with nsutil.netns("rdcol") as host:
        nsutil.ns_run(host, ["ip", "link", "add", "veth-rd-wsl", "type", "veth", "peer", "name", "veth-rd-old"])
        nsutil.ns_run(host, ["ip", "addr", "add", "192.168.143.2/24", "dev", "veth-rd-wsl"])
        nsutil.ns_run(host, ["ip", "link", "set", "veth-rd-wsl", "up"])
        hs_sock = tmp_path / "hs.sock"
        ns_name = nsutil.unique_name("rdns")
        proc = subprocess.Popen(nsutil.ns_cmd(host, [PY, "-m", "rdswitch.network_setup", "--handshake-listen",
                                                     f"unix://{hs_sock}", "--host-url", f"unix://{tmp_path}/d.sock",
                                                     "--netns", ns_name, "--logfile", str(tmp_path / "ns.log"),
                                                     "--vm-switch-logfile", "", "--pid-file", ""]),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
        try:
            nsutil.wait_for(lambda: proc.poll() is not None or hs_sock.exists(), 15, what="handshake socket")
            assert proc.poll() is None, (tmp_path / "ns.log").read_text()
            assert "veth-rd-wsl" not in nsutil.ns_run(host, ["ip", "-o", "link"]).stdout  # the stale one is gone
            assert "removed stale veth-rd-wsl" in (tmp_path / "ns.log").read_text()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)
            nsutil.delete_netns(ns_name)
