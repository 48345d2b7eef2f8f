"""Per-output-channel weights in the refit (`compress --calibrate DATA --refit-weights fisher`,
issue 19 item 3) and `--kind` as a list: the weighted fit is the weighted optimum (checked against a
direct weighted reduced-rank regression), uniform weights change nothing, the refit never worsens
its weighted objective, the Fisher weights single out the channel the output depends on, and the
kind list restricts what the planner and the data path offer."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_tucker import api
from onnx_tucker.calibration.calibrate import CalibrationOptions, calibrate_model
from onnx_tucker.config import CompressionConfig, RankPolicy
from onnx_tucker.errors import UsageError
from onnx_tucker.graph.rewrite import apply_replacements
from onnx_tucker.graph.source import SourceModel
from onnx_tucker.numerics import refit
from onnx_tucker.planning.stage import plan_and_decompose
from tests.helpers import make_small_cnn, run_ort

HAS_TORCH = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("onnx2torch") is not None


def _stats(p: np.ndarray, y: np.ndarray) -> refit.GramStats:
    st = refit.GramStats(p.shape[1], y.shape[1])
    st.add(p, y)
    return st


@pytest.mark.parametrize("intercept", [False, True])
def test_scaled_targets_give_the_weighted_reduced_rank_optimum(intercept: bool, rng: np.random.Generator) -> None:
    m, d, t, r = 400, 12, 9, 3
    p = rng.standard_normal((m, d))
    y = p @ rng.standard_normal((d, t)) + 0.3 * rng.standard_normal((m, t)) + (2.0 if intercept else 0.0)
    w = rng.uniform(0.05, 20.0, t)
    s = np.sqrt(w)
    st = _stats(p, y)
    front, last, b = refit.fit_reduced_rank(st.scaled_targets(s), r, intercept, ridge=0.0)
    fit = p @ front @ (last / s) + b / s
    # Direct: the least-squares fit in the weighted space, truncated to rank r by its SVD.
    pc, yc = (p - p.mean(0), y - y.mean(0)) if intercept else (p, y)
    ws = np.linalg.lstsq(pc, yc * s, rcond=None)[0]
    u, sv, vt = np.linalg.svd(pc @ ws, full_matrices=False)
    direct = ((u[:, :r] * sv[:r]) @ vt[:r]) / s + (y.mean(0) if intercept else 0.0)
    np.testing.assert_allclose(fit, direct, rtol=1e-6, atol=1e-6)

    def weighted(f: np.ndarray) -> float:
        return float(((y - f) ** 2 * w).sum())

    fr0, la0, b0 = refit.fit_reduced_rank(st, r, intercept, ridge=0.0)
    plain = p @ fr0 @ la0 + b0
    assert weighted(fit) < weighted(plain) * (1 - 1e-3)  # weights that differ move the fit
    assert float(((y - plain) ** 2).sum()) <= float(((y - fit) ** 2).sum()) * (1 + 1e-9)  # and cost plain error


def test_uniform_weights_change_nothing(rng: np.random.Generator) -> None:
    model = make_small_cnn(batch="N", c1=12, c2=16, spatial=(8, 8), seed=3)
    cfg = CompressionConfig(ranks=RankPolicy.parse("ratio:0.4"), validate=False)
    source = SourceModel.load(model, cfg.input_shapes)
    reps = plan_and_decompose(source, cfg).replacements
    x = np.maximum(rng.standard_normal((64, 3, 8, 8)), -0.5).astype(np.float32)
    batches = [{"x": x[i : i + 16]} for i in range(0, 64, 16)]
    plain, ones = apply_replacements(model, reps), apply_replacements(model, reps)
    calibrate_model(model, plain, reps, batches, CalibrationOptions(rows=10**9))
    weights = {r.layer.layer_id: np.ones(int(r.layer.weight_shape[0])) for r in reps.values()}
    found = calibrate_model(model, ones, reps, batches, CalibrationOptions(rows=10**9, channel_weights=weights))
    np.testing.assert_allclose(run_ort(ones, {"x": x})["logits"], run_ort(plain, {"x": x})["logits"], rtol=1e-5, atol=1e-5)
    assert all("Fisher" in (c.note or "") for c in found.values())


def test_the_weighted_refit_never_worsens_its_weighted_objective(rng: np.random.Generator) -> None:
    """Each refit layer, weighted: sum_c w_c ||y_c - y_orig,c||^2 (its input from the calibrated model)
    after the refit is at most that of its one-shot factors, and below the unweighted refit's."""
    model = make_small_cnn(batch="N", c1=12, c2=16, spatial=(8, 8), seed=5)
    cfg = CompressionConfig(ranks=RankPolicy.parse("ratio:0.3"), validate=False)
    source = SourceModel.load(model, cfg.input_shapes)
    reps = plan_and_decompose(source, cfg).replacements
    first = min(reps)
    rep = reps[first]
    t = int(rep.layer.weight_shape[0])
    w = np.full(t, 0.02)
    w[: t // 3] = 30.0  # a third of the channels matter
    x = np.maximum(rng.standard_normal((96, 3, 8, 8)), -0.5).astype(np.float32)
    batches = [{"x": x[i : i + 16]} for i in range(0, 96, 16)]
    one_shot = apply_replacements(model, {first: rep})
    weighted, plain = copy.deepcopy(one_shot), copy.deepcopy(one_shot)
    calibrate_model(model, weighted, {first: rep}, batches,
                    CalibrationOptions(rows=10**9, channel_weights={rep.layer.layer_id: w}))
    calibrate_model(model, plain, {first: rep}, batches, CalibrationOptions(rows=10**9))
    y_name = model.graph.node[first].output[0]

    def err(m: onnx.ModelProto) -> float:
        from onnx_tucker.graph.probe import expose_outputs

        ref = run_ort(expose_outputs(model, [y_name]), {"x": x})[y_name].astype(np.float64)
        got = run_ort(expose_outputs(m, [y_name]), {"x": x})[y_name].astype(np.float64)
        return float((((got - ref) ** 2).sum(axis=(0, 2, 3)) * w).sum())

    assert err(weighted) <= err(one_shot) * (1 + 1e-5)
    assert err(weighted) < err(plain) * 0.98, (err(weighted), err(plain))


def _loud_channel_model() -> onnx.ModelProto:
    """x -> conv (8 -> 6 channels) -> channel 0 x 10, the others x 0.1 -> global pool -> class scores."""
    rng = np.random.default_rng(0)
    scale = np.full((1, 6, 1, 1), 0.1, dtype=np.float32)
    scale[0, 0] = 10.0
    inits = [numpy_helper.from_array((rng.standard_normal((6, 8, 3, 3)) * 0.3).astype(np.float32), "w"),
             numpy_helper.from_array(scale, "scale"),
             numpy_helper.from_array((rng.standard_normal((4, 6)) * 0.5).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["y", "scale"], ["ys"], name="mul"),
             helper.make_node("GlobalAveragePool", ["ys"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fc"], ["logits"], name="head", transB=1)]
    graph = helper.make_graph(nodes, "loud", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 6, 6])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.skipif(not HAS_TORCH, reason="torch / onnx2torch not installed (the finetune extra)")
def test_fisher_weights_single_out_the_channel_the_output_reads() -> None:
    from onnx_tucker.training.lossaware import LayerTensor, channel_weights

    x = np.random.default_rng(1).standard_normal((32, 8, 6, 6)).astype(np.float32)
    cw = channel_weights(_loud_channel_model(), [LayerTensor("conv", "y", 1)], [{"x": x[i : i + 8]} for i in range(0, 32, 8)],
                         images=32, draws=4)
    w = cw.weights["conv"]
    assert w.shape == (6,) and cw.loss == "kl" and not cw.missing
    assert w[0] > 50 * w[1:].max(), w  # (10 / 0.1)^2 = 1e4 in the gradient's square, clipped at 1 / floor
    assert w.min() >= cw.floor and w.max() <= 1 / cw.floor


@pytest.mark.skipif(not HAS_TORCH, reason="torch / onnx2torch not installed (the finetune extra)")
def test_compress_with_fisher_refit_weights_reports_them(tmp_path: Path, rng: np.random.Generator) -> None:
    model = make_small_cnn(batch="N", c1=12, c2=16, spatial=(8, 8), seed=3)
    cal = tmp_path / "cal.npz"
    np.savez(cal, x=np.maximum(rng.standard_normal((80, 3, 8, 8)), -0.5).astype(np.float32))
    result = api.compress(model, CompressionConfig(ranks=RankPolicy.parse("ratio:0.4"), validate=False,
                                                   calibrate=str(cal), refit_weights="fisher"))  # type: ignore[call-arg]
    assert result.calibration is not None and result.calibration.channel_weights is not None
    assert result.calibration.channel_weights.weights
    notes = [lc.note or "" for lc in result.layer_calibration.values()]
    assert notes and all("Fisher" in n for n in notes if n), notes


def test_refit_weights_option_is_checked() -> None:
    with pytest.raises(UsageError, match="--refit-weights"):
        CompressionConfig(refit_weights="hessian", calibrate="x.npz")  # type: ignore[call-arg]
    with pytest.raises(UsageError, match="add --calibrate"):
        CompressionConfig(refit_weights="fisher")  # type: ignore[call-arg]


# ---- --kind as a list -----------------------------------------------------------------------------

def test_kind_list_is_checked_and_parsed() -> None:
    cfg = CompressionConfig(kind="tucker2, spatial-svd")  # type: ignore[call-arg]
    assert cfg.kind is not None
    with pytest.raises(UsageError, match="'block-term' is not a decomposition"):
        CompressionConfig(kind="tucker2,block-term")  # type: ignore[call-arg]
    with pytest.raises(UsageError, match="not a decomposition"):
        CompressionConfig(kind=",")  # type: ignore[call-arg]


def test_the_planner_takes_the_first_listed_kind_a_layer_allows() -> None:
    model = make_small_cnn(batch="N", c1=12, c2=16, spatial=(8, 8))
    plan = api.plan(model, CompressionConfig(kind="cp,svd", ranks=RankPolicy.parse("ratio:0.2")))  # type: ignore[call-arg]
    kinds = {p.name: p.kind for p in plan.layers}
    convs = [k for n, k in kinds.items() if "conv" in n.lower()]
    assert convs and all(k == "cp" for k in convs), kinds  # convs allow cp; the Gemm does not: svd
    assert any(k == "svd" for n, k in kinds.items() if "fc" in n.lower()), kinds


def test_the_data_path_offers_only_the_listed_kinds(tmp_path: Path, rng: np.random.Generator) -> None:
    model = make_small_cnn(batch="N", c1=12, c2=16, spatial=(8, 8), seed=2)
    cal = tmp_path / "cal.npz"
    np.savez(cal, x=rng.standard_normal((64, 3, 8, 8)).astype(np.float32))
    plan = api.plan(model, CompressionConfig(ranks=RankPolicy.parse("data:0.6"), calibrate=str(cal),  # type: ignore[call-arg]
                                             kind="tucker2,tucker1,svd"))
    chosen = {p.kind for p in plan.layers if p.kind != "skip"}
    assert chosen and chosen <= {"tucker2", "tucker1", "svd"}, chosen
