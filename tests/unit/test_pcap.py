import shutil
import struct
import subprocess

import pytest
from hypothesis import given, strategies as st

from rdswitch.wire.pcap import pcap_header, pcap_record


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def icmp_echo_frame(src: str, dst: str, seq: int, reply: bool = False) -> bytes:
    payload = b"rdswitch-pcap-test" * 2
    icmp = struct.pack("!BBHHH", 0 if reply else 8, 0, 0, 0x1234, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", _csum(icmp)) + icmp[4:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), seq, 0, 64, 1, 0,
                     bytes(map(int, src.split("."))), bytes(map(int, dst.split("."))))
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    eth = bytes.fromhex("5a94efe40cdd") + bytes.fromhex("5a94efe40cee") + b"\x08\x00"
    return eth + ip + icmp


def test_header_layout():
    h = pcap_header()
    assert len(h) == 24
    assert struct.unpack("<IHHiIII", h) == (0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)


def test_record_layout_and_snaplen():
    r = pcap_record(b"abcdef", 1700000000.25)
    assert struct.unpack("<IIII", r[:16]) == (1700000000, 250000, 6, 6)
    assert r[16:] == b"abcdef"
    r = pcap_record(b"x" * 100, 5.0, snaplen=10)
    assert struct.unpack("<IIII", r[:16]) == (5, 0, 10, 100) and len(r) == 26
    # rounding up to a whole second carries into the seconds field
    assert struct.unpack("<II", pcap_record(b"a", 1.9999999)[:8]) == (2, 0)
    with pytest.raises(ValueError):
        pcap_record(b"a", -1.0)
    with pytest.raises(ValueError):
        pcap_record(b"a", float("nan"))


@given(ts=st.floats(0, 2**32 - 2, allow_nan=False), n=st.integers(0, 2000))
def test_record_fields_property(ts, n):
    r = pcap_record(b"\x07" * n, ts)
    sec, usec, incl, orig = struct.unpack("<IIII", r[:16])
    assert 0 <= usec < 1_000_000 and incl == orig == n == len(r) - 16
    assert abs(sec + usec / 1e6 - ts) <= 1e-6 + ts * 1e-15


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")
def test_tshark_reads_icmp(tmp_path):
    path = tmp_path / "cap.pcap"
    frames = [
        icmp_echo_frame("192.168.127.2", "192.168.127.1", 1),
        icmp_echo_frame("192.168.127.1", "192.168.127.2", 1, reply=True),
        icmp_echo_frame("192.168.127.2", "192.168.127.1", 2),
    ]
    with open(path, "wb") as f:
        f.write(pcap_header())
        for i, fr in enumerate(frames):
            f.write(pcap_record(fr, 1700000000.0 + i * 0.5))
    out = subprocess.run(
        ["tshark", "-n", "-r", str(path), "-T", "fields", "-e", "ip.src", "-e", "icmp.type", "-e", "icmp.checksum.status"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    rows = [line.split("\t") for line in out.stdout.strip().splitlines()]
    assert rows == [
        ["192.168.127.2", "8", "1"],
        ["192.168.127.1", "0", "1"],
        ["192.168.127.2", "8", "1"],
    ]
