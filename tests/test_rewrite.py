"""Graph rewrite: full-rank decompositions reproduce the original in onnxruntime, graph hygiene.

Every test compresses with `--ranks full` (no truncation, every candidate decomposed), so the
compressed model must compute the same function as the original up to float32 rounding.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_tucker as ot
from onnx_tucker import CompressionConfig, RankPolicy
from tests.helpers import (
    assert_outputs_close,
    consumers_of,
    make_conv_model,
    make_gemm_model,
    make_matmul_model,
    make_residual_model,
    make_small_cnn,
    node_attrs,
    op_counts,
    producer_of,
    random_feeds,
    run_ort,
)

FULL = CompressionConfig(ranks=RankPolicy("full"), validate=False)
SPATIAL = ("strides", "pads", "dilations", "auto_pad")


def compress_full(model: onnx.ModelProto, **overrides: object) -> ot.CompressionResult:
    cfg = FULL if not overrides else CompressionConfig(ranks=RankPolicy("full"), validate=False, **overrides)  # type: ignore[arg-type]
    return ot.compress(model, cfg)


# id -> (make_conv_model kwargs, expected kind)
CONV_CASES = {
    "3x3": (dict(), "tucker2"),
    "3x3-pads": (dict(pads=(1, 1, 1, 1)), "tucker2"),
    "3x3-stride2": (dict(strides=(2, 2), pads=(1, 1, 1, 1)), "tucker2"),
    "3x3-asym-pads": (dict(pads=(0, 1, 2, 1)), "tucker2"),
    "3x3-stride21-asym-pads": (dict(strides=(2, 1), pads=(0, 1, 2, 1)), "tucker2"),
    "3x3-dilation2": (dict(dilations=(2, 2), pads=(2, 2, 2, 2)), "tucker2"),
    "3x3-dilation21-stride2": (dict(dilations=(2, 1), strides=(2, 2), pads=(1, 0, 2, 1)), "tucker2"),
    "3x3-nobias": (dict(bias=False), "tucker2"),
    "3x3-batch3": (dict(batch=3, pads=(1, 1, 1, 1)), "tucker2"),
    "3x3-wide": (dict(T=6, S=20, pads=(1, 1, 1, 1)), "tucker2"),
    "3x3-tall": (dict(T=24, S=8, strides=(2, 2)), "tucker2"),
    "5x5": (dict(kernel=(5, 5), pads=(2, 2, 2, 2)), "tucker2"),
    "5x5-stride2-nobias": (dict(kernel=(5, 5), strides=(2, 2), bias=False, spatial=(11, 11)), "tucker2"),
    "1x3-S>T*k": (dict(kernel=(1, 3), pads=(0, 1, 0, 1), T=4, S=16), "tucker2"),
    "auto-pad-same-upper": (dict(auto_pad="SAME_UPPER", strides=(2, 2)), "tucker2"),
    "auto-pad-same-lower": (dict(auto_pad="SAME_LOWER", kernel=(4, 4)), "tucker2"),  # ORT: no dilation with SAME
    "auto-pad-valid": (dict(auto_pad="VALID", strides=(2, 2)), "tucker2"),
    "1x1": (dict(kernel=(1, 1)), "svd"),
    "1x1-stride2": (dict(kernel=(1, 1), strides=(2, 2), T=8, S=16), "svd"),
    "1x1-stride2-pads-nobias": (dict(kernel=(1, 1), strides=(2, 2), pads=(1, 0, 1, 0), bias=False), "svd"),
    "1x1-S>T": (dict(kernel=(1, 1), T=4, S=16), "svd"),
    "1x1-T>S": (dict(kernel=(1, 1), T=16, S=4), "svd"),
    "rgb-tucker1": (dict(T=16, S=3, pads=(1, 1, 1, 1)), "tucker1"),
    "rgb-tucker1-stride2-nobias": (dict(T=16, S=3, strides=(2, 2), bias=False), "tucker1"),
    "1d": (dict(kernel=(3,), spatial=(11,), pads=(1, 1)), "tucker2"),
    "1d-stride2-dilation2": (dict(kernel=(3,), spatial=(15,), strides=(2,), dilations=(2,), pads=(2, 1)), "tucker2"),
    "1d-1x1": (dict(kernel=(1,), spatial=(7,), strides=(2,)), "svd"),
    "3d": (dict(kernel=(3, 3, 3), spatial=(5, 6, 7), pads=(1, 1, 1, 1, 1, 1)), "tucker2"),
    "3d-stride-nobias": (dict(kernel=(3, 3, 3), spatial=(5, 6, 7), strides=(1, 2, 1), bias=False), "tucker2"),
    "3d-1x1x1": (dict(kernel=(1, 1, 1), spatial=(3, 4, 5)), "svd"),
}
EXPECTED_CONVS = {"tucker2": 3, "tucker1": 2, "svd": 2}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_full_rank_conv_equals_original(case: str) -> None:
    kwargs, kind = CONV_CASES[case]
    model = make_conv_model(**kwargs)  # type: ignore[arg-type]
    orig = model.graph.node[0]
    res = compress_full(model)
    new = res.model

    (lp,) = res.plan.layers
    assert lp.kind == kind, lp
    assert op_counts(new) == {"Conv": EXPECTED_CONVS[kind]}
    onnx.checker.check_model(new, full_check=True)
    assert_outputs_close(model, new, rtol=1e-4, batch=kwargs.get("batch", 1))  # type: ignore[arg-type]

    # Attributes: exactly one node of the chain (the spatial step) carries the original
    # strides/pads/dilations/auto_pad and the kernel; every other node is a plain 1x1.
    nd = len(kwargs.get("kernel", (3, 3)))  # type: ignore[arg-type]
    spatial_step = {"tucker2": 1, "tucker1": 0, "svd": 0}[kind]
    orig_attrs = node_attrs(orig)
    for j, node in enumerate(new.graph.node):
        attrs = node_attrs(node)
        assert "group" not in attrs or attrs["group"] == 1
        if j == spatial_step:
            assert attrs["kernel_shape"] == list(orig_attrs["kernel_shape"])  # type: ignore[call-overload]
            for a in SPATIAL:
                assert attrs.get(a) == orig_attrs.get(a), (a, attrs, orig_attrs)
        else:
            assert attrs == {"kernel_shape": [1] * nd}, (node.name, attrs)

    # Wiring: input -> chain -> the original output tensor; bias only on the last node.
    chain = list(new.graph.node)
    assert chain[0].input[0] == "x" and chain[-1].output[0] == "y"
    for a, b in zip(chain, chain[1:], strict=False):
        assert b.input[0] == a.output[0]
    has_bias = kwargs.get("bias", True)
    assert [len(n.input) for n in chain] == [2] * (len(chain) - 1) + [3 if has_bias else 2]
    if has_bias:
        assert chain[-1].input[2] == "B"

    # The replaced weight is gone; the new weights keep the model's dtype.
    inits = {t.name: t for t in new.graph.initializer}
    assert "W" not in inits
    assert all(t.data_type == TensorProto.FLOAT for t in inits.values())


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 1.0), (0.5, 2.0)])
def test_full_rank_gemm_equals_original(trans_b: int, bias: bool, alpha: float, beta: float) -> None:
    model = make_gemm_model(K=12, N=10, trans_b=trans_b, bias=bias, alpha=alpha, beta=beta)
    res = compress_full(model)
    assert res.plan.layers[0].kind == "svd"
    assert op_counts(res.model) == {"Gemm": 2}
    onnx.checker.check_model(res.model, full_check=True)
    assert_outputs_close(model, res.model)
    first, last = res.model.graph.node
    assert first.input[0] == "x" and last.output[0] == "y" and last.input[0] == first.output[0]
    if bias:
        assert last.input[2] == "C"


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(K=40, N=6, trans_b=1),  # tall weight
        dict(K=6, N=40, trans_b=0),  # wide weight
        dict(trans_a=1, trans_b=1, alpha=0.5, beta=2.0),
        dict(trans_a=1, trans_b=0, bias=False, alpha=3.0),
        dict(opset=9, ir_version=4, trans_b=1),  # Gemm-9: C is required
        dict(opset=9, ir_version=4, trans_b=0, alpha=0.5, beta=2.0),
        dict(opset=7, ir_version=3, trans_b=1),  # IR 3: initializers are graph inputs
    ],
    ids=["tall", "wide", "transA-transB", "transA-nobias-alpha", "opset9-transB", "opset9-alpha-beta", "opset7-ir3"],
)
def test_full_rank_gemm_variants(kwargs: dict[str, object]) -> None:
    model = make_gemm_model(**kwargs)  # type: ignore[arg-type]
    res = compress_full(model)
    assert op_counts(res.model) == {"Gemm": 2}
    onnx.checker.check_model(res.model, full_check=True)
    assert res.model.ir_version == model.ir_version
    assert res.model.opset_import == model.opset_import
    assert_outputs_close(model, res.model)


@pytest.mark.parametrize(("K", "N", "lead"), [(12, 10, (2, 3)), (30, 5, (4,)), (5, 30, (1, 2, 3)), (7, 20, ())])
def test_full_rank_matmul_equals_original(K: int, N: int, lead: tuple[int, ...]) -> None:
    model = make_matmul_model(K=K, N=N, lead=lead)
    res = compress_full(model)
    assert res.plan.layers[0].kind == "svd" and res.plan.layers[0].ranks == (min(K, N),)
    assert op_counts(res.model) == {"MatMul": 2}
    onnx.checker.check_model(res.model, full_check=True)
    assert_outputs_close(model, res.model)


def test_residual_block_stays_intact() -> None:
    """y = Relu(Conv(x)) + x, z = Sigmoid(Conv(x)): both consumers of the conv output stay attached."""
    model = make_residual_model(C=8)
    res = compress_full(model)
    new = res.model
    onnx.checker.check_model(new, full_check=True)
    assert op_counts(new) == {"Conv": 3, "Relu": 1, "Add": 1, "Sigmoid": 1}
    writer = producer_of(new, "c")
    assert writer is not None and writer.name == "conv/tucker_last"
    assert sorted(n.name for n in consumers_of(new, "c")) == ["relu", "sigmoid"]
    assert [n.name for n in consumers_of(new, "x")] == ["conv/tucker_first", "add"]
    assert [o.name for o in new.graph.output] == ["y", "z"]
    assert_outputs_close(model, new)


def test_small_cnn_full_rank_equals_original() -> None:
    model = make_small_cnn()
    res = compress_full(model)
    kinds = {lp.name: lp.kind for lp in res.plan.layers}
    assert kinds == {"conv1": "tucker1", "conv2": "tucker2", "fc": "svd"}
    assert op_counts(res.model)["Conv"] == 5 and op_counts(res.model)["Gemm"] == 2
    assert_outputs_close(model, res.model)


def _decorate(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give the model every piece of metadata the rewrite must carry over."""
    model.producer_name = "my-exporter"
    model.producer_version = "4.2"
    model.domain = "org.example"
    model.model_version = 7
    model.doc_string = "a model with metadata"
    helper.set_model_props(model, {"author": "tests", "license": "MIT"})
    model.opset_import.append(helper.make_opsetid("com.example.custom", 3))
    model.graph.doc_string = "graph doc"
    return model


