"""One model, one set of numbers and one spelling across commands (issue 16 items 8 and 15): inspect and
compress count parameters the same way, an unreadable model exits 1 in a real process, and the JSON
report is `--report` in every command (`report --json` stays as a hidden alias)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from onnx_tucker.cli import app
from tests.helpers import make_small_cnn, save

runner = CliRunner()


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    return save(make_small_cnn(low_rank=True), tmp_path / "m.onnx")


def _summary_row(stdout: str, label: str) -> list[str]:
    row = next(ln for ln in stdout.splitlines() if ln.strip("│┃ ").startswith(label))
    return [c.strip() for c in row.strip("│┃").split("│")][1:]


def test_inspect_and_compress_count_the_same_parameters(model_path: Path, tmp_path: Path) -> None:
    # Before: inspect summed the planned layers' weights only, compress every float parameter
    # (biases, BN): 684.83k against 685.58k for the fixture.
    ins = runner.invoke(app, ["inspect", str(model_path), "--report", str(tmp_path / "i.json")])
    com = runner.invoke(app, ["compress", str(model_path), str(tmp_path / "o.onnx"), "--samples", "1",
                              "--report", str(tmp_path / "c.json")])
    assert ins.exit_code == 0 and com.exit_code == 0, (ins.stderr, com.stderr)
    i = json.loads((tmp_path / "i.json").read_text())["totals"]
    c = json.loads((tmp_path / "c.json").read_text())["totals"]
    assert (i["params_before"], i["params_after"]) == (c["params_before"], c["params_after"])
    assert i["params_ratio"] == pytest.approx(c["params_ratio"])
    assert _summary_row(ins.stdout, "parameters") == _summary_row(com.stdout, "parameters")
    layer_weights = sum(lay["params_before"] for lay in json.loads((tmp_path / "i.json").read_text())["layers"])
    assert i["params_before"] > layer_weights  # the biases count too


def _cannot_read_as_root() -> list[str] | None:
    """A command prefix under which chmod 000 stops reads: nothing as a plain user; as root, the
    capabilities that bypass file permissions dropped (setpriv), else None."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        return None
    return ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search"]


@pytest.mark.parametrize("command", ["compress", "inspect", "validate"])
def test_an_unreadable_model_exits_1_in_a_real_process(command: str, model_path: Path, tmp_path: Path) -> None:
    prefix = _cannot_read_as_root()
    if prefix is None:
        pytest.skip("running as root without setpriv: cannot make a file unreadable")
    locked = tmp_path / "locked.onnx"
    shutil.copy(model_path, locked)
    locked.chmod(0)
    args = {"compress": ["compress", str(locked), str(tmp_path / "o.onnx")], "inspect": ["inspect", str(locked)],
            "validate": ["validate", str(model_path), str(locked)]}[command]
    try:
        proc = subprocess.run([*prefix, sys.executable, "-m", "onnx_tucker.cli", *args], capture_output=True,
                              text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    finally:
        locked.chmod(0o644)
    if "Operation not permitted" in proc.stderr and "setpriv" in proc.stderr:
        pytest.skip("setpriv may not drop capabilities here")
    # Before: typer refused it first: exit 2, "Invalid value for 'INPUT': path ... is not readable".
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {locked}: cannot read the file (Permission denied); check its permissions"]
    assert not (tmp_path / "o.onnx").exists()


# ---- item 15: --report is the JSON report's spelling in every command ---------------------------


def _help(command: str) -> str:
    return " ".join(runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"}).stdout.split())


@pytest.mark.parametrize("command", ["compress", "inspect", "validate", "bench", "report", "finetune"])
def test_every_command_spells_the_json_report_report(command: str) -> None:
    text = _help(command)
    assert "--report" in text and "Write" in text.split("--report", 1)[1][:80]
    assert "--json" not in text  # the old `report --json` is a hidden alias


@pytest.fixture
def pair(model_path: Path, tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "m.tucker.onnx"
    assert runner.invoke(app, ["compress", str(model_path), str(out), "--samples", "1", "-q"]).exit_code == 0
    return model_path, out


def _report_args(pair: tuple[Path, Path], *extra: str) -> list[str]:
    return ["report", *map(str, pair), "--runtimes", "ort", "--runs", "1", "--warmup", "0", "--samples", "1", "-q", *extra]


def test_report_writes_its_json_with_report_and_with_the_old_json(pair: tuple[Path, Path], tmp_path: Path) -> None:
    new, old = tmp_path / "new.json", tmp_path / "old.json"
    r1 = runner.invoke(app, _report_args(pair, "--report", str(new)))
    r2 = runner.invoke(app, _report_args(pair, "--json", str(old)))
    assert r1.exit_code == 0 and r2.exit_code == 0, (r1.stderr, r2.stderr)
    assert list(json.loads(new.read_text())) == list(json.loads(old.read_text()))
    assert "runtimes" in json.loads(new.read_text())


def test_report_and_json_with_two_paths_is_one_usage_error(pair: tuple[Path, Path], tmp_path: Path) -> None:
    r = runner.invoke(app, _report_args(pair, "--report", str(tmp_path / "a.json"), "--json", str(tmp_path / "b.json")))
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --json ") and "give --report only" in lines[0]
    assert not (tmp_path / "a.json").exists() and not (tmp_path / "b.json").exists()


def test_report_json_over_an_input_names_report(pair: tuple[Path, Path]) -> None:
    r = runner.invoke(app, _report_args(pair, "--report", str(pair[1])))
    assert r.exit_code == 2
    assert r.stderr.strip().startswith(f"error: --report {pair[1]}: output is the input file"), r.stderr
