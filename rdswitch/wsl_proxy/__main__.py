"""python -m rdswitch.wsl_proxy: published ports from the namespace on localhost.

Flags (the incumbent's single-dash spellings work too)::

    --socketFile /run/wsl-proxy.sock   control socket (mode 0600; a stale one is replaced)
    --upstreamAddress 192.168.143.1    where connections are piped (the namespace's veth end)
    --veth-subnet CIDR                 the veth subnet given to network-setup: upstream is its .1
    --udpBuffer 8388608                receive buffer of each published UDP port (bytes)
    --logfile /var/log/wsl-proxy.log
    --debug                            debug logging, also to stderr

SIGTERM/SIGINT close every listener and connection, remove the socket file
and exit 0.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
import re
import signal
import socket
import stat
import sys

import trio

from ..config import VETH_SUBNET, ConfigError, go_bools, normalize_argv, veth_addresses
from .proxy import DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_FLOWS, DEFAULT_UDP_BUFFER, Proxy, log
from ..logs import setup_logging

DEFAULT_SOCKET = "/run/wsl-proxy.sock"
DEFAULT_UPSTREAM = str(veth_addresses(VETH_SUBNET)[1].ip)  # network-setup's namespace end
DEFAULT_LOGFILE = "/var/log/wsl-proxy.log"

_LONG_FLAGS = {
    "socketFile", "socket-file", "upstreamAddress", "upstream-address", "logfile", "debug",
    "udp-idle-timeout", "udp-max-flows", "udpBuffer", "udp-buffer", "veth-subnet",
}
_HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")


def _upstream(text: str) -> str:
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if _HOSTNAME_RE.match(text):
        return text
    raise argparse.ArgumentTypeError(f"invalid upstream address {text!r}: expected an IP address or host name")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 < value <= 1 << 30:
        raise argparse.ArgumentTypeError(f"{text!r} must be 1..{1 << 30}")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rdswitch.wsl_proxy", description=__doc__.split("\n\n")[0])
    p.add_argument("--socketFile", "--socket-file", dest="socket_file", default=DEFAULT_SOCKET,
                   help=f"unix socket receiving port mappings (default {DEFAULT_SOCKET})")
    p.add_argument("--upstreamAddress", "--upstream-address", dest="upstream", type=_upstream, default=None,
                   help=f"address connections are piped to (default {DEFAULT_UPSTREAM}, the namespace end of "
                        "network-setup's veth)")
    p.add_argument("--veth-subnet", dest="veth_subnet", default=None, metavar="CIDR",
                   help="the --veth-subnet network-setup was given: pipe to its .1 (the namespace end)")
    p.add_argument("--udpBuffer", "--udp-buffer", dest="udp_buffer", type=_positive_int, default=DEFAULT_UDP_BUFFER,
                   help=f"receive buffer (bytes) of each published UDP port, for bursts (default {DEFAULT_UDP_BUFFER})")
    p.add_argument("--logfile", default=DEFAULT_LOGFILE, help=f"log file (default {DEFAULT_LOGFILE})")
    p.add_argument("--debug", action="store_true", help="debug logging, also to stderr")
    p.add_argument("--udp-idle-timeout", dest="udp_idle_timeout", type=_positive_float, default=DEFAULT_IDLE_TIMEOUT,
                   help=f"seconds before an idle UDP flow is closed (default {DEFAULT_IDLE_TIMEOUT:g})")
    p.add_argument("--udp-max-flows", dest="udp_max_flows", type=_positive_int, default=DEFAULT_MAX_FLOWS,
                   help=f"UDP flows per port; the least recently used is evicted beyond it (default {DEFAULT_MAX_FLOWS})")
    args = p.parse_args(go_bools(normalize_argv(argv, _LONG_FLAGS), {"debug"}))
    if args.veth_subnet is not None:
        if args.upstream is not None:
            p.error("give --upstreamAddress or --veth-subnet, not both")
        try:
            args.upstream = str(veth_addresses(args.veth_subnet)[1].ip)
        except ConfigError as exc:
            p.error(str(exc))
    elif args.upstream is None:
        args.upstream = DEFAULT_UPSTREAM
    return args


def open_control_socket(path: str) -> socket.socket:
    """Bind the unix socket with mode 0600, replacing a stale socket file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(f"{path} exists and is not a socket; refusing to replace it")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1)
            if probe.connect_ex(path) == 0:  # someone is serving it: not stale
                raise OSError(f"{path} is in use by a running wsl-proxy; refusing to replace it")
        os.unlink(path)
        log.info("removed stale socket file %s", path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(64)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    return sock


def _remove_socket_file(path: str, ino: int | None) -> None:
    with contextlib.suppress(FileNotFoundError):
        if ino is None or os.lstat(path).st_ino == ino:  # never remove a successor's socket
            os.unlink(path)


async def amain(args: argparse.Namespace) -> int:
    proxy = Proxy(args.upstream, udp_idle_timeout=args.udp_idle_timeout, udp_max_flows=args.udp_max_flows,
                  udp_buffer=args.udp_buffer)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        try:
            sock = open_control_socket(args.socket_file)
        except OSError as exc:
            log.error("cannot listen on %s: %s", args.socket_file, exc.strerror or exc)
            return 1
        ino = os.lstat(args.socket_file).st_ino  # the file we made, not a successor's
        try:
            listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
            log.info("listening on %s, upstream %s", args.socket_file, args.upstream)
            async with trio.open_nursery() as nursery:
                await nursery.start(proxy.serve, listener)

                async def watch_signals():
                    async for signum in signals:
                        log.info("received %s; closing every listener and connection", signal.Signals(signum).name)
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(watch_signals)
        finally:
            sock.close()
            _remove_socket_file(args.socket_file, ino)
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(args.debug, args.logfile, stderr_level=logging.WARNING)
    try:
        return trio.run(amain, args)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
