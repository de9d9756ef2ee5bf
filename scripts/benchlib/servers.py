#!/usr/bin/env python3
"""The host side of scripts/bench: TCP echo, UDP echo and a fake DNS upstream, one process.

    python3 servers.py --bind 127.0.0.1 [--max-seconds 3600]

Binds all three on --bind (ephemeral ports), prints one JSON line
{"tcp": PORT, "udp": PORT, "dns": PORT} and serves until its stdin closes or
--max-seconds pass.  Single-threaded (selectors), plain sockets, stdlib only.
The fake DNS answers every A question with 10.9.9.9 (TTL 0): it is the
--dns-upstream of the benchmark's host-switch, so no query ever reaches a real
resolver.
"""

import argparse
import json
import os
import selectors
import socket
import struct
import sys
import time


def dns_answer(query: bytes) -> bytes | None:
    """A reply to one DNS query: the question echoed, one A record (or NOTIMP)."""
    if len(query) < 12:
        return None
    qid, flags, qd = struct.unpack("!HHH", query[:6])
    if flags & 0x8000 or qd != 1:
        return None
    i = 12
    while i < len(query) and query[i] != 0:
        if query[i] & 0xC0:
            return None
        i += 1 + query[i]
    end = i + 5
    if end > len(query):
        return None
    qtype = struct.unpack("!H", query[i + 1:i + 3])[0]
    question = query[12:end]
    rd = flags & 0x0100
    if qtype == 1:
        answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 0, 4) + bytes([10, 9, 9, 9])
        return struct.pack("!HHHHHH", qid, 0x8080 | rd, 1, 1, 0, 0) + question + answer
    return struct.pack("!HHHHHH", qid, 0x8080 | rd, 1, 0, 0, 0) + question  # NOERROR, no data


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bind", default="127.0.0.1")
    p.add_argument("--max-seconds", type=float, default=3600)
    args = p.parse_args()

    sel = selectors.DefaultSelector()
    lst = socket.socket()
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind((args.bind, 0))
    lst.listen(4096)
    lst.setblocking(False)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((args.bind, 0))
    udp.setblocking(False)
    dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dns.bind((args.bind, 0))
    dns.setblocking(False)
    sel.register(lst, selectors.EVENT_READ, "accept")
    sel.register(udp, selectors.EVENT_READ, "udp")
    sel.register(dns, selectors.EVENT_READ, "dns")
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ, "stdin")
    pending: dict[socket.socket, bytearray] = {}  # echo bytes not yet sent (peer slow to read)

    def close(conn: socket.socket) -> None:
        pending.pop(conn, None)
        sel.unregister(conn)
        conn.close()

    print(json.dumps({"tcp": lst.getsockname()[1], "udp": udp.getsockname()[1], "dns": dns.getsockname()[1]}),
          flush=True)
    deadline = time.monotonic() + args.max_seconds
    while time.monotonic() < deadline:
        for key, events in sel.select(timeout=1.0):
            what = key.data
            if what == "accept":
                for _ in range(64):
                    try:
                        conn, _addr = lst.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:  # EMFILE etc.: drop this one, keep serving
                        break
                    conn.setblocking(False)
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sel.register(conn, selectors.EVENT_READ, "conn")
            elif what == "conn":
                conn = key.fileobj
                if events & selectors.EVENT_WRITE:
                    buf = pending[conn]
                    try:
                        del buf[:conn.send(buf)]
                    except BlockingIOError:
                        pass
                    except OSError:
                        close(conn)
                        continue
                    if not buf:
                        pending.pop(conn)
                        sel.modify(conn, selectors.EVENT_READ, "conn")
                    continue
                try:
                    data = conn.recv(262144)
                except BlockingIOError:
                    continue
                except OSError:
                    close(conn)
                    continue
                if not data:
                    close(conn)
                    continue
                try:
                    sent = conn.send(data)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    close(conn)
                    continue
                if sent < len(data):
                    pending[conn] = bytearray(data[sent:])
                    sel.modify(conn, selectors.EVENT_WRITE, "conn")  # stop reading until the echo drains
            elif what in ("udp", "dns"):
                sock = key.fileobj
                for _ in range(64):
                    try:
                        data, addr = sock.recvfrom(65535)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        continue
                    reply = data if what == "udp" else dns_answer(data)
                    if reply is not None:
                        try:
                            sock.sendto(reply, addr)
                        except OSError:
                            pass
            elif what == "stdin":
                if not os.read(sys.stdin.fileno(), 4096):
                    return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
