"""The text report: the blocks of :mod:`._tables` drawn as rich tables and lines."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table as RichTable

from optuna_guard.analysis._tables import Block, Cell, Note, Table, report_blocks

_NOTE_STYLE = {"plain": "", "note": "", "warn": "yellow"}


def render_text(report: Mapping[str, Any], *, width: int = 110) -> str:
    """The report as plain text (no colour codes), e.g. for a file."""
    buffer = io.StringIO()
    console = Console(
        file=buffer, width=width, color_system=None, force_terminal=False, highlight=False
    )
    print_report(report, console)
    return buffer.getvalue()


def print_report(report: Mapping[str, Any], console: Console) -> None:
    """Print the report on ``console`` (colours when it is a terminal)."""
    study = report["study"]
    directions = ", ".join(study["directions"])
    console.print(
        f"[bold]Study {escape(study['name'])}[/bold]: {study['n_trials']} trials ({directions})"
    )
    if study["first_start"]:
        console.print(f"from {study['first_start']} to {study['last_complete'] or 'now'}")
    for block in report_blocks(report):
        console.print(rich_block(block))


def rich_block(block: Block) -> RichTable | str:
    """A table as a rich Table, a note as a line of rich markup (text escaped)."""
    if isinstance(block, Note):
        style = _NOTE_STYLE[block.kind]
        return f"[{style}]{escape(block.text)}[/{style}]" if style else escape(block.text)
    return rich_table(block)


def rich_table(table: Table) -> RichTable | str:
    if not table.rows and table.empty is not None:
        return f"{escape(table.title)}: {escape(table.empty)}"
    drawn = RichTable(title=escape(table.title))
    for column in table.columns:
        drawn.add_column(escape(column.name), justify="right" if column.numeric else "left")
    for row in table.rows:
        drawn.add_row(*(_cell(c) for c in row))
    return drawn


def _cell(cell: Cell) -> str:
    return escape(cell if isinstance(cell, str) else "\n".join(cell))
