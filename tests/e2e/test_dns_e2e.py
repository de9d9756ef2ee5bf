"""DNS on the gateway end to end: dig and getent inside the VM namespace against gateway:53.

The upstream is always a fake on 127.0.0.x started by the test (fake_dns.py),
or a closed loopback port; never a real resolver.
"""

import os
import socket
import subprocess
import sys
import time

import pytest

import nsutil
from testbed import free_port, stop

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def fake_dns():
    procs = []

    def start(ip="127.0.0.1", answer="10.11.12.13"):
        port = free_port(ip)
        p = subprocess.Popen([sys.executable, os.path.join(HERE, "fake_dns.py"), ip, str(port), answer])
        procs.append(p)
        # ready when it answers
        nsutil.wait_for(lambda: subprocess.run(["dig", f"@{ip}", "-p", str(port), "+time=1", "+tries=1", "+short",
                                                "known.example"], capture_output=True, text=True).stdout.strip(),
                        10, what="fake DNS")
        return f"{ip}:{port}"

    yield start
    for p in procs:
        stop(p)


def dig(vm, *args, check=True):
    return vm.run(["dig", "@192.168.127.1", "+time=2", "+tries=1", *args], check=check).stdout


def test_builtin_zones(bed):
    hs = bed.host_switch()
    vm = bed.vm(hs)
    assert dig(vm, "+short", "host.rancher-desktop.internal").strip() == "192.168.127.254"
    assert dig(vm, "+short", "gateway.docker.internal").strip() == "192.168.127.1"
    out = dig(vm, "AAAA", "host.rancher-desktop.internal")
    assert "status: NOERROR" in out and "ANSWER: 0" in out
    out = dig(vm, "nothere.rancher-desktop.internal")
    assert "status: NXDOMAIN" in out and "SOA" in out.split("AUTHORITY SECTION")[1]
    ptr = dig(vm, "+short", "-x", "192.168.127.254")
    assert "host.rancher-desktop.internal." in ptr
    out = dig(vm, "+noall", "+answer", "host.rancher-desktop.internal")
    ttl = int(out.split()[1])
    assert ttl > 0
    # TCP to the gateway too
    assert dig(vm, "+tcp", "+short", "gateway.docker.internal").strip() == "192.168.127.1"


def test_forwarding_truncation_tcp(bed, fake_dns):
    up = fake_dns()
    hs = bed.host_switch("--dns-upstream", up)
    vm = bed.vm(hs)
    out = dig(vm, "+noall", "+answer", "known.example")
    fields = out.split()
    assert fields[-1] == "10.11.12.13" and fields[1] == "1234"  # TTL kept
    assert dig(vm, "+tcp", "+short", "known.example").strip() == "10.11.12.13"
    # 3000+ bytes: over UDP (client limit 1232) truncated with TC, in full over TCP
    out = dig(vm, "+ignore", "+bufsize=1232", "big.example", "TXT")
    assert " tc" in out.split("flags:")[1].split(";")[0]
    out = dig(vm, "+tcp", "big.example", "TXT")
    assert "ANSWER: 30" in out
    # without +ignore dig retries over TCP by itself and gets everything
    assert "ANSWER: 30" in dig(vm, "big.example", "TXT")
    out = dig(vm, "nosuch.example")
    assert "status: NXDOMAIN" in out


def test_upstream_down_servfail_fast(bed):
    hs = bed.host_switch()  # the bed's default upstream is a closed loopback port
    vm = bed.vm(hs)
    t0 = time.monotonic()
    out = dig(vm, "known.example", check=False)
    assert "status: SERVFAIL" in out
    assert time.monotonic() - t0 < 3


