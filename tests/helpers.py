"""Shared test helpers: tiny ONNX models built with onnx.helper, seeded weights, an ORT runner.

Every builder returns a checked `onnx.ModelProto` (IR 8, opset 17 unless asked otherwise) with
float32 weights drawn from `np.random.default_rng(seed)`, so a test is reproducible from its seed.
Other test files may ADD functions here; do not change the existing ones (many tests rely on them).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_tucker.config import CompressionConfig, RankPolicy

IR_VERSION = 8
OPSET = 17

# Real data lives next to the repository, never inside it.
DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RESNETS_DIR = DATA_DIR / "cifar10-resnets"


# ---- weights ------------------------------------------------------------------------------------

def he_normal(rng: np.random.Generator, shape: Sequence[int]) -> np.ndarray:
    """He-scaled Gaussian weights (fan-in = all but the first dimension), float32."""
    fan_in = max(1, math.prod(shape[1:]))
    return (rng.standard_normal(tuple(shape)) * math.sqrt(2.0 / fan_in)).astype(np.float32)


def random_orthonormal(rng: np.random.Generator, n: int, r: int) -> np.ndarray:
    """n x r matrix with orthonormal columns (r <= n)."""
    q, _ = np.linalg.qr(rng.standard_normal((n, r)))
    return q[:, :r]


def low_rank_plus_noise(
    rng: np.random.Generator,
    shape: tuple[int, int],
    rank: int,
    sigma: float = 1.0,
    snr: tuple[float, float] = (3.0, 6.0),
) -> np.ndarray:
    """U diag(s) V^T + sigma * N(0, 1), float64.

    The `rank` signal singular values are spread over `snr` times the noise edge
    sigma * (sqrt(L) + sqrt(M)) (the largest singular value of the pure noise), so for snr > ~2
    the signal is well separated from the noise and EVBMF should recover `rank` exactly.
    """
    L, M = shape
    noise = sigma * rng.standard_normal((L, M))
    if rank == 0:
        return noise
    edge = sigma * (math.sqrt(L) + math.sqrt(M))
    s = np.linspace(snr[1], snr[0], rank) * edge
    return (random_orthonormal(rng, L, rank) * s) @ random_orthonormal(rng, M, rank).T + noise


def low_rank_kernel(
    rng: np.random.Generator,
    T: int,
    S: int,
    kernel: Sequence[int],
    rank_out: int,
    rank_in: int,
    noise: float = 0.01,
) -> np.ndarray:
    """A T x S x k... kernel with exact Tucker-2 ranks (rank_out, rank_in), plus a little noise.

    Scaled so that the signal part has He-like magnitude: tests that run it in ORT stay finite.
    The core's singular values are well above the noise, so EVBMF finds exactly these ranks on
    both channel unfoldings.
    """
    core = rng.standard_normal((rank_out, rank_in, *kernel))
    k = _mode(_mode(core, random_orthonormal(rng, T, rank_out), 0), random_orthonormal(rng, S, rank_in), 1)
    k = k / np.linalg.norm(k) * math.sqrt(T)  # entries ~ 1/sqrt(S*k) like He init
    scale = float(np.std(k))
    return (k + noise * scale * rng.standard_normal(k.shape)).astype(np.float32)


def _mode(tensor: np.ndarray, matrix: np.ndarray, mode: int) -> np.ndarray:
    """Map mode `mode` of `tensor` through `matrix` (new_dim x old_dim)."""
    moved = np.moveaxis(tensor, mode, -1)
    return np.moveaxis(moved @ matrix.T, -1, mode)


# ---- models -------------------------------------------------------------------------------------

def _finish(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    inits: list[onnx.TensorProto],
    opset: int = OPSET,
    ir_version: int = IR_VERSION,
    name: str = "tiny",
) -> onnx.ModelProto:
    if ir_version < 4:  # IR 3 requires every initializer to be listed as a graph input too
        inputs = inputs + [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="onnx-tucker-tests")
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    return model


def _init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(arr), name)


def make_conv_model(
    T: int = 8,
    S: int = 8,
    kernel: Sequence[int] = (3, 3),
    strides: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    bias: bool = True,
    spatial: Sequence[int] | None = None,
    batch: int = 1,
    group: int = 1,
    auto_pad: str | None = None,
    seed: int = 0,
    weight: np.ndarray | None = None,
    weight_as_input: bool = False,
    node_name: str = "conv",
    opset: int = OPSET,
    ir_version: int = IR_VERSION,
) -> onnx.ModelProto:
    """x [batch, S, *spatial] -> Conv -> y. 1-D, 2-D or 3-D from len(kernel).

    `pads` is the ONNX list (begins then ends); `weight_as_input=True` makes W a graph input
    (a non-constant weight, which the tool must skip).
    """
    nd = len(kernel)
    spatial = tuple(spatial) if spatial is not None else (9,) * nd
    rng = np.random.default_rng(seed)
    w = weight if weight is not None else he_normal(rng, (T, S // group, *kernel))
    assert w.shape == (T, S // group, *kernel), w.shape
    attrs: dict[str, object] = {"kernel_shape": list(kernel)}
    if group != 1:
        attrs["group"] = group
    if strides is not None:
        attrs["strides"] = list(strides)
    if pads is not None:
        attrs["pads"] = list(pads)
    if dilations is not None:
        attrs["dilations"] = list(dilations)
    if auto_pad is not None:
        attrs["auto_pad"] = auto_pad
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, S, *spatial])]
    inits = []
    if weight_as_input:
        inputs.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, list(w.shape)))
    else:
        inits.append(_init("W", w))
    node_inputs = ["x", "W"]
    if bias:
        inits.append(_init("B", (0.1 * rng.standard_normal(T)).astype(np.float32)))
        node_inputs.append("B")
    node = helper.make_node("Conv", node_inputs, ["y"], name=node_name, **attrs)
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * (nd + 2))
    return _finish([node], inputs, [out], inits, opset=opset, ir_version=ir_version)


def make_residual_model(C: int = 8, spatial: Sequence[int] = (8, 8), seed: int = 0) -> onnx.ModelProto:
    """y = Relu(Conv(x)) + x, and z = Sigmoid(Conv(x)): the conv output `c` has two consumers."""
    rng = np.random.default_rng(seed)
    inits = [_init("W", he_normal(rng, (C, C, 3, 3))), _init("B", (0.1 * rng.standard_normal(C)).astype(np.float32))]
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Add", ["r", "x"], ["y"], name="add"),
        helper.make_node("Sigmoid", ["c"], ["z"], name="sigmoid"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, *spatial])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, C, *spatial]) for n in ("y", "z")]
    return _finish(nodes, [x], outs, inits)


def make_small_cnn(
    in_ch: int = 3,
    c1: int = 16,
    c2: int = 32,
    classes: int = 10,
    spatial: Sequence[int] = (16, 16),
    batch: int | str = 1,
    seed: int = 0,
    low_rank: bool = False,
) -> onnx.ModelProto:
    """x -> conv1 (3x3) -> Relu -> conv2 (3x3, stride 2) -> GlobalAveragePool -> Flatten -> fc (Gemm, transB=1).

    `low_rank=True` gives every weight a clear low-rank structure (about a quarter of its
    dimensions), so EVBMF decomposes the layers under the default ranks.
    """
    rng = np.random.default_rng(seed)
    if low_rank:
        w1 = low_rank_kernel(rng, c1, in_ch, (3, 3), max(1, c1 // 4), in_ch)
        w2 = low_rank_kernel(rng, c2, c1, (3, 3), max(1, c2 // 4), max(1, c1 // 4))
        r = max(1, min(classes, c2) // 4)
        fc = low_rank_plus_noise(rng, (classes, c2), r, sigma=0.005, snr=(20.0, 40.0)).astype(np.float32)
    else:
        w1, w2 = he_normal(rng, (c1, in_ch, 3, 3)), he_normal(rng, (c2, c1, 3, 3))
        fc = he_normal(rng, (classes, c2))
    inits = [
        _init("conv1.W", w1),
        _init("conv1.B", (0.1 * rng.standard_normal(c1)).astype(np.float32)),
        _init("conv2.W", w2),
        _init("conv2.B", (0.1 * rng.standard_normal(c2)).astype(np.float32)),
        _init("fc.W", fc),
        _init("fc.B", (0.1 * rng.standard_normal(classes)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv1.W", "conv1.B"], ["h1"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
        helper.make_node(
            "Conv", ["a1", "conv2.W", "conv2.B"], ["h2"], name="conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]
        ),
        helper.make_node("GlobalAveragePool", ["h2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "fc.W", "fc.B"], ["logits"], name="fc", transB=1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, in_ch, *spatial])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])
    return _finish(nodes, [x], [y], inits, name="small_cnn")


def make_gemm_model(
    K: int = 12,
    N: int = 10,
    trans_b: int = 0,
    bias: bool = True,
    alpha: float = 1.0,
    beta: float = 1.0,
    trans_a: int = 0,
    rows: int = 4,
    seed: int = 0,
    opset: int = OPSET,
    ir_version: int = IR_VERSION,
    weight: np.ndarray | None = None,
) -> onnx.ModelProto:
    """y = alpha * x' @ W' + beta * C with W stored N x K when transB=1 (PyTorch Linear), K x N otherwise."""
    rng = np.random.default_rng(seed)
    w_eff = weight if weight is not None else he_normal(rng, (N, K)).T  # K x N as used
    w = np.ascontiguousarray(w_eff.T if trans_b else w_eff).astype(np.float32)
    inits = [_init("W", w)]
    node_inputs = ["x", "W"]
    if bias:
        inits.append(_init("C", (0.1 * rng.standard_normal(N)).astype(np.float32)))
        node_inputs.append("C")
    attrs: dict[str, object] = {"transB": trans_b}
    if trans_a:
        attrs["transA"] = trans_a
    if alpha != 1.0:
        attrs["alpha"] = alpha
    if beta != 1.0:
        attrs["beta"] = beta
    node = helper.make_node("Gemm", node_inputs, ["y"], name="fc", **attrs)
    x_shape = [K, rows] if trans_a else [rows, K]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, N])
    return _finish([node], [x], [y], inits, opset=opset, ir_version=ir_version)


def make_matmul_model(
    K: int = 12, N: int = 10, lead: Sequence[int] = (2, 3), seed: int = 0, weight: np.ndarray | None = None
) -> onnx.ModelProto:
    """y = x @ W with x [*lead, K] and a constant K x N weight."""
    rng = np.random.default_rng(seed)
    w = weight if weight is not None else he_normal(rng, (N, K)).T
    inits = [_init("W", np.ascontiguousarray(w).astype(np.float32))]
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="matmul")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [*lead, K])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [*lead, N])
    return _finish([node], [x], [y], inits)


# ---- running and inspecting ---------------------------------------------------------------------

def input_shapes(model: onnx.ModelProto, batch: int = 1) -> dict[str, tuple[int, ...]]:
    """Concrete shapes of the real graph inputs (symbolic dims -> `batch`)."""
    inits = {t.name for t in model.graph.initializer}
    shapes = {}
    for i in model.graph.input:
        if i.name in inits:
            continue
        dims = i.type.tensor_type.shape.dim
        shapes[i.name] = tuple(d.dim_value if d.HasField("dim_value") else batch for d in dims)
    return shapes


def random_feeds(model: onnx.ModelProto, seed: int = 0, batch: int = 1) -> dict[str, np.ndarray]:
    """Seeded standard-normal float32 inputs for every real graph input."""
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in input_shapes(model, batch).items()}


def run_ort(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run `model` in onnxruntime (CPU, graph optimisations off so we test the graph as written)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, dict(feeds)), strict=True))


def assert_outputs_close(
    original: onnx.ModelProto, compressed: onnx.ModelProto, rtol: float = 1e-4, seed: int = 0, batch: int = 1
) -> float:
    """Both models on the same seeded inputs: max|a - b| <= rtol * max|a| for every output.

    Returns the worst relative error, for messages.
    """
    feeds = random_feeds(original, seed, batch)
    a, b = run_ort(original, feeds), run_ort(compressed, feeds)
    assert list(a) == list(b), f"outputs differ: {list(a)} vs {list(b)}"
    worst = 0.0
    for name in a:
        assert a[name].shape == b[name].shape, (name, a[name].shape, b[name].shape)
        ref = float(np.max(np.abs(a[name])))
        err = float(np.max(np.abs(a[name].astype(np.float64) - b[name])))
        assert err <= rtol * ref, f"output {name}: max abs err {err:.3g} > {rtol:g} * max|out| {ref:.3g}"
        worst = max(worst, err / ref if ref else err)
    return worst


def op_counts(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.node)


def node_attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def producer_of(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto | None:
    for n in model.graph.node:
        if tensor in n.output:
            return n
    return None


def consumers_of(model: onnx.ModelProto, tensor: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if tensor in n.input]


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise KeyError(name)


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def make_conv_stack(
    layers: int = 3, C: int = 32, spatial: Sequence[int] = (16, 16), rank: int = 8, seed: int = 0
) -> onnx.ModelProto:
    """x [1, C, *spatial] -> `layers` x (3x3 Conv C->C, pads 1 -> Relu) -> y: identical layer shapes (as
    in a ResNet stage), each kernel of Tucker-2 ranks (rank, rank) plus a little noise."""
    rng = np.random.default_rng(seed)
    inits, nodes, x = [], [], "x"
    for i in range(layers):
        inits.append(_init(f"conv{i}.W", low_rank_kernel(rng, C, C, (3, 3), rank, rank)))
        inits.append(_init(f"conv{i}.B", (0.1 * rng.standard_normal(C)).astype(np.float32)))
        nodes.append(helper.make_node("Conv", [x, f"conv{i}.W", f"conv{i}.B"], [f"h{i}"], name=f"conv{i}",
                                      kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"h{i}"], [f"a{i}"], name=f"relu{i}"))
        x = f"a{i}"
    nodes[-1] = helper.make_node("Relu", [f"h{layers - 1}"], ["y"], name=f"relu{layers - 1}")
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, C, *spatial]) for n in ("x", "y")]
    return _finish(nodes, vi[:1], vi[1:], inits, name="conv_stack")


# Conv configurations every decomposition kind is exact over at full rank (2-D kernels).
CONV_CONFIGS_2D = [
    dict(),
    dict(strides=(2, 2), pads=(1, 1, 1, 1)),
    dict(strides=(2, 1), pads=(1, 0, 2, 1)),  # asymmetric
    dict(dilations=(2, 3), pads=(2, 3, 2, 3)),
    dict(auto_pad="SAME_UPPER", strides=(2, 2)),
    dict(auto_pad="SAME_LOWER", kernel=(3, 5)),
    dict(auto_pad="VALID", kernel=(5, 3), strides=(1, 2)),
    dict(group=2, pads=(1, 2, 0, 1), strides=(2, 1)),
    dict(group=3, T=9, S=6, dilations=(1, 2), pads=(1, 2, 1, 2), bias=False),
    dict(batch=2, kernel=(2, 4), pads=(0, 1, 1, 2)),
]


def replace_ranks(cfg: CompressionConfig, ranks: str) -> CompressionConfig:
    """`cfg` with the rank policy `ranks` (text, as --ranks takes it)."""
    return dataclasses.replace(cfg, ranks=RankPolicy.parse(ranks))


def single_layer_candidates(model: onnx.ModelProto, x: np.ndarray, weight: str = "W") -> tuple[Any, Any, list[Any]]:
    """The data path's coverage, error curves and candidates (calibration/rankselect.py) of the one layer of `model`,
    whose input is `x`, computed on the calibration batch `x`: what `--ranks data:F` allocates from."""
    from onnx_tucker.calibration.rankselect import _candidates, _covered, layer_curves
    from onnx_tucker.graph.model import find_layers, infer_shapes
    from onnx_tucker.runtime.activations import ActivationCache

    (layer,) = find_layers(model, infer_shapes(model, {"x": (1, *x.shape[1:])}))
    cov = _covered(layer)
    assert not isinstance(cov, str), cov
    with ActivationCache(model, [{"x": x}], "original") as cache:
        curves = layer_curves(layer, cov, cache.values, initializer(model, weight), len(x))
    return cov, curves, _candidates(layer, cov, curves)

