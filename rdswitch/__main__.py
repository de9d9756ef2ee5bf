"""The ``rdswitch`` command: ``rdswitch sandbox`` (the main job), ``rdswitch ctl`` (the API client) and
``rdswitch gvproxy`` (gvisor-tap-vsock's gvproxy command line, for podman machine).

The sandbox itself lives in :mod:`rdswitch.sandbox` (host-switch, the
handshake, network-setup, vm-switch on fd 3, the veth pair, CMD as pid 1 of a
new pid namespace).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: rdswitch sandbox [OPTIONS] [-- CMD ...]   (rdswitch sandbox --help)\n"
              "       rdswitch ctl --api URL {expose,unexpose,list,leases,dns,stats} ...   (rdswitch ctl --help)\n"
              "       rdswitch gvproxy [gvproxy's flags] [host-switch's long flags]   (rdswitch gvproxy --help)\n"
              "       rdswitch gvproxy --install DIR   (a 'gvproxy' launcher for podman's helper_binaries_dir)")
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
    if argv[0] == "gvproxy":
        if argv[1:2] == ["--install"]:
            from .gvproxy.install import main as install_main
            return install_main(argv[2:])
        from .gvproxy.run import main as gvproxy_main
        return gvproxy_main(argv[1:])
    print(f"unknown command {argv[0]!r}; try: python -m rdswitch sandbox", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
