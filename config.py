"""
Config files and `--key=value` overrides, for every entry point (train, schedule, eval, demo, toy, sweep).

    cfg = load_config("configs/stage1.py", ["--limit=3000"], train.Config)

A config is a dataclass with defaults. A config file is plain Python assignments (nanoGPT style), run
in a namespace of its own (`__file__` is set, so a config can exec another one beside it); every name
it assigns must be a field, and its value must have the field's type (an int passes for a float).
An override splits on the first "=" and converts the text to the field's type: lists and dicts as
JSON, bools as true/false/1/0, None for a field typed `T | None`. Last, the dataclass's `check()` checks the values (ranges, choices,
combinations) so that a bad value fails, naming its key, before any model loads.
"""

import json
import types
from dataclasses import fields
from pathlib import Path


def _optional(typ):
    """T for a field typed `T | None`, else None."""
    if isinstance(typ, types.UnionType) and type(None) in typ.__args__:
        return next(t for t in typ.__args__ if t is not type(None))
    return None


def typed(where: str, key: str, value, typ):
    """`value` (from a config file) as a field of type `typ`: ints pass as floats, nothing else converts."""
    if _optional(typ):
        return None if value is None else typed(where, key, value, _optional(typ))
    if not (isinstance(value, typ) or (typ is float and isinstance(value, int))) or \
            (typ is not bool and isinstance(value, bool)):
        raise ValueError(f"{where}: {key} = {value!r} should be of type {typ.__name__}")
    return typ(value)


def convert(key: str, text: str, typ):
    """The text of `--key=text` as a value of type `typ` ("None" for a field typed `T | None`)."""
    if _optional(typ):
        return None if text == "None" else convert(key, text, _optional(typ))
    if typ in (list, dict):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = None
        if not isinstance(value, typ):
            raise ValueError(f"--{key}={text}: expected a JSON {typ.__name__}")
        return value
    if typ is bool:
        if text.lower() in ("true", "1", "false", "0"):
            return text.lower() in ("true", "1")
        raise ValueError(f"--{key}={text}: expected true/false/1/0")
    try:
        return typ(text)
    except ValueError:
        raise ValueError(f"--{key}={text}: expected {typ.__name__}") from None


def load_config(path, overrides: list[str], cls):
    """Defaults of the dataclass `cls` <- assignments in the file at `path` (None: no file) <- overrides."""
    cfg, types = cls(), {f.name: f.type for f in fields(cls)}
    if path:
        ns: dict = {"__file__": str(path)}
        exec(compile(Path(path).read_text(), str(path), "exec"), ns)
        for key, value in ns.items():
            if key.startswith("__") or type(value).__name__ == "module":
                continue
            if key not in types:
                raise ValueError(f"{path}: unknown config key {key!r}")
            setattr(cfg, key, typed(str(path), key, value, types[key]))
    for arg in overrides:
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"{arg!r}: overrides are --key=value")
        key, text = arg[2:].split("=", 1)
        if key not in types:
            raise ValueError(f"--{key}: unknown config key")
        setattr(cfg, key, convert(key, text, types[key]))
    cfg.check()
    return cfg


def check(ok: bool, key: str, value, want: str):
    """A config value's test: raises `key=value: want` when not ok."""
    if not ok:
        raise ValueError(f"{key}={value!r}: {want}")


def choice(key: str, value, choices: tuple):
    check(value in choices, key, value, f"must be one of {', '.join(map(repr, choices))}")
