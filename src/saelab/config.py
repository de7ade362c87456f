"""Config dataclasses <-> command-line flags, one to one; and what a verb is.

Each verb has one frozen, kw_only dataclass; every field has an attribute docstring, which
becomes its `--help`. `add_config_arguments` turns the fields into flags (`n_latents` ->
`--n-latents`; `bool` -> `--x/--no-x`; `Literal` -> choices; `tuple[str, ...]` -> a flag
that takes comma-separated values or repeats; a field named in the class's `POSITIONAL` is an
argument without a flag), and `config_from_args` builds the dataclass back. (simple_parsing,
which does the same, spells flags with underscores and cannot repeat a flag into a tuple.)
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import textwrap
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

T = TypeVar("T")


@dataclass(frozen=True)
class Verb:
    """A `saelab` subcommand: its config (the flags), what it runs, and the lines it prints
    of the result. Each module in `saelab.verbs` defines one (or a few); `cli` lists them."""

    config: type
    """The frozen dataclass whose fields are the flags."""
    run: Callable[[Any], Any]
    """config -> result (also the verb's Python entry point)."""
    summary: Callable[[Any], list[str]]
    """result -> the lines printed after the run."""
    help: str
    """One line for `saelab --help`."""


def say(line: str) -> None:
    """One line of a verb's output to standard output, flushed (progress bars use stderr)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass: the string literal right under each field."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body  # type: ignore[attr-defined]
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _strip_optional(tp: Any) -> Any:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _parser_for(tp: Any) -> tuple[dict[str, Any], bool]:
    """argparse keywords for a field type, and whether the flag repeats into a tuple."""
    tp = _strip_optional(tp)
    if get_origin(tp) is tuple:
        inner, _ = _parser_for(get_args(tp)[0])
        return {"type": _comma_separated(inner["type"], inner.get("choices"))}, True
    if get_origin(tp) is Literal:
        choices = get_args(tp)
        return {"type": type(choices[0]), "choices": choices}, False
    if tp in (str, int, float, Path):
        return {"type": tp}, False
    raise TypeError(f"no command-line form for a field of type {tp}")


def _comma_separated(convert: Any, choices: tuple | None) -> Any:
    """A flag value `a,b,c` -> [a, b, c], each converted and checked against `choices`."""
    def parse(text: str) -> list[Any]:
        items = [convert(part.strip()) for part in text.split(",") if part.strip()]
        bad = [] if choices is None else [item for item in items if item not in choices]
        if bad and choices is not None:
            raise argparse.ArgumentTypeError(
                f"invalid choice {bad[0]!r} (choose from {', '.join(map(str, choices))})")
        return items

    return parse


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per field of dataclass `cls` to `parser`."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    positional = getattr(cls, "POSITIONAL", ())  # fields named without a flag: `saelab info SPEC`
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = docs.get(f.name, "")
        tp = hints[f.name]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default if f.default is not dataclasses.MISSING
                                         else f.default_factory())  # type: ignore[misc]
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
            continue
        kwargs, repeats = _parser_for(tp)
        if f.name in positional:
            parser.add_argument(f.name, nargs=None if required else "?", help=help_text,
                                metavar=f.name.upper(), **kwargs)
            continue
        if repeats:
            kwargs["action"] = "extend"
            help_text += " Several: comma-separated, or repeat the flag."
        shown = ", ".join(map(str, default)) if isinstance(default, tuple) else default
        if not required and shown is not None:
            help_text += f" (default: {shown})"
        if "choices" not in kwargs:
            kwargs["metavar"] = f.name.upper()
        parser.add_argument(flag, dest=f.name, required=required, default=None,
                            help=help_text, **kwargs)


def config_from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """The dataclass `cls` from parsed flags; flags not given keep the field defaults."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)  # type: ignore[arg-type]
             if getattr(args, f.name, None) is not None}
    hints = typing.get_type_hints(cls)
    for name, value in given.items():
        if isinstance(value, list) and get_origin(_strip_optional(hints[name])) is tuple:
            given[name] = tuple(value)
    return cls(**{**given, **overrides})
