"""Churn: a host-switch that serves many VM sessions and many short flows stays as it started.

One host-switch (``--udp-idle-timeout 2``) and one VM namespace:

1. CHURN_CYCLES (default 100) vm-switch session cycles: SIGKILL vm-switch, start it
   again, wait for its DHCP lease, ping the gateway once;
2. CHURN_TCP_FLOWS (5000) sequential short TCP flows (connect, 1 byte, its echo,
   close) and CHURN_UDP_FLOWS (2000) sequential UDP flows (a new socket each, one
   datagram, its echo) from one client in the namespace to an echo server on the
   host's 127.0.0.1 through .254: every flow answered;
3. the host-switch's open fds back to what they were before (bounded wait: UDP
   flows idle out after 2 s) and its RSS less than RSS_MARGIN above it;
4. SIGTERM while a download through .254 is in flight: exit status 0 within 2 s,
   the listen socket file removed.

Traffic goes only to 127.0.0.0/8 (the testbed's --allow-outbound) and inside the
namespace; DNS goes to a closed loopback port (the testbed's default).
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import nsutil
from testbed import free_port, stop

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS = os.path.join(HERE, "peers.py")
ALIAS = "192.168.127.254"
GATEWAY = "192.168.127.1"

CYCLES = int(os.environ.get("CHURN_CYCLES", "100"))
TCP_FLOWS = int(os.environ.get("CHURN_TCP_FLOWS", "5000"))
UDP_FLOWS = int(os.environ.get("CHURN_UDP_FLOWS", "2000"))
# What the RSS may grow by over the flows: measured here about 5 MiB (from 46 MiB) over 5000 + 2000 flows.
RSS_MARGIN = 64 << 20

# TCP echo (until EOF) and UDP echo on one port of 127.0.0.1.
ECHO_SERVER = r"""
import asyncio, sys

