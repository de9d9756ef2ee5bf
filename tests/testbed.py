"""The end-to-end test bed: a host-switch process on a unix socket and "VMs" that
are network namespaces whose eth0 is vm-switch's tap.

Every host-switch a test starts runs with ``--allow-outbound`` restricted to
loopback plus the networks the test itself created, and with a DNS upstream on
a closed loopback port (or a fake the test starts), so no frame can make the
NAT dial anything else.  Everything is torn down even when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import nsutil

PY = sys.executable
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port(host: str = "127.0.0.1", kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, timeout: float = 5) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class HostSwitchProc:
    def __init__(self, tmp: str, extra: list[str], allow: list[str], name: str) -> None:
        self.sock = os.path.join(tmp, f"{name}.sock")
        self.url = f"unix://{self.sock}"
        self.log = os.path.join(tmp, f"{name}.log")
        self.args = [PY, "-m", "rdswitch.host", "--listen", self.url, "--logfile", self.log, "--debug"]
        for cidr in ["127.0.0.0/8", *allow]:
            self.args += ["--allow-outbound", cidr]
        if not any(a.startswith(("--dns-upstream", "--dns-resolv-conf")) for a in extra):
            # a closed loopback port: forwarding fails fast, never reaches a real resolver
            self.args += ["--dns-upstream", f"127.0.0.1:{free_port(kind=socket.SOCK_DGRAM)}"]
        self.args += extra
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
        try:
            nsutil.wait_for(lambda: os.path.exists(self.sock) or self.proc.poll() is not None, 15, what="host-switch socket")
        except TimeoutError:
            stop(self.proc)
            raise
        if self.proc.poll() is not None:
            raise RuntimeError(f"host-switch exited {self.proc.returncode}:\n{self.read_log()}")

    def read_log(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            with open(self.log) as f:
                return f.read()
        return ""

    @property
    def pid(self) -> int:
        return self.proc.pid


class VM:
    """A namespace with vm-switch running in it."""

    def __init__(self, ns: str, hs: HostSwitchProc, tmp: str, mac: str, extra: list[str]) -> None:
        self.ns = ns
        self.mac = mac
        self.log = os.path.join(tmp, f"vm-{ns}.log")
        self.args = nsutil.ns_cmd(ns, [PY, "-m", "rdswitch.vm", "--connect", hs.url, "--tap-mac-address", mac,
                                       "--logfile", self.log, "--debug", *extra])
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(5)

    def run(self, cmd: list[str], check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        return nsutil.ns_run(self.ns, cmd, check=check, timeout=timeout, **kw)

    def ipv4(self, dev: str = "eth0") -> str | None:
        out = self.run(["ip", "-4", "-o", "addr", "show", "dev", dev], check=False).stdout.split()
        return out[out.index("inet") + 1] if "inet" in out else None

    def wait_address(self, timeout: float = 20) -> str:
        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"vm-switch exited {self.proc.returncode}:\n{self.read_log()}")
            return self.ipv4()
        return nsutil.wait_for(ready, timeout, what=f"DHCP address in {self.ns}")

    def read_log(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            with open(self.log) as f:
                return f.read()
        return ""


class Bed:
    """Factory for host-switches and VMs; tears all of them down at the end."""

    def __init__(self, tmp: str) -> None:
        self.tmp = tmp
        self._stack = contextlib.ExitStack()
        self.hosts: list[HostSwitchProc] = []
        self.vms: list[VM] = []

    def host_switch(self, *extra: str, allow: list[str] = (), name: str = "hs") -> HostSwitchProc:
        hs = HostSwitchProc(self.tmp, list(extra), list(allow), f"{name}{len(self.hosts)}")
        self.hosts.append(hs)
        self._stack.callback(stop, hs.proc)
        return hs

    def namespace(self) -> str:
        return self._stack.enter_context(nsutil.netns())

    def vm(self, hs: HostSwitchProc, *extra: str, mac: str = "5a:94:ef:e4:0c:ee", wait: bool = True) -> VM:
        ns = self.namespace()
        vm = VM(ns, hs, self.tmp, mac, list(extra))
        self.vms.append(vm)
        self._stack.callback(vm.kill)
        if wait:
            vm.wait_address()
        return vm

    def close(self) -> None:
        self._stack.close()

    def logs(self) -> str:
        parts = [f"--- {h.log}\n{h.read_log()[-4000:]}" for h in self.hosts]
        parts += [f"--- {v.log}\n{v.read_log()[-2000:]}" for v in self.vms]
        return "\n".join(parts)


def wait_until(pred, timeout=10.0, what="condition"):
    return nsutil.wait_for(pred, timeout, what=what)


def now() -> float:
    return time.monotonic()
