"""Typed configuration: pydantic models whose field docstrings become ``--help``.

One mechanism serves every command: a config class lists its fields with a docstring under each, values come
from the class defaults, then the command's section of ``$SCRATCHLM_CONFIG`` (a machine's own defaults), then
a YAML file (``--config``), then command-line flags (``--max-steps 10``), and
pydantic checks the result. Unknown keys and wrong types are refused with a message naming the key.
"""

from __future__ import annotations

import argparse
import copy
import os
import textwrap
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model

from .errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration value is missing, unknown or of the wrong type; the message names the key."""


class ConfigBase(BaseModel):
    """Base of every config: unknown keys are errors, field docstrings are descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)
    positional: ClassVar[tuple[str, ...]] = ()
    """Fields given on the command line without a flag, in this order (``scratchlm report RUN...``)."""

    def part(self, included: type[C]) -> C:
        """The settings of ``included`` alone, out of this config that includes them (what a command hands
        on: the data request's reading, a teacher's sampling)."""
        return included(**{name: getattr(self, name) for name in included.model_fields})


C = TypeVar("C", bound=ConfigBase)

DeviceSpec = Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")]
"""A device setting: 'auto' (a GPU if there is one, else the CPU), 'cpu', 'cuda' or 'cuda:N'."""

# Numeric settings with an obvious range: checked when a config is built, the range named in the error.
Count = Annotated[int, Field(ge=1)]
"""A count or a size: at least 1."""
NonNegativeInt = Annotated[int, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]
"""Seconds, rates, amounts: above 0."""
NonNegative = Annotated[float, Field(ge=0)]
Share = Annotated[float, Field(ge=0, le=1)]
"""A share or probability: in [0, 1]."""
OpenShare = Annotated[float, Field(gt=0, lt=1)]
"""A share that must leave something on both sides: in (0, 1)."""
Port = Annotated[int, Field(ge=0, le=65535)]
"""A TCP port (0: any free one, where a server allows it)."""
TopP = Annotated[float, Field(gt=0, le=1)]
"""Nucleus sampling mass: in (0, 1]."""
MAX_SOFT_LABELS = 100
SoftLabelCount = Annotated[int, Field(ge=0, le=MAX_SOFT_LABELS)]
"""A teacher's top-k kept per token: 0 (none) to 100 (vLLM and OpenAI give 20; every entry costs 4 bytes a
token on the wire and on disk)."""
DistillTemperature = Annotated[float, Field(ge=0.1, le=20)]
"""A distillation temperature: in [0.1, 20] (1 is what Busbridge et al. 2025 recommend)."""


class Prefixed(ConfigBase):
    """Another settings class's fields under a prefix (made by ``prefixed``)."""

    included: ClassVar[type[ConfigBase]]
    prefix: ClassVar[str]

    @classmethod
    def read(cls, config: ConfigBase) -> ConfigBase:
        """The included settings, unprefixed, out of a command's config that includes these."""
        names = cls.included.model_fields
        return cls.included(**{name: getattr(config, cls.prefix + name) for name in names})

    @classmethod
    def flags(cls, settings: ConfigBase) -> dict[str, Any]:
        """``settings`` as the prefixed keys of a command's config."""
        return {cls.prefix + name: value for name, value in settings.model_dump().items()}


def prefixed(cls: type[ConfigBase], prefix: str, doc: str) -> type[Prefixed]:
    """``cls``'s settings under names beginning with ``prefix``, to include in a command's config (the feed's
    --teacher-temperature is Sampling's temperature): types, bounds, defaults and help stay declared once, in
    ``cls``."""
    fields = {prefix + name: (field.annotation, copy.copy(field)) for name, field in cls.model_fields.items()}
    made = create_model(f"{prefix.title().replace('_', '')}{cls.__name__}", __base__=Prefixed, __doc__=doc,
                        **fields)
    made.included, made.prefix = cls, prefix
    return made


def _usable_temperature(value: float) -> float:
    if 0 < value < 0.01:
        raise ValueError("a temperature must be 0 (greedy) or at least 0.01")
    return value


Temperature = Annotated[float, Field(ge=0, le=100), AfterValidator(_usable_temperature)]
"""A sampling temperature: 0 (greedy), or in [0.01, 100]."""


def bounds(annotation: Any, metadata: Sequence[Any] = ()) -> dict[str, float]:
    """The numeric bounds (``ge``, ``gt``, ``le``, ``lt``) an annotation (and a field's ``metadata``) carries,
    through ``X | None`` and ``Literal[...] | X``."""
    found: dict[str, float] = {}
    for meta in [*metadata, *getattr(annotation, "__metadata__", ())]:
        for part in [meta, *getattr(meta, "metadata", [])]:  # annotated_types objects, or a FieldInfo's
            for name in ("ge", "gt", "le", "lt"):
                if getattr(part, name, None) is not None:
                    found[name] = getattr(part, name)
    union = typing.get_origin(annotation) in (Union, types.UnionType)
    for arg in typing.get_args(annotation) if union else ():
        found.update(bounds(arg))
    return found


