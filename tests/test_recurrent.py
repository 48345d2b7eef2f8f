"""LSTM and GRU for fine-tuning (issue 20): the converters onnx_tucker registers with onnx2torch equal
onnxruntime on random input (forward, reverse, bidirectional; initial states; GRU linear_before_reset
0 and 1; layout 1), export back to ONNX (dynamo=False, opset 17) equal to onnxruntime of the original,
and what they cannot take is refused naming the node and why."""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tests.helpers import _finish, _init, run_ort

torch = pytest.importorskip("torch")
if importlib.util.find_spec("onnx2torch") is None:
    pytest.skip("onnx2torch is not installed (pip install -e '.[finetune]')", allow_module_level=True)

from onnx_tucker.errors import ModelLoadError  # noqa: E402
from onnx_tucker.training import convert as ftc  # noqa: E402

torch.set_num_threads(1)
T, B, IN, H = 5, 3, 4, 6


def _rnn_model(op: str, direction: str = "forward", states: bool = False, lbr: int = 0, layout: int = 0,
               outputs: tuple[str, ...] = ("Y", "Y_h", "Y_c"), seq_lens: bool = False, seed: int = 0,
               **extra: Any) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    gates, dirs = (4 if op == "LSTM" else 3), (2 if direction == "bidirectional" else 1)
    inits = [_init("W", (0.5 * rng.standard_normal((dirs, gates * H, IN))).astype(np.float32)),
             _init("R", (0.5 * rng.standard_normal((dirs, gates * H, H))).astype(np.float32)),
             _init("B", (0.3 * rng.standard_normal((dirs, 2 * gates * H))).astype(np.float32))]
    x_shape = [T, "N", IN] if layout == 0 else ["N", T, IN]
    s_shape = [dirs, "N", H] if layout == 0 else ["N", dirs, H]
    ins = [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)]
    node_in = ["X", "W", "R", "B", "", ""]
    if seq_lens:
        inits.append(_init("lens", np.full(B, T, np.int32)))
        node_in[4] = "lens"
    if states:
        ins.append(helper.make_tensor_value_info("h0", TensorProto.FLOAT, s_shape))
        node_in[5] = "h0"
        if op == "LSTM":
            ins.append(helper.make_tensor_value_info("c0", TensorProto.FLOAT, s_shape))
            node_in.append("c0")
    outs = [o for o in outputs if op == "LSTM" or o != "Y_c"]
    node_out = [o if o in outs else "" for o in ("Y", "Y_h", "Y_c")[: 3 if op == "LSTM" else 2]]
    while node_out and not node_out[-1]:
        node_out.pop()
    attrs: dict[str, Any] = {"hidden_size": H, "direction": direction, **extra}
    if op == "GRU":
        attrs["linear_before_reset"] = lbr
    if layout:
        attrs["layout"] = layout
    node = helper.make_node(op, node_in, node_out, name=f"{op.lower()}_0", **attrs)
    y_shape = [T, dirs, "N", H] if layout == 0 else ["N", T, dirs, H]
    out_vi = [helper.make_tensor_value_info(o, TensorProto.FLOAT, y_shape if o == "Y" else s_shape) for o in outs]
    return _finish([node], ins, out_vi, inits, opset=14 if layout else 17)


def _feeds(model: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for v in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else B for d in v.type.tensor_type.shape.dim]
        out[v.name] = rng.standard_normal(dims).astype(np.float32)
    return out


