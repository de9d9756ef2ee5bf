"""Port forwarding and the HTTP API, end to end: host clients reach servers inside the VM namespace."""

import json
import os
import socket
import subprocess
import sys

import pytest

import nsutil
from testbed import free_port, stop

PEERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers.py")


def api(hs_api_sock: str, method: str, path: str, body=None):
    cmd = ["curl", "-sS", "--max-time", "10", "--unix-socket", hs_api_sock, "-o", "-", "-w", "\n%{http_code}",
           "-X", method, f"http://api{path}"]
    if body is not None:
        cmd += ["-H", "Content-Type: application/json", "--data-binary", body if isinstance(body, str) else json.dumps(body)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout
    text, _, code = out.rpartition("\n")
    return int(code), text


@pytest.fixture
def vm_server(bed):
    """A VM with the peers.py server (TCP + UDP echo) listening inside its namespace on port 8000."""
    def make(hs):
        vm = bed.vm(hs)
        proc = subprocess.Popen(nsutil.ns_cmd(vm.ns, [sys.executable, PEERS, "serve", "0.0.0.0", "8000"]))
        bed._stack.callback(stop, proc)
        nsutil.wait_for(lambda: vm.run(["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8000"], check=False).returncode == 0,
                        10, what="server in the VM")
        return vm
    return make


def tcp_ping(port: int, word: str = "x") -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"PING {word}\n".encode())
        return s.makefile().readline().strip()


def test_expose_unexpose_tcp_and_udp(bed, vm_server, tmp_path):
    sock = str(tmp_path / "api.sock")
    hs = bed.host_switch("--api-listen", f"unix://{sock}")
    vm_server(hs)
    tport, uport = free_port(), free_port(kind=socket.SOCK_DGRAM)
    assert api(sock, "POST", "/services/forwarder/expose",
               {"local": f"127.0.0.1:{tport}", "remote": "192.168.127.2:8000", "protocol": "tcp"})[0] == 200
    assert tcp_ping(tport, "hello") == "PONG hello"
    assert api(sock, "POST", "/services/forwarder/expose",
               {"local": f"127.0.0.1:{uport}", "remote": "192.168.127.2:8000", "protocol": "udp"})[0] == 200
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(5)
        u.sendto(b"datagram", ("127.0.0.1", uport))
        assert u.recvfrom(100)[0] == b"datagram"
    code, text = api(sock, "GET", "/services/forwarder/all")
    assert code == 200
    assert json.loads(text) == sorted([
        {"local": f"127.0.0.1:{tport}", "remote": "192.168.127.2:8000", "protocol": "tcp", "owner": "host"},
        {"local": f"127.0.0.1:{uport}", "remote": "192.168.127.2:8000", "protocol": "udp", "owner": "host"},
    ], key=lambda d: (d["local"], d["protocol"]))
    # a big transfer through the forward, host -> VM
    with socket.create_connection(("127.0.0.1", tport), timeout=30) as s:
        n = 8 << 20
        s.sendall(f"PUT {n}\n".encode() + b"z" * n)
        assert s.makefile().readline().split()[1] == str(n)
    assert api(sock, "POST", "/services/forwarder/unexpose", {"local": f"127.0.0.1:{tport}", "protocol": "tcp"})[0] == 200
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", tport), timeout=5)
    assert api(sock, "POST", "/services/forwarder/unexpose", {"local": f"127.0.0.1:{tport}", "protocol": "tcp"})[0] == 404


def test_api_errors_are_clear_and_harmless(bed, vm_server, tmp_path):
    sock = str(tmp_path / "api.sock")
    hs = bed.host_switch("--api-listen", f"unix://{sock}")
    vm_server(hs)
    for body in ("{not json", "[]", json.dumps({"local": "127.0.0.1", "remote": "192.168.127.2:80"}),
                 json.dumps({"local": "127.0.0.1:1", "remote": "10.0.0.1:80"}),
                 json.dumps({"local": "127.0.0.1:1", "remote": "192.168.127.2:80", "protocol": "sctp"})):
        code, text = api(sock, "POST", "/services/forwarder/expose", body)
        assert code == 400 and "error" in json.loads(text), body
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        code, _ = api(sock, "POST", "/services/forwarder/expose",
                      {"local": f"127.0.0.1:{busy.getsockname()[1]}", "remote": "192.168.127.2:8000"})
        assert code == 409
    finally:
        busy.close()
    assert api(sock, "GET", "/services/dhcp/leases")[1].strip() == json.dumps({"192.168.127.2": "5a:94:ef:e4:0c:ee"})
    stats = json.loads(api(sock, "GET", "/stats")[1])
    assert stats["sessions"] and "dns" in stats


def test_api_inside_the_network_and_static_forward(bed, vm_server):
    port = free_port()
    hs = bed.host_switch("--port-forward", f"127.0.0.1:{port}=192.168.127.2:8000")
    vm = vm_server(hs)
    assert tcp_ping(port, "static") == "PONG static"
    # the VM reaches the API on gateway:80; a remote without IP means the caller
    out = vm.run(["curl", "-sS", "--max-time", "5", "http://192.168.127.1/services/forwarder/all"]).stdout
    assert json.loads(out) == [{"local": f"127.0.0.1:{port}", "remote": "192.168.127.2:8000", "protocol": "tcp",
                                "owner": "host"}]
    port2 = free_port()
    out = vm.run(["curl", "-sS", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
                  "--data-binary", json.dumps({"local": f"127.0.0.1:{port2}", "remote": ":8000"}),
                  "http://192.168.127.1/services/forwarder/expose"]).stdout
    assert out == "200"
    assert tcp_ping(port2, "caller") == "PONG caller"
    out = vm.run(["curl", "-sS", "--max-time", "5", "http://192.168.127.1/services/forwarder/all"]).stdout
    assert {x["local"]: x["owner"] for x in json.loads(out)} == {f"127.0.0.1:{port}": "host",
                                                                 f"127.0.0.1:{port2}": "192.168.127.2"}


def ctl(sock: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rdswitch.ctl", "--api", f"unix://{sock}", *args],
                          capture_output=True, text=True, timeout=30)


def test_ctl_client(bed, vm_server, tmp_path):
    sock = str(tmp_path / "api.sock")
    hs = bed.host_switch("--api-listen", f"unix://{sock}")
    vm_server(hs)
    port = free_port()
    res = ctl(sock, "expose", f"127.0.0.1:{port}", "192.168.127.2:8000")
    assert res.returncode == 0, res.stderr
    assert tcp_ping(port, "ctl") == "PONG ctl"
    assert json.loads(ctl(sock, "list").stdout) == [
        {"local": f"127.0.0.1:{port}", "protocol": "tcp", "remote": "192.168.127.2:8000", "owner": "host"}]
    assert json.loads(ctl(sock, "leases").stdout) == {"192.168.127.2": "5a:94:ef:e4:0c:ee"}
    bad = ctl(sock, "expose", "127.0.0.1:1", "10.0.0.1:80")
    assert bad.returncode == 1 and "outside the virtual subnet" in bad.stderr
    assert ctl(sock, "unexpose", f"127.0.0.1:{port}").returncode == 0
    gone = ctl(sock, "unexpose", f"127.0.0.1:{port}")
    assert gone.returncode == 1 and "404" in gone.stderr
