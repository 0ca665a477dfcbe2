"""CLI options generated from a config dataclass, so no option list restates a config.

Each field of a frozen config dataclass (a `ServiceConfig` or any other) becomes one
option: `--field-name`, typed from the field's annotation (int, float, str, bool as
`--x/--no-x`, and `tuple[str, ...]` as comma-separated text), with the field's
docstring as its help, followed by `[env AGENTMESH_FIELD; default ...]`. Every option
defaults to None, so `config.load` stays the one reader of the environment: a flag
given wins over AGENTMESH_<FIELD>, which wins over the field's default.

Help comes from the field docstrings (the string right after each field, the style
every config here already uses), read with `ast` from the class source at run time,
base classes first so that a subclass can document a field again. The docstring stays
the single source: no `metadata={"help": ...}` to keep in step with it. A field whose
type has no flag form (a mapping, say) is left to its environment variable.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from collections.abc import Mapping
from typing import Any

import typer
from rich.markup import escape

FLAG_TYPES = (bool, int, float, str)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name → its docstring (whitespace folded), from `cls` and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue  # no source (a frozen app): the options go without help
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _flag_type(hint: Any) -> Any:
    """The type a flag parses for a field annotated `hint`; None when it has no flag form."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else None
    if hint in FLAG_TYPES:
        return hint
    if typing.get_origin(hint) is tuple:
        return tuple
    return None


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _default(field: dataclasses.Field[Any]) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def field_help(cls: type, name: str) -> str:
    """`name`'s docstring, then where else it can be set and its default."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    kind = _flag_type(typing.get_type_hints(cls)[name])
    where = [f"env AGENTMESH_{name.upper()}"]
    if kind is tuple:
        where.insert(0, "comma-separated")
    shown = _shown(_default(field))
    if shown:
        where.append(f"default {shown}")
    doc = field_docs(cls).get(name, "")
    # escaped: rich reads [..] as markup and would drop "[env ...]" and "NAME[=VALUE]"
    return escape(f"{doc} [{'; '.join(where)}]".strip())


def _decls(cls: type, name: str) -> list[str]:
    if _flag_type(typing.get_type_hints(cls)[name]) is not bool:
        return []  # typer names the option after the parameter
    flag = name.replace("_", "-")
    return [f"--{flag}/--no-{flag}"]


def field_option(cls: type, name: str) -> Any:
    """One field's option, for `Annotated[T | None, field_option(cls, name)] = None` in a
    hand-written command."""
    return typer.Option(*_decls(cls, name), help=field_help(cls, name), show_default=False)


def parameters(cls: type) -> list[inspect.Parameter]:
    """One keyword parameter per field of `cls` that a flag can set, for a command's
    `__signature__`."""
    hints = typing.get_type_hints(cls)
    out = []
    for field in dataclasses.fields(cls):
        kind = _flag_type(hints[field.name])
        if not field.init or kind is None:
            continue
        annotation = str if kind is tuple else kind
        out.append(
            inspect.Parameter(
                field.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(
                    None,
                    *_decls(cls, field.name),
                    help=field_help(cls, field.name),
                    show_default=False,
                ),
                annotation=annotation | None,
            )
        )
    return out


def overrides(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """The values the flags gave (None: not given), as `config.load` takes them."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for name, value in values.items():
        if value is not None and _flag_type(hints[name]) is tuple:
            value = tuple(p.strip() for p in value.split(",") if p.strip())
        out[name] = value
    return out
