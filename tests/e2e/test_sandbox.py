"""``python -m rdswitch sandbox`` end to end: the real path (host-switch with --handshake,
network-setup, vm-switch on fd 3, veth-rd-wsl/veth-rd-ns, CMD as pid 1 under unshare), checked
from inside by the command itself, and nothing left afterwards or after a SIGTERM.

Traffic stays on the host's 127.0.0.1 (an HTTP server and a fake DNS upstream of the
test's own) and inside the namespaces the sandbox creates; every sandbox gets a unique
--netns name, and whatever a failed test leaves behind is removed.
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import shutil
import signal
import subprocess
import tempfile
import time

import nsutil
import pytest

from rdswitch.network_setup.children import child_pids
from testbed import PY, REPO, free_port, stop

HERE = os.path.dirname(os.path.abspath(__file__))
STAGES = ("host-switch up", "handshake: done", "data connection: open", "namespace: ", "lease: eth0", "init: ")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@pytest.fixture
def fake_dns():
    port = free_port()
    p = subprocess.Popen([PY, os.path.join(HERE, "fake_dns.py"), "127.0.0.1", str(port), "10.20.30.40"])
    try:
        nsutil.wait_for(lambda: subprocess.run(["dig", "@127.0.0.1", "-p", str(port), "+time=1", "+tries=1", "+short",
                                                "known.example"], capture_output=True, text=True).stdout.strip(),
                        10, what="fake DNS")
        yield f"127.0.0.1:{port}"
    finally:
        stop(p)


@pytest.fixture
def http_server():
    """An HTTP server on the host's 127.0.0.1 serving one file with a token; yields (port, token)."""
    docroot = tempfile.mkdtemp(prefix="rdt-www-")
    token = f"token-{os.getpid()}-{time.monotonic_ns()}"
    with open(os.path.join(docroot, "t.txt"), "w") as f:
        f.write(token + "\n")
    port = free_port()
    p = subprocess.Popen([PY, "-m", "http.server", "--bind", "127.0.0.1", "--directory", docroot, str(port)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def listening():
        with contextlib.closing(__import__("socket").socket()) as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    try:
        nsutil.wait_for(listening, 10, what="HTTP server")
        yield port, token
    finally:
        stop(p)
        shutil.rmtree(docroot, True)


class Sandbox:
    """One sandbox process with a unique --netns; close() removes whatever it left (a failed test)."""

    def __init__(self, *args: str, script: str | None = None, params: tuple[str, ...] = ()) -> None:
        self.netns = nsutil.unique_name("rdsb")
        self.marker = f"rdt-marker-{self.netns}"
        self.args = [PY, "-m", "rdswitch", "sandbox", "--netns", self.netns, *args]
        if script is not None:  # the marker is the script's $0: its processes can be found by it
            self.args += ["--", "sh", "-c", script, self.marker, *params]
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=REPO)
        self.stderr = ""

    def communicate(self, timeout: float = 90) -> tuple[str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        self.stderr += err
        return out, self.stderr

    def tmpdir(self) -> str:
        m = re.search(r"unix://(/\S+)/host\.sock", self.stderr)
        assert m, self.stderr
        return m.group(1)

    def pid_file(self) -> str:
        m = re.search(r"pid file (\S+)\)", self.stderr)
        assert m, self.stderr
        return m.group(1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for name in (self.netns, f"{self.netns}-vm"):
            nsutil.delete_netns(name)
        shutil.rmtree(f"/etc/netns/{self.netns}", ignore_errors=True)
        for pid in pids_with(self.marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(AssertionError):
            shutil.rmtree(self.tmpdir(), ignore_errors=True)


@pytest.fixture
def sandboxes():
    made: list[Sandbox] = []

    def make(*args: str, **kw) -> Sandbox:
        sb = Sandbox(*args, **kw)
        made.append(sb)
        return sb

    try:
        yield make
    finally:
        for sb in made:
            sb.close()


def pids_with(text: str) -> list[int]:
    """Live processes whose command line contains ``text``."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{d}/stat") as f:
                zombie = f.read().split(") ", 1)[1][0] == "Z"
            if text in cmd and not zombie:
                out.append(int(d))
    return out


def live_pids() -> set[int]:
    return {int(d) for d in os.listdir("/proc") if d.isdigit()}


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode() for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def read_pid(path: str) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        with open(path) as f:
            return int(f.read().strip())
    return None


def leftovers(sb: Sandbox, tmpdir: str, pid_file: str) -> list[str]:
    """Everything of ``sb`` that still exists (empty: all gone)."""
    left = []
    for name in (sb.netns, f"{sb.netns}-vm"):
        if os.path.exists(f"/run/netns/{name}"):
            left.append(f"namespace {name}")
    if os.path.exists(f"/etc/netns/{sb.netns}"):
        left.append(f"/etc/netns/{sb.netns}")
    for path in (tmpdir, os.path.join(tmpdir, "host.sock"), os.path.join(tmpdir, "handshake.sock"), pid_file):
        if os.path.exists(path):
            left.append(path)
    for what in (sb.marker, tmpdir):
        if pids_with(what):
            left.append(f"processes {pids_with(what)} with {what!r} in their command line")
    return left


def root_links() -> set[str]:
    out = nsutil.run(["ip", "-o", "link", "show"]).stdout
    return {ln.split(":")[1].strip().split("@")[0] for ln in out.splitlines()}


INSIDE = r"""
echo "pid=$$"
echo "addr=$(ip -4 -o addr show dev eth0 | awk '{print $4}')"
echo "route=$(ip -4 route show default | awk '{print $3}')"
echo "veth=$(ip -4 -o addr show dev "$5" | awk '{print $4}')"
ping -c 1 -W 2 "$6" >/dev/null && echo "ping-veth=ok"
ping -c 1 -W 2 "$1" >/dev/null && echo "ping-gateway=ok"
echo "alias=$(getent hosts host.rancher-desktop.internal | awk '{print $1}')"
echo "upstream=$(getent hosts known.example | awk '{print $1}')"
echo "record=$(getent hosts extra.sandbox.test | awk '{print $1}')"
echo "http=$(curl -sS --max-time 5 "http://$2:$3/t.txt")"
echo "resolv=$(grep nameserver /etc/resolv.conf | awk '{print $2}')"
exit "$4"
"""


def parse_kv(text: str) -> dict[str, str]:
    return dict(ln.split("=", 1) for ln in text.splitlines() if "=" in ln)


def assert_stages_in_order(err: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.startswith("sandbox: ")]
    at = [next((i for i, ln in enumerate(lines) if stage in ln), None) for stage in STAGES]
    assert None not in at and at == sorted(at), err


# The first layout, one flag set away (README): the seed's names and 192.168.1.0/24
SEED_VETH = ["--veth-host-name", "veth-rd0", "--veth-ns-name", "veth-rd1",
             "--veth-host-address", "192.168.1.1/24", "--veth-ns-address", "192.168.1.2/24"]
CONTRACT_LINKS = {"veth-rd-wsl", "veth-rd-ns", "veth-rd0", "veth-rd1"}


@pytest.mark.parametrize("subnet,status", [(None, 0), ("10.99.0.0/24", 7)])
def test_sandbox_real_path(sandboxes, fake_dns, http_server, tmp_path, subnet, status):
    port, token = http_server
    base = (subnet or "192.168.127.0/24").rsplit(".", 1)[0]
    gw, vm, alias = f"{base}.1", f"{base}.2", f"{base}.254"
    contract_links_before = root_links() & CONTRACT_LINKS
    args = ["--allow-outbound", "127.0.0.0/8", "--dns-upstream", fake_dns, "--dns-record", "extra.sandbox.test=10.1.2.3"]
    capture = str(tmp_path / "frames.pcap")
    veth = ("veth-rd-ns", "192.168.143.2", "192.168.143.1/24")  # Rancher Desktop's current pair: the default
    if subnet:
        args += ["--subnet", subnet, "--capture", capture, *SEED_VETH]
        veth = ("veth-rd1", "192.168.1.1", "192.168.1.2/24")
    sb = sandboxes(*args, script=INSIDE, params=(gw, alias, str(port), str(status), veth[0], veth[1]))
    out, err = sb.communicate()
    assert sb.proc.returncode == status, (out, err)
    assert "Traceback" not in err, err
    assert_stages_in_order(err)
    got = parse_kv(out)
    assert got.get("pid") == "1", out  # CMD is pid 1 of its own pid namespace
    assert got.get("addr") == f"{vm}/24", out  # the lease on eth0
    assert got.get("route") == gw, out
    assert got.get("veth") == veth[2], out
    assert got.get("ping-veth") == "ok", out
    assert got.get("ping-gateway") == "ok", out
    assert got.get("resolv") == gw, out  # the namespace's own resolv.conf, not the host's
    assert got.get("alias") == alias, out  # the gateway's built-in zone
    assert got.get("upstream") == "10.20.30.40", out  # forwarded to --dns-upstream (the fake)
    assert got.get("record") == "10.1.2.3", out  # --dns-record passed through
    assert got.get("http") == token, out  # the host's 127.0.0.1 through the .254 alias
    tmpdir, pid_file = sb.tmpdir(), sb.pid_file()
    assert pid_file.startswith(tmpdir + "/")
    assert leftovers(sb, tmpdir, pid_file) == []
    if subnet:  # --capture passed through: the frames of the session (DHCP, ARP, pings, DNS, TCP)
        assert os.path.getsize(capture) > 1000
    # the contract's veth pair lived in the sandbox's namespaces, never on the host
    assert root_links() & CONTRACT_LINKS == contract_links_before


def read_until(proc: subprocess.Popen, text: str, timeout: float) -> str:
    """Read proc's stdout (line by line, bounded in time) until a line contains ``text``."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < deadline:
        if sel.select(max(0.0, deadline - time.monotonic())):
            line = proc.stdout.readline()
            if not line:
                break
            seen += line
            if text in line:
                return seen
    raise AssertionError(f"no {text!r} from the sandbox's command within {timeout}s; got {seen!r}")


@pytest.mark.parametrize("trap", [False, True], ids=["plain", "trapping-term"])
def test_sigterm_mid_command_leaves_nothing(sandboxes, trap):
    # plain: sh as pid 1 has no SIGTERM handler (the signal is dropped; the sandbox must kill it);
    # trapping: CMD handles SIGTERM itself
    script = ('trap "exit 9" TERM; ' if trap else "") + 'echo ready; sleep 600 & wait'
    sb = sandboxes(script=script)
    read_until(sb.proc, "ready", 60)
    # mid-command: everything is up
    setup_args = next(a for a in map(cmdline, child_pids(sb.proc.pid)) if "rdswitch.network_setup" in a)
    running_pid_file = setup_args[setup_args.index("--pid-file") + 1]
    # the pid file names unshare, whose child is the command (pid 1 inside)
    init_pid = read_pid(running_pid_file)
    assert init_pid in live_pids() and cmdline(init_pid)[0] == "unshare", cmdline(init_pid or 0)
    assert any(sb.marker in " ".join(cmdline(k)) for k in child_pids(init_pid)), child_pids(init_pid)
    assert os.path.exists(f"/run/netns/{sb.netns}") and os.path.exists(f"/run/netns/{sb.netns}-vm")
    assert os.path.exists(f"/etc/netns/{sb.netns}/resolv.conf")
    assert nsutil.run(["ip", "-n", f"{sb.netns}-vm", "link", "show", "veth-rd-wsl"], check=False).returncode == 0
    assert nsutil.run(["ip", "-n", sb.netns, "link", "show", "veth-rd-ns"], check=False).returncode == 0
    assert nsutil.run(["ip", "-n", sb.netns, "link", "show", "eth0"], check=False).returncode == 0
    assert pids_with(sb.marker), "the command is not running"
    t0 = time.monotonic()
    sb.proc.send_signal(signal.SIGTERM)
    out, err = sb.communicate(timeout=10)
    elapsed = time.monotonic() - t0
    assert sb.proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err, err
    tmpdir, pid_file = sb.tmpdir(), sb.pid_file()
    assert pid_file == running_pid_file
    assert elapsed < 3, f"teardown took {elapsed:.1f}s:\n{err}"
    assert leftovers(sb, tmpdir, pid_file) == []


@pytest.mark.parametrize("args,needle", [
    (["--mtu", "5"], "MTU"),
    (["--subnet", "not-a-subnet"], "--subnet"),
    (["--subnet", "192.168.143.0/24"], "overlaps"),
    (["--veth-subnet", "10.0.0.0/24", "--veth-ns-address", "10.0.0.5/24"], "not both"),
    (["--veth-ns-name", "eth0"], "eth0"),
    (["--allow-outbound", "nope"], "nope"),
    (["--dns-record", "justaname"], "justaname"),
    (["--port-forward", "garbage"], "garbage"),
    (["--bogus-flag"], "--bogus-flag"),
    (["--stop-timeout", "x"], "--stop-timeout"),
])
def test_bad_flags_exit_2_with_one_line(args, needle):
    t0 = time.monotonic()
    res = subprocess.run([PY, "-m", "rdswitch", "sandbox", *args, "--", "true"], capture_output=True, text=True,
                         timeout=30, cwd=REPO, stdin=subprocess.DEVNULL)
    assert res.returncode == 2, res
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in res.stderr, res.stderr
    assert "host-switch up" not in res.stderr and res.stdout == ""
    assert time.monotonic() - t0 < 15


def test_self_check_without_cmd_or_tty(sandboxes, fake_dns):
    """No CMD and stdin not a terminal: the self-check runs inside, every address from --subnet."""
    sb = sandboxes("--subnet", "10.98.7.0/24", "--dns-upstream", fake_dns)
    out, err = sb.communicate()
    assert sb.proc.returncode == 0, (out, err)
    assert "init: the self-check is pid 1" in err, err
    assert "[FAIL]" not in out and "all checks passed" in out, out
    oks = [ln for ln in out.splitlines() if "[ok]" in ln]
    assert any("pid 1 of its own pid namespace" in ln for ln in oks), out
    assert any("lease on eth0: eth0 10.98.7.2/24" in ln for ln in oks), out
    assert any("via 10.98.7.1" in ln for ln in oks), out
    assert any("DNS host.rancher-desktop.internal: 10.98.7.254" in ln for ln in oks), out
    assert any("HTTP to the host's 127.0.0.1" in ln for ln in oks), out
    assert "192.168.127." not in out + err
    assert leftovers(sb, sb.tmpdir(), sb.pid_file()) == []


WAIT_FOR_FILE = r"""
echo ready
i=0
while [ ! -e "$1" ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done
[ -e "$1" ] || exit 99
ping -c 1 -W 2 192.168.143.2 >/dev/null && echo "ping-veth=ok"
echo "alias=$(getent hosts host.rancher-desktop.internal | awk '{print $1}')"
exit 5
"""


def test_two_sandboxes_at_once_and_a_taken_name(sandboxes, fake_dns, tmp_path):
    """Two sandboxes both use the contract's veth-rd-wsl 192.168.143.2 (each in its own namespace) and
    work side by side; a third given a name in use fails clearly and leaves the owner alone."""
    go = str(tmp_path / "go")
    a = sandboxes("--dns-upstream", fake_dns, script=WAIT_FOR_FILE, params=(go,))
    b = sandboxes("--dns-upstream", fake_dns, "--subnet", "10.97.0.0/24", script=WAIT_FOR_FILE, params=(go,))
    read_until(a.proc, "ready", 60)
    read_until(b.proc, "ready", 60)
    for sb in (a, b):
        res = nsutil.run(["ip", "-n", f"{sb.netns}-vm", "-4", "-o", "addr", "show", "dev", "veth-rd-wsl"], check=False)
        assert "192.168.143.2/24" in res.stdout, res

    # the same --netns as a running sandbox: refused before anything is touched
    res = subprocess.run([PY, "-m", "rdswitch", "sandbox", "--netns", a.netns, "--", "true"], capture_output=True,
                         text=True, timeout=60, cwd=REPO, stdin=subprocess.DEVNULL)
    assert res.returncode == 1, res
    assert "stage 'namespace' failed" in res.stderr and a.netns in res.stderr and "exists already" in res.stderr, res
    assert os.path.exists(f"/run/netns/{a.netns}") and os.path.exists(f"/etc/netns/{a.netns}/resolv.conf")
    assert pids_with(a.marker), "the refused sandbox harmed the running one"

    with open(go, "w"):
        pass
    results = [(sb, *sb.communicate()) for sb in (a, b)]
    for sb, out, err in results:
        assert sb.proc.returncode == 5, (out, err)
        got = parse_kv(out)
        assert got.get("ping-veth") == "ok", (out, err)
    assert parse_kv(results[0][1]).get("alias") == "192.168.127.254"
    assert parse_kv(results[1][1]).get("alias") == "10.97.0.254"
    for sb, _, _ in results:
        assert leftovers(sb, sb.tmpdir(), sb.pid_file()) == []
