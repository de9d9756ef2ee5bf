"""host-switch refuses bad flags before it starts: one stderr line, exit status 2, no traceback.

Each case runs the real command in a subprocess; the ``fd://N`` listener is
also started for real (an inherited listening socket, systemd-style).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from tests.nsutil import wait_for

BASE = [sys.executable, "-m", "rdswitch.host", "--allow-outbound", "127.0.0.0/8"]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(BASE + args, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
                          cwd=REPO, **kw)


def assert_refused(res: subprocess.CompletedProcess, needle: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert "error: " in lines[0] and needle in lines[0], res.stderr


@pytest.mark.parametrize("flags,needle", [
    (["--dns-record", "no-equals-sign"], "--dns-record"),
    (["--dns-record", "foo.internal=1.2.3.999"], "1.2.3.999"),
    (["--dns-upstream", "1.2.3.4:99999"], "99999"),
    (["--dns-zone-file", "/nonexistent/zones.json"], "--dns-zone-file"),
    (["--dns-ttl", "0"], "TTL"),
    (["--dns-search", "bad..domain"], "bad..domain"),
])
def test_bad_dns_flags(tmp_path, flags, needle):
    assert_refused(run(["--listen", f"unix://{tmp_path}/hs.sock", *flags]), needle)


@pytest.mark.parametrize("flags,needle", [
    (["--vm-expose-address", "1.2.3"], "--vm-expose-address '1.2.3'"),
    (["--vm-expose-address", "localhost"], "--vm-expose-address"),
    (["--vm-expose-ports", "0-1024"], "--vm-expose-ports"),
    (["--vm-expose-ports", "2000-1000"], "--vm-expose-ports"),
    (["--vm-expose-ports", "http"], "--vm-expose-ports"),
    (["--vm-expose-unix-dir", "relative/dir"], "--vm-expose-unix-dir"),
    (["--vm-expose-unix-dir", "/"], "--vm-expose-unix-dir"),
    (["--vm-expose-unix-dir", "/nonexistent/rdswitch-dir"], "not a directory"),
    (["--vm-max-forwards", "-1"], "--vm-max-forwards"),
    (["--vm-max-forwards", "many"], "--vm-max-forwards"),
    (["--vm-max-dns-records", "x"], "--vm-max-dns-records"),
])
def test_bad_vm_policy_flags(tmp_path, flags, needle):
    assert_refused(run(["--listen", f"unix://{tmp_path}/hs.sock", *flags]), needle)
    assert not (tmp_path / "hs.sock").exists()  # refused before anything started


def test_a_unix_dir_that_is_a_symlink_to_the_root_is_refused(tmp_path):
    (tmp_path / "root").symlink_to("/")
    assert_refused(run(["--listen", f"unix://{tmp_path}/hs.sock", "--vm-expose-unix-dir", str(tmp_path / "root")]),
                   "root directory")


def test_live_socket_and_non_socket_at_a_listen_path(tmp_path):
    live = tmp_path / "live.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(live))
        server.listen(1)
        assert_refused(run(["--listen", f"unix://{live}"]), "another process is listening there")
        assert_refused(run(["--listen", "tcp://127.0.0.1:0", "--api-listen", f"unix://{live}"]),
                       "another process is listening there")
    assert live.exists()  # not clobbered
    plain = tmp_path / "plain"
    plain.write_text("not a socket")
    assert_refused(run(["--listen", f"unix://{plain}"]), "not a socket")
    assert plain.read_text() == "not a socket"


def test_fd_urls_that_cannot_listen(tmp_path):
    assert_refused(run(["--listen", "fd://987"]), "not an open file descriptor")
    r, w = os.pipe()
    a, b = socket.socketpair()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert_refused(run(["--listen", f"fd://{r}"], pass_fds=[r]), "not a socket")
        assert_refused(run(["--listen", f"fd://{a.fileno()}"], pass_fds=[a.fileno()]),
                       "expected a listening stream socket")
        assert_refused(run(["--listen", f"fd://{udp.fileno()}"], pass_fds=[udp.fileno()]),
                       "expected a listening stream socket")
    finally:
        for fd in (r, w):
            os.close(fd)
        for s in (a, b, udp):
            s.close()


def test_listen_on_an_inherited_listening_socket(tmp_path):
    path = str(tmp_path / "inherited.sock")
    log = tmp_path / "hs.log"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as lsock:
        lsock.bind(path)
        lsock.listen(4)
        fd = lsock.fileno()
        proc = subprocess.Popen(BASE + ["--listen", f"fd://{fd}", "--logfile", str(log)], pass_fds=[fd],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                cwd=REPO, text=True)
    try:
        wait_log(log, f"listening on fd://{fd}", proc)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as vm:
            vm.connect(path)  # the parent's socket, served by the child
            wait_log(log, "session started", proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0 and "Traceback" not in err, err


def wait_log(log, needle: str, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    def logged() -> bool:
        assert proc.poll() is None, proc.stderr.read()
        return log.exists() and needle in log.read_text()

    wait_for(logged, timeout, what=f"{needle!r} in the log")


# ---------------------------------------------------------------- defaults without flags (rdswitch.host.defaults)

NO_VSOCK = [sys.executable, "-c", "import sys, rdswitch.host.__main__ as m; m.vsock_works = lambda: False; "
                                  "sys.exit(m.main(sys.argv[1:]))"]


def test_no_flags_without_vsock_or_runtime_dir_is_refused(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    res = subprocess.run(NO_VSOCK, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
                         cwd=REPO, env=env)
    assert_refused(res, "nothing to serve")


def test_no_flags_listens_in_the_runtime_dir_without_vsock(tmp_path):
    log = tmp_path / "hs.log"
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)}
    proc = subprocess.Popen(NO_VSOCK + ["--logfile", str(log)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO, text=True, env=env)
    try:
        wait_log(log, f"listening on unix://{tmp_path}/rdswitch-host.sock", proc)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as vm:
            vm.connect(str(tmp_path / "rdswitch-host.sock"))  # no handshake: any peer gets a session
            wait_log(log, "session started", proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0 and "Traceback" not in err, err


def test_handshake_flags_that_leave_nothing_to_serve(tmp_path):
    assert_refused(run(["--handshake", f"unix://{tmp_path}/hs.sock"]), "needs a --listen URL")
    assert_refused(run(["--handshake", "hvsock://wsl:6669"]), "is not a GUID")
    assert_refused(run(["--handshake", "vsock://3"]), "expected vsock://CID:PORT")
    assert_refused(run(["--handshake", "vsock://:6669"]), "no CID")
    if not hasattr(socket, "AF_HYPERV"):  # not Windows: one line, not a traceback from inside trio
        assert_refused(run(["--handshake", "hvsock://a1b2c3d4-e5f6-4789-8abc-def012345678:6669"]), "AF_HYPERV")
        assert_refused(run(["--listen", "hvsock://:6656"]), "AF_HYPERV")


def test_help_documents_the_defaults():
    res = run(["--help"])
    assert res.returncode == 0
    assert "Windows" in res.stdout and "HostComputeService" in res.stdout and "vsock://:6656" in res.stdout


def test_with_a_handshake_nobody_else_gets_a_session(tmp_path):
    """The gate is wired in: before any VM answered the (vsock) handshake, a peer on the data URL is refused."""
    path = str(tmp_path / "host.sock")
    log = tmp_path / "hs.log"
    proc = subprocess.Popen(BASE + ["--handshake", "vsock://3:6669", "--listen", f"unix://{path}", "--logfile", str(log)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO,
                            text=True)
    try:
        wait_log(log, f"listening on unix://{path}", proc)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as intruder:
            intruder.connect(path)
            wait_log(log, "refused a data connection", proc)
            intruder.settimeout(10)
            assert intruder.recv(1) == b""  # closed by the host
        assert "no VM has passed the handshake yet" in log.read_text()
        assert "session started" not in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0 and "Traceback" not in err, err
