"""Tucker-1-in, Tucker-1's mirror: a k x k conv S->T as a 1x1 conv S->R (the input mode projected) then
the k x k conv R->T carrying the strides, pads, dilations, auto_pad and bias (issue 19).

Exact at full rank in onnxruntime over strides, pads, dilations, groups, bias, auto_pad and 1-D / 3-D
kernels; the numerics are the input mode's truncated HOSVD; its cost against the tensors the chain
really computes; its data-driven error curve against a direct least-squares refit (and Tucker-2's at
R4 = T); calibration refits it; `--ranks data:F` chooses it where the input mode is low-rank (brute force
on a tiny model); `--kind tucker1-in`; every chain label is a factor for fine-tuning.
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
from onnx_tucker.numerics.tucker import reconstruct_tucker1_in, tucker1_in, unfold
from onnx_tucker.ops.base import LABELS
from onnx_tucker.planning.stage import plan_and_decompose
from onnx_tucker.training.convert import FACTOR_MODULE
from tests.helpers import (
    CONV_CONFIGS_2D,
    assert_outputs_close,
    initializer,
    low_rank_kernel,
    make_conv_model,
    node_attrs,
    replace_ranks,
    run_ort,
    single_layer_candidates,
)

MIRROR = CompressionConfig(ranks=RankPolicy("full"), kind="tucker1-in", validate=False)

CONFIGS = [
    *CONV_CONFIGS_2D,
    dict(kernel=(5,), spatial=(17,), strides=(2,), pads=(2, 1)),  # 1-D
    dict(kernel=(3, 3, 3), spatial=(6, 7, 5), pads=(1, 1, 1, 1, 1, 1), group=2),  # 3-D
]


@pytest.mark.parametrize("kw", CONFIGS, ids=[str(i) for i in range(len(CONFIGS))])
def test_full_rank_tucker1_in_is_the_original_conv_in_onnxruntime(kw: dict) -> None:
    args = dict(T=8, S=6, spatial=(11, 10), seed=1) | kw
    model = make_conv_model(**args)  # type: ignore[arg-type]
    res = api.compress(model, MIRROR)
    (lp,) = res.plan.layers
    kernel = tuple(args.get("kernel", (3, 3)))  # type: ignore[call-overload]
    g = int(args.get("group", 1))  # type: ignore[call-overload]
    s = int(args["S"]) // g  # type: ignore[call-overload]
    assert lp.kind == "tucker1-in" and lp.ranks == (s,)
    first, core = res.model.graph.node
    assert [first.name, core.name] == ["conv/tucker_first", "conv/tucker_core"]
    assert initializer(res.model, first.input[1]).shape == (g * s, s, *(1,) * len(kernel))
    assert initializer(res.model, core.input[1]).shape == (int(args["T"]), s, *kernel)  # type: ignore[call-overload]
    # The 1x1 runs at the input resolution with nothing but the group; the core carries the rest and the bias.
    assert set(node_attrs(first)) <= {"kernel_shape", "group"}
    assert len(core.input) == (3 if args.get("bias", True) else 2)
    assert all(node_attrs(n).get("group", 1) == g for n in (first, core))
    assert assert_outputs_close(model, res.model, rtol=2e-5, batch=int(args.get("batch", 1))) < 2e-5  # type: ignore[call-overload]


def test_numerics_recover_a_low_rank_input_mode_and_truncate_optimally() -> None:
    rng = np.random.default_rng(0)
    t, s, r = 5, 12, 3
    core, u = rng.standard_normal((t, r, 3, 3)), rng.standard_normal((s, r))
    w = np.einsum("trij,sr->tsij", core, u)
    f = tucker1_in(w, r)
    assert f.core.shape == (t, r, 3, 3) and f.u_in.shape == (s, r)
    np.testing.assert_allclose(f.u_in.T @ f.u_in, np.eye(r), atol=1e-10)
    np.testing.assert_allclose(reconstruct_tucker1_in(f), w, atol=1e-10)
    # A generic kernel at rank 4: the Eckart-Young error of the input (mode-1) unfolding.
    w = rng.standard_normal((t, s, 3, 2))
    sv = np.linalg.svd(unfold(w, 1), compute_uv=False)
    err = np.linalg.norm(reconstruct_tucker1_in(tucker1_in(w, 4)) - w) / np.linalg.norm(w)
    assert err == pytest.approx(math.sqrt(np.sum(sv[4:] ** 2) / np.sum(sv**2)), rel=1e-9)


def test_grouped_layers_are_decomposed_group_by_group() -> None:
    """Each group's block is its own Tucker-1-in: the first factor block-diagonal (group=G), the core
    grouped, and the error is the groups' errors combined."""
    model = make_conv_model(T=8, S=12, group=2, pads=(1, 1, 1, 1), seed=3)
    res = api.compress(model, replace_ranks(MIRROR, "ratio:0.5"))
    (lp,) = res.plan.layers
    (r,) = lp.ranks or ()
    w = initializer(model, "W").astype(np.float64)
    first = initializer(res.model, res.model.graph.node[0].input[1]).astype(np.float64)
    core = initializer(res.model, res.model.graph.node[1].input[1]).astype(np.float64)
    sq = 0.0
    for k in range(2):
        block = w[4 * k : 4 * (k + 1)]
        want = reconstruct_tucker1_in(tucker1_in(block, r))
        got = np.einsum("trij,rs->tsij", core[4 * k : 4 * (k + 1)], first[r * k : r * (k + 1), :, 0, 0])
        np.testing.assert_allclose(got, want, atol=1e-5)
        sq += float(np.sum((want - block) ** 2))
    assert lp.rel_error == pytest.approx(math.sqrt(sq / float(np.sum(w**2))), rel=1e-4)


