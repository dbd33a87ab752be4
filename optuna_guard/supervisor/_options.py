"""Launch options declared once: every ``LaunchConfig`` field carries an :class:`Option`.

gunicorn's ``Setting`` and click's options are the model: an option's flag, help, CLI parser,
default and meaning sit in one place (the field and its metadata), and everything that offers
the option to a user is built from there: the ``optuna-guard run`` parser
(:func:`add_arguments`, :func:`config_kwargs`), ``launch()``'s keyword options, the workers'
settings (``LaunchConfig.worker_options``) and the option table of docs/launcher.md
(:func:`markdown_table`, pasted by ``scripts/gen_options_table.py``).

The CLI parsers here raise ``argparse.ArgumentTypeError``, so a bad value is argparse's one-line
error naming the flag, with exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

from optuna_guard.exceptions import ConfigError

OPTION_KEY = "optuna_guard.option"
Action = Literal["store", "store_true", "store_false", "append"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Option:
    """How one ``LaunchConfig`` field is offered to users.

    ``flag`` is the CLI flag (``--workers``; the metavar of a positional one); ``None`` makes
    the option Python-only. ``help`` is the CLI help (plain text), ``doc`` the docs table's
    meaning (Markdown, default ``help``), ``doc_default`` what the default stands for.
    ``worker`` marks what a worker process needs (:meth:`LaunchConfig.worker_options`);
    ``env`` names the variable that passes the option to the workers' ``@guard``;
    ``internal`` fields are set by the launcher itself and are no option at all.
    """

    help: str
    flag: str | None = None
    metavar: str | None = None
    parse: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    action: Action = "store"
    positional: bool = False
    required: bool = False
    worker: bool = False
    env: str | None = None
    doc: str | None = None
    doc_default: str | None = None
    internal: bool = False


def opt(**kwargs: Any) -> dict[str, Option]:
    """Field metadata: ``field(default=1, metadata=opt(flag="--workers", help=...))``."""
    return {OPTION_KEY: Option(**kwargs)}


def options_of(cls: Any) -> Iterator[tuple[dataclasses.Field[Any], Option]]:
    """The dataclass fields of ``cls`` with their Option, in declaration order."""
    for field in dataclasses.fields(cls):
        option = field.metadata.get(OPTION_KEY)
        if option is None:
            raise TypeError(f"{cls.__name__}.{field.name} declares no Option in its metadata")
        yield field, option


def public_options(cls: Any) -> list[tuple[dataclasses.Field[Any], Option]]:
    """The fields a user may set (not ``internal``)."""
    return [(field, option) for field, option in options_of(cls) if not option.internal]


# ------------------------------------------------------------------------------ value parsers
def number(kind: str, *, positive: bool, allow_off: bool) -> Callable[[str], float | None]:
    """A CLI number of ``kind`` (GB, seconds); ``off``/``none`` is None where ``allow_off``."""

    def parse(text: str) -> float | None:
        if allow_off and text.strip().lower() in ("none", "off"):
            return None
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a number of {kind}, got {text!r}"
            ) from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number of {kind}, got {text!r}")
        if positive and value <= 0:
            raise argparse.ArgumentTypeError(
                f"must be > 0 {kind}, got {text!r}"
                + (" (use 'off' to switch it off)" if allow_off else "")
            )
        if value < 0:
            raise argparse.ArgumentTypeError(f"cannot be negative, got {text!r}")
        return value

    return parse


def integer(minimum: int, *, allow_off: bool = False) -> Callable[[str], int | None]:
    """A CLI integer >= ``minimum``; ``off``/``none`` is None where ``allow_off``."""

    def parse(text: str) -> int | None:
        if allow_off and text.strip().lower() in ("none", "off"):
            return None
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def duration(text: str) -> float:
    """``11h30m``, ``90m`` or seconds; ``launch()`` accepts these strings too."""
    from optuna_guard.time_budget import parse_duration

    try:
        return parse_duration(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def comma_list(text: str) -> tuple[str, ...] | None:
    """``"a, b"`` -> ``("a", "b")``; an empty string is None (the option's default)."""
    if not text:
        return None
    return tuple(part.strip() for part in text.split(",") if part.strip())


def normalize_directions(
    direction: str | Sequence[str] | None, directions: Sequence[str] | str | None
) -> tuple[str, ...]:
    """``direction="maximize"`` or ``directions=[...]`` (or "minimize,maximize") -> a tuple."""
    if directions is not None and direction is not None:
        raise ConfigError("pass either direction or directions, not both.")
    raw: Sequence[str] | str = directions if directions is not None else (direction or "minimize")
    if isinstance(raw, str):
        raw = [part.strip() for part in raw.split(",") if part.strip()]
    return tuple(raw)


def directions_arg(text: str) -> tuple[str, ...]:
    """``--direction minimize,maximize``; LaunchConfig checks the names."""
    return normalize_directions(text, None)


# -------------------------------------------------------------------------------- CLI parser
def add_arguments(parser: argparse.ArgumentParser, cls: Any) -> None:
    """One ``add_argument`` per field with a flag; ``dest`` is the field name."""
    for field, option in options_of(cls):
        if option.flag is None:
            continue
        kwargs: dict[str, Any] = {"help": option.help.replace("%", "%%") or None}
        if option.metavar is not None or option.positional:
            kwargs["metavar"] = option.metavar or option.flag
        if option.action in ("store_true", "store_false"):
            kwargs.pop("metavar", None)
            parser.add_argument(option.flag, dest=field.name, action=option.action, **kwargs)
            continue
        if option.parse is not None:
            kwargs["type"] = option.parse
        if option.choices is not None:
            kwargs["choices"] = option.choices
        if option.positional:
            parser.add_argument(field.name, **kwargs)
            continue
        if option.required:
            kwargs["required"] = True
        elif option.action == "append":
            kwargs.update(action="append", default=list(default_of(field)))
        else:
            kwargs["default"] = field.default
        parser.add_argument(option.flag, dest=field.name, **kwargs)


def config_kwargs(args: argparse.Namespace, cls: Any) -> dict[str, Any]:
    """The ``cls(...)`` keywords of parsed CLI arguments (every field with a flag)."""
    return {
        field.name: getattr(args, field.name)
        for field, option in options_of(cls)
        if option.flag is not None
    }


# ------------------------------------------------------------------------------- docs table
BEGIN_MARKER = (
    "<!-- options table: generated from LaunchConfig's field metadata by "
    "scripts/gen_options_table.py; edit supervisor/_config.py, not this table -->"
)
END_MARKER = "<!-- end of options table -->"
TABLE_HEADER = "| CLI | Python | default | meaning |\n|---|---|---|---|"


def default_of(field: dataclasses.Field[Any]) -> Any:
    """A field's default; ``dataclasses.MISSING`` for a required option."""
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def markdown_table(cls: Any) -> str:
    """The option table of docs/launcher.md: one row per public field, defaults as Python
    literals (``None`` and what it means), so a test can read them back."""
    rows = [TABLE_HEADER]
    for field, option in public_options(cls):
        cli = "–" if option.flag is None else f"`{option.flag}`"
        default = default_of(field)
        cell = "required" if default is dataclasses.MISSING else f"`{default!r}`"
        if option.doc_default:
            cell += f": {option.doc_default}"
        # the CLI help's "(default ...)" is the default column here
        meaning = option.doc or re.sub(r" \(default[^()]*\)$", "", option.help)
        if option.env:
            meaning += f" (passed to workers as `{option.env}`)"
        cells = (cli, f"`{field.name}`", cell, meaning)
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)
