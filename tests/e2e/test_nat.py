"""The NAT end to end: TCP, UDP and ICMP from the VM namespace through the host-switch.

Servers run only on the host's 127.0.0.1 or inside an "internet" namespace the
test creates (198.18.0.0/15, the benchmarking range, on a veth it owns).
"""

import json
import os
import re
import subprocess
import sys
import time

import pytest

import nsutil
from testbed import free_port, stop

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS = os.path.join(HERE, "peers.py")
ALIAS = "192.168.127.254"


@pytest.fixture
def internet(bed):
    """A second namespace, reachable from the host over a veth the test owns (a unique 198.18.x.0/24).

    Yields (namespace, server ip, server port, the /24 to allow, an unused address in it).
    """
    ns = bed.namespace()
    net = nsutil.unique_prefix()
    ip = f"{net}.2"
    with nsutil.veth_pair(ns, f"{net}.1/24", f"{ip}/24"):
        port = free_port()
        proc = subprocess.Popen(nsutil.ns_cmd(ns, [sys.executable, PEERS, "serve", ip, str(port)]))
        try:
            nsutil.wait_for(lambda: nsutil.ns_run(ns, ["bash", "-c", f"exec 3<>/dev/tcp/{ip}/{port}"],
                                                  check=False).returncode == 0, 10, what="internet server")
            yield ns, ip, port, f"{net}.0/24", f"{net}.3"
        finally:
            stop(proc)


def peer(vm, *args, timeout=120):
    return vm.run([sys.executable, PEERS, *map(str, args)], timeout=timeout).stdout.split()


def session_stats(hs) -> list[dict]:
    return [json.loads(m) for m in re.findall(r"session stats (\{.*\})", hs.read_log())]


