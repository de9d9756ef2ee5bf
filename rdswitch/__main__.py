"""python -m rdswitch sandbox: a network namespace networked through rdswitch, end to end.

Starts a host-switch on a private unix socket, creates a network namespace,
runs vm-switch inside it (tap eth0 configured by rdswitch's own DHCP), and then
either runs a self-check (ping the gateway, DNS for the built-in zone, HTTP to
a server on the host's 127.0.0.1 through the .254 alias, ping .254) or the
command given after ``--`` inside the namespace.  Everything is removed at
the end.  Needs root (namespaces and taps).

By default flows from the namespace may only reach the host's loopback
(``--allow-outbound 127.0.0.0/8``); pass ``--allow-outbound 0.0.0.0/0`` to let
it use the host's whole network.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

PY = sys.executable


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def self_check(ns: str) -> bool:
    """Run real tools in the namespace; print one line per check."""
    docroot = tempfile.mkdtemp(prefix="rdswitch-www-")
    with open(os.path.join(docroot, "index.html"), "w") as f:
        f.write("hello from the host's 127.0.0.1 through rdswitch\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([PY, "-m", "http.server", "--bind", "127.0.0.1", "--directory", docroot, str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait(lambda: _listening(port), 10, "the demo HTTP server")
    checks = [
        ("address (DHCP)", ["ip", "-4", "-o", "addr", "show", "dev", "eth0"]),
        ("default route", ["ip", "-4", "route", "show", "default"]),
        ("ping gateway", ["ping", "-c", "2", "-i", "0.2", "-W", "2", "192.168.127.1"]),
        ("ping host alias .254", ["ping", "-c", "2", "-i", "0.2", "-W", "2", "192.168.127.254"]),
        ("DNS built-in zone", ["dig", "+short", "+time=2", "+tries=1", "@192.168.127.1", "host.rancher-desktop.internal"]),
        ("HTTP to host 127.0.0.1 via .254", ["curl", "-sS", "--max-time", "5", f"http://192.168.127.254:{port}/"]),
    ]
    ok = True
    try:
        for name, cmd in checks:
            if not shutil.which(cmd[0]):
                print(f"  [skip] {name}: {cmd[0]} not installed")
                continue
            res = subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=20)
            good = res.returncode == 0 and res.stdout.strip() != ""
            ok &= good
            first = (res.stdout.strip().splitlines() or [res.stderr.strip()])
            detail = first[-1] if cmd[0] == "ping" else first[0]
            print(f"  [{'ok' if good else 'FAIL'}] {name}: {detail}")
    finally:
        _stop(server)
        shutil.rmtree(docroot, True)
    return ok


@contextlib.contextmanager
def open_sandbox(*, mtu: str = "1500", subnet: str = "192.168.127.0/24", allow=("127.0.0.0/8",),
                 host_extra=(), vm_extra=(), ns: str | None = None):
    """Host-switch + namespace + vm-switch, up and addressed; torn down on exit.

    Yields the namespace name.  Shared by the sandbox command and the benchmarks.
    """
    tmp = tempfile.mkdtemp(prefix="rdswitch-")
    ns = ns or f"rdswitch-{os.getpid()}"
    sock = os.path.join(tmp, "host.sock")
    host_args = [PY, "-m", "rdswitch.host", "--listen", f"unix://{sock}", "--mtu", str(mtu), "--subnet", subnet,
                 "--logfile", os.path.join(tmp, "host-switch.log"), *host_extra]
    for cidr in allow:
        host_args += ["--allow-outbound", cidr]
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, True)
        host = subprocess.Popen(host_args, stderr=subprocess.DEVNULL)
        stack.callback(_stop, host)
        _wait(lambda: os.path.exists(sock) or host.poll() is not None, 15, "host-switch")
        if host.poll() is not None:
            raise RuntimeError(f"host-switch failed to start (exit {host.returncode})")
        subprocess.run(["ip", "netns", "add", ns], check=True)
        stack.callback(subprocess.run, ["ip", "netns", "del", ns], check=False)
        vm = subprocess.Popen(["ip", "netns", "exec", ns, PY, "-m", "rdswitch.vm", "--connect", f"unix://{sock}",
                               "--subnet", subnet, "--logfile", os.path.join(tmp, "vm-switch.log"), *vm_extra],
                              stderr=subprocess.DEVNULL)
        stack.callback(_stop, vm)

        def addressed():
            if vm.poll() is not None:
                raise RuntimeError(f"vm-switch exited {vm.returncode}")
            out = subprocess.run(["ip", "netns", "exec", ns, "ip", "-4", "-o", "addr", "show", "dev", "eth0"],
                                 capture_output=True, text=True).stdout
            return "inet " in out

        _wait(addressed, 20, "DHCP in the namespace")
        yield ns, (host, vm)


def sandbox(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m rdswitch sandbox", description=__doc__.splitlines()[0])
    p.add_argument("--mtu", default="1500")
    p.add_argument("--subnet", default="192.168.127.0/24")
    p.add_argument("--allow-outbound", action="append", default=None, metavar="CIDR")
    p.add_argument("--offload", action="store_true", help="run vm-switch with --offload (TSO both ways)")
    p.add_argument("--keep", action="store_true", help="stay up until Ctrl-C (the namespace name is printed)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ...: run CMD in the namespace instead of the self-check")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("sandbox needs root (network namespaces and tap devices)", file=sys.stderr)
        return 2
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    allow = args.allow_outbound or ["127.0.0.0/8"]
    try:
        with open_sandbox(mtu=args.mtu, subnet=args.subnet, allow=allow,
                          vm_extra=["--offload"] if args.offload else []) as (ns, procs):
            print(f"namespace {ns}: eth0 is networked through rdswitch (allowed outbound: {', '.join(allow)})")
            if cmd:
                return subprocess.run(["ip", "netns", "exec", ns, *cmd]).returncode
            ok = self_check(ns)
            if args.keep:
                print(f"try: ip netns exec {ns} bash    (Ctrl-C here to tear down)")
                with contextlib.suppress(KeyboardInterrupt):
                    while all(p.poll() is None for p in procs):
                        time.sleep(0.5)
            print("all checks passed" if ok else "some checks failed")
            return 0 if ok else 1
    except (RuntimeError, TimeoutError) as exc:
        print(f"sandbox failed: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("usage: python -m rdswitch sandbox [--mtu N] [--allow-outbound CIDR] [--keep] [-- CMD ...]")
        return 0
    if argv[0] == "sandbox":
        return sandbox(argv[1:])
    if argv[0] == "ctl":
        from .ctl.__main__ import main as ctl_main
        return ctl_main(argv[1:])
    print(f"unknown command {argv[0]!r}; try: python -m rdswitch sandbox", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
