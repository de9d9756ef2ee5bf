"""``-forward-sock/-forward-dest/-forward-user/-forward-identity``: a host unix socket into the VM over SSH (trio).

Each forward is one OpenSSH client process, ``ssh -N -L SOCK:DEST`` (the
system's ``ssh``, with no user or system ssh_config), that reaches the VM's
sshd through rdswitch itself: its ProxyCommand connects to a private unix
socket that host-switch forwards to the VM's :22 and passes the descriptor
to ssh (``ProxyUseFdpass``), so nothing sits between ssh and the VM.  ssh
listens on SOCK (mode 0600, a stale file replaced) and opens one channel to
DEST per connection, as gvproxy's forwarder does.

The process is supervised: when it ends (the VM rebooted, sshd is not up
yet, a wrong key or user) it is started again after a back-off, and each kind
of failure is logged once, in one line, until the forward is up again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import stat
import subprocess
import sys

import attrs
import trio

from .options import SshForward

log = logging.getLogger("rdswitch.gvproxy")

UP_MARK = "rdswitch-forward-up"
FIRST_BACKOFF = 0.25
MAX_BACKOFF = 2.0
MAX_STDERR_LINES = 50


def ssh_command(ssh: str, fwd: SshForward, vm_ip: str, proxy_socket: str, python: str = sys.executable) -> list[str]:
    proxy = f"{shlex.quote(python)} -m rdswitch.gvproxy.fdpass {shlex.quote(proxy_socket)}".replace("%", "%%")
    opts = {
        "BatchMode": "yes", "IdentitiesOnly": "yes", "IdentityAgent": "none",
        "PasswordAuthentication": "no", "KbdInteractiveAuthentication": "no",
        # gvproxy does not check the VM's host key either (a new VM has a new key)
        "StrictHostKeyChecking": "no", "UserKnownHostsFile": "/dev/null", "GlobalKnownHostsFile": "/dev/null",
        "CheckHostIP": "no", "LogLevel": "ERROR", "ConnectTimeout": "10",
        "ServerAliveInterval": "5", "ServerAliveCountMax": "3",
        "ExitOnForwardFailure": "yes", "StreamLocalBindUnlink": "yes", "StreamLocalBindMask": "0177",
        "ProxyCommand": proxy, "ProxyUseFdpass": "yes",
        # runs once the forward listens: how we know it is up
        "PermitLocalCommand": "yes", "LocalCommand": f"echo {UP_MARK}",
    }
    cmd = [ssh, "-F", "/dev/null", "-N", "-T", "-i", fwd.identity, "-l", fwd.user, "-p", "22"]
    for key, value in opts.items():
        cmd += ["-o", f"{key}={value}"]
    return [*cmd, "-L", f"{fwd.socket}:{fwd.dest}", vm_ip]


def classify(lines: list[str], fwd: SshForward) -> tuple[str, int, str]:
    """(kind, log level, one line) for why an ssh process ended, from its stderr."""
    text = " ".join(lines)
    last = next((ln for ln in reversed(lines) if ln.strip()), "ssh closed the connection")
    if "Permission denied" in text:
        return ("auth", logging.ERROR, f"the VM's sshd refused user {fwd.user!r} with the key {fwd.identity} ({last}); "
                                        "check -forward-user and -forward-identity")
    if "Load key" in text or "invalid format" in text or "UNPROTECTED PRIVATE KEY" in text or "no such identity" in text:
        return "key", logging.ERROR, f"cannot use the key {fwd.identity}: {last}"
    if "local forwarding" in text or "cannot listen" in text.lower() or "unix_listener" in text:
        return "listen", logging.ERROR, f"cannot listen on {fwd.socket}: {last}"
    return "waiting", logging.INFO, f"waiting for the VM's sshd ({last})"


@attrs.define(eq=False)
class Supervisor:
    fwd: SshForward
    cmd: list[str]
    up: bool = False
    starts: int = 0

    @property
    def name(self) -> str:
        return f"ssh forward {self.fwd.socket} -> {self.fwd.user}@VM:{self.fwd.dest}"

    async def run(self) -> None:
        """Keep the forward up until cancelled; then end ssh and remove the socket."""
        backoff = FIRST_BACKOFF
        last_kind = None
        try:
            while True:
                was_up, kind, level, why, last = await self._attempt()
                if was_up:
                    log.warning("%s: the connection to the VM ended (%s); reconnecting", self.name, last)
                    backoff, last_kind = FIRST_BACKOFF, None
                elif kind != last_kind:
                    log.log(level, "%s: %s; retrying", self.name, why)
                    last_kind = kind
                else:
                    log.debug("%s: %s; retrying in %gs", self.name, why, backoff)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
        finally:
            _remove_socket(self.fwd.socket)

    async def _attempt(self) -> tuple[bool, str, int, str, str]:
        self.starts += 1
        self.up = False
        lines: list[str] = []
        proc = await trio.lowlevel.open_process(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_stdout, proc.stdout)
                nursery.start_soon(self._read_stderr, proc.stderr, lines)
                await proc.wait()
        finally:
            with trio.CancelScope(shield=True):
                if proc.returncode is None:
                    proc.kill()
                    with trio.move_on_after(5):
                        await proc.wait()
                for pipe in (proc.stdout, proc.stderr):
                    with contextlib.suppress(Exception):
                        await pipe.aclose()
        was_up = self.up
        self.up = False
        kind, level, why = classify(lines, self.fwd)
        last = lines[-1] if lines else f"ssh exited with status {proc.returncode}"
        return was_up, kind, level, why, last

    async def _read_stdout(self, pipe) -> None:
        async for line in _lines(pipe):
            if line.strip() == UP_MARK:
                self.up = True
                log.info("%s: up", self.name)

    async def _read_stderr(self, pipe, lines: list[str]) -> None:
        async for line in _lines(pipe):
            line = line.strip()
            if not line:
                continue
            if self.up:  # a channel that failed while the forward is up: worth a line each
                log.warning("%s: %s", self.name, line)
            lines.append(line)
            del lines[:-MAX_STDERR_LINES]


async def _lines(pipe):
    buf = b""
    while True:
        chunk = await pipe.receive_some(4096)
        if not chunk:
            if buf:
                yield buf.decode(errors="replace")
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line.decode(errors="replace")
        buf = buf[-65536:]


def _remove_socket(path: str) -> None:
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
