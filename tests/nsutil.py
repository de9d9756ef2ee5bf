"""Network-namespace helpers for tests: unique names, guaranteed cleanup.

Every namespace a test makes is named ``rdt-<pid>-<n>`` so parallel runs never
collide, and is deleted (with everything in it: taps, veths, processes that
live only there) when the context exits, even if the test failed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import signal
import subprocess
import time

_counter = itertools.count()


def unique_name(prefix: str = "rdt") -> str:
    """A short name (<= 15 chars, fits an interface name) unique to this process."""
    return f"{prefix}{os.getpid() % 100000}x{next(_counter)}"


def unique_prefix() -> str:
    """A /24 of the benchmarking range 198.18.0.0/15 (RFC 2544) for one test's own veths: "198.18.N".

    Never a range a real network uses, and different for concurrent tests (by pid and counter),
    so routes of parallel runs do not shadow each other.
    """
    k = os.getpid() * 7 + next(_counter)
    return f"198.{18 + (k // 254) % 2}.{k % 254 + 1}"


def run(cmd: list[str], check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, timeout=timeout, capture_output=True, text=True, **kw)


def ns_cmd(ns: str, cmd: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


def ns_run(ns: str, cmd: list[str], check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    return run(ns_cmd(ns, cmd), check=check, timeout=timeout, **kw)


def _pids_in_ns(ns: str) -> list[int]:
    res = run(["ip", "netns", "pids", ns], check=False)
    return [int(p) for p in res.stdout.split() if p.strip().isdigit()]


def delete_netns(ns: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _pids_in_ns(ns)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 3
        while _pids_in_ns(ns) and time.monotonic() < deadline:
            time.sleep(0.05)  # ok-sleep: the poll interval of a bounded wait for the processes to go
    run(["ip", "netns", "del", ns], check=False)


@contextlib.contextmanager
def netns(prefix: str = "rdt"):
    """Create a namespace with ``lo`` up; yield its name; delete it afterwards."""
    name = unique_name(prefix)
    run(["ip", "netns", "add", name])
    try:
        ns_run(name, ["ip", "link", "set", "lo", "up"])
        yield name
    finally:
        delete_netns(name)


@contextlib.contextmanager
def veth_pair(ns: str, outer_addr: str | None, inner_addr: str, inner_ns_outer: str | None = None):
    """A veth pair with one end (``addr`` CIDR) inside ``ns``.

    The outer end stays in the current namespace (or ``inner_ns_outer``) with
    ``outer_addr`` if given.  Yields (outer_name, inner_name).
    """
    outer = unique_name("vo")
    inner = unique_name("vi")
    run(["ip", "link", "add", outer, "type", "veth", "peer", "name", inner])
    try:
        run(["ip", "link", "set", inner, "netns", ns])
        if inner_ns_outer:
            run(["ip", "link", "set", outer, "netns", inner_ns_outer])
        outer_exec = (lambda c: ns_cmd(inner_ns_outer, c)) if inner_ns_outer else (lambda c: c)
        if outer_addr:
            run(outer_exec(["ip", "addr", "add", outer_addr, "dev", outer]))
        run(outer_exec(["ip", "link", "set", outer, "up"]))
        ns_run(ns, ["ip", "addr", "add", inner_addr, "dev", inner])
        ns_run(ns, ["ip", "link", "set", inner, "up"])
        yield outer, inner
    finally:
        if inner_ns_outer:
            run(ns_cmd(inner_ns_outer, ["ip", "link", "del", outer]), check=False)
        else:
            run(["ip", "link", "del", outer], check=False)


def wait_for(pred, timeout: float = 10, interval: float = 0.05, what: str = "condition"):
    """Poll ``pred`` (bounded in time) until it returns a truthy value, which is returned."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)  # ok-sleep: the poll interval of this bounded wait for a condition


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


_TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
               7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING", 12: "NEW_SYN_RECV"}


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile
            target = os.readlink(os.path.join(fd_dir, fd))
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def _proc_net_addr(text: str) -> tuple[str, int]:
    """``0100007F:1F90`` (or the 32-digit IPv6 form) -> ("127.0.0.1", 8080)."""
    hexip, hexport = text.split(":")
    raw = bytes.fromhex(hexip)
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # each 32-bit word is host-endian
    return str(ipaddress.ip_address(raw)), int(hexport, 16)


def tcp_sockets(pid: int) -> list[tuple[str, tuple[str, int], tuple[str, int]]]:
    """Process ``pid``'s TCP sockets as (state, (local ip, port), (remote ip, port)), e.g. ("SYN_SENT", ...)."""
    inodes = _socket_inodes(pid)
    out = []
    for name in ("tcp", "tcp6"):
        with contextlib.suppress(FileNotFoundError):
            with open(f"/proc/{pid}/net/{name}") as f:  # the tables of pid's own network namespace
                lines = f.read().splitlines()[1:]
            for line in lines:
                fields = line.split()
                if int(fields[9]) in inodes:
                    state = int(fields[3], 16)
                    out.append((_TCP_STATES.get(state, str(state)), _proc_net_addr(fields[1]), _proc_net_addr(fields[2])))
    return out


def listening(pid: int, host: str, port: int) -> bool:
    """Whether process ``pid`` has a TCP socket listening on ``host``:``port``."""
    return any(state == "LISTEN" and local == (host, port) for state, local, _ in tcp_sockets(pid))
