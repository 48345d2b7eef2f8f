"""Issue 16 item 13: every long step reports progress through the library's callback
(step, done, total): validation over the samples, the agreement search's model evaluations, the
mobile report's runtimes. The CLI draws it as a bar on a terminal only, never with --quiet."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import onnx_tucker as ot
from onnx_tucker import cli
from onnx_tucker.cli import app
from tests.helpers import make_small_cnn, save

runner = CliRunner()
Calls = list[tuple[str, int, int]]


@pytest.fixture()
def model(tmp_path: Path) -> Path:
    return save(make_small_cnn(low_rank=True, batch="N"), tmp_path / "m.onnx")


def data(tmp_path: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, x=rng.standard_normal((n, 3, 16, 16)).astype(np.float32), labels=rng.integers(0, 10, n))
    return path


def steps(calls: Calls, name: str) -> Calls:
    return [c for c in calls if c[0] == name]


def test_validation_reports_samples_done(model: Path, tmp_path: Path) -> None:
    calls: Calls = []
    ot.validate(model, model, ot.CompressionConfig(data=data(tmp_path, 300)), progress=lambda *a: calls.append(a))
    v = steps(calls, "validation")
    assert v[0] == ("validation", 0, 300) and v[-1] == ("validation", 300, 300)
    assert len(v) == 3 and [c[1] for c in v] == sorted(c[1] for c in v)  # 256 per batch on a dynamic batch


def test_compress_reports_validation_after_the_layers(model: Path, tmp_path: Path) -> None:
    calls: Calls = []
    ot.compress(model, ot.CompressionConfig(samples=3), progress=lambda *a: calls.append(a))
    names = [c[0] for c in calls]
    assert "validation" in names and names.index("validation") > names.index("conv1")
    assert calls[-1] == ("validation", 3, 3)


def test_agreement_search_reports_each_evaluation(model: Path, tmp_path: Path) -> None:
    calls: Calls = []
    cfg = ot.CompressionConfig.from_options(target="agreement:0.5", data=data(tmp_path, 16), validate=False)
    ot.plan(model, cfg, progress=lambda *a: calls.append(a))
    a = steps(calls, "agreement search")
    assert a[0] == ("agreement search", 0, 12) and len(a) >= 3
    assert all(0 <= d <= t == 12 for _, d, t in a) and [c[1] for c in a] == sorted(c[1] for c in a)


def test_mobile_report_reports_each_runtime(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    ot.compress(model, ot.CompressionConfig(validate=False), output=out)
    calls: Calls = []
    ot.mobile_report(model, out, runtimes="ort", bench_config=ot.BenchConfig(threads=1, warmup=0, runs=1),
                     progress=lambda *a: calls.append(a))
    assert calls == [("ort", 0, 1), ("runtimes", 1, 1)]


def test_no_progress_when_stderr_is_not_a_terminal(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    ot.compress(model, ot.CompressionConfig(validate=False), output=out)
    res = runner.invoke(app, ["report", str(model), str(out), "--runtimes", "ort", "--runs", "1", "--warmup", "0"])
    assert res.exit_code == 0, res.stderr
    assert res.stderr.strip() == ""  # was "ort ..." on every run, piped or not
    res = runner.invoke(app, ["validate", str(model), str(out), "--data", str(data(tmp_path, 8))])
    assert res.exit_code == 0 and res.stderr.strip() == ""


def test_the_bar_is_drawn_on_a_terminal_unless_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    with cli._progress(True) as update:
        assert update is not None
        update("validation", 1, 2)
    with cli._progress(False) as update:  # --quiet
        assert update is None
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    with cli._progress(True) as update:
        assert update is None
