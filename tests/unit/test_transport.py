import os
import socket
import stat
import struct

import pytest
import trio

from rdswitch.aio import connect, links
from rdswitch.config import ConfigError
from rdswitch.framing import FramingError, encode
from rdswitch.aio.connect import dial, dial_stream, listen, listen_stream
from rdswitch.aio.links import StreamFrameLink, link_from_fd
from rdswitch.urls import parse_url

FRAMES = [b"\x01" * 60, b"\x02" * 1514, b"\x03" * 65535, b"\x04"]


def run(fn, *args):
    async def main():
        with trio.fail_after(10):
            await fn(*args)

    trio.run(main)


async def recv_n(link, n):
    got = []
    for _ in range(10_000):  # bounded; fail_after bounds the time
        if len(got) >= n:
            break
        batch = await link.receive_batch()
        assert batch, "unexpected EOF"
        got += batch
    return got


# ---------------------------------------------------------------- URLs


def test_parse_url_good():
    assert parse_url("unix:///run/x.sock").path == "/run/x.sock"
    assert parse_url("unix://@abstract").path == "\0abstract"
    assert str(parse_url("unix://@abstract")) == "unix://@abstract"
    ep = parse_url("tcp://127.0.0.1:6656")
    assert (ep.host, ep.port, ep.family) == ("127.0.0.1", 6656, socket.AF_INET)
    ep = parse_url("tcp://[::1]:80")
    assert (ep.host, ep.port, ep.family, str(ep)) == ("::1", 80, socket.AF_INET6, "tcp://[::1]:80")
    assert parse_url("tcp://localhost:0").port == 0
    ep = parse_url("vsock://2:6656")
    assert (ep.cid, ep.port, ep.sockaddr()) == (2, 6656, (2, 6656))
    ep = parse_url("vsock://:6669")
    assert ep.cid is None and ep.sockaddr(listening=True) == (0xFFFFFFFF, 6669)
    assert str(ep) == "vsock://:6669"
    assert parse_url("vsock://host:6656").cid == 2
    assert parse_url("fd://3").fd == 3


