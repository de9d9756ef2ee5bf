"""QEMU's ``-netdev dgram`` peer: unix datagrams, one frame each, no ``VFKT`` hello.

QEMU binds its own path (``local.path``) and sends frames to ours
(``remote.path``); the vfkit listener (framing ``vfkit`` or ``dgram``) takes
the first frame as the start of the link, and answers to QEMU's path.
"""

import socket

import pytest
import trio

from rdswitch.aio.connect import dial, listen
from rdswitch.framing import VFKIT_HELLO, validate_framing

FRAME1 = bytes.fromhex("ffffffffffff5a94efe40cee0806") + b"\x01" * 46  # an ARP-ish broadcast
FRAME2 = bytes.fromhex("5a94efe40cdd5a94efe40cee0800") + b"\x02" * 1500


def run(fn, *args):
    async def main():
        with trio.fail_after(10):
            await fn(*args)

    trio.run(main)


def qemu_like_socket(path: str) -> socket.socket:
    """What QEMU's dgram backend does: a SOCK_DGRAM socket bound to local.path, not connected."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(5)
    return s


async def recv_n(link, n):
    got = []
    for _ in range(100):
        if len(got) >= n:
            break
        got += await link.receive_batch()
    return got


def test_dgram_is_a_name_for_the_datagram_framing():
    assert validate_framing("dgram") == "vfkit"
    assert validate_framing("DGRAM") == "vfkit"


@pytest.mark.parametrize("framing", ["vfkit", "dgram"])
def test_first_frame_opens_the_link_and_is_delivered(tmp_path, framing):
    ours = str(tmp_path / "hs.sock")
    theirs = str(tmp_path / "qemu.sock")

    async def main():
        listener = await listen(f"unix://{ours}", framing)
        q = qemu_like_socket(theirs)
        try:
            q.sendto(FRAME1, ours)  # no hello
            q.sendto(FRAME2, ours)
            link = await listener.accept()
            assert link.peer == f"unix://{theirs}"
            assert await recv_n(link, 2) == [FRAME1, FRAME2]  # the opening frame is not lost
            await link.send_batch([FRAME2, FRAME1])
            assert q.recv(70000) == FRAME2  # answered at QEMU's own path
            assert q.recv(70000) == FRAME1
            await link.aclose()
        finally:
            q.close()
            await listener.aclose()

    run(main)


def test_abstract_address_peer(tmp_path):
    ours = str(tmp_path / "hs.sock")

    async def main():
        listener = await listen(f"unix://{ours}", "dgram")
        q = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        q.bind("")  # autobind: an abstract address, still answerable
        q.settimeout(5)
        try:
            q.sendto(FRAME1, ours)
            link = await listener.accept()
            assert link.peer.startswith("unix://@")
            assert await link.receive_batch() == [FRAME1]
            await link.send_batch([FRAME2])
            assert q.recv(70000) == FRAME2
            await link.aclose()
        finally:
            q.close()
            await listener.aclose()

    run(main)


def test_unbound_sender_and_empty_datagram_open_nothing(tmp_path):
    ours = str(tmp_path / "hs.sock")
    theirs = str(tmp_path / "qemu.sock")

    async def main():
        listener = await listen(f"unix://{ours}", "dgram")
        unbound = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        q = qemu_like_socket(theirs)
        try:
            unbound.sendto(FRAME2, ours)  # nobody to answer: ignored
            q.sendto(b"", ours)  # not a frame: ignored
            q.sendto(FRAME1, ours)
            link = await listener.accept()
            assert link.peer == f"unix://{theirs}"
            assert await link.receive_batch() == [FRAME1]
            await link.aclose()
        finally:
            unbound.close()
            q.close()
            await listener.aclose()

    run(main)


def test_vfkit_hello_still_opens_without_a_frame(tmp_path):
    ours = str(tmp_path / "hs.sock")
    theirs = str(tmp_path / "vfkit.sock")

    async def main():
        listener = await listen(f"unix://{ours}", "vfkit")
        q = qemu_like_socket(theirs)
        try:
            q.sendto(VFKIT_HELLO, ours)
            link = await listener.accept()
            q.sendto(VFKIT_HELLO, ours)  # a repeated hello is not a frame
            q.sendto(FRAME1, ours)
            assert await link.receive_batch() == [FRAME1]
            await link.aclose()
        finally:
            q.close()
            await listener.aclose()

    run(main)


def test_our_dialer_with_dgram_framing_reaches_the_listener(tmp_path):
    ours = str(tmp_path / "hs.sock")

    async def main():
        listener = await listen(f"unix://{ours}", "dgram")
        async with trio.open_nursery() as nursery:
            accepted = []

            async def acc():
                accepted.append(await listener.accept())

            nursery.start_soon(acc)
            client = await dial(f"unix://{ours}", "dgram")
        server = accepted[0]
        await client.send_batch([FRAME1])
        assert await server.receive_batch() == [FRAME1]
        await server.send_batch([FRAME2])
        assert await client.receive_batch() == [FRAME2]
        await client.aclose()
        await server.aclose()
        await listener.aclose()

    run(main)