def test_tcp_to_host_loopback_and_internet(bed, host_server, internet, tmp_path):
    _ns, inet_ip, inet_port, inet_net, _unused = internet
    hs = bed.host_switch(allow=[inet_net])
    vm = bed.vm(hs)
    out = peer(vm, "halfclose", ALIAS, host_server)
    assert out == ["ok"]
    # curl to an HTTP server on the host's 127.0.0.1 through .254
    (tmp_path / "index.html").write_text("hello through the NAT\n")
    http_port = free_port()
    web = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(tmp_path),
                            str(http_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        body = nsutil.wait_for(lambda: vm.run(["curl", "-sS", "--max-time", "5", f"http://{ALIAS}:{http_port}/"],
                                              check=False).stdout, 10, what="curl through .254")
        assert body == "hello through the NAT\n"
    finally:
        stop(web)
    local, remote, n = peer(vm, "put", inet_ip, inet_port, 2_000_000)
    assert local == remote and n == "2000000"


@pytest.mark.parametrize("mtu,offload", [(1500, False), (65520, False), (1500, True), (65520, True)])
def test_64mib_each_way(bed, host_server, mtu, offload):
    hs = bed.host_switch("--mtu", str(mtu))
    vm = bed.vm(hs, *(["--offload"] if offload else []))
    assert f"mtu {mtu}" in vm.run(["ip", "-o", "link", "show", "eth0"]).stdout
    n = 64 << 20
    local, remote, got = peer(vm, "put", ALIAS, host_server, n)
    assert local == remote and got == str(n)
    # What the VM sent, as the host-switch counted it for this session:
    vm.kill()
    nsutil.wait_for(lambda: session_stats(hs), 5, what="session stats")
    stats = session_stats(hs)[-1]
    average = stats["bytes_in"] / stats["frames_in"]
    if offload and mtu == 1500:  # the VM's kernel handed over TSO segments far above the MTU
        assert average > 4 * (mtu + 14)
    else:
        assert average <= mtu + 14
    vm.start()
    vm.wait_address()
    expected, received, got = peer(vm, "get", ALIAS, host_server, n)
    assert expected == received and got == str(n)
    if offload:  # and the host-switch sent 64 KiB segments for the VM's kernel to split
        vm.kill()
        nsutil.wait_for(lambda: len(session_stats(hs)) == 2, 5, what="second session stats")
        stats = session_stats(hs)[-1]
        assert stats["bytes_out"] / stats["frames_out"] > (4 * (mtu + 14) if mtu == 1500 else mtu // 2)
        assert "offload on" in hs.read_log()


def test_closed_port_refused_fast_and_unreachable_does_not_block(bed, host_server, internet):
    _ns, _ip, _port, inet_net, unused = internet
    hs = bed.host_switch("--connect-timeout", "5", allow=[inet_net])
    vm = bed.vm(hs)
    closed = free_port()
    out = peer(vm, "refused", ALIAS, closed)
    assert out[0] == "refused" and float(out[1]) < 1.0
    # the unused address does not exist: its dial hangs; others must still work meanwhile
    blocker = subprocess.Popen(nsutil.ns_cmd(vm.ns, [sys.executable, PEERS, "refused", unused, "80"]),
                               stdout=subprocess.PIPE, text=True)
    try:
        nsutil.wait_for(lambda: any(state == "SYN_SENT" and remote == (unused, 80)
                                    for state, _local, remote in nsutil.tcp_sockets(hs.pid)),
                        10, what=f"the host-switch dialling {unused}:80")
        assert peer(vm, "many", ALIAS, host_server, 20) == ["20"]
        assert blocker.poll() is None  # still waiting
    finally:
        blocker.kill()
        blocker.wait()


def test_many_tcp_and_udp_flows(bed, host_server):
    hs = bed.host_switch()
    vm = bed.vm(hs)
    assert peer(vm, "many", ALIAS, host_server, 500, timeout=180) == ["500"]
    assert peer(vm, "udpmany", ALIAS, host_server, 200) == ["200"]


def test_ping_host_alias_gets_real_replies(bed):
    hs = bed.host_switch()
    vm = bed.vm(hs)
    out = vm.run(["ping", "-c", "3", "-i", "0.2", "-W", "2", ALIAS]).stdout
    assert "3 received" in out


def snmp(ns: str, proto: str, field: str) -> int:
    """A counter of /proc/net/snmp inside ``ns`` (e.g. Icmp InEchos, Udp InDatagrams)."""
    lines = [l.split() for l in nsutil.ns_run(ns, ["cat", "/proc/net/snmp"]).stdout.splitlines() if l.startswith(proto + ":")]
    return int(lines[1][lines[0].index(field)])


def test_allow_outbound_refuses_and_counts(bed, host_server, internet):
    inet_ns, inet_ip, inet_port, _net, _unused = internet
    hs = bed.host_switch()  # only 127.0.0.0/8
    vm = bed.vm(hs)
    echos, datagrams = snmp(inet_ns, "Icmp", "InEchos"), snmp(inet_ns, "Udp", "InDatagrams")
    out = peer(vm, "refused", inet_ip, inet_port)
    assert out[0] == "refused"
    assert peer(vm, "udpmany", inet_ip, inet_port, 2) == ["0"]
    assert "0 received" in vm.run(["ping", "-c", "2", "-i", "0.2", "-W", "1", inet_ip], check=False).stdout
    assert peer(vm, "halfclose", ALIAS, host_server) == ["ok"]  # .254 still works
    # nothing reached the other namespace
    assert (snmp(inet_ns, "Icmp", "InEchos"), snmp(inet_ns, "Udp", "InDatagrams")) == (echos, datagrams)
    vm.kill()
    nsutil.wait_for(lambda: session_stats(hs), 5, what="session stats")
    drops = session_stats(hs)[-1]["drops"]
    for reason in ("tcp-outbound-denied", "udp-outbound-denied", "icmp-outbound-denied"):
        assert drops.get(reason, 0) >= 1, reason


def test_ping_is_forwarded_for_real(bed, internet):
    inet_ns, inet_ip, _port, inet_net, unused = internet
    hs = bed.host_switch(allow=[inet_net])
    vm = bed.vm(hs)
    before = snmp(inet_ns, "Icmp", "InEchos")
    assert "3 received" in vm.run(["ping", "-c", "3", "-i", "0.2", "-W", "2", inet_ip]).stdout
    assert snmp(inet_ns, "Icmp", "InEchos") >= before + 3  # the echoes really went there
    # no host answers the unused address: no reply is forged
    assert "0 received" in vm.run(["ping", "-c", "1", "-W", "2", unused], check=False).stdout


def test_session_end_closes_host_sockets(bed, host_server):
    hs = bed.host_switch()
    # its last start-up step (the sockets, log file and services are open): the fds a session adds come on top
    nsutil.wait_for(lambda: "listening on" in hs.read_log(), 10, what="host-switch start-up")
    baseline = nsutil.fd_count(hs.pid)
    vm = bed.vm(hs)
    # hold flows open: a long download the VM never finishes reading, plus UDP flows
    holder = subprocess.Popen(nsutil.ns_cmd(vm.ns, [sys.executable, PEERS, "get", ALIAS, str(host_server), str(1 << 30)]),
                              stdout=subprocess.DEVNULL)
    try:
        peer(vm, "udpmany", ALIAS, host_server, 20)
        nsutil.wait_for(lambda: nsutil.fd_count(hs.pid) >= baseline + 10, 10, what="flows open")
        vm.kill()
        t0 = time.monotonic()
        nsutil.wait_for(lambda: nsutil.fd_count(hs.pid) <= baseline, 2, what="host sockets closed")
        assert time.monotonic() - t0 < 2
    finally:
        holder.kill()
        holder.wait()


def wait_listening(server: subprocess.Popen, port: int) -> None:
    """Until ``server`` listens on 127.0.0.1:``port`` (without connecting: iperf3 -1 serves one client)."""
    nsutil.wait_for(lambda: server.poll() is not None or nsutil.listening(server.pid, "127.0.0.1", port), 10,
                    what=f"iperf3 listening on {port}")
    assert server.poll() is None, "iperf3 exited"


def test_iperf3_both_directions(bed):
    hs = bed.host_switch("--mtu", "65520")
    vm = bed.vm(hs)
    port = free_port()
    server = subprocess.Popen(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(port), "-1"], stdout=subprocess.DEVNULL)
    try:
        wait_listening(server, port)
        out = vm.run(["iperf3", "-c", ALIAS, "-p", str(port), "-t", "2", "-J"], timeout=30).stdout
        up = json.loads(out)["end"]["sum_received"]["bits_per_second"]
    finally:
        stop(server)
    server = subprocess.Popen(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(port), "-1"], stdout=subprocess.DEVNULL)
    try:
        wait_listening(server, port)
        out = vm.run(["iperf3", "-c", ALIAS, "-p", str(port), "-t", "2", "-R", "-J"], timeout=30).stdout
        down = json.loads(out)["end"]["sum_received"]["bits_per_second"]
    finally:
        stop(server)
    print(f"iperf3 MTU 65520: VM->host {up / 1e9:.2f} Gbit/s, host->VM {down / 1e9:.2f} Gbit/s")
    assert up > 0 and down > 0


