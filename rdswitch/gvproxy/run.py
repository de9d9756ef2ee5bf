"""``rdswitch gvproxy``'s trio shell: host-switch's nursery tree plus what gvproxy adds around it.

    rdswitch gvproxy -listen unix:///.../api.sock -listen-qemu unix:///.../qemu.sock -ssh-port 52345 \\
        -pid-file /.../gvproxy.pid -log-file /.../gvproxy.log \\
        -forward-sock /.../podman.sock -forward-dest /run/podman/podman.sock \\
        -forward-user core -forward-identity /.../key [--allow-outbound ...]

The command line becomes host-switch's argv (:mod:`.options`), parsed and
checked by host-switch itself; then ``host.amain`` runs with one extra task
tree in its nursery: the notifications, the private forward to the VM's :22
and one SSH supervisor per ``-forward-sock``.  The pid file is written
before anything listens and removed at exit; the log file (truncated at
start, as gvproxy does) takes every log line instead of stderr.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import shutil
import sys
import tempfile

import trio

from ..host import __main__ as host_main
from ..logs import FORMAT
from ..services.forwarder import parse_expose
from . import options
from .notify import Notifier
from .options import PROG, Plan, UsageError
from .ssh import Supervisor, ssh_command

log = logging.getLogger("rdswitch.gvproxy")

LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
          "warning": logging.WARNING, "error": logging.ERROR, "fatal": logging.CRITICAL, "panic": logging.CRITICAL}


def version_line() -> str:
    return f"gvproxy version {options.VERSION} (rdswitch gvproxy)"


def host_args(plan: Plan):
    """host-switch's own parser on the plan's argv; its complaint becomes one UsageError line."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return host_main.parse_args(list(plan.host_argv))
    except SystemExit:
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        raise UsageError((lines[-1] if lines else "bad flags").split(": error: ", 1)[-1]) from None


def setup_logging(plan: Plan) -> None:
    """Every line to the -log-file (truncated, as gvproxy's os.Create does), else to stderr."""
    root = logging.getLogger()
    root.setLevel(LEVELS.get(plan.log_level, logging.INFO))
    handler: logging.Handler = logging.StreamHandler(sys.stderr)
    if plan.log_file:
        try:
            handler = logging.FileHandler(plan.log_file, mode="w")
        except OSError as exc:
            raise UsageError(f"unable to open log file {plan.log_file}: {exc.strerror or exc}") from None
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    for noisy in ("pyroute2", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def write_pid_file(path: str) -> None:
    with open(path, "w") as f:
        f.write(str(os.getpid()))  # no newline, as gvproxy writes it


async def amain(plan: Plan, args) -> int:
    runtime = tempfile.mkdtemp(prefix="rdswitch-gvproxy-")  # 0700: the private socket to the VM's sshd
    try:
        return await host_main.amain(args, extra=functools.partial(extras, plan, runtime))
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


async def extras(plan: Plan, runtime: str, hs, forwarder, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """What gvproxy does beyond host-switch, in host-switch's nursery (it ends with everything else)."""
    async with trio.open_nursery() as nursery:
        if plan.notification:
            notifier = Notifier(plan.notification)
            nursery.start_soon(notifier.deliver)
            notifier.notify("ready")  # every listener is up when this runs
            nursery.start_soon(notifier.watch, hs)
        if plan.ssh_forwards:
            ssh = shutil.which("ssh")
            proxy_socket = os.path.join(runtime, "vm-ssh.sock")
            vm_ip = str(hs.net.vm_ip)
            await forwarder.expose(parse_expose({"local": proxy_socket, "remote": f"tcp://{vm_ip}:22",
                                                 "protocol": "unix"}, None, hs.net.subnet))
            for fwd in plan.ssh_forwards:
                nursery.start_soon(Supervisor(fwd, ssh_command(ssh, fwd, vm_ip, proxy_socket)).run)
        task_status.started()


def main(argv: list[str]) -> int:
    try:
        plan = options.plan_from_argv(argv)
        if plan.help:
            print(options.HELP, end="")
            return 0
        if plan.version:
            print(version_line())
            return 0
        if plan.ssh_forwards and shutil.which("ssh") is None:
            raise UsageError("-forward-sock needs OpenSSH's ssh client on PATH (apt-get install openssh-client)")
        args = host_args(plan)
        for zone in plan.zones:  # checked already; host-switch's DNS takes gvproxy's types.Zone shape as its API does
            args.dns.add_zone(zone)
        setup_logging(plan)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    for warning in plan.warnings:
        log.warning("%s", warning)
    log.info("%s", version_line())
    if plan.pid_file:
        try:
            write_pid_file(plan.pid_file)
        except OSError as exc:
            log.error("failed to create pidfile: %s", exc.strerror or exc)
            return 1
    host_main.raise_fd_limit()
    if args.trace_packets:
        from ..aio import packet_trace
        packet_trace.set_enabled(True, "-debug")
    try:
        return trio.run(amain, plan, args)
    except KeyboardInterrupt:
        return 130
    finally:
        if plan.pid_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(plan.pid_file)
        logging.shutdown()
