"""Ranks chosen with calibration data (`--ranks data:F --calibrate DATA`, issue 11 item 2).

The error curves are checked against direct solves of the same regression (`numerics.refit`), the
budget allocation against brute force, and the whole path on models whose activations have a known
structure that weight-space policies cannot see.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from onnx_tucker import api
from onnx_tucker.cli import app
from onnx_tucker.config import CompressionConfig, RankPolicy
from onnx_tucker.errors import UsageError
from onnx_tucker.numerics import rankalloc, refit
from onnx_tucker.numerics.rankalloc import RankCandidate, allocate_macs, lower_hull
from tests.helpers import he_normal, make_small_cnn, run_ort, save


def _stats(p: np.ndarray, y: np.ndarray) -> refit.GramStats:
    s = refit.GramStats(p.shape[1], y.shape[1])
    s.add(p, y)
    return s


@pytest.mark.parametrize("intercept", [False, True])
def test_output_error_curve_is_the_reduced_rank_regression_error(intercept: bool, rng: np.random.Generator) -> None:
    p = rng.standard_normal((400, 12)) @ rng.standard_normal((12, 12))
    y = p @ rng.standard_normal((12, 7)) + 0.1 * rng.standard_normal((400, 7)) + (3.0 if intercept else 0.0)
    stats = _stats(p, y)
    curve = rankalloc.output_error_curve(stats, intercept, ridge=1e-9)
    energy = float(np.trace(stats.centred(intercept)[2]))
    for r in range(1, 8):
        front, last, b = refit.fit_reduced_rank(stats, r, intercept, ridge=1e-9)
        direct = refit.residual(stats, front @ last, b) / energy
        assert curve[r] == pytest.approx(direct, rel=1e-6, abs=1e-9)
    assert np.all(np.diff(curve) <= 1e-12)  # more rank never hurts
    assert curve[0] == pytest.approx(1.0, rel=1e-6)  # rank 0: the (centred) output energy


def test_output_error_curve_finds_the_rank_of_the_layer_on_the_data(rng: np.random.Generator) -> None:
    """Full-rank weights on inputs confined to 3 dimensions: the output has rank 3 on the data."""
    p = rng.standard_normal((500, 3)) @ rng.standard_normal((3, 10))
    y = p @ rng.standard_normal((10, 10))
    curve = rankalloc.output_error_curve(_stats(p, y), False)
    assert curve[2] > 1e-3 and curve[3] < 1e-4  # not 0: the ridge (1e-4 of the mean variance) shrinks W


def test_tucker2_grid_matches_the_data_aware_refit(rng: np.random.Generator) -> None:
    s, t, kk = 5, 6, 4
    x = rng.standard_normal((300, s, kk))
    p = x.reshape(300, s * kk)
    w = rng.standard_normal((s * kk, t))
    stats = _stats(p, p @ w)
    kernel_gram = w.reshape(s, kk, t).transpose(0, 2, 1).reshape(s, -1)
    kernel_gram = kernel_gram @ kernel_gram.T
    grid = rankalloc.tucker2_error_grid(stats, kernel_gram, kk, [2, 4], False, ridge=1e-9)
    moment = sum(stats.pp[o::kk, o::kk] for o in range(kk)) / kk
    for r3, curve in grid.items():
        first = refit.data_aware_basis(moment, kernel_gram, r3, 1e-9)
        proj = stats.projected(np.kron(first, np.eye(kk)).T)
        for r4 in (1, 3, 6):
            front, last, b = refit.fit_reduced_rank(proj, r4, False, 1e-9)
            assert curve[r4] == pytest.approx(refit.residual(proj, front @ last, b) / stats.target_energy, rel=1e-5, abs=1e-9)


def test_rank_grid_is_dense_low_and_ends_at_the_dimension() -> None:
    assert rankalloc.rank_grid(6) == [1, 2, 3, 4, 5, 6]
    g = rankalloc.rank_grid(512, 12)
    assert g[0] == 1 and g[-1] == 512 and g == sorted(set(g)) and len(g) <= 12


# ---- allocation ------------------------------------------------------------------------------------

layer_st = st.lists(st.tuples(st.integers(1, 60), st.floats(0, 1)), min_size=1, max_size=5)


def _layers(data: list[list[tuple[int, float]]]) -> list[list[RankCandidate]]:
    out = []
    for i, cands in enumerate(data):
        top = max(m for m, _ in cands) + 10
        out.append([RankCandidate("original", (), top, 0.0)] +
                   [RankCandidate("svd", (i, j), m, e) for j, (m, e) in enumerate(cands)])
    return out


@settings(max_examples=60, deadline=None)
@given(st.lists(layer_st, min_size=1, max_size=3), st.floats(0.05, 1.0))
def test_allocation_is_optimal_against_everything_no_more_expensive(data: list, frac: float) -> None:
    """The greedy walk on the hulls is a Lagrangian solution: no choice of candidates with at most its
    MACs has less total error (checked by brute force); and it is within budget when it says so."""
    layers = _layers(data)
    total = sum(c[0].macs for c in layers)
    budget = int(frac * total)
    alloc = allocate_macs(layers, budget)
    assert alloc.macs == sum(c.macs for c in alloc.choice)
    least = sum(min(c.macs for c in cs) for cs in layers)
    assert alloc.met == (least <= budget)
    if alloc.met:
        assert alloc.macs <= budget
    err = sum(c.error for c in alloc.choice)
    for combo in itertools.product(*layers):
        if sum(c.macs for c in combo) <= alloc.macs:
            assert sum(c.error for c in combo) >= err - 1e-9


def test_lower_hull_drops_dominated_and_non_convex_points() -> None:
    c = [RankCandidate("original", (), 100, 0.0), RankCandidate("a", (1,), 80, 0.5),  # above the chord
         RankCandidate("b", (2,), 60, 0.2), RankCandidate("c", (3,), 70, 0.3),  # c: dominated by b
         RankCandidate("d", (4,), 10, 1.0)]
    assert [h.kind for h in lower_hull(c)] == ["original", "b", "d"]


# ---- the whole path --------------------------------------------------------------------------------

def _subspace_conv(s: int = 16, k: int = 4, seed: int = 0) -> tuple[onnx.ModelProto, np.ndarray]:
    """One 3x3 conv with full-rank weights, and inputs whose channels span only `k` dimensions."""
    rng = np.random.default_rng(seed)
    w = he_normal(rng, (s, s, 3, 3))
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["y"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])], "sub",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", s, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", s, 8, 8])], initializer=[numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    mix = rng.standard_normal((s, k)).astype(np.float32)
    return model, mix


def _inputs(mix: np.ndarray, n: int, seed: int) -> np.ndarray:
    z = np.random.default_rng(seed).standard_normal((n, mix.shape[1], 8, 8)).astype(np.float32)
    return np.einsum("sk,nkhw->nshw", mix, z).astype(np.float32)


def test_data_ranks_see_the_input_subspace_that_weight_ranks_cannot(tmp_path: Path) -> None:
    """Inputs in a 4-dimensional channel subspace: `data:0.45` keeps the outputs (input rank 4 is all the
    data needs), while the weight-space energy policy at about the same MACs loses a lot."""
    model, mix = _subspace_conv()
    cal = tmp_path / "cal.npz"
    np.savez(cal, x=_inputs(mix, 64, seed=1))
    held = _inputs(mix, 16, seed=2)
    want = run_ort(model, {"x": held})["y"]
    data = api.compress(model, CompressionConfig(ranks=RankPolicy.parse("data:0.45"), calibrate=str(cal), validate=False))
    lp = data.plan.layers[0]
    # Only the input mode is compressible on these data: Tucker-1-in (its mirror, no output 1x1) since issue 19.
    assert lp.kind in ("tucker2", "tucker1-in") and lp.ranks is not None and lp.ranks[-1] <= 5 and lp.policy == "data:0.45"
    assert data.totals.macs_after <= 0.45 * data.totals.macs_before
    got = run_ort(data.model, {"x": held})["y"]  # type: ignore[arg-type]
    err_data = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    weight = api.compress(model, CompressionConfig(ranks=RankPolicy.parse("energy:0.6"), calibrate=str(cal), validate=False))
    assert weight.totals.macs_after >= 0.9 * data.totals.macs_after  # no cheaper than the data plan
    err_weight = float(np.linalg.norm(run_ort(weight.model, {"x": held})["y"] - want) / np.linalg.norm(want))  # type: ignore[arg-type]
    assert err_data < 1e-2 and err_weight > 10 * err_data, (err_data, err_weight)


@pytest.mark.parametrize("frac", [0.3, 0.6])
def test_data_ranks_meet_the_mac_fraction_on_a_small_cnn(frac: float, tmp_path: Path, rng: np.random.Generator) -> None:
    model = make_small_cnn(batch="N")
    cal = tmp_path / "cal.npz"
    np.savez(cal, x=rng.standard_normal((40, 3, 16, 16)).astype(np.float32))
    res = api.compress(model, CompressionConfig(ranks=RankPolicy.parse(f"data:{frac}"), calibrate=str(cal), validate=False))
    assert res.totals.macs_after <= frac * res.totals.macs_before
    # Within about one rank step of the budget: not far below it either.
    assert res.totals.macs_after >= (frac - 0.12) * res.totals.macs_before
    for lp in res.plan.layers:
        assert lp.decomposed or lp.reason  # every layer kept has its reason


def test_data_ranks_need_calibration_data_and_a_reachable_fraction(tmp_path: Path, rng: np.random.Generator) -> None:
    with pytest.raises(UsageError, match="--calibrate"):
        CompressionConfig(ranks=RankPolicy.parse("data:0.5"))
    model = make_small_cnn(batch="N")
    cal = tmp_path / "cal.npz"
    np.savez(cal, x=rng.standard_normal((20, 3, 16, 16)).astype(np.float32))
    src = save(model, tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"
    r = CliRunner().invoke(app, ["compress", str(src), str(out), "--ranks", "data:0.001", "--calibrate", str(cal)])
    assert r.exit_code != 0 and "the least this model can reach" in r.output and not out.exists()
    r = CliRunner().invoke(app, ["compress", str(src), str(out), "--ranks", "data:0.5"])
    assert r.exit_code != 0 and "--calibrate" in r.output and not out.exists()


def test_target_macs_with_calibration_allocates_on_the_data(tmp_path: Path, rng: np.random.Generator) -> None:
    """`--target macs:F --calibrate DATA` spends the budget as `--ranks data:F` does (same plan), and the two
    together are refused."""
    from onnx_tucker.config import BudgetTarget

    model = make_small_cnn(batch="N")
    cal = tmp_path / "cal.npz"
    np.savez(cal, x=rng.standard_normal((40, 3, 16, 16)).astype(np.float32))
    by_target = api.plan(model, CompressionConfig(target=BudgetTarget.parse("macs:0.5"), calibrate=str(cal), validate=False))
    by_ranks = api.plan(model, CompressionConfig(ranks=RankPolicy.parse("data:0.5"), calibrate=str(cal), validate=False))
    assert [(p.kind, p.ranks) for p in by_target.layers] == [(p.kind, p.ranks) for p in by_ranks.layers]
    assert {p.policy for p in by_target.decomposed} == {"data:0.5"}
    with pytest.raises(UsageError, match="both set the MACs"):
        CompressionConfig(target=BudgetTarget.parse("macs:0.5"), ranks=RankPolicy.parse("data:0.5"), calibrate=str(cal))


def test_data_ranks_rule_layers_out_by_their_cause_not_their_words(rng: np.random.Generator) -> None:
    """A fallback plan skipped for --exclude keeps its plan; a reason that merely mentions --exclude (the
    cause says otherwise) does not rule the layer out (issue 17: no decision on message text)."""
    from dataclasses import replace

    from onnx_tucker.calibration.rankselect import select_ranks_data
    from onnx_tucker.graph.model import ModelIndex, find_layers, infer_shapes
    from onnx_tucker.planning.planner import SkipCause, plan_layer

    model = make_small_cnn(batch="N")
    layers = find_layers(model, infer_shapes(model, {"x": (1, 3, 16, 16)}))
    read = ModelIndex(model).constant_value
    fallback = [plan_layer(lay, read, CompressionConfig()) for lay in layers]
    batches = [{"x": rng.standard_normal((20, 3, 16, 16)).astype(np.float32)}]
    k = next(i for i, lay in enumerate(layers) if lay.layer_id == "conv2")
    excluded = replace(fallback[k], kind="skip", reason="name matches --exclude 'conv2'", cause=SkipCause.EXCLUDE)
    worded = replace(fallback[k], reason="a note that mentions --exclude and NaN", cause=None)
    by_cause = select_ranks_data(model, layers, [*fallback[:k], excluded, *fallback[k + 1:]], batches, 0.9, read)
    by_words = select_ranks_data(model, layers, [*fallback[:k], worded, *fallback[k + 1:]], batches, 0.9, read)
    assert "conv2" not in by_cause.chosen and by_cause.planned.entries["conv2"][0] == "skip"
    assert by_cause.planned.causes["conv2"] is SkipCause.EXCLUDE
    assert "conv2" in by_words.chosen
