"""Typed configuration: pydantic models whose field docstrings become ``--help``.

One mechanism serves every command: a config class lists its fields with a docstring under each, values come
from the class defaults, then a YAML file (``--config``), then command-line flags (``--max-steps 10``), and
pydantic checks the result. Unknown keys and wrong types are refused with a message naming the key.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration value is missing, unknown or of the wrong type; the message names the key."""


class ConfigBase(BaseModel):
    """Base of every config: unknown keys are errors, field docstrings are descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)
    positional: ClassVar[tuple[str, ...]] = ()
    """Fields given on the command line without a flag, in this order (``scratchlm report RUN...``)."""


C = TypeVar("C", bound=ConfigBase)

DeviceSpec = Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")]
"""A device setting: 'auto' (a GPU if there is one, else the CPU), 'cpu', 'cuda' or 'cuda:N'."""


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
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, "
                          f"not {type(data).__name__}")
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


def _keys(cls: type[ConfigBase]):
    """(key, field) pairs: a field's alias is its key where it has one (a name that pydantic reserves)."""
    return [(field.alias or name, field) for name, field in cls.model_fields.items()]


def _argument(name: str, field, positional: bool) -> tuple[list[str], dict[str, Any]]:
    """argparse's (names, options) for one config field; ``name`` is the key the config is built from."""
    annotation = _strip_optional(field.annotation)
    default = field.get_default(call_default_factory=True)
    help_text = (field.description or "").strip()
    help_text = f"{help_text} [default: {default}]" if help_text else f"[default: {default}]"
    kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text}
    item = typing.get_args(annotation)[0] if typing.get_origin(annotation) is list else annotation
    if typing.get_origin(item) is Literal:
        kwargs["choices"] = [str(c) for c in typing.get_args(item)]
    if typing.get_origin(annotation) is list:
        kwargs["nargs"] = "*" if positional and not field.is_required() else "+"
    elif positional:
        kwargs["nargs"] = None if field.is_required() else "?"
    if positional:
        return [name], {**kwargs, "metavar": name.upper()}
    kwargs["dest"] = name
    if annotation is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif "choices" not in kwargs:
        kwargs["metavar"] = name.upper()
    return ["--" + name.replace("_", "-")], kwargs


def add_arguments(parser: argparse.ArgumentParser, cls: type[ConfigBase], skip: tuple[str, ...] = ()) -> None:
    """Add one ``--kebab-case`` flag per field of ``cls`` (a positional argument for the fields it lists in
    ``positional``), its help being the field's docstring.

    Values default to "not given" so that a YAML file's values survive unless the command line overrides them;
    they stay strings here and pydantic converts and checks them in ``load``.
    """
    group = parser.add_argument_group(f"{cls.__name__} (also settable in a --config YAML file)")
    for name, field in _keys(cls):
        if name in skip:
            continue
        names, kwargs = _argument(name, field, name in cls.positional)
        (parser if name in cls.positional else group).add_argument(*names, **kwargs)


def add_command(sub: argparse._SubParsersAction, name: str, cls: type[C], run: Callable[[C], object],
                help: str) -> argparse.ArgumentParser:
    """The one way to declare a command: its flags are the fields of ``cls`` (see ``add_arguments``) plus
    ``--config YAML``; ``run`` gets the validated config (defaults < YAML < command line)."""
    parser = sub.add_parser(name, help=help,
                            description=f"{(cls.__doc__ or help).strip()} Values: defaults < "
                            "--config YAML < command line.")
    parser.add_argument("--config", help=f"YAML file of {cls.__name__} keys")
    add_arguments(parser, cls)
    parser.set_defaults(func=lambda args: run(load(cls, args.config, overrides_from_args(args, cls))))
    return parser


def overrides_from_args(args: argparse.Namespace, cls: type[ConfigBase]) -> dict[str, Any]:
    """The fields of ``cls`` that were given on the command line."""
    given = vars(args)
    return {name: given[name] for name, _ in _keys(cls) if name in given}


def to_yaml(config: ConfigBase) -> str:
    """The exact config as YAML (saved beside checkpoints)."""
    return yaml.safe_dump(config.model_dump(mode="json", by_alias=True), sort_keys=False)
