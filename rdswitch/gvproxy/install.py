"""``rdswitch gvproxy --install DIR``: a launcher named ``gvproxy`` that podman machine finds.

podman looks for its helpers (gvproxy among them) in containers.conf's
``helper_binaries_dir``, by default /usr/local/libexec/podman,
/usr/local/lib/podman, /usr/libexec/podman and /usr/lib/podman, in that order:
a launcher in /usr/local/libexec/podman is found before a packaged gvproxy in
/usr/libexec/podman.  The launcher is a two-line shell script that runs this
Python with ``-m rdswitch.gvproxy``.
"""

from __future__ import annotations

import os
import shlex
import sys

DEFAULT_HELPER_DIRS = ("/usr/local/libexec/podman", "/usr/local/lib/podman", "/usr/libexec/podman", "/usr/lib/podman")


def launcher_text(python: str = sys.executable) -> str:
    return ("#!/bin/sh\n# rdswitch's gvproxy: gvisor-tap-vsock's command line served by rdswitch (rdswitch gvproxy --help)\n"
            f"exec {shlex.quote(python)} -m rdswitch.gvproxy \"$@\"\n")


def install(directory: str, python: str = sys.executable) -> str:
    """Write DIR/gvproxy (mode 0755, replacing a file there); returns its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "gvproxy")
    tmp = f"{path}.rdswitch-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(launcher_text(python))
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    return path


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: rdswitch gvproxy --install DIR   (e.g. /usr/local/libexec/podman)", file=sys.stderr)
        return 2
    directory = os.path.abspath(argv[0])
    try:
        path = install(directory)
    except OSError as exc:
        print(f"rdswitch gvproxy: error: cannot write {directory}/gvproxy: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    if os.path.realpath(directory) not in map(os.path.realpath, DEFAULT_HELPER_DIRS):
        print("podman finds it once containers.conf names the directory first, e.g. in "
              "~/.config/containers/containers.conf:\n"
              "  [engine]\n"
              f"  helper_binaries_dir = [{', '.join(repr(d).replace(chr(39), chr(34)) for d in (directory, *DEFAULT_HELPER_DIRS))}]")
    return 0
