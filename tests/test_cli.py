"""The `onnx-tucker` command line: help texts, exit codes, what is written and what is not.

The bad-input corpus lives in test_bad_inputs.py; here: the successful paths and the error
plumbing itself (unexpected exceptions, -v, validation failures, the installed entry point).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import typer
from typer.testing import CliRunner

from onnx_tucker import api
from onnx_tucker.cli import app
from tests.helpers import make_small_cnn, save

runner = CliRunner()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    return save(make_small_cnn(low_rank=True), tmp_path / "cnn.onnx")


@pytest.mark.parametrize("command", ["compress", "inspect", "validate"])
def test_help_shows_an_example(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert f"Example: onnx-tucker {command} model.onnx" in result.stdout
    assert "Usage:" in result.stdout


COMMANDS = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
USAGE = {  # what each usage line ends with: plain upper-case metavars, no typer `{input}`
    "compress": "[OPTIONS] INPUT OUTPUT",
    "inspect": "[OPTIONS] INPUT",
    "validate": "[OPTIONS] ORIGINAL COMPRESSED",
    "bench": "[OPTIONS] ORIGINAL COMPRESSED",
    "finetune": "[OPTIONS] INPUT OUTPUT",
    "report": "[OPTIONS] ORIGINAL COMPRESSED",
    "quantize": "[OPTIONS] INPUT OUTPUT",
}


def render_help(command: str) -> str:
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.stdout


def report_keys_in_help(text: str) -> list[str]:
    """The top-level keys that the --report help of a command promises ("keys: a, b, c; ...")."""
    flat = " ".join(text.split())
    m = re.search(r"--report <path> .*?\(keys: ([a-z_, ]+)[;)]", flat)
    assert m, flat
    return [k.strip() for k in m.group(1).split(",")]


def test_every_command_is_covered_by_the_help_tests() -> None:
    assert COMMANDS == sorted(USAGE)


@pytest.mark.parametrize("command", sorted(USAGE))
def test_help_metavars_are_readable(command: str) -> None:
    text = render_help(command)
    assert "<list[" not in text, text
    assert not re.search(r"\{[A-Za-z_]+\}", text), text
    usage = next(line for line in text.splitlines() if line.startswith("Usage:"))
    assert usage.endswith(f" {command} {USAGE[command]}"), usage
    if command != "finetune":  # fine-tuning takes its shapes from the data
        assert "--input-shape NAME:D0,D1,..." in text


def _report_of(command: str, model_path: Path, tmp_path: Path) -> dict[str, object]:
    report = tmp_path / f"{command}.json"
    compressed = tmp_path / "compressed.onnx"
    if command != "compress":
        assert runner.invoke(app, ["compress", str(model_path), str(compressed), "--no-validate", "-q"]).exit_code == 0
    args = {
        "compress": ["compress", str(model_path), str(tmp_path / "out.onnx"), "--samples", "2"],
        "inspect": ["inspect", str(model_path)],
        "validate": ["validate", str(model_path), str(compressed), "--samples", "2"],
        "bench": ["bench", str(model_path), str(compressed), "--runs", "1", "--warmup", "0"],
    }[command]
    result = runner.invoke(app, [*args, "--report", str(report), "-q"])
    assert result.exit_code == 0, result.output
    return json.loads(report.read_text())


# finetune's: tests/test_finetune.py; report's (it runs the runtimes): tests/test_mobile_report.py; quantize's
# (it quantizes): tests/test_quantize.py
@pytest.mark.parametrize("command", sorted(set(USAGE) - {"finetune", "report", "quantize"}))
def test_report_help_names_the_keys_the_command_writes(command: str, model_path: Path, tmp_path: Path) -> None:
    """Each command's --report help lists exactly the top-level keys of the JSON it writes (before:
    every command claimed compress's "layers, totals, validation")."""
    promised = report_keys_in_help(render_help(command))
    assert promised == list(_report_of(command, model_path, tmp_path))


def test_no_arguments_shows_help() -> None:
    result = runner.invoke(app, [])
    text = result.stdout + result.stderr
    assert "compress" in text and "inspect" in text and "validate" in text
    assert "error:" not in text


