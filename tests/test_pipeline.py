"""End to end through onnx_tucker.compress: files written, input untouched, report, validation."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnx_tucker as ot
from onnx_tucker import CompressionConfig, RankPolicy
from onnx_tucker.report import result_dict
from tests.helpers import assert_outputs_close, make_conv_model, make_small_cnn, random_feeds, run_ort, save


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def cnn_path(tmp_path: Path) -> Path:
    return save(make_small_cnn(low_rank=True), tmp_path / "cnn.onnx")


def test_default_compress_writes_a_valid_smaller_model(cnn_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "cnn.tucker.onnx"
    res = ot.compress(cnn_path, CompressionConfig(samples=2), output=out)
    assert res.output_path == str(out) and out.is_file()
    assert res.input_path == str(cnn_path)
    onnx.checker.check_model(str(out), full_check=True)
    written = onnx.load(str(out))
    assert written.SerializeToString() == res.model.SerializeToString()

    assert res.decomposed_layers == 3
    assert {lp.name: lp.kind for lp in res.plan.layers} == {"conv1": "tucker1", "conv2": "tucker2", "fc": "svd"}
    t = res.totals
    assert t.params_ratio > 2 and t.macs_ratio > 2 and t.size_ratio > 1
    assert t.params_after == sum(int(np.prod(i.dims)) for i in written.graph.initializer)

    # It runs, and the low-rank weights are reproduced closely (only the small noise is cut).
    original = onnx.load(str(cnn_path))
    feeds = random_feeds(original, seed=1)
    a, b = run_ort(original, feeds)["logits"], run_ort(written, feeds)["logits"]
    assert b.shape == (1, 10) and np.all(np.isfinite(b))
    assert np.max(np.abs(a - b)) <= 0.05 * np.max(np.abs(a))

    v = res.validation
    assert v is not None and v.status == "measured" and v.samples == 2
    (o,) = v.outputs
    assert o.name == "logits" and o.cosine > 0.99 and o.top1_agreement is not None


def test_input_file_is_never_modified(cnn_path: Path, tmp_path: Path) -> None:
    before = sha256(cnn_path)
    mtime = cnn_path.stat().st_mtime_ns
    for cfg in (CompressionConfig(samples=1), CompressionConfig(ranks=RankPolicy("full"), samples=1)):
        ot.compress(cnn_path, cfg, output=tmp_path / "out.onnx")
        ot.plan(cnn_path, cfg)
    assert sha256(cnn_path) == before
    assert cnn_path.stat().st_mtime_ns == mtime


def test_output_equal_to_input_is_refused(cnn_path: Path) -> None:
    before = sha256(cnn_path)
    with pytest.raises(ot.UsageError, match="input"):
        ot.compress(cnn_path, CompressionConfig(samples=1), output=cnn_path)
    assert sha256(cnn_path) == before


def test_report_has_layers_totals_validation(cnn_path: Path, tmp_path: Path) -> None:
    res = ot.compress(cnn_path, CompressionConfig(samples=2), output=tmp_path / "out.onnx")
    d = result_dict(res)
    assert {"layers", "totals", "validation"} <= set(d)
    json.loads(json.dumps(d, allow_nan=False))  # strict JSON: no NaN / Infinity
    assert [layer["name"] for layer in d["layers"]] == ["conv1", "conv2", "fc"]
    conv2 = d["layers"][1]
    assert conv2["kind"] == "tucker2" and conv2["ranks"] == [8, 4] and conv2["weight_shape"] == [32, 16, 3, 3]
    assert 0 < conv2["rel_error"] < 0.05
    assert conv2["params_after"] < conv2["params_before"] and conv2["macs_after"] < conv2["macs_before"]
    totals = d["totals"]
    for key in ("params_before", "params_after", "macs_before", "macs_after", "macs_ratio", "params_ratio"):
        assert key in totals
    assert totals["macs_ratio"] == pytest.approx(totals["macs_before"] / totals["macs_after"])
    assert totals["macs_before"] == sum(layer["macs_before"] for layer in d["layers"])
    val = d["validation"]
    assert val["status"] == "measured" and val["outputs"][0]["name"] == "logits"
    for key in ("max_abs_error", "max_rel_error", "cosine", "top1_agreement"):
        assert key in val["outputs"][0]


def test_full_ranks_validation_passes(cnn_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "full.onnx"
    res = ot.compress(cnn_path, CompressionConfig(ranks=RankPolicy("full"), samples=3), output=out)
    d = result_dict(res)
    assert d["validation"]["status"] == "passed" and d["validation"]["passed"] is True
    assert d["validation"]["rtol"] == 1e-4
    (o,) = d["validation"]["outputs"]
    assert o["max_abs_error"] <= 1e-4 * o["max_abs_reference"]
    assert res.decomposed_layers == 3
    assert_outputs_close(onnx.load(str(cnn_path)), onnx.load(str(out)), rtol=1e-4)


def test_failed_validation_writes_nothing(cnn_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "lossy.onnx"
    res = ot.compress(cnn_path, CompressionConfig(samples=1, rtol=1e-9), output=out)
    assert res.validation is not None and res.validation.status == "failed"
    assert res.output_path is None
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [cnn_path]  # no temporary left behind either


def test_no_validation(cnn_path: Path, tmp_path: Path) -> None:
    res = ot.compress(cnn_path, CompressionConfig(validate=False), output=tmp_path / "out.onnx")
    assert res.validation is None
    assert result_dict(res)["validation"] is None


def test_model_proto_and_path_give_the_same_model(cnn_path: Path) -> None:
    cfg = CompressionConfig(validate=False)
    from_path = ot.compress(cnn_path, cfg).model
    from_proto = ot.compress(onnx.load(str(cnn_path)), cfg).model
    assert from_path.SerializeToString() == from_proto.SerializeToString()


def test_plan_matches_compress(cnn_path: Path) -> None:
    cfg = CompressionConfig(validate=False)
    p = ot.plan(cnn_path, cfg)
    res = ot.compress(cnn_path, cfg)
    assert [(lp.name, lp.kind, lp.ranks, lp.rel_error) for lp in p.layers] == [
        (lp.name, lp.kind, lp.ranks, lp.rel_error) for lp in res.plan.layers
    ]


def test_nothing_to_decompose_still_writes_an_equivalent_model(tmp_path: Path) -> None:
    """Pure-noise weights: every layer is kept (rank 0) and OUT is the same model."""
    model = make_conv_model(T=32, S=32, seed=3)
    src = save(model, tmp_path / "noise.onnx")
    out = tmp_path / "noise.out.onnx"
    res = ot.compress(src, CompressionConfig(samples=1), output=out)
    assert res.decomposed_layers == 0
    assert res.plan.layers[0].reason
    assert out.is_file()
    assert onnx.load(str(out)).graph.SerializeToString() == model.graph.SerializeToString()
    assert res.totals.macs_ratio == 1.0 and res.totals.params_ratio == 1.0


def test_dynamic_batch_and_input_shape_override(tmp_path: Path) -> None:
    """A symbolic batch dimension is fixed to 1 for planning, or to --input-shape when given."""
    model = make_small_cnn(batch="N", low_rank=True)
    res = ot.compress(model, CompressionConfig(samples=1, input_shapes=(("x", (4, 3, 16, 16)),)))
    assert res.validation is not None and res.validation.input_shapes["x"] == (4, 3, 16, 16)
    conv1 = res.plan.layers[0]
    assert conv1.macs_before == 4 * 16 * 3 * 9 * 256  # batch 4 counted
    assert_outputs_close(model, res.model, rtol=0.05, batch=5)  # still dynamic: any batch runs


@pytest.mark.data
def test_resnet20_full_ranks_reproduce_outputs(resnet20_path: Path, tmp_path: Path) -> None:
    before = sha256(resnet20_path)
    out = tmp_path / "r20.full.onnx"
    res = ot.compress(resnet20_path, CompressionConfig(ranks=RankPolicy("full"), samples=2), output=out)
    d = result_dict(res)
    assert d["validation"]["status"] == "passed"
    for o in d["validation"]["outputs"]:
        assert o["max_abs_error"] <= 1e-4 * o["max_abs_reference"]
    assert res.decomposed_layers >= 19
    onnx.checker.check_model(str(out))
    assert sha256(resnet20_path) == before


@pytest.mark.data
def test_resnet20_default_ranks_reduce_macs(resnet20_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "r20.onnx"
    res = ot.compress(resnet20_path, CompressionConfig(samples=2), output=out)
    d = result_dict(res)
    assert d["totals"]["macs_ratio"] > 1
    assert d["totals"]["params_ratio"] > 1
    assert d["validation"]["status"] == "measured"
    onnx.checker.check_model(str(out))
    written = onnx.load(str(out))
    logits = run_ort(written, random_feeds(written))["logits"]
    assert logits.shape == (1, 10) and np.all(np.isfinite(logits))


def test_public_names_are_not_shadowed_by_subpackages() -> None:
    """The package resolves its names lazily: importing a sub-package must never replace a public
    function of the same name (a `plan/` sub-package once turned `ot.plan` into a module)."""
    import subprocess
    import sys

    code = (
        "import onnx_tucker as ot, onnx_tucker.planning.planner, onnx_tucker.api, onnx_tucker.graph.model\n"
        "import inspect\n"
        "bad = [n for n in ot.__all__ if inspect.ismodule(getattr(ot, n)) and not callable(getattr(ot, n))]\n"
        "assert not bad, bad\n"
        "assert callable(ot.plan) and callable(ot.compress) and callable(ot.validate) and callable(ot.bench)\n"
        "assert callable(ot.finetune)\n"
        "assert inspect.isfunction(ot.finetune) and 'model' in inspect.signature(ot.finetune).parameters  # a plain function\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_input_size_counts_its_external_data(tmp_path: Path) -> None:
    """A model stored with external data: the file size before is the .onnx plus its data file."""
    import onnx

    from tests.helpers import make_small_cnn

    path = tmp_path / "m.onnx"
    onnx.save(make_small_cnn(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.data", size_threshold=0)
    res = ot.compress(path, CompressionConfig(validate=False), output=tmp_path / "o.onnx")
    expected = path.stat().st_size + (tmp_path / "m.data").stat().st_size
    assert (tmp_path / "m.data").stat().st_size > path.stat().st_size
    assert res.totals.size_before == expected
