"""Classic libpcap file format (sans-IO): a header, then one record per frame.

Readable by tshark/Wireshark/tcpdump.  Little-endian, microsecond
timestamps, magic 0xa1b2c3d4, version 2.4.  The caller writes the bytes.
"""

from __future__ import annotations

import math
import struct

LINKTYPE_ETHERNET = 1
PCAP_MAGIC = 0xA1B2C3D4

_HEADER = struct.Struct("<IHHiIII")
_RECORD = struct.Struct("<IIII")


def pcap_header(snaplen: int = 65535, linktype: int = LINKTYPE_ETHERNET) -> bytes:
    """The 24-byte global header of a pcap file."""
    if not 1 <= snaplen <= 0xFFFFFFFF:
        raise ValueError(f"snaplen {snaplen} out of range")
    if not 0 <= linktype <= 0xFFFFFFFF:
        raise ValueError(f"linktype {linktype} out of range")
    return _HEADER.pack(PCAP_MAGIC, 2, 4, 0, 0, snaplen, linktype)


def pcap_record(frame: bytes, ts: float, snaplen: int = 65535) -> bytes:
    """One record: 16-byte header (ts, captured and original length) + frame.

    Frames longer than ``snaplen`` are cut to it (the original length is kept).
    ``ts`` is seconds since the epoch (the caller reads the clock).
    """
    if not math.isfinite(ts) or ts < 0 or ts >= 2**32:
        raise ValueError(f"timestamp {ts!r} out of range for pcap")
    sec = int(ts)
    usec = int(round((ts - sec) * 1_000_000))
    if usec >= 1_000_000:
        sec, usec = sec + 1, usec - 1_000_000
    incl = min(len(frame), snaplen)
    return _RECORD.pack(sec, usec, incl, len(frame)) + bytes(frame[:incl])
