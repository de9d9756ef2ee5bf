"""Raw DNS message helpers, sans-IO.

They work on bytes where they can, so that they also cope with what dnslib
cannot parse: error replies (FORMERR/SERVFAIL/NOTIMP) built from a query's
header, truncation of a reply to what a UDP client accepts, and peeking at a
reply's flags.  No sockets, no clock.
"""

from __future__ import annotations

import struct

import dnslib
from dnslib import QTYPE, RCODE, DNSRecord

MIN_UDP_PAYLOAD = 512
# What we announce in our own OPT record: the size the DNS flag day 2020
# recommends, small enough to avoid IP fragmentation on every sane path.
OUR_UDP_PAYLOAD = 1232
OPCODE_QUERY = 0

_HEADER = struct.Struct("!HHHHHH")


def client_edns(query: DNSRecord) -> int | None:
    """The client's advertised EDNS0 UDP payload size, or None without an OPT record."""
    for rr in query.ar:
        if rr.rtype == QTYPE.OPT:
            return rr.rclass
    return None


def udp_payload_limit(query: DNSRecord | None) -> int:
    """How large a UDP reply this client accepts: its EDNS0 size, never below 512."""
    size = client_edns(query) if query is not None else None
    if size is None:
        return MIN_UDP_PAYLOAD
    return max(MIN_UDP_PAYLOAD, min(size, 65535))


def _question_end(data: bytes) -> int | None:
    """Offset just past the first question, or None if it cannot be walked (no compression allowed)."""
    pos = 12
    for _ in range(128):
        if pos >= len(data):
            return None
        n = data[pos]
        if n == 0:
            pos += 1
            break
        if n & 0xC0:
            return None
        pos += 1 + n
    else:
        return None
    pos += 4
    return pos if pos <= len(data) else None


def _error_reply(query_bytes: bytes, rcode: int, keep_question: bool) -> bytes | None:
    if len(query_bytes) < 12:
        return None
    qid, flags, qdcount, _, _, _ = _HEADER.unpack_from(query_bytes)
    if flags & 0x8000:  # a response: never answer it (no reflection loops)
        return None
    opcode = (flags >> 11) & 0xF
    rd = flags & 0x0100
    out_flags = 0x8000 | (opcode << 11) | rd | 0x0080 | (rcode & 0xF)
    question = b""
    if keep_question and qdcount == 1:
        end = _question_end(query_bytes)
        if end is not None:
            question = query_bytes[12:end]
    return _HEADER.pack(qid, out_flags, 1 if question else 0, 0, 0, 0) + question


def formerr(query_bytes: bytes) -> bytes | None:
    """FORMERR for a message we could not parse; None (drop it) if not even a query header."""
    return _error_reply(query_bytes, RCODE.FORMERR, keep_question=False)


def servfail(query_bytes: bytes) -> bytes | None:
    """SERVFAIL echoing the question (when it can be found); None if not a query."""
    return _error_reply(query_bytes, RCODE.SERVFAIL, keep_question=True)


def notimp(query_bytes: bytes) -> bytes | None:
    return _error_reply(query_bytes, RCODE.NOTIMP, keep_question=True)


def truncate_for_udp(reply_bytes: bytes, client_max: int) -> bytes:
    """The reply if it fits in ``client_max`` bytes; else header + question + OPT with TC set.

    Answers, authority and other additional records are dropped so that the
    client retries over TCP (RFC 7766) instead of using a partial answer.
    """
    limit = max(MIN_UDP_PAYLOAD, client_max)
    if len(reply_bytes) <= limit or len(reply_bytes) < 12:
        return reply_bytes
    qid, flags, qdcount, _, _, _ = _HEADER.unpack_from(reply_bytes)
    flags |= 0x0200
    question = b""
    if qdcount == 1:
        end = _question_end(reply_bytes)
        if end is not None:
            question = reply_bytes[12:end]
    opt = b""
    try:
        parsed = DNSRecord.parse(reply_bytes)
    except Exception:
        parsed = None
    if parsed is not None:
        opts = [rr for rr in parsed.ar if rr.rtype == QTYPE.OPT]
        if opts:
            buf = dnslib.DNSBuffer()
            opts[0].pack(buf)
            opt = bytes(buf.data)
    out = _HEADER.pack(qid, flags, 1 if question else 0, 0, 0, 1 if opt else 0) + question + opt
    return out if len(out) <= limit else _HEADER.pack(qid, flags, 0, 0, 0, 0)


def is_truncated(reply_bytes: bytes) -> bool:
    return len(reply_bytes) >= 4 and bool(reply_bytes[2] & 0x02)


def rcode_of(reply_bytes: bytes) -> int:
    return reply_bytes[3] & 0x0F if len(reply_bytes) >= 4 else RCODE.FORMERR
