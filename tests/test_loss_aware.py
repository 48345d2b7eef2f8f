"""Loss-aware layer weights (`compress --ranks data:F --calibrate DATA --loss-aware`,
training/lossaware.py): a layer whose output reaches the model's output amplified gets the larger
weight under both estimators, the weights steer the MAC allocation, and the options are checked."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("torch")
if importlib.util.find_spec("onnx2torch") is None:
    pytest.skip("onnx2torch is not installed (pip install -e '.[finetune]')", allow_module_level=True)

from onnx_tucker import api  # noqa: E402
from onnx_tucker.config import CompressionConfig  # noqa: E402
from onnx_tucker.errors import UsageError  # noqa: E402
from onnx_tucker.training.lossaware import LayerTensor, loss_weights  # noqa: E402

LOUD, QUIET = 10.0, 0.1


def two_branches(classes: bool, seed: int = 0) -> onnx.ModelProto:
    """x -> convA * LOUD + convB * QUIET (-> global pool -> class scores when `classes`): the same
    kind of layer twice, one amplified towards the output and one damped."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 8, 3, 3)).astype(np.float32) * 0.2, name=n) for n in ("wa", "wb")]
    inits += [numpy_helper.from_array(np.array(v, dtype=np.float32), name=n) for n, v in (("loud", LOUD), ("quiet", QUIET))]
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["ya"], name="convA", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "wb"], ["yb"], name="convB", pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["ya", "loud"], ["sa"], name="mulA"),
        helper.make_node("Mul", ["yb", "quiet"], ["sb"], name="mulB"),
        helper.make_node("Add", ["sa", "sb"], ["s" if classes else "y"], name="add"),
    ]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16] if classes else ["N", 16, 8, 8])
    if classes:
        nodes += [helper.make_node("GlobalAveragePool", ["s"], ["g"], name="gap"),
                  helper.make_node("Flatten", ["g"], ["y"], name="flat")]
    graph = helper.make_graph(nodes, "two_branches", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 8, 8])],
                              [out], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def batches(n: int = 32, seed: int = 1) -> list[dict[str, np.ndarray]]:
    x = np.random.default_rng(seed).standard_normal((n, 8, 8, 8)).astype(np.float32)
    return [{"x": x[i : i + 8]} for i in range(0, n, 8)]


LAYERS = [LayerTensor("convA", "ya", 1), LayerTensor("convB", "yb", 1)]


@pytest.mark.parametrize("classes", [False, True], ids=["outputs", "class-scores"])
@pytest.mark.parametrize("method", ["probe", "fisher"])
def test_the_amplified_layer_weighs_more(classes: bool, method: str) -> None:
    w = loss_weights(two_branches(classes), LAYERS, batches(), method=method, images=32)
    assert w.method == method and w.loss == ("kl" if classes else "mse") and w.images == 32
    assert not w.missing
    assert np.mean(list(w.weights.values())) == pytest.approx(1.0)
    # The output sees convA's error (LOUD / QUIET)^2 = 1e4 times louder than convB's (exactly so for
    # the plain outputs; through a softmax a few orders of magnitude still).
    ratio = w.raw["convA"] / w.raw["convB"]
    assert ratio > (3e3 if not classes else 30.0), ratio
    if not classes:
        assert ratio == pytest.approx((LOUD / QUIET) ** 2, rel=0.3 if method == "probe" else 0.5)


def test_probe_error_is_the_projection_of_its_rank() -> None:
    w = loss_weights(two_branches(False), LAYERS, batches(), method="probe", probe_error=0.3)
    for k in ("convA", "convB"):
        assert 0.0 < w.probe_errors[k] <= 0.3  # the least rank at or under the asked error


def test_an_output_not_in_the_model_keeps_weight_one() -> None:
    w = loss_weights(two_branches(False), [*LAYERS, LayerTensor("ghost", "nowhere", 1)], batches())
    assert w.weights["ghost"] == 1.0 and "nowhere" in w.missing["ghost"]


def test_the_weights_steer_the_allocation(tmp_path) -> None:  # type: ignore[no-untyped-def]
    x = np.concatenate([b["x"] for b in batches(64)])
    np.savez(tmp_path / "cal.npz", x=x)
    model = two_branches(False)
    cfg = dict(ranks="data:0.5", validate=False, calibrate=str(tmp_path / "cal.npz"), kind="tucker1")
    plain = api.compress(model, CompressionConfig(**cfg))  # type: ignore[arg-type]
    aware = api.compress(model, CompressionConfig(**cfg, loss_aware=True))  # type: ignore[arg-type]

    def macs(res, name):  # type: ignore[no-untyped-def]
        layer = next(lp for lp in res.plan.layers if lp.name == name)
        return layer.macs_after if layer.decomposed else layer.macs_before

    # Both branches look alike to plain data:F; weighted, the loud one keeps more of its MACs.
    assert macs(aware, "convA") > macs(plain, "convA")
    assert macs(aware, "convB") < macs(plain, "convB")
    note = next(lp.reason for lp in aware.plan.layers if lp.name == "convA") or ""
    assert "loss-aware weight" in note


def test_options_are_checked() -> None:
    with pytest.raises(UsageError, match="--calibrate"):
        CompressionConfig(loss_aware=True)  # type: ignore[call-arg]
    with pytest.raises(UsageError, match="allocated on the calibration data"):
        api.plan(two_branches(False), CompressionConfig(calibrate="x.npz", ranks="vbmf", loss_aware=True))  # type: ignore[call-arg]
    with pytest.raises(UsageError, match="probe or fisher"):
        CompressionConfig(calibrate="x.npz", ranks="data:0.5", loss_aware=True, loss_aware_method="hessian")  # type: ignore[call-arg]
    with pytest.raises(UsageError, match="method"):
        loss_weights(two_branches(False), LAYERS, batches(), method="hessian")
