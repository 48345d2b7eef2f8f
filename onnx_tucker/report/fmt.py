"""Number formatting shared by the tables and the Markdown report."""

from __future__ import annotations


def fmt_int(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def fmt_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def ratio(a: int | None, b: int | None) -> str:
    if a is None or b is None or b == 0:
        return "?"
    return f"x{a / b:.2f}"


def ranks(r: tuple[int, ...] | None) -> str:
    return "-" if not r else "/".join(map(str, r))


def times(before: float | None, after: float | None) -> str:
    """Measured ms before -> after."""
    if before is None or after is None:
        return "-"
    return f"{before:.3f} -> {after:.3f}"


def speedup(x: float | None) -> str:
    return "-" if x is None else f"x{x:.2f}"
