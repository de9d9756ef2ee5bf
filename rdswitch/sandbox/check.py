"""The sandbox's self-check: runs as CMD (pid 1 of the namespace's pid namespace) and tries real tools.

    python -m rdswitch.sandbox.check --subnet 192.168.127.0/24 --http-port PORT --veth-peer 192.168.143.2

Every address comes from the subnet (gateway .1, VM .2, host alias .254).
One line per check on stdout; exit status 0 when all pass, 1 otherwise.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import subprocess
import sys

from .options import HOST_ALIAS


def run(cmd: list[str]) -> tuple[bool, str]:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return False, "timed out"
    lines = res.stdout.strip().splitlines() or res.stderr.strip().splitlines() or [""]
    detail = lines[-1] if cmd[0] == "ping" else lines[0]
    words = detail.split("\\")[0].split()
    if cmd[0] == "ip" and "inet" in words:  # "3: eth0    inet 192.168.127.2/24 scope global eth0\ ..."
        detail = f"{words[1].rstrip(':')} {words[words.index('inet') + 1]}"
    return res.returncode == 0 and bool(res.stdout.strip()), detail.strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rdswitch.sandbox.check")
    p.add_argument("--subnet", required=True)
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--veth-peer", required=True, help="the host end of the veth pair, pinged from the namespace")
    args = p.parse_args(argv)
    net = ipaddress.IPv4Network(args.subnet)
    gw, vm, alias = (str(net.network_address + i) for i in (1, 2, 254))
    veth_peer = args.veth_peer
    checks: list[tuple[str, list[str] | None, object]] = [
        ("pid 1 of its own pid namespace", None, lambda: (os.getpid() == 1, f"pid {os.getpid()}")),
        ("lease on eth0", ["ip", "-4", "-o", "addr", "show", "dev", "eth0"], f" {vm}/{net.prefixlen}"),
        ("default route via the gateway", ["ip", "-4", "route", "show", "default"], f"via {gw}"),
        ("ping the gateway", ["ping", "-c", "1", "-W", "2", gw], None),
        (f"ping {veth_peer} over the veth", ["ping", "-c", "1", "-W", "2", veth_peer], None),
        ("ping the host alias", ["ping", "-c", "1", "-W", "2", alias], None),
        (f"DNS {HOST_ALIAS}", ["getent", "hosts", HOST_ALIAS], alias),
        ("HTTP to the host's 127.0.0.1 via the alias",
         ["curl", "-sS", "--max-time", "5", f"http://{alias}:{args.http_port}/"], "hello"),
    ]
    ok = True
    for name, cmd, expect in checks:
        if cmd is None:
            good, detail = expect()
        elif shutil.which(cmd[0]) is None:
            print(f"  [skip] {name}: {cmd[0]} not installed", flush=True)
            continue
        else:
            good, detail = run(cmd)
            if good and isinstance(expect, str):
                good = expect in detail
        ok &= good
        print(f"  [{'ok' if good else 'FAIL'}] {name}: {detail}", flush=True)
    print("all checks passed" if ok else "some checks failed", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
