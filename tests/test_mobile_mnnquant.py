"""MNN's own INT8 quantizer in the four-way comparison (issue 18): MNN cannot run onnxruntime's QDQ files, so
its INT8 rows are the FP32 models quantized by `mnnquant` (KL activations, MAX_ABS weights) on the same
calibration samples onnxruntime's quantizer used, run in a child process. On the trained Fashion-MNIST
fixture, 64 calibration samples; skipped without MNN."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_tucker.config import BenchConfig, QuantizeConfig
from onnx_tucker.data import load_for_model
from onnx_tucker.mobile.adapters import ADAPTERS, MNNAdapter
from onnx_tucker.mobile.build import call_child
from onnx_tucker.quantize import compare_models, quantize_int8
from onnx_tucker.quantize.chains import sqnr_db
from onnx_tucker.report.quantize import four_way_dict, four_way_header, four_way_rows, runtime_findings
from tests.helpers import run_ort

pytest.importorskip("MNN")

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MODEL = FIXTURES / "fmnist_vgg.onnx"
DATA = FIXTURES / "fmnist_test_500.npz"
CALIBRATION = 64
# The stated bound: mnnquant's INT8 model (KL, MAX_ABS) within 6 dB SQNR of FP32 on 128 held-out samples
# (measured 9.9 dB: far below onnxruntime's minmax QDQ at 41 dB on this model; KL clips the activations'
# tails), and top-1 agreement with FP32 at least 80% (measured 90.6%).
MIN_MNNQUANT_SQNR_DB = 6.0
MIN_MNNQUANT_AGREEMENT = 0.80


def _job(tmp: Path, name: str, quantize: bool) -> tuple[dict | None, str | None, dict, np.ndarray]:  # type: ignore[type-arg]
    x = np.load(DATA)["input"]
    work = tmp / name
    work.mkdir()
    np.savez(tmp / "cal.npz", input=x[:CALIBRATION])
    held_out = x[CALIBRATION:CALIBRATION + 128]
    np.savez(work / "in.npz", input=held_out[:, None])  # one sample per run
    job = {"action": "model", "adapter": ADAPTERS["mnn"], "model": str(MODEL), "workdir": str(work),
           "input_shapes": {"input": [1, 1, 28, 28]}, "converted": str(work / "conv.json"), "threads": 1,
           "inputs": str(work / "in.npz"), "outputs": str(work / "out.npz"), "input_names": ["input"],
           "output_names": ["logits"]}
    if quantize:
        job["quantize"] = {"calibration": str(tmp / "cal.npz")}
    res, failure = call_child(job, str(tmp), 120.0)
    conv = json.loads((work / "conv.json").read_text()) if (work / "conv.json").is_file() else {}
    out = np.load(work / "out.npz")["o0"].reshape(len(held_out), -1) if res is not None else np.zeros(0)
    return res, failure, conv, out


def test_mnnquant_int8_runs_in_mnn_within_the_stated_sqnr(tmp_path: Path) -> None:
    res32, fail32, conv32, out32 = _job(tmp_path, "fp32", quantize=False)
    res8, fail8, conv8, out8 = _job(tmp_path, "int8", quantize=True)
    assert fail32 is None and fail8 is None, (fail32, fail8)
    assert conv8["quantized"] and conv8["extras"]["quantizer"] == "mnnquant"
    assert conv8["extras"]["feature_quantize_method"] == "KL" and conv8["extras"]["calibration_samples"] == CALIBRATION
    assert conv8["extras"]["image_encoding_max_error"] < 1e-5  # Fashion-MNIST: 8-bit images, exactly recovered
    size32 = sum(Path(f).stat().st_size for f in conv32["files"])
    size8 = sum(Path(f).stat().st_size for f in conv8["files"])
    assert size8 < size32 / 2, (size8, size32)  # really quantized: INT8 weights
    x = np.load(DATA)["input"][CALIBRATION:CALIBRATION + 128]
    ref = run_ort(onnx.load(MODEL), {"input": x})["logits"]
    assert sqnr_db(ref, out32) > 60  # MNN FP32 is onnxruntime's FP32
    assert sqnr_db(ref, out8) >= MIN_MNNQUANT_SQNR_DB
    assert np.mean(ref.argmax(1) == out8.argmax(1)) >= MIN_MNNQUANT_AGREEMENT
    assert sqnr_db(ref, out8) < 60  # and it is not the FP32 model by accident


@pytest.fixture(scope="module")
def four_way():  # type: ignore[no-untyped-def]
    model = onnx.load(MODEL)
    data = load_for_model(str(DATA), model, CALIBRATION, None)
    q = quantize_int8(model, data, QuantizeConfig(quantize="int8"), [], {"input": (1, 1, 28, 28)})
    return model, q.model, data


def test_the_mnn_column_has_numbers_for_the_int8_rows(four_way) -> None:  # type: ignore[no-untyped-def]
    model, int8, data = four_way
    rep = compare_models([("original FP32", model, None), ("original INT8", int8, None)], data,
                         {"input": (1, 1, 28, 28)}, BenchConfig(warmup=1, runs=3), runtimes="mnn", calibration=data)
    col = rep.runtime("mnn")
    assert col is not None and col.status == "ok", col
    fp32, q = col.cell("original FP32"), col.cell("original INT8")
    assert fp32 is not None and fp32.quantizer is None and fp32.top1_agreement == 1.0
    assert q is not None and q.failure is None and q.latency_ms is not None and q.latency_ms > 0
    assert q.quantizer is not None and q.quantizer.startswith("mnnquant, KL activations, MAX_ABS weights, 64 calibration")
    assert q.top1_agreement is not None and q.top1_agreement >= MIN_MNNQUANT_AGREEMENT - 0.1
    assert q.sqnr_db is not None and q.sqnr_db >= MIN_MNNQUANT_SQNR_DB - 2
    assert q.size_bytes is not None and fp32.size_bytes is not None and q.size_bytes < fp32.size_bytes / 2
    header, rows = four_way_header(rep), four_way_rows(rep)
    k = header.index("MNN ms")
    assert rows[1][k] == f"{q.latency_ms:.3f} (mnnquant KL)"  # the cell says whose INT8 it is
    assert rows[0][k] == f"{fp32.latency_ms:.3f}"
    assert any(f.startswith("MNN INT8 (mnnquant, KL") and "original INT8" in f and "QDQ file is not what ran" in f
               for f in runtime_findings(rep))
    cell = next(m for m in four_way_dict(rep)["runtimes"][0]["models"] if m["name"] == "original INT8")  # type: ignore[index]
    assert cell["quantizer"] == q.quantizer and cell["latency_ms"] == q.latency_ms


def test_without_calibration_data_mnn_converts_the_qdq_file(four_way) -> None:  # type: ignore[no-untyped-def]
    """No calibration samples given: the INT8 row is the QDQ file converted (which MNN 3.6 cannot run: a
    failed cell, a finding), never a cell that pretends to be mnnquant's."""
    model, int8, data = four_way
    rep = compare_models([("original FP32", model, None), ("original INT8", int8, None)], data,
                         {"input": (1, 1, 28, 28)}, BenchConfig(warmup=1, runs=2), runtimes="mnn")
    q = rep.runtime("mnn").cell("original INT8")  # type: ignore[union-attr]
    assert q is not None and q.quantizer is None


