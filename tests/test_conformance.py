"""Conformance corpus: the model-zoo networks shipped in the onnx wheel (onnx/backend/test/data/light).

AlexNet, VGG-19, GoogLeNet (Inception-v1), Inception-v2, ResNet-50, SqueezeNet, DenseNet-121,
ShuffleNet and ZFNet-512 as Caffe2 exported them (opset 9, IR 3, initializers listed as graph
inputs), with every weight replaced by a `ConstantOfShape` of 0.02: each one exercises weight
folding on a real topology.

Constant weights make every class score equal (the softmax output is uniform whatever the input),
so comparing the final output alone would prove nothing. Every Conv / Gemm output is therefore
added as a graph output ("probe") before compressing, and validation compares them all.

Costs: the 4096-wide fully connected layers of AlexNet, ZFNet-512 and VGG-19 dominate (two
eigendecompositions of a 4096 x 4096 Gram matrix each, ~10 s apiece on 2 cores). The quick tier
runs those three models with the 4096-wide FCs excluded (~40 s for the whole tier); the slow tier
runs them whole under --ranks full, and VGG-19 whole under the default ranks (~3.5 min together).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import onnx_tucker as ot
from onnx_tucker import CompressionConfig, RankPolicy
from onnx_tucker.graph.load import load_model
from onnx_tucker.report import result_json

LIGHT_DIR = Path(onnx.__file__).resolve().parent / "backend" / "test" / "data" / "light"
MODELS = sorted(p.stem for p in LIGHT_DIR.glob("light_*.onnx"))
# Node names of the FC layers with a 4096-wide side (the expensive ones).
WIDE_FC = {"light_bvlc_alexnet": "^n1[69]$", "light_zfnet512": "^n1[68]$", "light_vgg19": "^n(38|41)$"}
EXPECTED = {  # the networks the issue names; inception_v2 comes with them
    "light_bvlc_alexnet", "light_densenet121", "light_inception_v1", "light_inception_v2", "light_resnet50",
    "light_shufflenet", "light_squeezenet", "light_vgg19", "light_zfnet512",
}
GROUPED = re.compile(r"^(grouped|depthwise) conv \(group=\d+\): ")


def _probed(name: str) -> tuple[onnx.ModelProto, set[str]]:
    """The model, with every Conv / Gemm output also a graph output; and the names of those layers."""
    model = load_model(LIGHT_DIR / f"{name}.onnx")
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v for v in inferred.graph.value_info}
    present = {o.name for o in model.graph.output}
    layers = set()
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        layers.add(node.name)
        out = node.output[0]
        if out not in present:
            vi = types.get(out) or helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, [])
            model.graph.output.append(vi)
            present.add(out)
    return model, layers


def test_corpus_is_complete() -> None:
    if not LIGHT_DIR.is_dir():
        pytest.skip(f"{LIGHT_DIR}: this onnx wheel ships no light models")
    assert EXPECTED <= set(MODELS), sorted(EXPECTED - set(MODELS))


def _check_full(name: str, exclude: str | None) -> None:
    model, layers = _probed(name)
    before = onnx.ModelProto()
    before.CopyFrom(model)
    cfg = CompressionConfig(ranks=RankPolicy("full"), samples=1, exclude=exclude)
    res = ot.compress(model, cfg)
    assert model == before  # the input model is never mutated

    by_name = {lp.name: lp for lp in res.plan.layers}
    assert set(by_name) == layers
    for lp in res.plan.layers:
        if exclude and re.search(exclude, lp.name):
            assert lp.reason == f"name matches --exclude {exclude!r}"
        elif not lp.decomposed:
            # Only grouped / depthwise convs are left (ShuffleNet, AlexNet's group=2): every
            # ConstantOfShape weight of the others was folded.
            assert lp.reason is not None and GROUPED.match(lp.reason), (lp.name, lp.reason)
    assert res.decomposed_layers > 0

    v = res.validation
    assert v is not None and v.passed, [(o.name, o.max_rel_error) for o in v.outputs if not o.passes(1e-4)]
    assert len(v.outputs) == len(res.model.graph.output)
    for o in v.outputs:
        assert np.isfinite(o.max_abs_reference) and o.max_abs_error <= 1e-4 * o.max_abs_reference, o
    assert res.model.ir_version == model.ir_version == 3
    assert list(res.model.opset_import) == list(model.opset_import)
    # IR 3: every initializer (the factors too) is also a graph input.
    assert {t.name for t in res.model.graph.initializer} <= {i.name for i in res.model.graph.input}
    # The ConstantOfShape nodes that fed replaced weights are gone; the others (biases, BN, grouped convs) stay.
    replaced = {node.input[1] for node in model.graph.node if node.name in by_name and by_name[node.name].decomposed}
    left = {n.output[0] for n in res.model.graph.node if n.op_type == "ConstantOfShape"}
    assert not replaced & left
    kept = {node.input[1] for node in model.graph.node if node.name in by_name and not by_name[node.name].decomposed}
    after = {n.SerializeToString() for n in res.model.graph.node}
    for node in model.graph.node:
        if node.op_type == "ConstantOfShape" and node.output[0] in kept:
            assert node.SerializeToString() in after, node.output[0]  # untouched layers keep their weight subgraph
    assert res.totals.params_before > 0


def _check_default(name: str, exclude: str | None) -> None:
    model, _ = _probed(name)
    res = ot.compress(model, CompressionConfig(samples=1, exclude=exclude))
    report = json.loads(result_json(res))
    assert len(report["layers"]) == len(res.plan.layers)
    for lp in res.plan.layers:
        if lp.decomposed:
            # Constant-filled kernels have rank 1 on every unfolding. EVBMF keeps 1, or a few more
            # where its noise estimate collapses to round-off level (e.g. 8 on AlexNet's fc6); any
            # rank >= 1 reproduces such a kernel exactly.
            assert lp.ranks is not None and min(lp.ranks) >= 1, (lp.name, lp.ranks)
            assert lp.rel_error is not None and lp.rel_error < 1e-6, (lp.name, lp.rel_error)
        else:
            assert lp.reason
    assert res.decomposed_layers > 0
    v = res.validation
    assert v is not None and v.status == "measured"  # no tolerance under default ranks: runs and reports
    # Rank 1 is exact for these kernels: the compressed model computes the same function.
    for o in v.outputs:
        assert np.isfinite(o.max_abs_error) and o.max_abs_error <= 1e-4 * o.max_abs_reference, o
    assert res.totals.params_after < res.totals.params_before


QUICK = [m for m in MODELS if m not in WIDE_FC]
HEAVY = [m for m in MODELS if m in WIDE_FC]


@pytest.mark.parametrize("name", QUICK)
def test_full_ranks_reproduce_outputs(name: str) -> None:
    _check_full(name, exclude=None)


@pytest.mark.parametrize("name", QUICK)
def test_default_ranks_compress_and_run(name: str) -> None:
    _check_default(name, exclude=None)


@pytest.mark.parametrize("name", HEAVY)
def test_full_ranks_without_wide_fc(name: str) -> None:
    """The heavy networks in the quick tier: every conv and the last FC, the 4096-wide FCs excluded."""
    _check_full(name, exclude=WIDE_FC[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", HEAVY)
def test_full_ranks_heavy(name: str) -> None:
    _check_full(name, exclude=None)


@pytest.mark.parametrize("name", HEAVY)
def test_default_ranks_without_wide_fc(name: str) -> None:
    _check_default(name, exclude=WIDE_FC[name])


@pytest.mark.slow
def test_default_ranks_vgg19_whole() -> None:
    """Default ranks on the largest network whole (the 4096-wide FCs of AlexNet / ZFNet-512 take the
    same path at a third of the size; their full-rank runs above cover them)."""
    _check_default("light_vgg19", exclude=None)


def test_cli_full_ranks_on_a_light_model(tmp_path: Path) -> None:
    """`onnx-tucker compress --ranks full` end to end on SqueezeNet (probed), exit 0, OUT runs."""
    from typer.testing import CliRunner

    from onnx_tucker.cli import app

    model, _ = _probed("light_squeezenet")
    src = tmp_path / "squeezenet.onnx"
    src.write_bytes(model.SerializeToString())
    out, report = tmp_path / "squeezenet.tucker.onnx", tmp_path / "report.json"
    result = CliRunner().invoke(
        app, ["compress", str(src), str(out), "--ranks", "full", "--samples", "1", "--report", str(report), "-q"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["validation"]["status"] == "passed"
    assert sum(1 for lay in data["layers"] if lay["kind"] != "skip") == 26
    written = load_model(out)
    assert written.ir_version == 3 and not [n for n in written.graph.node if n.op_type == "ConstantOfShape"
                                             and n.output[0].endswith("_w_0")]