@pytest.mark.parametrize("kw", [dict(), dict(strides=(2, 2), pads=(1, 0, 2, 1)), dict(group=2, auto_pad="SAME_UPPER", strides=(1, 2)),
                                dict(dilations=(2, 1), pads=(2, 1, 2, 1), kernel=(3, 5)), dict(kernel=(3,), spatial=(15,), strides=(2,))])
def test_cost_is_the_arithmetic_of_the_tensors_the_chain_computes(kw: dict) -> None:
    """Parameters = the written factors; MACs = each factor's weight size x the pixels of the tensor it
    writes, read from onnxruntime (the 1x1 at the input resolution, the core at the output's)."""
    args = dict(T=12, S=16, spatial=(13, 11), batch=2) | kw
    model = make_conv_model(**args)  # type: ignore[arg-type]
    res = api.compress(model, replace_ranks(MIRROR, "ratio:0.25"))
    (lp,) = res.plan.layers
    assert lp.kind == "tucker1-in" and lp.ranks is not None
    nodes = list(res.model.graph.node)
    spatial = tuple(args["spatial"])  # type: ignore[arg-type]
    feeds = {"x": np.zeros((2, 16, *spatial), np.float32)}
    outs = run_ort(expose_outputs(res.model, [nodes[0].output[0], "y"]), feeds)
    mid, y = outs[nodes[0].output[0]], outs["y"]
    sizes = [initializer(res.model, n.input[1]).size for n in nodes]
    assert lp.params_after == sum(sizes)
    assert mid.shape[2:] == spatial  # the input resolution
    assert lp.macs_after == sizes[0] * mid[0, 0].size * 2 + sizes[1] * y[0, 0].size * 2
    # The formula: G*S*R at the input resolution plus R*T*k at the output's.
    g, (r,) = int(args.get("group", 1)), lp.ranks  # type: ignore[call-overload]
    k = math.prod(args.get("kernel", (3, 3)))  # type: ignore[arg-type]
    assert lp.macs_after == 2 * (g * (16 // g) * r * math.prod(spatial) + r * 12 * k * y[0, 0].size)
    assert lp.macs_before == initializer(model, "W").size * 2 * y[0, 0].size


@pytest.mark.parametrize("intercept", [False, True])
def test_error_curve_is_the_refit_of_the_core(intercept: bool) -> None:
    """`tucker1_in_tails` (one Cholesky for every rank) against a direct ridge fit of the core on the
    1x1 factor's output, rank by rank."""
    rng = np.random.default_rng(3)
    s, kk, t, n = 6, 4, 5, 500
    p = rng.standard_normal((n, s * kk)) + (0.7 if intercept else 0.0)
    w = rng.standard_normal((s * kk, t))
    stats = refit.GramStats(p.shape[1], t)
    stats.add(p, p @ w + 0.3)
    basis = rng.standard_normal((5, s))
    tails = rankalloc.tucker1_in_tails(stats, basis, kk, intercept, ridge=1e-12)
    assert tails[0] == pytest.approx(float(np.trace(stats.centred(intercept)[2])))
    for r in range(1, 6):
        q = stats.projected_channels(basis[:r], kk)
        la, b = refit.fit_ridge(q, intercept, 1e-12)
        assert tails[r] == pytest.approx(refit.residual(q, la, b), rel=1e-6, abs=1e-8)


def test_calibration_refits_the_chain_exactly_and_never_worse() -> None:
    rng = np.random.default_rng(0)
    model = make_conv_model(T=8, S=8, strides=(2, 2), pads=(1, 0, 2, 1), group=2, spatial=(9, 9))
    x = rng.standard_normal((48, 8, 9, 9)).astype(np.float32)
    batches = [{"x": x[i : i + 1]} for i in range(48)]
    want = np.concatenate([run_ort(model, b)["y"] for b in batches[:6]])

    def err(m: onnx.ModelProto) -> float:
        got = np.concatenate([run_ort(m, b)["y"] for b in batches[:6]])
        return float(np.linalg.norm(got - want) / np.linalg.norm(want))

    def decomposed(cfg: CompressionConfig):  # type: ignore[no-untyped-def]
        return plan_and_decompose(SourceModel.load(model, cfg.input_shapes), cfg).replacements

    # Full rank, the core knocked off: the refit finds the layer again.
    reps = decomposed(MIRROR)
    (i, rep), = reps.items()
    arrs = list(rep.factors.arrays)
    arrs[1] = arrs[1] + 0.5 * np.std(arrs[1]) * rng.standard_normal(arrs[1].shape)
    bad = {i: type(rep)(rep.layer, type(rep.factors)(rep.factors.kind, tuple(arrs), rep.factors.rel_error))}
    comp = apply_replacements(model, bad)
    assert err(comp) > 0.1
    found = calibrate_model(model, comp, bad, batches, CalibrationOptions(rows=10**9))
    assert found["conv"].method != "kept" and err(comp) < 1e-3
    # Reduced rank: never worse than the factors as decomposed, under each method.
    reps = decomposed(replace_ranks(MIRROR, "ratio:0.5"))
    assert len(reps) == 1 and next(iter(reps.values())).factors.kind == "tucker1-in"
    one_shot = apply_replacements(model, reps)
    for method in ("last", "joint", "full"):
        comp = copy.deepcopy(one_shot)
        found = calibrate_model(model, comp, reps, batches, CalibrationOptions(method=method, rows=10**9))
        assert err(comp) <= err(one_shot) * (1 + 1e-6)
        c = found["conv"]
        assert c.error_after is not None and c.error_before is not None and c.error_after <= c.error_before


def _low_rank_input_model() -> onnx.ModelProto:
    """A 3x3 conv 32 -> 8 whose input mode has rank 4 (W = core x_1 U, U 32 x 4), while its output
    mode (8) and its spatial rearrangement are full rank: Tucker-1-in at rank 4 is exact and cheap."""
    rng = np.random.default_rng(5)
    core, u = rng.standard_normal((8, 4, 3, 3)), rng.standard_normal((32, 4))
    w = np.einsum("trij,sr->tsij", core, u)
    w = (w / np.linalg.norm(w) * 4).astype(np.float32)
    return make_conv_model(T=8, S=32, pads=(1, 1, 1, 1), spatial=(12, 12), batch="N", weight=w)  # type: ignore[arg-type]


def test_data_ranks_choose_the_mirror_against_brute_force(tmp_path: Path) -> None:
    """On a conv whose input mode is exactly low-rank, `data:0.4` picks Tucker-1-in (exact at rank 4);
    the chosen candidate is the least error any candidate of any kind reaches within the budget (brute
    force over the candidates), the kind note names it, and the compressed model is exact."""
    model = _low_rank_input_model()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((32, 32, 12, 12)).astype(np.float32)
    cal = tmp_path / "cal.npz"
    np.savez(cal, x=x)
    res = api.compress(model, CompressionConfig(ranks=RankPolicy.parse("data:0.4"), calibrate=str(cal), validate=False))
    (lp,) = res.plan.layers
    assert lp.kind == "tucker1-in" and lp.ranks is not None and lp.ranks[0] >= 4
    assert res.totals.macs_after <= 0.4 * res.totals.macs_before
    assert "kind chosen on the data: tucker1-in" in (lp.reason or "")
    held = rng.standard_normal((4, 32, 12, 12)).astype(np.float32)
    want, got = run_ort(model, {"x": held})["y"], run_ort(res.model, {"x": held})["y"]
    assert float(np.linalg.norm(got - want) / np.linalg.norm(want)) < 1e-3
    # Brute force over the layer's candidates at the same budget.
    cov, curves, cands = single_layer_candidates(model, x)
    assert cov.mirror
    assert {c.kind for c in cands} == {"original", "tucker2", "tucker1", "tucker1-in", "spatial-svd", "cp"}
    budget = 0.4 * int(lp.macs_before or 0)
    best = min((c for c in cands if c.macs <= budget), key=lambda c: c.error)
    assert best.kind == "tucker1-in" and best.ranks[0] >= 4 and best.error < 1e-3
    chosen = next(c for c in cands if (c.kind, c.ranks) == (lp.kind, lp.ranks))
    # ~1e-4: the ridge objective (rss + lambda ||w||^2) of an exact fit, whichever rank >= 4.
    assert chosen.error <= best.error + 1e-3 and chosen.macs <= budget
    exact = next(c for c in cands if (c.kind, c.ranks) == ("tucker1-in", (4,)))
    assert exact.error < 1e-3 and next(c for c in cands if (c.kind, c.ranks) == ("tucker1-in", (3,))).error > 0.05
    for kind in ("tucker1", "spatial-svd"):  # these kinds lose a lot at these MACs
        assert min(c.error for c in cands if c.kind == kind and c.macs <= budget) > 0.05
    # Tucker-2 at (R4, R3) = (8, 4) is exact too, but its last 1x1 costs MACs: at no more MACs than the
    # exact mirror every kind loses a lot.
    for kind in ("tucker2", "tucker1", "spatial-svd"):
        assert min(c.error for c in cands if c.kind == kind and c.macs <= exact.macs) > 0.05
    # The mirror is Tucker-2 without its last factor: at R4 = T its error is no more than Tucker-2's.
    assert curves.mirror is not None
    for r3, errs in curves.grid.items():
        if r3 < len(curves.mirror):
            assert curves.mirror[r3] <= errs[8] * (1 + 1e-3) + 1e-6  # up to the ridge (lambda per fit width)
    # --kind tucker2 keeps the data path to that kind.
    forced = api.compress(model, CompressionConfig(ranks=RankPolicy.parse("data:0.4"), calibrate=str(cal),
                                                   validate=False, kind="tucker2"))
    assert forced.plan.layers[0].kind == "tucker2"


def test_two_pass_layers_price_the_mirror_up_to_the_pass_rank() -> None:
    """Im2col too wide for one Gram: the second pass's statistics (the data-aware first factor's output
    at the largest grid rank) price Tucker-1-in at every rank up to that one, and agree with the exact
    one-pass curve's data-aware half (the same 1x1 factor) where both exist."""
    from onnx_tucker.calibration.rankselect import DataRankOptions, _covered, layer_curves
    from onnx_tucker.graph.model import find_layers, infer_shapes
    from onnx_tucker.runtime.activations import ActivationCache

    model = _low_rank_input_model()
    x = np.random.default_rng(2).standard_normal((16, 32, 12, 12)).astype(np.float32)
    (layer,) = find_layers(model, infer_shapes(model, {"x": (1, 32, 12, 12)}))
    cov = _covered(layer)
    assert not isinstance(cov, str)
    w = initializer(model, "W")
    with ActivationCache(model, [{"x": x}], "original") as cache:
        wide = layer_curves(layer, cov, cache.values, w, 16, DataRankOptions(max_width=200))
    assert "two passes" in wide.note and wide.mirror is not None
    top = len(wide.mirror) - 1
    assert 4 <= top <= 200 // 9
    assert wide.mirror[4] < 1e-3 and wide.mirror[1] > wide.mirror[2] > wide.mirror[3] > wide.mirror[4]


def test_kind_option_and_where_the_mirror_applies() -> None:
    with pytest.raises(UsageError, match="--kind block-term"):
        CompressionConfig(kind="block-term")
    CompressionConfig(kind="tucker1-in")
    # A 1x1 conv has no mirror (it would be its SVD): it keeps its default.
    res = api.compress(make_conv_model(T=16, S=16, kernel=(1, 1)), replace_ranks(MIRROR, "ratio:0.3"))
    assert res.plan.layers[0].kind == "svd"
    # One input channel: a 1 -> R projection saves nothing; the default (Tucker-1) stays.
    res = api.compress(make_conv_model(T=16, S=1, pads=(1, 1, 1, 1)), replace_ranks(MIRROR, "ratio:0.5"))
    assert res.plan.layers[0].kind != "tucker1-in"


def test_kind_end_to_end_through_the_library_and_a_plan_file(tmp_path: Path) -> None:
    model = make_conv_model(T=8, S=24, pads=(1, 1, 1, 1), spatial=(10, 10), batch=2)
    first = api.compress(model, CompressionConfig(ranks=RankPolicy.parse("ratio:0.5"), kind="tucker1-in"))
    (lp,) = first.plan.layers
    assert lp.kind == "tucker1-in" and lp.ranks == (12,) and lp.macs_after < lp.macs_before
    assert first.validation is not None
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(first.plan.to_json())
    again = api.compress(model, CompressionConfig(plan_file=str(plan_path), validate=False))
    assert [(p.kind, p.ranks) for p in again.plan.layers] == [(lp.kind, lp.ranks)]
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 24, 10, 10)).astype(np.float32)}
    np.testing.assert_allclose(run_ort(again.model, feeds)["y"], run_ort(first.model, feeds)["y"], rtol=1e-5, atol=1e-5)


