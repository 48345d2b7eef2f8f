"""INT8 after low-rank (issue 18): `compress --quantize int8`, `quantize`, the per-chain SQNR, the four-way
comparison, and the bad inputs. On the trained Fashion-MNIST fixture (fixtures/fmnist_vgg.onnx), 64
samples of its test set as calibration data: each quantization takes a few seconds."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from onnx_tucker import api
from onnx_tucker.cli import app
from onnx_tucker.config import CompressionConfig, QuantizeConfig
from onnx_tucker.data import load_for_model
from onnx_tucker.mobile.adapters import OrtAdapter
from onnx_tucker.quantize import quantize_int8
from onnx_tucker.quantize.chains import sqnr_db
from onnx_tucker.quantize.stage import equal_batches
from onnx_tucker.report.quantize import runtime_cell_number
from onnx_tucker.runtime.validate import data_batches
from tests.helpers import run_ort

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MODEL = FIXTURES / "fmnist_vgg.onnx"
DATA = FIXTURES / "fmnist_test_500.npz"
SAMPLES = 64
EXCLUDED = "/features/features.7/Conv"  # the chain --quantize-exclude keeps in FP32
# The stated bound: INT8 (minmax, per-channel QDQ) outputs within 20 dB SQNR of FP32 on the calibration
# data (measured 27-31 dB for the compressed model, 41 dB for the original).
MIN_OUTPUT_SQNR_DB = 20.0
# Entropy calibration clips the tails of the activations (KL-optimal, not SQNR-optimal): 19.1 dB measured.
MIN_SQNR_DB = {"minmax": MIN_OUTPUT_SQNR_DB, "percentile": MIN_OUTPUT_SQNR_DB, "entropy": 15.0}

runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("int8")
    cfg = CompressionConfig(ranks="energy:0.9", data=str(DATA), samples=SAMPLES)
    q = QuantizeConfig(quantize="int8", exclude=re.escape(EXCLUDED) + "/", compare=True)
    from onnx_tucker.config import BenchConfig

    result = api.compress(MODEL, cfg, out / "int8.onnx", bench=BenchConfig(warmup=1, runs=3),
                          report=out / "r.json", markdown=out / "r.md", quantize=q)
    return result, out


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {t: n for n in model.graph.node for t in n.output}


def test_qdq_around_the_decomposed_chains(run) -> None:  # type: ignore[no-untyped-def]
    result, out = run
    model = onnx.load(out / "int8.onnx")
    prod = _producers(model)
    chains = [c for c in result.quantize.chains if c.quantized]
    assert len(chains) == result.decomposed_layers - 1  # all but the excluded one
    for c in chains:
        for name in c.nodes:
            node = next(n for n in model.graph.node if n.name == name)
            # activation in and weight in both come from a DequantizeLinear; the output goes through Q -> DQ
            assert prod[node.input[0]].op_type == "DequantizeLinear", (name, node.input[0])
            assert prod[node.input[1]].op_type == "DequantizeLinear", (name, node.input[1])
            readers = [n.op_type for n in model.graph.node if node.output[0] in n.input]
            assert readers == ["QuantizeLinear"], (name, readers)
    assert result.quantize.qdq_nodes == sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def test_int8_outputs_within_the_stated_sqnr_of_fp32(run) -> None:  # type: ignore[no-untyped-def]
    result, out = run
    assert result.quantize.output_sqnr_db["logits"] >= MIN_OUTPUT_SQNR_DB
    # measured independently: the written INT8 file against the FP32 original, in onnxruntime
    x = np.load(DATA)["input"][:SAMPLES]
    ref = run_ort(onnx.load(MODEL), {"input": x})["logits"]
    new = run_ort(onnx.load(out / "int8.onnx"), {"input": x})["logits"]
    row = result.comparison.row("compressed INT8")
    assert sqnr_db(ref, new) == pytest.approx(row.sqnr_db, abs=0.05)  # batching changes INT8 rounding a little
    assert np.mean(ref.argmax(1) == new.argmax(1)) == pytest.approx(row.top1_agreement, abs=1.5 / SAMPLES)
    fp32 = result.comparison.row("compressed FP32")
    assert row.top1_agreement >= fp32.top1_agreement - 0.05  # INT8 costs little agreement on top of low rank
    for c in result.quantize.chains:  # every chain measured, none exact by accident
        assert c.sqnr_db is not None and c.cumulative_sqnr_db is not None
        if c.quantized:
            assert 10.0 < c.sqnr_db < 80.0, c


def test_quantize_exclude_keeps_the_named_chain_fp32(run) -> None:  # type: ignore[no-untyped-def]
    result, out = run
    model = onnx.load(out / "int8.onnx")
    prod = _producers(model)
    inits = {t.name: t for t in model.graph.initializer}
    chain = next(c for c in result.quantize.chains if c.name == EXCLUDED)
    assert not chain.quantized and "--quantize-exclude" in (chain.fp32_reason or "")
    for name in chain.nodes:
        node = next(n for n in model.graph.node if n.name == name)
        w = node.input[1]
        assert w not in prod and inits[w].data_type == onnx.TensorProto.FLOAT, (name, w)  # no QDQ on its weight
    others = [c for c in result.quantize.chains if c.name != EXCLUDED]
    assert all(c.quantized for c in others)


def test_four_way_json_and_markdown_agree(run) -> None:  # type: ignore[no-untyped-def]
    result, out = run
    report = json.loads((out / "r.json").read_text())
    models = report["comparison"]["models"]
    assert [m["name"] for m in models] == ["original FP32", "original INT8", "compressed FP32", "compressed INT8"]
    md = (out / "r.md").read_text()
    rows = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells and cells[0] in {m["name"] for m in models}:
            rows[cells[0]] = cells
    assert set(rows) == {m["name"] for m in models}
    for m in models:
        cells = rows[m["name"]]
        assert float(cells[2].rstrip("%")) == pytest.approx(100 * m["top1_agreement"], abs=0.006)
        sq = "exact" if m["sqnr_db"] is None else float(cells[3])
        assert sq == "exact" if m["sqnr_db"] is None else sq == pytest.approx(m["sqnr_db"], abs=0.051)
        assert float(cells[7]) == pytest.approx(m["latency_ms"], abs=6e-4)
    sizes = {m["name"]: m["size_bytes"] for m in models}
    assert sizes["compressed INT8"] < sizes["compressed FP32"] < sizes["original FP32"]
    assert sizes["original INT8"] < sizes["original FP32"] / 3  # INT8 weights: about 4x smaller
    assert report["quantize"]["output_sqnr_db"]["logits"] == pytest.approx(result.quantize.output_sqnr_db["logits"])
    # the deploy-runtime columns (default --quantize-runtimes ort-mobile,mnn): the same cells in both
    header = next(ln for ln in md.splitlines() if ln.startswith("| model |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    runtimes = report["comparison"]["runtimes"]
    assert [r["name"] for r in runtimes] == ["ort-mobile", "mnn"]
    for r in runtimes:
        short = {"ort-mobile": "ORT format", "mnn": "MNN"}[r["name"]]
        k = columns.index(f"{short} ms")
        for m in r["models"]:
            cell = rows[m["name"]][k]
            if r["status"] == "not installed":
                assert cell == "not installed"
            elif m["failure"] is not None:
                assert cell == f"failed ({m['failed_step']})"
                assert any(m["failure"] in f and m["name"] in f for f in report["comparison"]["findings"])
            else:
                assert runtime_cell_number(cell) == pytest.approx(m["latency_ms"], abs=6e-4)
                # MNN's INT8 rows come from its own quantizer (mnnquant), and the cell says so
                assert (m["quantizer"] is not None) == (r["name"] == "mnn" and m["name"].endswith("INT8"))
                assert cell.endswith("(mnnquant KL)") == (m["quantizer"] is not None)


def test_the_ort_format_column_runs_the_int8_models(run) -> None:  # type: ignore[no-untyped-def]
    """The ORT format converts and runs QDQ models: every cell timed, and its INT8 top-1 agreement with
    the FP32 original (first 32 samples) is onnxruntime CPU's on those samples, computed here."""
    result, out = run
    col = result.comparison.runtime("ort-mobile")
    assert col is not None and col.status == "ok", col
    x = np.load(DATA)["input"][:32]
    ref = run_ort(onnx.load(MODEL), {"input": x})["logits"].argmax(1)
    new = run_ort(onnx.load(out / "int8.onnx"), {"input": x})["logits"].argmax(1)
    cell = col.cell("compressed INT8")
    assert cell is not None and cell.latency_ms is not None and cell.latency_ms > 0
    assert cell.top1_agreement == pytest.approx(np.mean(ref == new), abs=2.5 / 32)
    assert col.cell("original FP32").top1_agreement == 1.0  # type: ignore[union-attr]
    assert cell.size_bytes is not None and cell.size_bytes < col.cell("original FP32").size_bytes / 3  # type: ignore[union-attr,operator]


