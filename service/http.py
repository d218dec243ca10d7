"""HTTP beside gRPC (`zspace serve --http-port P`): the same process, handlers, limits and token.

One aiohttp application on the server's event loop serves

- `/v2/...`: KServe v2's HTTP/REST binding (http_kserve.py), tensors as JSON or binary data;
- `/v1/...`: zspace.v1's operations as JSON (http_api.py) and the explorer's map (explorer.py);
- `/openapi.json` (openapi.py) and the web explorer's static files at `/ui/`.

An HTTP request is turned into the RPC's own request message and handed to the
very handler gRPC calls, with an `HttpContext` in place of gRPC's: validation,
batching, the byte budget, metrics and the deadline are the RPC's, and a refusal
comes back as the HTTP status of its gRPC code with a JSON body naming the field
(`{"error": "k: expected 1 to 1000, got 0", "code": "INVALID_ARGUMENT", "field": "k"}`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import ssl
import time
from pathlib import Path

import grpc
from aiohttp import web

from zspace.service.rpc import BUGS, InvalidRequest, safe_message, status_of

# gRPC code -> HTTP status: the mapping Google's API gateways use (grpc-gateway, Cloud Endpoints).
HTTP_STATUS = {
    grpc.StatusCode.OK: 200, grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.FAILED_PRECONDITION: 400, grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DATA_LOSS: 500,
}
CODE_OF_STATUS = {404: grpc.StatusCode.NOT_FOUND, 405: grpc.StatusCode.UNIMPLEMENTED,
                  413: grpc.StatusCode.RESOURCE_EXHAUSTED, 415: grpc.StatusCode.INVALID_ARGUMENT}
# An error message that starts with a field path ("inputs.images[2]: not a PNG"): the body's `field`.
FIELD = re.compile(r"^([A-Za-z_][\w-]*(?:\[\d+\])?(?:\.[A-Za-z_][\w-]*(?:\[\d+\])?)*): ")
OPEN_PATHS = ("/v2/health/", "/ui", "/openapi.json", "/favicon.ico")  # no token: probes, static files, the API's shape
THREAD_BYTES = 64 << 10  # bodies bigger than this are parsed (and answers built) off the event loop
UI_FOLDER = Path(__file__).resolve().parent / "ui"


class HttpError(Exception):
    """A refusal with its gRPC code: what `HttpContext.abort` raises where gRPC's would end the call."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class HttpContext:
    """What an RPC handler asks of gRPC's ServicerContext, for a call that came over HTTP."""

    def __init__(self, request: web.Request, timeout_s: float | None = None):
        self.request = request
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s

    async def abort(self, code: grpc.StatusCode, message: str):
        raise HttpError(code, message)

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def peer(self) -> str:
        """gRPC's form of the client's address ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000"), which
        shared_memory.check_sharing reads."""
        info = self.request.transport.get_extra_info("peername") if self.request.transport else None
        if not info:
            return "unknown"
        if isinstance(info, str):
            return f"unix:{info}"
        host, port = info[0], info[1]
        return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


async def call(handler, message, request: web.Request, timeout_s: float | None = None):
    """Run one RPC handler (a bound `@rpc` method) on `message`; its answer, or HttpError with its code."""
    return await handler(message, HttpContext(request, timeout_s))


def error_response(code: grpc.StatusCode, message: str, headers: dict | None = None,
                   status: int | None = None) -> web.Response:
    """The JSON error body; the status is the gRPC code's, unless HTTP itself refused (`status`: 405, 413)."""
    body = {"error": message, "code": code.name}
    if m := FIELD.match(message):
        body["field"] = m.group(1)
    return web.json_response(body, status=status or HTTP_STATUS.get(code, 500), headers=headers)


async def off_loop(size: int, fn, *args):
    """fn(*args) in a thread when `size` bytes of content make it slow, else here: nothing that grows with a
    request's content runs on the event loop (docs/architecture.md, the service)."""
    if size > THREAD_BYTES:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