def _check(model: onnx.ModelProto) -> onnx.ModelProto:
    feeds = _feeds(model)
    ref = run_ort(model, feeds)
    module, norm = ftc.to_torch(model, "rnn.onnx")
    names = [v.name for v in model.graph.input]
    with torch.no_grad():
        got = module(*[torch.from_numpy(feeds[n]) for n in names])
    got = tuple(got) if isinstance(got, (tuple, list)) else (got,)
    outs = [o.name for o in model.graph.output]
    assert len(got) == len(outs)
    for name, g in zip(outs, got, strict=True):
        np.testing.assert_allclose(g.numpy(), ref[name], rtol=1e-5, atol=1e-5, err_msg=name)
    exported = ftc.export(module, feeds, names, outs, 17, False)
    back = run_ort(exported, feeds)
    for name in outs:
        np.testing.assert_allclose(back[name], ref[name], rtol=1e-5, atol=1e-5, err_msg=f"exported {name}")
    return exported


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("states", [False, True])
def test_lstm_equals_onnxruntime_and_exports_back_as_lstm(direction: str, states: bool) -> None:
    exported = _check(_rnn_model("LSTM", direction, states))
    assert [n.op_type for n in exported.graph.node].count("LSTM") == 1


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("states", [False, True])
@pytest.mark.parametrize("lbr", [0, 1])
def test_gru_equals_onnxruntime_and_exports_back(direction: str, states: bool, lbr: int) -> None:
    exported = _check(_rnn_model("GRU", direction, states, lbr=lbr))
    # torch's GRU is ONNX's linear_before_reset=1: written back as one GRU node; 0 is a loop over time.
    assert [n.op_type for n in exported.graph.node].count("GRU") == lbr


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_batch_first_layout_and_partial_outputs(op: str) -> None:
    # onnxruntime runs no layout=1 recurrence: the reference is the same weights at layout 0, transposed.
    first, ref_model = _rnn_model(op, "bidirectional", True, lbr=1, layout=1), _rnn_model(op, "bidirectional", True, lbr=1)
    feeds = _feeds(ref_model)
    ref = run_ort(ref_model, feeds)
    module, _ = ftc.to_torch(first, "rnn.onnx")
    with torch.no_grad():
        got = module(*[torch.from_numpy(np.ascontiguousarray(np.swapaxes(feeds[v.name], 0, 1))) for v in first.graph.input])
    np.testing.assert_allclose(got[0].numpy(), ref["Y"].transpose(2, 0, 1, 3), rtol=1e-5, atol=1e-5)
    for k, name in enumerate(o.name for o in first.graph.output[1:]):
        np.testing.assert_allclose(got[k + 1].numpy(), np.swapaxes(ref[name], 0, 1), rtol=1e-5, atol=1e-5)
    _check(_rnn_model(op, "forward", outputs=("Y_h",), lbr=1))  # only the last state read
    _check(_rnn_model(op, "reverse", outputs=("Y",), lbr=1))  # a single output: a tensor, not a tuple


def test_a_step_trains_the_recurrent_weights() -> None:
    module, _ = ftc.to_torch(_rnn_model("LSTM", "bidirectional"), "rnn.onnx")
    before = {k: v.detach().clone() for k, v in module.named_parameters()}
    assert len(before) == 8  # W, R and both biases, per direction
    y = module(torch.randn(T, B, IN, generator=torch.Generator().manual_seed(0)))[0]
    y.square().mean().backward()
    torch.optim.SGD(module.parameters(), lr=0.1).step()
    assert all(not torch.equal(before[k], v) for k, v in module.named_parameters())


@pytest.mark.parametrize(("kw", "needle"), [
    ({"seq_lens": True}, "sequence_lens"),
    ({"clip": 3.0}, "clip"),
    ({"input_forget": 1}, "input_forget"),
    ({"activations": ["Sigmoid", "Relu", "Tanh"]}, "activations"),
])
def test_what_cannot_be_converted_is_refused_naming_the_node(kw: dict[str, object], needle: str) -> None:
    with pytest.raises(ModelLoadError) as e:
        ftc.to_torch(_rnn_model("LSTM", **kw), "rnn.onnx")  # type: ignore[arg-type]
    msg = str(e.value)
    assert msg.startswith("rnn.onnx: node 'lstm_0' (LSTM): ") and needle in msg and "\n" not in msg
    assert "please report" not in msg
