"""The HTTP API (docs/api.md): port forwarding, DHCP leases, DNS zones, stats.

Served by hypercorn on any trio listener: the virtual listener on gateway:80
inside the network, and optionally a host socket (``--api-listen``).
Hypercorn serves a custom stream only through its internal ``TCPServer``,
which needs ``stream.socket`` with ``family``/``getpeername``/``getsockname``
(our virtual streams have it).
"""

from __future__ import annotations

import json
import logging

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
from ..config import ConfigError, format_mac
from ..services.forwarder import parse_expose, parse_unexpose
from .forwarder import ForwardError

log = logging.getLogger("rdswitch.api")


def _error(message: str, status: int = 400) -> Response:
    return Response(json.dumps({"error": message}) + "\n", status=status, content_type="application/json")


def _json(value, status: int = 200) -> Response:
    return Response(json.dumps(value) + "\n", status=status, content_type="application/json")


async def _body():
    raw = await request.get_data()
    if len(raw) > 65536:
        raise ConfigError("body too large")
    try:
        return json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"body is not valid JSON: {exc}") from None


def create_app(hs, forwarder, dns=None) -> QuartTrio:
    app = QuartTrio("rdswitch")
    net = hs.net

    def caller_ip() -> str | None:
        addr = request.remote_addr
        return addr if addr and addr.count(".") == 3 else None

    async def change(apply) -> Response:
        """Parse the body and apply a forward change; errors become 400/404/409 with a message."""
        try:
            await apply(await _body())
        except ConfigError as exc:
            return _error(str(exc))
        except ForwardError as exc:
            return _error(str(exc), exc.status)
        return Response("", status=200)

    @app.post("/services/forwarder/expose")
    async def expose():
        return await change(lambda body: forwarder.expose(parse_expose(body, caller_ip(), net.subnet)))

    @app.post("/services/forwarder/unexpose")
    async def unexpose():
        return await change(lambda body: forwarder.unexpose(parse_unexpose(body)))

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
        try:
            body = await _body()
            if not isinstance(body, dict):
                raise ConfigError("body must be a JSON object")
            if {"zone", "name", "ip"} & body.keys():  # ours: one record, answered with its zone
                return _json(dns.add_record(body.get("zone"), body.get("name"), body.get("ip")))
            dns.add_zone(body)  # pkg/client's AddDNS: a types.Zone, answered like the incumbent (200, no body)
        except ConfigError as exc:
            return _error(str(exc))
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
        return _json(out)

    return app


class ApiServer:
    """Hypercorn's per-connection server over any trio listener."""

    def __init__(self, app) -> None:
        self.app = ASGIWrapper(app)
        self.config = Config()
        self.config.keep_alive_timeout = 30
        self.config.accesslog = None
        self.context = WorkerContext(None)

    async def serve(self, listener: trio.abc.Listener) -> None:
        """Serve a host listener (``--api-listen``) until cancelled."""
        async with listener, trio.open_nursery() as nursery:
            await accept_loop(listener, self.connection, nursery, "API", log)

    async def connection(self, stream) -> None:
        """Serve one connection (a host socket's, or a VM's on gateway:80 in its session nursery)."""
        try:
            await TCPServer(self.app, self.config, self.context, ConnectionState({}), stream)
        except Exception as exc:  # noqa: BLE001 - one connection never ends the API
            log.debug("API connection ended: %s", exc)
        finally:
            # hypercorn may skip the EOF on Connection: close; make sure the stream is closed
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await stream.aclose()
