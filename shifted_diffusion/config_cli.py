"""Frozen configuration dataclasses <-> YAML presets and command-line flags, for every trainer.

A config class subclasses ``FlagConfig`` and is a frozen dataclass whose ``__post_init__`` validates.
``build_parser(cls)`` generates one flag per field (``--<field>``), so a YAML file and a flag set the same
field; ``parse_settings(cls, argv)`` resolves (dataclass defaults) < ``defaults`` < ``--config`` YAML files
in order < explicit flags. Booleans are real booleans (``--use_ema`` / ``--no-use_ema``), never
``type=bool``. Field metadata tunes a flag: ``help``, ``nargs`` ("+" or "*", for sequences) or
``comma_separated`` (a sequence given as one "a,b,c" value).
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, ClassVar, Optional, Sequence

import yaml

NONE_STRINGS = ("none", "null", "")


def _optional_inner(tp):
    """(X, True) for Optional[X], (tp, False) otherwise."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return tp, False


def _is_sequence(tp) -> bool:
    return typing.get_origin(tp) in (list, tuple, collections.abc.Sequence)


class FlagConfig:
    """Mixin of the config dataclasses: dict / JSON round trip, unknown keys refused naming the script."""

    SCRIPT: ClassVar[str] = "the script"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict):
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ValueError(f"unknown training setting(s) {unknown}; see `python {cls.SCRIPT} --help`")
        values = {}
        for name, value in d.items():
            tp, optional = _optional_inner(hints[name])
            if optional and isinstance(value, str) and value.lower() in NONE_STRINGS:
                value = None
            elif tp in (int, float) and isinstance(value, str):
                # YAML 1.1 reads 1e-4 (no dot) as a string, also in a saved train_config.json read as --config
                try:
                    value = tp(value)
                except ValueError:
                    raise ValueError(f"--{name}: expected {'an integer' if tp is int else 'a number'}, got "
                                     f"{value!r}") from None
            elif _is_sequence(tp) and value is not None:
                if isinstance(value, str):
                    value = [m for m in value.split(",") if m] if fields[name].metadata.get("comma_separated") \
                        else [value]
                value = tuple(value)
            values[name] = value
        return cls(**values)

    def save(self, path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _number_or_none(tp):
    """argparse type of an optional number: "none" / "null" stays a string (``from_dict`` makes it None, so a flag
    can clear what a YAML preset set, e.g. ``--max_train_steps none``), anything else must parse as ``tp``."""
    def parse(text: str):
        return text if text.lower() in NONE_STRINGS else tp(text)

    parse.__name__ = tp.__name__  # argparse's "invalid int value: ..."
    return parse


def _default_text(f: dataclasses.Field) -> str:
    default = f.default
    if isinstance(default, tuple):
        default = ",".join(default) if f.metadata.get("comma_separated") else " ".join(default)
    return f"(default {default})"


def build_parser(cls, description: str = "", prog: Optional[str] = None) -> argparse.ArgumentParser:
    """``--config FILE`` (repeatable) and one flag per field of the dataclass ``cls``; every flag's default is
    None, meaning "not given", so it never overrides a YAML value it was not asked to."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[], help="YAML file(s) of settings (keys = flag names); "
                        "later files and flags override earlier ones")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, optional = _optional_inner(hints[f.name])
        flag, help_text = f"--{f.name}", f"{f.metadata.get('help', '')} {_default_text(f)}".strip()
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif _is_sequence(tp) and not f.metadata.get("comma_separated"):
            parser.add_argument(flag, nargs=f.metadata.get("nargs", "+"), default=None, help=help_text)
        else:
            number = _number_or_none(tp) if optional and tp in (int, float) else tp
            parser.add_argument(flag, type=number if tp in (int, float) else str, default=None, help=help_text)
    return parser


def resolve_values(args: argparse.Namespace, defaults: Optional[dict] = None) -> dict:
    """The settings of parsed flags: ``defaults`` < YAML files (in order) < the flags given."""
    values: dict[str, Any] = dict(defaults or {})
    for path in args.config:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--config {path}: no such file")
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {path}: expected a mapping of settings, got {type(loaded).__name__}")
        values.update(loaded)
    values.update({k: v for k, v in vars(args).items() if k != "config" and v is not None})
    return values


def parse_settings(cls, argv: Optional[Sequence[str]] = None, defaults: Optional[dict] = None,
                   parser: Optional[argparse.ArgumentParser] = None):
    """An instance of ``cls`` from (dataclass defaults) < ``defaults`` < YAML files < explicit flags. Bad
    values raise ValueError (from the dataclass's validate) naming the flag."""
    parser = parser or build_parser(cls)
    return cls.from_dict(resolve_values(parser.parse_args(argv), defaults))
