"""Graph patterns real exporters write: folded weight subgraphs, shared weights, Gemm / MatMul forms,
float16 / bfloat16, old IR / opsets, value_info, subgraphs, custom domains, dynamic batch, external data.

Every full-rank test checks the compressed model against the original in onnxruntime; every skip
test checks the exact reason and that the graph is left byte for byte as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_tucker as ot
from onnx_tucker import CompressionConfig, RankPolicy
from onnx_tucker.errors import ValidationError
from onnx_tucker.graph.load import load_model
from onnx_tucker.graph.model import ModelIndex, find_layers
from onnx_tucker.graph.save import save_model
from tests.helpers import (
    assert_outputs_close,
    he_normal,
    make_conv_model,
    make_gemm_model,
    op_counts,
    random_feeds,
    run_ort,
)

MAX_OPSET = onnx.defs.onnx_opset_version()


# ---- builders -----------------------------------------------------------------------------------

def _init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(arr), name)


def _vi(name: str, shape: Sequence[int | str | None] | None, dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def _model(
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    opset: int = 17,
    ir_version: int = 8,
    extra_domains: Sequence[tuple[str, int]] = (),
    value_info: Sequence[onnx.ValueInfoProto] = (),
    check: bool = True,
) -> onnx.ModelProto:
    if ir_version < 4:
        inputs = inputs + [_vi(t.name, list(t.dims), t.data_type) for t in inits]
    graph = helper.make_graph(nodes, "patterns", inputs, outputs, initializer=inits, value_info=list(value_info))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in extra_domains]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="onnx-tucker-tests")
    model.ir_version = ir_version
    if check:
        onnx.checker.check_model(model)
    return model


def _conv_with_weight(
    weight_nodes: list[onnx.NodeProto], weight_inits: list[onnx.TensorProto], T: int = 10, S: int = 8, k: int = 3
) -> onnx.ModelProto:
    """x [1, S, 7, 7] -> Conv(x, W, B) -> Relu -> y, where `weight_nodes` compute W from `weight_inits`."""
    b = _init("B", (0.1 * np.random.default_rng(9).standard_normal(T)).astype(np.float32))
    nodes = [
        *weight_nodes,
        helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", kernel_shape=[k, k], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
    ]
    return _model(nodes, [*weight_inits, b], [_vi("x", [1, S, 7, 7])], [_vi("y", [1, T, 7, 7])])


def _full(**kw: object) -> CompressionConfig:
    kw.setdefault("validate", False)
    return CompressionConfig(ranks=RankPolicy("full"), **kw)  # type: ignore[arg-type]


def _serialized_nodes(model: onnx.ModelProto) -> list[bytes]:
    return [n.SerializeToString() for n in model.graph.node]


def _inits(model: onnx.ModelProto) -> dict[str, bytes]:
    return {t.name: t.SerializeToString() for t in model.graph.initializer}


def _reason(res: ot.CompressionResult, name: str) -> str | None:
    return next(lp.reason for lp in res.plan.layers if lp.name == name)


# ---- 1. weights reaching the layer through a constant-only subgraph --------------------------------

RNG = np.random.default_rng(3)
W_TS = he_normal(RNG, (10, 8, 3, 3))  # the kernel every pattern below must produce (T=10, S=8)


def _pattern(kind: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes + initializers computing W (10 x 8 x 3 x 3) the way some exporter does."""
    mk = helper.make_node
    if kind == "constant":
        return [mk("Constant", [], ["W"], name="w_const", value=_init("w", W_TS))], []
    if kind == "identity":  # PyTorch: tied / aliased parameters
        return [mk("Identity", ["W0"], ["W"], name="w_id")], [_init("W0", W_TS)]
    if kind == "cast":  # mixed-precision exports keep fp16 master weights
        return [mk("Cast", ["W0"], ["W"], name="w_cast", to=TensorProto.FLOAT)], [_init("W0", W_TS.astype(np.float16))]
    if kind == "reshape":
        return [mk("Reshape", ["W0", "shape"], ["W"], name="w_reshape")], [
            _init("W0", W_TS.reshape(10, -1)), _init("shape", np.array(W_TS.shape, dtype=np.int64))]
    if kind == "transpose":  # TF / Keras HWIO kernels
        return [mk("Transpose", ["W0"], ["W"], name="w_t", perm=[3, 2, 0, 1])], [
            _init("W0", np.transpose(W_TS, (2, 3, 1, 0)))]
    if kind == "squeeze":
        return [mk("Squeeze", ["W0", "ax"], ["W"], name="w_sq")], [
            _init("W0", W_TS[None]), _init("ax", np.array([0], dtype=np.int64))]
    if kind == "unsqueeze_squeeze":
        return [mk("Unsqueeze", ["W0", "ax"], ["W1"], name="w_unsq"), mk("Squeeze", ["W1", "ax"], ["W"], name="w_sq")], [
            _init("W0", W_TS), _init("ax", np.array([2], dtype=np.int64))]
    if kind == "constant_of_shape":  # Caffe2 conversions (the onnx wheel's light_* models)
        return [mk("ConstantOfShape", ["shape"], ["W"], name="w_cos", value=_init("v", np.array([0.05], np.float32)))], [
            _init("shape", np.array(W_TS.shape, dtype=np.int64))]
    if kind == "chain":  # ConstantOfShape -> Add -> Mul(Constant) -> Transpose: several folding steps
        return [
            mk("ConstantOfShape", ["shape"], ["ones"], name="w_cos", value=_init("v", np.array([1.0], np.float32))),
            mk("Add", ["ones", "W0"], ["w1"], name="w_add"),
            mk("Constant", [], ["half"], name="w_half", value=_init("h", np.array(0.5, np.float32))),
            mk("Mul", ["w1", "half"], ["w2"], name="w_mul"),
            mk("Transpose", ["w2"], ["W"], name="w_t", perm=[1, 0, 2, 3]),
        ], [_init("shape", np.array([8, 10, 3, 3], dtype=np.int64)), _init("W0", np.transpose(W_TS, (1, 0, 2, 3)))]
    if kind == "weight_norm":  # torch.nn.utils.weight_norm: W = g * v / ||v||
        v = W_TS * 3.0
        g = np.linalg.norm(W_TS.reshape(10, -1), axis=1).reshape(10, 1, 1, 1).astype(np.float32)
        return [
            mk("ReduceL2", ["v"], ["n"], name="wn_norm", keepdims=1, axes=[1, 2, 3]),
            mk("Div", ["v", "n"], ["dir"], name="wn_div"),
            mk("Mul", ["g", "dir"], ["W"], name="wn_mul"),
        ], [_init("v", v), _init("g", g)]
    raise AssertionError(kind)