async def read_json(request: web.Request):
    """The request's body as JSON (an empty body is {}); INVALID_ARGUMENT naming the problem otherwise."""
    body = await request.read()
    if not body.strip():
        return {}
    try:
        return await off_loop(len(body), json.loads, body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"body: not valid JSON ({exc})") from None
    except RecursionError:  # json's parser recurses per level: [[[[...]]]] a few thousand deep
        raise InvalidRequest("body: JSON nested too deeply") from None


def json_answer(value, status: int = 200) -> web.Response:
    """A JSON response; NaN and infinities (never produced on purpose) become null rather than invalid JSON."""
    try:
        text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    except ValueError:
        text = json.dumps(_finite(value), separators=(",", ":"))
    return web.Response(text=text, status=status, content_type="application/json")


def _finite(value):
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


async def json_off_loop(value, size: int) -> web.Response:
    """json_answer, built in a thread when the answer is big (`size`: its rough byte count)."""
    return await off_loop(size, json_answer, value)


def middlewares(token: str | None, max_concurrent: int | None):
    """Errors as JSON with the gRPC code's status, the bearer token, and the bound on requests in progress."""
    expected = f"Bearer {token}".encode() if token else None
    in_progress = 0

    @web.middleware
    async def guard(request: web.Request, handler):
        nonlocal in_progress
        if expected is not None and not request.path.startswith(OPEN_PATHS) and request.path != "/":
            got = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(got, expected):
                return error_response(grpc.StatusCode.UNAUTHENTICATED,
                                      "missing or wrong bearer token (header 'Authorization: Bearer TOKEN')",
                                      {"WWW-Authenticate": 'Bearer realm="zspace"'})
        if max_concurrent is not None and in_progress >= max_concurrent:
            return error_response(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"server busy: {in_progress} requests in progress (limit {max_concurrent}); retry later")
        in_progress += 1
        try:
            return await handler(request)
        except HttpError as exc:
            return error_response(exc.code, safe_message(exc.message))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = CODE_OF_STATUS.get(exc.status, grpc.StatusCode.INVALID_ARGUMENT)
            reason = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
            if exc.status == 413:
                reason = f"body: {reason} (the limit is --max-message-mb)"
            elif exc.status == 404:
                reason = f"{request.path}: no such endpoint (see /openapi.json)"
            elif exc.status == 405:
                reason = f"{request.method} {request.path}: method not allowed here (see /openapi.json)"
            return error_response(code, safe_message(reason), status=exc.status)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            code, message = status_of(exc)
            if code is grpc.StatusCode.INTERNAL:
                BUGS.report(f"HTTP {request.method} {request.path}", exc)
                message = f"{request.method} {request.path}: internal error (logged on the server)"
            return error_response(code, safe_message(message))
        finally:
            in_progress -= 1

    return [guard]


def ssl_context(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    if not cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))
    return context


async def ui_index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(UI_FOLDER / "index.html", headers={"Cache-Control": "no-cache"})


async def root(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/ui/")


def build_app(parts, token: str | None, max_body: int, max_concurrent: int | None) -> web.Application:
    """The application: every part's routes (each part has `routes() -> list[web.RouteDef]`), the UI, the docs."""
    app = web.Application(client_max_size=max_body, middlewares=middlewares(token, max_concurrent))
    for part in parts:
        app.add_routes(part.routes())
    app.add_routes([web.get("/", root), web.get("/ui", root), web.get("/ui/", ui_index)])
    app.router.add_static("/ui/", UI_FOLDER, append_version=False)
    return app


class HttpServer:
    """The HTTP listener of one server process; `start` binds (SO_REUSEPORT among workers), `stop` drains."""

    def __init__(self, app: web.Application, host: str, port: int, shares_port: bool, tls: ssl.SSLContext | None,
                 grace_s: float = 10.0):
        self.app, self.host, self.port, self.shares_port, self.tls = app, host, port, shares_port, tls
        self.grace_s = grace_s
        self.runner: web.AppRunner | None = None

    async def start(self) -> int:
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=self.grace_s)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port, ssl_context=self.tls, reuse_port=self.shares_port or None,
                           backlog=1024)
        await site.start()
        self.port = self.runner.addresses[0][1]  # port 0 made concrete
        return self.port

    async def stop(self) -> None:
        """Stop listening; requests in progress get the grace period to finish."""
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
