"""One way to bind a config dataclass to command-line flags: a flag per field (`--field-name`, typed from
the annotation, the default shown), and back from the parsed arguments to a {field: value} dict of the
flags that were given (None = not given, so a --config file or the dataclass default stays).
A field's metadata may add "help", "choices", "metavar", "required" and "none" (what None means)
(`field(metadata=flag(...))`)."""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, fields


def base_types(hint) -> tuple[type, ...]:
    """int -> (int,); list[str] | None -> (list, NoneType); dict[str, float] -> (dict,)."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return tuple(typing.get_origin(a) or a for a in args)


def typed(cls, name: str, value):
    """`value` checked against the annotation of `cls.name` (ints accepted for floats)."""
    hint = typing.get_type_hints(cls)[name]
    allowed = base_types(hint)
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
        raise ValueError(f"config key {name!r} must be {hint}, got {value!r}")
    return value


def flag(help: str | None = None, **kwargs) -> dict:
    """A field's flag settings, as dataclass field metadata: help, choices, metavar, required."""
    return {"help": help, **kwargs}


def flag_fields(cls, skip: tuple[str, ...] = (), only: tuple[str, ...] | None = None) -> list:
    """The fields of `cls` that become flags: those of a bool, int, float, str or list type, not in `skip`
    (and in `only` when given)."""
    hints = typing.get_type_hints(cls)
    return [f for f in fields(cls) if f.name not in skip and (only is None or f.name in only)
            and ({bool, int, float, str, list} & set(base_types(hints[f.name])))]


def _default(f):
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None


def add_flags(group, cls, skip: tuple[str, ...] = (), only: tuple[str, ...] | None = None) -> None:
    """A `--field-name` flag for every field of `cls` (see flag_fields); default None = not given."""
    hints = typing.get_type_hints(cls)
    for f in flag_fields(cls, skip, only):
        base = base_types(hints[f.name])
        name = "--" + f.name.replace("_", "-")
        meta = {k: v for k, v in f.metadata.items() if v is not None}
        default = _default(f)
        shown = meta.pop("help", None) or ""
        unset = meta.pop("none", "none")  # what leaving it unset means
        if not meta.get("required"):
            shown += ("; " if shown else "") + f"default: {unset if default is None else default}"
        shown = shown.replace("%", "%%")  # argparse formats help strings
        if bool in base:
            group.add_argument(name, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=shown)
        elif list in base:
            group.add_argument(name, dest=f.name, nargs="+", default=None, metavar=meta.pop("metavar", "M"),
                               help=shown, **meta)
        else:
            kind = next(t for t in base if t in (int, float, str))
            group.add_argument(name, dest=f.name, type=kind, default=None, help=shown, **meta)


def given(args: argparse.Namespace, cls, skip: tuple[str, ...] = (), only: tuple[str, ...] | None = None) -> dict:
    """{field: value} of the flags of `cls` given on the command line."""
    return {f.name: getattr(args, f.name) for f in flag_fields(cls, skip, only) if getattr(args, f.name, None) is not None}
