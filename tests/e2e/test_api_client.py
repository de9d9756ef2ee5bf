"""The HTTP API as gvisor-tap-vsock's Go ``pkg/client`` drives it (podman machine, crc).

``GoClient`` sends what ``pkg/client`` sends (the paths, methods, headers and
compact ``json.Marshal`` bodies of ``types.ExposeRequest``,
``types.UnexposeRequest`` and ``types.Zone``) on the ``--api-listen`` unix
socket, and reads the answers as it does: a non-200 status is an error whose
message is the body; the listings are decoded into the Go structs' shapes.
Real traffic then goes from the host through every kind of forward into
servers in the VM's namespace, and the added DNS names are resolved inside it.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import socket
import stat
import subprocess
import sys

import pytest

import nsutil
from testbed import stop

PEERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers.py")
VM_IP = "192.168.127.2"
GATEWAY = "192.168.127.1"


class GoError(Exception):
    """What pkg/client returns for a non-200 answer."""


class GoClient:
    def __init__(self, path: str) -> None:
        self.path = path

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, dict, bytes]:
        """One request with exactly Go's net/http headers (Get / Post(url, "application/json", body))."""
        head = f"{method} {path} HTTP/1.1\r\nHost: gvproxy\r\nUser-Agent: Go-http-client/1.1\r\n"
        if body is not None:
            head += f"Content-Length: {len(body)}\r\nContent-Type: application/json\r\n"
        head += "Accept-Encoding: gzip\r\n\r\n"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(self.path)
            s.sendall(head.encode() + (body or b""))
            resp = http.client.HTTPResponse(s, method=method)
            resp.begin()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()

    def _get(self, path: str):
        status, _headers, data = self.request("GET", path)
        if status != 200:
            raise GoError(f"unexpected status: {status}")
        return json.loads(data)  # json.NewDecoder(res.Body).Decode

    def _post(self, path: str, req: dict) -> None:
        status, _headers, data = self.request("POST", path, go_marshal(req))
        if status != 200:
            raise GoError(data.decode().strip())

    def list(self) -> list[dict]:
        return [expose_request(x) for x in self._get("/services/forwarder/all")]

    def expose(self, local: str, remote: str, protocol: str = "tcp") -> None:
        self._post("/services/forwarder/expose", {"local": local, "remote": remote, "protocol": protocol})

    def unexpose(self, local: str, protocol: str = "tcp") -> None:
        self._post("/services/forwarder/unexpose", {"local": local, "protocol": protocol})

    def list_dns(self) -> list[dict]:
        return [go_zone(z) for z in self._get("/services/dns/all")]

    def add_dns(self, name: str, records=None, default_ip: str = "") -> None:
        # json.Marshal(types.Zone): nil Records is null, a nil DefaultIP is "", a nil Regexp is left out
        self._post("/services/dns/add", {"Name": name, "Records": records, "DefaultIP": default_ip})


def go_marshal(value) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def expose_request(x) -> dict:
    """Decode into types.ExposeRequest {Local, Remote, Protocol string}: every field present and a string.

    Like encoding/json (pkg/client decodes without DisallowUnknownFields), other keys are ignored: rdswitch
    adds "owner" (who made the forward), a string too.
    """
    assert isinstance(x, dict) and {"local", "remote", "protocol"} <= set(x) <= {"local", "remote", "protocol", "owner"}, x
    assert all(isinstance(v, str) for v in x.values()), x
    return {k: x[k] for k in ("local", "remote", "protocol")}


def go_ip(text) -> str:
    """A net.IP's text: an address, or "" for nil."""
    assert isinstance(text, str), text
    if text:
        ipaddress.ip_address(text)
    return text


def go_zone(z) -> dict:
    """Decode into types.Zone {Name string; Records []Record; DefaultIP net.IP} with Record {Name; IP; Regexp}."""
    assert isinstance(z, dict) and set(z) == {"Name", "Records", "DefaultIP"}, z
    assert isinstance(z["Name"], str) and z["Name"].endswith(".")
    assert z["Records"] is None or isinstance(z["Records"], list), z
    go_ip(z["DefaultIP"])
    for r in z["Records"] or []:
        assert isinstance(r, dict) and {"Name", "IP"} <= set(r) <= {"Name", "IP", "Regexp"}, r
        assert isinstance(r["Name"], str) and go_ip(r["IP"])
        assert isinstance(r.get("Regexp", ""), str)
    return z


