"""The sandbox's flags and the command lines of its children (pure functions, no side effects).

Host-switch's and vm-switch's flags are passed through; every one is checked
here with the children's own parsers before anything starts, so a bad flag is
one line on stderr and exit status 2, never a half-built sandbox.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import ipaddress
import os
import re
import shlex
import sys

import attrs

from ..config import ConfigError, VETH_HOST_NAME, VETH_NS_NAME, VETH_SUBNET, veth_addresses
from ..network_setup.options import add_veth_arguments, check_ifname, veth_pair_addresses

PROG = "python -m rdswitch sandbox"
DEFAULT_SUBNET = "192.168.127.0/24"
DEFAULT_ALLOW = ("127.0.0.0/8",)
#: The veth pair of the contract (docs/wire-contract.md, network-setup's defaults: veth-rd-wsl
#: 192.168.143.2/24, veth-rd-ns 192.168.143.1/24).  Its host end lives in the sandbox's own "VM"
#: namespace, never in the host's, so two sandboxes do not collide; its namespace end is in CMD's
#: namespace, where it would shadow a host network on the same subnet (the start checks).
HOST_ALIAS = "host.rancher-desktop.internal"
_VETH_HOST_ADDRESS, _VETH_NS_ADDRESS = veth_addresses(VETH_SUBNET)

_NETNS_RE = re.compile(r"^[A-Za-z0-9_.-]{1,60}$")

#: Runs as the namespace's init (pid 1) until the sandbox says go on the FIFO
#: (after the lease), then becomes CMD with exec, so CMD is pid 1.  $1 is the
#: FIFO, the rest is CMD.  EOF instead of "go" means the sandbox gave up.
GATE = 'read -r go < "$1" && [ "$go" = go ] || exit 125; shift; exec "$@"'


class UsageError(Exception):
    """A bad flag; str() is the one-line message."""


@attrs.frozen
class Options:
    subnet: ipaddress.IPv4Network
    host_args: tuple[str, ...]  # host-switch flags passed through (validated)
    offload: bool
    netns: str
    command: tuple[str, ...]  # empty: interactive shell or self-check, decided at run time
    self_check: bool
    debug: bool
    stop_timeout: float
    veth_host_name: str = VETH_HOST_NAME
    veth_ns_name: str = VETH_NS_NAME
    veth_host_address: ipaddress.IPv4Interface = _VETH_HOST_ADDRESS
    veth_ns_address: ipaddress.IPv4Interface = _VETH_NS_ADDRESS

    @property
    def veth_networks(self) -> tuple[ipaddress.IPv4Network, ...]:
        nets = (self.veth_host_address.network, self.veth_ns_address.network)
        return nets[:1] if nets[0] == nets[1] else nets

    @property
    def gateway(self) -> str:
        return str(self.subnet.network_address + 1)

    @property
    def vm_address(self) -> str:
        return str(self.subnet.network_address + 2)

    @property
    def host_alias(self) -> str:
        return str(self.subnet.network_address + 254)

    @property
    def vm_netns(self) -> str:
        """The "VM" root namespace network-setup runs in (where the host end of the veth lives)."""
        return f"{self.netns}-vm"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, raised instead of usage + exit
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="A network namespace networked through rdswitch's real path: host-switch, the handshake, "
                    "network-setup, vm-switch on fd 3, the veth pair, and CMD as pid 1 of a new pid namespace.",
        epilog="Without CMD: an interactive shell when stdin is a terminal, else a self-check. Exit status: CMD's.",
    )
    h = p.add_argument_group("host-switch (passed through)")
    h.add_argument("--subnet", default=DEFAULT_SUBNET, help=f"virtual subnet (default {DEFAULT_SUBNET}); gateway .1, "
                                                           "VM .2, host alias .254")
    h.add_argument("--mtu", default=None, help="MTU announced by DHCP")
    h.add_argument("--allow-outbound", action="append", default=[], metavar="CIDR",
                   help="where flows from the namespace may go (repeatable; default 127.0.0.0/8: the host's "
                        "loopback only; 0.0.0.0/0 for everything)")
    h.add_argument("--dns-upstream", action="append", default=[], metavar="IP[:PORT]",
                   help="upstream DNS server (repeatable; default: the host's resolv.conf)")
    h.add_argument("--dns-record", action="append", default=[], metavar="NAME=IP", help="extra DNS record (repeatable)")
    h.add_argument("--dns-search", action="append", default=[], metavar="DOMAIN", help="search domain (repeatable)")
    h.add_argument("--port-forward", action="append", default=[], metavar="LOCAL=REMOTE",
                   help="static forward, e.g. 127.0.0.1:2222=192.168.127.2:22 (repeatable)")
    h.add_argument("--api-listen", action="append", default=[], metavar="URL",
                   help="also serve the HTTP API here (unix:///path or tcp://127.0.0.1:PORT)")
    h.add_argument("--capture", default=None, metavar="FILE", help="write every frame to this pcap file")
    v = p.add_argument_group("vm-switch (passed through)")
    v.add_argument("--offload", action="store_true", help="run vm-switch with --offload (TSO both ways)")
    n = p.add_argument_group("network-setup (passed through)")
    n.add_argument("--veth-host-name", default=VETH_HOST_NAME, help=f"veth end in network-setup's namespace "
                                                                    f"(default {VETH_HOST_NAME})")
    n.add_argument("--veth-ns-name", default=VETH_NS_NAME, help=f"veth end in CMD's namespace (default {VETH_NS_NAME})")
    add_veth_arguments(n)
    s = p.add_argument_group("sandbox")
    s.add_argument("--netns", default=None, metavar="NAME",
                   help="name of the namespace CMD runs in (default rdsbx-PID; NAME-vm is network-setup's)")
    s.add_argument("--stop-timeout", default="1", metavar="SECONDS",
                   help="seconds CMD gets after SIGTERM before SIGKILL at teardown (default 1)")
    s.add_argument("--self-check", action="store_true",
                   help="run the self-check as CMD even on a terminal (the default without CMD and terminal)")
    s.add_argument("--debug", action="store_true", help="verbose logs of every component on stderr")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ...: run CMD as the namespace's init")
    return p


def host_switch_flags(ns: argparse.Namespace) -> list[str]:
    out = ["--subnet", ns.subnet]
    if ns.mtu is not None:
        out += ["--mtu", ns.mtu]
    for cidr in ns.allow_outbound or DEFAULT_ALLOW:
        out += ["--allow-outbound", cidr]
    for flag, values in (("--dns-upstream", ns.dns_upstream), ("--dns-record", ns.dns_record),
                         ("--dns-search", ns.dns_search), ("--port-forward", ns.port_forward),
                         ("--api-listen", ns.api_listen)):
        for value in values:
            out += [flag, value]
    if ns.capture is not None:
        out += ["--capture", ns.capture]
    return out


def _check_with(parse, argv: list[str], who: str):
    """Run a child's own argument parser on ``argv``; its complaint becomes one UsageError line."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return parse(argv)
    except SystemExit as exc:
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        msg = lines[-1] if lines else f"exit status {exc.code}"
        msg = msg.split(": error: ", 1)[-1]
        raise UsageError(f"{who}: {msg}") from None