def test_every_chain_label_is_a_factor_for_fine_tuning() -> None:
    """Fine-tuning trains the nodes FACTOR_MODULE matches: every kind's labels, as onnx2torch names them."""
    for kind, labels in LABELS.items():
        for label in labels:
            for name in (f"conv/{label}", f"stage1.conv/{label}_1", f"conv/{label}.1"):
                assert FACTOR_MODULE.search(name), (kind, name)
    assert not FACTOR_MODULE.search("conv/relu")


def test_a_full_output_rank_becomes_the_mirror_with_the_same_approximation() -> None:
    """The energy policy keeps all 8 output channels of a kernel of input rank 5: Tucker-2 at (8, 5) would end in an
    8 x 8 1x1 (a rotation the core absorbs), so the planner writes Tucker-1-in at 5, the same kernel."""
    from onnx_tucker.numerics.tucker import reconstruct_tucker2, tucker2

    rng = np.random.default_rng(3)
    w = low_rank_kernel(rng, 8, 32, (3, 3), 8, 5, noise=0.001)
    model = make_conv_model(T=8, S=32, weight=w, pads=(1, 1, 1, 1), spatial=(9, 9))
    res = api.compress(model, CompressionConfig(ranks=RankPolicy.parse("energy:0.999"), validate=False))
    (lp,) = res.plan.layers
    assert (lp.kind, lp.ranks) == ("tucker1-in", (5,)) and "output mode full -> tucker1-in" in lp.policy
    t2 = api.compress(model, CompressionConfig(ranks=RankPolicy.parse("ratio:0.5"), validate=False)).plan.layers[0]
    assert t2.kind == "tucker2"  # the output mode not full: Tucker-2 as before
    # 1x1 32 -> 5 and 3x3 5 -> 8 at 9 x 9; Tucker-2 would add the 8 x 8 1x1 (64 weights, 64 MACs a pixel)
    assert (lp.params_after, lp.macs_after) == (32 * 5 + 5 * 8 * 9, 81 * (32 * 5 + 5 * 8 * 9))
    ref = model.graph.initializer[0]
    same = copy.deepcopy(model)
    same.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(
        reconstruct_tucker2(tucker2(w.astype(np.float64), 8, 5)).astype(np.float32), ref.name))
    assert_outputs_close(same, res.model, rtol=1e-4)
