"""vm-switch: tap ``eth0`` <-> the data connection, and eth0's own DHCP client.

Runs inside the VM's network namespace.  The data connection is fd 3 by
default (network-setup opened it in the default namespace, where vsock lives)
or a URL given with ``--connect``.  DHCP needs no external client: vm-switch
sits on the frame path, so it injects its DHCP messages into the connection
itself and takes the replies addressed to port 68 out of the stream before
they reach the tap, then configures eth0 over netlink.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import random
import signal
import sys

import trio

from ..aio import connect, links, packet_trace, trace
from ..urls import parse_url
from ..config import ConfigError, NetConfig, format_mac, go_bools, normalize_argv, parse_mac, parse_mtu
from .. import netlink
from ..logs import describe
from ..framing import validate_framing
from ..wire import ethernet, ipv4, offload, udp
from . import tap
from .dhcp_client import Bound, DhcpClient, Lost, Renewed
from ..logs import setup_logging

log = logging.getLogger("rdswitch.vm")

LONG_FLAGS = {"offload", "debug", "tap-interface", "tap-mac-address", "subnet", "logfile", "connect", "framing", "mtu",
              "resolv-conf", "retry-interval", "trace-packets"}
READ_BATCH_BYTES = 1 << 20
READ_BATCH_FRAMES = 256


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rdswitch.vm", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="verbose logging")
    p.add_argument("--tap-interface", default="eth0", help="tap device to create (default eth0)")
    p.add_argument("--tap-mac-address", default="5a:94:ef:e4:0c:ee", help="MAC of the tap")
    p.add_argument("--subnet", default="192.168.127.0/24", help="virtual subnet (for validation and logs)")
    p.add_argument("--mtu", default=None, help="tap MTU before DHCP announces one (default 1500)")
    p.add_argument("--logfile", default=None, help="also log to this file (incumbent: /var/log/vm-switch.log)")
    p.add_argument("--connect", default="fd://3", help="data connection: fd://N (default fd://3), unix:///path, tcp://host:port, vsock://cid:port")
    p.add_argument("--framing", default="stdio", help="stdio (16-bit LE length, default), qemu, bess, vfkit")
    p.add_argument("--resolv-conf", default=None, help="write nameserver/search from DHCP to this file")
    p.add_argument("--offload", nargs="?", const="on", default="auto", choices=("auto", "on", "off"),
                   help="virtio-net headers on the tap. auto (the default): the host-switch may send this VM "
                        "64 KiB TCP segments with partial checksums that the kernel segments and completes (only "
                        "rdswitch's host-switch does, after vm-switch announces it; frames from the VM stay within "
                        "the MTU, so any host-switch and any other VM can take them). on (--offload alone): the "
                        "VM's kernel also hands over 64 KiB segments (TSO), which exceed the MTU: needs rdswitch's "
                        "host-switch, and every VM on the switch that talks TCP to another VM must use it. off: plain "
                        "frames")
    p.add_argument("--retry-interval", type=float, default=1.0, help="seconds between reconnects when a session fails")
    p.add_argument("--trace-latency", default=None, metavar="FILE", help="append per-hop timestamps of small TCP segments to FILE (see rdswitch/aio/trace.py; env RDSWITCH_TRACE_LATENCY)")
    p.add_argument("--trace-packets", action="store_true",
                   help="log one line per frame from the start; SIGUSR1 toggles it at run time (off by default)")
    args = p.parse_args(go_bools(normalize_argv(argv, LONG_FLAGS), {"debug", "trace-packets"}))
    try:
        args.mac = parse_mac(args.tap_mac_address)
        args.net = NetConfig(subnet=args.subnet)
        args.initial_mtu = parse_mtu(args.mtu) if args.mtu is not None else 1500
        args.framing = validate_framing(args.framing)
        parse_url(args.connect)
    except ConfigError as exc:
        p.error(str(exc))
    return args


def is_dhcp_reply(frame: bytes | memoryview, mac: bytes) -> bool:
    """A cheap test on the hot path: IPv4, IHL 5, UDP, destination port 68, to us or broadcast."""
    return (len(frame) >= 42 and frame[12] == 8 and frame[13] == 0 and frame[14] == 0x45 and frame[23] == 17
            and frame[36] == 0 and frame[37] == 68 and (frame[0:6] == mac or frame[0:6] == ethernet.BROADCAST))


class VmSwitch:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.name = args.tap_interface
        self.mac = args.mac
        self.tap_fd = -1
        self.client = DhcpClient(self.mac, xid=random.getrandbits(32), hostname=os.uname().nodename)
        self.server_mac = ethernet.BROADCAST
        self.lease = None
        self.mtu = args.initial_mtu
        self.pending_events: list = []
        self.dhcp_wakeup = trio.Event()

    async def run(self) -> int:
        if await trio.to_thread.run_sync(netlink.link_exists, self.name):
            log.error("interface %s already exists; refusing to start", self.name)
            return 1
        self.tap_fd = tap.open_tap(self.name, vnet_hdr=self.args.offload != "off", tso=self.args.offload == "on")
        try:
            await trio.to_thread.run_sync(tap.setup_link, self.name, format_mac(self.mac), self.args.initial_mtu,
                                          self.args.offload == "on")
            log.info("tap %s up with MAC %s", self.name, format_mac(self.mac))
            url = self.args.connect
            while True:
                try:
                    link = await self.open_link(url)
                except (OSError, ConfigError) as exc:
                    log.warning("cannot connect to %s: %s", url, exc)
                else:
                    reason = await self.session(link)
                    log.warning("session ended: %s", reason)
                if url.startswith("fd://"):
                    return 1  # an inherited connection cannot be re-opened
                await trio.sleep(self.args.retry_interval)
        finally:
            os.close(self.tap_fd)

    async def open_link(self, url: str):
        if url.startswith("fd://"):
            return links.link_from_fd(int(url[5:]), self.args.framing)
        return await connect.dial(url, self.args.framing)

    async def session(self, link) -> str:
        reason = "connection closed"
        try:
            async with link, trio.open_nursery() as nursery:
                nursery.start_soon(self.tap_to_link, link)
                nursery.start_soon(self.dhcp_loop, link)
                await self.link_to_tap(link)
                nursery.cancel_scope.cancel()
        except Exception as exc:  # noqa: BLE001 - a failed session is retried
            reason = describe(exc)
        return reason

    async def tap_to_link(self, link) -> None:
        fd = self.tap_fd
        read = os.read
        skip = offload.VNET_HDR_LEN if self.args.offload != "off" else 0
        inline = link.can_send_inline
        while True:
            await trio.lowlevel.wait_readable(fd)
            frames = []
            size = 0
            while len(frames) < READ_BATCH_FRAMES and size < READ_BATCH_BYTES:
                try:
                    frame = read(fd, 65536 + skip)
                except BlockingIOError:
                    break
                if skip:
                    frame = memoryview(frame)[skip:]  # drop the virtio_net_hdr without copying
                frames.append(frame)
                size += len(frame)
            if frames:
                if packet_trace.enabled:
                    packet_trace.frames("tap -> host", frames)
                if trace.enabled:
                    trace.frames("vm.tap_read", frames)
                    # before the send: the host-switch may read it before the send returns here
                    trace.frames("vm.link_write", frames)
                # inline when the socket takes it (the loop's wait_readable is the checkpoint)
                if not (inline and link.try_send(frames)):
                    await (link.flush() if inline else link.send_batch(frames))

    async def link_to_tap(self, link) -> None:
        fd = self.tap_fd
        if self.args.offload != "off":
            writev = os.writev
            header_for = offload.vnet_header_for

            def write(fd, frame):
                # TCP from the host-switch may carry a partial checksum and exceed the MTU (TSO)
                return writev(fd, (header_for(frame, self.mtu), frame))
        else:
            write = os.write
        while True:
            frames = await link.receive_batch()
            if not frames:
                return
            if packet_trace.enabled:
                packet_trace.frames("host -> tap", frames)
            if trace.enabled:
                trace.frames("vm.link_read", frames)
                trace.frames("vm.tap_write", frames)  # before the writes: the VM's reader may run first
            for frame in frames:
                if is_dhcp_reply(frame, self.mac):
                    self.on_dhcp_frame(frame)
                    continue
                try:
                    write(fd, frame)
                except BlockingIOError:
                    pass  # the kernel's queue is full: drop, like a wire would
                except OSError as exc:
                    if exc.errno not in (errno.EINVAL, errno.EIO):
                        raise
                    log.debug("tap rejected a %d-byte frame: %s", len(frame), exc)

    # ---- DHCP ---------------------------------------------------------------------------
    def on_dhcp_frame(self, frame) -> None:
        try:
            pkt = ipv4.parse(memoryview(frame)[14:])
            _sport, _dport, payload = udp.parse(pkt.payload)
        except ValueError:
            return
        payload = bytes(payload)
        # Only a reply for our transaction tells us the server's MAC (xid at offset 4 of BOOTP).
        if len(payload) >= 8 and int.from_bytes(payload[4:8], "big") == self.client.xid:
            self.server_mac = bytes(frame[6:12])
        self.pending_events.extend(self.client.receive(payload, trio.current_time()))
        self.dhcp_wakeup.set()

    async def dhcp_loop(self, link) -> None:
        self.client.start(trio.current_time())
        while True:
            for out in self.client.take_outgoing():
                frame = self.dhcp_frame(out)
                if packet_trace.enabled:
                    packet_trace.frames("dhcp client -> host", (frame,))
                await link.send_batch([frame])  # the link serialises concurrent senders
            events, self.pending_events = self.pending_events, []
            for ev in events:
                await self.on_dhcp_event(ev, link)
            deadline = self.client.next_timeout()
            with trio.move_on_at(deadline if deadline is not None else trio.current_time() + 3600):
                await self.dhcp_wakeup.wait()
            self.dhcp_wakeup = trio.Event()
            now = trio.current_time()
            if deadline is not None and now >= deadline:
                self.pending_events.extend(self.client.handle_timeout(now))

    def dhcp_frame(self, out) -> bytes:
        src = out.src_ip.packed
        dst = out.dst_ip.packed
        dst_mac = ethernet.BROADCAST if out.broadcast else self.server_mac
        payload = udp.build(68, 67, out.payload, src, dst)
        return ethernet.build(dst_mac, self.mac, ethernet.TYPE_IPV4, ipv4.build(src, dst, ipv4.PROTO_UDP, payload, dont_fragment=False))

    async def on_dhcp_event(self, ev, link) -> None:
        if isinstance(ev, (Bound, Renewed)):
            lease = ev.lease
            if self.args.offload != "off":
                # Before eth0 has an address (so before any flow): tell the host-switch
                # it may send partial checksums and 64 KiB segments to this port.
                self.mtu = lease.mtu or self.mtu
                await link.send_batch([ethernet.build(self.server_mac, self.mac, ethernet.TYPE_RDSWITCH,
                                                      offload.capability_payload())])
            if isinstance(ev, Bound) or lease != self.lease:
                log.info("DHCP %s: %s/%d router %s mtu %s dns %s search %s", "bound" if isinstance(ev, Bound) else "renewed",
                         lease.ip, lease.prefixlen, lease.router, lease.mtu, [str(d) for d in lease.dns_servers],
                         lease.search_domains)
                try:
                    await trio.to_thread.run_sync(tap.configure_address, self.name, str(lease.ip), lease.prefixlen,
                                                  str(lease.router) if lease.router else None, lease.mtu)
                    if self.args.resolv_conf:
                        write_resolv_conf(self.args.resolv_conf, lease)
                except (OSError, tap.TapError) as exc:  # NetlinkError is an OSError
                    log.error("cannot configure %s from the lease: %s (retrying at renewal)", self.name, exc)
                    return
            self.lease = lease
        elif isinstance(ev, Lost):
            log.warning("DHCP lease lost: %s", ev.reason)
            self.lease = None
            await trio.to_thread.run_sync(tap.flush_addresses, self.name)


def write_resolv_conf(path: str, lease) -> None:
    lines = ["# written by rdswitch vm-switch from DHCP"]
    lines += [f"nameserver {ip}" for ip in lease.dns_servers]
    if lease.search_domains:
        lines.append("search " + " ".join(lease.search_domains))
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


async def amain(args: argparse.Namespace) -> int:
    """Run the switch until it ends or SIGTERM/SIGINT cancels it (then: the session, the tap; exit 0)."""
    vm = VmSwitch(args)
    outcome: dict = {}

    async def serve(scope: trio.CancelScope) -> None:
        try:
            outcome["status"] = await vm.run()
        except tap.TapError as exc:  # re-raised below, outside the nursery (no exception group)
            outcome["error"] = exc
        scope.cancel()

    stopped_by = None
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(packet_trace.follow_sigusr1)
            nursery.start_soon(serve, nursery.cancel_scope)
            async for sig in signals:
                stopped_by = signal.Signals(sig).name
                log.info("got %s, stopping", stopped_by)
                nursery.cancel_scope.cancel()  # the session's link closes, then VmSwitch.run closes the tap
                break
    if "error" in outcome:
        raise outcome["error"]
    if stopped_by is not None:
        log.info("vm-switch stopped (%s): session and tap %s closed", stopped_by, vm.name)
        return 0
    return outcome.get("status", 1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(args.debug, args.logfile)
    trace.start(args.trace_latency)
    if args.trace_packets:
        packet_trace.set_enabled(True, "--trace-packets")
    try:
        return trio.run(amain, args)
    except tap.TapError as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
