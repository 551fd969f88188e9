"""What every scratchlm HTTP server shares: API keys, their constant-time check, and the safe-bind rule."""

from __future__ import annotations

import hmac
import ipaddress
import os
from pathlib import Path

from fastapi import HTTPException, Request

from .config import ConfigError

API_KEY_ENV = "SCRATCHLM_API_KEY"


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
        raise ConfigError(f"refusing to bind {host} without an API key: anyone who can reach it could use the "
                          f"{what}. Set {API_KEY_ENV} or pass --api-key-file, or bind 127.0.0.1")


def key_checker(api_key: str | None):
    """A FastAPI dependency: ``Authorization: Bearer KEY`` compared in constant time (no-op without a key)."""

    def require_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), api_key.encode()):
            raise HTTPException(status_code=401, detail="missing or wrong API key (Authorization: Bearer KEY)",
                                headers={"WWW-Authenticate": "Bearer"})

    return require_key