def check_host_flags(host_args: list[str]) -> None:
    """host-switch's own checks: its parser, then the DNS flags it only checks when it starts."""
    from ..config import ConfigError
    from ..host import __main__ as host_main
    # the listen URL is a placeholder: only the flags are checked
    ns = _check_with(host_main.parse_args, ["--listen", "unix:///nonexistent/check.sock", *host_args], "host-switch")
    try:
        from ..host import dns_server
        dns_server.from_args(ns, ns.net)
    except ConfigError as exc:
        raise UsageError(f"host-switch: {exc}") from None
    except (ImportError, AttributeError):  # pragma: no cover - a host-switch without that hook
        pass


def parse(argv: list[str], pid: int | None = None) -> Options:
    """Parse and validate; raise UsageError (one line) for anything wrong."""
    ns = build_parser().parse_args(argv)
    cmd = list(ns.command)
    if cmd[:1] == ["--"]:
        cmd = cmd[1:]
    elif cmd and cmd[0].startswith("-"):
        raise UsageError(f"unrecognized arguments: {cmd[0]}")
    if cmd and ns.self_check:
        raise UsageError("--self-check and a CMD exclude each other")
    try:
        subnet = ipaddress.IPv4Network(ns.subnet)
    except ValueError as exc:
        raise UsageError(f"invalid --subnet {ns.subnet!r}: {exc}") from None
    try:
        veth_host, veth_ns = veth_pair_addresses(ns)
        veth_host_name = check_ifname(ns.veth_host_name, "--veth-host-name")
        veth_ns_name = check_ifname(ns.veth_ns_name, "--veth-ns-name")
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    if veth_ns_name == "eth0":
        raise UsageError("--veth-ns-name eth0: that is the name of CMD's tap")
    for veth_net in {veth_host.network, veth_ns.network}:
        if subnet.overlaps(veth_net):
            raise UsageError(f"--subnet {subnet} overlaps the veth pair's {veth_net} inside the namespace "
                             "(pick another --veth-subnet)")
    try:
        stop_timeout = float(ns.stop_timeout)
    except ValueError:
        raise UsageError(f"invalid --stop-timeout {ns.stop_timeout!r}: not a number") from None
    if not 0 <= stop_timeout <= 60:
        raise UsageError(f"invalid --stop-timeout {ns.stop_timeout!r}: must be 0..60")
    netns = ns.netns or f"rdsbx-{os.getpid() if pid is None else pid}"
    if not _NETNS_RE.match(netns) or netns in (".", ".."):
        raise UsageError(f"invalid --netns {netns!r}: use 1-60 letters, digits, '.', '_' or '-'")
    host_args = host_switch_flags(ns)
    check_host_flags(host_args)
    return Options(subnet=subnet, host_args=tuple(host_args), offload=ns.offload, netns=netns,
                   command=tuple(cmd), self_check=ns.self_check, debug=ns.debug, stop_timeout=stop_timeout,
                   veth_host_name=veth_host_name, veth_ns_name=veth_ns_name, veth_host_address=veth_host,
                   veth_ns_address=veth_ns)


