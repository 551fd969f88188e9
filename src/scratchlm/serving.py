"""What every scratchlm HTTP server shares: API keys and their constant-time check, the safe-bind rule, and
the limits that keep a hostile or careless client from taking a server down.

In front of each app sits ``Guard`` (ASGI): the key is checked first, before a byte of a body is read; then
the URL length and the body size are bounded (414, 413). Under the app, uvicorn runs ``guarded_protocol``: a
connection must send a complete request head within ``header_timeout_s`` (against clients that send headers a
byte at a time and hold a file descriptor each), and no more than ``max_connections`` are held at once.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .config import ConfigBase, ConfigError, Count, Port, Positive

API_KEY_ENV = "SCRATCHLM_API_KEY"
PUBLIC_PATHS = frozenset({"/health"})
"""Routes that answer without a key (a load balancer's health check)."""
MAX_URL_BYTES = 4096


LOOPBACK = "127.0.0.1"
"""Where servers listen unless told otherwise: this machine only."""


class ServerConfig(ConfigBase):
    """Where a server listens, the key it asks for, and its limits."""

    host: str = LOOPBACK
    """Address to bind. Anything but loopback needs an API key."""
    port: Port = 8000
    """TCP port."""
    api_key_file: str | None = None
    """File holding the API key (else $SCRATCHLM_API_KEY; never on the command line)."""
    header_timeout_s: Positive = 10.0
    """A connection that has not sent a complete request head in this many seconds is closed."""
    max_connections: Count = 256
    """Connections held at once; more are closed as they arrive (bounds the file descriptors a client can
    take)."""

    def checked_key(self, what: str) -> str | None:
        """The API key, after refusing a bind beyond this machine without one."""
        api_key = read_api_key(self.api_key_file)
        check_bind(self.host, api_key, what)
        return api_key

    def uvicorn_config(self, app, log_level: str = "info", port: int | None = None):
        """The one way every scratchlm server is run, in the foreground (``run_server``) or in a thread
        (``BackgroundServer``): these settings' address and limits, our guarded protocol."""
        import uvicorn

        return uvicorn.Config(app, host=self.host, port=self.port if port is None else port,
                              http=guarded_protocol(self.header_timeout_s, self.max_connections),
                              h11_max_incomplete_event_size=16384, log_level=log_level)


def run_server(app, cfg: ServerConfig) -> None:
    """Serve ``app`` in the foreground with ``cfg``'s address and limits, until interrupted."""
    import uvicorn

    uvicorn.Server(cfg.uvicorn_config(app)).run()


def _checked(key: str, where: str) -> str:
    if not key.isascii() or not key.isprintable():
        raise ConfigError(f"the API key in {where} holds characters other than printable ASCII: an HTTP "
                          "header cannot carry them, so no request could ever match it. Use letters, digits "
                          "and punctuation (e.g. openssl rand -hex 16)")
    return key


def read_api_key(key_file: str | None) -> str | None:
    """The API key from a file or $SCRATCHLM_API_KEY (never the command line); None when neither is set."""
    if key_file:
        try:
            key = Path(key_file).read_text(encoding="utf-8").strip()
        except OSError as err:
            raise ConfigError(f"cannot read API key file {key_file}: {err.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"API key file {key_file} is not text (UTF-8)") from None
        if not key:
            raise ConfigError(f"API key file {key_file} is empty")
        return _checked(key, f"file {key_file}")
    key = os.environ.get(API_KEY_ENV) or None
    return _checked(key, f"${API_KEY_ENV}") if key is not None else None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None, what: str) -> None:
    """Refuse to expose a server beyond this machine without a key."""
    if api_key is None and not is_loopback(host):
        raise ConfigError(f"refusing to bind {host} without an API key: anyone who can reach it could use "
                          f"the {what}. Set {API_KEY_ENV} or pass --api-key-file, or bind 127.0.0.1")


def key_matches(headers: list[tuple[bytes, bytes]], api_key: str) -> bool:
    """``Authorization: Bearer KEY``, compared in constant time."""
    value = next((v for k, v in headers if k == b"authorization"), b"")
    scheme, _, token = value.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token, api_key.encode())


