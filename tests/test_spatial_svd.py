"""Spatial SVD (AIMET's): a kh x kw conv S->T as a kh x 1 conv S->R then a 1 x kw conv R->T (issue 19).

Exact at full rank in onnxruntime over strides, pads (asymmetric too), dilations, groups and auto_pad;
its cost against the tensors the chain really computes; its data-driven error curve against a direct
least-squares refit; calibration refits its 1 x kw factor; and `--ranks data:F` chooses it over
Tucker-2 / Tucker-1 where it loses less at the same MACs (brute force on a tiny model).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_tucker import api
from onnx_tucker.calibration.calibrate import CalibrationOptions, calibrate_model
from onnx_tucker.config import CompressionConfig, RankPolicy
from onnx_tucker.errors import UsageError
from onnx_tucker.graph.probe import expose_outputs
from onnx_tucker.graph.rewrite import apply_replacements
from onnx_tucker.graph.source import SourceModel
from onnx_tucker.numerics import rankalloc, refit
from onnx_tucker.numerics.tucker import reconstruct_spatial_svd, spatial_svd, spatial_unfold
from onnx_tucker.planning.stage import plan_and_decompose
from tests.helpers import (
    CONV_CONFIGS_2D,
    assert_outputs_close,
    initializer,
    make_conv_model,
    node_attrs,
    replace_ranks,
    run_ort,
    single_layer_candidates,
)

SPATIAL = CompressionConfig(ranks=RankPolicy("full"), kind="spatial-svd", validate=False)

CONFIGS = CONV_CONFIGS_2D


def _decomposed(model: onnx.ModelProto, config: CompressionConfig):  # type: ignore[no-untyped-def]
    source = SourceModel.load(model, config.input_shapes)
    d = plan_and_decompose(source, config)
    return source, d.plan, d.replacements


@pytest.mark.parametrize("kw", CONFIGS, ids=[str(i) for i in range(len(CONFIGS))])
def test_full_rank_spatial_svd_is_the_original_conv_in_onnxruntime(kw: dict) -> None:
    args = dict(T=8, S=6, spatial=(11, 10), seed=1) | kw
    model = make_conv_model(**args)  # type: ignore[arg-type]
    res = api.compress(model, SPATIAL)
    (lp,) = res.plan.layers
    kh, kw_ = args.get("kernel", (3, 3))  # type: ignore[misc]
    g = int(args.get("group", 1))  # type: ignore[call-overload]
    t, s = int(args["T"]), int(args["S"]) // g  # type: ignore[call-overload]
    assert lp.kind == "spatial-svd" and lp.ranks == (min(s * kh, t // g * kw_),)
    nodes = list(res.model.graph.node)
    assert [initializer(res.model, n.input[1]).shape[2:] for n in nodes] == [(kh, 1), (1, kw_)]
    assert all(node_attrs(n).get("group", 1) == g for n in nodes)
    assert assert_outputs_close(model, res.model, rtol=2e-5, batch=int(args.get("batch", 1))) < 2e-5  # type: ignore[call-overload]


def test_spatial_svd_numerics_recover_a_separable_kernel_and_truncate_optimally() -> None:
    rng = np.random.default_rng(0)
    t, s, kh, kw, r = 7, 5, 3, 4, 2
    v, h = rng.standard_normal((r, s, kh)), rng.standard_normal((t, r, kw))
    w = np.einsum("trj,rsi->tsij", h, v)
    f = spatial_svd(w, r)
    assert f.vertical.shape == (r, s, kh, 1) and f.horizontal.shape == (t, r, 1, kw)
    np.testing.assert_allclose(reconstruct_spatial_svd(f), w, atol=1e-10)
    assert f.rel_error is not None and f.rel_error < 1e-7
    # A generic kernel at rank 3: the Eckart-Young error of the rearranged (S*kh) x (T*kw) matrix.
    w = rng.standard_normal((t, s, kh, kw))
    sv = np.linalg.svd(spatial_unfold(w), compute_uv=False)
    f = spatial_svd(w, 3)
    err = np.linalg.norm(reconstruct_spatial_svd(f) - w) / np.linalg.norm(w)
    assert err == pytest.approx(math.sqrt(np.sum(sv[3:] ** 2) / np.sum(sv**2)), rel=1e-9)
    assert f.rel_error == pytest.approx(err, rel=1e-6)


@pytest.mark.parametrize("kw", [dict(), dict(strides=(2, 2), pads=(1, 0, 2, 1)), dict(group=2, auto_pad="SAME_UPPER", strides=(1, 2)),
                                dict(dilations=(2, 1), pads=(2, 1, 2, 1), kernel=(3, 5))])
def test_cost_is_the_arithmetic_of_the_tensors_the_chain_computes(kw: dict) -> None:
    """Parameters = the written factors; MACs = each factor's weight size x the pixels of the tensor it
    writes, read from onnxruntime (the intermediate: output height x input width)."""
    args = dict(T=16, S=12, spatial=(13, 11), batch=2) | kw
    model = make_conv_model(**args)  # type: ignore[arg-type]
    res = api.compress(model, replace_ranks(SPATIAL, "ratio:0.2"))  # a width stride: the intermediate is wide
    (lp,) = res.plan.layers
    assert lp.kind == "spatial-svd"
    nodes = list(res.model.graph.node)
    feeds = {"x": np.zeros((2, 12, 13, 11), np.float32)}
    outs = run_ort(expose_outputs(res.model, [nodes[0].output[0], "y"]), feeds)
    mid, y = outs[nodes[0].output[0]], outs["y"]
    sizes = [initializer(res.model, n.input[1]).size for n in nodes]
    assert lp.params_after == sum(sizes)
    assert mid.shape[2:] == (y.shape[2], 11)  # output height x input width
    assert lp.macs_after == sizes[0] * 2 * mid.shape[2] * mid.shape[3] + sizes[1] * 2 * y.shape[2] * y.shape[3]
    assert lp.macs_before == initializer(model, "W").size * 2 * y.shape[2] * y.shape[3]



@pytest.mark.parametrize("intercept", [False, True])
def test_spatial_error_curve_is_the_refit_of_the_last_factor(intercept: bool) -> None:
    """`spatial_svd_tails` (one Cholesky for every rank) against a direct ridge fit of the 1 x kw factor
    on the k x 1 factor's output, rank by rank."""
    rng = np.random.default_rng(3)
    s, kh, kw, t, n = 4, 3, 2, 5, 400
    p = rng.standard_normal((n, s * kh * kw)) + (0.7 if intercept else 0.0)
    w = rng.standard_normal((s * kh * kw, t))
    stats = refit.GramStats(p.shape[1], t)
    stats.add(p, p @ w + 0.3)
    basis = rng.standard_normal((6, s * kh))
    tails = rankalloc.spatial_svd_tails(stats, basis, kw, intercept, ridge=1e-12)
    assert tails[0] == pytest.approx(float(np.trace(stats.centred(intercept)[2])))
    for r in range(1, 7):
        q = stats.projected(refit.spatial_front(basis[:r], kw))
        la, b = refit.fit_ridge(q, intercept, 1e-12)
        assert tails[r] == pytest.approx(refit.residual(q, la, b), rel=1e-6, abs=1e-8)
    np.testing.assert_array_equal(refit.spatial_basis(refit.spatial_front(basis, kw), kw), basis)