@attrs.frozen
class Paths:
    """Every file the sandbox makes, all in one private directory (plus /etc/netns/NAME)."""

    tmp: str
    netns: str

    host_sock = property(lambda self: os.path.join(self.tmp, "host.sock"))
    handshake_sock = property(lambda self: os.path.join(self.tmp, "handshake.sock"))
    pid_file = property(lambda self: os.path.join(self.tmp, "init.pid"))
    gate = property(lambda self: os.path.join(self.tmp, "init.gate"))
    host_log = property(lambda self: os.path.join(self.tmp, "host-switch.log"))
    host_stderr = property(lambda self: os.path.join(self.tmp, "host-switch.stderr"))
    setup_log = property(lambda self: os.path.join(self.tmp, "network-setup.log"))
    vm_log = property(lambda self: os.path.join(self.tmp, "vm-switch.log"))
    etc_dir = property(lambda self: os.path.join("/etc/netns", self.netns))


def host_switch_command(opts: Options, paths: Paths, python: str = sys.executable) -> list[str]:
    cmd = [python, "-m", "rdswitch.host", "--listen", f"unix://{paths.host_sock}",
           "--handshake", f"unix://{paths.handshake_sock}", "--logfile", paths.host_log, *opts.host_args]
    if opts.debug:
        cmd.append("--debug")
    return cmd


def network_setup_command(opts: Options, paths: Paths, init: list[str] | tuple[str, ...],
                          python: str = sys.executable) -> list[str]:
    """network-setup, run in the sandbox's "VM" namespace (nsenter: network only, same mounts)."""
    unshare_arg = shlex.join(["sh", "-c", GATE, "rdswitch-gate", paths.gate, *init])
    cmd = ["nsenter", f"--net=/run/netns/{opts.vm_netns}", "--",
           python, "-m", "rdswitch.network_setup", "--init-foreground",
           "--handshake-listen", f"unix://{paths.handshake_sock}", "--host-url", f"unix://{paths.host_sock}",
           "--netns", opts.netns, "--subnet", str(opts.subnet),
           "--veth-host-name", opts.veth_host_name, "--veth-ns-name", opts.veth_ns_name,
           "--veth-host-address", str(opts.veth_host_address), "--veth-ns-address", str(opts.veth_ns_address),
           "--pid-file", paths.pid_file, "--logfile", paths.setup_log, "--vm-switch-logfile", paths.vm_log,
           "--stop-timeout", f"{opts.stop_timeout:g}", "--unshare-arg", unshare_arg]
    if opts.offload:
        cmd.append("--vm-switch-offload")
    if opts.debug:
        cmd.append("--debug")
    return cmd


def resolv_conf(opts: Options) -> str:
    text = f"# rdswitch sandbox: names go to the gateway's DNS\nnameserver {opts.gateway}\n"
    search = [opts.host_args[i + 1] for i, a in enumerate(opts.host_args) if a == "--dns-search"]
    return text + (f"search {' '.join(search)}\n" if search else "")


def nsswitch_conf(host_text: str | None) -> str:
    """The host's nsswitch.conf with hosts: files dns (no systemd-resolved, mDNS, myhostname...)."""
    lines = [ln for ln in (host_text or "").splitlines() if not re.match(r"\s*hosts\s*:", ln)]
    return "\n".join(["# rdswitch sandbox: hosts from /etc/hosts, then the gateway's DNS", "hosts: files dns",
                      *lines]) + "\n"
