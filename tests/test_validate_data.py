"""Validation on user data (--data FILE.npz) and latency measurement (bench): behaviour, not timing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

import onnx_tucker as ot
from onnx_tucker.cli import app
from onnx_tucker.config import RankPolicy

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "fmnist_vgg.onnx"


@pytest.fixture()
def data_file(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 1, 28, 28)).astype(np.float32)
    labels = rng.integers(0, 10, size=40)
    path = tmp_path / "data.npz"
    np.savez(path, input=x, labels=labels)
    return path, x, labels


def test_full_ranks_on_data_keep_accuracy_and_pass(tmp_path: Path, data_file: tuple[Path, np.ndarray, np.ndarray]) -> None:
    path, x, labels = data_file
    cfg = ot.CompressionConfig(ranks=RankPolicy("full"), data=str(path))
    result = ot.compress(FIXTURE, cfg, output=tmp_path / "out.onnx")
    v = result.validation
    assert v is not None and v.source == str(path) and v.samples == 40
    assert v.passed and v.outputs[0].max_rel_error < 1e-4
    # Reference accuracy computed independently of the tool.
    import onnxruntime as ort

    sess = ort.InferenceSession(str(FIXTURE), providers=["CPUExecutionProvider"])
    expected = float(np.mean(np.argmax(sess.run(None, {"input": x})[0], axis=1) == labels))
    assert v.accuracy_before == pytest.approx(expected)
    assert v.accuracy_after == pytest.approx(expected)


def test_samples_caps_data(tmp_path: Path, data_file: tuple[Path, np.ndarray, np.ndarray]) -> None:
    path, _, _ = data_file
    cfg = ot.CompressionConfig(data=str(path), samples=7)
    v = ot.compress(FIXTURE, cfg).validation
    assert v is not None and v.samples == 7 and v.outputs[0].shape == (7, 10)


def test_data_with_wrong_input_name_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, images=np.zeros((4, 1, 28, 28), np.float32), other=np.zeros((4, 3), np.float32))
    res = CliRunner().invoke(app, ["compress", str(FIXTURE), str(tmp_path / "o.onnx"), "--data", str(path)])
    assert res.exit_code == 2
    assert "no array for model input 'input'" in res.output
    assert not (tmp_path / "o.onnx").exists()


def test_data_with_wrong_sample_shape_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, input=np.zeros((4, 1, 32, 32), np.float32))
    res = CliRunner().invoke(app, ["compress", str(FIXTURE), str(tmp_path / "o.onnx"), "--data", str(path)])
    assert res.exit_code == 2 and "the model expects (1, 28, 28)" in res.output


def test_bench_interleaves_runs_and_reports_medians(monkeypatch: pytest.MonkeyPatch) -> None:
    """measure_latency with fake sessions and a fake clock: the original 'takes' 3 ms a run and the
    compressed 1 ms, except one slow outlier each; the order of runs is recorded."""
    from onnx_tucker.runtime import bench as bench_mod

    clock = [0.0]
    calls: list[str] = []

    class FakeSession:
        def __init__(self, label: str, ms: float) -> None:
            self.label, self.ms, self.n = label, ms, 0

        def run(self, names: object, feeds: object) -> list[object]:
            self.n += 1
            calls.append(self.label)
            clock[0] += (self.ms * (10 if self.n == 4 else 1)) / 1e3  # one outlier: medians ignore it
            return []

    sessions = {"original": FakeSession("A", 3.0), "compressed": FakeSession("B", 1.0)}
    monkeypatch.setattr(bench_mod, "ort_session", lambda model, what, **kw: sessions[what])
    monkeypatch.setattr(bench_mod.time, "perf_counter", lambda: clock[0])
    model = onnx.load(str(FIXTURE))
    lat = bench_mod.measure_latency(model, model, model, {"input": (1, 1, 28, 28)}, threads=1, warmup=2, runs=5)
    assert calls[:4] == ["A", "B", "A", "B"]  # warm-up pairs
    assert calls[4:] == ["A", "B", "B", "A", "A", "B", "B", "A", "A", "B"]  # who goes first alternates
    assert len(lat.original_ms) == len(lat.compressed_ms) == 5
    assert lat.original_median == pytest.approx(3.0) and lat.compressed_median == pytest.approx(1.0)
    assert lat.speedup == pytest.approx(3.0)
    assert max(lat.original_ms) == pytest.approx(30.0) and lat.original_p90 > lat.original_median


def test_bench_command_writes_its_report(tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    ot.compress(FIXTURE, ot.CompressionConfig(validate=False), output=out)
    lat = ot.bench(FIXTURE, out, bench_config=ot.BenchConfig(runs=6, warmup=1))
    assert len(lat.original_ms) == len(lat.compressed_ms) == 6
    assert all(t > 0 for t in lat.original_ms + lat.compressed_ms)
    report = tmp_path / "lat.json"
    res = CliRunner().invoke(app, ["bench", str(FIXTURE), str(out), "--runs", "4", "--warmup", "1", "--report", str(report), "-q"])
    assert res.exit_code == 0, res.output
    d = json.loads(report.read_text())["latency"]
    assert d["runs"] == 4 and d["speedup"] > 0 and set(d) >= {"original_median_ms", "compressed_p90_ms"}


def test_compress_bench_adds_latency_to_report(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    res = CliRunner().invoke(
        app, ["compress", str(FIXTURE), str(tmp_path / "o.onnx"), "--bench", "--runs", "3", "--warmup", "1", "-q", "--report", str(report)]
    )
    assert res.exit_code == 0, res.output
    d = json.loads(report.read_text())
    assert set(d) >= {"layers", "totals", "validation", "latency"}
    assert d["latency"]["runs"] == 3


def test_matching_nans_are_agreement_and_new_nans_are_errors() -> None:
    from onnx_tucker.runtime.validate import compare_outputs

    a = np.array([[1.0, np.nan, 3.0, np.inf]])
    same = compare_outputs("y", a, a.copy())
    # Matching NaNs add no error, but any non-finite output fails validation (issue 16 item 1).
    assert same.max_abs_error == 0.0 and not same.passes(1e-4) and (same.nan_original, same.inf_original) == (1, 1)
    worse = compare_outputs("y", np.array([[1.0, 2.0, 3.0, 4.0]]), a)
    assert not worse.passes(1e3)