PATTERNS = ["constant", "identity", "cast", "reshape", "transpose", "squeeze", "unsqueeze_squeeze", "constant_of_shape",
            "chain", "weight_norm"]


@pytest.mark.parametrize("kind", PATTERNS)
def test_folded_weight_is_decomposed_and_its_subgraph_dropped(kind: str) -> None:
    nodes, inits = _pattern(kind)
    model = _conv_with_weight(nodes, inits)
    res = ot.compress(model, _full())
    layer = res.plan.layers[0]
    assert layer.kind == "tucker2", layer.reason
    assert layer.weight_shape == (10, 8, 3, 3)
    found = find_layers(model, {}, ModelIndex(model))
    assert found[0].weight_folded == (kind != "constant")  # a plain Constant node needs no evaluation
    # Only the chain and the untouched Relu remain: every folding node and its initializers are gone.
    assert op_counts(res.model) == {"Conv": 3, "Relu": 1}
    names = {t.name for t in res.model.graph.initializer}
    assert names == {"B", "conv/tucker_first/W", "conv/tucker_core/W", "conv/tucker_last/W"}
    assert _serialized_nodes(res.model)[-1] == model.graph.node[-1].SerializeToString()  # Relu byte-identical
    assert_outputs_close(model, res.model, rtol=1e-4)


def test_folded_weight_meets_the_same_kernel() -> None:
    """The folded value is the kernel itself (not e.g. the un-transposed source): full-rank factors
    rebuild W_TS exactly."""
    nodes, inits = _pattern("transpose")
    res = ot.compress(_conv_with_weight(nodes, inits), _full())
    f = {t.name.split("/")[1]: numpy_helper.to_array(t).astype(np.float64) for t in res.model.graph.initializer
         if t.name.startswith("conv/")}
    first, core, last = f["tucker_first"][:, :, 0, 0], f["tucker_core"], f["tucker_last"][:, :, 0, 0]
    rebuilt = np.einsum("tr,rsij,sc->tcij", last, core, first)
    np.testing.assert_allclose(rebuilt, W_TS, atol=1e-5)


