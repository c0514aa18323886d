"""Typer parameters made from the pydantic option models, so each option is declared once.

A command is written as ``def command(**given)`` under ``@options_of(SomeConfig)``: the helper
gives it a signature with one parameter per field of the model (help from the field's
description, the default appended from the field's default), so Typer parses exactly the options
the model validates. Every parameter defaults to ``None``, meaning "not given", so that a config
file (``train --config``) and the model's own defaults fill in what the command line leaves out.

A field named in ``config.POSITIONAL`` is an argument; its ``json_schema_extra`` may give other
flags (``{"flags": ["--output", "-o"]}``). A boolean is a ``--name/--no-name`` flag.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
import typer.core
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from rich.markup import escape

from ascension_cli.config import POSITIONAL, option_name


def _default_text(field: FieldInfo) -> str:
    if field.is_required():
        return ""
    default = field.get_default(call_default_factory=True)
    if default is None or default == []:
        return ""  # the description says what happens (a repeated option given no times)
    if isinstance(default, bool):
        default = "on" if default else "off"
    return f" (default: {default})"


def _cli_type(annotation: Any) -> Any:
    """The type Typer parses: the field's, less pydantic's validators and the ``None`` option."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _cli_type(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        kept = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return _cli_type(kept[0]) if len(kept) == 1 else str
    if origin is list:
        return list[_cli_type(typing.get_args(annotation)[0])]
    if annotation in (int, float, str, bool, Path):
        return annotation
    return str  # a Literal too: pydantic, not Typer, refuses a wrong choice, in one line


def _choices(annotation: Any) -> str | None:
    """``a|b|c`` for a Literal field (optional, or a list of them), shown where Typer shows the
    type."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    if typing.get_origin(annotation) is list:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) is Literal:
        return "|".join(str(choice) for choice in typing.get_args(annotation))
    return None


def _repeated(parsed: Any) -> str | None:
    """``TEXT`` or ``PATH`` for an option given once per value (``--photo A --photo B``),
    where Typer would show the Python type."""
    if typing.get_origin(parsed) is not list:
        return None
    return "PATH" if typing.get_args(parsed)[0] is Path else "TEXT"


def _parameter(name: str, field: FieldInfo) -> inspect.Parameter:
    parsed = _cli_type(field.annotation)
    # Rich markup would take "[mlflow]" in a help text for a style tag and drop it.
    help_text = escape((field.description or "") + _default_text(field))
    if name in POSITIONAL:
        info = typer.Argument(help=help_text, show_default=False, metavar=name.upper())
        default = ... if field.is_required() else None
    else:
        flags = list((field.json_schema_extra or {}).get("flags", [option_name(name)]))
        if parsed is bool:
            flags = [f"{flags[0]}/--no-{flags[0].removeprefix('--')}", *flags[1:]]
        info = typer.Option(*flags, help=help_text, show_default=False,
                            metavar=_choices(field.annotation) or _repeated(parsed))
        default = ... if field.is_required() else None
    annotation = Annotated[parsed if default is ... else parsed | None, info]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=annotation)


def extra_option(name: str, parsed: Any, help_text: str) -> inspect.Parameter:
    """A command-line option that is not a field of the command's model (``--config``)."""
    info = typer.Option(option_name(name), help=escape(help_text), show_default=False)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[parsed | None, info])


def options_of(
    model: type[BaseModel], *extra: inspect.Parameter
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give ``def command(**given)`` one parameter per field of ``model``, then ``extra``."""

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        fields = [_parameter(name, field) for name, field in model.model_fields.items()]
        arguments = [p for p in fields if p.name in POSITIONAL]
        options = [p for p in fields if p.name not in POSITIONAL]
        command.__signature__ = inspect.Signature([*arguments, *options, *extra])
        return command

    return decorate


def given(values: dict[str, Any]) -> dict[str, Any]:
    """The options given on the command line (Typer passes ``None`` for the others)."""
    return {key: value for key, value in values.items() if value is not None}


def _flags_show_no_type(self: typer.core.TyperOption, ctx: Any) -> str | None:
    # Typer prints a type column for every option, "<bool>" for flags, which reads as if the
    # flag took a value (--help <bool>); a flag shows none.
    return None if self.is_flag else _display_type(self, ctx)


_display_type = typer.core.TyperOption.display_type_rich
typer.core.TyperOption.display_type_rich = _flags_show_no_type
