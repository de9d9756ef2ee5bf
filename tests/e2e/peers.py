"""Test peers for the NAT tests: servers on the host side and clients run inside the VM namespace.

    python peers.py serve HOST PORT          TCP "blob" server + UDP echo on the same port
    python peers.py put HOST PORT NBYTES     client: upload NBYTES, print local and remote sha256
    python peers.py get HOST PORT NBYTES     client: download NBYTES, print local and remote sha256
    python peers.py halfclose HOST PORT      client: send, shut down writing, read the whole reply
    python peers.py many HOST PORT N         client: N concurrent TCP round trips, print how many succeeded
    python peers.py udpmany HOST PORT N      client: N concurrent UDP flows, print how many got their echo
    python peers.py udpbig HOST PORT N       client: ask the UDP server for an N-byte datagram
    python peers.py refused HOST PORT        client: print the seconds until connection refused

Data is deterministic (sha256 chains), so both ends can compute what was meant
to arrive.  Every wait is bounded.
"""

import asyncio
import hashlib
import socket
import sys
import time

BLOCK = 1 << 16


def pattern(n: int):
    """Deterministic bytes: yields chunks totalling n."""
    seed = hashlib.sha256(b"rdswitch").digest()
    block = (seed * (BLOCK // len(seed) + 1))[:BLOCK]
    sent = 0
    i = 0
    while sent < n:
        chunk = block if n - sent >= BLOCK else block[: n - sent]
        # vary each block cheaply so reordering would be detected
        chunk = i.to_bytes(8, "big") + chunk[8:] if len(chunk) >= 8 else chunk
        yield chunk
        sent += len(chunk)
        i += 1


def pattern_sha(n: int) -> str:
    h = hashlib.sha256()
    for c in pattern(n):
        h.update(c)
    return h.hexdigest()


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        line = (await reader.readline()).decode().split()
        if not line:
            return
        cmd = line[0]
        if cmd == "PUT":
            n = int(line[1])
            h = hashlib.sha256()
            got = 0
            while got < n:
                data = await reader.read(1 << 18)
                if not data:
                    break
                h.update(data)
                got += len(data)
            writer.write(f"{h.hexdigest()} {got}\n".encode())
        elif cmd == "GET":
            for c in pattern(int(line[1])):
                writer.write(c)
                await writer.drain()
        elif cmd == "ECHOALL":
            data = await reader.read()  # until the client's half-close
            writer.write(hashlib.sha256(data).hexdigest().encode() + b"\n" + data)
        elif cmd == "PING":
            writer.write(b"PONG " + line[1].encode() + b"\n")
        await writer.drain()
    except (ConnectionError, ValueError):
        pass
    finally:
        writer.close()


class Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        if data.startswith(b"BIG "):  # reply with N bytes: exercises fragmentation towards the VM
            n = int(data[4:])
            self.transport.sendto(bytes(i & 0xFF for i in range(n)), addr)
            return
        self.transport.sendto(data, addr)


def udpbig(host, port, n):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        for _attempt in range(3):
            s.sendto(f"BIG {n}".encode(), (host, port))
            try:
                data = s.recv(70000)
            except socket.timeout:
                continue
            print(len(data), "ok" if data == bytes(i & 0xFF for i in range(n)) else "MISMATCH")
            return
        print(0, "timeout")


async def serve(host: str, port: int) -> None:
    server = await asyncio.start_server(handle, host, port, backlog=1024)
    await asyncio.get_running_loop().create_datagram_endpoint(Echo, local_addr=(host, port))
    async with server:
        await server.serve_forever()


def put(host, port, n):
    with socket.create_connection((host, port), timeout=60) as s:
        s.sendall(f"PUT {n}\n".encode())
        for c in pattern(n):
            s.sendall(c)
        reply = s.makefile().readline().split()
    print(pattern_sha(n), reply[0], reply[1])


def get(host, port, n):
    h = hashlib.sha256()
    got = 0
    with socket.create_connection((host, port), timeout=60) as s:
        s.sendall(f"GET {n}\n".encode())
        while True:
            data = s.recv(1 << 18)
            if not data:
                break
            h.update(data)
            got += len(data)
    print(pattern_sha(n), h.hexdigest(), got)


def halfclose(host, port):
    payload = b"".join(pattern(300_000))
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(b"ECHOALL\n" + payload)
        s.shutdown(socket.SHUT_WR)
        buf = b""
        while True:
            data = s.recv(1 << 16)
            if not data:
                break
            buf += data
    digest, _, body = buf.partition(b"\n")
    print("ok" if body == payload and digest.decode() == hashlib.sha256(payload).hexdigest() else "MISMATCH")


async def many(host, port, n):
    async def one(i):
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
            w.write(f"PING {i}\n".encode())
            line = await asyncio.wait_for(r.readline(), 30)
            w.close()
            return line == f"PONG {i}\n".encode()
        except (OSError, asyncio.TimeoutError):
            return False
    results = await asyncio.gather(*(one(i) for i in range(n)))
    print(sum(results))


async def udpmany(host, port, n):
    loop = asyncio.get_running_loop()

    async def one(i):
        fut = loop.create_future()

        class P(asyncio.DatagramProtocol):
            def datagram_received(self, data, addr):
                if not fut.done():
                    fut.set_result(data)

        transport, _ = await loop.create_datagram_endpoint(P, remote_addr=(host, port))
        try:
            msg = f"udp {i}".encode()
            for _attempt in range(3):
                transport.sendto(msg)
                try:
                    return await asyncio.wait_for(asyncio.shield(fut), 2) == msg
                except asyncio.TimeoutError:
                    continue
            return False
        finally:
            transport.close()
    results = await asyncio.gather(*(one(i) for i in range(n)))
    print(sum(results))


def refused(host, port):
    t0 = time.monotonic()
    try:
        socket.create_connection((host, port), timeout=10).close()
        print("connected")
    except ConnectionRefusedError:
        print(f"refused {time.monotonic() - t0:.3f}")
    except OSError as exc:
        print(f"error {exc}")


def main():
    cmd, host, port, *rest = sys.argv[1:]
    port = int(port)
    if cmd == "serve":
        asyncio.run(serve(host, port))
    elif cmd == "put":
        put(host, port, int(rest[0]))
    elif cmd == "get":
        get(host, port, int(rest[0]))
    elif cmd == "halfclose":
        halfclose(host, port)
    elif cmd == "many":
        asyncio.run(many(host, port, int(rest[0])))
    elif cmd == "udpmany":
        asyncio.run(udpmany(host, port, int(rest[0])))
    elif cmd == "udpbig":
        udpbig(host, port, int(rest[0]))
    elif cmd == "refused":
        refused(host, port)


if __name__ == "__main__":
    main()