def test_compress_writes_out_and_report(model_path: Path, tmp_path: Path) -> None:
    out, report, plan = tmp_path / "out.onnx", tmp_path / "report.json", tmp_path / "plan.json"
    digest = sha(model_path)
    result = runner.invoke(app, ["compress", str(model_path), str(out), "--samples", "2", "--report", str(report),
                                 "--save-plan", str(plan)])
    assert result.exit_code == 0, result.stderr
    assert sha(model_path) == digest
    assert result.stderr.startswith(f"wrote {out} (")
    onnx.checker.check_model(onnx.load(str(out)))
    rep = json.loads(report.read_text())
    assert {"layers", "totals", "validation"} <= set(rep)
    assert json.loads(plan.read_text())["format"] == "onnx-tucker-plan"
    assert listing(tmp_path) == ["cnn.onnx", "out.onnx", "plan.json", "report.json"]  # no temp files


def test_compress_replaces_a_previous_out(model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    out.write_bytes(b"old")
    result = runner.invoke(app, ["compress", str(model_path), str(out), "--no-validate", "-q"])
    assert result.exit_code == 0
    assert result.stdout == "" and result.stderr == ""  # --quiet: nothing but errors
    assert len(onnx.load(str(out)).graph.node) > 0


def test_plan_replay_round_trip(model_path: Path, tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    assert runner.invoke(app, ["inspect", str(model_path), "--save-plan", str(plan), "-q"]).exit_code == 0
    result = runner.invoke(app, ["compress", str(model_path), str(tmp_path / "o.onnx"), "--plan", str(plan), "-q",
                                 "--no-validate"])
    assert result.exit_code == 0, result.stderr


def test_inspect_writes_nothing(model_path: Path, tmp_path: Path) -> None:
    before = listing(tmp_path)
    result = runner.invoke(app, ["inspect", str(model_path)])
    assert result.exit_code == 0, result.stderr
    assert "conv2" in result.stdout
    assert listing(tmp_path) == before


def test_validate_exit_codes(model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    assert runner.invoke(app, ["compress", str(model_path), str(out), "--no-validate", "-q"]).exit_code == 0
    ok = runner.invoke(app, ["validate", str(model_path), str(out), "--samples", "2"])
    assert ok.exit_code == 0, ok.stderr
    strict = runner.invoke(app, ["validate", str(model_path), str(out), "--samples", "2", "--rtol", "1e-12"])
    assert strict.exit_code == 1
    lines = strict.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {out}: validation failed")


def test_failed_validation_writes_no_out(model_path: Path, tmp_path: Path) -> None:
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    result = runner.invoke(app, ["compress", str(model_path), str(out), "--samples", "2", "--rtol", "1e-12",
                                 "--report", str(report)])
    assert result.exit_code == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "validation failed" in line and "was not written" in line
    assert not out.exists()
    assert json.loads(report.read_text())["validation"]  # the report says why


def test_unexpected_exception_is_one_line(model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(api, "compress", boom)
    result = runner.invoke(app, ["compress", str(model_path), str(tmp_path / "o.onnx")])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: unexpected RuntimeError: boom second line") and "-v" in lines[0]
    assert "Traceback" not in result.stderr
    # -v: the traceback is what the user asked for.
    verbose = runner.invoke(app, ["compress", str(model_path), str(tmp_path / "o.onnx"), "-v"])
    assert isinstance(verbose.exception, RuntimeError)


def test_memory_error_is_one_line(model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def oom(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise MemoryError

    monkeypatch.setattr(api, "plan", oom)
    result = runner.invoke(app, ["inspect", str(model_path)])
    assert result.exit_code == 1
    assert result.stderr.strip().startswith("error: out of memory;")


def test_entry_point_in_a_real_process(model_path: Path, tmp_path: Path) -> None:
    exe = shutil.which("onnx-tucker")
    cmd = [exe] if exe else [sys.executable, "-m", "onnx_tucker.cli"]
    helped = subprocess.run([*cmd, "compress", "--help"], capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "Example:" in helped.stdout
    bad = subprocess.run([*cmd, "compress", str(model_path), str(model_path)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_the_cli_runs_under_a_runner_that_keeps_its_own_main() -> None:
    """`python -m cProfile -m onnx_tucker.cli ...` (runpy without alter_sys): the grouped options' annotations
    still resolve (they were looked up in the runner's __main__: NameError 'Path')."""
    code = ("import runpy, sys; sys.argv = ['onnx-tucker', 'compress', '--help']; "
            "runpy.run_module('onnx_tucker.cli', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--calibrate" in proc.stdout
