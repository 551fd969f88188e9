"""Real servers on loopback for the tests: the package's own BackgroundServer (uvicorn in a thread)."""

from scratchlm.serving import BackgroundServer, free_port

UvicornThread = BackgroundServer

__all__ = ["UvicornThread", "free_port"]