@pytest.mark.parametrize(
    "url, msg",
    [
        ("/tmp/x", "expected unix"),
        ("http://x:1", "unknown scheme 'http'"),
        ("unix://", "no socket path"),
        ("unix:///" + "a" * 200, "longer than 107"),
        ("tcp://127.0.0.1", "no port"),
        ("tcp://:80", "no host"),
        ("tcp://127.0.0.1:99999", "must be 0..65535"),
        ("tcp://127.0.0.1:http", "not a number"),
        ("tcp://bad host:1", "not an IP address"),
        ("vsock://2", "expected vsock://CID:PORT"),
        ("vsock://x:1", "CID 'x' is not a number"),
        ("fd://three", "not a number"),
        (None, "invalid URL"),
    ],
)
def test_parse_url_bad(url, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_url(url)


def test_vsock_dial_needs_cid():
    with pytest.raises(ConfigError, match="no CID"):
        parse_url("vsock://:6656").sockaddr()


def test_vsock_missing_family(monkeypatch):
    monkeypatch.delattr(socket, "AF_VSOCK", raising=False)
    with pytest.raises(ConfigError, match="AF_VSOCK"):
        parse_url("vsock://2:6656").family


def test_vsock_unsupported_kernel(monkeypatch):
    real = socket.socket

    def fake(family=-1, type_=-1, *a, **kw):
        if family == getattr(socket, "AF_VSOCK", -2):
            raise OSError(97, "Address family not supported by protocol")
        return real(family, type_, *a, **kw)

    monkeypatch.setattr(connect._stdsocket, "socket", fake)
    if not hasattr(socket, "AF_VSOCK"):
        pytest.skip("no AF_VSOCK constant")
    with pytest.raises(OSError, match="vsock is not available"):
        connect._new_socket(socket.AF_VSOCK, socket.SOCK_STREAM)


def test_framing_needs_unix_for_datagrams():
    async def main():
        with pytest.raises(ConfigError, match="unix://"):
            await listen("tcp://127.0.0.1:0", "bess")
        with pytest.raises(ConfigError, match="unix://"):
            await dial("tcp://127.0.0.1:1", "vfkit")

    run(main)


# ---------------------------------------------------------------- stream links


async def _pair(url, framing):
    listener = await listen(url, framing)
    async with trio.open_nursery() as nursery:
        accepted = []

        async def acc():
            accepted.append(await listener.accept())

        nursery.start_soon(acc)
        client = await dial(listener.url, framing)
    return listener, client, accepted[0]


async def _exchange(url, framing):
    listener, client, server = await _pair(url, framing)
    async with client, server:
        await client.send_batch(FRAMES)
        assert await recv_n(server, len(FRAMES)) == FRAMES
        await server.send_batch(FRAMES[::-1])
        assert await recv_n(client, len(FRAMES)) == FRAMES[::-1]
        # many small frames arrive batched, in order
        many = [bytes([i % 256]) * (60 + i) for i in range(300)]
        await client.send_batch(many)
        assert await recv_n(server, len(many)) == many
        if hasattr(client, "send_eof"):
            await client.send_eof()
            assert await server.receive_batch() == []
            assert await server.receive_batch() == []  # EOF is sticky
    await listener.aclose()


@pytest.mark.parametrize("framing", ["stdio", "qemu"])
def test_unix_stream_link(tmp_path, framing):
    path = tmp_path / "d.sock"
    run(_exchange, f"unix://{path}", framing)
    assert not path.exists()  # the listener removed its socket file


def test_tcp_link():
    run(_exchange, "tcp://127.0.0.1:0", "stdio")


def test_bess_link(tmp_path):
    run(_exchange, f"unix://{tmp_path}/b.sock", "bess")


def test_vfkit_link(tmp_path):
    run(_exchange, f"unix://{tmp_path}/v.sock", "vfkit")


def test_unix_listener_mode_and_stale_file(tmp_path):
    path = str(tmp_path / "s.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # a socket file nobody listens on

    async def main():
        listener = await listen_stream(f"unix://{path}")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with pytest.raises(OSError, match="another process is listening"):
            await listen_stream(f"unix://{path}")
        await listener.aclose()

    run(main)


def test_unix_listen_refuses_regular_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("keep me")

    async def main():
        with pytest.raises(ConfigError, match="not a socket"):
            await listen(f"unix://{path}")

    run(main)
    assert path.read_text() == "keep me"


def test_stream_link_garbage_raises_framing_error(tmp_path):
    async def main():
        listener, client, server = await _pair(f"unix://{tmp_path}/g.sock", "stdio")
        client.sock.sendall(encode("stdio", [b"ok"]) + b"\x00\x00junk")
        with pytest.raises(FramingError, match="zero-length") as ei:
            await server.receive_batch()
        assert ei.value.frames == [b"ok"]
        await client.aclose()
        await server.aclose()
        await listener.aclose()

    run(main)


def test_stream_link_truncated_eof(tmp_path):
    async def main():
        listener, client, server = await _pair("tcp://127.0.0.1:0", "stdio")
        client.sock.sendall(b"\x10\x00abc")
        await client.aclose()
        with pytest.raises(FramingError, match="truncated"):
            await server.receive_batch()
        await server.aclose()
        await listener.aclose()

    run(main)


def test_stream_link_reset_is_broken_resource():
    async def main():
        listener = await listen_stream("tcp://127.0.0.1:0")
        raw = socket.create_connection(("127.0.0.1", int(listener.url.rsplit(":", 1)[1])))
        server = StreamFrameLink(await listener.accept(), "stdio")
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raw.close()  # RST
        with pytest.raises(trio.BrokenResourceError):
            await server.receive_batch()
        await server.aclose()
        await listener.aclose()

    run(main)


class CountingStream(trio.abc.Stream):
    def __init__(self):
        self.sends = []

    async def send_all(self, data):
        self.sends.append(bytes(data))

    async def wait_send_all_might_not_block(self):
        pass

    async def receive_some(self, max_bytes=None):
        return b""

    async def aclose(self):
        pass


def test_send_batch_is_one_send():
    async def main():
        s = CountingStream()
        link = StreamFrameLink(s, "qemu")
        await link.send_batch(FRAMES)
        await link.send_batch([])
        assert s.sends == [encode("qemu", FRAMES)]
        assert await link.receive_batch() == []

    run(main)


def test_memory_stream_link():
    async def main():
        a, b = trio.testing.memory_stream_pair()
        la, lb = StreamFrameLink(a, "stdio"), StreamFrameLink(b, "stdio")
        await la.send_batch(FRAMES)
        assert await recv_n(lb, len(FRAMES)) == FRAMES

    import trio.testing  # noqa: F401

    run(main)


# ---------------------------------------------------------------- fd://


def test_link_from_fd_socketpair():
    a, b = socket.socketpair()

    async def main():
        link = link_from_fd(a.detach(), "stdio")
        other = StreamFrameLink(trio.SocketStream(trio.socket.from_stdlib_socket(b)), "stdio")
        await link.send_batch(FRAMES)
        assert await recv_n(other, len(FRAMES)) == FRAMES
        await other.send_batch([b"back"])
        assert await link.receive_batch() == [b"back"]
        await other.aclose()
        assert await link.receive_batch() == []
        await link.aclose()

    run(main)


def test_dial_fd_url_seqpacket():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    async def main():
        link = await dial(f"fd://{a.detach()}", "bess")
        other = links.DatagramFrameLink(b, "bess")
        await link.send_batch(FRAMES)
        assert await recv_n(other, len(FRAMES)) == FRAMES
        await other.send_batch([b"x" * 100])
        assert await link.receive_batch() == [b"x" * 100]
        await other.aclose()
        assert await link.receive_batch() == []
        await link.aclose()

    run(main)


def test_fd_wrong_socket_type():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with pytest.raises(ConfigError, match="SOCK_SEQPACKET socket; stdio framing needs SOCK_STREAM"):
        link_from_fd(a.fileno(), "stdio")
    os.fstat(a.fileno())  # still open: the failed call did not take it
    a.close()
    b.close()
    with pytest.raises(ConfigError, match="not an open file descriptor"):
        link_from_fd(987654, "stdio")


def test_fd_pipe_is_not_for_datagrams():
    r, w = os.pipe()
    try:
        with pytest.raises(ConfigError, match="not a socket"):
            link_from_fd(r, "bess")
    finally:
        os.close(r)
        os.close(w)


def test_dial_stream_fd_and_url(tmp_path):
    async def main():
        listener = await listen_stream(f"unix://{tmp_path}/r.sock")
        client = await dial_stream(listener.url)
        server = await listener.accept()
        await client.send_all(b"hello")
        assert await server.receive_some(100) == b"hello"
        await client.aclose()
        await server.aclose()
        await listener.aclose()

    run(main)


def test_seqpacket_oversized_and_empty():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    async def main():
        link = links.DatagramFrameLink(a, "bess", max_frame=100)
        b.send(b"y" * 101)
        with pytest.raises(FramingError, match="too large"):
            await link.receive_batch()
        with pytest.raises(FramingError, match="zero-length"):
            await link.send_batch([b""])
        await link.aclose()
        b.close()

    run(main)
