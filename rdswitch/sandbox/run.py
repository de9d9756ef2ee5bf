"""The sandbox's trio shell: start the real components, report each stage, tear everything down.

Tree (one trio nursery in this process)::

    sandbox
    |-- host-switch       python -m rdswitch.host --handshake unix://D/handshake.sock --listen unix://D/host.sock
    |-- network-setup     nsenter --net=/run/netns/NAME-vm python -m rdswitch.network_setup ...
    |     |-- vm-switch   ip netns exec NAME ... (the data connection on fd 3, tap eth0)
    |     `-- init        ip netns exec NAME unshare --pid --mount-proc --fork ... CMD   (CMD is pid 1)
    `-- (self-check only) an HTTP responder on the host's 127.0.0.1

network-setup runs in a namespace of the sandbox's own (the "VM" root
namespace, NAME-vm): the contract's veth-rd-wsl 192.168.143.2 lives there, not on
the host, so sandboxes never collide with each other; veth-rd-ns 192.168.143.1
is in CMD's namespace, so the start refuses a veth subnet that a route or
address of the host already uses (it would shadow that network for CMD).
CMD waits at a gate (a FIFO) until eth0 has its lease, then execs, so it
starts networked and is still pid 1.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile

import trio

from ..network_setup.children import child_pids

from . import options as sbopts
from .options import Options, Paths

POLL = 0.05


class StageError(Exception):
    """A stage did not come up; str() names the stage and why."""

    def __init__(self, stage: str, reason: str, log_tail: str = "") -> None:
        super().__init__(f"stage '{stage}' failed: {reason}")
        self.log_tail = log_tail


def say(text: str) -> None:
    print(f"sandbox: {text}", file=sys.stderr, flush=True)


def read_text(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def log_tail(path: str, n: int = 8) -> str:
    lines = [ln for ln in read_text(path).splitlines() if ln.strip()]
    return "\n".join(f"    {ln}" for ln in lines[-n:])


def last_error(path: str) -> str | None:
    """The last ERROR line of a log (or an 'X: error: ...' / exception line of a stderr file)."""
    for ln in reversed(read_text(path).splitlines()):
        if " ERROR " in ln or " CRITICAL " in ln:
            return ln.split(" ERROR ", 1)[-1].split(" CRITICAL ", 1)[-1]
        if ": error: " in ln or re.match(r"^\w+(\.\w+)*(Error|Exception): ", ln):
            return ln
    return None


# --- netlink and namespaces (blocking: each call runs in one trio.to_thread call) ---

def _netns_create(name: str) -> None:
    from pyroute2 import netns
    netns.create(name)


def _netns_remove(name: str) -> bool:
    from pyroute2 import netns
    if not os.path.exists(f"/run/netns/{name}"):
        return False
    with contextlib.suppress(FileNotFoundError):
        netns.remove(name)
    return True


def _lease(name: str, ifname: str) -> tuple[str, str] | None:
    """(address/prefix, default router) of ``ifname`` in namespace ``name`` once both are there."""
    import socket as _s

    from pyroute2 import IPRoute
    with IPRoute(netns=name, flags=0) as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            return None
        addrs = ipr.get_addr(family=_s.AF_INET, index=idx[0])
        routes = [r for r in ipr.get_routes(family=_s.AF_INET, table=254) if r["dst_len"] == 0]
        if not addrs or not routes:
            return None
        a = addrs[0]
        return f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}", str(routes[0].get_attr("RTA_GATEWAY"))


def _pids_in_netns(name: str) -> list[int]:
    """Processes whose network namespace is /run/netns/``name`` (for a last-resort cleanup)."""
    try:
        ino = os.stat(f"/run/netns/{name}").st_ino
    except OSError:
        return []
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{d}/ns/net").st_ino == ino:
                    out.append(int(d))
    return out


def _catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (SigCgt in /proc/PID/status)."""
    with contextlib.suppress(OSError, ValueError):
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


# --- children ---

async def stop(proc: trio.Process | None, timeout: float) -> None:
    """SIGTERM, wait ``timeout`` s, SIGKILL; reap."""
    if proc is None or proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    with trio.move_on_after(timeout):
        await proc.wait()
        return
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    with trio.move_on_after(5):
        await proc.wait()


