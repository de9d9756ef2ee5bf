"""An in-process VM for host-switch tests: a frame link in memory and TCP clients built from our own codecs.

``MemoryLink`` is the host-switch's end of a VM connection; ``VmPeer`` is
the VM's end: it sends Ethernet frames from the VM's MAC and IP and feeds the
frames it receives to the sans-IO TCP connections it opened, so a test can
talk to the gateway's services without a kernel, a namespace or a socket.
"""

from __future__ import annotations

import math

import trio

from rdswitch.config import NetConfig
from rdswitch.stack.tcp import TcpConnection
from rdswitch.wire import ethernet, ipv4, tcp


class MemoryLink:
    """The host-switch's side of a VM connection, as a FrameLink over memory channels."""

    peer = "memory"
    framing = "stdio"

    def __init__(self) -> None:
        self.to_host, self._from_vm = trio.open_memory_channel(math.inf)
        self._to_vm, self.from_host = trio.open_memory_channel(math.inf)

    async def receive_batch(self) -> list[bytes]:
        try:
            return [await self._from_vm.receive()]
        except (trio.EndOfChannel, trio.ClosedResourceError):
            return []

    async def send_batch(self, frames: list[bytes]) -> None:
        for frame in frames:
            try:
                self._to_vm.send_nowait(frame)
            except trio.BrokenResourceError:
                raise trio.BrokenResourceError("the VM went away") from None
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        self._from_vm.close()
        self._to_vm.close()
        await trio.lowlevel.checkpoint()


class VmPeer:
    """The VM: opens TCP connections to the gateway side and keeps them going."""

    def __init__(self, link: MemoryLink, net: NetConfig) -> None:
        self.link = link
        self.net = net
        self.mac = net.vm_mac
        self.ip = net.vm_ip.packed
        self.conns: dict[int, tuple[TcpConnection, bytes]] = {}  # local port -> (conn, remote ip)
        self._next_port = 40000
        self._changed = trio.Event()

    def _send(self, conn: TcpConnection, dst_ip: bytes) -> None:
        for seg in conn.take_outgoing():
            packet = ipv4.build(self.ip, dst_ip, ipv4.PROTO_TCP, tcp.build(seg, self.ip, dst_ip))
            self.link.to_host.send_nowait(ethernet.build(self.net.gateway_mac, self.mac, ethernet.TYPE_IPV4, packet))

    def connect(self, dst_ip: bytes, dst_port: int) -> TcpConnection:
        port = self._next_port = self._next_port + 1
        conn = TcpConnection.connect(port, dst_port, trio.current_time(), iss=port * 1000, mss=1460)
        self.conns[port] = (conn, dst_ip)
        self._send(conn, dst_ip)
        return conn

    def write(self, conn: TcpConnection, data: bytes) -> None:
        assert conn.send(data, trio.current_time()) == len(data)
        self._send(conn, self.conns[conn.local_port][1])

    async def run(self) -> None:
        """Feed received frames to the connections (until the link closes)."""
        async for frame in self.link.from_host:
            if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[23] != ipv4.PROTO_TCP:
                continue
            pkt = ipv4.parse(memoryview(frame)[14:])
            seg = tcp.parse(pkt.payload)
            found = self.conns.get(seg.dst_port)
            if found is not None:
                conn, dst_ip = found
                conn.receive_segment(seg, trio.current_time())
                self._send(conn, dst_ip)
                self._changed.set()
                self._changed = trio.Event()

    async def wait_established(self, conn: TcpConnection) -> None:
        while not conn.established:
            if conn.closed:
                raise ConnectionRefusedError("the gateway side refused")
            await self._changed.wait()
