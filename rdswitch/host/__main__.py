"""host-switch: the virtual switch, gateway, NAT and API on the host.

    python -m rdswitch.host --listen unix:///run/rdswitch.sock [--subnet 192.168.127.0/24] ...

Each VM connection accepted on a ``--listen`` URL is one session (one switch
port).  Everything a session owns ends with it.  With ``--handshake`` (or
Windows' default, the running compute systems) only the VM that passed the
handshake may open a session (:class:`PeerGate`).  Without flags the
platform's defaults apply (:mod:`rdswitch.host.defaults`).

Nothing Linux-only is imported on this path (no pyroute2, fcntl, resource at
import time, /proc, namespaces): ``tests/unit/test_windows_import.py`` imports
it as Windows would.
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import logging
import os
import signal
import socket
import sys

import attrs
import trio

from ..aio import connect
from ..aio.links import StreamFrameLink
from ..config import (ConfigError, NetConfig, normalize_argv, parse_ipv4_address, parse_nat_flag,
                      parse_static_lease_flag)
from ..aio import packet_trace, trace
from ..aio.tasks import accept_loop
from ..framing import validate_framing
from ..handshake import Candidates, Dial, HandshakeError, keep_finding_vm, refusal, signal_ready
from . import defaults, dns_server
from .compute_systems import RegistryCandidates, RegistryComputeSystems
from ..services.forwarder import parse_port_forward_flag
from ..stack.nat import NatPolicy
from . import switch_host
from .api import ApiServer, add_vm_policy_arguments, create_app, session_ended, vm_policy_from_args
from .forwarder import ForwardError, Forwarder
from .nat import add_nat_arguments
from .switch_host import HostSwitch
from ..logs import setup_logging
from ..urls import parse_url

log = logging.getLogger("rdswitch.host")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rdswitch.host", description="rdswitch host-switch",
                                epilog=defaults.HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", action="append", default=[], metavar="URL",
                   help="accept VM connections here (repeatable): unix:///path, tcp://127.0.0.1:PORT, vsock://:PORT, "
                        "hvsock://:PORT (Windows), fd://N (a listening socket inherited from the parent, "
                        "systemd-style); default: see below")
    p.add_argument("--handshake", action="append", default=[], metavar="URL",
                   help="find the VM by the vsock handshake at these URLs (port 6669 of each candidate), then tell "
                        "it READY so it dials a --listen URL; e.g. vsock://3:6669, hvsock://VMID:6669 or "
                        "unix:///run/rd-handshake.sock; default on Windows: every running compute system")
    p.add_argument("--framing", default="stdio", help="stdio (16-bit LE length, default), qemu (QEMU -netdev stream/socket), bess, vfkit or dgram (unix datagrams; QEMU -netdev dgram)")
    p.add_argument("--listen-qemu", action="append", default=[], metavar="URL",
                   help="also accept VM connections here in the qemu framing, whatever --framing says (repeatable; "
                        "gvproxy's flag)")
    p.add_argument("--listen-bess", action="append", default=[], metavar="URL",
                   help="also accept VM connections here in the bess framing (unix SOCK_SEQPACKET; repeatable)")
    p.add_argument("--listen-vfkit", action="append", default=[], metavar="URL",
                   help="also accept a VM here in the vfkit framing (unix SOCK_DGRAM; repeatable)")
    p.add_argument("--listen-stdio", action="store_true",
                   help="serve one VM connection on stdin/stdout (stdio framing); logs stay on stderr")
    p.add_argument("--subnet", default="192.168.127.0/24", help="virtual subnet; gateway .1, VM .2, host alias .254")
    p.add_argument("--mtu", default="1500", help="MTU announced by DHCP (576..65521)")
    p.add_argument("--gateway-mac", default="5a:94:ef:e4:0c:dd")
    p.add_argument("--vm-mac", default="5a:94:ef:e4:0c:ee", help="MAC that gets the static lease .2")
    p.add_argument("--dhcp-static-lease", action="append", default=[], metavar="IP=MAC",
                   help="another static DHCP lease, e.g. 192.168.127.3=5a:94:ef:e4:0c:ef (repeatable)")
    p.add_argument("--nat", action="append", default=[], metavar="VIRTUAL_IP=HOST_IP",
                   help="flows to VIRTUAL_IP go to HOST_IP (repeatable); replaces the default "
                        "<subnet>.254=127.0.0.1")
    p.add_argument("--gateway-virtual-ip", action="append", default=[], metavar="IP",
                   help="an address the gateway answers ARP for besides .1 (repeatable); replaces the default .254")
    p.add_argument("--debug", action="store_true")
    p.add_argument("--trace-packets", action="store_true",
                   help="log one line per frame from the start; SIGUSR1 toggles it at run time (off by default)")
    p.add_argument("--trace-latency", default=None, metavar="FILE", help="append per-hop timestamps of small TCP segments to FILE (see rdswitch/aio/trace.py; env RDSWITCH_TRACE_LATENCY)")
    p.add_argument("--logfile", default=None)
    p.add_argument("--api-listen", action="append", default=[], metavar="URL",
                   help="also serve the HTTP API on this host socket (unix:///path or tcp://127.0.0.1:PORT); "
                        "it is always served inside the network on gateway:80")
    p.add_argument("--port-forward", action="append", default=[], metavar="LOCAL=REMOTE",
                   help="static forward at start, e.g. 127.0.0.1:2222=192.168.127.2:22 (append /udp for UDP)")
    p.add_argument("--capture", default=None, metavar="FILE", help="write every frame to this pcap file, live ('-': stdout, e.g. | wireshark -k -i -)")
    add_nat_arguments(p)
    dns_server.add_arguments(p)
    add_vm_policy_arguments(p)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = build_parser()
    long_flags = {a.dest.replace("_", "-") for a in p._actions} | {"debug", "listen", "subnet", "framing", "mtu"}
    args = p.parse_args(normalize_argv(argv, long_flags))
    try:
        args.net = NetConfig(subnet=args.subnet, gateway_mac=args.gateway_mac, vm_mac=args.vm_mac, mtu=args.mtu,
                             nat=tuple(parse_nat_flag(f) for f in args.nat) or None,
                             virtual_ips=tuple(parse_ipv4_address(ip, "--gateway-virtual-ip")
                                               for ip in args.gateway_virtual_ip) or None,
                             static_leases=tuple(parse_static_lease_flag(f) for f in args.dhcp_static_lease))
        args.framing = validate_framing(args.framing)
        for url in args.handshake:  # dialable here: a CID / VM id, and the socket family exists
            ep = parse_url(url)
            if ep.scheme in ("vsock", "hvsock"):
                _ = ep.family  # ConfigError where this OS/Python has no such sockets
                ep.sockaddr()
        framed = [(url, "qemu") for url in args.listen_qemu] + [(url, "bess") for url in args.listen_bess]
        framed += [(url, "vfkit") for url in args.listen_vfkit]
        if framed or args.listen_stdio:  # gvproxy's interface flags: they are the data listeners
            plan = defaults.Plan(list(args.listen), list(args.handshake))
        else:
            plan = defaults.plan(args.listen, args.handshake, windows=sys.platform == "win32",
                                 vsock_works=not args.listen and not args.handshake and vsock_works(),
                                 runtime_dir=os.environ.get("XDG_RUNTIME_DIR"))
        args.listen = plan.listen
        args.handshake_used = plan.handshake_used
        args.candidates = RegistryCandidates(RegistryComputeSystems()) if plan.registry else plan.handshake
        #: every data listener: (URL, framing)
        args.listeners = [(url, args.framing) for url in args.listen] + framed
        for url, framing in args.listeners:  # a live socket or a non-socket at a unix path, a bad fd://N
            connect.check_listen(url, framing)
        args.nat_policy = NatPolicy.from_args(args, args.net)
        args.vm_policy = vm_policy_from_args(args, args.net)
        args.forwards = [parse_port_forward_flag(f, args.net.subnet) for f in args.port_forward]
        for url in args.api_listen:
            connect.check_listen(url)
        args.dns = dns_server.from_args(args, args.net)  # every --dns-* flag, checked before trio runs
    except ConfigError as exc:  # one line (argparse's p.error would print the whole usage first)
        print(f"{p.prog}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    return args


def vsock_works() -> bool:
    """Whether this machine can make an AF_VSOCK socket (Linux with the vsock modules)."""
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        return False
    try:
        socket.socket(family, socket.SOCK_STREAM).close()
    except OSError:
        return False
    return True


@attrs.define
class PeerGate:
    """Who may open a data session: everyone without a handshake; with one, only the VM that passed it."""

    handshake_used: bool = False
    #: the candidate URL that answered the handshake last (None: none yet)
    found: str | None = None

    def refusal(self, peer: str) -> str | None:
        return refusal(self.handshake_used, self.found, peer)


async def admit_session(hs: HostSwitch, gate: PeerGate, link) -> None:
    """Run the session of an accepted connection, or refuse it: closed, one log line, counted."""
    peer = getattr(link, "peer", "?")
    why = gate.refusal(peer)
    if why is None:
        await hs.run_session(link)
        return
    hs.counters.drop("session-refused-peer")
    log.warning("refused a data connection from %s: %s", peer, why)
    with trio.CancelScope(shield=True):
        with trio.move_on_after(1):
            await link.aclose()


async def serve_listener(hs: HostSwitch, listener, url: str, gate: PeerGate | None = None) -> None:
    gate = gate if gate is not None else PeerGate()

    async def handler(link) -> None:
        await admit_session(hs, gate, link)

    async with listener, trio.open_nursery() as nursery:
        await accept_loop(listener, handler, nursery, f"listener {url}", log)


async def handshake(hs: HostSwitch, candidates: Candidates, *, retry: float = 1.0, gate: PeerGate | None = None,
                    dial: Dial = connect.dial_stream) -> None:
    """Find the VM, tell it READY; look again whenever its session has ended (a restarted vm-switch).

    Never gives up for good: while no VM answers, keep_finding_vm logs once per
    give-up period and backs off; a failed READY is retried after ``retry`` seconds.
    The VM found is admitted by ``gate`` before READY (the VM dials right after it).
    """
    while True:
        url = await keep_finding_vm(candidates, dial=dial)
        if gate is not None:
            gate.found = url
        log.info("found the VM at %s; signalling READY", url)
        try:
            await signal_ready(url, dial=dial)
        except (HandshakeError, OSError) as exc:
            log.error("handshake failed: %s; looking again in %gs", exc, retry)
            await trio.sleep(retry)
            continue
        with trio.move_on_after(30):  # the VM dials the data URL right after READY
            while not hs.sessions:
                await hs.sessions_changed.wait()
        while hs.sessions:
            await hs.sessions_changed.wait()
        log.info("no VM session left; looking for the VM again")


def protect(hs: HostSwitch, url: str) -> None:
    """A TCP listener of host-switch's own is never a NAT destination for a VM (the host's API through the
    .254 alias would give a VM every power the VM policy withholds)."""
    ep = parse_url(url)
    if ep.scheme != "tcp":
        return
    try:
        ip = ipaddress.ip_address(ep.host)
    except ValueError:  # a name: whatever it resolved to, the port on every address
        hs.nat.core.protect(None, ep.port)
        return
    if ip.version == 6:
        if not ip.is_unspecified and ip.ipv4_mapped is None:
            return  # an IPv6-only listener: the NAT dials IPv4 only
        ip = ip.ipv4_mapped or ipaddress.IPv4Address(0)  # [::] is dual-stack
    hs.nat.core.protect(None if ip.is_unspecified else str(ip), ep.port)


def stdio_link():
    """The VM connection on stdin (frames in) and stdout (frames out), in the stdio framing (``--listen-stdio``)."""
    stream = trio.StapledStream(trio.lowlevel.FdStream(os.dup(1)), trio.lowlevel.FdStream(os.dup(0)))
    return StreamFrameLink(stream, "stdio", peer="stdio")


async def amain(args: argparse.Namespace, *, extra=None) -> int:
    """host-switch's nursery tree until SIGTERM/SIGINT.

    ``extra(hs, forwarder, task_status=...)``, if given, is started in the same
    nursery once every listener is up (a composition such as ``rdswitch gvproxy``
    adds its own tasks there; they end with everything else).
    """
    dns = args.dns
    hs = switch_host.build(args.net, args.nat_policy, dns=dns, capture=args.capture,
                           search_domains=dns.search_domains())
    async with trio.open_nursery() as nursery:
        await nursery.start(packet_trace.follow_sigusr1)
        nursery.start_soon(dns.keep_search_domains, hs.dhcp.set_search_domains)
        if hs.capture:
            nursery.start_soon(hs.capture.run)  # writes the capture's tail while the network is idle
        forwarder = Forwarder(hs)
        await nursery.start(forwarder.run)
        api = ApiServer(create_app(hs, forwarder, dns, policy=args.vm_policy, leases=hs.lease_holders))
        hs.session_closed_hooks.append(functools.partial(session_ended, forwarder, dns, args.vm_policy))
        hs.nat.add_local_service(53, dns.serve_stream)  # DNS over TCP; UDP is answered by the NAT shell
        hs.nat.add_local_service(80, api.connection)
        for url in args.api_listen:
            listener = await connect.listen_stream(url)
            protect(hs, listener.url)
            nursery.start_soon(api.serve, listener)
            log.info("API on %s", url)
        for fwd in args.forwards:
            try:
                await forwarder.expose(fwd)
            except ForwardError as exc:
                log.error("--port-forward %s: %s", fwd.local, exc)
                nursery.cancel_scope.cancel()
                return 2
        gate = PeerGate(handshake_used=args.handshake_used)
        for url, framing in args.listeners:
            listener = await connect.listen(url, framing)
            protect(hs, listener.url)
            log.info("listening on %s (framing %s)", url, framing)
            nursery.start_soon(serve_listener, hs, listener, url, gate)
        if args.listen_stdio:
            log.info("serving the VM connection on stdin/stdout (framing stdio)")
            nursery.start_soon(hs.run_session, stdio_link())
        if args.handshake_used:
            nursery.start_soon(functools.partial(handshake, hs, args.candidates, gate=gate))
        if extra is not None:
            await nursery.start(extra, hs, forwarder)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for sig in signals:
                log.info("got %s, shutting down", signal.Signals(sig).name)
                nursery.cancel_scope.cancel()
                break
    if hs.capture:
        hs.capture.close()
    return 0


def raise_fd_limit() -> None:
    """Every NAT flow holds a host socket: use the whole hard limit, not the usual soft 1024."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20), hard))
    except (ImportError, ValueError, OSError) as exc:  # not on Windows; or not permitted
        log.debug("cannot raise the fd limit: %s", exc)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(args.debug, args.logfile)
    trace.start(args.trace_latency)
    if args.trace_packets:
        packet_trace.set_enabled(True, "--trace-packets")
    raise_fd_limit()
    return trio.run(amain, args)


if __name__ == "__main__":
    sys.exit(main())
