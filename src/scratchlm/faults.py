"""Fault injection for the tests, in one place: pauses at named points of long writes, so that a test can kill
a process in the middle of one (a checkpoint half written, a token shard or a soft-label piece not yet marked
done). Nothing happens unless ``SCRATCHLM_FAULTS`` is set, e.g. ``SCRATCHLM_FAULTS="checkpoint@6=60"`` (pause
60 s while writing the checkpoint of step 6) or ``"token-shard=2,soft-label-piece=30"`` (after every one).
The points: ``checkpoint``, ``token-shard``, ``soft-label-piece``."""

from __future__ import annotations

import os
import time

ENV = "SCRATCHLM_FAULTS"


def pause(point: str, at: int | None = None) -> None:
    """Sleep as ``SCRATCHLM_FAULTS`` asks at ``point`` (and step ``at``, where the point is per step)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    for entry in spec.split(","):
        name, _, seconds = entry.partition("=")
        where, _, step = name.partition("@")
        if where == point and (not step or (at is not None and int(step) == at)):
            time.sleep(float(seconds))
