"""Configuration written once: a stage's config dataclass is also its command-line options, its
section in a run-configuration file, and (through Prefect) its parameter form in the UI.

Config classes are pydantic dataclasses: each field has a type, a default, a description and
bounds, so a bad value is refused where it enters (CLI, file, flow parameter, Python), with the
field named. A run-configuration file is TOML with one table per flow parameter::

    [tokenizer]
    vocab_size = 4096
    [shape]
    preset = "tiny"
    [optim]
    max_steps = 150

A string value (or a list's) that starts with ``./`` or ``../`` is a path relative to the file.
"""

from __future__ import annotations

import argparse
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Collection, Literal

CONFIG_DIR = Path(__file__).resolve().parents[1] / "flows" / "configs"  # named run configurations


def config_dataclass(cls: type) -> type:
    """A config class: a frozen pydantic dataclass that refuses unknown fields (pydantic ignores
    them by default, so a misspelt or retired parameter sent through the API would be dropped
    without a word)."""
    from pydantic import ConfigDict
    from pydantic.dataclasses import dataclass

    return dataclass(frozen=True, config=ConfigDict(extra="forbid"))(cls)


class ConfigError(ValueError):
    """A configuration value or file is not valid; the message says which and what was expected."""


def config_fields(cls: type) -> dict[str, Any]:
    """name -> pydantic FieldInfo of a config dataclass, in declaration order."""
    return dict(cls.__pydantic_fields__)


def make_config(cls: type, values: dict, where: str = "") -> Any:
    """``cls(**values)``, with unknown names and invalid values reported as one ConfigError."""
    from pydantic import ValidationError

    known = config_fields(cls)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown setting(s) {unknown}; known: {sorted(known)}")
    try:
        return cls(**values)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or cls.__name__}: {err['msg'].removeprefix('Value error, ')}" for err in e.errors())
        raise ConfigError(f"{where or cls.__name__}: {problems}") from None


def read_run_config(name_or_path: str | Path) -> dict[str, dict]:
    """A run configuration: a TOML file, or the name of one in flows/configs (``demo``)."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = CONFIG_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        named = sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))
        raise ConfigError(f"no run configuration {str(name_or_path)!r}: give a .toml file or one of {named}")
    try:
        tables = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    return {section: _resolve_paths(values, path.parent, f"{path} [{section}]") for section, values in tables.items()}


def _resolve_paths(values: Any, base: Path, where: str) -> dict:
    """Strings starting with ./ or ../ are paths relative to the file. A copy of a bundled
    configuration (flows/configs/demo.toml) moved elsewhere still finds the repository's data: a
    path that is not there relative to the copy, but is relative to flows/configs/, means that."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a table of settings, got {values!r}")

    def resolve(key: str, v):
        if isinstance(v, list):  # a list of paths (e.g. qa.instructions)
            return [resolve(key, item) for item in v]
        if not (isinstance(v, str) and v.startswith(("./", "../"))):
            return v
        here, bundled = (base / v).resolve(), (CONFIG_DIR / v).resolve()
        if here.exists() or not bundled.exists():
            if not here.exists():
                raise ConfigError(f"{where} {key}: {v} is not there: {here} does not exist (paths starting with ./ or ../ are relative to the file)")
            return str(here)
        return str(bundled)

    return {k: resolve(k, v) for k, v in values.items()}


# -- command-line options ---------------------------------------------------------------------------


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage error in one line (``error: ...``, status 2) instead of the usage text."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (`{self.prog} --help` lists the options)\n")



def shared_names(tables: dict[str, type]) -> set[str]:
    """The field names more than one table has (``lr`` in optim and finetune_optim): their options
    carry the table's name (``--optim.lr``), the others go bare (``--vocab-size``)."""
    seen: dict[str, int] = {}
    for cls in tables.values():
        for name in config_fields(cls):
            seen[name] = seen.get(name, 0) + 1
    return {name for name, count in seen.items() if count > 1}


def add_config_options(parser: argparse.ArgumentParser, section: str, cls: type, *, qualified: Collection[str] = ()) -> None:
    """One option per field of ``cls`` (``--vocab-size``; ``--optim.lr`` for a field in ``qualified``),
    stored as ``section.field`` so ``config_values`` can collect them; help from the field's description."""
    group = parser.add_argument_group(f"{section} ({cls.__name__})", (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else None)
    for name, info in config_fields(cls).items():
        flag = "--" + (section.replace("_", "-") + "." if name in qualified else "") + name.replace("_", "-")
        kwargs = _option(info.annotation)
        default = info.get_default(call_default_factory=True)
        shown = "unset" if default is None else json.dumps(default) if isinstance(default, (tuple, dict, list)) else default
        help_text = f"{info.description or ''} [default: {shown}]".strip().replace("%", "%%")  # argparse formats help with %
        group.add_argument(flag, dest=f"{section}.{name}", default=argparse.SUPPRESS, help=help_text, **kwargs)


def config_values(args: argparse.Namespace, section: str) -> dict:
    """The options given on the command line for one section (absent ones are left to the defaults)."""
    prefix = f"{section}."
    return {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix)}


def _option(annotation: Any) -> dict:
    """argparse settings for a field type: choices for Literal, flags for bool, lists for tuples."""
    optional = _is_optional(annotation)
    base = _without_none(annotation)
    origin = typing.get_origin(base)
    if base is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is Literal:
        return {"choices": list(typing.get_args(base)), "type": type(typing.get_args(base)[0])}
    if origin is tuple:
        item = typing.get_args(base)[0]
        choices = list(typing.get_args(item)) if typing.get_origin(item) is Literal else None
        return {"nargs": "*", "choices": choices, "metavar": "VALUE"}
    if origin is dict or base is dict:
        return {"type": _json_object, "metavar": "JSON"}
    scalar = base if base in (int, float, str) else str
    return {"type": _or_none(scalar) if optional else scalar, "metavar": scalar.__name__.upper()}


def _is_optional(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation)


def _without_none(annotation: Any) -> Any:
    if _is_optional(annotation):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        return rest[0] if len(rest) == 1 else annotation
    return annotation


def _or_none(scalar: type):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "unset") else scalar(text)

    parse.__name__ = scalar.__name__
    return parse


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value
