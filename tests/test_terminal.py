"""What the terminal shows (issue 16, items 7 and 12): user text verbatim, numbers never cut.

rich reads `[...]` as markup and `:name:` as an emoji code; every console the CLI prints through
must print paths, option values and layer names as given. And on an 80-column terminal a table
must wrap or split rather than cut a number (`18.43k -> 1` for `18.43k -> 1.45k`).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from onnx_tucker import cli
from onnx_tucker.cli import app
from onnx_tucker.report.console import make_console
from tests.helpers import make_small_cnn, save

runner = CliRunner()
FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "fmnist_vgg.onnx"


# ---- item 7: no markup, no emoji codes ------------------------------------------------------------


def test_calibrate_path_with_emoji_codes_is_printed_verbatim(tmp_path: Path) -> None:
    inp = save(make_small_cnn(low_rank=True), tmp_path / "m.onnx")
    res = runner.invoke(app, ["compress", str(inp), str(tmp_path / "o.onnx"), "--calibrate", "data/run:fire:1.npz"])
    assert res.exit_code == 2, res.stderr
    assert "data/run:fire:1.npz" in res.stderr and "\N{FIRE}" not in res.stderr


def test_ranks_value_with_a_colon_is_printed_verbatim(tmp_path: Path) -> None:
    inp = save(make_small_cnn(low_rank=True), tmp_path / "m.onnx")
    res = runner.invoke(app, ["compress", str(inp), str(tmp_path / "o.onnx"), "--ranks", "data:abc"])
    assert res.exit_code == 2
    assert "--ranks data:abc: not understood" in res.stderr, res.stderr


def test_layer_names_and_notes_with_brackets_and_colons_are_verbatim(tmp_path: Path) -> None:
    m = make_small_cnn(low_rank=True)
    names = {"conv1": "blocks[0]:fire:/conv", "conv2": "[bold]conv2[/bold]"}
    for n in m.graph.node:
        n.name = names.get(n.name, n.name)
    inp = save(m, tmp_path / "m.onnx")
    res = runner.invoke(app, ["inspect", str(inp)])
    assert res.exit_code == 0, res.stderr
    for name in names.values():
        assert name in res.stdout, res.stdout
    # An option value quoted in a per-layer note: verbatim too.
    res = runner.invoke(app, ["inspect", str(inp), "--include", "[bold]conv2:fire:"])
    assert "does not match --include '[bold]conv2:fire:'" in res.stdout, res.stdout


def test_every_console_ignores_markup_and_emoji() -> None:
    import io

    buf = io.StringIO()
    c = make_console(file=buf, width=200)
    c.print("[bold]x[/bold] :fire: run:smile:1")
    assert buf.getvalue().strip() == "[bold]x[/bold] :fire: run:smile:1"
    assert not cli.out_console._markup and not cli.out_console._emoji
    assert not cli.err_console._markup and not cli.err_console._emoji


# ---- item 12: tables at 80 and 120 columns --------------------------------------------------------

# A number as the tables print it: 18.43k, x12.73, 1.000000, 25.0%, 8/9, 32x1x3x3, 3.04e-07.
NUMBER = re.compile(r"^x?[-+]?\d[\w.%/+-]*$")
BOX = "│┃"


def _cells(text: str) -> set[str]:
    """Every number token inside a table's box lines."""
    tokens = set()
    for line in text.splitlines():
        if not any(b in line for b in BOX):
            continue
        for cell in re.split(f"[{BOX}]", line):
            tokens.update(t for t in cell.split() if NUMBER.match(t))
    return tokens


def _render(tables: list[object], width: int) -> str:
    import io

    buf = io.StringIO()
    console = make_console(file=buf, width=width)
    for t in tables:
        console.print(t)
    return buf.getvalue()


@pytest.fixture(scope="module")
def compressed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("c") / "m.tucker.onnx"
    res = runner.invoke(app, ["compress", str(FIXTURE), str(out), "--no-validate", "-q"])
    assert res.exit_code == 0, res.stderr
    return out


COMMANDS = {
    "compress": lambda c, tmp: ["compress", str(FIXTURE), str(tmp / "o.onnx"), "--samples", "2", "--bench", "--runs", "2",
                                "--warmup", "1"],
    "inspect": lambda c, tmp: ["inspect", str(FIXTURE), "--latency-aware"],
    "validate": lambda c, tmp: ["validate", str(FIXTURE), str(c), "--samples", "2"],
    "bench": lambda c, tmp: ["bench", str(FIXTURE), str(c), "--runs", "2", "--warmup", "1"],
    "report": lambda c, tmp: ["report", str(FIXTURE), str(c), "--runtimes", "ort,ort-mobile", "--samples", "2", "--runs", "2",
                              "--warmup", "1"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_no_table_cuts_a_number_at_80_or_120_columns(command: str, compressed: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # Run the command once, keep what it printed, and render those very tables at each width.
    printed: list[object] = []
    monkeypatch.setattr(cli, "_print", printed.extend)
    res = runner.invoke(app, COMMANDS[command](compressed, tmp_path))
    assert res.exit_code == 0, res.stderr
    wide = _render(printed, 400)
    numbers = _cells(wide)
    assert len(numbers) >= 4, wide
    for width in (80, 120):
        narrow = _render(printed, width)
        assert all(len(ln) <= width for ln in narrow.splitlines()), f"a line wider than {width} columns"
        missing = numbers - _cells(narrow)
        assert not missing, f"at {width} columns these numbers were cut: {sorted(missing)}\n{narrow}"