class AbortingMnnQuant(MNNAdapter):
    """mnnquant aborting the process (a native crash in the quantizer)."""

    def quantize(self, files, workdir, calibration, input_names, method=None):  # type: ignore[no-untyped-def]
        os.abort()


class HangingMnnQuant(MNNAdapter):
    def quantize(self, files, workdir, calibration, input_names, method=None):  # type: ignore[no-untyped-def]
        import time

        time.sleep(600)


@pytest.mark.parametrize(("adapter", "said"), [("AbortingMnnQuant", "SIGABRT"), ("HangingMnnQuant", "timed out")])
def test_a_crash_or_hang_of_mnnquant_is_a_finding(four_way, monkeypatch: pytest.MonkeyPatch, adapter: str,
                                                   said: str) -> None:  # type: ignore[no-untyped-def]
    from onnx_tucker.mobile import adapters

    model, int8, data = four_way
    monkeypatch.setitem(adapters.ADAPTERS, "mnn", f"{__name__}:{adapter}")
    rep = compare_models([("original FP32", model, None), ("original INT8", int8, None)], data,
                         {"input": (1, 1, 28, 28)}, BenchConfig(warmup=1, runs=2), runtimes="mnn", calibration=data,
                         timeout=20.0 if adapter == "HangingMnnQuant" else 120.0)
    col = rep.runtime("mnn")
    assert col is not None and col.status == "failed"
    fp32, q = col.cell("original FP32"), col.cell("original INT8")
    assert fp32 is not None and fp32.failure is None and fp32.latency_ms is not None
    assert q is not None and q.failed_step == "quantize" and said in (q.failure or ""), q
    assert q.quantizer is not None and q.quantizer.startswith("mnnquant")
    k = four_way_header(rep).index("MNN ms")
    assert four_way_rows(rep)[1][k] == "failed (quantize)"
    assert any(f.startswith("MNN cannot quantize original INT8:") and said in f for f in runtime_findings(rep))


class KlCrashingMnnQuant(MNNAdapter):
    """mnnquant's KL calibration segfaulting (as MNN 3.6.1's does on Darknet Tiny), EMA working."""

    def quantize(self, files, workdir, calibration, input_names, method=None):  # type: ignore[no-untyped-def]
        import signal

        if method in (None, "KL"):
            os.kill(os.getpid(), signal.SIGSEGV)
        return super().quantize(files, workdir, calibration, input_names, method)


def test_when_kl_crashes_the_next_method_is_used_and_said(four_way, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from onnx_tucker.mobile import adapters

    model, int8, data = four_way
    monkeypatch.setitem(adapters.ADAPTERS, "mnn", f"{__name__}:KlCrashingMnnQuant")
    rep = compare_models([("original FP32", model, None), ("original INT8", int8, None)], data,
                         {"input": (1, 1, 28, 28)}, BenchConfig(warmup=1, runs=2), runtimes="mnn", calibration=data)
    q = rep.runtime("mnn").cell("original INT8")  # type: ignore[union-attr]
    assert q is not None and q.failure is None and q.latency_ms is not None, q
    assert q.quantizer is not None and q.quantizer.startswith("mnnquant, EMA activations")
    assert "KL failed (crashed (signal 11, SIGSEGV))" in q.quantizer
    k = four_way_header(rep).index("MNN ms")
    assert four_way_rows(rep)[1][k].endswith("(mnnquant EMA)")
