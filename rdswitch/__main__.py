"""python -m rdswitch sandbox: a network namespace networked through rdswitch, end to end.

The sandbox itself lives in :mod:`rdswitch.sandbox` (host-switch, the
handshake, network-setup, vm-switch on fd 3, the veth pair, CMD as pid 1 of a
new pid namespace).  :func:`open_sandbox` below is the benchmarks' shortcut
(host-switch and vm-switch only, no network-setup); the sandbox command does
not use it.
"""

from __future__ import annotations

import contextlib
import shutil
import os
import signal
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: rdswitch sandbox [OPTIONS] [-- CMD ...]   (rdswitch sandbox --help)\n"
              "       rdswitch ctl --api URL {expose,unexpose,list,leases,dns,stats} ...   (rdswitch ctl --help)")
        return 0
    if argv[0] == "sandbox":
        try:
            from .sandbox.run import main as sandbox_main
        except KeyboardInterrupt:
            return 130
        return sandbox_main(argv[1:])
    if argv[0] == "ctl":
        from .ctl.__main__ import main as ctl_main
        return ctl_main(argv[1:])
    print(f"unknown command {argv[0]!r}; try: python -m rdswitch sandbox", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