def range_text(found: dict[str, float]) -> str:
    """Bounds as an interval: [0, 1], (0, inf), ..."""
    low = f"[{found['ge']:g}" if "ge" in found else (f"({found['gt']:g}" if "gt" in found else "(-inf")
    high = f"{found['le']:g}]" if "le" in found else (f"{found['lt']:g})" if "lt" in found else "inf)")
    return f"{low}, {high}"


def _field_bounds(cls: type[ConfigBase] | None, key: str) -> dict[str, float]:
    field = cls.model_fields.get(key) if cls is not None else None
    if field is None:
        return {}
    return bounds(field.annotation, field.metadata)


def _describe_errors(err: ValidationError, source: str, cls: type[ConfigBase] | None = None) -> str:
    """One line per offending key, with the allowed range of a numeric one; a union's alternatives (``int |
    None``…) are folded into that line."""
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
            continue
        found = _field_bounds(cls, key)
        allowed = f"; allowed: {range_text(found)}" if found else ""
        lines.append(f"{source}: key '{key}': {' or '.join(dict.fromkeys(msgs))} (got {inputs[key]!r}"
                     f"{allowed})")
    return "\n".join(lines)


def validate(cls: type[C], values: dict[str, Any], source: str = "config") -> C:
    """Build ``cls`` from ``values``, turning pydantic's errors into one ``ConfigError`` naming each key."""
    try:
        return cls.model_validate(values)
    except ValidationError as err:
        raise ConfigError(_describe_errors(err, source, cls)) from None


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


MACHINE_CONFIG_ENV = "SCRATCHLM_CONFIG"


def machine_defaults(command: str) -> tuple[dict[str, Any], str | None]:
    """``command``'s section of the YAML file named by ``$SCRATCHLM_CONFIG`` (one section per command:
    ``train:``, ``eval:``, ...), and the file's name; ({}, None) when the variable is unset.

    A machine's or a course's own defaults (a device, a small block size, a time limit) under every command
    typed on it, below ``--config`` and flags: how the README's commands are run at toy size by the tests."""
    path = os.environ.get(MACHINE_CONFIG_ENV)
    if not path:
        return {}, None
    section = read_yaml(path).get(command) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{MACHINE_CONFIG_ENV}={path}: the '{command}' section must be a mapping of keys")
    return section, path


def load(cls: type[C], yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None,
         command: str | None = None) -> C:
    """Defaults < ``$SCRATCHLM_CONFIG``'s section for ``command`` < YAML file < overrides (e.g. parsed flags),
    validated together."""
    values, machine = machine_defaults(command) if command else ({}, None)
    if yaml_path is not None:
        values.update(read_yaml(yaml_path))
    source = " + ".join(str(p) for p in (machine, yaml_path) if p is not None) or "config"
    if overrides:
        values.update(overrides)
        source = f"{source} + command line" if source != "config" else "command line"
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
    help_text = help_text.replace("%", "%%")  # argparse formats help with %: "30% of texts" broke --help
    kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text}
    is_list = typing.get_origin(annotation) is list
    item = typing.get_args(annotation)[0] if is_list else annotation
    if typing.get_origin(item) is Literal and not (is_list and not positional):
        kwargs["choices"] = [str(c) for c in typing.get_args(item)]
    if is_list and not positional:
        # Repeated flags add up, and each may be a comma list: --teacher A --teacher B, --prompts words,topic
        kwargs.update(nargs="+", action=_Extend)
        if typing.get_origin(item) is Literal:
            kwargs["help"] += f" (one or more of: {', '.join(str(c) for c in typing.get_args(item))})"
    elif is_list:
        kwargs["nargs"] = "*" if not field.is_required() else "+"
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


class _Extend(argparse.Action):
    """A list flag: every occurrence adds its values, and a value holding commas adds each part."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        items = list(getattr(namespace, self.dest, None) or [])
        items += [part for value in values for part in value.split(",") if part]
        setattr(namespace, self.dest, items)


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
    ``--config YAML``; ``run`` gets the validated config (defaults < $SCRATCHLM_CONFIG < YAML < command
    line), which ``args.config_of(args)`` also gives without running."""
    # The help opens with one line saying what the command does; then the config's own description.
    what = f"{help[:1].upper()}{help[1:].rstrip('.')}."
    body = textwrap.fill(" ".join((cls.__doc__ or "").split()) + " Values: defaults < $SCRATCHLM_CONFIG < "
                         "--config YAML < command line.", 79)
    parser = sub.add_parser(name, help=help, description=f"{what}\n\n{body}",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=f"YAML file of {cls.__name__} keys")
    add_arguments(parser, cls)
    parser.set_defaults(config_of=lambda args: load(cls, args.config, overrides_from_args(args, cls), name))
    parser.set_defaults(func=lambda args: run(args.config_of(args)))
    return parser


def overrides_from_args(args: argparse.Namespace, cls: type[ConfigBase]) -> dict[str, Any]:
    """The fields of ``cls`` that were given on the command line."""
    given = vars(args)
    return {name: given[name] for name, _ in _keys(cls) if name in given}


def to_yaml(config: ConfigBase) -> str:
    """The exact config as YAML (saved beside checkpoints)."""
    return yaml.safe_dump(config.model_dump(mode="json", by_alias=True), sort_keys=False)
