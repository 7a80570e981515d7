"""
Config files and `--key=value` overrides, for every entry point (train, schedule, eval, demo, toy, sweep).

    cfg = load_config("configs/stage1.py", ["--limit=3000"], train.Config)

A config is a dataclass with defaults. A config file is plain Python assignments (nanoGPT style), run
in a namespace of its own (`__file__` is set, so a config can exec another one beside it); every name
it assigns must be a field, and its value must have the field's type (an int passes for a float).
An override splits on the first "=" and converts the text to the field's type: lists and dicts as
JSON, bools as true/false/1/0, None for a field typed `T | None`, and for `int | str` an int where the
text is one (`--rollout_batch=auto` or `=64`). Last, the dataclass's `check()` checks the values (ranges, choices,
combinations) so that a bad value fails, naming its key, before any model loads.
"""

import json
import types
from dataclasses import fields
from pathlib import Path


def _members(typ) -> tuple:
    """The types a field typed `A | B` (None included) may hold, in order; (typ,) for a plain type."""
    return typ.__args__ if isinstance(typ, types.UnionType) else (typ,)


def _name(typ) -> str:
    return " | ".join("None" if t is type(None) else t.__name__ for t in _members(typ))


def typed(where: str, key: str, value, typ):
    """`value` (from a config file) as a field of type `typ`: ints pass as floats, nothing else converts; a
    union takes the first of its types that fits."""
    for t in _members(typ):
        if t is type(None):
            if value is None:
                return None
        elif (isinstance(value, t) or (t is float and isinstance(value, int))) and \
                (t is bool or not isinstance(value, bool)):
            return t(value)
    raise ValueError(f"{where}: {key} = {value!r} should be of type {_name(typ)}")


def convert(key: str, text: str, typ):
    """The text of `--key=text` as a value of type `typ`: "None" for a field that may be None; a union takes
    the first of its types that parses the text (`int | str`: "64" is 64, "auto" is "auto")."""
    if len(_members(typ)) > 1:
        if text == "None" and type(None) in _members(typ):
            return None
        for t in _members(typ):
            if t is type(None):
                continue
            try:
                return convert(key, text, t)
            except ValueError:
                pass
        raise ValueError(f"--{key}={text}: expected {_name(typ)}")
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
