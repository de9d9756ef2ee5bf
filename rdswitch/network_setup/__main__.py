"""network-setup: handshake, data connection, namespace + veth, vm-switch and init.

Setup, in order: remove a stale host veth (and a stale namespace); answer the
host's handshake until it sends READY (the wire contract,
docs/wire-contract.md); dial the host's data connection; create the namespace
and the veth pair; start vm-switch inside the namespace, handing it the
connection's fd; start the distro's init there under ``unshare`` and write its
pid file.

Then it keeps the network up for as long as init runs (with no init: until a
signal).  When vm-switch exits (the host-switch restarted, or vm-switch
crashed) the namespace, the veth and init stay as they are: network-setup
answers the handshake again, dials a new data connection and starts a new
vm-switch on it.  It shuts down when init exits, when that reconnection
fails, or on SIGTERM/SIGINT: it stops the children and removes the veth, the
namespace and the pid file.  Exit status: 0 after a signal, 1 when setup or a
reconnection failed or init exited.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys

import attrs
import trio

from ..aio import connect
from ..config import ConfigError, NetConfig
from ..logs import describe, leaves
from ..handshake import HandshakeError, serve_handshake
from . import links
from .children import stop_process
from .collision import veth_conflict
from .options import Options, init_command, parse_args, vm_switch_command
from ..logs import setup_logging

log = logging.getLogger("rdswitch.network_setup")

DIAL_INTERVAL = 0.5


class SetupError(Exception):
    """Setup failed; str() is the message for the log."""


@attrs.define
class State:
    """What has been created so far, so teardown undoes exactly that."""

    netns_created: bool = False
    veth_created: bool = False
    data_fd: int = -1
    vm_switch: trio.Process | None = None
    init: trio.Process | None = None
    pid_file_written: bool = False
    exit_code: int = 0
    init_status: int | None = None  # init's exit status when it ended on its own


def write_pid_file(path: str, pid: int) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{pid}\n")
    os.replace(tmp, path)


async def dial_host(url: str, attempts: int) -> int:
    """Dial the data connection; return its fd (ours to close or hand on)."""
    last: Exception | None = None
    for attempt in range(attempts):
        try:
            stream = await connect.dial_stream(url)
        except (OSError, ConfigError) as exc:
            last = exc
            log.warning("dialling the host at %s failed (attempt %d/%d): %s", url, attempt + 1, attempts, exc)
            if attempt + 1 < attempts:
                await trio.sleep(DIAL_INTERVAL)
            continue
        return stream.socket.detach()
    raise SetupError(f"cannot open the data connection to {url}: {last}")


async def handshake_and_dial(opts: Options, st: State) -> None:
    log.info("waiting for the host's handshake on %s", opts.handshake_listen)
    try:
        await serve_handshake(opts.handshake_listen)
    except (OSError, ConfigError) as exc:
        raise SetupError(f"cannot answer the handshake on {opts.handshake_listen}: {describe(exc)}") from None
    log.info("handshake done; dialling the host at %s", opts.host_url)
    st.data_fd = await dial_host(opts.host_url, opts.dial_attempts)
    log.info("data connection open (fd %d)", st.data_fd)


async def start_vm_switch(opts: Options, st: State) -> None:
    cmd = vm_switch_command(opts, st.data_fd)
    log.info("starting vm-switch: %s", " ".join(cmd))
    try:
        # --init-foreground: the terminal belongs to init; vm-switch logs to its log file only
        quiet = subprocess.DEVNULL if opts.init_foreground and opts.vm_switch_logfile else None
        st.vm_switch = await trio.lowlevel.open_process(cmd, pass_fds=(st.data_fd,), stdin=subprocess.DEVNULL,
                                                        stdout=quiet, stderr=quiet)
    except OSError as exc:
        raise SetupError(f"cannot start vm-switch ({' '.join(cmd)}): {exc}") from None
    os.close(st.data_fd)  # vm-switch owns the connection now
    st.data_fd = -1


async def setup(opts: Options, st: State) -> None:
    # 1. a stale host veth from an earlier run
    if await trio.to_thread.run_sync(links.delete_link, opts.veth_host_name):
        log.info("removed stale %s", opts.veth_host_name)
    if await trio.to_thread.run_sync(links.netns_exists, opts.netns):
        log.warning("network namespace %s exists already (stale); replacing it", opts.netns)
        await trio.to_thread.run_sync(links.remove_netns, opts.netns)

    # 2. the handshake, 3. the data connection
    await handshake_and_dial(opts, st)

    # 4. namespace and veth pair
    await trio.to_thread.run_sync(links.create_netns, opts.netns)
    st.netns_created = True
    log.info("created network namespace %s", opts.netns)
    st.veth_created = True  # from here on, teardown tries to remove it
    await trio.to_thread.run_sync(links.setup_veth, opts.netns, opts.veth_host_name, opts.veth_ns_name,
                                  opts.veth_host_address, opts.veth_ns_address)
    log.info("veth %s %s <-> %s %s (in %s)", opts.veth_host_name, opts.veth_host_address,
             opts.veth_ns_name, opts.veth_ns_address, opts.netns)

    # 5. vm-switch, handed the data connection
    await start_vm_switch(opts, st)

    # 6. the distro's init
    cmd = init_command(opts)
    if cmd is not None:
        log.info("starting init: %s", " ".join(cmd))
        try:
            st.init = await trio.lowlevel.open_process(cmd, stdin=None if opts.init_foreground else subprocess.DEVNULL)
        except OSError as exc:
            raise SetupError(f"cannot start init: {exc}") from None
        if opts.pid_file:
            try:
                write_pid_file(opts.pid_file, st.init.pid)
            except OSError as exc:
                raise SetupError(f"cannot write pid file {opts.pid_file}: {exc}") from None
            st.pid_file_written = True
            log.info("init (unshare) pid %d written to %s", st.init.pid, opts.pid_file)


async def run(opts: Options, st: State) -> None:
    """Set up, then start a new vm-switch whenever it exits, until init exits or a
    reconnection fails (a signal cancels this from outside)."""
    try:
        await setup(opts, st)
    except (SetupError, links.LinkError, HandshakeError, ConfigError) as exc:
        log.error("%s", exc)
        st.exit_code = 1
        return
    except OSError as exc:
        log.error("setup failed: %s", describe(exc))
        st.exit_code = 1
        return
    except Exception as exc:  # noqa: BLE001
        if all(isinstance(e, (OSError, ConfigError, SetupError, links.LinkError, HandshakeError)) for e in leaves(exc)):
            log.error("setup failed: %s", describe(exc))
        else:  # a bug: log it with its traceback, but still tear down and exit 1
            log.exception("setup failed unexpectedly")
        st.exit_code = 1
        return
    assert st.vm_switch is not None
    async with trio.open_nursery() as nursery:
        if st.init is not None:
            nursery.start_soon(watch_init, st, opts.init_foreground, nursery.cancel_scope)
        while True:
            code = await st.vm_switch.wait()
            # The host-switch went away (restarted, say): keep the namespace and the
            # distro running, and wait for the host to find us again.
            log.warning("vm-switch exited with status %s; waiting for the host's handshake again", code)
            st.vm_switch = None
            try:
                await handshake_and_dial(opts, st)
                await start_vm_switch(opts, st)
            except (SetupError, HandshakeError, ConfigError, OSError) as exc:
                log.error("cannot reconnect: %s; shutting down", describe(exc))
                break
        nursery.cancel_scope.cancel()
    st.exit_code = 1


async def watch_init(st: State, foreground: bool, scope: trio.CancelScope) -> None:
    """The distro's init ending ends network-setup: there is nothing left to network."""
    proc = st.init
    code = await proc.wait()
    st.init_status = code if code >= 0 else 128 - code
    # with --init-foreground init ending is the normal end, not news for the terminal
    log.log(logging.INFO if foreground else logging.WARNING,
            "init (unshare, pid %d) exited with status %s; shutting down", proc.pid, code)
    scope.cancel()


