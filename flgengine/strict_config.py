"""The machinery of flgengine's strict configs: a dataclass built from a dict that must hold
exactly its fields, with their types (`dataclass_from_dict`), and a JSON round trip
(`JsonConfig`). An unknown or missing key, or a value of the wrong type, is a `ConfigError`
naming the key. The configs themselves live in `flgengine.config` (and a model family's in
its module)."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, get_type_hints

from .files import atomic_write_text

__all__ = ["ConfigError", "JsonConfig", "dataclass_from_dict", "check_known_keys", "type_matches", "type_name",
           "read_json", "check", "torch_dtype", "TORCH_DTYPES", "DTYPES", "FORMAT_VERSION"]

DTYPES = ("float32", "bfloat16", "float16")
# config.json / pipeline.json written by this version name every key (format_version 4); files
# of older writers (format_version 3, 2, or none) read the keys added since as off
FORMAT_VERSION = 5
# names users and configs may give a dtype by
TORCH_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                "float16": "float16", "fp16": "float16"}


def torch_dtype(name: str):
    """torch dtype of a name in TORCH_DTYPES ("bf16", "float32", ...)."""
    import torch

    if name not in TORCH_DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(TORCH_DTYPES)}")
    return getattr(torch, TORCH_DTYPES[name])


class ConfigError(ValueError):
    """A config file or dict is malformed; the message names the source and the key."""


def check_known_keys(data: dict, known: list[str], source: str, what: str = "") -> None:
    """ConfigError naming the first key of `data` not in `known` (`what`: " for X" in the message)."""
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r}{what} (known keys: {', '.join(known)})")


def type_name(hint) -> str:
    if hint is type(None):
        return "null"
    if isinstance(hint, type):
        return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
                dict: "an object"}.get(hint, f"an object ({hint.__name__})")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"a list (each {type_name(args[0])})"
    if origin is tuple:
        return f"a list of {len(args)} ({', '.join(type_name(a) for a in args)})"
    if origin is list:
        return f"a list (each {type_name(args[0])})" if args else "a list"
    if origin is dict:
        return "an object"
    return str(hint)


def type_matches(value, hint) -> bool:
    """Whether a JSON value has the type `hint` names, exactly: a bool is not an int, an int is
    a number, numbers are finite, a list's items and a fixed tuple's length count."""
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is bool:
        return type(value) is bool
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if hint is dict:
        return isinstance(value, dict)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return isinstance(value, (dict, hint))
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(type_matches(value, a) for a in args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:  # tuple[T, ...]
        return isinstance(value, (list, tuple)) and all(type_matches(v, args[0]) for v in value)
    if origin is tuple:
        return (isinstance(value, (list, tuple)) and len(value) == len(args)
                and all(type_matches(v, a) for v, a in zip(value, args)))
    if origin is list:
        return isinstance(value, (list, tuple)) and all(type_matches(v, args[0]) for v in value) if args else \
            isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    return True  # a hint this checker does not know: the class's own checks decide


def dataclass_from_dict(cls, data: Any, source: str):
    """Builds dataclass `cls` from `data`, refusing unknown and missing keys and values of the
    wrong type (bool, int, finite number, string, list lengths: `type_matches`). A class's
    `_ADDED_LATER` keys (features added after bundles were first written: key -> the
    format_version from which files name it) may be missing from a file of an older writer
    (a smaller `format_version`; none = 1) and then default to off; a file of this version
    must name them all."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object for {cls.__name__}, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    check_known_keys(data, names, source, f" for {cls.__name__}")
    version = data.get("format_version", 1) if "format_version" in names else 1
    if not (type(version) is int and 1 <= version <= FORMAT_VERSION):
        raise ConfigError(f"{source}: format_version = {version!r}: expected an integer in 1..{FORMAT_VERSION} "
                          f"(a file from a newer flgengine? this one writes {FORMAT_VERSION})")
    added = getattr(cls, "_ADDED_LATER", {})
    if not isinstance(added, dict):  # a tuple: keys that format_version 2 made required
        added = dict.fromkeys(added, 2)
    later = {k for k, since in added.items() if version < since}
    missing = [n for n in names if n not in data and n not in later and n != "format_version"]
    if missing:
        raise ConfigError(f"{source}: missing key {missing[0]!r} for {cls.__name__}")
    hints = get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:  # an _ADDED_LATER key of an older file: its default (off)
            continue
        value = data[f.name]
        sub = hints[f.name]
        if not type_matches(value, sub):
            raise ConfigError(f"{source}: key {f.name!r} = {value!r}: expected {type_name(sub)}")
        if type(value) is int and (sub is float or (typing.get_origin(sub) in (typing.Union, types.UnionType)
                                                     and float in typing.get_args(sub)
                                                     and int not in typing.get_args(sub))):
            value = float(value)  # a number field holds a float (JSON may write 1 for 1.0)
        if isinstance(sub, type) and dataclasses.is_dataclass(sub):
            value = dataclass_from_dict(sub, value, f"{source}: {f.name}")
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {e}") from None


class JsonConfig:
    """Base of the strict configs: a dataclass with a dict / JSON round trip."""

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if dataclasses.is_dataclass(v):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>"):
        return dataclass_from_dict(cls, data, source)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            atomic_write_text(Path(path), text)
        return text

    @classmethod
    def from_json(cls, path: str | Path):
        return cls.from_dict(read_json(path), str(path))


def read_json(path: str | Path) -> Any:
    """The JSON value of a file; a ConfigError naming the file if it is not valid JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def check(cond: bool, msg: str) -> None:
    """A ConfigError with `msg` unless `cond`: the configs' __post_init__ checks."""
    if not cond:
        raise ConfigError(msg)
