"""Issue 16 item 7b: random-input agreement never reads as accuracy; real data is preferred whenever
given; the mobile report's operator and MAC lines say what is true.

Every report (terminal table, JSON, Markdown; the mobile report's HTML, Markdown and JSON) marks class
agreement on random inputs as agreement on noise, with one plain sentence; on real data it does not.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

import onnx_tucker as ot
from onnx_tucker.cli import app
from onnx_tucker.graph.model import find_layers, infer_shapes
from onnx_tucker.mobile.results import OrtMobileAnalysis
from onnx_tucker.ops.registry import handler_for
from onnx_tucker.report.mobile import added_ops_text, verdict
from onnx_tucker.report.tables import validation_table
from tests.helpers import make_small_cnn, save

runner = CliRunner()
NOT_ACCURACY = "not accuracy"


def render(table) -> str:  # type: ignore[no-untyped-def]
    console = Console(width=200, record=True)
    console.print(table)
    return " ".join(console.export_text().split())


@pytest.fixture()
def model(tmp_path: Path) -> Path:
    return save(make_small_cnn(low_rank=True), tmp_path / "m.onnx")


def labelled(tmp_path: Path, n: int = 12) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, x=rng.standard_normal((n, 3, 16, 16)).astype(np.float32), labels=rng.integers(0, 10, n))
    return path


def test_random_inputs_say_their_agreement_is_not_accuracy(model: Path, tmp_path: Path) -> None:
    report, md = tmp_path / "r.json", tmp_path / "r.md"
    res = runner.invoke(app, ["compress", str(model), str(tmp_path / "o.onnx"), "--samples", "4",
                              "--report", str(report), "--markdown", str(md)])
    assert res.exit_code == 0, res.stderr
    text = " ".join(res.stdout.split())
    assert "top-1 on noise" in text and NOT_ACCURACY in text and "top-1 agree " not in text
    v = json.loads(report.read_text())["validation"]
    assert v["source"] == "random" and NOT_ACCURACY in v["agreement_note"]
    assert "top-1 agree on noise" in md.read_text() and NOT_ACCURACY in md.read_text()


def test_real_data_reads_as_agreement_and_accuracy(model: Path, tmp_path: Path) -> None:
    v = ot.validate(model, model, ot.CompressionConfig(data=labelled(tmp_path)))
    assert v.agreement_note is None and v.accuracy_before is not None
    text = render(validation_table(v))
    assert "top-1 agree" in text and "on noise" not in text and NOT_ACCURACY not in text


def test_compress_validates_on_the_calibration_data_when_no_data_is_given(model: Path, tmp_path: Path) -> None:
    data = labelled(tmp_path, 16)
    report = tmp_path / "r.json"
    res = runner.invoke(app, ["compress", str(model), str(tmp_path / "o.onnx"), "--calibrate", str(data),
                              "--report", str(report), "-q"])
    assert res.exit_code == 0, res.stderr
    v = json.loads(report.read_text())["validation"]
    assert v["source"] == str(data) and v["samples"] == 16 and v["agreement_note"] is None


def test_mobile_report_marks_random_agreement(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    ot.compress(model, ot.CompressionConfig(validate=False), output=out)
    md, js, html = tmp_path / "r.md", tmp_path / "r.json", tmp_path / "r.html"
    fast = ot.BenchConfig(threads=1, warmup=0, runs=1)
    ot.mobile_report(model, out, runtimes="ort", bench_config=fast, markdown=md, json_path=js, html=html)
    assert "top-1 agree on noise" in md.read_text() and NOT_ACCURACY in md.read_text()
    assert "top-1 agree on noise" in html.read_text() and NOT_ACCURACY in html.read_text()
    assert NOT_ACCURACY in json.loads(js.read_text())["inputs"]["agreement_note"]
    ot.mobile_report(model, out, ot.CompressionConfig(data=labelled(tmp_path)), runtimes="ort", bench_config=fast,
                     markdown=md, json_path=js)
    assert "on noise" not in md.read_text() and json.loads(js.read_text())["inputs"]["agreement_note"] is None


def test_an_operator_the_original_has_only_fused_is_said_to_be_so() -> None:
    a = OrtMobileAnalysis(original=(), compressed=(), original_ops=("Gemm", "com.microsoft:FusedConv"),
                          compressed_ops=("Conv", "Gemm", "com.microsoft:FusedConv"))
    assert a.added_ops == ("Conv",) and a.fused_in_original == {"Conv": "com.microsoft:FusedConv"}
    assert "Conv (in the original only fused with its activation, as com.microsoft:FusedConv)" in verdict(a)
    plain = dataclasses.replace(a, original_ops=("Gemm",))
    assert added_ops_text(plain) == "Conv, com.microsoft:FusedConv"


def test_a_gemm_whose_batch_shape_inference_lost_still_has_macs() -> None:
    # A Pad with computed pads (the CIFAR ResNets' option-A shortcut) leaves the batch dim unknown
    # downstream: the Gemm's MACs were '? -> ?'; an unknown batch counts as 1, as for convs.
    m = make_small_cnn(low_rank=True)
    fc = next(lay for lay in find_layers(m, infer_shapes(m, {"x": (1, 3, 16, 16)})) if lay.op_type == "Gemm")
    lost = dataclasses.replace(fc, output_shape=(None, 10))
    assert handler_for(lost).cost(lost, "original") == handler_for(fc).cost(fc, "original") == (320, 320)


def test_resnet20_gemm_row_has_macs() -> None:
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-resnets" / "resnet20.onnx"
    if not path.is_file():
        pytest.skip("shared data absent")
    p = ot.plan(path)
    gemm = next(lay for lay in p.layers if lay.op_type == "Gemm")
    assert gemm.macs_before == 640