def test_resolv_conf_change_without_restart(bed, fake_dns, tmp_path):
    a = fake_dns("127.0.0.1", "10.0.0.1")
    b = fake_dns("127.0.0.1", "10.0.0.2")
    conf = tmp_path / "resolv.conf"
    ip, port = a.split(":")
    conf.write_text(f"search corp.test\nnameserver {ip}:{port}\n")
    hs = bed.host_switch("--dns-resolv-conf", str(conf))
    vm = bed.vm(hs)
    assert dig(vm, "+short", "known.example").strip() == "10.0.0.1"
    tmp = tmp_path / "resolv.new"
    ip, port = b.split(":")
    tmp.write_text(f"nameserver {ip}:{port}\n")
    os.replace(tmp, conf)
    nsutil.wait_for(lambda: dig(vm, "+short", "known.example").strip() == "10.0.0.2", 5, what="new upstream")


def test_dhcp_search_domains_follow_the_resolv_conf(bed, tmp_path):
    # option 119 from the host's resolv.conf search line, and a new line for the next lease
    conf = tmp_path / "resolv.conf"
    closed = f"127.0.0.1:{free_port(kind=socket.SOCK_DGRAM)}"  # never asked in this test
    conf.write_text(f"search first.test\nnameserver {closed}\n")
    hs = bed.host_switch("--dns-resolv-conf", str(conf))
    vm_conf = tmp_path / "vm-resolv.conf"
    vm = bed.vm(hs, "--resolv-conf", str(vm_conf))
    nsutil.wait_for(lambda: vm_conf.exists() and "search first.test" in vm_conf.read_text(), 5, what="first search line")
    tmp = tmp_path / "resolv.new"
    tmp.write_text(f"search second.test other.test\nnameserver {closed}\n")
    os.replace(tmp, conf)
    nsutil.wait_for(lambda: "DHCP search domains now ['second.test', 'other.test']" in hs.read_log(), 5,
                    what="host-switch applying the new search line")
    vm.kill()  # a new VM session: a new DORA, with the new option 119
    vm_conf.unlink()
    vm.start()
    vm.wait_address()
    nsutil.wait_for(lambda: vm_conf.exists() and "search second.test other.test" in vm_conf.read_text(), 5,
                    what="second search line")


def test_getent_through_dhcp_resolv_conf(bed):
    hs = bed.host_switch("--dns-search", "corp.test")
    ns = bed.namespace()
    etc = f"/etc/netns/{ns}"
    os.makedirs(etc, exist_ok=True)
    # ip netns exec bind-mounts these over /etc: names go only to the namespace's resolver (our
    # gateway), never to a desktop's systemd-resolved/mDNS through the host's nsswitch.conf
    with open(f"{etc}/nsswitch.conf", "w") as f:
        f.write("hosts: files dns\n")
    try:
        from testbed import VM
        vm = VM(ns, hs, bed.tmp, "5a:94:ef:e4:0c:ee", ["--resolv-conf", f"{etc}/resolv.conf"])
        bed.vms.append(vm)
        try:
            vm.wait_address()
            nsutil.wait_for(lambda: os.path.exists(f"{etc}/resolv.conf"), 5, what="resolv.conf")
            text = open(f"{etc}/resolv.conf").read()
            assert "nameserver 192.168.127.1" in text and "search corp.test" in text
            out = vm.run(["getent", "hosts", "host.rancher-desktop.internal"]).stdout
            assert out.split()[0] == "192.168.127.254"
        finally:
            vm.kill()
    finally:
        subprocess.run(["rm", "-rf", etc])


def test_malformed_queries_do_not_stop_the_server(bed):
    hs = bed.host_switch()
    vm = bed.vm(hs)
    script = (
        "import os, socket, random\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "rnd = random.Random(7)\n"
        "for i in range(1000):\n"
        "    n = rnd.randrange(0, 600)\n"
        "    s.sendto(bytes(rnd.getrandbits(8) for _ in range(n)), ('192.168.127.1', 53))\n"
    )
    vm.run([sys.executable, "-c", script])
    # The garbage fills the per-session limit of queries in flight for a moment (a
    # query that parses is forwarded); the resolver's retry gets through once it drains.
    assert dig(vm, "+tries=3", "+short", "host.rancher-desktop.internal").strip() == "192.168.127.254"
    assert hs.proc.poll() is None
