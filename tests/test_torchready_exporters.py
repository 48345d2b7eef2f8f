"""Torch-readiness of what real exporters write (issue 20): `auto_pad` SAME_* / VALID made explicit pads
(or a `Pad` node for a spatial size known only at run time), weights held in `Constant` nodes lifted to
initializers. Each rewrite equals onnxruntime before and after; the converted module equals it too; one
training step changes exactly the trainable weights, the lifted Constant weights included."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.helpers import _finish, _init, he_normal, run_ort, save

torch = pytest.importorskip("torch")
if importlib.util.find_spec("onnx2torch") is None:
    pytest.skip("onnx2torch is not installed (pip install -e '.[finetune]')", allow_module_level=True)

import onnx_tucker as ot  # noqa: E402
from onnx_tucker.config import RankPolicy  # noqa: E402
from onnx_tucker.errors import ModelLoadError  # noqa: E402
from onnx_tucker.graph import torchready  # noqa: E402
from onnx_tucker.training import FinetuneConfig  # noqa: E402
from onnx_tucker.training import convert as ftc  # noqa: E402

torch.set_num_threads(1)
ANY: torchready.Supported = lambda domain, op, version: True  # noqa: E731 - the graph rewrites need no converter list


def _window_model(op: str, mode: str, size: int | str, stride: int, kernel: int = 3, opset: int = 17,
                  **extra: Any) -> onnx.ModelProto:
    """x [N, 4, size, size] -> op (auto_pad `mode`) -> y; a Conv has 6 output channels and a bias."""
    rng = np.random.default_rng(size if isinstance(size, int) else 0)
    inits, inputs = [], ["x"]
    if op in ("Conv", "ConvTranspose"):
        shape = (6, 4, kernel, kernel) if op == "Conv" else (4, 6, kernel, kernel)
        inits = [_init("w", he_normal(rng, shape)), _init("b", (0.1 * rng.standard_normal(6)).astype(np.float32))]
        inputs += ["w", "b"]
    node = helper.make_node(op, inputs, ["y"], name=f"{op.lower()}_0", auto_pad=mode, kernel_shape=[kernel, kernel],
                            strides=[stride, stride], **extra)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, size, size])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6 if inits else 4, "h", "w"])
    return _finish([node], [x], [y], inits, opset=opset)


def _torch_out(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    module, _ = ftc.to_torch(model, "m.onnx")
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def _symmetric(pads: list[int]) -> bool:
    return pads[: len(pads) // 2] == pads[len(pads) // 2 :]


# ---- auto_pad -------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["Conv", "MaxPool", "AveragePool"])
@pytest.mark.parametrize("mode", ["SAME_UPPER", "SAME_LOWER", "VALID"])
@pytest.mark.parametrize("size", [7, 8])
@pytest.mark.parametrize("stride", [1, 2])
def test_auto_pad_becomes_explicit_pads_with_equal_outputs(op: str, mode: str, size: int, stride: int) -> None:
    model = _window_model(op, mode, size, stride)
    norm, bad = torchready.normalize(model, ANY)
    assert bad == []
    (node,) = norm.model.graph.node
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert "auto_pad" not in attrs and len(attrs["pads"]) == 4
    onnx.checker.check_model(norm.model)
    x = np.random.default_rng(1).standard_normal((2, 4, size, size)).astype(np.float32)
    ref = run_ort(model, {"x": x})["y"]
    assert ref.shape[2] == (-(-size // stride) if mode != "VALID" else (size - 3) // stride + 1)
    np.testing.assert_allclose(run_ort(norm.model, {"x": x})["y"], ref, rtol=0, atol=1e-6)
    if op == "AveragePool" and not _symmetric(list(attrs["pads"])):
        with pytest.raises(ModelLoadError, match="non symmetrical"):  # onnx2torch's own limit, named
            ftc.to_torch(model, "m.onnx")
        return
    np.testing.assert_allclose(_torch_out(model, x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["Conv", "MaxPool"])
@pytest.mark.parametrize("mode", ["SAME_UPPER", "SAME_LOWER"])
def test_a_runtime_spatial_size_gets_a_pad_node_exact_at_odd_and_even_sizes(op: str, mode: str) -> None:
    model = _window_model(op, mode, "H", 2)
    norm, bad = torchready.normalize(model, ANY)
    assert bad == [] and "Pad" in [n.op_type for n in norm.model.graph.node]
    onnx.checker.check_model(norm.model)
    module, _ = ftc.to_torch(model, "m.onnx")
    for size in (7, 8, 9):
        x = np.random.default_rng(size).standard_normal((2, 4, size, size)).astype(np.float32) - 3  # MaxPool: -inf pads show
        ref = run_ort(model, {"x": x})["y"]
        np.testing.assert_allclose(run_ort(norm.model, {"x": x})["y"], ref, rtol=0, atol=1e-6)
        with torch.no_grad():
            np.testing.assert_allclose(module(torch.from_numpy(x)).numpy(), ref, rtol=1e-5, atol=1e-5)


def test_stride_one_needs_no_size_and_unexactable_padding_is_refused_naming_the_node() -> None:
    norm, _ = torchready.normalize(_window_model("Conv", "SAME_UPPER", "H", 1), ANY)
    assert [n.op_type for n in norm.model.graph.node] == ["Conv"]  # padding k - 1 whatever the size
    model = _window_model("AveragePool", "SAME_UPPER", "H", 2)  # count_include_pad=0 cannot read a padded input
    with pytest.raises(ModelLoadError, match=r"^m\.onnx: node 'averagepool_0' \(AveragePool, auto_pad SAME_UPPER\)"):
        torchready.normalize(model, ANY, "m.onnx")
    norm, _ = torchready.normalize(_window_model("AveragePool", "SAME_UPPER", "H", 2, count_include_pad=1), ANY)
    x = np.random.default_rng(0).standard_normal((1, 4, 9, 9)).astype(np.float32)
    ref = run_ort(_window_model("AveragePool", "SAME_UPPER", "H", 2, count_include_pad=1), {"x": x})["y"]
    np.testing.assert_allclose(run_ort(norm.model, {"x": x})["y"], ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["SAME_UPPER", "SAME_LOWER", "VALID"])
@pytest.mark.parametrize("kernel", [3, 4])
def test_conv_transpose_auto_pad_equals_onnxruntime(mode: str, kernel: int) -> None:
    model = _window_model("ConvTranspose", mode, 5, 2, kernel=kernel)
    norm, bad = torchready.normalize(model, ANY)
    (node,) = norm.model.graph.node
    pads = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "pads")
    x = np.random.default_rng(2).standard_normal((2, 4, 5, 5)).astype(np.float32)
    ref = run_ort(model, {"x": x})["y"]
    np.testing.assert_allclose(run_ort(norm.model, {"x": x})["y"], ref, rtol=0, atol=1e-5)
    if _symmetric(list(pads)):
        np.testing.assert_allclose(_torch_out(model, x), ref, rtol=1e-5, atol=1e-5)


# ---- Constant weights -------------------------------------------------------------------------------

def _const(name: str, arr: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"{name}_const", value=numpy_helper.from_array(arr, name))


def _paddle_like(seed: int = 0) -> onnx.ModelProto:
    """Paddle2ONNX's way: every weight a Constant node. x [N,3,12,12] -> conv1 -> Relu -> conv2 (SAME_UPPER,
    stride 2) -> Relu -> GAP -> Flatten -> MatMul + Add -> y [N, 10]."""
    rng = np.random.default_rng(seed)
    nodes = [
        _const("conv2d_0.w_0", he_normal(rng, (16, 3, 3, 3))),
        _const("conv2d_1.w_0", he_normal(rng, (32, 16, 3, 3))),
        _const("conv2d_1.b_0", (0.1 * rng.standard_normal(32)).astype(np.float32)),
        _const("fc_0.w_0", he_normal(rng, (32, 10))),
        _const("fc_0.b_0", np.zeros(10, np.float32)),
        helper.make_node("Conv", ["x", "conv2d_0.w_0"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "conv2d_1.w_0", "conv2d_1.b_0"], ["c2"], name="conv2", auto_pad="SAME_UPPER",
                         strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "fc_0.w_0"], ["m"], name="fc"),
        helper.make_node("Add", ["m", "fc_0.b_0"], ["y"], name="fc_bias"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])
    return _finish(nodes, [x], [y], [])


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every float tensor with 2+ dims by name, initializers and Constant nodes alike."""
    g = model.graph
    out = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    out.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in g.node if n.op_type == "Constant"})
    return {k: v for k, v in out.items() if v.ndim >= 2 and v.dtype == np.float32}