def free_port_both(kind=socket.SOCK_STREAM) -> int:
    """A port free on every IPv4 and IPv6 address (a dual-stack bind)."""
    with socket.socket(socket.AF_INET6, kind) as s:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", 0))
        return s.getsockname()[1]


def tcp_ping(host: str, port: int, word: str) -> str:
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(f"PING {word}\n".encode())
        return s.makefile().readline().strip()


def refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def udp_echo(host: str, port: int, payload: bytes) -> bytes:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as u:
        u.settimeout(5)
        u.sendto(payload, (host, port))
        return u.recvfrom(100)[0]


def curl(*args: str) -> str:
    return subprocess.run(["curl", "-sS", "--fail", "--max-time", "10", *args],
                          capture_output=True, text=True, timeout=20, check=True).stdout


@pytest.fixture
def vm_servers(bed, tmp_path):
    """host-switch with --api-listen, a VM with peers.py (TCP+UDP echo) on 8000 and an HTTP server on 8080."""
    api_sock = str(tmp_path / "api.sock")
    hs = bed.host_switch("--api-listen", f"unix://{api_sock}")
    vm = bed.vm(hs)
    www = tmp_path / "www"
    www.mkdir()
    token = nsutil.unique_name("page")
    (www / "page.txt").write_text(token)
    for cmd in ([sys.executable, PEERS, "serve", "0.0.0.0", "8000"],
                [sys.executable, "-m", "http.server", "8080", "--bind", "0.0.0.0", "--directory", str(www)]):
        proc = subprocess.Popen(nsutil.ns_cmd(vm.ns, cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        bed._stack.callback(stop, proc)
    for port in (8000, 8080):
        nsutil.wait_for(lambda: vm.run(["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}"], check=False).returncode == 0,
                        10, what=f"server on {port} in the VM")
    return hs, vm, GoClient(api_sock), token


def test_tcp_forwards_of_every_local_form(vm_servers):
    _hs, _vm, client, token = vm_servers
    ports = {form: free_port_both() for form in ("v4", "all", "localhost", "v6loop", "v6any")}
    locals_ = {"v4": f"127.0.0.1:{ports['v4']}", "all": f":{ports['all']}", "localhost": f"localhost:{ports['localhost']}",
               "v6loop": f"[::1]:{ports['v6loop']}", "v6any": f"[::]:{ports['v6any']}"}
    for local in locals_.values():
        client.expose(local, f"{VM_IP}:8000")
    # where each form listens: (reachable on 127.0.0.1, reachable on ::1)
    expected = {"v4": (True, False), "all": (True, True), "localhost": (True, True), "v6loop": (False, True),
                "v6any": (True, True)}
    for form, (v4, v6) in expected.items():
        port = ports[form]
        for host, reachable in (("127.0.0.1", v4), ("::1", v6)):
            if reachable:
                assert tcp_ping(host, port, f"{form}-{host}") == f"PONG {form}-{host}"
            else:
                assert refused(host, port), (form, host)
    # a browser that tries ::1 first for localhost reaches the VM's web server, as does one that tries 127.0.0.1
    web = free_port_both()
    client.expose(f"localhost:{web}", f"{VM_IP}:8080")
    assert curl("-g", f"http://[::1]:{web}/page.txt") == token
    assert curl(f"http://127.0.0.1:{web}/page.txt") == token
    client.unexpose(f"localhost:{web}")
    client.expose(locals_["localhost"], f"{VM_IP}:8000")  # an identical repeat is a no-op
    with pytest.raises(GoError, match="already forwarded"):
        client.expose(locals_["all"], f"{VM_IP}:8080")
    listed = client.list()
    assert listed == sorted(listed, key=lambda x: (x["local"], x["protocol"]))
    assert {(x["local"], x["remote"], x["protocol"]) for x in listed} == {
        (local, f"{VM_IP}:8000", "tcp") for local in locals_.values()}
    # the same string removes each; the listeners are gone on every address
    for form, local in locals_.items():
        client.unexpose(local)
        assert refused("127.0.0.1", ports[form]) and refused("::1", ports[form])
        with pytest.raises(GoError, match="not forwarded"):
            client.unexpose(local)
    assert client.list() == []


def test_udp_forwards(vm_servers):
    _hs, _vm, client, _token = vm_servers
    v4, dual, v6 = (free_port_both(socket.SOCK_DGRAM) for _ in range(3))
    client.expose(f"127.0.0.1:{v4}", f"{VM_IP}:8000", "udp")
    client.expose(f":{dual}", f"{VM_IP}:8000", "udp")
    client.expose(f"[::1]:{v6}", f"{VM_IP}:8000", "udp")
    assert udp_echo("127.0.0.1", v4, b"four") == b"four"
    assert udp_echo("127.0.0.1", dual, b"dual-4") == b"dual-4"
    assert udp_echo("::1", dual, b"dual-6") == b"dual-6"
    assert udp_echo("::1", v6, b"six") == b"six"
    # a second forward on a port a UDP forward holds is refused, not shared
    with pytest.raises(GoError, match="cannot listen"):
        client.expose(f"127.0.0.1:{dual}", f"{VM_IP}:8000", "udp")
    assert {(x["local"], x["protocol"]) for x in client.list()} == {
        (f"127.0.0.1:{v4}", "udp"), (f":{dual}", "udp"), (f"[::1]:{v6}", "udp")}
    with pytest.raises(GoError, match="not forwarded"):
        client.unexpose(f":{dual}")  # protocol tcp: another forward
    for local in (f"127.0.0.1:{v4}", f":{dual}", f"[::1]:{v6}"):
        client.unexpose(local, "udp")
    assert client.list() == []
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:  # the port is free again
        s.bind(("::1", v6))


def test_unix_forward(vm_servers, tmp_path):
    hs, _vm, client, token = vm_servers
    path = str(tmp_path / "podman.sock")
    remote = f"tcp://{VM_IP}:8080"
    client.expose(path, remote, "unix")
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert curl("--unix-socket", path, "http://d/page.txt") == token
    assert client.list() == [{"local": path, "remote": remote, "protocol": "unix"}]
    client.expose(path, remote, "unix")  # repeat: no-op
    client.unexpose(path, "unix")
    assert not os.path.exists(path)
    with pytest.raises(GoError, match="not forwarded"):
        client.unexpose(path, "unix")
    # a stale socket file is replaced; a live socket and a non-socket are refused and left alone
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()
    client.expose(path, remote, "unix")
    assert curl("--unix-socket", path, "http://d/page.txt") == token
    live = str(tmp_path / "live.sock")
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(live)
        other.listen()
        with pytest.raises(GoError, match="another process is listening"):
            client.expose(live, remote, "unix")
        assert os.path.exists(live)
    plain = tmp_path / "plain.txt"
    plain.write_text("keep")
    with pytest.raises(GoError, match="not a socket"):
        client.expose(str(plain), remote, "unix")
    assert plain.read_text() == "keep"
    with pytest.raises(GoError, match="ssh-tunnel:// is not supported"):
        client.expose(str(tmp_path / "ssh.sock"), f"ssh-tunnel://core@{VM_IP}:22/run/podman.sock?key=/k", "unix")
    # host-switch removes its socket files when it exits
    assert os.path.exists(path)
    stop(hs.proc)
    assert hs.proc.returncode == 0 and not os.path.exists(path)


def dig(vm, name: str) -> str:
    return vm.run(["dig", "+short", "+time=2", "+tries=2", f"@{GATEWAY}", name, "A"]).stdout.strip()


def dig_status(vm, name: str) -> str:
    out = vm.run(["dig", "+time=2", "+tries=2", f"@{GATEWAY}", name, "A"]).stdout
    return out.split("status: ", 1)[1].split(",", 1)[0]


def test_dns_list_and_add(vm_servers):
    _hs, vm, client, _token = vm_servers
    zones = client.list_dns()
    builtin = {z["Name"]: z for z in zones}
    assert builtin["docker.internal."] == {"Name": "docker.internal.", "DefaultIP": "", "Records": [
        {"Name": "gateway", "IP": GATEWAY}, {"Name": "host", "IP": "192.168.127.254"}]}
    zone = nsutil.unique_name("zone") + ".test."
    client.add_dns(zone, [{"Name": "foo", "IP": "10.11.0.5"}, {"Name": "", "IP": "10.11.0.6", "Regexp": "^db-[0-9]+$"},
                          {"Name": "", "IP": "10.11.0.7", "Regexp": "web"}])
    assert dig(vm, f"foo.{zone}") == "10.11.0.5"
    assert dig(vm, f"db-12.{zone}") == "10.11.0.6"
    assert dig(vm, f"my-web-1.{zone}") == "10.11.0.7"  # Go's MatchString: found anywhere in the name
    assert dig_status(vm, f"dbx.{zone}") == "NXDOMAIN"
    # a zone with only a DefaultIP answers every name in it
    dflt = nsutil.unique_name("dflt") + ".test."
    client.add_dns(dflt, None, "10.11.0.9")
    assert dig(vm, f"anything.{dflt}") == "10.11.0.9"
    # adding to a zone keeps what it had; the new records win; a DefaultIP joins them
    client.add_dns(zone, [{"Name": "foo", "IP": "10.11.0.50"}, {"Name": "bar", "IP": "10.11.0.51"}], "10.11.0.99")
    assert dig(vm, f"foo.{zone}") == "10.11.0.50" and dig(vm, f"bar.{zone}") == "10.11.0.51"
    assert dig(vm, f"db-3.{zone}") == "10.11.0.6" and dig(vm, f"dbx.{zone}") == "10.11.0.99"
    client.add_dns("docker.internal.", [{"Name": "extra", "IP": "10.11.0.8"}])
    assert dig(vm, "extra.docker.internal") == "10.11.0.8" and dig(vm, "host.docker.internal") == "192.168.127.254"
    listed = {z["Name"]: z for z in client.list_dns()}
    assert listed[zone] == {"Name": zone, "DefaultIP": "10.11.0.99", "Records": [
        {"Name": "foo", "IP": "10.11.0.50"}, {"Name": "bar", "IP": "10.11.0.51"},
        {"Name": "", "IP": "10.11.0.6", "Regexp": "^db-[0-9]+$"}, {"Name": "", "IP": "10.11.0.7", "Regexp": "web"}]}
    assert listed[dflt] == {"Name": dflt, "DefaultIP": "10.11.0.9", "Records": []}
    # bad input changes nothing and says why
    for bad, msg in (([{"Name": "x", "IP": ""}], "IPv4"), ([{"IP": "10.0.0.1"}], "Name or a Regexp"),
                     ([{"Name": "", "IP": "10.0.0.1", "Regexp": "("}], "regexp")):
        with pytest.raises(GoError, match=msg):
            client.add_dns(zone, bad)
    assert {z["Name"]: z for z in client.list_dns()}[zone] == listed[zone]
    # rdswitch's own shape stays reachable, and ctl prints the incumbent's
    status, headers, data = client.request("GET", "/services/dns/all?format=rdswitch")
    ours = {z["name"]: z for z in json.loads(data)}
    assert status == 200 and ours[dflt]["default_ip"] == "10.11.0.9" and "records" in ours[zone]
    out = subprocess.run([sys.executable, "-m", "rdswitch.ctl", "--api", f"unix://{client.path}", "dns"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    assert [go_zone(z)["Name"] for z in json.loads(out)] == [z["Name"] for z in client.list_dns()]


def test_errors_are_json(vm_servers):
    _hs, _vm, client, _token = vm_servers
    status, headers, data = client.request("GET", "/no/such/path")
    assert status == 404 and headers["content-type"] == "application/json"
    assert "/no/such/path" in json.loads(data)["error"]
    status, headers, data = client.request("GET", "/services/forwarder/expose")
    assert status == 405 and headers["content-type"] == "application/json" and "POST" in headers["allow"].split(", ")
    assert "use POST" in json.loads(data)["error"]
    status, headers, data = client.request("POST", "/services/dns/all", b"{}")
    assert status == 405 and "GET" in json.loads(data)["error"]
    # pkg/client turns a refusal into an error carrying the body's message
    with pytest.raises(GoError, match="outside the virtual subnet"):
        client.expose("127.0.0.1:1", "10.0.0.1:80")
    status, _headers, data = client.request("POST", "/services/forwarder/expose", b"{nope")
    assert status == 400 and "not valid JSON" in json.loads(data)["error"]
