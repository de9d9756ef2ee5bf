#!/usr/bin/env python3
"""The "relay" rows of scripts/bench: what two user-space processes cost that only move frames.

    python relay.py trio|plain TAP SOCKET listen|connect MAX_SECONDS

One process per side, like host-switch + vm-switch: each opens a tap and
moves whole Ethernet frames between it and one unix stream socket (16-bit LE
length before each frame, the stdio framing), nothing else: no switch, no
gateway, no NAT, no TCP of its own; the kernels at both ends do all of that.
A round trip through two relays wakes the two processes twice each, exactly
as a round trip through vm-switch and host-switch does, so the relay rows are
the floor of that design: what is left of rdswitch's figures above them is the
cost of its own work per frame.

trio   both directions as trio tasks waiting with trio.lowlevel.wait_readable
       and sending inline, as vm-switch does (needs the project's venv)
plain  one blocking epoll loop per process, stdlib only: the same work
       without an async framework

Listening, it prints TAP once its tap exists; both sides print READY once the
socket is connected. Exits when the socket closes or MAX_SECONDS pass.
"""

import errno
import fcntl
import os
import select
import socket
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
BATCH = 64  # frames read from the tap per wake, at most


def open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


def open_socket(path: str, role: str, deadline: float) -> socket.socket:
    if role == "listen":
        ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.exists(path):
            os.unlink(path)  # left by an earlier round
        ls.bind(path)
        ls.listen(1)
        ls.settimeout(max(0.1, deadline - time.monotonic()))
        sock, _ = ls.accept()
        ls.close()
        os.unlink(path)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        for _ in range(200):  # bounded: 200 x 50 ms
            try:
                sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                time.sleep(0.05)  # ok-sleep: the listening side is still starting
        else:
            raise SystemExit(f"relay: {path} never accepted")
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    return sock


def frames_out(tap: int) -> bytes:
    """What the tap holds (bounded), framed for the socket."""
    out = []
    for _ in range(BATCH):
        try:
            frame = os.read(tap, 65536)
        except BlockingIOError:
            break
        out.append(struct.pack("<H", len(frame)))
        out.append(frame)
    return b"".join(out)


def frames_in(buf: bytearray, tap: int) -> None:
    """Write every whole frame in buf to the tap (a full tap queue drops, like a wire)."""
    pos = 0
    while len(buf) - pos >= 2:
        (n,) = struct.unpack_from("<H", buf, pos)
        if len(buf) - pos - 2 < n:
            break
        try:
            os.write(tap, memoryview(buf)[pos + 2:pos + 2 + n])
        except BlockingIOError:
            pass
        except OSError as exc:  # EIO: the tap is not up yet (the other side's first frames); drop
            if exc.errno not in (errno.EIO, errno.EINVAL):
                raise
        pos += 2 + n
    del buf[:pos]


def run_plain(tap: int, sock: socket.socket, deadline: float) -> None:
    ep = select.epoll()
    ep.register(tap, select.EPOLLIN)
    ep.register(sock.fileno(), select.EPOLLIN)
    buf = bytearray()
    while time.monotonic() < deadline:
        for fd, _ev in ep.poll(1.0):
            if fd == tap:
                data = frames_out(tap)
                if data:
                    sock.sendall(data)
            else:
                data = sock.recv(1 << 18)
                if not data:
                    return
                buf += data
                frames_in(buf, tap)


def run_trio(tap: int, sock: socket.socket, deadline: float) -> None:
    import trio

    sock.setblocking(False)

    async def tap_to_sock() -> None:
        while True:
            await trio.lowlevel.wait_readable(tap)
            data = memoryview(frames_out(tap))
            while data:
                try:
                    data = data[sock.send(data):]
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(sock)

    async def sock_to_tap(cancel) -> None:
        buf = bytearray()
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                data = sock.recv(1 << 18)
            except BlockingIOError:
                continue
            if not data:
                cancel()
                return
            buf += data
            frames_in(buf, tap)

    async def main() -> None:
        with trio.move_on_at(trio.current_time() + deadline - time.monotonic()):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(tap_to_sock)
                nursery.start_soon(sock_to_tap, nursery.cancel_scope.cancel)

    trio.run(main)


def main(argv: list[str]) -> int:
    if len(argv) != 5 or argv[0] not in ("trio", "plain") or argv[3] not in ("listen", "connect"):
        print(__doc__, file=sys.stderr)
        return 2
    mode, tap_name, path, role, max_seconds = argv
    deadline = time.monotonic() + float(max_seconds)
    tap = open_tap(tap_name)
    if role == "listen":
        print("TAP", flush=True)  # the connecting side may start now
    sock = open_socket(path, role, deadline)
    print("READY", flush=True)
    (run_trio if mode == "trio" else run_plain)(tap, sock, deadline)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
