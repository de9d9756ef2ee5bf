"""Forwarding DNS queries to the host's resolvers (trio shell, opens host sockets).

``Upstreams`` says where to send: a fixed list (``--dns-upstream``) or the
nameservers of a ``DnsSource`` (``dns_sources.py``: a resolv.conf, or Windows'
adapters and registry), re-read whenever it changes so that a VPN that
changes the host's resolvers is followed without a restart.

``forward`` sends the raw query: UDP first (a fresh connected socket per query,
so the reply must come from the server we asked, with our ID), the same server
over TCP when the UDP answer is truncated, the next server on timeout, error or
SERVFAIL/REFUSED, and gives up within ``total_timeout`` with ``UpstreamError``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import struct
import time
from typing import Hashable, Iterable

import trio

from rdswitch.host.dns_sources import DnsSource, ResolvConfFile
from rdswitch.services.dns.message import is_truncated, rcode_of
from rdswitch.services.dns.resolvconf import ResolvConf

log = logging.getLogger(__name__)

Server = tuple[str, int]
MAX_MESSAGE = 65535
_RETRY_RCODES = (2, 4, 5)  # SERVFAIL, NOTIMP, REFUSED: ask the next server


class UpstreamError(Exception):
    """No upstream gave an answer; str() says why (the caller answers SERVFAIL)."""


# What one exchange with one server may fail with (a reset TCP stream is a trio error, not an OSError).
_EXCHANGE_ERRORS = (OSError, UpstreamError, struct.error, trio.BrokenResourceError, trio.ClosedResourceError)


class Upstreams:
    """The current upstream servers: fixed, or from a ``DnsSource`` that is re-read when it changes.

    The source is a resolv.conf (``resolv_conf=PATH``) or any ``DnsSource``
    (``source=``, e.g. ``WindowsSystem()``).  With both fixed servers and a
    source, the servers are the fixed ones and the source only gives search domains.
    """

    def __init__(
        self,
        servers: Iterable[Server] | None = None,
        resolv_conf: str | os.PathLike | None = None,
        *,
        source: DnsSource | None = None,
        recheck_interval: float | None = None,
        clock=time.monotonic,
    ):
        if resolv_conf is not None and source is not None:
            raise ValueError("give either resolv_conf or source, not both")
        self._fixed = list(servers) if servers else None
        if resolv_conf is not None:
            source = ResolvConfFile(resolv_conf)
        self.source = source
        self.path = source.path if isinstance(source, ResolvConfFile) else None
        if recheck_interval is None:
            recheck_interval = source.recheck_interval if source is not None else 0.25
        self.recheck_interval = recheck_interval
        self._clock = clock
        self._last_check = float("-inf")
        self._stamp: Hashable | None = None
        self._conf = ResolvConf()
        if self.source is not None:
            self._reload(force=True)

    @property
    def fixed(self) -> bool:
        return self._fixed is not None

    def reload(self) -> None:
        """Check the source now, whenever it was last checked; re-read it if it changed.

        For a task that follows the source on its own schedule; an unreadable
        source is only logged when it becomes unreadable, not on every check.
        """
        if self.source is not None:
            self._reload(force=True, quiet=True)

    def _reload(self, force: bool = False, *, quiet: bool = False) -> None:
        now = self._clock()
        if not force and now - self._last_check < self.recheck_interval:
            return
        self._last_check = now
        where = self.source.description
        try:
            stamp = self.source.token()
            if stamp == self._stamp:
                return
            conf = self.source.read()
        except OSError as exc:
            if self._stamp is not None or (force and not quiet):
                log.warning("cannot read %s (%s); keeping the last known DNS servers %s", where, exc, list(self._conf.nameservers))
            self._stamp = None
            return
        if conf != self._conf:
            if self._fixed is None:
                log.info("DNS upstreams from %s: %s, search %s", where, list(conf.nameservers), list(conf.search))
            else:
                log.info("DNS search domains from %s: %s (upstreams fixed: %s)", where, list(conf.search), self._fixed)
        self._stamp = stamp
        self._conf = conf

    def current(self) -> list[Server]:
        if self._fixed is not None:
            return list(self._fixed)
        if self.source is None:
            return []
        self._reload()
        return list(self._conf.nameservers)

    def search(self) -> list[str]:
        """Search domains of the source (also when the servers are fixed)."""
        if self.source is None:
            return []
        self._reload()
        return list(self._conf.search)


def _family(ip: str) -> int:
    return trio.socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else trio.socket.AF_INET


async def _udp_exchange(query: bytes, server: Server) -> bytes:
    qid = query[:2]
    with trio.socket.socket(_family(server[0]), trio.socket.SOCK_DGRAM) as sock:
        await sock.connect(server)  # connected: the kernel drops datagrams from elsewhere, ICMP errors surface
        await sock.send(query)
        for _ in range(64):  # bounded: stray datagrams with another ID are skipped
            data, addr = await sock.recvfrom(MAX_MESSAGE)
            if len(data) >= 12 and data[:2] == qid and data[2] & 0x80 and addr[:2] == server:
                return data
        raise UpstreamError(f"{server[0]}:{server[1]} sent too many unrelated datagrams")


async def _receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            raise UpstreamError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


async def _tcp_exchange(query: bytes, server: Server) -> bytes:
    sock = trio.socket.socket(_family(server[0]), trio.socket.SOCK_STREAM)
    try:
        await sock.connect(server)
    except BaseException:
        sock.close()
        raise
    async with trio.SocketStream(sock) as stream:
        await stream.send_all(struct.pack("!H", len(query)) + query)
        for _ in range(16):
            (length,) = struct.unpack("!H", await _receive_exactly(stream, 2))
            data = await _receive_exactly(stream, length)
            if len(data) >= 12 and data[:2] == query[:2] and data[2] & 0x80:
                return data
        raise UpstreamError(f"{server[0]}:{server[1]} sent no reply with our ID over TCP")


async def forward(
    query: bytes,
    upstreams: Upstreams | Iterable[Server],
    *,
    timeout_per_server: float = 1.0,
    total_timeout: float = 2.5,
    tcp: bool = False,
) -> bytes:
    """Ask the upstreams in order; return the first usable raw reply, or raise UpstreamError.

    ``tcp=True`` skips UDP (the client came over TCP and wants the full answer).
    A SERVFAIL/REFUSED reply moves on to the next server but is returned if no
    server does better.  Never takes longer than ``total_timeout``.
    """
    if len(query) < 12 or len(query) > MAX_MESSAGE:
        raise UpstreamError(f"refusing to forward a {len(query)}-byte message")
    servers = upstreams.current() if isinstance(upstreams, Upstreams) else list(upstreams)
    if not servers:
        raise UpstreamError("no upstream DNS servers configured")
    errors: list[str] = []
    fallback: bytes | None = None
    tried: set[int] = set()  # positions (a server listed twice is asked twice)
    with trio.move_on_after(total_timeout):
        # Go round the servers until the total budget is spent: one lost UDP
        # datagram must cost a retry, not a SERVFAIL.  Servers that answered
        # (even with an error) or refused are not asked again.
        for round_ in range(4):
            progress = False
            for i, server in enumerate(servers):
                if i in tried:
                    continue
                where = f"{server[0]}:{server[1]}"
                try:
                    with trio.fail_after(timeout_per_server):
                        if tcp:
                            reply = await _tcp_exchange(query, server)
                        else:
                            reply = await _udp_exchange(query, server)
                except trio.TooSlowError:
                    errors.append(f"{where}: timeout")
                    progress = True
                    continue  # silent: worth another try in the next round
                except _EXCHANGE_ERRORS as exc:
                    errors.append(f"{where}: {exc}")
                    tried.add(i)
                    continue
                tried.add(i)
                progress = True
                if is_truncated(reply) and not tcp:
                    # Keep the truncated answer: some resolvers have no TCP, and a
                    # TC reply (the client may retry over TCP itself) beats SERVFAIL.
                    fallback = fallback or reply
                    try:
                        with trio.fail_after(timeout_per_server):
                            reply = await _tcp_exchange(query, server)
                    except (trio.TooSlowError, *_EXCHANGE_ERRORS) as exc:
                        errors.append(f"{where} over TCP: {exc}")
                        continue
                if rcode_of(reply) in _RETRY_RCODES:
                    errors.append(f"{where}: rcode {rcode_of(reply)}")
                    fallback = fallback or reply
                    continue
                return reply
            if not progress or len(tried) == len(servers):
                break
    if fallback is not None:
        return fallback
    if len(errors) < len(servers):
        errors.append(f"gave up after {total_timeout:g}s")
    raise UpstreamError("all upstream DNS servers failed: " + "; ".join(errors))
