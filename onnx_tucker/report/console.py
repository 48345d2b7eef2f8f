"""The terminal consoles: user text printed verbatim, tables that never cut a number.

rich interprets `[...]` as markup and `:name:` as an emoji by default, so a path such as
`data/run:fire:1.npz` or a layer named `block[0]` would print as something else. Every console
onnx-tucker prints through comes from `make_console`, which turns both off (and highlighting), so
no call site has to remember `markup=False`.

rich shrinks a table that is wider than the terminal by cutting cells (`18.43k -> 1` for
`18.43k -> 1.45k`). `FitTable` lays a table out before rich does: right-justified columns (numbers,
shapes, ratios) may wrap at spaces but are never narrower than their longest word; left-justified
ones (names, notes) may fold; when the numbers do not fit on one line each, the table is split into
parts that each repeat the first column (and wrap numbers at spaces only if a part still does not fit). The console's `print` wraps every table in it.
"""

from __future__ import annotations

import copy
from typing import Any

from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.table import Column, Table

# A left-justified (text) column folds to no less than this (or its header's longest word).
FOLD_MIN = 12


class _Console(Console):
    def print(self, *objects: Any, **kwargs: Any) -> None:  # type: ignore[override]
        super().print(*(FitTable(o) if isinstance(o, Table) else o for o in objects), **kwargs)


def make_console(*, stderr: bool = False, width: int | None = None, file: Any = None) -> Console:
    """A console that prints every string verbatim (no markup, no emoji codes, no highlighting)."""
    return _Console(stderr=stderr, width=width, file=file, markup=False, emoji=False, highlight=False)


def _header_word(console: Console, options: ConsoleOptions, col: Column) -> int:
    return Measurement.get(console, options, col.header).minimum if col.header else 0


def _widths(console: Console, options: ConsoleOptions, col: Column) -> tuple[int, int]:
    """(least, natural) content width of a column, padding excluded."""
    cells = list(col.cells)
    natural = max([Measurement.get(console, options, c).maximum for c in cells] + [0])
    header = _header_word(console, options, col)
    natural = max(natural, Measurement.get(console, options, col.header).maximum if col.header else 0)
    if col.justify == "left":  # names and notes: may fold
        least = min(natural, max(FOLD_MIN, header))
    else:  # numbers: wrap at spaces only, never inside a word
        least = max([Measurement.get(console, options, c).minimum for c in cells] + [header, 1])
    return least, max(natural, least)


class FitTable:
    """Render `table` within the console width without cutting a right-justified cell's words."""

    def __init__(self, table: Table) -> None:
        self.table = table

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement.get(console, options, self.table)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from self.parts(console, options)

    def _part(self, indices: list[int], title: Any) -> Table:
        t = copy.copy(self.table)
        t.columns = [copy.copy(self.table.columns[i]) for i in indices]
        for n, col in enumerate(t.columns):
            col._index = n
        t.title = title
        return t

    def _layout(self, console: Console, options: ConsoleOptions, t: Table,
                sizes: list[tuple[int, int]], numbers_whole: bool = False) -> bool:
        """Fix every column's width so `t` fits options.max_width; False if it cannot (with
        `numbers_whole`: unless every number cell fits on one line)."""
        pads = [t._get_padding_width(i) for i in range(len(t.columns))]
        room = options.max_width - t._extra_width - sum(pads)
        least = [s[1] if numbers_whole and col.justify != "left" else s[0] for s, col in zip(sizes, t.columns, strict=True)]
        if sum(s[1] for s in sizes) <= room:
            return True  # rich lays it out at natural widths
        if sum(least) > room:
            return False
        widths = list(least)
        spare = room - sum(widths)
        # Numbers first get their whole width (one line per row), then the text columns share the rest.
        for i, col in enumerate(t.columns):
            if col.justify != "left":
                grow = min(spare, sizes[i][1] - widths[i])
                widths[i] += grow
                spare -= grow
        text = [i for i, col in enumerate(t.columns) if col.justify == "left"]
        if text and text[0] == 0:  # the row's name (the first column) before the notes
            grow = min(spare, sizes[0][1] - widths[0])
            widths[0] += grow
            spare -= grow
        while spare > 0 and text:
            wants = [i for i in text if widths[i] < sizes[i][1]]
            if not wants:
                break
            for i in wants:
                if spare == 0:
                    break
                widths[i] += 1
                spare -= 1
        for col, w in zip(t.columns, widths, strict=True):
            col.width, col.no_wrap = w, False  # numbers wrap at spaces (never narrower than a word)
            if col.justify == "left":
                col.overflow = "fold"
        return True

    def parts(self, console: Console, options: ConsoleOptions) -> list[Table]:
        table = self.table
        if not table.columns:
            return [table]
        sizes = [_widths(console, options, c) for c in table.columns]
        whole = self._part(list(range(len(table.columns))), table.title)
        if self._layout(console, options, whole, sizes, True):
            return [whole]
        # Too wide even at the least widths: parts of the columns, each keyed by the first one.
        groups: list[list[int]] = []
        current: list[int] = [0]
        for i in range(1, len(table.columns)):
            trial = self._part(current + [i], None)
            if len(current) > 1 and not self._layout(console, options, trial, [sizes[j] for j in current + [i]], True):
                groups.append(current)
                current = [0, i]
            else:
                current = current + [i]
        groups.append(current)
        out = []
        for n, idx in enumerate(groups):
            title = table.title if n == 0 else (f"{table.title} (continued)" if isinstance(table.title, str) else None)
            part = self._part(idx, title)
            part_sizes = [sizes[j] for j in idx]
            # Numbers on one line if they fit, else wrapped at spaces; a lone column too wide: rich's own shrinking.
            self._layout(console, options, part, part_sizes, True) or self._layout(console, options, part, part_sizes)
            out.append(part)
        return out