def test_metadata_opset_ir_and_io_names_unchanged() -> None:
    model = _decorate(make_small_cnn())
    new = compress_full(model).model
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        assert getattr(new, field) == getattr(model, field), field
    assert list(new.opset_import) == list(model.opset_import)
    assert {p.key: p.value for p in new.metadata_props} == {"author": "tests", "license": "MIT"}
    assert new.graph.name == model.graph.name and new.graph.doc_string == model.graph.doc_string
    assert [i.SerializeToString() for i in new.graph.input] == [i.SerializeToString() for i in model.graph.input]
    assert [o.SerializeToString() for o in new.graph.output] == [o.SerializeToString() for o in model.graph.output]


def test_ir3_opset7_conv_model() -> None:
    """Old models list initializers as graph inputs (IR 3); the new weights must be listed too."""
    model = make_conv_model(opset=7, ir_version=3, pads=(1, 1, 1, 1))
    new = compress_full(model).model
    assert new.ir_version == 3 and new.opset_import[0].version == 7
    onnx.checker.check_model(new, full_check=True)
    input_names = {i.name for i in new.graph.input}
    assert {t.name for t in new.graph.initializer} <= input_names
    assert "W" not in input_names  # the dropped weight is no longer a graph input
    assert_outputs_close(model, new)


