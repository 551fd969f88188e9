"""scratchlm: pretrain a small Phi-style language model from random weights.

The Python API, for notebooks and scripts (the CLI is ``scratchlm --help``)::

    import scratchlm
    feed = scratchlm.serve(corpus="sample.zip")              # a feed server in the background
    summary = scratchlm.train(model="phi-tiny", data=feed.url, out="runs/a", max_steps=100)
    feed.stop()

Each function takes the same settings as its command's flags (``scratchlm train --help``), as keyword
arguments.
"""

from __future__ import annotations

__version__ = "0.1.0"


def train(**settings) -> dict:
    """Train (or resume) a run; settings are ``TrainConfig`` fields. Returns the run's summary."""
    from .config import validate
    from .train import TrainConfig
    from .train import train as _train

    return _train(validate(TrainConfig, settings, "scratchlm.train"))


def serve(**settings):
    """Start a feed server in the background; settings are ``ServeConfig`` fields (``port=0`` picks a free
    one).

    Returns the running server: ``.url``, ``.stop()``, ``.feed`` (its counters).
    """
    from .config import validate
    from .feed.server import ServeConfig, serve_background

    settings.setdefault("port", 0)
    return serve_background(validate(ServeConfig, settings, "scratchlm.serve"))


def serve_model(model: str, **settings):
    """Serve a model folder through the OpenAI-compatible completions API in the background; settings are
    ``ServeModelConfig`` fields (``port=0``, the default here, picks a free one). Returns the running server:
    ``.url``, ``.stop()``."""
    from .config import validate
    from .teacher.commands import ServeModelConfig
    from .teacher.serve_model import serve_model as _serve_model

    settings.setdefault("port", 0)
    return _serve_model(validate(ServeModelConfig, {"model": model, **settings}, "scratchlm.serve_model"),
                        background=True)


def evaluate(model: str, data: str, block_size: int = 2048, max_tokens: int | None = None) -> dict:
    """Loss, perplexity and bits per byte of a model on text (see ``scratchlm eval``)."""
    from .devices import pick_device
    from .evaluation import evaluate_model, whole_documents
    from .tokenizer import load_tokenizer

    return evaluate_model(model, whole_documents(data), load_tokenizer(), block_size, pick_device(),
                          max_tokens=max_tokens).to_dict()


def report(runs: list[str], out: str | None, reference_loss: float | None = None,
           reference_name: str = "reference", predict_tokens: float | None = None,
           predict_model: str | None = None, predict_schedule: str | None = None) -> dict:
    """Plots, table and forecast for run folders (see ``scratchlm report``); ``out`` None: only the
    forecasts."""
    from pathlib import Path

    from .reporting import build_report

    reference = (reference_name, reference_loss) if reference_loss is not None else None
    return build_report([Path(r) for r in runs], Path(out) if out else None, reference,
                        predict_tokens=predict_tokens, predict_model=predict_model,
                        predict_schedule=predict_schedule)


__all__ = ["evaluate", "report", "serve", "serve_model", "train"]
