"""network-setup's flags and the command lines of its children (pure functions).

Everything here is side-effect free so it can be unit-tested: argument
parsing and validation, the vm-switch command line, and the init command
line (``ip netns exec NS unshare --pid --mount-proc --fork --propagation
slave ARGS...``).
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import shlex
import sys

import attrs

from ..config import (
    DATA_PORT,
    DEFAULT_SUBNET,
    DEFAULT_VM_MAC,
    HANDSHAKE_PORT,
    VETH_HOST_NAME,
    VETH_NS_NAME,
    VETH_SUBNET,
    ConfigError,
    NetConfig,
    format_mac,
    go_bools,
    normalize_argv,
    parse_mac,
    veth_addresses,
)
from ..urls import parse_url

DEFAULT_HANDSHAKE_LISTEN = f"vsock://:{HANDSHAKE_PORT}"
DEFAULT_HOST_URL = f"vsock://2:{DATA_PORT}"
DEFAULT_NETNS = "rd-netns"
DEFAULT_VETH_HOST = VETH_HOST_NAME
DEFAULT_VETH_NS = VETH_NS_NAME
DEFAULT_VETH_SUBNET = VETH_SUBNET
DEFAULT_PID_FILE = "/run/wsl-init.pid"
DEFAULT_LOGFILE = "/var/log/network-setup.log"
DEFAULT_VM_SWITCH_LOGFILE = "/var/log/vm-switch.log"
DEFAULT_STOP_TIMEOUT = 2.0

#: The fixed part of the init command, as the incumbent network-setup runs it.
UNSHARE_PREFIX = ("unshare", "--pid", "--mount-proc", "--fork", "--propagation", "slave")

LONG_FLAGS = {
    "debug", "tap-interface", "subnet", "tap-mac-address", "vm-switch-path", "vm-switch-logfile", "vm-switch-offload", "unshare-arg",
    "logfile", "handshake-listen", "host-url", "netns", "veth-host-name", "veth-ns-name", "veth-host-address",
    "veth-ns-address", "veth-subnet", "pid-file", "stop-timeout", "dial-attempts", "init-foreground", "trace-packets",
}
#: The flags that take Go's ``-flag=true|false`` spelling too.
BOOL_FLAGS = {"debug", "vm-switch-offload", "trace-packets"}

# Linux interface names: 1..15 bytes, no '/', no whitespace, not "." or "..".
_IFNAME_RE = re.compile(r"^[^/\s:]{1,15}$")
# Namespace names become files under /run/netns.
_NETNS_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@attrs.frozen
class Options:
    debug: bool
    tap_interface: str
    subnet: str
    tap_mac_address: str
    vm_switch_path: str | None
    vm_switch_logfile: str | None
    unshare_args: tuple[str, ...]  # empty: start no init
    logfile: str | None
    handshake_listen: str
    host_url: str
    netns: str
    veth_host_name: str
    veth_ns_name: str
    veth_host_address: ipaddress.IPv4Interface
    veth_ns_address: ipaddress.IPv4Interface
    pid_file: str | None
    stop_timeout: float
    dial_attempts: int
    offload: bool = False
    init_foreground: bool = False
    trace_packets: bool = False

    @property
    def veth_networks(self) -> tuple[ipaddress.IPv4Network, ...]:
        """The networks the veth pair's addresses put on the two namespaces (one, unless they differ)."""
        nets = (self.veth_host_address.network, self.veth_ns_address.network)
        return nets[:1] if nets[0] == nets[1] else nets


def check_ifname(name: str, flag: str) -> str:
    if not _IFNAME_RE.match(name) or name in (".", ".."):
        raise ConfigError(f"invalid {flag} {name!r}: an interface name is 1-15 characters without '/', ':' or spaces")
    return name


