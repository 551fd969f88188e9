"""scratchlm: pretrain a small Phi-style language model from random weights.

The Python API, for notebooks and scripts (the CLI is ``scratchlm --help``)::

    import scratchlm
    feed = scratchlm.serve(corpus="sample.zip")              # a feed server in the background
    summary = scratchlm.training(model="phi-tiny", data=feed.url, out="runs/a", max_steps=100)
    feed.stop()

Each function takes its command's settings, every flag, as keyword arguments (``max_steps`` for
``--max-steps``), checked by the same config class (``scratchlm train --help`` lists them): a wrong name or
value is the same one-line ``ConfigError``.
"""

from __future__ import annotations

__version__ = "0.1.0"


def train(**settings) -> dict:
    """Train (or resume) a run; settings are ``TrainConfig`` fields. Returns the run's summary."""
    from .config import validate
    from .training import TrainConfig
    from .training import train as _train

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
    from .teacher.serve_model import ServeModelConfig
    from .teacher.serve_model import serve_model as _serve_model

    settings.setdefault("port", 0)
    return _serve_model(validate(ServeModelConfig, {"model": model, **settings}, "scratchlm.serve_model"),
                        background=True)


def evaluate(model: str, data: str, **settings) -> dict:
    """Loss, perplexity and bits per byte of a model on text (by default the documents a run on ``data``
    holds out); settings are ``EvalConfig`` fields (``scratchlm eval``)."""
    from .config import validate
    from .evaluation import EvalConfig, evaluate_config

    cfg = validate(EvalConfig, {"model": model, "data": data, **settings}, "scratchlm.evaluate")
    return evaluate_config(cfg).to_dict()


def report(runs: list[str], out: str | None = None, **settings) -> dict:
    """Plots, table and forecast for run folders, written to ``out``; settings are ``ReportConfig`` fields
    (``scratchlm report``); without ``out``, only the report's contents are returned."""
    from .config import validate
    from .reporting.command import ReportConfig, report_config

    if out is not None:
        settings["out"] = out
    return report_config(validate(ReportConfig, {"runs": list(runs), **settings}, "scratchlm.report"))


def prepare(**settings) -> dict:
    """Tokenize a corpus into the cache (and score it with a teacher); settings are ``PrepareConfig`` fields
    (``scratchlm prepare``)."""
    from .config import validate
    from .preparation import PrepareConfig, run_prepare

    return run_prepare(validate(PrepareConfig, settings, "scratchlm.prepare"))


def export(checkpoint: str, **settings):
    """Write a training checkpoint as a Hugging Face folder; settings are ``ExportConfig`` fields."""
    from .config import validate
    from .training.export import ExportConfig, run_export

    return run_export(validate(ExportConfig, {"checkpoint": checkpoint, **settings}, "scratchlm.export"))


API = {"train": "train", "serve": "serve", "serve_model": "serve-model", "evaluate": "eval",
       "report": "report", "prepare": "prepare", "export": "export"}
"""Each API function and the command whose config it takes (tests check every flag is a keyword)."""

__all__ = ["evaluate", "export", "prepare", "report", "serve", "serve_model", "train"]