def test_constant_weights_are_lifted_and_become_parameters() -> None:
    model = _paddle_like()
    norm, bad = torchready.normalize(model, ANY)
    assert bad == [] and not [n for n in norm.model.graph.node if n.op_type == "Constant"]
    assert {t.name for t in norm.model.graph.initializer} >= {"conv2d_0.w_0", "conv2d_1.w_0", "fc_0.w_0"}
    onnx.checker.check_model(norm.model)
    x = np.random.default_rng(3).standard_normal((2, 3, 12, 12)).astype(np.float32)
    ref = run_ort(model, {"x": x})["y"]
    np.testing.assert_allclose(run_ort(norm.model, {"x": x})["y"], ref, rtol=0, atol=1e-6)
    module, _ = ftc.to_torch(model, "paddle.onnx")
    shapes = sorted(tuple(p.shape) for p in module.parameters())
    assert (16, 3, 3, 3) in shapes and (32, 16, 3, 3) in shapes  # the conv weights train
    with torch.no_grad():
        np.testing.assert_allclose(module(torch.from_numpy(x)).numpy(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("train", ["factors", "all"])
def test_one_step_changes_exactly_the_trainable_weights_lifted_constants_included(tmp_path: Path, train: str) -> None:
    orig = save(_paddle_like(), tmp_path / "paddle.onnx")
    comp = tmp_path / "paddle.tucker.onnx"
    ot.compress(orig, ot.CompressionConfig(ranks=RankPolicy.parse("ratio:0.5"), validate=False, exclude="^conv1$"),
                output=comp)
    before = _weights(onnx.load(comp))
    assert "conv2d_0.w_0" in before  # conv1 kept whole, its weight still a Constant node
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, x=rng.standard_normal((32, 3, 12, 12)).astype(np.float32), labels=rng.integers(0, 10, 32))
    out = tmp_path / "ft.onnx"
    cfg = FinetuneConfig(epochs=1, max_steps=1, lr=0.05, train=train, val_split=0, augment=False, threads=1)
    r = ot.finetune(comp, out, data, config=cfg)
    assert r.steps == 1
    after = onnx.load(out)
    # Same layers, same order: compare each layer's weight before and after.
    def layer_weights(m: onnx.ModelProto) -> list[tuple[str, np.ndarray]]:
        w = _weights(m)
        return [(n.name, w[n.input[1]]) for n in m.graph.node if n.op_type in ("Conv", "MatMul", "Gemm") and n.input[1] in w]

    wb, wa = layer_weights(onnx.load(comp)), layer_weights(after)
    assert len(wb) == len(wa) and len(wb) >= 4
    assert [n for n in onnx.load(comp).graph.node if n.op_type == "Constant"]  # the student held Constant weights
    for (name, b), (_, a) in zip(wb, wa, strict=True):
        a = a.T if a.shape != b.shape else a
        changed = not np.array_equal(a, b)
        assert changed == (train == "all" or bool(ftc.FACTOR_MODULE.search(name))), name


def _paddle_classifier() -> onnx.ModelProto:
    """Paddle2ONNX's classifier head at opset 11: input dims declared -1, a bias reshaped to [1, C, 1, 1]
    (a constant Reshape), flatten as Reshape(x, Concat(Shape(x)[0:1], [-1])) through int32 casts, Softmax."""
    rng = np.random.default_rng(4)
    nodes = [
        _const("conv_w", he_normal(rng, (8, 3, 3, 3))), _const("conv_b", (0.1 * rng.standard_normal(8)).astype(np.float32)),
        _const("b_shape", np.array([1, 8, 1, 1], np.int64)), _const("fc_w", he_normal(rng, (8, 5))),
        _const("s0", np.array([0], np.int64)), _const("s1", np.array([1], np.int64)), _const("rest", np.array([-1], np.int32)),
        helper.make_node("Conv", ["x", "conv_w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["conv_b", "b_shape"], ["b4"], name="bias_reshape"),
        helper.make_node("Add", ["c", "b4"], ["cb"], name="bias"),
        helper.make_node("GlobalAveragePool", ["cb"], ["g"], name="gap"),
        helper.make_node("Shape", ["g"], ["sh"], name="shape"),
        helper.make_node("Cast", ["sh"], ["sh32"], name="cast0", to=TensorProto.INT32),
        helper.make_node("Slice", ["sh32", "s0", "s1", "s0"], ["n32"], name="slice"),
        helper.make_node("Concat", ["n32", "rest"], ["shape32"], name="concat", axis=0),
        helper.make_node("Cast", ["shape32"], ["shape64"], name="cast1", to=TensorProto.INT64),
        helper.make_node("Reshape", ["g", "shape64"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "fc_w"], ["logits"], name="fc"),
        helper.make_node("Softmax", ["logits"], ["prob"], name="softmax", axis=1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, -1, -1])
    y = helper.make_tensor_value_info("prob", TensorProto.FLOAT, [-1, 5])
    return _finish(nodes, [x], [y], [], opset=11)


def test_a_paddle_classifier_head_converts_and_exports_with_any_batch(tmp_path: Path) -> None:
    model = _paddle_classifier()
    norm, bad = torchready.normalize(model, ftc.supported_ops())
    assert bad == [] and norm.opset == 13  # Softmax-11 exports with the batch baked in: opset 13
    assert any("computed shape of 1 Reshape" in c for c in norm.changes)
    shapes = {t.name: numpy_helper.to_array(t).tolist() for t in norm.model.graph.initializer}
    assert shapes["b_shape"] == [1, 8, 1, 1]  # a constant's reshape keeps its 1
    assert not [n for n in norm.model.graph.node if n.op_type == "Shape"]  # the shape computation is gone
    x = np.random.default_rng(0).standard_normal((3, 3, 10, 12)).astype(np.float32)
    ref = run_ort(model, {"x": x})["prob"]
    np.testing.assert_allclose(run_ort(norm.model, {"x": x})["prob"], ref, rtol=1e-6, atol=1e-6)
    src = save(model, tmp_path / "cls.onnx")
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(1).standard_normal((12, 3, 10, 12)).astype(np.float32))
    out = tmp_path / "ft.onnx"
    cfg = FinetuneConfig(epochs=1, max_steps=1, lr=1e-6, val_split=0.5, augment=False, threads=1)
    r = ot.finetune(src, out, data, teacher=src, config=cfg)
    # The Constant weights train; a bias added by a separate Add (through a Reshape) stays a constant.
    assert r.steps == 1 and r.trainable_params == 8 * 3 * 9 + 8 * 5
    got = run_ort(onnx.load(out), {"x": np.concatenate([x, x[:2]])})["prob"]  # batch 5, exported at 2
    np.testing.assert_allclose(got[:3], ref, rtol=1e-4, atol=1e-5)


def test_dynamic_input_dims_are_fixed_to_the_datas_but_the_batch() -> None:
    model = _window_model("Conv", "SAME_UPPER", "H", 2)
    norm, _ = torchready.normalize(model, ANY, "m.onnx", {"x": (7, 4, 9, 9)})
    dims = [d.dim_value or d.dim_param for d in norm.model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 4, 9, 9] and any("x[2]=9, x[3]=9" in c for c in norm.changes)
    assert [n.op_type for n in norm.model.graph.node] == ["Conv"]  # sizes known: static pads, no Pad node


def _svtr_reshapes() -> onnx.ModelProto:
    """PP-OCRv4 rec's SVTR attention head at opset 12: Reshape(x, Concat(Cast(0), Shape(x)[1], Cast(2), Cast(4)))
    (0 = "copy dim 0", the batch), BatchNormalization on it, then a second computed Reshape from the first's
    result back to [N, 6, 8] and a BatchNormalization on that 3-D tensor. onnx's inference loses the rank at
    the first computed Reshape (and so at every tensor after it): onnx2torch's BN read rank 0."""
    rng = np.random.default_rng(5)

    def bn(name: str, x: str, y: str) -> list[onnx.NodeProto]:
        c = 6
        return [_const(f"{name}_s", (1 + 0.1 * rng.standard_normal(c)).astype(np.float32)),
                _const(f"{name}_b", (0.1 * rng.standard_normal(c)).astype(np.float32)),
                _const(f"{name}_m", (0.1 * rng.standard_normal(c)).astype(np.float32)),
                _const(f"{name}_v", (1 + 0.1 * rng.random(c)).astype(np.float32)),
                helper.make_node("BatchNormalization", [x, f"{name}_s", f"{name}_b", f"{name}_m", f"{name}_v"], [y],
                                 name=name)]

    def shape_of(src: str, tail: list[int], tag: str) -> list[onnx.NodeProto]:
        """Concat(Cast(0), Shape(src)[1:2], Cast(tail...)) as Paddle2ONNX writes it (int32 constants)."""
        nodes = [helper.make_node("Shape", [src], [f"{tag}_sh"], name=f"{tag}_shape"),
                 helper.make_node("Cast", [f"{tag}_sh"], [f"{tag}_sh32"], name=f"{tag}_cast", to=TensorProto.INT32),
                 _const(f"{tag}_one", np.array([1], np.int64)), _const(f"{tag}_two", np.array([2], np.int64)),
                 _const(f"{tag}_zero", np.array([0], np.int64)),
                 helper.make_node("Slice", [f"{tag}_sh32", f"{tag}_one", f"{tag}_two", f"{tag}_zero"], [f"{tag}_d1"],
                                  name=f"{tag}_slice"),
                 helper.make_node("Cast", [f"{tag}_d1"], [f"{tag}_d1_64"], name=f"{tag}_d1_cast", to=TensorProto.INT64)]
        parts = []
        for k, v in enumerate([0, None, *tail]):
            if v is None:
                parts.append(f"{tag}_d1_64")
                continue
            nodes += [_const(f"{tag}_c{k}", np.array([v], np.int32)),
                      helper.make_node("Cast", [f"{tag}_c{k}"], [f"{tag}_c{k}_64"], name=f"{tag}_c{k}_cast", to=TensorProto.INT64)]
            parts.append(f"{tag}_c{k}_64")
        return [*nodes, helper.make_node("Concat", parts, [f"{tag}_shape"], name=f"{tag}_concat", axis=0)]

    nodes = [
        *shape_of("x", [2, 4], "r1"), helper.make_node("Reshape", ["x", "r1_shape"], ["x4"], name="reshape_4d"),
        *bn("bn_4d", "x4", "b4"),
        *shape_of("b4", [8], "r2"), helper.make_node("Reshape", ["b4", "r2_shape"], ["x3"], name="reshape_3d"),
        *bn("bn_3d", "x3", "y"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 6, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 6, 8])
    return _finish(nodes, [x], [y], [], opset=12)


def _rank(model: onnx.ModelProto, tensor: str) -> int | None:
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    for v in inferred.graph.value_info:
        if v.name == tensor and v.type.tensor_type.HasField("shape"):
            return len(v.type.tensor_type.shape.dim)
    return None


def test_computed_reshapes_with_a_literal_zero_batch_become_constant_so_batchnorm_has_a_rank() -> None:
    model = _svtr_reshapes()
    assert _rank(model, "x4") is None and _rank(model, "x3") is None  # the problem: inference loses the rank
    norm, bad = torchready.normalize(model, ftc.supported_ops())
    assert bad == []
    assert any("computed shape of 2 Reshape" in c for c in norm.changes)  # the second folds once the first has
    assert _rank(norm.model, "x4") == 4 and _rank(norm.model, "x3") == 3
    shapes = {t.name: numpy_helper.to_array(t).tolist() for t in norm.model.graph.initializer if "static_shape" in t.name}
    assert sorted(shapes.values()) == [[0, 6, 2, 4], [0, 6, 8]]
    assert not [n for n in norm.model.graph.node if n.op_type == "Shape"]
    x = np.random.default_rng(0).standard_normal((3, 6, 8)).astype(np.float32)
    ref = run_ort(model, {"x": x})["y"]
    np.testing.assert_allclose(run_ort(norm.model, {"x": x})["y"], ref, rtol=0, atol=1e-6)
    module, _ = ftc.to_torch(model, "rec.onnx")  # onnx2torch converts it now
    with torch.no_grad():
        got = module.eval()(torch.from_numpy(x)).numpy()  # eval: BatchNorm's running statistics
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


# ---- a Sigmoid output that is all but zero (PP-OCRv4 det on noise) ---------------------------------

def _paddle_det_head(bias: float = -16.0) -> onnx.ModelProto:
    """PP-OCRv4 det's tail at opset 12: Constant weights, Conv -> Resize (nearest, asymmetric, floor, scales 2)
    -> ConvTranspose (2x2, stride 2) + bias -> Sigmoid, input dims declared dynamic. At `bias` -16 the
    text-probability map is ~1e-7 everywhere, where onnxruntime's Sigmoid has no relative precision."""
    rng = np.random.default_rng(5)
    nodes = [
        _const("conv_w", (0.05 * he_normal(rng, (4, 3, 3, 3))).astype(np.float32)),
        _const("up_w", (0.05 * he_normal(rng, (4, 1, 2, 2))).astype(np.float32)),
        _const("up_b", np.array([bias], np.float32)),
        _const("roi", np.array([], np.float32)), _const("scales", np.array([1, 1, 2, 2], np.float32)),
        helper.make_node("Conv", ["x", "conv_w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Resize", ["c", "roi", "scales"], ["r"], name="resize", mode="nearest",
                         coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
        helper.make_node("ConvTranspose", ["r", "up_w", "up_b"], ["logits"], name="up", kernel_shape=[2, 2],
                         strides=[2, 2]),
        helper.make_node("Sigmoid", ["logits"], ["prob"], name="sigmoid"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, -1, -1])
    y = helper.make_tensor_value_info("prob", TensorProto.FLOAT, [-1, 1, -1, -1])
    return _finish(nodes, [x], [y], [], opset=12)


def test_a_sigmoid_map_of_noise_round_trips_measured_against_its_range(tmp_path: Path) -> None:
    """The conversion and the export are exact (the logits agree to 1e-6); onnxruntime's float32 Sigmoid
    (0.5 + r(x)) is accurate to ~1.5e-7 absolute only, so outputs ~1e-7 differ from torch's by a "relative"
    0.1-1. The export check measures a Sigmoid output against its range [0, 1] and passes this model."""
    model = _paddle_det_head()
    x = np.random.default_rng(0).random((4, 3, 8, 8), dtype=np.float32)
    ref = run_ort(model, {"x": x})["prob"]
    assert ref.shape == (4, 1, 32, 32) and ref.max() < 1e-6  # all but zero
    norm, bad = torchready.normalize(model, ftc.supported_ops(), "det.onnx", {"x": (1, 3, 8, 8)})
    assert bad == []
    np.testing.assert_array_equal(run_ort(norm.model, {"x": x})["prob"], ref)
    logits = onnx.ModelProto()
    logits.CopyFrom(model)
    logits.graph.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, None))
    ort_logits = run_ort(logits, {"x": x})["logits"]
    module, _ = ftc.to_torch(model, "det.onnx", {"x": (1, 3, 8, 8)})
    with torch.no_grad():
        prob = module.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(torch.special.logit(torch.from_numpy(prob).double()).numpy(), ort_logits, rtol=1e-5)
    np.testing.assert_allclose(prob, ref, rtol=0, atol=1e-6)  # the runtime's absolute precision...
    assert np.abs(prob - ref).max() / np.abs(ref).max() > 1e-2  # ...and no relative one: the old check refused
    src = save(model, tmp_path / "det.onnx")
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(1).random((8, 3, 8, 8), dtype=np.float32))
    cfg = FinetuneConfig(epochs=1, max_steps=1, lr=1e-6, val_split=0.5, augment=False, threads=1)
    r = ot.finetune(src, tmp_path / "ft.onnx", data, teacher=src, config=cfg)
    assert r.steps == 1 and r.export_max_rel_error < 1e-5
    assert r.export_max_rel_error > 0  # measured, not skipped


def test_only_outputs_computed_by_a_sigmoid_are_measured_against_their_range() -> None:
    from onnx_tucker.training.run import _range_one_outputs

    nodes = [helper.make_node("Sigmoid", ["x"], ["s"], name="sigmoid"), helper.make_node("Identity", ["s"], ["p"], name="id"),
             helper.make_node("Relu", ["s"], ["r"], name="relu")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in ("s", "p", "r")]
    assert _range_one_outputs(_finish(nodes, [x], outs, [])) == {"s", "p"}
