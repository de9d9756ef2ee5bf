"""``--capture`` is live: readable (file) or streamed (``-``) while host-switch runs."""

import os
import shutil
import socket
import struct
import subprocess
import sys
import threading

import pytest

from testbed import REPO, VM, free_port, stop, wait_until

PCAP_MAGIC = 0xA1B2C3D4

pytestmark = pytest.mark.skipif(not shutil.which("tshark"), reason="tshark not installed (scripts/setup)")


def complete_pcap(data: bytes) -> bytes:
    """``data`` cut after its last complete record (a live stream may end mid-record)."""
    pos = 24
    while pos + 16 <= len(data):
        incl = struct.unpack_from("<I", data, pos + 8)[0]
        if pos + 16 + incl > len(data):
            break
        pos += 16 + incl
    return data[:pos]


def tshark_icmp(path: str) -> str:
    res = subprocess.run(["tshark", "-r", path, "-Y", "icmp", "-T", "fields", "-e", "ip.src", "-e", "ip.dst",
                          "-e", "_ws.col.Info"], capture_output=True, text=True, timeout=60)
    return res.stdout


def has_echo_pair(out: str) -> bool:
    req = any(l.startswith("192.168.127.2\t192.168.127.1\t") and "Echo (ping) request" in l for l in out.splitlines())
    rep = any(l.startswith("192.168.127.1\t192.168.127.2\t") and "Echo (ping) reply" in l for l in out.splitlines())
    return req and rep


def test_capture_file_is_readable_while_the_switch_runs(bed, tmp_path):
    pcap = str(tmp_path / "live.pcap")
    hs = bed.host_switch("--capture", pcap)
    vm = bed.vm(hs)
    assert "2 received" in vm.run(["ping", "-c", "2", "-i", "0.2", "-W", "2", "192.168.127.1"]).stdout
    # the switch and the session stay up: the records must reach the file without an exit or session end
    out = wait_until(lambda: (lambda o: o if has_echo_pair(o) else None)(tshark_icmp(pcap)), 10,
                     "ICMP echo request and reply in the live capture")
    assert hs.proc.poll() is None and "session ended" not in hs.read_log()
    assert out.count("Echo (ping) request") >= 2


def test_capture_to_stdout_streams_pcap(bed, tmp_path):
    sock = str(tmp_path / "hs.sock")
    log = str(tmp_path / "hs.log")
    args = [sys.executable, "-m", "rdswitch.host", "--listen", f"unix://{sock}", "--logfile", log, "--debug",
            "--allow-outbound", "127.0.0.0/8", "--dns-upstream", f"127.0.0.1:{free_port(kind=socket.SOCK_DGRAM)}",
            "--capture", "-"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    got = bytearray()
    errs = bytearray()

    def pump(src, dst):
        while True:
            chunk = src.read1(65536)
            if not chunk:
                return
            dst += chunk

    threads = [threading.Thread(target=pump, args=(proc.stdout, got), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, errs), daemon=True)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: os.path.exists(sock) or proc.poll() is not None, 15, "host-switch socket")
        assert proc.poll() is None, errs.decode(errors="replace")

        class _Hs:  # what testbed.VM needs of a host-switch
            url = f"unix://{sock}"

        ns = bed.namespace()
        vm = VM(ns, _Hs(), str(tmp_path), "5a:94:ef:e4:0c:ee", [])
        bed._stack.callback(vm.kill)
        vm.wait_address()
        assert "2 received" in vm.run(["ping", "-c", "2", "-i", "0.2", "-W", "2", "192.168.127.1"]).stdout
        snap = str(tmp_path / "snapshot.pcap")

        def echo_pair_streamed():
            data = bytes(got)
            if len(data) < 24:
                return None
            with open(snap, "wb") as f:
                f.write(complete_pcap(data))
            return has_echo_pair(tshark_icmp(snap))

        wait_until(echo_pair_streamed, 10, "ICMP echo request and reply on host-switch's stdout")
        assert struct.unpack_from("<I", got)[0] == PCAP_MAGIC  # a pcap stream from byte 0: no log text in it
        assert proc.poll() is None
        assert b"listening on" in errs  # the log went to stderr
    finally:
        stop(proc)
        for t in threads:
            t.join(5)
    # after exit the whole stream is a valid capture (tshark reads it to the end without complaint)
    with open(snap, "wb") as f:
        f.write(bytes(got))
    res = subprocess.run(["tshark", "-r", snap], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "DHCP" in res.stdout


def test_capture_to_stdout_piped_into_tshark(bed, tmp_path):
    """The use case itself: ``host-switch --capture - | tshark -i -`` decodes frames while the switch runs."""
    sock = str(tmp_path / "hs.sock")
    args = [sys.executable, "-m", "rdswitch.host", "--listen", f"unix://{sock}", "--logfile", str(tmp_path / "hs.log"),
            "--allow-outbound", "127.0.0.0/8", "--dns-upstream", f"127.0.0.1:{free_port(kind=socket.SOCK_DGRAM)}",
            "--capture", "-"]
    hs = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO)
    tshark = subprocess.Popen(["tshark", "-l", "-n", "-i", "-", "-Y", "icmp", "-T", "fields", "-e", "ip.src",
                               "-e", "ip.dst", "-e", "_ws.col.Info"],
                              stdin=hs.stdout, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    hs.stdout.close()  # tshark holds the pipe now
    lines: list[str] = []

    def read_lines():
        for line in tshark.stdout:
            lines.append(line)

    reader = threading.Thread(target=read_lines, daemon=True)
    reader.start()
    try:
        wait_until(lambda: os.path.exists(sock) or hs.poll() is not None, 15, "host-switch socket")
        assert hs.poll() is None

        class _Hs:  # what testbed.VM needs of a host-switch
            url = f"unix://{sock}"

        vm = VM(bed.namespace(), _Hs(), str(tmp_path), "5a:94:ef:e4:0c:ee", [])
        bed._stack.callback(vm.kill)
        vm.wait_address()
        assert "2 received" in vm.run(["ping", "-c", "2", "-i", "0.2", "-W", "2", "192.168.127.1"]).stdout
        wait_until(lambda: has_echo_pair("".join(lines)), 20, "tshark -i - decoding the echo request and reply")
        assert hs.poll() is None and tshark.poll() is None
    finally:
        stop(hs)
        stop(tshark)
        reader.join(5)
