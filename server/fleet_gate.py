"""The coordinating site's public port: only Flower's Fleet API gets through.

    python -m server.fleet_gate --listen 0.0.0.0:9092 --upstream 127.0.0.1:PORT --certs DIR
    python -m server.fleet_gate --listen 127.0.0.1:9092 --upstream 127.0.0.1:PORT --insecure

Flower 1.41's SuperLink serves its Fleet API (SuperNodes), its Control API
(the ``flwr`` CLI: list and register nodes, submit and stop runs; no login in
the open-source build) and its Runtime API (the ServerApp and SuperExec claim
and run tasks) on one HTTP(S) port, and has no option to serve them apart.
So the ``server`` command binds the SuperLink to a loopback port and runs
this gate on the public ``--host``/``--port``. The gate answers ``404``
itself to anything but ``POST`` on one of the Fleet API paths below, and
forwards those requests (body and headers, the SuperNode's signed identity
headers included) to the loopback SuperLink and its answer back unchanged.

With TLS the gate presents the site's ``server.crt`` (the certificate the
SuperLink would present) and checks the loopback SuperLink's certificate
against ``ca.crt``; ``--insecure`` is plain HTTP on both legs.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

FLEET_PATHS = frozenset({
    "/v1/fleet/register-node",
    "/v1/fleet/activate-node",
    "/v1/fleet/deactivate-node",
    "/v1/fleet/unregister-node",
    "/v1/fleet/send-node-heartbeat",
    "/v1/fleet/pull-messages",
    "/v1/fleet/push-messages",
    "/v1/fleet/get-run",
    "/v1/fleet/get-fab",
    "/v1/fleet/push-object",
    "/v1/fleet/pull-object",
    "/v1/fleet/confirm-message-received",
})
"""Every route of Flower 1.41's Fleet API (``flwr/superlink/routers/fleet/router.py``),
all ``POST``: the only requests that reach the SuperLink from the network."""

MAX_BODY_BYTES = 64 * 1024 * 1024
"""Largest request body forwarded (bytes); Flower sends arrays in 5 MB chunks."""
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
"""Longer than a SuperNode waits for one call (30 s), so the node times out first."""
KEEPALIVE_S = 2.0
"""Idle loopback connections are dropped before the SuperLink's uvicorn drops them (5 s)."""
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length",
    "forwarded", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-real-ip",
})
"""Request headers not passed on: per-connection ones, and proxy headers a caller
could forge (the SuperLink's uvicorn trusts them from 127.0.0.1, i.e. the gate)."""
ANSWER_HEADERS_DROPPED = frozenset({
    "connection", "keep-alive", "transfer-encoding", "upgrade", "date", "server",
    "content-length",
})
"""Answer headers the gate's own server sets (the SuperLink's body is passed unchanged)."""
NOT_SERVED = {"detail": "Not Found: this port serves only Flower's Fleet API (SuperNodes)"}

log = logging.getLogger("medfed.gate")


def upstream_ssl(ca: Path) -> ssl.SSLContext:
    """TLS context that trusts only the federation's CA (hostname checked)."""
    return ssl.create_default_context(cafile=str(ca))


def _request_headers(request: Request) -> list[tuple[str, str]]:
    """The caller's headers minus hop-by-hop and proxy ones, plus its address."""
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
    if request.client is not None:
        headers.append(("x-forwarded-for", request.client.host))
    return headers