class Sandbox:
    def __init__(self, opts: Options, paths: Paths, init: list[str], self_check: bool,
                 interactive: bool = False) -> None:
        self.interactive = interactive
        self.opts = opts
        self.paths = paths
        self.init = init
        self.self_check = self_check
        self.host: trio.Process | None = None
        self.setup: trio.Process | None = None
        self.gate_fd = -1
        self.made_vm_netns = False
        self.names_ours = False  # the names were free when we started: teardown may clean them up
        self.made_etc = False
        self.tty = sys.stdin.isatty()

    # -- conditions --

    def check_children(self, stage: str) -> None:
        if self.setup is not None and self.setup.returncode is not None:
            why = last_error(self.paths.setup_log) or f"network-setup exited with status {self.setup.returncode}"
            raise StageError(stage, why, log_tail(self.paths.setup_log) + "\n" + log_tail(self.paths.vm_log, 4))
        if self.host is not None and self.host.returncode is not None:
            why = (last_error(self.paths.host_log) or last_error(self.paths.host_stderr)
                   or f"host-switch exited with status {self.host.returncode}")
            raise StageError(stage, why, log_tail(self.paths.host_log) or log_tail(self.paths.host_stderr))

    async def until(self, stage: str, timeout: float, pred, what: str, logs: tuple[str, ...] = ()):
        """Poll ``pred`` (bounded by ``timeout``) while watching the children; return its value."""
        with trio.move_on_after(timeout):
            while True:
                self.check_children(stage)
                value = pred()
                if value:
                    return value
                await trio.sleep(POLL)
        tails = "\n".join(log_tail(p) for p in logs)
        raise StageError(stage, f"no {what} within {timeout:g}s", tails)

    async def until_thread(self, stage: str, timeout: float, fn, what: str, logs: tuple[str, ...] = ()):
        with trio.move_on_after(timeout):
            while True:
                self.check_children(stage)
                value = await trio.to_thread.run_sync(fn)
                if value:
                    return value
                await trio.sleep(POLL * 2)
        raise StageError(stage, f"no {what} within {timeout:g}s", "\n".join(log_tail(p) for p in logs))

    def setup_log_has(self, text: str):
        return lambda: text in read_text(self.paths.setup_log)

    # -- the stages --

    async def prepare(self) -> None:
        # /etc/netns/NAME is the claim on NAME: mkdir is atomic, so of two sandboxes given
        # the same --netns exactly one goes on
        taken = "(another sandbox with this --netns?)"
        for attempt in range(3):
            try:
                os.makedirs(self.paths.etc_dir)
                break
            except FileExistsError:
                raise StageError("namespace", f"{self.paths.etc_dir} exists already {taken}") from None
            except FileNotFoundError:  # another sandbox removed an empty /etc/netns just then
                if attempt == 2:
                    raise
        self.made_etc = True
        for name in (self.opts.netns, self.opts.vm_netns):
            if os.path.exists(f"/run/netns/{name}"):
                raise StageError("namespace", f"network namespace {name} exists already {taken}")
        self.names_ours = True
        with open(os.path.join(self.paths.etc_dir, "resolv.conf"), "w") as f:
            f.write(sbopts.resolv_conf(self.opts))
        host_nss = read_text("/etc/nsswitch.conf") or None
        with open(os.path.join(self.paths.etc_dir, "nsswitch.conf"), "w") as f:
            f.write(sbopts.nsswitch_conf(host_nss))
        await trio.to_thread.run_sync(_netns_create, self.opts.vm_netns)
        self.made_vm_netns = True
        os.mkfifo(self.paths.gate, 0o600)
        # read-write: opening never blocks, and the gate's reader never sees EOF while we hold it
        self.gate_fd = os.open(self.paths.gate, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)

    async def start(self) -> None:
        p = self.paths
        # network-setup first, so the host finds it at its first probe
        cmd = sbopts.network_setup_command(self.opts, p, self.init)
        # With a terminal, network-setup (and so CMD) stays in our process group: the
        # terminal's foreground group, which an interactive shell needs for job control.
        group = {} if self.tty else {"process_group": 0}
        self.setup = await trio.lowlevel.open_process(cmd, stdin=None, **group)
        await self.until("handshake", 30, lambda: os.path.exists(p.handshake_sock), "handshake socket",
                         (p.setup_log,))
        # host-switch's stderr goes to a file (its INFO lines are not for the terminal); a failure shows its tail
        with open(p.host_stderr, "w") as err:
            out = None if self.opts.debug else err
            self.host = await trio.lowlevel.open_process(sbopts.host_switch_command(self.opts, p),
                                                         stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                                         process_group=0)
        await self.until("host-switch", 30, lambda: os.path.exists(p.host_sock), "listening socket", (p.host_log,))
        allow = [self.opts.host_args[i + 1] for i, a in enumerate(self.opts.host_args) if a == "--allow-outbound"]
        say(f"host-switch up: subnet {self.opts.subnet}, gateway {self.opts.gateway}, host alias "
            f"{self.opts.host_alias}, outbound allowed to {', '.join(allow)} (unix://{p.host_sock})")
        await self.until("handshake", 20, self.setup_log_has("handshake done"), "handshake", (p.setup_log, p.host_log))
        say(f"handshake: done over unix://{p.handshake_sock}")
        await self.until("data connection", 15, self.setup_log_has("data connection open"), "data connection",
                         (p.setup_log, p.host_log))
        say("data connection: open; network-setup hands it to vm-switch as fd 3")
        await self.until("namespace", 15, self.setup_log_has("starting vm-switch"), "namespace and veth pair",
                         (p.setup_log,))
        o = self.opts
        say(f"namespace: {o.netns}: {o.veth_ns_name} {o.veth_ns_address} <-> {o.veth_host_name} "
            f"{o.veth_host_address} (in {o.vm_netns}, network-setup's namespace)")
        await self.until("lease", 30, lambda: "DHCP bound" in read_text(p.vm_log), "DHCP lease on eth0",
                         (p.vm_log, p.host_log))
        addr, router = await self.until_thread("lease", 10, lambda: _lease(self.opts.netns, "eth0"),
                                               "address and default route on eth0", (p.vm_log,))
        say(f"lease: eth0 {addr}, router {router}; DNS {self.opts.gateway} ({p.etc_dir}/resolv.conf)")
        pid = await self.until("init", 10, lambda: read_text(p.pid_file).strip(), "pid file", (p.setup_log,))
        os.write(self.gate_fd, b"go\n")
        os.close(self.gate_fd)
        self.gate_fd = -1
        what = "the self-check" if self.self_check else shlex.join(self.init)
        if len(what) > 60:
            what = what[:57] + "..."
        say(f"init: {what} is pid 1 of a new pid namespace (unshare pid {pid.strip()}, pid file {p.pid_file})")
        if self.interactive:
            say(f"a shell in namespace {self.opts.netns}; exit it to tear everything down")

    async def wait(self) -> int:
        """Wait for CMD (network-setup exits with its status); a dying host-switch ends the sandbox too."""
        async with trio.open_nursery() as nursery:
            async def host_died():
                await self.host.wait()
                say(f"host-switch exited with status {self.host.returncode}: {last_error(self.paths.host_log) or ''}")
                nursery.cancel_scope.cancel()
            nursery.start_soon(host_died)
            code = await self.setup.wait()
            nursery.cancel_scope.cancel()
        if self.setup.returncode is None:
            return 1
        if not re.search(r"init \(unshare, pid \d+\) exited with status", read_text(self.paths.setup_log)):
            why = last_error(self.paths.setup_log) or f"network-setup exited with status {code}"
            say(f"network-setup ended before the command did: {why}")
            return 1
        return code

    async def teardown(self) -> None:
        if self.gate_fd >= 0:
            os.close(self.gate_fd)
            self.gate_fd = -1
        # CMD is pid 1 of its pid namespace: a SIGTERM it has no handler for is dropped, so
        # waiting --stop-timeout for it would only delay the end; end it (and its namespace)
        # now.  unshare first: killed second, it would complain about its child's SIGKILL.
        unshare_pid = read_text(self.paths.pid_file).strip()
        if unshare_pid.isdigit() and self.setup is not None and self.setup.returncode is None:
            kids = child_pids(int(unshare_pid))
            if kids and not any(_catches(pid, signal.SIGTERM) for pid in kids):
                for pid in [int(unshare_pid), *kids]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        # network-setup stops init and vm-switch and removes the veth, the namespace and the pid file
        await stop(self.setup, self.opts.stop_timeout + 8)
        await stop(self.host, 5)
        # last resort, if network-setup could not finish: nothing may stay behind
        # (never when the names were taken at the start: they belong to someone else)
        if self.names_ours:
            for pid in _pids_in_netns(self.opts.netns):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if await trio.to_thread.run_sync(_netns_remove, self.opts.netns):
                say(f"removed a leftover namespace {self.opts.netns}")
        if self.made_vm_netns:
            await trio.to_thread.run_sync(_netns_remove, self.opts.vm_netns)  # takes the host veth along
        if self.made_etc:
            shutil.rmtree(self.paths.etc_dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.rmdir("/etc/netns")  # only if no one else uses it
        shutil.rmtree(self.paths.tmp, ignore_errors=True)


async def http_responder(task_status=trio.TASK_STATUS_IGNORED) -> None:
    """A tiny HTTP server on the host's 127.0.0.1 for the self-check; reports its port."""
    body = b"hello from the host's 127.0.0.1 through rdswitch\n"

    async def handle(stream: trio.SocketStream) -> None:
        with trio.move_on_after(10):
            data = b""
            while b"\r\n\r\n" not in data and len(data) < 65536:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                data += chunk
            await stream.send_all(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                                  b"Connection: close\r\n\r\n%s" % (len(body), body))
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        task_status.started(port)
        await trio.serve_listeners(handle, listeners, handler_nursery=nursery)


async def amain(opts: Options) -> int:
    status = 1
    got_signal: int | None = None
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        sb: Sandbox | None = None
        paths = Paths(tmp=tempfile.mkdtemp(prefix="rdswitch-sandbox-"), netns=opts.netns)
        try:
            async with trio.open_nursery() as nursery:

                async def on_signals() -> None:
                    nonlocal got_signal
                    async for sig in signals:
                        got_signal = sig
                        say(f"got {signal.Signals(sig).name}; tearing down")
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(on_signals)
                init = list(opts.command)
                self_check = interactive = False
                if not init:
                    if sys.stdin.isatty() and not opts.self_check:
                        init = [os.environ.get("SHELL") or "/bin/sh", "-i"]
                        interactive = True
                    else:
                        self_check = True
                        port = await nursery.start(http_responder)
                        init = [sys.executable, "-m", "rdswitch.sandbox.check", "--subnet", str(opts.subnet),
                                "--http-port", str(port), "--veth-peer", str(opts.veth_host_address.ip)]
                sb = Sandbox(opts, paths, init, self_check, interactive)
                try:
                    await sb.prepare()
                    await sb.start()
                    status = await sb.wait()
                except StageError as exc:
                    say(str(exc))
                    if exc.log_tail.strip():
                        print(exc.log_tail.rstrip("\n"), file=sys.stderr)
                    status = 1
                except OSError as exc:
                    say(f"failed: {exc}")
                    status = 1
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                if sb is not None:
                    await sb.teardown()
                else:
                    shutil.rmtree(paths.tmp, ignore_errors=True)
    if got_signal is not None:
        status = 128 + got_signal
    say(f"torn down; exit status {status}")
    return status


def preflight() -> str | None:
    """Why the sandbox cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veths, a tap device)"
    for tool in ("ip", "nsenter", "unshare", "sh"):
        if shutil.which(tool) is None:
            return f"needs {tool!r} on PATH (iproute2 / util-linux)"
    return None


def veth_collision(opts: Options) -> str | None:
    """Why the veth subnet would shadow a network of this host for CMD (a LAN, a VPN), or None."""
    from ..network_setup.collision import veth_conflict
    from ..network_setup.links import claims
    try:
        found = claims()
    except OSError as exc:
        say(f"cannot read the host's routes to check the veth subnet: {exc}")
        return None
    what = f"{opts.veth_ns_name} {opts.veth_ns_address} in CMD's namespace"
    why = veth_conflict(what, opts.veth_networks, found, also_taken=[opts.subnet])
    return None if why is None else f"error: {why}"


def main(argv: list[str]) -> int:
    try:
        opts = sbopts.parse(argv)
    except sbopts.UsageError as exc:
        print(f"{sbopts.PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # ^C while the flags were checked: nothing started yet
        return 130
    why = preflight() or veth_collision(opts)
    if why:
        print(f"{sbopts.PROG}: {why}", file=sys.stderr)
        return 2
    try:
        return trio.run(amain, opts)
    except KeyboardInterrupt:
        return 130