@pytest.mark.parametrize("mtu", [1500, 65520])
def test_big_udp_replies_are_fragmented_and_harmless(bed, host_server, mtu):
    hs = bed.host_switch("--mtu", str(mtu))
    vm = bed.vm(hs)
    for n in (3000, 30000, 65507):  # 65507: the largest UDP payload; its frame would exceed the framing
        assert peer(vm, "udpbig", ALIAS, host_server, n) == [str(n), "ok"]
    assert "session ended" not in hs.read_log()
    assert "1 received" in vm.run(["ping", "-c", "1", "-W", "2", "192.168.127.1"]).stdout


def test_vm_to_vm_tcp_with_offload(bed):
    """TSO frames (above the MTU, partial checksums) switched between two offload VMs arrive intact."""
    hs = bed.host_switch()
    vm1 = bed.vm(hs, "--offload")
    vm2 = bed.vm(hs, "--offload", mac="5a:94:ef:e4:0c:51")
    ip2 = vm2.ipv4().split("/")[0]
    port = 8123
    server = subprocess.Popen(nsutil.ns_cmd(vm2.ns, [sys.executable, PEERS, "serve", ip2, str(port)]))
    try:
        nsutil.wait_for(lambda: vm2.run(["bash", "-c", f"exec 3<>/dev/tcp/{ip2}/{port}"], check=False).returncode == 0,
                        10, what="server in vm2")
        local, remote, got = peer(vm1, "put", ip2, port, 16 << 20)
        assert local == remote and got == str(16 << 20)
        expected, received, got = peer(vm1, "get", ip2, port, 16 << 20)
        assert expected == received and got == str(16 << 20)
    finally:
        stop(server)
