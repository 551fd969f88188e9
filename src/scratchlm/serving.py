"""What every scratchlm HTTP server shares: API keys, their constant-time check, and the safe-bind rule."""

from __future__ import annotations

import hmac
import ipaddress
import os
import socket
import threading
import time
from pathlib import Path

from fastapi import HTTPException, Request

from .config import ConfigBase, ConfigError

API_KEY_ENV = "SCRATCHLM_API_KEY"


class ServerConfig(ConfigBase):
    """Where a server listens and the key it asks for."""

    host: str = "127.0.0.1"
    """Address to bind. Anything but loopback needs an API key."""
    port: int = 8000
    """TCP port."""
    api_key_file: str | None = None
    """File holding the API key (else $SCRATCHLM_API_KEY; never on the command line)."""

    def checked_key(self, what: str) -> str | None:
        """The API key, after refusing a bind beyond this machine without one."""
        api_key = read_api_key(self.api_key_file)
        check_bind(self.host, api_key, what)
        return api_key


def read_api_key(key_file: str | None) -> str | None:
    """The API key from a file or $SCRATCHLM_API_KEY (never the command line); None when neither is set."""
    if key_file:
        try:
            key = Path(key_file).read_text(encoding="utf-8").strip()
        except OSError as err:
            raise ConfigError(f"cannot read API key file {key_file}: {err.strerror}") from None
        if not key:
            raise ConfigError(f"API key file {key_file} is empty")
        return key
    return os.environ.get(API_KEY_ENV) or None


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


def require_key(request: Request) -> None:
    """A FastAPI dependency: ``Authorization: Bearer KEY`` against the app's ``state.api_key``, compared in
    constant time (no check when the app has no key)."""
    api_key = request.app.state.api_key
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), api_key.encode()):
        raise HTTPException(status_code=401, detail="missing or wrong API key (Authorization: Bearer KEY)",
                            headers={"WWW-Authenticate": "Bearer"})


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BackgroundServer:
    """An ASGI app served by uvicorn from a background thread (for the demo, notebooks and tests).

    ``with BackgroundServer(app) as server: ... server.url ...``, or ``start()`` / ``stop()``.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None, on_stop=None) -> None:
        import uvicorn

        self.host, self.port = host, port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning"))
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
