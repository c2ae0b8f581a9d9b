"""Command-line flags derived from typed config dataclasses.

``add_dataclass_args(parser, SamplingConfig, prefix="sampling")`` adds ``--sampling.temperature``
etc., typed from the field annotations, with defaults from the dataclass and help from its
docstring's ``Attributes:`` section; ``dataclass_from_args`` builds the (validated) instance back.
Nested dataclass fields become dotted groups (``--optim.lr``).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from typing import Any, Literal, get_args, get_origin


def _attribute_help(cls: type) -> dict[str, str]:
    doc = cls.__doc__ or ""
    m = re.search(r"Attributes:\n(.*?)(?:\n\s*\n|\Z)", doc, re.S)
    out: dict[str, str] = {}
    if not m:
        return out
    current = None
    for line in m.group(1).splitlines():
        fm = re.match(r"\s{4,8}(\w+):\s*(.*)", line)
        if fm:
            current = fm.group(1)
            out[current] = fm.group(2)
        elif current:
            out[current] += " " + line.strip()
    return out


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """Add one ``--prefix.field`` flag per field of dataclass ``cls`` (recursing into nested ones)."""
    hints = typing.get_type_hints(cls)
    helps = _attribute_help(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}.{f.name}" if prefix else f.name
        tp, optional = _strip_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            add_dataclass_args(parser, tp, name)
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": helps.get(f.name, "")}
        kwargs["help"] += f" (default: {default})"
        if get_origin(tp) is Literal:
            kwargs["choices"] = list(get_args(tp))
            kwargs["type"] = type(get_args(tp)[0])
        elif tp is bool:
            kwargs["type"] = _bool
            kwargs["metavar"] = "BOOL"
        elif tp in (int, float, str):
            kwargs["type"] = tp
        elif get_origin(tp) is tuple and get_args(tp)[-1] is Ellipsis and get_args(tp)[0] in (int, float, str):
            kwargs["type"] = get_args(tp)[0]
            kwargs["nargs"] = "+"
        else:
            continue  # other structured fields come from config files, not flags
        if optional:
            inner = kwargs["type"]
            kwargs["type"] = lambda s, inner=inner: None if s.lower() == "none" else inner(s)
        parser.add_argument(f"--{name}", **kwargs)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def dataclass_from_args(cls: type, args: argparse.Namespace, prefix: str = "", base: Any = None) -> Any:
    """Build ``cls`` from flags set on the command line, over ``base`` (or the dataclass defaults)."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        name = f"{prefix}.{f.name}" if prefix else f.name
        tp, _ = _strip_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            # unset flags keep the parent's default for this field (its default_factory may differ
            # from the nested class's own defaults: pretraining's data defaults to the stdlib corpus)
            nested = getattr(base, f.name) if base is not None else _field_default(f)
            values[f.name] = dataclass_from_args(tp, args, name, nested)
        elif hasattr(args, name):
            value = getattr(args, name)
            values[f.name] = tuple(value) if isinstance(value, list) else value
        elif base is not None:
            values[f.name] = getattr(base, f.name)
    return cls(**values)
