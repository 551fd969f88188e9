"""Typed configuration: pydantic models whose field docstrings become ``--help``.

One mechanism serves every command: a config class lists its fields with a docstring under each, values come
from the class defaults, then a YAML file (``--config``), then command-line flags (``--max-steps 10``), and
pydantic checks the result. Unknown keys and wrong types are refused with a message naming the key.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type; the message names the key."""


class ConfigBase(BaseModel):
    """Base of every config: unknown keys are errors, field docstrings are descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


C = TypeVar("C", bound=ConfigBase)


def _describe_errors(err: ValidationError, source: str) -> str:
    """One line per offending key; a union's alternatives (``int | None``…) are folded into that line."""
    problems: dict[str, list[str]] = {}
    inputs: dict[str, object] = {}
    for e in err.errors():
        key = str(e["loc"][0]) if e["loc"] else "(root)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        problems.setdefault(key, []).append(msg)
        inputs[key] = e.get("input")
    lines = []
    for key, msgs in problems.items():
        if msgs == ["unknown key"]:
            lines.append(f"{source}: unknown key '{key}'")
        else:
            lines.append(f"{source}: key '{key}': {' or '.join(dict.fromkeys(msgs))} (got {inputs[key]!r})")
    return "\n".join(lines)


def validate(cls: type[C], values: dict[str, Any], source: str = "config") -> C:
    """Build ``cls`` from ``values``, turning pydantic's errors into one ``ConfigError`` naming each key."""
    try:
        return cls.model_validate(values)
    except ValidationError as err:
        raise ConfigError(_describe_errors(err, source)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; an unreadable file or a non-mapping is a ``ConfigError``."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, not {type(data).__name__}")
    return data


def load(cls: type[C], yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> C:
    """Defaults < YAML file < overrides (e.g. parsed flags), validated together."""
    values: dict[str, Any] = {}
    if yaml_path is not None:
        values.update(read_yaml(yaml_path))
    source = str(yaml_path) if yaml_path is not None else "config"
    if overrides:
        values.update(overrides)
        source = f"{source} + command line" if yaml_path is not None else "command line"
    return validate(cls, values, source)


def _strip_optional(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def add_arguments(parser: argparse.ArgumentParser, cls: type[ConfigBase], skip: tuple[str, ...] = ()) -> None:
    """Add one ``--kebab-case`` flag per field of ``cls``, its help being the field's docstring.

    Flags default to "not given" so that a YAML file's values survive unless a flag overrides them; values stay
    strings here and pydantic converts and checks them in ``load``.
    """
    group = parser.add_argument_group(f"{cls.__name__} (also settable in a --config YAML file)")
    for name, field in cls.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        annotation = _strip_optional(field.annotation)
        help_text = (field.description or "").strip()
        default = field.get_default(call_default_factory=True)
        help_text = f"{help_text} [default: {default}]" if help_text else f"[default: {default}]"
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(annotation) is Literal:
            kwargs["choices"] = [str(c) for c in typing.get_args(annotation)]
        elif typing.get_origin(annotation) is list:
            kwargs["nargs"] = "+"
        else:
            kwargs["metavar"] = name.upper()
        group.add_argument(flag, **kwargs)


def overrides_from_args(args: argparse.Namespace, cls: type[ConfigBase]) -> dict[str, Any]:
    """The fields of ``cls`` that were given on the command line."""
    given = vars(args)
    return {name: given[name] for name in cls.model_fields if name in given}


def to_yaml(config: ConfigBase) -> str:
    """The exact config as YAML (saved beside checkpoints)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
