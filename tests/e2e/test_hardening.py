"""End-to-end checks of the hardening fixes: UDP eviction, dial timeouts, fragments, flags, signals.

Servers run on the host's 127.0.0.1 (reached from the VM namespace through .254)
or inside namespaces the test creates.
"""

import os
import signal
import subprocess
import sys

import pytest

import nsutil

PEERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers.py")
ALIAS = "192.168.127.254"  # the host's loopback through the NAT

# One UDP socket after another, one datagram each; stops at the first one without its echo.
UDP_SEQUENTIAL = r"""
import socket, sys
host, port, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for i in range(n):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        msg = (b"%d " % i).ljust(size, b"x")
        s.sendto(msg, (host, port))
        try:
            data = s.recv(65535)
        except socket.timeout:
            print(i, "timeout")
            break
        if data != msg:
            print(i, "mismatch", len(data))
            break
else:
    print(n, "ok")
"""


def test_udp_flows_beyond_the_table_evict_the_least_recent(bed, host_server):
    hs = bed.host_switch("--max-udp-flows", "64")
    nsutil.wait_for(lambda: "listening on" in hs.read_log(), 10, what="host-switch start-up")
    baseline = nsutil.fd_count(hs.pid)
    vm = bed.vm(hs)
    out = vm.run([sys.executable, "-c", UDP_SEQUENTIAL, ALIAS, str(host_server), "2000", "16"], timeout=240)
    assert out.stdout.split() == ["2000", "ok"]
    # evicted flows' sockets are closed, not left to idle out
    assert nsutil.fd_count(hs.pid) <= baseline + 64 + 8


def test_dial_timeout_refuses_the_vm_connect(bed):
    """A host that drops SYNs: with --connect-timeout 1 the VM's connect fails in about a second."""
    ns = bed.namespace()
    net = nsutil.unique_prefix()
    with nsutil.veth_pair(ns, f"{net}.1/24", f"{net}.2/24"):
        # the namespace's answers (SYN-ACK or RST) to the host's side of the veth vanish: SYNs go unanswered
        nsutil.ns_run(ns, ["ip", "route", "add", "blackhole", f"{net}.1/32"])
        hs = bed.host_switch("--connect-timeout", "1", allow=[f"{net}.0/24"])
        vm = bed.vm(hs)
        out = vm.run([sys.executable, PEERS, "refused", f"{net}.2", "80"], timeout=30).stdout.split()
        assert out[0] == "refused" and float(out[1]) < 3.0, out


def test_fragmented_datagrams_from_the_vm_are_reassembled(bed, host_server):
    """8000-byte datagrams leave the namespace (MTU 1500) as fragments; whole ones reach the host and come back."""
    hs = bed.host_switch()
    vm = bed.vm(hs)
    assert "mtu 1500" in vm.run(["ip", "link", "show", "eth0"]).stdout
    out = vm.run([sys.executable, "-c", UDP_SEQUENTIAL, ALIAS, str(host_server), "50", "8000"], timeout=120)
    assert out.stdout.split() == ["50", "ok"]
    # ICMP too: big echo requests to the gateway itself and to the host (through .254)
    for dst in ("192.168.127.1", ALIAS):
        assert " 0% packet loss" in vm.run(["ping", "-c", "2", "-W", "3", "-s", "4000", dst]).stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_vm_switch_stops_cleanly_on_a_signal(bed, sig):
    hs = bed.host_switch()
    vm = bed.vm(hs)
    assert vm.run(["ip", "link", "show", "eth0"], check=False).returncode == 0
    vm.proc.send_signal(sig)
    try:
        code = vm.proc.wait(2)
    except subprocess.TimeoutExpired:
        pytest.fail("vm-switch still running 2 s after the signal")
    assert code == 0
    assert f"vm-switch stopped ({sig.name})" in vm.read_log()
    assert vm.run(["ip", "link", "show", "eth0"], check=False).returncode != 0  # the tap is gone
    nsutil.wait_for(lambda: "session ended" in hs.read_log(), 5, what="the host-switch to see the session end")


# Many new flows in one burst (one batch of frames at the host-switch): evictions of flows whose
# host-side task has not run yet.
UDP_BURST = r"""
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
for i, s in enumerate(socks):
    s.sendto(b"burst %d" % i, (host, port))
for s in socks:
    s.close()
print("sent")
"""


def test_udp_burst_through_a_one_flow_table_keeps_the_session(bed, host_server):
    hs = bed.host_switch("--max-udp-flows", "1")
    vm = bed.vm(hs)
    for _ in range(5):
        assert vm.run([sys.executable, "-c", UDP_BURST, ALIAS, str(host_server), "200"]).stdout.split() == ["sent"]
    out = vm.run([sys.executable, "-c", UDP_SEQUENTIAL, ALIAS, str(host_server), "20", "16"], timeout=60)
    assert out.stdout.split() == ["20", "ok"]
    assert "session ended" not in hs.read_log()