class QdqAbortingAdapter(OrtAdapter):
    """A converter that aborts the process on QDQ models (as MNN 3.6's does), and runs float models."""

    def convert(self, onnx_path, workdir, input_shapes):  # type: ignore[no-untyped-def]
        if any(n.op_type == "QuantizeLinear" for n in onnx.load(onnx_path).graph.node):
            os.abort()
        return super().convert(onnx_path, workdir, input_shapes)


def test_a_runtime_that_cannot_run_qdq_is_a_finding(run, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from onnx_tucker.config import BenchConfig
    from onnx_tucker.mobile import adapters
    from onnx_tucker.quantize import compare_models
    from onnx_tucker.report.quantize import four_way_rows, runtime_findings

    _, out = run
    monkeypatch.setitem(adapters.ADAPTERS, "fake", f"{__name__}:QdqAbortingAdapter")
    data = load_for_model(str(DATA), onnx.load(MODEL), 16, None)
    rep = compare_models([("original FP32", onnx.load(MODEL), None), ("compressed INT8", onnx.load(out / "int8.onnx"), None)],
                         data, {"input": (1, 1, 28, 28)}, BenchConfig(warmup=1, runs=3), runtimes="fake")
    col = rep.runtime("fake")
    assert col is not None and col.status == "failed"
    fp32, int8 = col.cell("original FP32"), col.cell("compressed INT8")
    assert fp32 is not None and fp32.failure is None and fp32.latency_ms is not None and fp32.top1_agreement == 1.0
    assert int8 is not None and int8.failed_step == "convert" and "SIGABRT" in (int8.failure or "")
    assert four_way_rows(rep)[1][-2:] == ("failed (convert)", "-")
    assert any(f.startswith("fake cannot convert compressed INT8: crashed (signal 6, SIGABRT)") for f in runtime_findings(rep))


def test_an_unknown_quantize_runtime_is_one_usage_line(tmp_path: Path) -> None:
    res = runner.invoke(app, ["quantize", str(MODEL), str(tmp_path / "q.onnx"), "--data", str(DATA),
                              "--quantize-runtimes", "ort-mobile,tflite"])
    assert res.exit_code == 2
    assert "unknown runtime 'tflite'" in res.output


def test_min_sqnr_keeps_low_chains_fp32_with_the_reason() -> None:
    model = onnx.load(MODEL)
    data = load_for_model(DATA, model, SAMPLES)
    layers = ["/features/features.0/Conv", "/features/features.2/Conv"]
    r = quantize_int8(model, data, QuantizeConfig(quantize="int8", min_sqnr=200.0), layers, {"input": (1, 1, 28, 28)})
    assert [c.quantized for c in r.chains] == [False, False]
    assert all(re.match(r"SQNR -?[0-9.]+ dB < --quantize-min-sqnr 200 dB", c.fp32_reason or "") for c in r.chains)
    assert set(r.fp32_nodes) >= set(layers)


# ---- bad inputs: one line each, exit code 2 ------------------------------------------------------------


def _one_error_line(result) -> str:  # type: ignore[no-untyped-def]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_quantize_without_data_is_one_usage_line(tmp_path: Path) -> None:
    r = runner.invoke(app, ["compress", str(MODEL), str(tmp_path / "o.onnx"), "--quantize", "int8"])
    assert r.exit_code == 2
    assert "needs calibration data" in _one_error_line(r) and "--calibrate DATA or --data DATA" in r.stderr
    r = runner.invoke(app, ["quantize", str(MODEL), str(tmp_path / "o.onnx")])
    assert r.exit_code == 2 and "needs calibration data" in _one_error_line(r)
    assert not (tmp_path / "o.onnx").exists()


def test_an_already_quantized_input_is_refused_naming_the_node(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, out = run
    r = runner.invoke(app, ["quantize", str(out / "int8.onnx"), str(tmp_path / "o.onnx"), "--data", str(DATA)])
    assert r.exit_code == 2
    line = _one_error_line(r)
    assert re.search(r"node '[^']+' \((QuantizeLinear|DequantizeLinear)\) is quantized already", line), line


def test_a_qlinearconv_input_is_refused() -> None:
    from onnx import TensorProto, helper

    from onnx_tucker.errors import QuantizeError
    from onnx_tucker.quantize import check_float_model

    node = helper.make_node("QLinearConv", [f"i{k}" for k in range(8)], ["y"], name="qconv")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("i0", TensorProto.UINT8, [1, 1, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.UINT8, None)])
    with pytest.raises(QuantizeError, match=r"node 'qconv' \(QLinearConv\) is quantized already"):
        check_float_model(helper.make_model(g), "m.onnx")


def test_a_quantizer_failure_names_the_node_and_op(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from onnx_tucker.quantize import stage

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Unsupported: tensor /features/features.5/Conv_output_0 has no range")

    monkeypatch.setattr(stage, "_quantize", fail)
    r = runner.invoke(app, ["quantize", str(MODEL), str(tmp_path / "o.onnx"), "--data", str(DATA), "--samples", "16"])
    assert r.exit_code == 2
    line = _one_error_line(r)
    assert "failed on node '/features/features.5/Conv' (Conv)" in line and "--quantize-exclude" in line
    assert not (tmp_path / "o.onnx").exists()


def test_quantize_options_need_quantize(tmp_path: Path) -> None:
    r = runner.invoke(app, ["compress", str(MODEL), str(tmp_path / "o.onnx"), "--quantize-exclude", "x"])
    assert r.exit_code == 2 and "only with --quantize int8" in _one_error_line(r)
    r = runner.invoke(app, ["compress", str(MODEL), str(tmp_path / "o.onnx"), "--quantize", "int4", "--data", str(DATA)])
    assert r.exit_code == 2 and "--quantize int4: not a quantization" in _one_error_line(r)


def test_the_quantize_command_writes_the_int8_reference(tmp_path: Path) -> None:
    out, rep = tmp_path / "o.onnx", tmp_path / "o.json"
    r = runner.invoke(app, ["quantize", str(MODEL), str(out), "--data", str(DATA), "--samples", str(SAMPLES),
                            "--runs", "2", "--warmup", "0", "--report", str(rep), "-q"])
    assert r.exit_code == 0, r.stderr
    d = json.loads(rep.read_text())
    assert list(d) == ["quantize", "comparison"]  # the keys its --report help names
    help_text = " ".join(runner.invoke(app, ["quantize", "--help"], env={"COLUMNS": "200"}).stdout.split())
    assert "(keys: quantize, comparison)" in help_text
    assert [m["name"] for m in d["comparison"]["models"]] == ["original FP32", "original INT8"]
    int8 = d["comparison"]["models"][1]
    assert int8["top1_agreement"] >= 0.95 and int8["sqnr_db"] >= 30.0
    assert int8["accuracy"] is not None and abs(int8["accuracy"] - d["comparison"]["models"][0]["accuracy"]) <= 0.03
    assert len(d["quantize"]["chains"]) == 7 and all(c["precision"] == "int8" for c in d["quantize"]["chains"])


def test_the_quantizers_names_are_shortened_unless_kept(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The written INT8 file has short tensor names (graph/compact.py) and says so; --quantize-keep-names
    writes the quantizer's names: a larger file computing the same outputs."""
    result, out = run
    short = onnx.load(out / "int8.onnx")
    assert not any("_QuantizeLinear" in t or t.endswith("_quantized") for n in short.graph.node for t in n.output)
    assert any("names shortened" in n for n in result.quantize.notes)
    kept_path = tmp_path / "kept.onnx"
    r = runner.invoke(app, ["quantize", str(MODEL), str(kept_path), "--data", str(DATA), "--samples", str(SAMPLES),
                            "--quantize-runtimes", "none", "--quantize-keep-names", "-q"])
    assert r.exit_code == 0, r.stderr
    plain_path = tmp_path / "plain.onnx"
    r = runner.invoke(app, ["quantize", str(MODEL), str(plain_path), "--data", str(DATA), "--samples", str(SAMPLES),
                            "--quantize-runtimes", "none", "-q"])
    assert r.exit_code == 0, r.stderr
    kept, plain = onnx.load(kept_path), onnx.load(plain_path)
    assert any(t.endswith("_quantized") for t in (i.name for i in kept.graph.initializer))
    assert plain_path.stat().st_size < kept_path.stat().st_size
    x = {"input": np.load(DATA)["input"][:8]}
    assert np.array_equal(run_ort(kept, x)["logits"], run_ort(plain, x)["logits"])


def test_the_calibration_method_is_onnxruntimes() -> None:
    """entropy / percentile ranges differ from minmax ones: the scales of the activations change."""
    model = onnx.load(MODEL)
    data = load_for_model(DATA, model, 32)
    layers = ["/features/features.0/Conv"]
    scales = {}
    for method in ("minmax", "percentile", "entropy"):
        r = quantize_int8(model, data, QuantizeConfig(quantize="int8", method=method, keep_names=True), layers, {"input": (1, 1, 28, 28)})
        assert r.method == method and r.output_sqnr_db["logits"] > MIN_SQNR_DB[method]
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in r.model.graph.initializer}
        scales[method] = {k: float(v) for k, v in inits.items() if k.endswith("_scale") and v.size == 1}
    for method in ("percentile", "entropy"):  # entropy used to equal minmax through quantize_static alone
        assert scales["minmax"].keys() == scales[method].keys()
        assert any(abs(scales["minmax"][k] - scales[method][k]) > 1e-6 * scales["minmax"][k] for k in scales["minmax"])


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_methods_take_a_shorter_last_batch(method: str) -> None:
    """300 samples run as 256 + 44: onnxruntime's histogram calibrators fail on uneven batches
    (onnxruntime issue #18792), so they get single samples; the same samples, in order."""
    model = onnx.load(MODEL)
    data = load_for_model(DATA, model, 300)
    batches = data_batches(data, {"input": (1, 1, 28, 28)}, model)
    assert sorted({len(b["input"]) for b in batches}) == [44, 256]
    even = equal_batches(batches)
    assert {len(b["input"]) for b in even} == {1} and len(even) == 300
    assert np.array_equal(np.concatenate([b["input"] for b in even]), np.concatenate([b["input"] for b in batches]))
    assert equal_batches(batches[:1])[0]["input"] is not None and len(equal_batches(batches[:1])) == 1
    r = quantize_int8(model, data, QuantizeConfig(quantize="int8", method=method), ["/features/features.0/Conv"],
                      {"input": (1, 1, 28, 28)})
    assert r.method == method and r.output_sqnr_db["logits"] > MIN_SQNR_DB[method]


def test_interleave_many_rotates_the_order() -> None:
    from onnx_tucker.runtime.bench import interleave_many

    calls: list[str] = []
    ticks = iter(range(1000))
    fns = [lambda n=n: calls.append(n) for n in "abc"]
    times = interleave_many(fns, warmup=1, runs=3, clock=lambda: float(next(ticks)))
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert [len(t) for t in times] == [3, 3, 3] and all(v == pytest.approx(1e3) for t in times for v in t)


def test_report_counts_an_int8_model_as_the_float_model_it_stands_for(run) -> None:  # type: ignore[no-untyped-def]
    """`report ORIG INT8`: the QDQ model's weights (int8 behind DequantizeLinear) and layers counted, not 0."""
    from onnx_tucker.graph.fold import float_parameter_count
    from onnx_tucker.graph.qdq import float_view, has_qdq
    from onnx_tucker.mobile.inputs import model_macs

    result, out = run
    int8 = onnx.load(out / "int8.onnx")
    assert has_qdq(int8) and not has_qdq(onnx.load(MODEL))
    view = float_view(int8)
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in view.graph.node)
    shapes = {"input": (1, 1, 28, 28)}
    t = result.totals  # the compressed FP32 model's counts
    assert float_parameter_count(int8) < t.params_after / 2  # the float count alone sees only the FP32-kept chain
    counted = float_view(int8, saturate=False)
    assert float_parameter_count(counted) == t.params_after
    assert model_macs(counted, shapes) == t.macs_after
    # the float view computes the dequantized weights without activation rounding: close to the INT8 model
    x = np.load(DATA)["input"][:16]
    a = run_ort(int8, {"input": x})["logits"]
    b = run_ort(view, {"input": x})["logits"]
    assert sqnr_db(b, a) > MIN_OUTPUT_SQNR_DB


def test_the_int8_html_shows_the_four_way_rows_and_findings(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from html import escape

    from onnx_tucker.report.html import quantize_html
    from onnx_tucker.report.quantize import four_way_rows, runtime_findings

    result, _ = run
    page = quantize_html(result.quantize, result.comparison)
    for row in four_way_rows(result.comparison):
        assert "".join(f"<td>{escape(c)}</td>" if not c.startswith("failed") else f"<td class='bad'>{escape(c)}</td>"
                       for c in row) in page
    for f in runtime_findings(result.comparison):
        assert escape(f) in page
    for c in result.quantize.chains:
        assert escape(c.name) in page
    assert "<svg" in page and not re.search(r"(src|href)=", page)  # self-contained: no external resource


def test_the_int8_layer_timer_times_quantized_chains() -> None:
    """quantize/layertime.py: the tiny chain model is quantized (every Conv reads DequantizeLinear inputs),
    computes the FP32 chain within the stated SQNR on its seeded input, and the timer returns both times."""
    from onnx_tucker.graph.layermodel import chain_layer_model
    from onnx_tucker.ops.layer import Layer
    from onnx_tucker.quantize.layertime import OrtInt8LayerTimer, quantize_tiny

    layer = Layer(layer_id="l", op_type="Conv", node_index=0, weight_name="W", weight_shape=(32, 32, 3, 3),
                  weight_dtype="float32", attrs={"pads": [1, 1, 1, 1]}, input_shape=(1, 32, 16, 16),
                  output_shape=(1, 32, 16, 16))
    fp32 = chain_layer_model(layer, "tucker2", (8, 8), 17)
    int8 = quantize_tiny(fp32)
    prod = _producers(int8)
    convs = [n for n in int8.graph.node if n.op_type == "Conv"]
    assert len(convs) == 3 and all(prod[c.input[0]].op_type == prod[c.input[1]].op_type == "DequantizeLinear" for c in convs)
    x = {"x": np.random.default_rng(0).standard_normal((1, 32, 16, 16)).astype(np.float32)}
    assert sqnr_db(run_ort(fp32, x)["y"], run_ort(int8, x)["y"]) > MIN_OUTPUT_SQNR_DB
    t = OrtInt8LayerTimer(17, warmup=1, runs=3).measure(layer, "tucker2", (8, 8))
    assert t is not None and t.original_ms > 0 and t.decomposed_ms > 0


def test_latency_aware_times_int8_chains_under_ort_int8(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--latency-aware --latency-runtime ort-int8`: the layers and chains timed are the INT8 ones
    (OrtInt8LayerTimer's sessions load quantized models), and each planned layer carries its times."""
    from onnx_tucker.quantize import layertime

    quantized: list[int] = []
    real = layertime.quantize_tiny

    def spy(model, seed=0):  # type: ignore[no-untyped-def]
        q = real(model, seed)
        quantized.append(sum(n.op_type == "DequantizeLinear" for n in q.graph.node))
        return q

    monkeypatch.setattr(layertime, "quantize_tiny", spy)
    cfg = CompressionConfig(ranks="energy:0.9", latency_aware=True, latency_runtime="ort-int8", validate=False)
    result = api.compress(MODEL, cfg)
    assert result.layer_timing is not None and result.layer_timing.runtime == "ort-int8"
    assert quantized and all(k > 0 for k in quantized)
    timed = [lp for lp in result.plan.layers if lp.time_before_ms is not None]
    assert timed and all(lp.time_after_ms is not None and lp.time_after_ms > 0 for lp in timed)
