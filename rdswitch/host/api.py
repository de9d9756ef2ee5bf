"""The HTTP API (docs/api.md): port forwarding, DHCP leases, DNS zones, stats.

Served by hypercorn on any trio listener: the virtual listener on gateway:80
inside the network, and optionally a host socket (``--api-listen``).
Hypercorn serves a custom stream only through its internal ``TCPServer``,
which needs ``stream.socket`` with ``family``/``getpeername``/``getsockname``
(our virtual streams have it).

Two callers, two powers: a connection from a host socket is the host and may
do everything; a connection on gateway:80 is the VM whose session carries it
(its source IP, as long as that IP is a lease of that session), and what it
asks goes through the VM policy (``services/policy.py``, the ``--vm-*``
flags) first.  Each refusal is answered with ``{"error", "reason"}``, counted
per reason in ``/stats`` and logged (rate-limited).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
from typing import Callable, Mapping

import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from ..aio.tasks import accept_loop
from ..config import ConfigError, NetConfig, format_mac
from ..services.forwarder import parse_expose, parse_unexpose
from ..services.policy import (
    HOST, REASONS, Caller, PolicyRefused, Refusal, RefusalLog, State, VmPolicy, check_dns_add, check_expose,
    check_unexpose, parse_expose_addresses, parse_limit, parse_port_ranges, parse_unix_dir, unix_location,
)
from .forwarder import ForwardError

log = logging.getLogger("rdswitch.api")


def _error(message: str, status: int = 400) -> Response:
    return Response(json.dumps({"error": message}) + "\n", status=status, content_type="application/json")


def _json(value, status: int = 200) -> Response:
    return Response(json.dumps(value) + "\n", status=status, content_type="application/json")


MAX_BODY = 65536


async def _body():
    raw = await request.get_data()
    if len(raw) > MAX_BODY:
        raise ConfigError("body too large")
    try:
        return json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"body is not valid JSON: {exc}") from None


#: the ASGI scope key that says who is calling (set per connection by ApiServer; no key: nobody may do anything)
CALLER = "rdswitch.caller"


def create_app(hs, forwarder, dns=None, *, policy: VmPolicy | None = None,
               leases: Callable[[], Mapping[str, int | None]] | None = None) -> QuartTrio:
    """The API app.  ``policy`` rules what a VM may ask (default: the flags' defaults); ``leases`` says which
    session holds each DHCP lease (default: the host-switch's switch and DHCP server)."""
    app = QuartTrio("rdswitch")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY  # refused while it arrives, not after 16 MiB are buffered
    net = hs.net
    policy = policy if policy is not None else VmPolicy(net)
    holders = leases if leases is not None else hs.lease_holders
    refused_counts: collections.Counter[str] = collections.Counter(dict.fromkeys(REASONS, 0))
    refusal_log = RefusalLog()

    def who() -> Caller:
        return request.scope[CALLER]  # KeyError (500) if a server forgot to say: fail closed

    def state() -> State:
        return State(holders(), forwarder.owners())

    def refused(refusal: Refusal, caller: Caller) -> Response:
        refused_counts[refusal.reason] += 1
        logged, skipped = refusal_log.allow(trio.current_time())
        if logged:
            more = f" ({skipped} more refusals were not logged)" if skipped else ""
            log.warning("refused %s %s from VM %s (session %s): %s: %s%s", request.method, request.path, caller.ip,
                        caller.session, refusal.reason, refusal.message, more)
        return _json(refusal.as_json(), refusal.status)

    async def change(apply) -> Response:
        """Parse the body and apply a change; errors become 4xx with a message (a policy's with its reason)."""
        caller = who()
        try:
            await apply(await _body(), caller)
        except ConfigError as exc:
            return _error(str(exc))
        except ForwardError as exc:
            return _error(str(exc), exc.status)
        except PolicyRefused as exc:
            return refused(exc.refusal, caller)
        return Response("", status=200)

    async def do_expose(body, caller: Caller) -> None:
        fwd = parse_expose(body, caller.ip, net.subnet)
        if caller.is_host:
            await forwarder.expose(fwd)
            return

        def admit() -> Refusal | None:
            return check_expose(fwd, caller, policy, state())

        refusal = admit()  # before anything is bound or created on the host
        if refusal is not None:
            raise PolicyRefused(refusal)
        within = unix_location(fwd.local_host, policy) if fwd.protocol == "unix" else None
        await forwarder.expose(fwd, caller, admit=admit, within=within)

    async def do_unexpose(body, caller: Caller) -> None:
        key = parse_unexpose(body)
        await forwarder.unexpose(key, None if caller.is_host else
                                 lambda owner: check_unexpose(owner, key, caller, holders()))

    @app.post("/services/forwarder/expose")
    async def expose():
        return await change(do_expose)

    @app.post("/services/forwarder/unexpose")
    async def unexpose():
        return await change(do_unexpose)

    @app.get("/services/forwarder/all")
    async def forwards():
        return _json(forwarder.all())

    @app.get("/services/dhcp/leases")
    @app.get("/leases")  # gvproxy serves it at both paths
    async def leases():
        return _json(hs.dhcp.leases())

    @app.get("/cam")
    async def cam():
        """gvproxy's /cam: each VM MAC the switch has learnt -> its connection (session) id."""
        return _json({format_mac(mac): session.id for mac, session in sorted(hs.vm_macs().items())})

    @app.get("/services/dns/all")
    async def dns_all():
        # gvisor-tap-vsock's []types.Zone (what pkg/client's ListDNS decodes); ?format=rdswitch: the zone file's shape
        if dns is None:
            return _json([])
        return _json(dns.all_zones() if request.args.get("format") == "rdswitch" else dns.incumbent_zones())

    @app.post("/services/dns/add")
    async def dns_add():
        if dns is None:
            return _error("DNS is not enabled", 404)
        caller = who()
        admit = None if caller.is_host else (lambda req: check_dns_add(req, caller, policy, holders(), dns.vm_state()))
        try:
            body = await _body()
            if not isinstance(body, dict):
                raise ConfigError("body must be a JSON object")
            if {"zone", "name", "ip"} & body.keys():  # ours: one record, answered with its zone
                return _json(dns.add_record(body.get("zone"), body.get("name"), body.get("ip"), caller, admit))
            dns.add_zone(body, caller, admit)  # pkg/client's AddDNS: a types.Zone, answered like the incumbent
        except ConfigError as exc:
            return _error(str(exc))
        except PolicyRefused as exc:
            return refused(exc.refusal, caller)
        return Response("", status=200)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException):
        """Unknown paths (404), wrong methods (405, with Allow) and the like answer JSON, not HTML."""
        if exc.code == 404:
            message = f"no such API path: {request.path}"
        elif exc.code == 405:
            allowed = ", ".join(sorted(m for m in (exc.valid_methods or ()) if m not in ("HEAD", "OPTIONS")))
            message = f"{request.method} is not allowed on {request.path}" + (f"; use {allowed}" if allowed else "")
        else:
            message = exc.description or exc.name
        response = _error(message, exc.code or 500)
        for name, value in exc.get_headers():
            if name.lower() == "allow":
                response.headers[name] = value
        return response

    @app.get("/stats")
    async def stats():
        out = hs.stats()
        if dns is not None:
            out["dns"] = dict(dns.stats)
        out["vm_policy"] = {"refused": dict(refused_counts)}
        return _json(out)

    return app


def session_ended(forwarder, dns, policy: VmPolicy, session: int) -> None:
    """What a VM made through the API goes with its session, unless --vm-forwards-outlive-session."""
    forwarder.session_ended(session, policy.forwards_outlive_session)
    if dns is not None:
        dns.session_ended(session, policy.forwards_outlive_session)


class _WithCaller:
    """The app, with who is calling in every request's scope."""

    def __init__(self, app, caller: Caller) -> None:
        self.app = app
        self.caller = caller

    async def __call__(self, scope, receive, send) -> None:
        await self.app({**scope, CALLER: self.caller}, receive, send)


class ApiServer:
    """Hypercorn's per-connection server over any trio listener."""

    def __init__(self, app) -> None:
        self.app = app
        self.config = Config()
        self.config.keep_alive_timeout = 30
        self.config.accesslog = None
        self.context = WorkerContext(None)

    async def serve(self, listener: trio.abc.Listener) -> None:
        """Serve a host listener (``--api-listen``) until cancelled: every connection is the host."""
        async with listener, trio.open_nursery() as nursery:
            await accept_loop(listener, self._host_connection, nursery, "API", log)

    async def _host_connection(self, stream) -> None:
        await self._serve(stream, HOST)

    async def connection(self, stream) -> None:
        """A VM's connection on gateway:80 (in its session nursery): the caller is its session and source IP."""
        info = getattr(stream, "socket", None)
        session = getattr(info, "session", None)
        ip = info.getpeername()[0] if session is not None else "unknown"  # no session: matches no lease
        await self._serve(stream, Caller(ip, session))

    async def _serve(self, stream, caller: Caller) -> None:
        try:
            await TCPServer(ASGIWrapper(_WithCaller(self.app, caller)), self.config, self.context,
                            ConnectionState({}), stream)
        except Exception as exc:  # noqa: BLE001 - one connection never ends the API
            log.debug("API connection ended: %s", exc)
        finally:
            # hypercorn may skip the EOF on Connection: close; make sure the stream is closed
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await stream.aclose()


# ---- the VM policy's flags (host-switch; also meant for other front ends of the same API) ------------------


def add_vm_policy_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what a VM may ask (the API on gateway:80; the host's --api-listen may do everything)")
    g.add_argument("--vm-expose-address", action="append", default=[], metavar="ADDR",
                   help="a host address a VM may listen on (repeatable): an IP, a CIDR, or 'any'; 0.0.0.0 or :: "
                        "covers every address of its family; default: 127.0.0.1 and ::1")
    g.add_argument("--vm-expose-ports", default="1024-65535", metavar="RANGES",
                   help="host ports a VM may listen on, e.g. 1024-65535 or 80,443,8000-9000 (default: %(default)s)")
    g.add_argument("--vm-expose-unix-dir", action="append", default=[], metavar="DIR",
                   help="a VM may create unix sockets below DIR (repeatable; the path is resolved without following "
                        "symlinks, an existing file is never replaced); default: none")
    g.add_argument("--vm-expose-cross-vm", action="store_true",
                   help="a VM may forward to another VM's lease, not only to its own")
    g.add_argument("--vm-max-forwards", default="256", metavar="N",
                   help="live forwards per VM (default: %(default)s; beyond it: 429)")
    g.add_argument("--vm-forwards-outlive-session", action="store_true",
                   help="keep a VM's forwards and DNS records when its session ends (default: they go, logged)")
    g.add_argument("--vm-max-dns-records", default="64", metavar="N",
                   help="DNS records per VM added through the API (default: %(default)s; beyond it: 429)")


def vm_policy_from_args(args: argparse.Namespace, net: NetConfig) -> VmPolicy:
    """The VM policy from the flags; ConfigError (one line) for a bad value, before anything starts."""
    defaults = VmPolicy(net)
    dirs: list[str] = []
    for text in args.vm_expose_unix_dir:
        given = parse_unix_dir(text)
        if not hasattr(os, "O_PATH"):
            raise ConfigError("--vm-expose-unix-dir: unix forwards from a VM need Linux")
        if not os.path.isdir(given):
            raise ConfigError(f"--vm-expose-unix-dir {text!r}: not a directory")
        real = os.path.realpath(given)
        if real == "/":
            raise ConfigError(f"--vm-expose-unix-dir {text!r} is the root directory: grant a directory of its own")
        dirs += [d for d in (given, real) if d not in dirs]
    return VmPolicy(
        net,
        parse_expose_addresses(args.vm_expose_address) or defaults.addresses,
        parse_port_ranges(args.vm_expose_ports),
        tuple(dirs),
        args.vm_expose_cross_vm,
        parse_limit(args.vm_max_forwards, "--vm-max-forwards"),
        args.vm_forwards_outlive_session,
        parse_limit(args.vm_max_dns_records, "--vm-max-dns-records"),
    )
