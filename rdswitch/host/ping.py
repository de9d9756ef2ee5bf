"""ICMP echo from the host on a VM's behalf: the VM gets the real reply, never a forged one.

Each session gets one ICMP socket: an unprivileged ping socket (Linux:
``SOCK_DGRAM`` + ``IPPROTO_ICMP``; the kernel picks the identifier and hands
back only the replies to it), or where those are not allowed
(``net.ipv4.ping_group_range``) and we may, a raw ICMP socket with an
identifier of ours.  An echo request goes out inline from the frame path with
a sequence number of ours, so echoes from several processes of the VM never
collide; one task per session reads the replies, gives each the VM's own
identifier and sequence back, and expires requests that get no answer.
Where neither socket can be had, :func:`ping_once` tries once per request.
"""

from __future__ import annotations

import collections
import logging
import math
import random
import socket

import trio

from ..stack import nat as core_mod
from ..stack.nat import NatCore
from ..wire import icmp

log = logging.getLogger("rdswitch.nat")

#: Seconds an echo request waits for the host's reply.
PING_TIMEOUT = 5.0


def _strip_ip_header(data: bytes) -> bytes | memoryview:
    """Some systems (macOS, raw sockets) hand over the IP header too."""
    if data and data[0] >> 4 == 4 and len(data) >= 20:
        return memoryview(data)[(data[0] & 0xF) * 4:]
    return data


class Pinger:
    """The ping socket of one session, and the echoes waiting for a reply."""

    def __init__(self, core: NatCore, sock: socket.socket, ident: int = 0) -> None:
        self.core = core
        self.sock = sock
        self.ident = ident  # ours on a raw socket (0: a ping socket, where the kernel sets it)
        self._waiting: collections.OrderedDict[int, tuple[core_mod.Ping, float]] = collections.OrderedDict()
        self._seq = 0
        self._scope: trio.CancelScope | None = None

    @classmethod
    def open(cls, core: NatCore) -> "Pinger | None":
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
            ident = 0
        except OSError as exc:
            try:
                sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
            except OSError:
                log.debug("neither a ping socket (%s) nor a raw socket: echoes are tried one by one", exc)
                return None
            ident = random.getrandbits(16)
        sock.setblocking(False)
        return cls(core, sock, ident)

    def send(self, ping: core_mod.Ping, now: float) -> None:
        """Send the echo request now (sync); its reply or its timeout is reported to the core."""
        for _ in range(0x10000):
            self._seq = (self._seq + 1) & 0xFFFF
            if self._seq not in self._waiting:
                break
        seq = self._seq
        request = icmp.build(icmp.IcmpMessage(icmp.ECHO_REQUEST, 0, (self.ident << 16) | seq, ping.msg.payload))
        try:
            self.sock.sendto(request, (ping.dst, 0))
        except OSError as exc:
            log.debug("ping %s failed: %s", ping.dst, exc)
            self.core.ping_done(ping, "error")
            return
        deadline = now + PING_TIMEOUT
        self._waiting[seq] = (ping, deadline)
        if self._scope is not None and deadline < self._scope.deadline:
            self._scope.deadline = deadline
        # The host's own addresses answer inside the sendto (loopback runs the
        # reply before the call returns): take it now, in the same batch of
        # frames, instead of waking the reader task for it.
        self._drain()

    def _drain(self) -> None:
        """Hand every reply the socket holds to the core (bounded; never blocks)."""
        sock = self.sock
        core = self.core
        waiting = self._waiting
        for _ in range(64):
            try:
                data, addr = sock.recvfrom(65535)
            except BlockingIOError:
                return
            except OSError as exc:  # an ICMP error reported on the socket
                log.debug("ping socket: %s", exc)
                continue
            try:
                reply = icmp.parse(_strip_ip_header(data))
            except ValueError:
                continue
            if reply.type != icmp.ECHO_REPLY or (self.ident and reply.ident != self.ident):
                continue  # a raw socket sees every echo reply of the host
            entry = waiting.get(reply.seq)
            if entry is None or entry[0].dst != addr[0]:
                continue
            del waiting[reply.seq]
            core.ping_reply(entry[0], reply.payload)
            core.ping_done(entry[0])

    async def run(self) -> None:
        """Read replies and expire what gets none, until the session ends."""
        sock = self.sock
        core = self.core
        waiting = self._waiting
        try:
            while True:
                first = next(iter(waiting.values()), None)
                with trio.CancelScope(deadline=first[1] if first else math.inf) as scope:
                    self._scope = scope
                    await trio.lowlevel.wait_readable(sock)
                self._scope = None
                self._drain()
                now = trio.current_time()
                while waiting:
                    seq, (ping, deadline) = next(iter(waiting.items()))
                    if deadline > now:
                        break
                    del waiting[seq]
                    core.ping_done(ping, "no-reply")
        finally:
            for ping, _deadline in waiting.values():
                core.ping_done(ping, "no-reply")
            waiting.clear()
            trio.lowlevel.notify_closing(sock)
            sock.close()


async def ping_once(dst: str, msg: icmp.IcmpMessage, timeout: float) -> bytes | None:
    """Send one echo request from a raw socket; return the real reply's payload or None."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    with sock:
        request = icmp.build(icmp.IcmpMessage(icmp.ECHO_REQUEST, 0, msg.rest, msg.payload))
        await sock.sendto(request, (dst, 0))
        with trio.move_on_after(timeout):
            while True:
                data, addr = await sock.recvfrom(65535)
                if addr[0] != dst:
                    continue
                try:
                    reply = icmp.parse(_strip_ip_header(data))
                except ValueError:
                    continue
                if reply.type == icmp.ECHO_REPLY and reply.rest == msg.rest:
                    return bytes(reply.payload)
    return None