def check_netns(name: str) -> str:
    if not _NETNS_RE.match(name) or name in (".", ".."):
        raise ConfigError(f"invalid --netns {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    return name


def parse_interface_address(text: str, flag: str) -> ipaddress.IPv4Interface:
    if "/" not in text:
        raise ConfigError(f"invalid {flag} {text!r}: expected an IPv4 address with a prefix length, like 192.168.143.2/24")
    try:
        iface = ipaddress.IPv4Interface(text)
    except ValueError as exc:
        raise ConfigError(f"invalid {flag} {text!r}: {exc}") from None
    if iface.network.prefixlen == 32:
        raise ConfigError(f"invalid {flag} {text!r}: a /32 leaves no room for the other end of the veth")
    return iface


def parse_unshare_arg(text: str | None) -> tuple[str, ...]:
    if text is None or not text.strip():
        return ()
    try:
        return tuple(shlex.split(text))
    except ValueError as exc:
        raise ConfigError(f"invalid --unshare-arg {text!r}: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rdswitch.network_setup",
        description="Answer the host's handshake, open the data connection, create the network namespace and veth "
                    "pair, and start vm-switch and the distro's init inside it.",
    )
    p.add_argument("--debug", action="store_true", help="verbose logging, also to stderr")
    p.add_argument("--tap-interface", default="eth0", help="tap device vm-switch creates (default eth0)")
    p.add_argument("--subnet", default=DEFAULT_SUBNET, help=f"virtual subnet (default {DEFAULT_SUBNET})")
    p.add_argument("--tap-mac-address", default=DEFAULT_VM_MAC, help=f"MAC of the tap (default {DEFAULT_VM_MAC})")
    p.add_argument("--vm-switch-path", default=None,
                   help="vm-switch program to run (default: this Python with -m rdswitch.vm)")
    p.add_argument("--vm-switch-logfile", default=DEFAULT_VM_SWITCH_LOGFILE,
                   help=f"vm-switch's log file (default {DEFAULT_VM_SWITCH_LOGFILE}; empty: none)")
    p.add_argument("--vm-switch-offload", action="store_true",
                   help="run vm-switch with --offload (virtio-net headers, TSO both ways; needs rdswitch's host-switch)")
    p.add_argument("--unshare-arg", default=None,
                   help="command (split like a shell) that 'unshare --pid --mount-proc --fork --propagation slave' "
                        "runs inside the namespace, e.g. /sbin/init; none: start no init")
    p.add_argument("--logfile", default=DEFAULT_LOGFILE, help=f"log file (default {DEFAULT_LOGFILE}; empty: none)")
    p.add_argument("--handshake-listen", default=DEFAULT_HANDSHAKE_LISTEN,
                   help=f"where to answer the handshake (default {DEFAULT_HANDSHAKE_LISTEN})")
    p.add_argument("--host-url", default=DEFAULT_HOST_URL,
                   help=f"the host's data connection, dialled after READY (default {DEFAULT_HOST_URL})")
    p.add_argument("--netns", default=DEFAULT_NETNS, help=f"network namespace to create (default {DEFAULT_NETNS})")
    p.add_argument("--veth-host-name", default=DEFAULT_VETH_HOST, help=f"veth end in this namespace (default {DEFAULT_VETH_HOST})")
    p.add_argument("--veth-ns-name", default=DEFAULT_VETH_NS, help=f"veth end inside the namespace (default {DEFAULT_VETH_NS})")
    add_veth_arguments(p)
    p.add_argument("--pid-file", default=DEFAULT_PID_FILE,
                   help=f"where to write the unshare process's pid (default {DEFAULT_PID_FILE}; empty: none)")
    p.add_argument("--stop-timeout", default=str(DEFAULT_STOP_TIMEOUT),
                   help=f"seconds children get to exit after SIGTERM before SIGKILL (default {DEFAULT_STOP_TIMEOUT:g})")
    p.add_argument("--dial-attempts", default="10", help="tries (0.5 s apart) to dial the host after READY (default 10)")
    p.add_argument("--trace-packets", action="store_true",
                   help="start vm-switch with per-packet tracing on (one log line per frame; SIGUSR1 to vm-switch toggles it)")
    p.add_argument("--init-foreground", action="store_true",
                   help="give init this process's stdin (a terminal for an interactive shell), keep vm-switch off "
                        "stdout/stderr, and exit with init's status when it ends (what 'python -m rdswitch sandbox' uses)")
    return p


def add_veth_arguments(p) -> None:
    """--veth-subnet and the four flags it stands for (network-setup's and the sandbox's)."""
    host, ns = veth_addresses(DEFAULT_VETH_SUBNET)
    p.add_argument("--veth-subnet", default=None, metavar="CIDR",
                   help=f"subnet of the veth pair: the host end gets .2, the namespace end .1 (default "
                        f"{DEFAULT_VETH_SUBNET}: {host} / {ns}); pick another when a LAN or VPN uses it")
    p.add_argument("--veth-host-address", default=None, metavar="IP/LEN",
                   help=f"address of the host veth end, instead of --veth-subnet's .2 (default {host})")
    p.add_argument("--veth-ns-address", default=None, metavar="IP/LEN",
                   help=f"address of the namespace veth end, instead of --veth-subnet's .1 (default {ns}); "
                        "the first layout is --veth-host-name veth-rd0 --veth-ns-name veth-rd1 "
                        "--veth-host-address 192.168.1.1/24 --veth-ns-address 192.168.1.2/24")


def veth_pair_addresses(ns: argparse.Namespace) -> tuple[ipaddress.IPv4Interface, ipaddress.IPv4Interface]:
    """The (host end, namespace end) addresses the veth flags ask for; ConfigError for a bad combination."""
    if ns.veth_subnet is not None and (ns.veth_host_address is not None or ns.veth_ns_address is not None):
        raise ConfigError("give --veth-subnet or --veth-host-address/--veth-ns-address, not both")
    host, nsaddr = veth_addresses(ns.veth_subnet or DEFAULT_VETH_SUBNET)
    if ns.veth_host_address is not None:
        host = parse_interface_address(ns.veth_host_address, "--veth-host-address")
    if ns.veth_ns_address is not None:
        nsaddr = parse_interface_address(ns.veth_ns_address, "--veth-ns-address")
    if host.ip == nsaddr.ip:
        raise ConfigError(f"--veth-host-address and --veth-ns-address are the same address {host.ip}")
    return host, nsaddr


def _parse_float(text: str, flag: str, lo: float, hi: float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"invalid {flag} {text!r}: not a number") from None
    if not lo <= value <= hi:
        raise ConfigError(f"invalid {flag} {text!r}: must be {lo:g}..{hi:g}")
    return value


def validate(ns: argparse.Namespace) -> Options:
    """Turn parsed flags into Options; raise ConfigError with a message for the user."""
    net = NetConfig(subnet=ns.subnet)  # raises ConfigError for a bad subnet
    mac = format_mac(parse_mac(ns.tap_mac_address))
    for flag, url in (("--handshake-listen", ns.handshake_listen), ("--host-url", ns.host_url)):
        try:
            ep = parse_url(url)
        except ConfigError as exc:
            raise ConfigError(f"{flag}: {exc}") from None
        if ep.scheme == "fd":
            raise ConfigError(f"{flag}: {url!r}: fd:// URLs cannot be used here")
    if ns.host_url.startswith("vsock://") and parse_url(ns.host_url).cid is None:
        raise ConfigError(f"--host-url {ns.host_url!r}: a vsock URL to dial needs a CID (the host is vsock://2:PORT)")
    host_name = check_ifname(ns.veth_host_name, "--veth-host-name")
    ns_name = check_ifname(ns.veth_ns_name, "--veth-ns-name")
    tap = check_ifname(ns.tap_interface, "--tap-interface")
    if tap == ns_name:
        raise ConfigError(f"--tap-interface and --veth-ns-name are both {tap!r}; they live in the same namespace")
    host_addr, ns_addr = veth_pair_addresses(ns)
    for veth in {host_addr.network, ns_addr.network}:
        if veth.overlaps(net.subnet):
            raise ConfigError(f"the veth subnet {veth} overlaps the virtual subnet {net.subnet} (--subnet); "
                              "pick another --veth-subnet")
    if ns.vm_switch_path is not None and not ns.vm_switch_path.strip():
        raise ConfigError("--vm-switch-path is empty")
    dial_attempts = int(_parse_float(ns.dial_attempts, "--dial-attempts", 1, 1000))
    return Options(
        debug=ns.debug,
        tap_interface=tap,
        subnet=ns.subnet,
        tap_mac_address=mac,
        vm_switch_path=ns.vm_switch_path,
        vm_switch_logfile=ns.vm_switch_logfile or None,
        offload=ns.vm_switch_offload,
        unshare_args=parse_unshare_arg(ns.unshare_arg),
        logfile=ns.logfile or None,
        handshake_listen=ns.handshake_listen,
        host_url=ns.host_url,
        netns=check_netns(ns.netns),
        veth_host_name=host_name,
        veth_ns_name=ns_name,
        veth_host_address=host_addr,
        veth_ns_address=ns_addr,
        pid_file=ns.pid_file or None,
        stop_timeout=_parse_float(ns.stop_timeout, "--stop-timeout", 0, 600),
        dial_attempts=dial_attempts,
        init_foreground=ns.init_foreground,
        trace_packets=ns.trace_packets,
    )


def parse_args(argv: list[str]) -> Options:
    """Parse argv (single-dash incumbent spellings accepted); exit 2 with a message on bad input."""
    parser = build_parser()
    ns = parser.parse_args(go_bools(normalize_argv(list(argv), LONG_FLAGS), BOOL_FLAGS))
    try:
        return validate(ns)
    except ConfigError as exc:
        parser.error(str(exc))
        raise  # pragma: no cover - parser.error exits


def ns_exec(netns: str, cmd: list[str] | tuple[str, ...]) -> list[str]:
    return ["ip", "netns", "exec", netns, *cmd]


# Run inside the namespace before vm-switch: moves the data connection from
# whatever number it has in the parent onto fd 3, where vm-switch (ours, and
# the incumbent's) expects it, then execs vm-switch.
FD3_TRAMPOLINE = ("import os, sys; fd = int(sys.argv[1])\n"
                  "if fd != 3:\n    os.dup2(fd, 3); os.close(fd)\n"
                  "os.execvp(sys.argv[2], sys.argv[2:])")


def vm_switch_command(opts: Options, fd: int, python: str = sys.executable) -> list[str]:
    """vm-switch's command line, run inside the namespace; the data connection ``fd`` becomes its fd 3."""
    prog = [opts.vm_switch_path] if opts.vm_switch_path else [python, "-m", "rdswitch.vm"]
    cmd = [*prog, "--tap-interface", opts.tap_interface, "--tap-mac-address", opts.tap_mac_address,
           "--subnet", opts.subnet]
    if opts.debug:
        cmd.append("--debug")
    if opts.vm_switch_logfile:
        cmd += ["--logfile", opts.vm_switch_logfile]
    if opts.offload:
        cmd.append("--offload")
    if opts.trace_packets:
        cmd.append("--trace-packets")
    return ns_exec(opts.netns, [python, "-c", FD3_TRAMPOLINE, str(fd), *cmd])


def init_command(opts: Options) -> list[str] | None:
    """The distro init's command line, or None when no --unshare-arg was given."""
    if not opts.unshare_args:
        return None
    return ns_exec(opts.netns, [*UNSHARE_PREFIX, *opts.unshare_args])