def test_calibration_refits_the_last_factor_exactly_and_never_worse() -> None:
    rng = np.random.default_rng(0)
    model = make_conv_model(T=8, S=8, strides=(2, 2), pads=(1, 0, 2, 1), group=2, spatial=(9, 9))
    x = rng.standard_normal((48, 8, 9, 9)).astype(np.float32)
    batches = [{"x": x[i : i + 1]} for i in range(48)]
    want = np.concatenate([run_ort(model, b)["y"] for b in batches[:6]])

    def err(m: onnx.ModelProto) -> float:
        got = np.concatenate([run_ort(m, b)["y"] for b in batches[:6]])
        return float(np.linalg.norm(got - want) / np.linalg.norm(want))

    # Full rank, the 1 x kw factor knocked off: the refit finds the layer again.
    _, _, reps = _decomposed(model, SPATIAL)
    (i, rep), = reps.items()
    arrs = list(rep.factors.arrays)
    arrs[1] = arrs[1] + 0.5 * np.std(arrs[1]) * rng.standard_normal(arrs[1].shape)
    bad = {i: type(rep)(rep.layer, type(rep.factors)(rep.factors.kind, tuple(arrs), rep.factors.rel_error))}
    comp = apply_replacements(model, bad)
    assert err(comp) > 0.1
    found = calibrate_model(model, comp, bad, batches, CalibrationOptions(rows=10**9))
    assert found["conv"].method in ("last", "data") and err(comp) < 1e-3
    assert "1 x k factor" in (found["conv"].note or "")
    # Reduced rank: never worse than the factors as decomposed, under each method.
    _, _, reps = _decomposed(model, replace_ranks(SPATIAL, "ratio:0.25"))
    assert len(reps) == 1
    one_shot = apply_replacements(model, reps)
    for method in ("last", "full"):
        comp = copy.deepcopy(one_shot)
        found = calibrate_model(model, comp, reps, batches, CalibrationOptions(method=method, rows=10**9))
        assert err(comp) <= err(one_shot) * (1 + 1e-6)
        c = found["conv"]
        assert c.error_after is not None and c.error_before is not None and c.error_after <= c.error_before


