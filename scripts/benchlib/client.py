#!/usr/bin/env python3
"""The measuring client of scripts/bench, run inside each stack's namespace (stdlib only).

    python3 client.py tcp_rr   HOST PORT COUNT MAX_SECONDS
    python3 client.py udp_rr   HOST PORT COUNT MAX_SECONDS
    python3 client.py connects HOST PORT SECONDS MAX_COUNT
    python3 client.py dns      SERVER NAME SECONDS MAX_COUNT
    python3 client.py flows    HOST PORT COUNT MAX_SECONDS

Every mode is sequential (one request in flight), bounded by a count and a
time limit, and prints one JSON line.  The same client runs against every
stack, so ratios between stacks compare the stacks, not the clients.

tcp_rr   1-byte ping-pongs on one TCP_NODELAY connection (after 50 warm-up
         ones); median/p99 round trip in microseconds
udp_rr   4-byte datagram echoes on one connected UDP socket (1 s timeout each;
         a timeout counts as lost); median/p99 round trip in microseconds
connects connect / send 1 byte / receive 1 byte / close, repeated; per second
dns      A queries on one connected UDP socket (1 s timeout each); answered
         queries per second (a reply counts when its id matches and RCODE=0)
flows    opens COUNT TCP connections and holds them: prints "READY n" once
         they are open, closes them all when a line (or EOF) arrives on stdin
         or MAX_SECONDS pass, then prints the JSON line
"""

import json
import select
import socket
import statistics
import struct
import sys
import time

ns = time.perf_counter_ns


def pct(values, q):
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def summary(rtts_ns, **extra):
    us = [v / 1000 for v in rtts_ns]
    return {"n": len(us), "median_us": statistics.median(us) if us else None, "p99_us": pct(us, 0.99), **extra}


def tcp_rr(host, port, count, max_seconds):
    s = socket.create_connection((host, int(port)), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.settimeout(2)
    deadline = time.monotonic() + float(max_seconds)
    rtts = []
    with s:
        for i in range(50 + int(count)):
            if time.monotonic() > deadline:
                break
            t0 = ns()
            s.sendall(b"x")
            if not s.recv(1):
                raise RuntimeError("echo server closed the connection")
            t1 = ns()
            if i >= 50:
                rtts.append(t1 - t0)
    return summary(rtts)


def udp_rr(host, port, count, max_seconds):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((host, int(port)))
    s.settimeout(1)
    deadline = time.monotonic() + float(max_seconds)
    rtts, lost = [], 0
    with s:
        for i in range(20 + int(count)):
            if time.monotonic() > deadline:
                break
            msg = struct.pack("!I", i)
            t0 = ns()
            s.send(msg)
            try:
                while s.recv(64) != msg:  # a late echo of an earlier (lost) one
                    pass
            except socket.timeout:
                lost += 1
                continue
            t1 = ns()
            if i >= 20:
                rtts.append(t1 - t0)
    return summary(rtts, lost=lost)


def connects(host, port, seconds, max_count):
    addr = (host, int(port))
    done = errors = 0
    t_start = time.monotonic()
    deadline = t_start + float(seconds)
    while done < int(max_count) and time.monotonic() < deadline:
        try:
            with socket.create_connection(addr, timeout=2) as s:
                s.sendall(b"c")
                if s.recv(1) != b"c":
                    raise OSError("no echo")
            done += 1
        except OSError:
            errors += 1
            if errors > 100:
                break
    elapsed = time.monotonic() - t_start
    return {"n": done, "errors": errors, "seconds": elapsed, "per_s": done / elapsed if elapsed else None}


def dns_query(qid, name):
    q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.rstrip(".").split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\x00" + struct.pack("!HH", 1, 1)


def dns(server, name, seconds, max_count):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((server, 53))
    s.settimeout(1)
    ok = bad = lost = 0
    t_start = time.monotonic()
    deadline = t_start + float(seconds)
    answers = None
    with s:
        i = 0
        while ok + bad + lost < int(max_count) and time.monotonic() < deadline:
            i = (i + 1) & 0xFFFF
            s.send(dns_query(i, name))
            try:
                while True:
                    r = s.recv(4096)
                    if len(r) >= 12 and struct.unpack("!H", r[:2])[0] == i:
                        break
            except socket.timeout:
                lost += 1
                continue
            flags, _qd, an = struct.unpack("!HHH", r[2:8])
            if flags & 0xF == 0:
                ok += 1
                answers = an
            else:
                bad += 1
    elapsed = time.monotonic() - t_start
    return {"n": ok, "bad": bad, "lost": lost, "answers": answers, "seconds": elapsed,
            "per_s": ok / elapsed if elapsed else None}


def flows(host, port, count, max_seconds):
    addr = (host, int(port))
    deadline = time.monotonic() + float(max_seconds)
    socks, errors = [], 0
    try:
        while len(socks) < int(count) and time.monotonic() < deadline and errors < 50:
            try:
                socks.append(socket.create_connection(addr, timeout=5))
            except OSError:
                errors += 1
        print(f"READY {len(socks)}", flush=True)
        remaining = max(0.0, deadline - time.monotonic())
        select.select([sys.stdin], [], [], remaining)
    finally:
        for s in socks:
            s.close()
    return {"n": len(socks), "errors": errors}


def main(argv):
    modes = {"tcp_rr": tcp_rr, "udp_rr": udp_rr, "connects": connects, "dns": dns, "flows": flows}
    if len(argv) != 5 or argv[0] not in modes:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        result = modes[argv[0]](*argv[1:])
    except (OSError, RuntimeError) as exc:
        result = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
