"""rdswitch ctl: a command-line client for the host-switch's HTTP API.

    python -m rdswitch.ctl --api unix:///run/rdswitch-api.sock expose 127.0.0.1:8080 192.168.127.2:80
    python -m rdswitch.ctl --api unix:///run/rdswitch-api.sock unexpose 127.0.0.1:8080
    python -m rdswitch.ctl --api tcp://127.0.0.1:9000 list | leases | dns | stats

Prints the API's JSON answer (or nothing on success of expose/unexpose);
exits 1 with the API's error message when it refuses.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys

from ..config import ConfigError
from ..urls import parse_url


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def connection(url: str, timeout: float) -> http.client.HTTPConnection:
    ep = parse_url(url)
    if ep.scheme == "unix":
        return _UnixHTTPConnection(ep.path, timeout)
    if ep.scheme == "tcp":
        return http.client.HTTPConnection(ep.host, ep.port, timeout=timeout)
    raise ConfigError(f"--api {url!r}: use unix:///path or tcp://HOST:PORT")


def call(url: str, method: str, path: str, body=None, timeout: float = 10.0) -> tuple[int, str]:
    conn = connection(url, timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8", "replace")
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rdswitch.ctl", description=__doc__.splitlines()[0])
    p.add_argument("--api", required=True, metavar="URL", help="the host-switch's --api-listen URL")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("expose", help="forward LOCAL on the host to REMOTE in the VM")
    e.add_argument("local", help="IP:PORT on the host, e.g. 127.0.0.1:8080")
    e.add_argument("remote", help="IP:PORT in the VM, e.g. 192.168.127.2:80")
    e.add_argument("--udp", action="store_true")
    u = sub.add_parser("unexpose", help="stop forwarding LOCAL")
    u.add_argument("local")
    u.add_argument("--udp", action="store_true")
    for name, help_ in (("list", "the forwards"), ("leases", "DHCP leases"), ("dns", "DNS zones"), ("stats", "counters")):
        sub.add_parser(name, help=help_)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    proto = "udp" if getattr(args, "udp", False) else "tcp"
    requests = {
        "expose": ("POST", "/services/forwarder/expose", {"local": getattr(args, "local", None),
                                                         "remote": getattr(args, "remote", None), "protocol": proto}),
        "unexpose": ("POST", "/services/forwarder/unexpose", {"local": getattr(args, "local", None), "protocol": proto}),
        "list": ("GET", "/services/forwarder/all", None),
        "leases": ("GET", "/services/dhcp/leases", None),
        "dns": ("GET", "/services/dns/all", None),
        "stats": ("GET", "/stats", None),
    }
    method, path, body = requests[args.cmd]
    try:
        status, text = call(args.api, method, path, body)
    except ConfigError as exc:
        p.error(str(exc))
    except OSError as exc:
        print(f"error: cannot reach the API at {args.api}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        try:
            message = json.loads(text).get("error", text)
        except (ValueError, AttributeError):
            message = text
        print(f"error ({status}): {message.strip()}", file=sys.stderr)
        return 1
    if text.strip():
        print(json.dumps(json.loads(text), indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
