"""OpenSSH's ProxyCommand for the SSH forwards, with ``ProxyUseFdpass=yes``:

    python -m rdswitch.gvproxy.fdpass /run/.../vm-ssh.sock

connects to the unix socket that rdswitch gvproxy forwards to the VM's :22,
hands the connected descriptor to ssh over its stdout (SCM_RIGHTS) and exits:
ssh then talks to the VM on that socket itself, with no process in between.
"""

from __future__ import annotations

import os
import socket
import sys


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m rdswitch.gvproxy.fdpass SOCKET", file=sys.stderr)
        return 2
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(argv[0])
        with socket.socket(fileno=os.dup(1)) as out:
            socket.send_fds(out, [b"\0"], [conn.fileno()])
    except OSError as exc:
        print(f"rdswitch gvproxy: cannot reach the VM's sshd through {argv[0]}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