async def _reply(send, status: int, detail: str, headers: list | None = None) -> None:
    """A JSON error answer, ``{"detail": ...}``, as the apps' own errors are."""
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware: the key first (401 without reading the body), then the URL (414) and body (413)
    limits; the body is read here, up to its limit, and handed to the app."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int,
                 max_url_bytes: int = MAX_URL_BYTES) -> None:
        self.app, self.api_key = app, api_key
        self.max_body_bytes, self.max_url_bytes = max_body_bytes, max_url_bytes

    def _refusal(self, scope) -> tuple[int, str, list] | None:
        """Why a request is refused before its body is read, if it is: (status, message, headers)."""
        if len(scope.get("raw_path", b"")) + len(scope.get("query_string", b"")) > self.max_url_bytes:
            return 414, f"URL longer than {self.max_url_bytes} bytes", []
        if (self.api_key is not None and scope["path"] not in PUBLIC_PATHS
                and not key_matches(scope["headers"], self.api_key)):
            return 401, "missing or wrong API key (Authorization: Bearer KEY)", [(b"www-authenticate",
                                                                                 b"Bearer")]
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return 413, self._too_large(), []
        return None

    def _too_large(self) -> str:
        return f"request body over this server's limit of {self.max_body_bytes:,} bytes"

    async def _body(self, receive) -> bytes | None:
        """The request body, or None once it passes the limit (a body sent without a length)."""
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                return None
        return bytes(body)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await _reply(send, *refusal)
            return
        body = await self._body(receive)
        if body is None:
            await _reply(send, 413, self._too_large())
            return
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the client's disconnect

        await self.app(scope, replay, send)


class StatusCounter:
    """ASGI middleware that reports every response's status (and an unhandled failure as 500) to ``count``."""

    def __init__(self, app, count: Callable[[int], None]) -> None:
        self.app, self.count = app, count

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting(message) -> None:
            if message["type"] == "http.response.start":
                self.count(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting)
        except Exception:
            self.count(500)
            raise


def json_safe(value):
    """``value`` with what JSON cannot carry made printable: NaN and infinities as text, lone surrogates
    replaced (a validation error echoes the request's own bad input)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return json_safe(str(value))


def harden(app, api_key: str | None, max_body_bytes: int, count: Callable[[int], None] | None = None):
    """Put ``Guard`` in front of a FastAPI app (and ``StatusCounter`` in front of that), and answer a
    validation error with a 422 whose content is always JSON (FastAPI's own fails on the NaN it is
    refusing)."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    @app.exception_handler(RequestValidationError)
    async def unprocessable(request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": json_safe(err.errors())}, status_code=422)

    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    if count is not None:
        # added last: outside the guard, it sees its answers too
        app.add_middleware(StatusCounter, count=count)
    return app


def guarded_protocol(header_timeout_s: float, max_connections: int):
    """uvicorn's HTTP/1.1 protocol with a deadline for each request head and a cap on connections."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._head_timer = None
            if len(self.connections) > max_connections:
                transport.close()  # full: refuse at once rather than hold one more descriptor
                return
            self._await_head()

        def _await_head(self) -> None:
            waiting_cycle = self.cycle
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_late, waiting_cycle)

        def _head_late(self, waiting_cycle) -> None:
            if self.cycle is waiting_cycle and not self.transport.is_closing():
                self.transport.close()  # no complete request head in time

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle and self._head_timer is not None:  # a request head arrived
                self._head_timer.cancel()
                self._head_timer = None

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._await_head()  # the next request on this connection has the same deadline

        def connection_lost(self, exc) -> None:
            if getattr(self, "_head_timer", None) is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

    return GuardedH11Protocol


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BackgroundServer:
    """An ASGI app served by uvicorn from a background thread (for the demo, notebooks and tests), with the
    address and limits of ``cfg`` (its port 0, or None: a free one).

    ``with BackgroundServer(app) as server: ... server.url ...``, or ``start()`` / ``stop()``.
    """

    def __init__(self, app, cfg: ServerConfig | None = None, on_stop=None) -> None:
        import uvicorn

        cfg = cfg or ServerConfig(port=0)
        self.host, self.port = cfg.host, cfg.port or free_port(cfg.host)
        self.url = f"http://{self.host}:{self.port}"
        self.server = uvicorn.Server(cfg.uvicorn_config(app, log_level="warning", port=self.port))
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="scratchlm-server")
        self.on_stop = on_stop

    def start(self, timeout_s: float = 30.0):
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        if self.on_stop is not None:
            self.on_stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
