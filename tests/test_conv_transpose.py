"""ConvTranspose: the handler added as one new file (ops/conv_transpose.py).

Full-rank decompositions must reproduce the original in onnxruntime for strides, pads, dilations,
output_padding, output_shape, auto_pad, groups, 1-D/2-D/3-D and with or without bias; an exactly
low-rank kernel must be found by EVBMF and reproduced at its rank; the cost model must count what the
chain really computes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_tucker as ot
from onnx_tucker import CompressionConfig, RankPolicy
from tests.helpers import assert_outputs_close, he_normal, low_rank_kernel, op_counts, random_feeds, run_ort

FULL = CompressionConfig(ranks=RankPolicy("full"), validate=False)


def make_convt_model(
    cin: int = 8,
    cout: int = 8,
    kernel: Sequence[int] = (3, 3),
    group: int = 1,
    bias: bool = True,
    spatial: Sequence[int] | None = None,
    weight: np.ndarray | None = None,
    seed: int = 0,
    **attrs: object,
) -> onnx.ModelProto:
    """x [1, cin, *spatial] -> ConvTranspose (weight cin x cout/group x k...) -> y."""
    nd = len(kernel)
    spatial = tuple(spatial) if spatial is not None else (5,) * nd
    rng = np.random.default_rng(seed)
    w = weight if weight is not None else he_normal(rng, (cin, cout // group, *kernel))
    assert w.shape == (cin, cout // group, *kernel), w.shape
    inits = [numpy_helper.from_array(np.ascontiguousarray(w, dtype=np.float32), "W")]
    inputs = ["x", "W"]
    if bias:
        inits.append(numpy_helper.from_array((0.1 * rng.standard_normal(cout)).astype(np.float32), "B"))
        inputs.append("B")
    kw: dict[str, object] = {"kernel_shape": list(kernel), **{k: v for k, v in attrs.items() if v is not None}}
    if group != 1:
        kw["group"] = group
    node = helper.make_node("ConvTranspose", inputs, ["y"], name="up", **kw)
    g = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, *spatial])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * (nd + 2))],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


CASES = {
    "3x3": dict(),
    "3x3-stride2": dict(strides=[2, 2]),
    "4x4-stride2-pads": dict(kernel=(4, 4), strides=[2, 2], pads=[1, 1, 1, 1]),
    "3x3-stride2-output-padding": dict(strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]),
    "3x3-asym-pads-stride21": dict(strides=[2, 1], pads=[0, 1, 1, 0]),
    "3x3-dilation2": dict(dilations=[2, 2]),
    "3x3-output-shape": dict(strides=[2, 2], output_shape=[10, 10]),
    "3x3-auto-pad-same-upper": dict(strides=[2, 2], auto_pad="SAME_UPPER"),
    "3x3-nobias": dict(bias=False),
    "wide": dict(cin=16, cout=4),
    "tall": dict(cin=8, cout=24, strides=[2, 2]),
    "group2": dict(cin=8, cout=12, group=2, strides=[2, 2]),
    "group4-output-padding": dict(cin=16, cout=8, group=4, strides=[2, 2], output_padding=[1, 0]),
    "1x1-stride2": dict(kernel=(1, 1), strides=[2, 2], cin=12, cout=6),
    "1d": dict(kernel=(5,), strides=[2], pads=[2, 1]),
    "3d": dict(kernel=(3, 3, 3), strides=[2, 1, 2], spatial=(3, 4, 3)),
    "few-input-channels": dict(cin=3, cout=8),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_full_rank_reproduces_the_original(case: str) -> None:
    model = make_convt_model(**CASES[case])  # type: ignore[arg-type]
    res = ot.compress(model, FULL)
    (lp,) = res.plan.layers
    assert lp.decomposed, lp.reason
    counts = op_counts(res.model)
    assert counts["ConvTranspose"] == 1 and counts["Conv"] == (2 if lp.kind == "tucker2" else 1), counts
    assert "W" not in {t.name for t in res.model.graph.initializer}  # the original weight is gone
    onnx.checker.check_model(res.model)
    assert_outputs_close(model, res.model, rtol=1e-4)


def test_chain_layout_and_attributes() -> None:
    model = make_convt_model(cin=8, cout=12, group=2, strides=[2, 2], pads=[1, 0, 0, 1], output_padding=[1, 1])
    res = ot.compress(model, FULL)
    first, core, last = res.model.graph.node
    assert (first.op_type, core.op_type, last.op_type) == ("Conv", "ConvTranspose", "Conv")
    attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in (first, core, last)]
    assert attrs[0] == {"kernel_shape": [1, 1], "group": 2}
    assert attrs[1] == {"strides": [2, 2], "pads": [1, 0, 0, 1], "output_padding": [1, 1], "kernel_shape": [3, 3], "group": 2}
    assert attrs[2] == {"kernel_shape": [1, 1], "group": 2}
    assert list(last.input) == [last.input[0], last.input[1], "B"] and list(last.output) == ["y"]
    assert [n.name for n in (first, core, last)] == ["up/tucker_first", "up/tucker_core", "up/tucker_last"]


@pytest.mark.parametrize(("ranks", "group"), [((3, 2), 1), ((2, 3), 2)])
def test_evbmf_finds_the_rank_of_a_low_rank_kernel(ranks: tuple[int, int], group: int) -> None:
    """Built as a Conv-layout low-rank kernel per group (T x S x k), stored as ConvTranspose's S x T x k."""
    rng = np.random.default_rng(1)
    cin, cout = 24, 32
    blocks = [low_rank_kernel(rng, cout // group, cin // group, (3, 3), *ranks, noise=0.0) for _ in range(group)]
    w = np.concatenate([b.swapaxes(0, 1) for b in blocks], axis=0)
    model = make_convt_model(cin=cin, cout=cout, group=group, weight=w, strides=[2, 2], spatial=(6, 6))
    res = ot.compress(model, CompressionConfig(validate=False))
    (lp,) = res.plan.layers
    assert lp.kind == "tucker2" and lp.ranks == ranks, (lp.kind, lp.ranks, lp.reason)
    assert lp.rel_error is not None and lp.rel_error < 1e-5
    assert_outputs_close(model, res.model, rtol=1e-4)


def test_cost_counts_what_the_chain_computes() -> None:
    """MACs of the original and of the chain from first principles: a transposed conv does
    C_in * C_out/group * k MACs per input pixel, a 1x1 conv C_in * C_out/group per pixel."""
    cin, cout, g, k, hw = 16, 8, 2, 9, 5 * 5
    model = make_convt_model(cin=cin, cout=cout, group=g, strides=[2, 2])
    lp = ot.plan(model, CompressionConfig(ranks=RankPolicy("ratio", 0.5))).layers[0]
    assert lp.kind == "tucker2"
    r4, r3 = lp.ranks  # type: ignore[misc]
    out_hw = 11 * 11
    assert lp.macs_before == cin * (cout // g) * k * hw
    first = cin * r3 * hw  # grouped 1x1: g groups of (cin/g -> r3)
    core = g * r3 * r4 * k * hw
    last = g * r4 * (cout // g) * out_hw
    assert lp.macs_after == first + core + last
    assert lp.params_before == cin * (cout // g) * k
    assert lp.params_after == cin * r3 + g * r3 * r4 * k + r4 * cout


def test_reduced_rank_output_error_matches_the_kernel_error() -> None:
    """At truncated ranks the rewritten model computes exactly the reconstructed kernel: compare the
    compressed model with a ConvTranspose whose weight is the reconstruction."""
    rng = np.random.default_rng(3)
    model = make_convt_model(cin=16, cout=16, strides=[2, 2], seed=3)
    res = ot.compress(model, CompressionConfig(ranks=RankPolicy("ratio", 0.5), validate=False))
    init = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    first, core, last = res.model.graph.node
    u_in_t = init[first.input[1]][:, :, 0, 0]  # R3 x S
    c = init[core.input[1]]  # R3 x R4 x k x k (ConvTranspose layout)
    u_out = init[last.input[1]][:, :, 0, 0]  # T x R4
    w = np.einsum("as,abhw,tb->sthw", u_in_t, c, u_out)  # back to C_in x C_out x k x k
    ref = make_convt_model(cin=16, cout=16, strides=[2, 2], seed=3, weight=w.astype(np.float32))
    ref.graph.initializer[1].CopyFrom(model.graph.initializer[1])  # the same bias B
    feeds = random_feeds(model, seed=int(rng.integers(100)))
    a, b = run_ort(ref, feeds)["y"], run_ort(res.model, feeds)["y"]
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    orig = run_ort(model, feeds)["y"]
    assert float(np.max(np.abs(orig - b))) > 1e-3  # truncation really changed the function


def test_depthwise_and_bad_groups_are_kept_with_reasons() -> None:
    dw = make_convt_model(cin=8, cout=8, group=8)
    (lp,) = ot.plan(dw, CompressionConfig()).layers
    assert lp.kind == "skip" and "depthwise transposed conv" in (lp.reason or "")


def test_pytorch_decoder_exported_with_external_data(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A small PyTorch decoder (ConvTranspose2d with output_padding, grouped, and a 1x1 head) exported
    by the TorchScript exporter at opset 17 and saved with external data: compressed from the file
    (weights read lazily), full ranks reproduce it in onnxruntime."""
    torch = pytest.importorskip("torch")
    import warnings

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.ConvTranspose2d(32, 16, 3, stride=2, padding=1, output_padding=1),
        torch.nn.ReLU(),
        torch.nn.ConvTranspose2d(16, 16, 4, stride=2, padding=1, groups=2),
        torch.nn.ReLU(),
        torch.nn.ConvTranspose2d(16, 3, 1),
    ).eval()
    path = tmp_path / "decoder.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 32, 6, 6),), str(path), opset_version=17, dynamo=False,
                          input_names=["z"], output_names=["img"], dynamic_axes={"z": {0: "batch"}})
    m = onnx.load(str(path))
    onnx.save(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="decoder.data",
              size_threshold=0)
    out = tmp_path / "decoder.tucker.onnx"
    res = ot.compress(path, CompressionConfig(ranks=RankPolicy("full")), output=out)
    assert res.validation is not None and res.validation.passed, res.validation
    assert [lp.op_type for lp in res.plan.layers] == ["ConvTranspose"] * 3
    assert [lp.kind for lp in res.plan.layers] == ["tucker2", "tucker2", "tucker1"]
    feeds = {"z": np.random.default_rng(0).standard_normal((2, 32, 6, 6)).astype(np.float32)}
    new = onnx.load(str(out))
    a, b = run_ort(onnx.load(str(path)), feeds)["img"], run_ort(new, feeds)["img"]
    assert a.shape == b.shape == (2, 3, 24, 24)
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(a))))