async def teardown(opts: Options, st: State) -> None:
    """Undo what setup did; every step bounded, every step tried."""
    if st.data_fd >= 0:
        with contextlib.suppress(OSError):
            os.close(st.data_fd)
        st.data_fd = -1
    async with trio.open_nursery() as nursery:
        if st.init is not None:
            nursery.start_soon(lambda: stop_process(st.init, "init", opts.stop_timeout, with_children=True))
        if st.vm_switch is not None:
            nursery.start_soon(lambda: stop_process(st.vm_switch, "vm-switch", opts.stop_timeout))
    if st.pid_file_written and opts.pid_file:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(opts.pid_file)
    if st.veth_created:
        await _remove(links.delete_link, opts.veth_host_name, f"removed {opts.veth_host_name}")
    if st.netns_created:
        await _remove(links.remove_netns, opts.netns, f"removed network namespace {opts.netns}")


async def _remove(remove, name: str, done: str) -> None:
    """Run a netlink removal in a thread; log what it did, or why it failed (teardown goes on)."""
    try:
        if await trio.to_thread.run_sync(remove, name):
            log.info("%s", done)
    except (links.LinkError, OSError) as exc:
        log.error("%s", exc)


async def amain(opts: Options) -> int:
    st = State()
    # The receiver stays open through teardown: a second SIGTERM then waits in
    # its queue instead of killing us half-way through the cleanup.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        try:
            async with trio.open_nursery() as nursery:

                async def on_signals() -> None:
                    async for sig in signals:
                        log.info("got %s, shutting down", signal.Signals(sig).name)
                        nursery.cancel_scope.cancel()
                        return

                async def main_flow() -> None:
                    await run(opts, st)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(on_signals)
                nursery.start_soon(main_flow)
        finally:
            with trio.CancelScope(shield=True):
                await teardown(opts, st)
    if opts.init_foreground and st.init_status is not None:
        st.exit_code = st.init_status
    log.info("network-setup done (exit %d)", st.exit_code)
    return st.exit_code


def veth_collision(opts: Options) -> str | None:
    """Why the veth pair would shadow a network this namespace already has (a LAN, a VPN), or None.

    Our own stale host veth does not count: setup removes it first.
    """
    try:
        found = links.claims()
    except OSError as exc:  # NetlinkError is an OSError
        log.warning("cannot read this namespace's routes to check the veth subnet: %s", exc)
        return None
    what = f"{opts.veth_host_name} {opts.veth_host_address} / {opts.veth_ns_name} {opts.veth_ns_address}"
    return veth_conflict(what, opts.veth_networks, found, ignore_dev=opts.veth_host_name,
                         also_taken=[NetConfig(subnet=opts.subnet).subnet])


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(opts.debug, opts.logfile, stderr_level=logging.WARNING)
    if os.geteuid() != 0:
        log.error("network-setup needs root (it creates a network namespace and a veth pair)")
        return 1
    why = veth_collision(opts)  # before anything is created
    if why is not None:
        log.info("refusing to start: %s", why)  # the log file; stderr gets the one line below
        print(f"python -m rdswitch.network_setup: error: {why}", file=sys.stderr)
        return 2
    try:
        return trio.run(amain, opts)
    except KeyboardInterrupt:  # a second ^C during teardown
        return 130


if __name__ == "__main__":
    sys.exit(main())
