"""A fake upstream DNS server for tests: loopback only, fixed answers.

    python fake_dns.py 127.0.0.1 PORT [ADDRESS-FOR-known.example]

Answers ``known.example.`` A with the given address (TTL 1234), ``big.example.``
with ~3000 bytes of TXT records, anything else NXDOMAIN.  UDP replies larger
than the client's EDNS size (512 without EDNS) are truncated with TC; TCP gets
everything.  Single-threaded (selectors), exits on SIGTERM.
"""

import selectors
import socket
import struct
import sys

from dnslib import QTYPE, RCODE, RR, A, TXT, DNSRecord


def answer(data: bytes, known_ip: str) -> bytes:
    q = DNSRecord.parse(data)
    r = q.reply()
    name = str(q.q.qname).lower()
    if name == "known.example." and q.q.qtype == QTYPE.A:
        r.add_answer(RR(q.q.qname, QTYPE.A, rdata=A(known_ip), ttl=1234))
    elif name == "big.example.":
        for i in range(30):
            r.add_answer(RR(q.q.qname, QTYPE.TXT, rdata=TXT(f"{i:03d}" + "x" * 90), ttl=300))
    elif name != "known.example.":
        r.header.rcode = RCODE.NXDOMAIN
    return r.pack()


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    known_ip = sys.argv[3] if len(sys.argv) > 3 else "10.11.12.13"
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((host, port))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((host, port))
    tcp.listen(16)
    sel = selectors.DefaultSelector()
    sel.register(udp, selectors.EVENT_READ, "udp")
    sel.register(tcp, selectors.EVENT_READ, "tcp")
    while True:
        for key, _ in sel.select():
            if key.data == "udp":
                data, addr = udp.recvfrom(65535)
                try:
                    reply = answer(data, known_ip)
                    q = DNSRecord.parse(data)
                    limit = max(512, q.ar[0].edns_len if q.ar and q.ar[0].rtype == QTYPE.OPT else 512)
                    if len(reply) > limit:
                        r = DNSRecord.parse(reply)
                        r.rr = []
                        r.header.tc = 1
                        reply = r.pack()
                    udp.sendto(reply, addr)
                except Exception:
                    pass
            else:
                conn, _ = tcp.accept()
                conn.settimeout(2)
                try:
                    n = struct.unpack("!H", conn.recv(2))[0]
                    data = b""
                    while len(data) < n:
                        chunk = conn.recv(n - len(data))
                        if not chunk:
                            break
                        data += chunk
                    reply = answer(data, known_ip)
                    conn.sendall(struct.pack("!H", len(reply)) + reply)
                except Exception:
                    pass
                finally:
                    conn.close()


if __name__ == "__main__":
    main()