async def echo(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()

class Udp(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport
    def datagram_received(self, data, addr):
        self.transport.sendto(data, addr)

async def main(port):
    server = await asyncio.start_server(echo, "127.0.0.1", port, backlog=1024)
    await asyncio.get_running_loop().create_datagram_endpoint(Udp, local_addr=("127.0.0.1", port))
    async with server:
        await server.serve_forever()

asyncio.run(main(int(sys.argv[1])))
"""

# One flow after another, each bounded; the whole run bounded by BUDGET seconds. Prints the counts as JSON.
FLOWS_CLIENT = r"""
import json, socket, sys, time
host, port, ntcp, nudp, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
deadline = time.monotonic() + budget
out = {"tcp_ok": 0, "tcp_failed": 0, "udp_ok": 0, "udp_failed": 0, "errors": [], "out_of_time": False}

def failed(kind, i, what):
    out[kind + "_failed"] += 1
    if len(out["errors"]) < 10:
        out["errors"].append(f"{kind} {i}: {what}")

for i in range(ntcp):
    if time.monotonic() > deadline:
        out["out_of_time"] = True
        break
    byte = bytes([i & 0xFF])
    try:
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(byte)
            got = s.recv(1)
        if got == byte:
            out["tcp_ok"] += 1
        else:
            failed("tcp", i, f"got {got!r}")
    except OSError as exc:
        failed("tcp", i, repr(exc))

for i in range(nudp):
    if time.monotonic() > deadline:
        out["out_of_time"] = True
        break
    msg = b"udp %d" % i
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.connect((host, port))
        for _attempt in range(3):  # one flow (one socket); a lost datagram is sent again
            s.send(msg)
            try:
                got = s.recv(65535)
            except socket.timeout:
                continue
            except OSError as exc:
                got = repr(exc).encode()
            break
        else:
            got = b"timeout"
    if got == msg:
        out["udp_ok"] += 1
    else:
        failed("udp", i, got[:60].decode(errors="replace"))

print(json.dumps(out))
"""


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def echo_server():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, str(port)])
    try:
        nsutil.wait_for(lambda: proc.poll() is not None or nsutil.listening(proc.pid, "127.0.0.1", port), 10,
                        what="echo server listening")
        assert proc.poll() is None, "echo server exited"
        yield port
    finally:
        stop(proc)


def test_session_and_flow_churn_then_sigterm_mid_download(bed, echo_server, host_server):
    hs = bed.host_switch("--udp-idle-timeout", "2")
    nsutil.wait_for(lambda: "listening on" in hs.read_log(), 10, what="host-switch start-up")
    vm = bed.vm(hs)
    assert "1 received" in vm.run(["ping", "-c", "1", "-W", "2", GATEWAY]).stdout

    def sessions_started() -> int:
        return hs.read_log().count(": session started")

    def sessions_ended() -> int:
        return hs.read_log().count(": session ended")

    # The fds of the host-switch with one session up (the first one, settled).
    nsutil.wait_for(lambda: sessions_started() == 1, 5, what="the first session")
    baseline_fds = nsutil.fd_count(hs.pid)

    # 1. session cycles
    t0 = time.monotonic()
    for cycle in range(CYCLES):
        vm.kill(signal.SIGKILL)
        vm.start()
        vm.wait_address()
        out = vm.run(["ping", "-c", "1", "-W", "2", GATEWAY], check=False).stdout
        assert "1 received" in out, f"cycle {cycle}: {out}"
    nsutil.wait_for(lambda: sessions_ended() == CYCLES and sessions_started() == CYCLES + 1, 10,
                    what=f"{CYCLES} sessions ended, {CYCLES + 1} started")
    assert "session failed unexpectedly" not in hs.read_log()
    nsutil.wait_for(lambda: nsutil.fd_count(hs.pid) <= baseline_fds, 10,
                    what=f"the host-switch's fds back to {baseline_fds} after the session cycles")
    rss_before = rss(hs.pid)
    t1 = time.monotonic()

    # 2. short flows through .254 to the host's echo server
    budget = 150
    res = vm.run([sys.executable, "-c", FLOWS_CLIENT, ALIAS, str(echo_server), str(TCP_FLOWS), str(UDP_FLOWS),
                  str(budget)], timeout=budget + 30)
    counts = json.loads(res.stdout)
    assert (counts["tcp_ok"], counts["udp_ok"]) == (TCP_FLOWS, UDP_FLOWS), counts
    t2 = time.monotonic()

    # 3. nothing left behind: fds back (UDP flows idle out after 2 s; TCP flows close with their FINs)
    try:
        nsutil.wait_for(lambda: nsutil.fd_count(hs.pid) <= baseline_fds, 30,
                        what=f"the host-switch's fds back to {baseline_fds} after the flows")
    except TimeoutError:
        pytest.fail(f"fds {nsutil.fd_count(hs.pid)} > {baseline_fds}; sockets: {nsutil.tcp_sockets(hs.pid)[:20]}")
    grown = rss(hs.pid) - rss_before
    print(f"churn: {CYCLES} cycles {t1 - t0:.1f} s, {TCP_FLOWS}+{UDP_FLOWS} flows {t2 - t1:.1f} s; fds {baseline_fds}, "
          f"RSS {rss_before >> 20} MiB, grown {grown / (1 << 20):.1f} MiB over the flows")
    assert grown < RSS_MARGIN, f"RSS grew by {grown >> 20} MiB over the flows"

    # 4. SIGTERM with a download in flight
    n = 1 << 30
    download = subprocess.Popen(nsutil.ns_cmd(vm.ns, [sys.executable, PEERS, "get", ALIAS, str(host_server), str(n)]),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        nsutil.wait_for(lambda: any(state == "ESTABLISHED" and remote == ("127.0.0.1", host_server)
                                    for state, _local, remote in nsutil.tcp_sockets(hs.pid)),
                        10, what="the download's host flow")
        assert download.poll() is None, "the download ended before the signal"
        hs.proc.send_signal(signal.SIGTERM)
        try:
            code = hs.proc.wait(2)
        except subprocess.TimeoutExpired:
            pytest.fail("host-switch still running 2 s after SIGTERM")
        assert code == 0, hs.read_log()[-2000:]
        assert not os.path.exists(hs.sock), "the listen socket file is left behind"
    finally:
        download.kill()
        download.wait()