async def _body(request: Request) -> bytes | None:
    """The request body, or None when it exceeds :data:`MAX_BODY_BYTES`."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def _answer(client: httpx.AsyncClient, upstream: httpx.Request) -> Response:
    """Send ``upstream`` and return the SuperLink's answer byte for byte (read in full)."""
    try:
        answer = await client.send(upstream, stream=True)
        try:
            body = b"".join([chunk async for chunk in answer.aiter_raw()])
        finally:
            await answer.aclose()
    except httpx.TimeoutException:
        return JSONResponse({"detail": "the SuperLink did not answer in time"}, status_code=504)
    except httpx.TransportError as err:
        log.warning("[MedFed] gate: SuperLink unreachable: %s", err)
        return JSONResponse({"detail": "the SuperLink is not reachable"}, status_code=502)
    response = Response(body, status_code=answer.status_code)
    response.raw_headers = [
        *((k.encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers.multi_items()
          if k.lower() not in ANSWER_HEADERS_DROPPED),
        (b"content-length", str(len(body)).encode()),
    ]
    return response


async def forward(request: Request, path: str) -> Response:
    """Pass one Fleet API call (``POST path``) to the SuperLink and its answer back unchanged.

    Returns 413 for a body over :data:`MAX_BODY_BYTES`, 502 when the SuperLink
    cannot be reached and 504 when it does not answer in time (SuperNodes
    retry both, as they do when the SuperLink itself is down).
    """
    try:
        body = await _body(request)
    except ClientDisconnect:
        return Response(status_code=400)
    if body is None:
        return JSONResponse({"detail": "request body too large"}, status_code=413)
    client: httpx.AsyncClient = request.app.state.upstream
    return await _answer(client, client.build_request(
        "POST", path, content=body, headers=_request_headers(request)))


async def refuse(request: Request) -> Response:
    """Answer 404 to every request that is not a Fleet API call, logging who asked."""
    peer = f"{request.client.host}:{request.client.port}" if request.client else "?"
    log.warning("[MedFed] gate: refused %s %s from %s (only the Fleet API is served here)",
                request.method, request.url.path[:200], peer)
    return JSONResponse(NOT_SERVED, status_code=404)


class _Gate:
    """ASGI endpoint for every path and method: Fleet API calls on, the rest refused."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        path = scope["path"]
        allowed = scope["method"] == "POST" and path in FLEET_PATHS
        response = await (forward(request, path) if allowed else refuse(request))
        await response(scope, receive, send)


async def _refused(request: Request, _exc: Exception) -> Response:
    return await refuse(request)


def create_app(upstream: str, verify: ssl.SSLContext | bool) -> Starlette:
    """The gate as an ASGI app.

    Args:
        upstream: base URL of the loopback SuperLink, e.g. ``https://127.0.0.1:40123``.
        verify: TLS context checking the SuperLink's certificate; False for plain HTTP.
    """
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        timeout = httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
        async with httpx.AsyncClient(base_url=upstream, verify=verify, timeout=timeout,
                                     limits=httpx.Limits(keepalive_expiry=KEEPALIVE_S),
                                     trust_env=False) as client:
            app.state.upstream = client
            yield

    # One route matching every path: the allow-list check is the set membership above
    app = Starlette(routes=[Route("/{path:path}", _Gate())], lifespan=lifespan)
    app.add_exception_handler(404, _refused)  # a request target that is not a path
    return app


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def main(argv: list[str]) -> int:
    """Command line: serve until SIGTERM / Ctrl-C; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m server.fleet_gate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", type=_host_port, required=True,
                        help="public HOST:PORT the hospitals dial")
    parser.add_argument("--upstream", type=_host_port, required=True,
                        help="loopback HOST:PORT of the SuperLink")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--certs", type=Path,
                      help="server/ folder from server.provision (ca.crt, server.crt, server.key)")
    mode.add_argument("--insecure", action="store_true", help="plain HTTP (a local test only)")
    args = parser.parse_args(argv)
    (host, port), (up_host, up_port) = args.listen, args.upstream
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per forwarded call
    tls: dict[str, str] = {}
    verify: ssl.SSLContext | bool = False
    if args.certs is not None:
        folder = args.certs.resolve()
        tls = {"ssl_certfile": str(folder / "server.crt"),
               "ssl_keyfile": str(folder / "server.key")}
        verify = upstream_ssl(folder / "ca.crt")
    scheme = "http" if args.insecure else "https"
    app = create_app(f"{scheme}://{up_host}:{up_port}", verify)
    log.info("[MedFed] gate: %s://%s:%d -> %s://%s:%d (Fleet API only)",
             scheme, host, port, scheme, up_host, up_port)
    uvicorn.run(app, host=host, port=port, access_log=False, log_level="warning",
                proxy_headers=False, server_header=False, **tls)  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