def _separable_model() -> onnx.ModelProto:
    """A 3x3 conv 16 -> 16 whose kernel is spatially separable at rank 3, (S*kh) x (T*kw) = 48 x 48,
    while both Tucker unfoldings are full rank: spatial SVD at rank 3 is exact and cheap."""
    rng = np.random.default_rng(5)
    v, h = rng.standard_normal((3, 16, 3)), rng.standard_normal((16, 3, 3))
    w = np.einsum("trj,rsi->tsij", h, v)
    w = (w / np.linalg.norm(w) * 4).astype(np.float32)
    return make_conv_model(T=16, S=16, pads=(1, 1, 1, 1), spatial=(12, 12), batch="N", weight=w)  # type: ignore[arg-type]


def test_data_ranks_choose_the_kind_against_brute_force(tmp_path: Path) -> None:
    """On a spatially separable conv, `data:0.3` picks spatial SVD (exact at rank 3); the chosen candidate
    is the least error any candidate of any kind reaches within the budget (brute force over the
    candidates), and the compressed model is exact."""
    model = _separable_model()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((32, 16, 12, 12)).astype(np.float32)
    cal = tmp_path / "cal.npz"
    np.savez(cal, x=x)
    res = api.compress(model, CompressionConfig(ranks=RankPolicy.parse("data:0.3"), calibrate=str(cal), validate=False))
    (lp,) = res.plan.layers
    assert lp.kind == "spatial-svd" and lp.ranks is not None and lp.ranks[0] >= 3
    assert res.totals.macs_after <= 0.3 * res.totals.macs_before
    held = rng.standard_normal((4, 16, 12, 12)).astype(np.float32)
    want, got = run_ort(model, {"x": held})["y"], run_ort(res.model, {"x": held})["y"]
    assert float(np.linalg.norm(got - want) / np.linalg.norm(want)) < 1e-3
    # Brute force over the layer's candidates at the same budget.
    cov, _, cands = single_layer_candidates(model, x)
    assert cov.spatial
    assert {c.kind for c in cands} == {"original", "tucker2", "tucker1", "tucker1-in", "spatial-svd", "cp"}
    budget = 0.3 * int(lp.macs_before or 0)
    best = min((c for c in cands if c.macs <= budget), key=lambda c: c.error)
    # ~1e-4: the ridge objective (rss + lambda ||w||^2, lambda 1e-4 of the mean variance) of an exact fit.
    assert best.kind == "spatial-svd" and best.error < 1e-3
    for kind in ("tucker2", "tucker1", "tucker1-in"):  # the other kinds lose a lot at these MACs
        assert min(c.error for c in cands if c.kind == kind and c.macs <= budget) > 0.05
    # --kind tucker2 keeps the data path to that kind.
    forced = api.compress(model, CompressionConfig(ranks=RankPolicy.parse("data:0.3"), calibrate=str(cal),
                                                   validate=False, kind="tucker2"))
    assert forced.plan.layers[0].kind == "tucker2"


def test_kind_option_is_checked_and_only_applies_where_the_layer_allows_it() -> None:
    with pytest.raises(UsageError, match="--kind block-term"):
        CompressionConfig(kind="block-term")
    # A 1x1 conv has no spatial SVD: it keeps its default (SVD).
    res = api.compress(make_conv_model(T=16, S=16, kernel=(1, 1)), replace_ranks(SPATIAL, "ratio:0.3"))
    assert res.plan.layers[0].kind == "svd"


def test_a_spatial_svd_plan_file_replays(tmp_path: Path) -> None:
    model = make_conv_model(T=16, S=12, pads=(1, 1, 1, 1), spatial=(10, 10))
    plan_path = tmp_path / "plan.json"
    first = api.compress(model, CompressionConfig(ranks=RankPolicy.parse("ratio:0.5"), kind="spatial-svd", validate=False))
    plan_path.write_text(first.plan.to_json())
    again = api.compress(model, CompressionConfig(plan_file=str(plan_path), validate=False))
    assert [(lp.kind, lp.ranks) for lp in again.plan.layers] == [(lp.kind, lp.ranks) for lp in first.plan.layers]
    assert first.plan.layers[0].kind == "spatial-svd"


def test_kind_note_names_the_winner_and_the_best_of_each_other_kind_at_no_more_macs() -> None:
    from onnx_tucker.calibration.rankselect import kind_note
    from onnx_tucker.numerics.rankalloc import RankCandidate as C

    cands = [C("original", (), 100, 0.0), C("tucker1", (2,), 40, 0.3), C("tucker1", (4,), 60, 0.1),
             C("spatial-svd", (3,), 50, 0.2), C("tucker2", (5, 5), 70, 0.05)]
    note = kind_note(cands[3], cands)
    assert note == "kind chosen on the data: spatial-svd (3,) error 0.2; at no more MACs tucker1 0.3, tucker2 none"
    assert kind_note(cands[0], cands) == "" and kind_note(cands[1], cands[:3]) == ""