def test_weight_subgraph_with_other_consumers_stays() -> None:
    """W (a Transpose of W0) also feeds a ReduceSum output; the shape initializer of a ConstantOfShape
    feeding the weight also feeds a second ConstantOfShape: both stay, the rest of the cone goes."""
    mk = helper.make_node
    shape = _init("shape", np.array([8, 10, 3, 3], dtype=np.int64))
    nodes = [
        mk("ConstantOfShape", ["shape"], ["ones"], name="w_cos", value=_init("v", np.array([1.0], np.float32))),
        mk("Add", ["ones", "W0"], ["Wt"], name="w_add"),
        mk("Transpose", ["Wt"], ["W"], name="w_t", perm=[1, 0, 2, 3]),
        mk("ConstantOfShape", ["shape"], ["other"], name="other_cos", value=_init("v", np.array([2.0], np.float32))),
        mk("ReduceSum", ["other"], ["other_sum"], name="other_sum", keepdims=0),
        mk("Conv", ["x", "W", "B"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        mk("Conv", ["x", "W2"], ["c2"], name="conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        mk("ReduceSum", ["W2"], ["w2_sum"], name="w2_sum", keepdims=0),
    ]
    w0 = np.transpose(W_TS, (1, 0, 2, 3)) - 1.0
    inits = [shape, _init("W0", w0), _init("B", np.zeros(10, np.float32)),
             _init("W2", he_normal(np.random.default_rng(1), (10, 8, 3, 3)))]
    outs = [_vi("c", [1, 10, 7, 7]), _vi("c2", [1, 10, 7, 7]), _vi("other_sum", []), _vi("w2_sum", [])]
    model = _model(nodes, inits, [_vi("x", [1, 8, 7, 7])], outs)
    res = ot.compress(model, _full())
    assert [lp.kind for lp in res.plan.layers] == ["tucker2", "tucker2"]
    kept = {n.name for n in res.model.graph.node}
    assert {"other_cos", "other_sum", "w2_sum"} <= kept  # read elsewhere: untouched
    assert not {"w_cos", "w_add", "w_t"} & kept  # fed only the replaced weight: dropped
    inits_after = _inits(res.model)
    assert "shape" in inits_after and "W2" in inits_after and "W0" not in inits_after
    orig = _inits(model)
    assert inits_after["shape"] == orig["shape"] and inits_after["W2"] == orig["W2"]
    assert_outputs_close(model, res.model, rtol=1e-4)


def test_layer_not_decomposed_keeps_its_weight_subgraph() -> None:
    nodes, inits = _pattern("chain")
    model = _conv_with_weight(nodes, inits)
    res = ot.compress(model, _full(exclude="conv"))
    assert res.plan.layers[0].kind == "skip"
    assert _serialized_nodes(res.model) == _serialized_nodes(model)
    assert _inits(res.model) == _inits(model)


def _skip_case(kind: str) -> tuple[onnx.ModelProto, str]:
    """A Conv whose weight cannot be folded, and the exact reason expected."""
    mk = helper.make_node
    if kind == "graph_input":
        m = _model(
            [mk("Transpose", ["Win"], ["W"], name="w_t", perm=[1, 0, 2, 3]),
             mk("Conv", ["x", "W"], ["y"], name="conv", kernel_shape=[3, 3])],
            [], [_vi("x", [1, 8, 7, 7]), _vi("Win", [8, 10, 3, 3])], [_vi("y", [1, 10, 5, 5])])
        return m, "weight 'W' is computed at run time from graph input 'Win'; only constant weights are decomposed"
    if kind == "dequantize":
        q = np.clip(np.round(W_TS / 0.01), -127, 127).astype(np.int8)
        m = _model(
            [mk("DequantizeLinear", ["Wq", "s", "zp"], ["W"], name="dq"),
             mk("Conv", ["x", "W"], ["y"], name="conv", kernel_shape=[3, 3])],
            [_init("Wq", q), _init("s", np.array(0.01, np.float32)), _init("zp", np.array(0, np.int8))],
            [_vi("x", [1, 8, 7, 7])], [_vi("y", [1, 10, 5, 5])])
        return m, "weight 'W' is dequantized at run time by DequantizeLinear 'dq' (quantized weights are left alone)"
    if kind == "random":
        m = _model(
            [mk("RandomNormal", [], ["W"], name="rnd", shape=[10, 8, 3, 3]),
             mk("Conv", ["x", "W"], ["y"], name="conv", kernel_shape=[3, 3])],
            [], [_vi("x", [1, 8, 7, 7])], [_vi("y", [1, 10, 5, 5])])
        return m, "weight 'W' is computed by the non-deterministic op RandomNormal 'rnd'"
    if kind == "custom":
        m = _model(
            [mk("MakeWeight", ["W0"], ["W"], name="mk_w", domain="com.example"),
             mk("Conv", ["x", "W"], ["y"], name="conv", kernel_shape=[3, 3])],
            [_init("W0", W_TS)], [_vi("x", [1, 8, 7, 7])], [_vi("y", [1, 10, 5, 5])], extra_domains=[("com.example", 1)])
        return m, "weight 'W' is computed by custom-domain op com.example.MakeWeight 'mk_w'"
    if kind in ("sparse_initializer", "sparse_constant"):
        flat = np.where(np.abs(W_TS) > 0.3, W_TS, 0).ravel()
        idx = np.flatnonzero(flat)
        sparse = helper.make_sparse_tensor(_init("W", flat[idx]), _init("W_idx", idx.astype(np.int64)), list(W_TS.shape))
        conv = mk("Conv", ["x", "W"], ["y"], name="conv", kernel_shape=[3, 3])
        if kind == "sparse_constant":
            m = _model([mk("Constant", [], ["W"], name="w_sparse", sparse_value=sparse), conv],
                       [], [_vi("x", [1, 8, 7, 7])], [_vi("y", [1, 10, 5, 5])])
            return m, "weight 'W' is a sparse tensor (Constant 'w_sparse'; sparse weights are left alone)"
        m = _model([conv], [], [_vi("x", [1, 8, 7, 7])], [_vi("y", [1, 10, 5, 5])], check=False)
        m.graph.sparse_initializer.append(sparse)
        onnx.checker.check_model(m)
        return m, "weight 'W' is a sparse initializer (sparse weights are left alone)"
    if kind == "if":
        branch = helper.make_graph([mk("Identity", ["W0"], ["Wb"])], "b", [], [_vi("Wb", [10, 8, 3, 3])])
        m = _model(
            [mk("If", ["flag"], ["W"], name="pick", then_branch=branch, else_branch=branch),
             mk("Conv", ["x", "W"], ["y"], name="conv", kernel_shape=[3, 3])],
            [_init("W0", W_TS), _init("flag", np.array(True))], [_vi("x", [1, 8, 7, 7])], [_vi("y", [1, 10, 5, 5])])
        return m, "weight 'W' is computed inside the control-flow op If 'pick'"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["graph_input", "dequantize", "random", "custom", "if", "sparse_initializer", "sparse_constant"]
)
def test_weight_that_cannot_be_folded_is_skipped_with_its_reason(kind: str) -> None:
    model, reason = _skip_case(kind)
    res = ot.compress(model, _full())
    assert _reason(res, "conv") == reason
    assert _serialized_nodes(res.model) == _serialized_nodes(model)
    assert _inits(res.model) == _inits(model)


def test_run_time_weight_behind_thousands_of_nodes() -> None:
    """Activation x activation MatMul far from the input: the origin walk is iterative (no RecursionError)."""
    mk = helper.make_node
    chain = [mk("Relu", ["x" if i == 0 else f"r{i - 1}"], [f"r{i}"], name=f"relu{i}") for i in range(3000)]
    model = _model([*chain, mk("MatMul", ["x", "r2999"], ["y"], name="mm")], [], [_vi("x", [4, 4])], [_vi("y", [4, 4])])
    res = ot.compress(model, _full())
    assert _reason(res, "mm") == "weight 'r2999' is computed at run time from graph input 'x'; only constant weights are decomposed"


def test_weight_subgraph_that_fails_to_evaluate_is_skipped() -> None:
    mk = helper.make_node
    model = _model(
        [mk("Reshape", ["W0", "shape"], ["W"], name="bad_reshape"),
         mk("Conv", ["x", "W"], ["y"], name="conv", kernel_shape=[3, 3])],
        [_init("W0", np.ones((5, 7), np.float32)), _init("shape", np.array([8, 6, 3, 3], np.int64))],
        [_vi("x", [1, 8, 7, 7])], [_vi("y", [1, 10, 5, 5])])
    res = ot.compress(model, _full())
    reason = _reason(res, "conv")
    assert reason is not None
    assert reason.startswith("could not evaluate the constant subgraph computing 'W' (")
    assert reason.endswith("); layer left as is")
    assert _serialized_nodes(res.model) == _serialized_nodes(model)


def test_conv_bias_from_folded_subgraph_is_kept_as_is() -> None:
    """A ConstantOfShape bias is constant (layer decomposed), read by the chain's last node."""
    mk = helper.make_node
    model = _model(
        [mk("ConstantOfShape", ["bshape"], ["B"], name="b_cos", value=_init("v", np.array([0.3], np.float32))),
         mk("Conv", ["x", "W", "B"], ["y"], name="conv", kernel_shape=[3, 3])],
        [_init("W", W_TS), _init("bshape", np.array([10], np.int64))], [_vi("x", [1, 8, 7, 7])], [_vi("y", [1, 10, 5, 5])])
    res = ot.compress(model, _full())
    assert res.plan.layers[0].kind == "tucker2"
    assert res.model.graph.node[0].SerializeToString() == model.graph.node[0].SerializeToString()
    assert res.model.graph.node[-1].input[2] == "B"
    assert_outputs_close(model, res.model)


def test_params_count_folded_weights() -> None:
    """A ConstantOfShape kernel counts at its materialised size (10*8*3*3 + bias 10), not as 0."""
    nodes, inits = _pattern("constant_of_shape")
    res = ot.compress(_conv_with_weight(nodes, inits), _full())
    assert res.totals.params_before == 10 * 8 * 9 + 10


# ---- 2. shared weights ------------------------------------------------------------------------------

def _count_decompositions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    import onnx_tucker.planning.stage as stage

    calls: list[str] = []
    real = stage.decompose_layer

    def spy(layer, *a, **k):  # type: ignore[no-untyped-def]
        calls.append(layer.layer_id)
        return real(layer, *a, **k)

    monkeypatch.setattr(stage, "decompose_layer", spy)
    return calls


def test_shared_folded_conv_weight_decomposed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    mk = helper.make_node
    nodes, inits = _pattern("chain")
    nodes += [
        mk("Conv", ["x", "W"], ["a"], name="conv_a", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        mk("Conv", ["x", "W"], ["b"], name="conv_b", kernel_shape=[3, 3], strides=[2, 2]),
    ]
    model = _model(nodes, inits, [_vi("x", [1, 8, 7, 7])], [_vi("a", [1, 10, 7, 7]), _vi("b", [1, 10, 3, 3])])
    calls = _count_decompositions(monkeypatch)
    res = ot.compress(model, _full())
    assert [lp.kind for lp in res.plan.layers] == ["tucker2", "tucker2"]
    assert calls == ["conv_a"]
    assert sorted(t.name for t in res.model.graph.initializer) == [
        "conv_a/tucker_core/W", "conv_a/tucker_first/W", "conv_a/tucker_last/W"]
    assert op_counts(res.model) == {"Conv": 6}
    assert_outputs_close(model, res.model)


def test_shared_fc_weight_matmul_and_gemm_share_factors(monkeypatch: pytest.MonkeyPatch) -> None:
    mk = helper.make_node
    w = he_normal(np.random.default_rng(2), (12, 10))
    model = _model(
        [mk("MatMul", ["x", "W"], ["a"], name="mm"), mk("Gemm", ["x", "W"], ["b"], name="gemm")],
        [_init("W", w)], [_vi("x", [4, 12])], [_vi("a", [4, 10]), _vi("b", [4, 10])])
    calls = _count_decompositions(monkeypatch)
    res = ot.compress(model, _full())
    assert [lp.kind for lp in res.plan.layers] == ["svd", "svd"]
    assert calls == ["mm"]
    assert sorted(t.name for t in res.model.graph.initializer) == ["mm/svd_first/W", "mm/svd_last/W"]
    assert_outputs_close(model, res.model)


@pytest.mark.parametrize(
    "attrs_b, why",
    [({"transB": 1}, "as Gemm transB=1 alpha=1"), ({"alpha": 0.5}, "as Gemm transB=0 alpha=0.5")],
)
def test_shared_square_fc_weight_used_two_ways_is_kept(attrs_b: dict[str, object], why: str) -> None:
    """A square W used as W and as W^T (or scaled): same factor shapes, different matrices. Sharing
    factors would be wrong, separate factors would duplicate it: both layers are kept, with a reason."""
    mk = helper.make_node
    w = he_normal(np.random.default_rng(4), (10, 10))
    model = _model(
        [mk("Gemm", ["x", "W"], ["a"], name="g1"), mk("Gemm", ["x", "W"], ["b"], name="g2", **attrs_b)],
        [_init("W", w)], [_vi("x", [4, 10])], [_vi("a", [4, 10]), _vi("b", [4, 10])])
    res = ot.compress(model, _full())
    for name in ("g1", "g2"):
        reason = _reason(res, name)
        assert reason is not None and reason.startswith("weight 'W' is shared by 2 layers that cannot share one factorisation")
        assert why in reason
    assert _serialized_nodes(res.model) == _serialized_nodes(model)
    assert_outputs_close(model, res.model, rtol=1e-6)


def test_shared_conv_weight_with_different_groups_is_kept() -> None:
    """One 8x4x3x3 W read by a plain conv on 4 channels and a group=2 conv on 8 channels: the grouped
    factors are block-diagonal, the plain ones are not; no sharing, no duplication."""
    mk = helper.make_node
    w = he_normal(np.random.default_rng(12), (8, 4, 3, 3))
    model = _model(
        [mk("Conv", ["x1", "W"], ["a"], name="plain", kernel_shape=[3, 3]),
         mk("Conv", ["x2", "W"], ["b"], name="grouped", kernel_shape=[3, 3], group=2)],
        [_init("W", w)], [_vi("x1", [1, 4, 7, 7]), _vi("x2", [1, 8, 7, 7])],
        [_vi("a", [1, 8, 5, 5]), _vi("b", [1, 8, 5, 5])])
    res = ot.compress(model, _full(min_tucker2_channels=1))
    for name in ("plain", "grouped"):
        reason = _reason(res, name)
        assert reason is not None and reason.startswith("weight 'W' is shared by 2 layers that cannot share one factorisation")
    assert " group=2" in (_reason(res, "grouped") or "")
    assert _serialized_nodes(res.model) == _serialized_nodes(model)


def test_shared_weight_partly_excluded_is_kept_not_duplicated() -> None:
    mk = helper.make_node
    model = _model(
        [mk("Conv", ["x", "W"], ["a"], name="conv_a", kernel_shape=[3, 3]),
         mk("Conv", ["x", "W"], ["b"], name="conv_b", kernel_shape=[3, 3])],
        [_init("W", W_TS)], [_vi("x", [1, 8, 7, 7])], [_vi("a", [1, 10, 5, 5]), _vi("b", [1, 10, 5, 5])])
    res = ot.compress(model, _full(exclude="conv_b"))
    assert res.plan.decomposed == ()
    assert _reason(res, "conv_a") == (
        "weight 'W' is shared by 2 layers that cannot share one factorisation ('conv_a' tucker2 (10, 8), "
        "'conv_b' kept (name matches --exclude 'conv_b')); decomposing only some would add factors next to "
        "the kept weight: kept as is"
    )
    assert _inits(res.model) == _inits(model)


# ---- 3. Gemm attributes, batched MatMul + Add ---------------------------------------------------------

@pytest.mark.parametrize("opset", [9, 17])
@pytest.mark.parametrize("trans_a,trans_b", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_gemm_alpha_beta_trans_full_rank(trans_a: int, trans_b: int, opset: int) -> None:
    model = make_gemm_model(K=12, N=10, trans_a=trans_a, trans_b=trans_b, alpha=0.7, beta=-1.5, rows=5, opset=opset)
    res = ot.compress(model, _full())
    assert res.plan.layers[0].kind == "svd"
    assert op_counts(res.model) == {"Gemm": 2}
    assert_outputs_close(model, res.model, rtol=1e-5)


def test_batched_matmul_with_following_add_bias() -> None:
    mk = helper.make_node
    rng = np.random.default_rng(5)
    model = _model(
        [mk("MatMul", ["x", "W"], ["h"], name="proj"), mk("Add", ["h", "bias"], ["y"], name="bias_add")],
        [_init("W", he_normal(rng, (24, 16)).T.copy()), _init("bias", rng.standard_normal(24).astype(np.float32))],
        [_vi("x", ["B", 7, 16])], [_vi("y", ["B", 7, 24])])
    res = ot.compress(model, _full())
    assert res.plan.layers[0].kind == "svd"
    add = res.model.graph.node[-1]
    assert add.SerializeToString() == model.graph.node[-1].SerializeToString()
    assert res.model.graph.node[-2].output[0] == "h"  # the chain still writes what Add reads
    for batch in (1, 3):
        assert_outputs_close(model, res.model, rtol=1e-5, batch=batch)


# ---- 4. float16 / bfloat16 ----------------------------------------------------------------------------

def _fp16_cnn() -> onnx.ModelProto:
    mk = helper.make_node
    rng = np.random.default_rng(6)
    inits = [
        _init("W1", he_normal(rng, (16, 8, 3, 3)).astype(np.float16)),
        _init("B1", (0.1 * rng.standard_normal(16)).astype(np.float16)),
        _init("Wfc", he_normal(rng, (10, 16)).astype(np.float16)),
    ]
    nodes = [
        mk("Conv", ["x", "W1", "B1"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        mk("Relu", ["c"], ["r"], name="relu"),
        mk("GlobalAveragePool", ["r"], ["g"], name="gap"),
        mk("Flatten", ["g"], ["f"], name="flat"),
        mk("Gemm", ["f", "Wfc"], ["y"], name="fc", transB=1),
    ]
    return _model(nodes, inits, [_vi("x", [2, 8, 6, 6], TensorProto.FLOAT16)], [_vi("y", [2, 10], TensorProto.FLOAT16)])


def test_float16_decomposed_in_float64_written_in_float16() -> None:
    model = _fp16_cnn()
    res = ot.compress(model, _full(validate=True, rtol=5e-3, samples=2))
    assert [lp.kind for lp in res.plan.layers] == ["tucker2", "svd"]
    # Kernel errors are float64 round-off, far below float16's 1e-3 resolution: decomposed in float64.
    assert all(lp.rel_error is not None and lp.rel_error < 1e-12 for lp in res.plan.layers)
    new = [t for t in res.model.graph.initializer if "/" in t.name]
    assert len(new) == 5 and all(t.data_type == TensorProto.FLOAT16 for t in new)
    assert res.validation is not None and res.validation.passed
    # fp16 storage of the factors: a few float16 ulps of the output.
    x = np.random.default_rng(0).standard_normal((2, 8, 6, 6)).astype(np.float16)
    a, b = run_ort(model, {"x": x})["y"], run_ort(res.model, {"x": x})["y"]
    assert a.dtype == b.dtype == np.float16
    err = np.max(np.abs(a.astype(np.float64) - b))
    assert 0 < err <= 5e-3 * np.max(np.abs(a))


def test_bfloat16_fc_written_in_bfloat16() -> None:
    """bfloat16 Gemm / MatMul (Conv has no bfloat16 in ONNX). onnxruntime's CPU provider has no
    bfloat16 Gemm / MatMul kernels, so outputs are checked with onnx's reference evaluator."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from onnx.reference import ReferenceEvaluator

    bf16 = ml_dtypes.bfloat16
    rng = np.random.default_rng(7)
    mk = helper.make_node
    model = _model(
        [mk("Gemm", ["x", "W"], ["h"], name="fc", transB=1), mk("MatMul", ["h", "W2"], ["y"], name="mm")],
        [_init("W", he_normal(rng, (16, 12)).astype(bf16)), _init("W2", he_normal(rng, (8, 16)).T.astype(bf16))],
        [_vi("x", [3, 12], TensorProto.BFLOAT16)], [_vi("y", [3, 8], TensorProto.BFLOAT16)])
    res = ot.compress(model, _full())
    assert [lp.kind for lp in res.plan.layers] == ["svd", "svd"]
    assert all(t.data_type == TensorProto.BFLOAT16 for t in res.model.graph.initializer)
    x = rng.standard_normal((3, 12)).astype(bf16)
    a = ReferenceEvaluator(model).run(None, {"x": x})[0].astype(np.float64)
    b = ReferenceEvaluator(res.model).run(None, {"x": x})[0].astype(np.float64)
    # bfloat16 has 8 significant bits: factors rounded to it, twice per layer.
    assert np.max(np.abs(a - b)) <= 5e-2 * np.max(np.abs(a))
    with pytest.raises(ValidationError, match="does not load in onnxruntime"):
        ot.compress(model, _full(validate=True))


# ---- 5. old IR / opsets, value_info, subgraphs, custom domains, dynamic batch --------------------------

def _conv_gemm_model(opset: int, ir_version: int, batch: int | str = 1) -> onnx.ModelProto:
    mk = helper.make_node
    rng = np.random.default_rng(8)
    inits = [
        _init("W1", he_normal(rng, (8, 8, 3, 3))), _init("B1", (0.1 * rng.standard_normal(8)).astype(np.float32)),
        _init("Wfc", he_normal(rng, (6, 8 * 4 * 4))), _init("Bfc", (0.1 * rng.standard_normal(6)).astype(np.float32)),
    ]
    nodes = [
        mk("Conv", ["x", "W1", "B1"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
        mk("Relu", ["c"], ["r"], name="relu"),
        mk("Flatten", ["r"], ["f"], name="flat", axis=1),
        mk("Gemm", ["f", "Wfc", "Bfc"], ["y"], name="fc", transB=1),
    ]
    return _model(nodes, inits, [_vi("x", [batch, 8, 8, 8])], [_vi("y", [batch, 6])], opset=opset, ir_version=ir_version)


@pytest.mark.parametrize("opset", list(range(7, MAX_OPSET + 1)))
def test_every_opset_keeps_ir_and_reproduces_outputs(opset: int) -> None:
    ir = helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
    model = _conv_gemm_model(opset, ir)
    res = ot.compress(model, _full())
    assert [lp.kind for lp in res.plan.layers] == ["tucker2", "svd"]
    assert res.model.ir_version == ir
    assert list(res.model.opset_import) == list(model.opset_import)
    onnx.checker.check_model(res.model)
    assert_outputs_close(model, res.model, rtol=1e-4)


@pytest.mark.parametrize("opset", [7, 8, 9])
def test_ir3_initializers_listed_as_inputs(opset: int) -> None:
    model = _conv_gemm_model(opset, ir_version=3)
    res = ot.compress(model, _full(validate=True, samples=2))
    assert res.model.ir_version == 3
    inputs = {i.name for i in res.model.graph.input}
    inits = {t.name for t in res.model.graph.initializer}
    assert inits <= inputs  # IR 3: every initializer is a graph input too
    assert "W1" not in inputs and "Wfc" not in inputs  # replaced weights gone from both lists
    assert inputs - inits == {"x"}
    assert res.validation is not None and res.validation.passed
    assert_outputs_close(model, res.model)


def test_value_info_kept_and_dropped_only_for_removed_tensors() -> None:
    nodes, inits = _pattern("transpose")
    model = _conv_with_weight(nodes, inits)
    model.graph.value_info.extend([_vi("W", [10, 8, 3, 3]), _vi("c", [1, 10, 7, 7])])
    onnx.checker.check_model(model)
    res = ot.compress(model, _full(validate=True, samples=2))
    assert [v.SerializeToString() for v in res.model.graph.value_info] == [model.graph.value_info[1].SerializeToString()]
    assert res.validation is not None and res.validation.passed


def _if_and_loop_model() -> onnx.ModelProto:
    """A top-level conv, an If whose branches run a Conv reading the outer W, and a Loop with a Conv."""
    mk = helper.make_node
    body_conv = mk("Conv", ["c", "W"], ["t"], name="then_conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    then_b = helper.make_graph([body_conv], "then", [], [_vi("t", [1, 8, 7, 7])])
    else_b = helper.make_graph([mk("Identity", ["c"], ["e"], name="else_id")], "else", [], [_vi("e", [1, 8, 7, 7])])
    loop_body = helper.make_graph(
        [mk("Identity", ["cond_in"], ["cond_out"], name="cond_id"),
         mk("Conv", ["acc_in", "Wl"], ["acc_out"], name="loop_conv", kernel_shape=[1, 1])],
        "loop", [_vi("i", [], TensorProto.INT64), _vi("cond_in", None, TensorProto.BOOL), _vi("acc_in", [1, 8, 7, 7])],
        [_vi("cond_out", None, TensorProto.BOOL), _vi("acc_out", [1, 8, 7, 7])])
    rng = np.random.default_rng(10)
    inits = [_init("W", he_normal(rng, (8, 8, 3, 3))), _init("W0", he_normal(rng, (8, 8, 3, 3))),
             _init("Wl", he_normal(rng, (8, 8, 1, 1))), _init("n", np.array(2, np.int64)),
             _init("flag", np.array(True)), _init("t0", np.array(True))]
    nodes = [
        mk("Conv", ["x", "W0"], ["c0"], name="top_conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        mk("Conv", ["c0", "W"], ["c"], name="top_conv_w", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        mk("If", ["flag"], ["z"], name="branch", then_branch=then_b, else_branch=else_b),
        mk("Loop", ["n", "t0", "z"], ["y"], name="loop", body=loop_body),
    ]
    return _model(nodes, inits, [_vi("x", [1, 8, 7, 7])], [_vi("y", [1, 8, 7, 7])], opset=17)


def test_subgraph_layers_left_alone_and_reported() -> None:
    model = _if_and_loop_model()
    res = ot.compress(model, _full())
    by_name = {lp.name: lp for lp in res.plan.layers}
    assert by_name["then_conv"].reason == "inside a subgraph of 'branch' (If/Loop/Scan bodies are left alone)"
    assert by_name["loop_conv"].reason == "inside a subgraph of 'loop' (If/Loop/Scan bodies are left alone)"
    assert by_name["top_conv"].kind == "tucker2" and by_name["top_conv_w"].kind == "tucker2"
    after = {n.name: n.SerializeToString() for n in res.model.graph.node}
    before = {n.name: n.SerializeToString() for n in model.graph.node}
    assert after["branch"] == before["branch"] and after["loop"] == before["loop"]
    # W is replaced at the top level but still read inside the If: it must stay; W0 goes.
    names = {t.name for t in res.model.graph.initializer}
    assert "W" in names and "Wl" in names and "W0" not in names
    assert_outputs_close(model, res.model, rtol=1e-4)


def test_custom_domain_nodes_are_kept_and_validation_can_be_skipped() -> None:
    mk = helper.make_node
    rng = np.random.default_rng(11)
    model = _model(
        [mk("Conv", ["x", "W1"], ["a"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
         mk("FancyAct", ["a"], ["b"], name="fancy", domain="com.example", alpha=0.5),
         mk("Conv", ["b", "W2"], ["y"], name="conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
        [_init("W1", he_normal(rng, (8, 8, 3, 3))), _init("W2", he_normal(rng, (8, 8, 3, 3)))],
        [_vi("x", [1, 8, 7, 7])], [_vi("y", [1, 8, 7, 7])], extra_domains=[("com.example", 1)])
    with pytest.raises(ValidationError, match="use --no-validate"):
        ot.compress(model, _full(validate=True))
    res = ot.compress(model, _full(validate=False))
    assert [lp.kind for lp in res.plan.layers] == ["tucker2", "tucker2"]
    fancy = [n for n in res.model.graph.node if n.domain == "com.example"]
    assert [n.SerializeToString() for n in fancy] == [model.graph.node[1].SerializeToString()]
    assert list(res.model.opset_import) == list(model.opset_import)


def test_dynamic_batch_stays_dynamic() -> None:
    model = _conv_gemm_model(17, 8, batch="N")
    res = ot.compress(model, _full(validate=True, samples=2))
    dim = res.model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param == "N"
    for batch in (1, 4):
        assert_outputs_close(model, res.model, rtol=1e-4, batch=batch)


# ---- 7. external data -----------------------------------------------------------------------------------

def test_external_data_in_and_out(tmp_path: Path) -> None:
    model = _conv_gemm_model(17, 8)
    src = tmp_path / "in" / "model.onnx"
    src.parent.mkdir()
    onnx.save(onnx.ModelProto.FromString(model.SerializeToString()), str(src), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.weights", size_threshold=0)
    assert (src.parent / "model.weights").is_file()
    out = tmp_path / "out" / "small.onnx"
    out.parent.mkdir()
    res = ot.compress(src, _full(validate=True, samples=2), output=out)
    assert res.output_path == str(out)
    # Written self-contained (small model): no reference to the input's data file.
    written = onnx.load(str(out), load_external_data=False)
    assert not any(t.data_location == TensorProto.EXTERNAL for t in written.graph.initializer)

    ext = tmp_path / "out" / "ext.onnx"
    save_model(res.model, ext, external_data=True)
    data = tmp_path / "out" / "ext.onnx.data"
    assert data.is_file() and data.stat().st_size > 0
    stub = onnx.load(str(ext), load_external_data=False)
    locations = {e.value for t in stub.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"ext.onnx.data"}
    back = load_model(ext)
    feeds = random_feeds(model)
    np.testing.assert_allclose(run_ort(back, feeds)["y"], run_ort(res.model, feeds)["y"], rtol=0, atol=0)
    assert_outputs_close(model, back)
    assert not list(tmp_path.glob("out/.*.tmp"))  # no temp files left behind


def test_conv_helper_model_at_opset_7_ir3() -> None:
    """The shared helper's Conv with IR 3 / opset 7 (initializers as inputs) compresses too."""
    model = make_conv_model(pads=(1, 1, 1, 1), opset=7, ir_version=3)
    res = ot.compress(model, _full(validate=True, samples=1))
    assert res.validation is not None and res.validation.passed


def test_einsum_is_reported_with_reason() -> None:
    """Layer-like ops that are never decomposed appear in the report with the reason (ConvTranspose,
    once listed here, is decomposed now: tests/test_conv_transpose.py)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    import onnx_tucker as ot

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "W")
    node = helper.make_node("Einsum", ["x", "W"], ["y"], name="mix", equation="bi,ij->bj")
    g = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [w],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    plan = ot.plan(m, ot.CompressionConfig())
    (layer,) = plan.layers
    assert layer.name == "mix" and layer.kind == "skip"
    assert "Einsum is not decomposed (only Conv, ConvTranspose, Gemm and MatMul are)" in (layer.reason or "")


@pytest.mark.parametrize("kind", ["sparse_initializer", "sparse_constant", "training_info"])
def test_what_onnx_ir_drops_is_carried_over_when_another_layer_is_rewritten(kind: str) -> None:
    """onnx-ir (the rewrite's graph layer) loses sparse initializers, cannot load sparse Constant
    attributes and drops training_info: the rewrite carries them over from the input unchanged."""
    mk = helper.make_node
    rng = np.random.default_rng(5)
    W = he_normal(rng, (10, 8, 3, 3))
    s_vals = rng.standard_normal(40).astype(np.float32)
    s_idx = np.sort(rng.choice(10 * 7 * 7, 40, replace=False)).astype(np.int64)
    sparse = helper.make_sparse_tensor(_init("S", s_vals), _init("S_idx", s_idx), [1, 10, 7, 7])
    nodes = [mk("Conv", ["x", "W"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             mk("Add", ["c", "S"], ["y"], name="add")]
    if kind == "sparse_constant":
        nodes.insert(0, mk("Constant", [], ["S"], name="s_const", sparse_value=sparse))
    model = _model(nodes, [_init("W", W)], [_vi("x", [1, 8, 7, 7])], [_vi("y", [1, 10, 7, 7])], check=False)
    if kind == "sparse_initializer":
        model.graph.sparse_initializer.append(sparse)
    if kind == "training_info":
        model.graph.node[1].input[1] = "c"
        model.graph.initializer.append(_init("steps", np.array(0, np.int64)))
        one = _init("one", np.array(1, np.int64))
        step = helper.make_graph([mk("Add", ["steps", "one"], ["steps_next"], name="count")], "train", [],
                                 [_vi("steps_next", [], TensorProto.INT64)], initializer=[one])
        info = model.training_info.add()
        info.algorithm.CopyFrom(step)
        binding = info.update_binding.add()
        binding.key, binding.value = "steps", "steps_next"
    onnx.checker.check_model(model)
    res = ot.compress(model, _full())
    assert res.plan.layers[0].kind == "tucker2"
    out = res.model
    onnx.checker.check_model(out)
    assert out.graph.sparse_initializer == model.graph.sparse_initializer
    assert list(out.training_info) == list(model.training_info)
    if kind == "sparse_constant":
        assert out.graph.node[0].SerializeToString() == model.graph.node[0].SerializeToString()
    assert out.graph.node[-1].SerializeToString() == model.graph.node[-1].SerializeToString()
    assert_outputs_close(model, out)
