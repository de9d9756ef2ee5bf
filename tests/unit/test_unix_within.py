"""A VM's unix socket on the host: made below the granted directory, following no symlink, replacing nothing.

Real files, directories and symlinks in a temporary directory; the listener
is ``aio.connect.listen_unix_within`` (what the forwarder uses for a VM).
"""

from __future__ import annotations

import errno
import os
import socket
import stat

import pytest
import trio

from rdswitch.aio.connect import listen_unix_within


@pytest.fixture
def tree(tmp_path):
    """granted/ (with sub/), outside/, and symlinks from granted/ to outside."""
    granted, outside = tmp_path / "granted", tmp_path / "outside"
    (granted / "sub").mkdir(parents=True)
    outside.mkdir()
    (granted / "to-outside").symlink_to(outside)
    (granted / "to-sub").symlink_to(granted / "sub")  # a symlink that stays inside is refused too
    (granted / "dangling.sock").symlink_to(outside / "made-by-vm.sock")
    (granted / "to-file").symlink_to(outside / "victim.txt")
    (outside / "victim.txt").write_text("keep")
    return granted, outside


def listing(path) -> list[str]:
    return sorted(os.listdir(path))


def test_a_socket_below_the_directory_mode_0600_removed_at_close(tree):
    granted, _ = tree

    async def main():
        listener = listen_unix_within(str(granted), ("sub", "docker.sock"))
        path = granted / "sub" / "docker.sock"
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert listener.url == f"unix://{path}"
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))
            stream = await listener.accept()
            await stream.aclose()
        await listener.aclose()
        assert not path.exists()

    trio.run(main)


@pytest.mark.parametrize("parts,code", [
    (("to-outside", "x.sock"), (errno.ENOTDIR, errno.ELOOP)),  # a symlinked directory on the way
    (("to-sub", "x.sock"), (errno.ENOTDIR, errno.ELOOP)),
    (("dangling.sock",), (errno.EADDRINUSE,)),  # bind() never follows the last component
    (("to-file",), (errno.EADDRINUSE,)),
    (("missing", "x.sock"), (errno.ENOENT,)),
    (("..", "x.sock"), (errno.EINVAL,)),
    (("sub/../..", "x.sock"), (errno.EINVAL,)),
])
def test_symlinks_and_odd_parts_are_refused_and_nothing_is_made(tree, parts, code):
    granted, outside = tree
    before = (listing(granted), listing(granted / "sub"), listing(outside))
    with pytest.raises(OSError) as info:
        listen_unix_within(str(granted), parts)
    assert info.value.errno in code
    assert (listing(granted), listing(granted / "sub"), listing(outside)) == before
    assert (outside / "victim.txt").read_text() == "keep"


def test_an_existing_file_or_socket_is_never_replaced(tree):
    granted, _ = tree
    plain = granted / "plain.sock"
    plain.write_text("not a socket")
    stale = granted / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # nobody listens: stale, which the host's own API would replace
    ino = os.lstat(stale).st_ino
    for name in ("plain.sock", "stale.sock"):
        with pytest.raises(OSError) as info:
            listen_unix_within(str(granted), (name,))
        assert info.value.errno == errno.EADDRINUSE
    assert plain.read_text() == "not a socket" and os.lstat(stale).st_ino == ino


def test_a_granted_directory_that_is_a_symlink_is_followed_once(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real)

    async def main():
        listener = listen_unix_within(str(tmp_path / "alias"), ("x.sock",))
        assert stat.S_ISSOCK(os.lstat(real / "x.sock").st_mode)
        await listener.aclose()
        assert listing(real) == []

    trio.run(main)


def test_close_leaves_a_file_that_replaced_ours(tree):
    granted, _ = tree

    async def main():
        listener = listen_unix_within(str(granted), ("x.sock",))
        os.unlink(granted / "x.sock")
        (granted / "x.sock").write_text("someone else's")
        await listener.aclose()
        assert (granted / "x.sock").read_text() == "someone else's"

    trio.run(main)


def test_fds_are_not_leaked(tree):
    granted, _ = tree
    before = len(os.listdir("/proc/self/fd"))

    async def main():
        for _ in range(20):
            with pytest.raises(OSError):
                listen_unix_within(str(granted), ("to-outside", "x.sock"))
            with pytest.raises(OSError):
                listen_unix_within(str(granted), ("dangling.sock",))
            listener = listen_unix_within(str(granted), ("sub", "ok.sock"))
            await listener.aclose()

    trio.run(main)
    assert len(os.listdir("/proc/self/fd")) == before