def test_node_names_derived_from_original_and_unique() -> None:
    new = compress_full(make_small_cnn()).model
    names = [n.name for n in new.graph.node]
    assert len(set(names)) == len(names)
    assert [n for n in names if n.startswith("conv2")] == ["conv2/tucker_first", "conv2/tucker_core", "conv2/tucker_last"]
    assert [n for n in names if n.startswith("conv1")] == ["conv1/tucker_core", "conv1/tucker_last"]
    assert [n for n in names if n.startswith("fc")] == ["fc/svd_first", "fc/svd_last"]


def test_unnamed_node_gets_names_from_its_output() -> None:
    model = make_conv_model(node_name="")
    new = compress_full(model).model
    assert [n.name for n in new.graph.node] == ["y/tucker_first", "y/tucker_core", "y/tucker_last"]
    assert_outputs_close(model, new)


def test_generated_names_never_collide() -> None:
    """Pre-existing nodes, tensors and initializers named like the generated ones."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 8, 3, 3)).astype(np.float32), "W"),
        # The bias is called like the last factor's weight would be.
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "conv/tucker_last/W"),
    ]
    nodes = [
        # A node called like the first factor, writing the tensor the first factor would write.
        helper.make_node("Relu", ["x"], ["conv/tucker_first/out"], name="conv/tucker_first"),
        helper.make_node("Conv", ["conv/tucker_first/out", "W", "conv/tucker_last/W"], ["conv/tucker_core/out"],
                         name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Neg", ["conv/tucker_core/out"], ["y"], name="conv/tucker_core"),
    ]
    graph = helper.make_graph(
        nodes, "collide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6])], initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)

    new = compress_full(model).model
    onnx.checker.check_model(new, full_check=True)
    node_names = [n.name for n in new.graph.node]
    assert len(set(node_names)) == len(node_names), node_names
    outputs = [o for n in new.graph.node for o in n.output]
    assert len(set(outputs)) == len(outputs), outputs  # still single assignment
    init_names = [t.name for t in new.graph.initializer]
    assert len(set(init_names)) == len(init_names), init_names
    assert not set(init_names) & set(outputs)
    chain = [n for n in new.graph.node if n.op_type == "Conv"]
    assert len(chain) == 3 and all(n.name.startswith("conv/") for n in chain)
    assert chain[-1].input[2] == "conv/tucker_last/W"  # the original bias, untouched
    assert_outputs_close(model, new)


def test_untouched_nodes_and_initializers_are_byte_identical() -> None:
    model = make_small_cnn()
    before = model.SerializeToString()
    res = compress_full(model, include="^conv2$")
    assert model.SerializeToString() == before, "the input model must not be mutated"
    assert [lp.name for lp in res.plan.decomposed] == ["conv2"]
    orig_nodes = {n.name: n.SerializeToString() for n in model.graph.node if n.name != "conv2"}
    new_nodes = {n.name: n.SerializeToString() for n in res.model.graph.node}
    for name, data in orig_nodes.items():
        assert new_nodes[name] == data, name
    # Order is kept: the chain sits where conv2 was.
    assert [n.name for n in res.model.graph.node] == [
        "conv1", "relu1", "conv2/tucker_first", "conv2/tucker_core", "conv2/tucker_last", "gap", "flatten", "fc",
    ]
    new_inits = {t.name: t.SerializeToString() for t in res.model.graph.initializer}
    for t in model.graph.initializer:
        if t.name != "conv2.W":
            assert new_inits[t.name] == t.SerializeToString(), t.name
    assert "conv2.W" not in new_inits


def test_constant_node_weight_is_decomposed_and_dropped() -> None:
    model = make_conv_model(pads=(1, 1, 1, 1))
    w = next(t for t in model.graph.initializer if t.name == "W")
    const = helper.make_node("Constant", [], ["W"], name="w_const", value=w)
    model.graph.initializer.remove(w)
    model.graph.node.insert(0, const)
    onnx.checker.check_model(model)
    res = compress_full(model)
    assert res.plan.layers[0].kind == "tucker2"
    assert op_counts(res.model) == {"Conv": 3}  # the Constant producing the old weight is gone
    assert_outputs_close(model, res.model)


def _two_convs_sharing_weight() -> onnx.ModelProto:
    model = make_conv_model(pads=(1, 1, 1, 1))
    model.graph.node.append(
        helper.make_node("Conv", ["y", "W", "B"], ["y2"], name="conv_b", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    )
    model.graph.output[0].name = "y2"
    onnx.checker.check_model(model)
    return model


def test_shared_weight_shares_factors() -> None:
    model = _two_convs_sharing_weight()
    res = compress_full(model)
    assert op_counts(res.model) == {"Conv": 6}
    # One set of factor weights for both nodes, and the old weight dropped.
    assert sorted(t.name for t in res.model.graph.initializer) == [
        "B", "conv/tucker_core/W", "conv/tucker_first/W", "conv/tucker_last/W",
    ]
    assert_outputs_close(model, res.model)


def test_shared_weight_kept_while_still_read() -> None:
    """Exclude one of two nodes sharing W: the other is kept too (one factorisation per weight),
    with a reason, and W stays in the model."""
    model = _two_convs_sharing_weight()
    res = compress_full(model, exclude="conv_b")
    assert res.plan.decomposed == ()
    reasons = {lp.name: lp.reason for lp in res.plan.layers}
    assert "shared" in reasons["conv"] and "--exclude" in reasons["conv_b"]
    assert "W" in {t.name for t in res.model.graph.initializer}
    assert op_counts(res.model) == {"Conv": 2}
    assert_outputs_close(model, res.model)


def test_float16_model_keeps_dtype() -> None:
    model = make_conv_model(pads=(1, 1, 1, 1))
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.checker.check_model(model)
    new = compress_full(model).model
    assert {t.data_type for t in new.graph.initializer} == {TensorProto.FLOAT16}
    feeds = {"x": random_feeds(model)["x"].astype(np.float16)}
    a = run_ort(model, feeds)["y"].astype(np.float64)
    b = run_ort(new, feeds)["y"].astype(np.float64)
    assert np.max(np.abs(a - b)) <= 5e-3 * np.max(np.abs(a))  # float16 rounding of three factors


def test_conv_without_kernel_shape_attribute() -> None:
    """kernel_shape is optional in ONNX (inferred from W): every node of the chain still gets the right one."""
    model = make_conv_model(strides=(2, 2), pads=(1, 1, 1, 1))
    node = model.graph.node[0]
    kept = [a for a in node.attribute if a.name != "kernel_shape"]
    del node.attribute[:]
    node.attribute.extend(kept)
    onnx.checker.check_model(model)
    new = compress_full(model).model
    assert [node_attrs(n)["kernel_shape"] for n in new.graph.node] == [[1, 1], [3, 3], [1, 1]]
    assert_outputs_close(model, new)


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT16, TensorProto.FLOAT])
def test_full_rank_default_tolerance_follows_the_weight_dtype(dtype: int) -> None:
    """`--ranks full` validates by default; a float16 model (rounding of three factors, measured 7.6e-4
    on this conv) must pass its own default tolerance; a float32 one keeps 1e-4."""
    model = make_conv_model(T=32, S=16, pads=(1, 1, 1, 1), spatial=(12, 12))
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(dtype)
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np_dtype), t.name))
    model.graph.input[0].type.tensor_type.elem_type = dtype
    model.graph.output[0].type.tensor_type.elem_type = dtype
    res = ot.compress(model, CompressionConfig(ranks=RankPolicy("full")))
    v = res.validation
    assert v is not None and v.rtol is not None
    assert v.passed, (v.passing_rtol, v.rtol)
    if dtype == TensorProto.FLOAT16:
        assert 1e-4 < v.passing_rtol <= v.rtol <= 1e-2  # the float32 tolerance would have failed it
    else:
        assert v.rtol == 1e-4 and v.passing_rtol < 1e-6
