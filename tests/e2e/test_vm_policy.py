"""What a VM may ask of the host, end to end: curl (and a small HTTP client) in the VM's namespace against
the gateway's API on 192.168.127.1:80, the host's API on a unix socket, and the host checked with ``ss``
and the filesystem after every refusal.

Every host listener a test makes is on 127.0.0.1/::1, except the one 0.0.0.0 bind that shows the host's
API keeps its power; that port is closed again at once and nothing connects to it but 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

import nsutil
from testbed import free_port, stop

PEERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers.py")
GW = "192.168.127.1"
VM_IP = "192.168.127.2"
VM2_MAC = "5a:94:ef:e4:0c:42"


def vm_api(vm, method: str, path: str, body=None, *extra: str) -> tuple[int, dict | list | None]:
    """curl in the VM's namespace against the gateway's API: (status, decoded JSON body or None)."""
    cmd = ["curl", "-sS", "--max-time", "5", "-o", "-", "-w", "\n%{http_code}", "-X", method, *extra]
    if body is not None:
        cmd += ["-H", "Content-Type: application/json", "--data-binary", json.dumps(body)]
    out = vm.run([*cmd, f"http://{GW}{path}"], check=False).stdout
    text, _, code = out.rpartition("\n")
    return int(code or 0), (json.loads(text) if text.strip() else None)


def host_api(sock: str, method: str, path: str, body=None) -> tuple[int, dict | list | None]:
    cmd = ["curl", "-sS", "--max-time", "10", "--unix-socket", sock, "-o", "-", "-w", "\n%{http_code}", "-X", method]
    if body is not None:
        cmd += ["-H", "Content-Type: application/json", "--data-binary", json.dumps(body)]
    out = subprocess.run([*cmd, f"http://api{path}"], capture_output=True, text=True, timeout=20).stdout
    text, _, code = out.rpartition("\n")
    return int(code), (json.loads(text) if text.strip() else None)


def listening(port: int) -> list[str]:
    """Every TCP or UDP socket bound to ``port`` on the host (ss), as lines; [] when there is none."""
    out = subprocess.run(["ss", "-Hlntu", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line.strip()]


def expose(local: str, remote: str = ":8000", protocol: str = "tcp") -> dict:
    return {"local": local, "remote": remote, "protocol": protocol}


def tcp_ping(port: int, word: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"PING {word}\n".encode())
        return s.makefile().readline().strip()


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def server_in(bed, vm, port: int = 8000) -> None:
    proc = subprocess.Popen(nsutil.ns_cmd(vm.ns, [sys.executable, PEERS, "serve", "0.0.0.0", str(port)]))
    bed._stack.callback(stop, proc)
    nsutil.wait_for(lambda: vm.run(["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}"], check=False).returncode == 0,
                    10, what="server in the VM")


def refused_counts(sock: str) -> dict:
    return host_api(sock, "GET", "/stats")[1]["vm_policy"]["refused"]


def test_what_a_vm_may_and_may_not_expose(bed, tmp_path):
    sock = str(tmp_path / "api.sock")
    hs = bed.host_switch("--api-listen", f"unix://{sock}")
    vm = bed.vm(hs)
    server_in(bed, vm)
    # a loopback expose works, and it is the VM's
    port = free_port()
    assert vm_api(vm, "POST", "/services/forwarder/expose", expose(f"127.0.0.1:{port}")) == (200, None)
    assert tcp_ping(port, "mine") == "PONG mine"
    listed = host_api(sock, "GET", "/services/forwarder/all")[1]
    assert listed == [{"local": f"127.0.0.1:{port}", "remote": f"{VM_IP}:8000", "protocol": "tcp", "owner": VM_IP}]
    ctl = subprocess.run([sys.executable, "-m", "rdswitch.ctl", "--api", f"unix://{sock}", "list"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    assert json.loads(ctl)[0]["owner"] == VM_IP
    # each refusal: its status and reason, and nothing on the host
    etc_path = f"/etc/rdswitch-{nsutil.unique_name('vm')}.sock"
    privileged = next(p for p in range(1000, 1024) if not listening(p))
    cases = [
        (expose(f"0.0.0.0:{free_port()}"), 403, "vm-expose-address", "--vm-expose-address"),
        (expose(f":{free_port()}"), 403, "vm-expose-address", "--vm-expose-address any"),
        (expose(f"[::]:{free_port()}"), 403, "vm-expose-address", "--vm-expose-address any"),
        (expose(f"[::ffff:0.0.0.0]:{free_port()}"), 403, "vm-expose-address", "--vm-expose-address"),
        (expose(f"myhost.example:{free_port()}"), 403, "vm-expose-address", "host name"),
        (expose(f"0.0.0.0:{free_port(kind=socket.SOCK_DGRAM)}", protocol="udp"), 403, "vm-expose-address", None),
        (expose(f"127.0.0.1:{privileged}"), 403, "vm-expose-ports", "--vm-expose-ports"),
        (expose(etc_path, f"tcp://{VM_IP}:8000", "unix"), 403, "vm-expose-unix-dir", "--vm-expose-unix-dir"),
        (expose(f"127.0.0.1:{free_port()}", f"{GW}:80"), 403, "vm-expose-remote", "the gateway"),
        (expose(f"127.0.0.1:{free_port()}", "192.168.127.254:22"), 403, "vm-expose-remote", "the host alias"),
        (expose(f"127.0.0.1:{free_port()}", "192.168.127.77:80"), 403, "vm-expose-remote", "not a DHCP lease"),
    ]
    for body, status, reason, words in cases:
        code, answer = vm_api(vm, "POST", "/services/forwarder/expose", body)
        assert (code, answer["reason"]) == (status, reason), (body, code, answer)
        assert words is None or words in answer["error"], answer
        if body["protocol"] != "unix":
            assert listening(int(body["local"].rsplit(":", 1)[1])) == [], body
    assert not os.path.lexists(etc_path)
    assert [x["local"] for x in host_api(sock, "GET", "/services/forwarder/all")[1]] == [f"127.0.0.1:{port}"]
    counts = refused_counts(sock)
    assert counts["vm-expose-address"] == 6 and counts["vm-expose-ports"] == 1
    assert counts["vm-expose-unix-dir"] == 1 and counts["vm-expose-remote"] == 3 and counts["vm-max-forwards"] == 0
    log = hs.read_log()
    assert log.count("refused POST /services/forwarder/expose from VM 192.168.127.2") == min(len(cases), 10)  # burst
    # a body above 64 KiB is refused as it arrives (413), not buffered up to Quart's 16 MiB default first
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (1 << 20))
    code, answer = vm_api(vm, "POST", "/services/forwarder/expose", None, "-H", "Content-Type: application/json",
                          "--data-binary", f"@{big}")
    assert code == 413 and "error" in answer
    # the host's API keeps its power: 0.0.0.0 (closed again at once; only 127.0.0.1 connects to it)
    wide = free_port()
    assert host_api(sock, "POST", "/services/forwarder/expose", expose(f"0.0.0.0:{wide}", f"{VM_IP}:8000"))[0] == 200
    try:
        assert any("0.0.0.0:" in line for line in listening(wide)), listening(wide)
        assert tcp_ping(wide, "host") == "PONG host"
    finally:
        assert host_api(sock, "POST", "/services/forwarder/unexpose", {"local": f"0.0.0.0:{wide}"})[0] == 200
    assert listening(wide) == []
    # the VM cannot remove the host's forwards
    assert host_api(sock, "POST", "/services/forwarder/expose", expose(f"127.0.0.1:{wide}", f"{VM_IP}:8000"))[0] == 200
    code, answer = vm_api(vm, "POST", "/services/forwarder/unexpose", {"local": f"127.0.0.1:{wide}"})
    assert (code, answer["reason"]) == (403, "vm-not-owner") and "host" in answer["error"]
    assert tcp_ping(wide, "still") == "PONG still"
    # its own it can
    assert vm_api(vm, "POST", "/services/forwarder/unexpose", {"local": f"127.0.0.1:{port}"}) == (200, None)
    assert listening(port) == []


def test_unix_sockets_only_below_the_granted_directory(bed, tmp_path):
    granted, outside = tmp_path / "granted", tmp_path / "outside"
    granted.mkdir()
    outside.mkdir()
    (granted / "escape").symlink_to(outside)
    (granted / "dangling.sock").symlink_to(outside / "made.sock")
    stale = granted / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))
    sock = str(tmp_path / "api.sock")
    hs = bed.host_switch("--api-listen", f"unix://{sock}", "--vm-expose-unix-dir", str(granted))
    vm = bed.vm(hs)
    server_in(bed, vm)
    ok = granted / "docker.sock"
    assert vm_api(vm, "POST", "/services/forwarder/expose", expose(str(ok), f"tcp://{VM_IP}:8000", "unix")) == (200, None)
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(10)
        c.connect(str(ok))
        c.sendall(b"PING unix\n")
        assert c.makefile().readline().strip() == "PONG unix"
    assert oct(os.stat(ok).st_mode & 0o777) == "0o600"
    for path, status, reason in ((granted / "escape" / "x.sock", 403, "vm-expose-unix-dir"),
                                 (f"{granted}/../outside/y.sock", 403, "vm-expose-unix-dir"),
                                 (f"{granted}/sub/", 403, "vm-expose-unix-dir"),
                                 (granted / "dangling.sock", 409, None),
                                 (stale, 409, None)):
        code, answer = vm_api(vm, "POST", "/services/forwarder/expose", expose(str(path), f"tcp://{VM_IP}:8000", "unix"))
        assert code == status and answer.get("reason") == reason, (path, code, answer)
    assert os.listdir(outside) == []
    assert sorted(os.listdir(granted)) == ["dangling.sock", "docker.sock", "escape", "stale.sock"]
    assert refused_counts(sock)["vm-expose-unix-dir"] == 3
    vm.kill()  # its session ends: its socket goes
    nsutil.wait_for(lambda: not ok.exists(), 10, what="the VM's socket removed at session end")
    assert stale.exists()


BURST = r"""
import http.client, json, sys
ports = json.loads(sys.argv[1])
conn = http.client.HTTPConnection("192.168.127.1", 80, timeout=10)
codes, reasons = [], set()
for port in ports:
    body = json.dumps({"local": f"127.0.0.1:{port}", "remote": ":8000"})
    conn.request("POST", "/services/forwarder/expose", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    codes.append(resp.status)
    if resp.status != 200:
        reasons.add(json.loads(data)["reason"])
print(json.dumps({"codes": codes, "reasons": sorted(reasons)}))
"""


def distinct_free_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


def test_four_hundred_exposes_256_accepted_and_fds_bounded(bed, tmp_path):
    sock = str(tmp_path / "api.sock")
    hs = bed.host_switch("--api-listen", f"unix://{sock}")
    vm = bed.vm(hs)
    before = fds(hs.pid)
    ports = distinct_free_ports(400)
    out = vm.run([sys.executable, "-c", BURST, json.dumps(ports)], timeout=240).stdout
    result = json.loads(out)
    assert result["codes"][:256] == [200] * 256 and result["codes"][256:] == [429] * 144, result["codes"]
    assert result["reasons"] == ["vm-max-forwards"]
    after = fds(hs.pid)
    print(f"host-switch fds: {before} before, {after} after 400 exposes (256 forwards)")
    assert after - before <= 256 + 8, (before, after)
    assert len(host_api(sock, "GET", "/services/forwarder/all")[1]) == 256
    assert refused_counts(sock)["vm-max-forwards"] == 144
    # one log line per refusal, rate-limited: the burst is not 144 lines
    lines = [line for line in hs.read_log().splitlines() if "refused POST" in line]
    assert 1 <= len(lines) <= 12, len(lines)
    # the host is not bound by the VM's limit
    extra = distinct_free_ports(1)[0]
    assert host_api(sock, "POST", "/services/forwarder/expose", expose(f"127.0.0.1:{extra}", f"{VM_IP}:8000"))[0] == 200
    # the session's end removes all 256 (logged), and the fds come back
    vm.kill()
    nsutil.wait_for(lambda: len(host_api(sock, "GET", "/services/forwarder/all")[1]) == 1, 20,
                    what="the VM's forwards removed")
    nsutil.wait_for(lambda: fds(hs.pid) <= before + 1, 20, what="the forwards' fds closed")
    assert hs.read_log().count("its session ended") == 256
    assert all(listening(p) == [] for p in ports[:256])


def test_two_vms_own_their_forwards_and_cannot_pose_as_each_other(bed, tmp_path):
    sock = str(tmp_path / "api.sock")
    hs = bed.host_switch("--api-listen", f"unix://{sock}")
    vm1 = bed.vm(hs)
    vm2 = bed.vm(hs, mac=VM2_MAC)
    ip2 = vm2.ipv4().split("/")[0]
    server_in(bed, vm1)
    server_in(bed, vm2)
    p1, p2 = free_port(), free_port()
    assert vm_api(vm1, "POST", "/services/forwarder/expose", expose(f"127.0.0.1:{p1}")) == (200, None)
    assert vm_api(vm2, "POST", "/services/forwarder/expose", expose(f"127.0.0.1:{p2}")) == (200, None)
    owners = {x["local"]: (x["owner"], x["remote"]) for x in host_api(sock, "GET", "/services/forwarder/all")[1]}
    assert owners == {f"127.0.0.1:{p1}": (VM_IP, f"{VM_IP}:8000"), f"127.0.0.1:{p2}": (ip2, f"{ip2}:8000")}
    # vm2 may not remove vm1's forward, nor forward into vm1
    code, answer = vm_api(vm2, "POST", "/services/forwarder/unexpose", {"local": f"127.0.0.1:{p1}"})
    assert (code, answer["reason"]) == (403, "vm-not-owner")
    code, answer = vm_api(vm2, "POST", "/services/forwarder/expose", expose(f"127.0.0.1:{free_port()}", f"{VM_IP}:8000"))
    assert (code, answer["reason"]) == (403, "vm-expose-remote") and "--vm-expose-cross-vm" in answer["error"]
    # vm2 posing as vm1 by its address: the gateway drops the SYN, the API never hears it
    vm2.run(["ip", "addr", "add", f"{VM_IP}/32", "dev", "eth0"])
    code, _ = vm_api(vm2, "POST", "/services/forwarder/unexpose", {"local": f"127.0.0.1:{p1}"}, "--interface", VM_IP,
                     "--connect-timeout", "2")
    assert code == 0  # no answer at all
    vm2.run(["ip", "addr", "del", f"{VM_IP}/32", "dev", "eth0"])
    stats = host_api(sock, "GET", "/stats")[1]
    assert stats["gateway"]["drops"].get("ip-spoofed", 0) >= 1
    # ... or by its MAC: the switch drops every frame claiming it
    vm1_mac = "5a:94:ef:e4:0c:ee"
    vm2.run(["ip", "link", "set", "dev", "eth0", "address", vm1_mac])
    vm2.run(["ip", "addr", "add", f"{VM_IP}/32", "dev", "eth0"])
    code, _ = vm_api(vm2, "POST", "/services/forwarder/unexpose", {"local": f"127.0.0.1:{p1}"}, "--interface", VM_IP,
                     "--connect-timeout", "2")
    assert code == 0
    assert host_api(sock, "GET", "/stats")[1]["switch"]["spoofed_frames"] >= 1
    assert tcp_ping(p1, "vm1") == "PONG vm1"  # vm1's forward still there, still reaching vm1
    # vm1's session ends: its forward goes (logged), vm2's stays
    vm1.kill()
    nsutil.wait_for(lambda: [x["local"] for x in host_api(sock, "GET", "/services/forwarder/all")[1]]
                    == [f"127.0.0.1:{p2}"], 20, what="vm1's forward removed")
    assert listening(p1) == []
    assert f"removed 127.0.0.1:{p1}/tcp of {VM_IP}: its session ended" in hs.read_log()
    vm2.run(["ip", "addr", "del", f"{VM_IP}/32", "dev", "eth0"])
    vm2.run(["ip", "link", "set", "dev", "eth0", "address", VM2_MAC])
    assert tcp_ping(p2, "vm2") == "PONG vm2"


def test_forwards_outlive_the_session_when_told(bed, tmp_path):
    sock = str(tmp_path / "api.sock")
    hs = bed.host_switch("--api-listen", f"unix://{sock}", "--vm-forwards-outlive-session")
    vm = bed.vm(hs)
    port = free_port()
    assert vm_api(vm, "POST", "/services/forwarder/expose", expose(f"127.0.0.1:{port}")) == (200, None)
    vm.kill()
    nsutil.wait_for(lambda: "keeping" in hs.read_log(), 10, what="the keep line")
    assert [x["owner"] for x in host_api(sock, "GET", "/services/forwarder/all")[1]] == [VM_IP]
    assert listening(port)
    # the VM back (same MAC, same lease): the forward is still its own
    vm.start()
    vm.wait_address()
    assert vm_api(vm, "POST", "/services/forwarder/unexpose", {"local": f"127.0.0.1:{port}"}) == (200, None)
    assert listening(port) == []


def test_dns_records_a_vm_adds_are_bounded(bed, tmp_path):
    sock = str(tmp_path / "api.sock")
    hs = bed.host_switch("--api-listen", f"unix://{sock}", "--vm-max-dns-records", "2")
    vm = bed.vm(hs)

    def dig(name: str) -> str:
        return vm.run(["dig", "+short", "+time=2", "+tries=2", f"@{GW}", name, "A"]).stdout.strip()

    zone = {"Name": "docker.internal.", "Records": [{"Name": "app", "IP": "10.11.0.5"}], "DefaultIP": ""}
    assert vm_api(vm, "POST", "/services/dns/add", zone) == (200, None)
    assert dig("app.docker.internal") == "10.11.0.5"
    for body, status, reason in (
            ({**zone, "Records": [{"Name": "host", "IP": "10.11.0.6"}]}, 403, "vm-dns"),  # the host's record
            ({"Name": "example.com.", "Records": [{"Name": "www", "IP": "10.11.0.6"}]}, 403, "vm-dns"),  # a new zone
            ({**zone, "Records": [{"Name": "", "IP": "10.11.0.6", "Regexp": "(a+)+$"}]}, 403, "vm-dns"),
            ({**zone, "Records": [], "DefaultIP": "10.11.0.6"}, 403, "vm-dns"),
            ({**zone, "Records": [{"Name": "b", "IP": "10.11.0.6"}, {"Name": "c", "IP": "10.11.0.6"}]}, 429,
             "vm-max-dns-records")):
        code, answer = vm_api(vm, "POST", "/services/dns/add", body)
        assert (code, answer["reason"]) == (status, reason), (body, code, answer)
    assert dig("host.docker.internal") == "192.168.127.254" and dig("b.docker.internal") == ""
    assert vm_api(vm, "POST", "/services/dns/add", {"zone": "docker.internal", "name": "b", "ip": "10.11.0.7"})[0] == 200
    assert dig("b.docker.internal") == "10.11.0.7"
    assert refused_counts(sock)["vm-dns"] == 4
    vm.kill()  # the session's end removes the VM's records
    nsutil.wait_for(lambda: "removed DNS record b.docker.internal." in hs.read_log(), 10, what="records removed")
    names = {r["Name"] for z in host_api(sock, "GET", "/services/dns/all")[1] if z["Name"] == "docker.internal."
             for r in z["Records"]}
    assert names == {"gateway", "host"}


def test_a_vm_cannot_reach_the_hosts_api_through_the_host_alias(bed):
    """--api-listen tcp://127.0.0.1:P is the host's 127.0.0.1:P, which the VM reaches as 192.168.127.254:P."""
    port = free_port()
    hs = bed.host_switch("--api-listen", f"tcp://127.0.0.1:{port}")
    vm = bed.vm(hs)
    wide = free_port()
    body = json.dumps(expose(f"0.0.0.0:{wide}", f"{VM_IP}:8000"))
    res = vm.run(["curl", "-sS", "--max-time", "5", "-X", "POST", "--data-binary", body,
                  f"http://192.168.127.254:{port}/services/forwarder/expose"], check=False)
    assert res.returncode != 0 and listening(wide) == [], (res.returncode, res.stdout, res.stderr)
    stats = json.loads(subprocess.run(["curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{port}/stats"],
                                      capture_output=True, text=True, timeout=20, check=True).stdout)
    assert any(s["drops"].get("tcp-host-only") for s in stats["sessions"].values()), stats["sessions"]
    # the same VM still has the gateway's API, and the host still has its own
    assert vm_api(vm, "GET", "/services/forwarder/all") == (200, [])
