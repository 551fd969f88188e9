"""What a training sequence takes from a token stream, and how much of a feed's stream a loader holds to
shuffle: plain numbers, importable without torch (a config reads them)."""

from __future__ import annotations


def block_span(block_size: int) -> int:
    """Tokens a training sequence of ``block_size`` takes from the stream: its inputs plus one more target."""
    return block_size + 1


FEED_SHUFFLE_TOKENS = 2**20
"""A feed loader's shuffle buffer, in tokens: about 500 corpus chunks of 8,000 characters, so a batch holds
blocks of many documents at every block size from 64 to 4,096 (bench/stream_fairness.py sweeps them)."""
