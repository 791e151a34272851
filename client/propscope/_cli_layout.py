"""How the CLI lays out rows of results so that no number or name is ever cut: a table when
every cell fits the console on one line, else a stacked block per row; and ``key=value`` lines
for ``--format plain``.

A number is written whole in a bounded width (``number``: at most 11 characters), so a column
of them is as wide as its widest value; text columns marked ``wraps`` (settings, lists) may wrap
at spaces, every other column keeps its cells on one line.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

__all__ = ["Column", "logfmt", "number", "print_rows"]

Cell = str | Text
_UNBOUNDED = 100_000


def number(value: float | None, digits: int = 4) -> str:
    """``digits`` significant digits, whole: 0.09091, 9.342e-06, -1.5e+10; "n/a" when
    undefined. At most ``digits`` + 7 characters (sign, point and a three-digit exponent)."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}g}"


@dataclass(frozen=True)
class Column:
    """A column: its header, right-justified numbers or left-justified text, whether its cells
    may wrap at spaces (a long list) rather than stay on one line, and what names its cells in
    a stacked block (default: the header; "" for cells that name themselves, e.g. key=value)."""

    header: str
    numeric: bool = False
    wraps: bool = False
    label: str | None = None


def print_rows(
    console: Console,
    title: str,
    columns: Sequence[Column],
    rows: Sequence[Sequence[Cell]],
) -> None:
    """``rows`` (first cell: the row's name) as a table when it fits ``console``'s width
    without cutting or folding a cell, else as one block per row: its name, then its
    ``header value`` pairs packed on lines, never split inside a pair. An empty ``title``:
    none (the caller printed its own)."""
    table = _table(title, columns, rows)
    # Measured as if the console were unbounded: rich clamps a measure to the console's width.
    needed = console.measure(table, options=console.options.update_width(_UNBOUNDED)).minimum
    if needed <= console.width:
        console.print(table)
        return
    if title:
        console.print(Text(title, style="bold"))
    for row in rows:
        for line in _block(columns, row, console.width):
            console.print(line)


def _table(title: str, columns: Sequence[Column], rows: Sequence[Sequence[Cell]]) -> Table:
    table = Table(
        title=title or None,
        box=box.SIMPLE_HEAD,
        title_justify="left",
        title_style="bold",
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
    )
    for index, column in enumerate(columns):
        # A cell on one line needs its whole width: rich's own measure would let it shrink to
        # its longest word, and then cut it.
        whole = max(
            [len(column.header)]
            + [line.cell_len for row in rows for line in _text(row[index]).split("\n")]
        )
        table.add_column(
            column.header,
            justify="right" if column.numeric else "left",
            no_wrap=not column.wraps,
            overflow="fold",
            min_width=None if column.wraps else whole,
        )
    for row in rows:
        table.add_row(*row)
    return table


def _block(columns: Sequence[Column], row: Sequence[Cell], width: int) -> list[Text]:
    """The row's name on its own line, then its non-empty cells as ``label value`` items,
    indented and packed greedily into lines of ``width``; a wrapping column's cell (a list)
    starts a line, and each further line of a cell is an item of its own. An item wider than a
    line gets a line of its own (wrapped at its spaces)."""
    items: list[tuple[Text, bool]] = []  # (item, starts a line)
    for column, cell in zip(columns[1:], row[1:], strict=True):
        parts = [part for part in _text(cell).split("\n") if part.plain.strip()]
        label = column.header if column.label is None else column.label
        for index, part in enumerate(parts):
            first = index == 0
            item = Text(f"{label} ", style="dim") + part if first and label else part
            items.append((item, first and column.wraps))
    lines = [Text(str(row[0]), style="bold")] if isinstance(row[0], str) else [row[0]]
    line: Text | None = None
    for item, starts_line in items:
        if line is not None and not starts_line and line.cell_len + 2 + item.cell_len <= width:
            line.append("  ")
            line.append_text(item)
            continue
        if line is not None:
            lines.append(line)
        line = Text("  ") + item
    if line is not None:
        lines.append(line)
    return [part for line in lines for part in _wrapped(line, width)]


def _wrapped(line: Text, width: int) -> list[Text]:
    """``line`` broken at its last space before ``width``, its further lines indented under
    the block (a terminal's own wrap would start them at column 0); a word longer than a line
    stays whole."""
    parts = []
    while line.cell_len > width:
        cut = line.plain.rfind(" ", 0, width + 1)
        if cut <= len(_CONTINUATION):
            break
        head, _, tail = line.divide([cut, cut + 1])
        parts.append(head)
        line = Text(_CONTINUATION) + tail
    parts.append(line)
    return parts


_CONTINUATION = "    "


def _text(cell: Cell) -> Text:
    return cell if isinstance(cell, Text) else Text(cell)


_NEEDS_QUOTES = re.compile(r'[\s"=]')


def logfmt(pairs: Iterable[tuple[str, object]]) -> str:
    """One ``key=value`` line (logfmt): values with spaces, quotes or ``=`` double-quoted,
    None left out, booleans as yes/no, floats whole (repr: every digit)."""
    parts = []
    for key, value in pairs:
        if value is None:
            continue
        if isinstance(value, bool):
            text = "yes" if value else "no"
        elif isinstance(value, float):
            text = repr(value) if math.isfinite(value) else "n/a"
        else:
            text = str(value)
        if not text or _NEEDS_QUOTES.search(text):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)
