"""`python -m server`'s command line, generated from the two config dataclasses.

Every field of `EngineConfig` (server/engine/config.py) and `ServerConfig` (server/openai/config.py) is an option:
its flag, type, choices, help and default come from the field, so each is written once and `--help` shows it. A
preset (`--config FILE.yaml`) sets the same fields by name; flags override the preset, the preset overrides the
defaults, and an unknown key or a value of the wrong type is an error naming it.
"""

from __future__ import annotations

import argparse
import os
import types
import typing
from dataclasses import MISSING, Field, fields
from pathlib import Path
from typing import Any

import yaml

from server.engine.config import EngineConfig
from server.openai.config import API_KEY_ENV, ServerConfig

CONFIGS = (EngineConfig, ServerConfig)


def options(cls) -> list[tuple[Field, type]]:
    """The fields of `cls` that are options, each with the type a value is read as."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        if not f.init or "help" not in f.metadata:
            continue
        kinds = [k for k in typing.get_args(hints[f.name]) or (hints[f.name],) if k is not type(None)]
        # A union of several types is read from text (a size such as 1GiB, comma-separated origins, NAME=VALUE).
        kind = kinds[0] if len(kinds) == 1 and kinds[0] in (bool, int, float, str) else str
        out.append((f, kind))
    return out


def default_text(f: Field) -> str:
    if f.metadata.get("shown"):
        return f.metadata["shown"]
    default = f.default if f.default is not MISSING else f.default_factory()
    return "on" if default is True else "off" if default is False else str(default)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m server", description="OpenAI-compatible server for Llama 3 models")
    p.add_argument("--config", help="a YAML preset of these options (e.g. configs/smollm2-cpu.yaml); flags "
                   "override it")
    for cls in CONFIGS:
        group = p.add_argument_group(f"{cls.__name__} ({cls.__module__.replace('.', '/')}.py)")
        for f, kind in options(cls):
            meta = f.metadata
            flag = meta["flag"] or "--" + f.name.replace("_", "-")
            text = f"{meta['help']} (default: {default_text(f)})"
            # None: not given, so the preset's value or the field's default holds.
            if kind is bool and f.default is True:
                group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
            elif kind is bool:
                group.add_argument(flag, dest=f.name, action="store_true", default=None, help=text)
            elif meta["repeat"]:
                group.add_argument(flag, dest=f.name, action="append", metavar=meta["metavar"], default=None,
                                   help=text + "; repeatable")
            else:
                group.add_argument(flag, dest=f.name, type=kind, choices=meta["choices"], metavar=meta["metavar"],
                                   default=None, help=text)
    return p


def read_preset(path: Path) -> dict[str, Any]:
    """A preset's options by field name, each checked against its field's type."""
    if not path.is_file():
        raise SystemExit(f"config file {path} does not exist")
    preset = yaml.safe_load(path.read_text()) or {}
    if not isinstance(preset, dict):
        raise SystemExit(f"config file {path} must be a mapping of option names to values")
    preset = {str(k).replace("-", "_"): v for k, v in preset.items()}
    hints = {f.name: typing.get_type_hints(cls)[f.name] for cls in CONFIGS for f, _ in options(cls)}
    unknown = sorted(set(preset) - set(hints))
    if unknown:
        raise SystemExit(f"unknown option(s) in {path}: {', '.join(unknown)}")
    for name, value in preset.items():
        if not _fits(value, hints[name]):
            raise SystemExit(f"config file {path}: {name} must be {_describe(hints[name])}, got {value!r}")
    return preset


def _fits(value: Any, hint: Any) -> bool:
    """Whether a YAML value may set a field annotated `hint` (an int where a float is wanted, never a bool)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    origin = typing.get_origin(hint) or hint
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if isinstance(origin, type) and hasattr(origin, "parse"):  # a dataclass read from a mapping (Limits)
        return isinstance(value, dict)
    return isinstance(value, origin)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "null"
    origin = typing.get_origin(hint) or hint
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
            tuple: "a list"}.get(origin, f"a mapping ({getattr(origin, '__name__', origin)})")


def resolve_settings(argv: list[str] | None = None) -> tuple[EngineConfig, ServerConfig]:
    """The engine's and the server's settings from the command line (and the preset it names)."""
    args = build_parser().parse_args(argv)
    preset = read_preset(Path(args.config)) if args.config else {}
    given = {**preset, **{k: v for k, v in vars(args).items() if v is not None and k != "config"}}
    if "served_model_name" not in given and given.get("model"):
        given["served_model_name"] = str(given["model"]).rstrip("/")
    if "api_key" not in given and os.environ.get(API_KEY_ENV):
        given["api_key"] = os.environ[API_KEY_ENV]
    configs = []
    for cls in CONFIGS:
        names = {f.name for f, _ in options(cls)}
        try:
            configs.append(cls(**{k: v for k, v in given.items() if k in names}))
        except (ValueError, TypeError) as e:
            raise SystemExit(f"invalid setting: {e}") from None
    engine, server = configs
    return engine, server
