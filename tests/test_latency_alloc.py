"""Latency inside the data allocation (issue 15 item 3): `--ranks data:F --latency-aware` and `--target
latency:F --calibrate` allocate on the calibrated error curves and the measured time of each layer.

Timers are deterministic fakes (time from MACs and node counts, some chains made slow on purpose): no
test asserts on wall-clock time. The real runtimes' timers are only run, never timed against a bound.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from onnx_tucker import api
from onnx_tucker.calibration.latency_alloc import (
    TIMED_PER_LAYER,
    LatencyAllocator,
    friendly_ranks,
    simd_candidates,
    to_time,
)
from onnx_tucker.cli import app
from onnx_tucker.config import CompressionConfig
from onnx_tucker.errors import PlanError, UsageError
from onnx_tucker.graph.model import find_layers, infer_shapes, resolve_input_shapes
from onnx_tucker.numerics.rankalloc import RankCandidate, lower_hull
from onnx_tucker.numerics.timealloc import TimedCandidate, allocate_macs_and_time, allocate_time
from onnx_tucker.ops.registry import handler_for
from onnx_tucker.planning.latency import LayerTiming
from onnx_tucker.planning.planner import LayerPlan, SkipCause
from tests.helpers import make_conv_stack, make_small_cnn, save

runner = CliRunner()


class CostTimer:
    """A stand-in for a runtime: 1 ms per million MACs plus `per_node` ms per node, so chains with many
    small nodes can be slower than their layer; `slow(layer, kind, ranks)` makes chosen chains 1.25 times
slower than their layer.
    Records every measurement."""

    def __init__(self, per_node: float = 0.02, slow=lambda layer, kind, ranks: False) -> None:  # type: ignore[no-untyped-def]
        self.per_node, self.slow = per_node, slow
        self.calls: list[tuple[str, str, tuple[int, ...]]] = []

    def original_ms(self, layer) -> float:  # type: ignore[no-untyped-def]
        return (handler_for(layer).cost(layer, "original")[1] or 0) / 1e6 + self.per_node

    def chain_ms(self, layer, kind: str, ranks: tuple[int, ...]) -> float:  # type: ignore[no-untyped-def]
        nodes = 3 if kind == "tucker2" else 2
        ms = (handler_for(layer).cost(layer, kind, ranks)[1] or 0) / 1e6 + self.per_node * nodes
        return 1.25 * self.original_ms(layer) if self.slow(layer, kind, ranks) else ms

    def measure(self, layer, kind: str, ranks: tuple[int, ...]) -> LayerTiming:  # type: ignore[no-untyped-def]
        self.calls.append((layer.layer_id, kind, tuple(ranks)))
        return LayerTiming(self.original_ms(layer), self.chain_ms(layer, kind, ranks), runs=5)


def _layers(model):  # type: ignore[no-untyped-def]
    return find_layers(model, infer_shapes(model, resolve_input_shapes(model, {})))


@pytest.fixture
def cal(tmp_path: Path) -> Path:
    path = tmp_path / "cal.npz"
    np.savez(path, x=np.random.default_rng(0).standard_normal((32, 32, 16, 16)).astype(np.float32))
    return path


STACK = make_conv_stack(layers=4, C=32, rank=12, seed=3)  # four 32->32 3x3 convs at 16x16


def _applied_ms(model, plan, timer: CostTimer) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(summed original time, summed time of the plan as applied) of the layers, by `timer`'s formula."""
    layers = {lay.layer_id: lay for lay in _layers(model)}
    before = after = 0.0
    for lp in plan.layers:
        lay = layers[lp.name]
        before += timer.original_ms(lay)
        after += timer.chain_ms(lay, lp.kind, lp.ranks) if lp.decomposed else timer.original_ms(lay)
    return before, after


# ---- the pieces ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("cap", "multiple", "want"), [
    (64, 8, [8, 16, 24, 32, 40, 48, 56]), (16, 8, [4, 8, 12]), (10, 8, [4, 8]), (3, 8, []), (32, 16, [8, 16, 24]),
    (12, 1, list(range(1, 12))),
])
def test_friendly_ranks(cap: int, multiple: int, want: list[int]) -> None:
    assert friendly_ranks(cap, multiple) == want


def test_simd_candidates_take_the_error_of_the_nearest_smaller_grid_rank() -> None:
    """Tucker-2 input ranks lie on a grid: a SIMD rank between grid points takes the error of the grid
    point below it (an upper bound); every rank is a multiple of 8 and every candidate is cheaper."""
    (lay,) = _layers(make_conv_stack(layers=1, C=32))
    h = handler_for(lay)
    macs0 = h.cost(lay, "original")[1]
    grid = (1, 5, 12, 20)  # input ranks on the grid
    cands = [RankCandidate("original", (), macs0, 0.0)]
    cands += [RankCandidate("tucker2", (r4, r3), h.cost(lay, "tucker2", (r4, r3))[1], 1.0 / (r4 * r3))
              for r4 in range(1, 33) for r3 in grid]
    cands += [RankCandidate("tucker1", (r,), h.cost(lay, "tucker1", (r,))[1], 1.0 / r) for r in range(1, 33)]
    out = simd_candidates(lay, cands, 8)
    assert out[0].kind == "original"
    got = {(c.kind, c.ranks): c for c in out[1:]}
    assert got and all(r % 8 == 0 for _, ranks in got for r in ranks)
    assert all(c.macs < macs0 for c in got.values())
    assert got[("tucker2", (16, 8))].error == pytest.approx(1.0 / (16 * 5))  # 8 is not on the grid: 5's error
    assert got[("tucker2", (8, 24))].error == pytest.approx(1.0 / (8 * 20))
    assert got[("tucker1", (8,))].error == pytest.approx(1.0 / 8)
    assert ("tucker2", (8, 32)) not in got  # 32 is the input mode's full rank


def test_to_time_is_bounded_near_the_guess_per_kind_and_keeps_each_cheapest() -> None:
    orig = RankCandidate("original", (), 1000, 0.0)
    t2 = [RankCandidate("tucker2", (i,), 1000 - 40 * i, 0.01 * i * i) for i in range(1, 20)]  # convex: all on the hull
    t1 = [RankCandidate("tucker1", (i,), 1000 - 45 * i, 0.012 * i * i) for i in range(1, 20)]
    picked = to_time([orig, *t2, *t1], near_macs=600, most=8)
    assert len(picked) == 8 and orig not in picked
    for kind, pts in (("tucker2", t2), ("tucker1", t1)):
        mine = [c for c in picked if c.kind == kind]
        assert len(mine) == 4 and pts[-1] in mine  # an equal share, the kind's cheapest among them
        near = sorted(pts, key=lambda c: abs(np.log(c.macs) - np.log(600)))[:3]
        assert set(near) <= set(mine)
    assert to_time([orig, *t2[:2]], 600, 8) == t2[:2]  # fewer than the share: all of them
    assert to_time([orig], 600, 8) == []


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.tuples(st.floats(0.01, 5.0), st.floats(0, 1)), min_size=1, max_size=4), min_size=1, max_size=3),
       st.floats(0.05, 1.0))
def test_time_allocation_is_optimal_against_everything_no_slower(data: list, frac: float) -> None:
    """The greedy walk on the (ms, error) hulls: no choice of candidates taking at most its time has less
    total error (brute force), and it is within budget exactly when the fastest choice is."""
    layers = []
    for i, pts in enumerate(data):
        top = max(ms for ms, _ in pts) + 1.0
        layers.append([TimedCandidate(RankCandidate("original", (), 0, 0.0), top)]
                      + [TimedCandidate(RankCandidate("svd", (i, j), 0, e), ms) for j, (ms, e) in enumerate(pts)])
    total = sum(c[0].ms for c in layers)
    alloc = allocate_time(layers, frac * total)
    assert alloc.ms == pytest.approx(sum(c.ms for c in alloc.choice))
    fastest = sum(min(c.ms for c in cs) for cs in layers)
    assert alloc.met == (fastest <= frac * total + 1e-12) and alloc.least_ms == pytest.approx(fastest)
    if alloc.met:
        assert alloc.ms <= frac * total + 1e-9
    err = sum(c.error for c in alloc.choice)
    for combo in itertools.product(*layers):
        if sum(c.ms for c in combo) <= alloc.ms + 1e-12:
            assert sum(c.error for c in combo) >= err - 1e-9


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(1, 60), st.floats(0.01, 5.0), st.floats(0, 1)), min_size=1, max_size=4),
                min_size=1, max_size=3), st.floats(0.05, 1.0), st.sampled_from([0.0, 1.0, 3.0]))
def test_mac_budget_spent_on_time_too_is_within_budget_and_optimal_on_the_combined_cost(
        data: list, frac: float, weight: float) -> None:
    """`allocate_macs_and_time`: within the MAC budget when it says so; and no choice at no more combined
    cost (MACs and time, each over the original's, time weighted) has less total error (brute force)."""
    layers = []
    for i, pts in enumerate(data):
        top_macs, top_ms = max(m for m, _, _ in pts) + 10, max(ms for _, ms, _ in pts) + 1.0
        layers.append([TimedCandidate(RankCandidate("original", (), top_macs, 0.0), top_ms)]
                      + [TimedCandidate(RankCandidate("svd", (i, j), m, e), ms) for j, (m, ms, e) in enumerate(pts)])
    macs0, ms0 = sum(c[0].candidate.macs for c in layers), sum(c[0].ms for c in layers)
    budget = int(frac * macs0)
    alloc = allocate_macs_and_time(layers, budget, weight)
    assert alloc.macs == sum(c.candidate.macs for c in alloc.choice) and alloc.met == (alloc.macs <= budget)

    def cost(combo) -> float:  # type: ignore[no-untyped-def]
        return sum(c.candidate.macs / macs0 + weight * c.ms / ms0 for c in combo)

    err = sum(c.error for c in alloc.choice)
    for combo in itertools.product(*layers):
        if cost(combo) <= cost(alloc.choice) + 1e-12:
            assert sum(c.error for c in combo) >= err - 1e-9
    if weight == 0.0:  # MACs alone: met exactly when the cheapest choice everywhere fits
        assert alloc.met == (sum(min(c.candidate.macs for c in cs) for cs in layers) <= budget)


# ---- the allocator on a model's layers, with made-up error curves --------------------------------


def _curves(layers) -> list[list[RankCandidate]]:  # type: ignore[no-untyped-def]
    """Candidates as rankselect gives them, with a smooth made-up error: every Tucker-2 (R4, R3) on a
    grid of input ranks, every Tucker-1 rank."""
    out = []
    for k, lay in enumerate(layers):
        h = handler_for(lay)
        t, s = lay.weight_shape[0], lay.weight_shape[1]
        cands = [RankCandidate("original", (), h.cost(lay, "original")[1], 0.0)]
        for r4, r3 in itertools.product(range(1, t + 1), (1, 3, 6, 10, 15, 22)):
            if r3 < s:
                cands.append(RankCandidate("tucker2", (r4, r3), h.cost(lay, "tucker2", (r4, r3))[1],
                                           (1 + k) * (np.exp(-r4 / 6) + np.exp(-r3 / 5))))
        cands += [RankCandidate("tucker1", (r,), h.cost(lay, "tucker1", (r,))[1], (1 + k) * 1.5 * np.exp(-r / 6))
                  for r in range(1, t + 1)]
        out.append(cands)
    return out


def _allocator(layers, timer, mode="macs", fraction=0.5, **kw) -> LatencyAllocator:  # type: ignore[no-untyped-def]
    costs = [handler_for(lay).cost(lay, "original") for lay in layers]  # every layer kept by the fallback plan
    fallback = [LayerPlan(lay.layer_id, lay.op_type, "skip", lay.weight_shape, params_before=params, params_after=params,
                          macs_before=macs, macs_after=macs) for lay, (params, macs) in zip(layers, costs, strict=True)]
    return LatencyAllocator(layers, fallback, timer, mode=mode, fraction=fraction, option=f"--ranks data:{fraction:g}", **kw)


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("per_node", [0.0, 0.02])
def test_mac_budget_met_within_one_step_with_chains_that_pay(fraction: float, per_node: float) -> None:
    layers = _layers(STACK)
    cands = _curves(layers)
    total = sum(c[0].macs for c in cands)
    budget = int(fraction * total)
    timer = CostTimer(per_node, slow=lambda lay, kind, ranks: lay.layer_id == "conv1" and kind == "tucker2")
    alloc_fn = _allocator(layers, timer, fraction=fraction)
    alloc = alloc_fn(layers, cands, budget)
    assert alloc.met and alloc.macs == sum(c.macs for c in alloc.choice) <= budget
    for lay, c in zip(layers, alloc.choice, strict=True):
        if c.kind != "original":  # only chains measured at --min-speedup or faster, at SIMD ranks
            assert timer.original_ms(lay) / timer.chain_ms(lay, c.kind, c.ranks) >= 1.1
            assert all(r % 8 == 0 for r in c.ranks)
    assert alloc.choice[1].kind != "tucker2"  # conv1's Tucker-2 chains are slow: never chosen
    r = alloc_fn.result
    assert r is not None and r.most_per_layer <= TIMED_PER_LAYER and r.timed == len(timer.calls) <= TIMED_PER_LAYER * len(layers)
    # Never slower: the summed per-layer time (the timer's own formula) is at most the original's.
    before = sum(timer.original_ms(lay) for lay in layers)
    after = sum(timer.chain_ms(lay, c.kind, c.ranks) if c.kind != "original" else timer.original_ms(lay)
                for lay, c in zip(layers, alloc.choice, strict=True))
    assert r.time_before_ms == pytest.approx(before) and r.time_after_ms == pytest.approx(after) and after <= before
    # Within one step: the budget left over is less than the largest step of any layer's paying hull.
    paying = [[c for c in lower_hull([cs[0], *[x for x in cs[1:] if (x.kind, x.ranks) in
                                              {(k, rr) for n, k, rr in timer.calls if n == lay.layer_id}]])]
               for lay, cs in zip(layers, [simd_candidates(lay, cs, 8) for lay, cs in zip(layers, cands, strict=True)],
                                  strict=True)]
    steps = [a.macs - b.macs for h in paying for a, b in itertools.pairwise(h)]
    assert budget - alloc.macs < max(steps)


def test_mac_budget_out_of_reach_of_faster_chains_is_a_clear_error() -> None:
    layers = _layers(STACK)
    timer = CostTimer(slow=lambda lay, kind, ranks: lay.layer_id != "conv0")  # only conv0's chains pay
    cands = _curves(layers)
    total = sum(c[0].macs for c in cands)
    with pytest.raises(UsageError, match=r"--ranks data:0.3 --latency-aware: cannot keep the MACs at 0.3 .* 3 of 4 "
                                         r"layers have none .* use a fraction of at least (0\.\d+)") as err:
        _allocator(layers, timer, fraction=0.3)(layers, cands, int(0.3 * total))
    suggested = float(re.search(r"fraction of at least (0\.\d+)", str(err.value)).group(1))  # type: ignore[union-attr]
    assert 0.75 < suggested < 0.8  # three layers kept whole, conv0 at its cheapest paying chain
    alloc = _allocator(layers, timer, fraction=suggested)(layers, cands, int(suggested * total))  # which is reachable
    assert alloc.met and [c.kind for c in alloc.choice][1:] == ["original"] * 3


def test_time_budget_met_and_out_of_reach() -> None:
    layers = _layers(STACK)
    cands = _curves(layers)
    timer = CostTimer(0.02)
    a = _allocator(layers, timer, mode="latency", fraction=0.5, )
    alloc = a(layers, cands, 10**12)
    r = a.result
    assert r is not None and r.time_after_ms <= 0.5 * r.time_before_ms + 1e-12 and r.budget_ms == pytest.approx(0.5 * r.time_before_ms)
    assert r.time_after_ms == pytest.approx(sum(timer.chain_ms(lay, c.kind, c.ranks) if c.kind != "original" else timer.original_ms(lay)
                                                for lay, c in zip(layers, alloc.choice, strict=True)))
    with pytest.raises(PlanError, match=r"cannot be met: .* least reachable is about latency:"):
        _allocator(layers, CostTimer(0.02), mode="latency", fraction=0.05)(layers, cands, 10**12)


# ---- the whole path: api and CLI with calibration data ---------------------------------------------


def test_data_ranks_latency_aware_end_to_end_meets_the_budget_and_is_not_slower(tmp_path: Path) -> None:
    model = make_small_cnn(batch="N", c1=16, c2=32, spatial=(16, 16))
    cal = tmp_path / "cal3.npz"
    np.savez(cal, x=np.random.default_rng(1).standard_normal((32, 3, 16, 16)).astype(np.float32))
    # The fc layer's chains never pay (timings are cached by shape: slowness must follow the shape too).
    timer = CostTimer(0.002, slow=lambda lay, kind, ranks: len(lay.weight_shape) == 2)
    cfg = CompressionConfig(ranks="data:0.6", calibrate=str(cal), latency_aware=True, validate=False)  # type: ignore[arg-type]
    report = tmp_path / "r.json"
    res = api.compress(model, cfg, timer=timer, report=report)
    b = res.budget_check
    assert b is not None and b.met and res.totals.macs_after <= 0.6 * res.totals.macs_before
    fc = next(lp for lp in res.plan.layers if lp.op_type == "Gemm")
    assert fc.kind == "skip" and fc.cause is SkipCause.SLOWER
    assert "kept as is by --ranks data:0.6 --latency-aware" in (fc.reason or "")
    assert res.plan.decomposed and all(lp.time_speedup is not None and lp.time_speedup >= 1.1 for lp in res.plan.decomposed)
    before, after = _applied_ms(model, res.plan, timer)
    assert after < before
    t = res.layer_timing
    assert t is not None and t.allocation is not None and t.allocation.layers == 3
    assert t.allocation.time_after_ms == pytest.approx(after) and t.allocation.time_before_ms == pytest.approx(before)
    rep = json.loads(report.read_text())
    assert rep["layer_timing"]["allocation"]["macs_after"] == res.totals.macs_after
    assert rep["layer_timing"]["allocation"]["speedup"] == pytest.approx(before / after)
    assert rep["config"]["latency_runtime"] == "ort"


def test_target_latency_with_calibration_allocates_on_the_data(cal: Path) -> None:
    timer = CostTimer(0.02)
    p = api.plan(STACK, CompressionConfig(target="latency:0.4", calibrate=str(cal), validate=False), timer=timer)  # type: ignore[arg-type]
    b = p.budget
    assert b is not None and b.metric == "latency" and b.method == "data" and b.after <= 0.4 * b.before + 1e-12
    before, after = _applied_ms(STACK, p, timer)
    assert after == pytest.approx(b.after) and before == pytest.approx(b.before)
    assert all(lp.policy.startswith("target latency:0.4") for lp in p.decomposed)


def test_target_macs_with_calibration_and_latency_aware_allocates_on_time_too(cal: Path) -> None:
    timer = CostTimer(0.02, slow=lambda lay, kind, ranks: kind == "tucker2")
    p = api.plan(STACK, CompressionConfig(target="macs:0.5", calibrate=str(cal), latency_aware=True, validate=False), timer=timer)  # type: ignore[arg-type]
    assert p.budget_check is not None and p.budget_check.met
    # Tucker-2 is the slow kind here: every layer takes a fast one (Tucker-1, or spatial SVD / Tucker-1-in / CP since issue 19).
    assert p.decomposed and all(lp.kind in ("tucker1", "spatial-svd", "tucker1-in", "cp") for lp in p.decomposed)


# ---- --latency-runtime -----------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "want"), [("ort", "ort"), ("ORT-Mobile", "ort-mobile"), (" mnn ", "mnn")])
def test_latency_runtime_parsing(text: str, want: str) -> None:
    assert CompressionConfig(latency_runtime=text).latency_runtime == want  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["ncnn", "tflite", ""])
def test_latency_runtime_unknown_is_a_usage_error(bad: str) -> None:
    with pytest.raises(UsageError, match=r"--latency-runtime .*use ort, ort-mobile, mnn"):
        CompressionConfig(latency_runtime=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("command", ["compress", "inspect"])
def test_latency_runtime_is_one_option_of_every_timing_command(command: str, tmp_path: Path) -> None:
    src = save(make_small_cnn(), tmp_path / "m.onnx")
    args = [command, str(src)] + ([str(tmp_path / "o.onnx")] if command == "compress" else [])
    r = runner.invoke(app, [*args, "--latency-runtime", "tflite"])
    assert r.exit_code != 0 and "--latency-runtime tflite" in r.output
    assert "--latency-runtime" in runner.invoke(app, [command, "--help"], terminal_width=200).output


def test_ort_format_timer_times_a_layer(tmp_path: Path) -> None:
    """Runs, no bound on the time: the ORT-format pair gives two positive times."""
    from onnx_tucker.mobile.layertime import layer_timer_for

    (lay,) = _layers(make_conv_stack(layers=1, C=16, spatial=(8, 8)))
    t = layer_timer_for("ort-mobile", 17).measure(lay, "tucker2", (8, 8))
    assert t is not None and t.original_ms > 0 and t.decomposed_ms > 0


def test_mnn_timer_times_layers_in_a_child() -> None:
    pytest.importorskip("MNN")
    from onnx_tucker.mobile.layertime import layer_timer_for

    (lay,) = _layers(make_conv_stack(layers=1, C=16, spatial=(8, 8)))
    got = layer_timer_for("mnn", 17).measure_many(lay, [("tucker2", (8, 8)), ("tucker1", (8,))])
    assert len(got) == 2 and all(t is not None and t.original_ms > 0 and t.decomposed_ms > 0 for t in got)


# ---- --target agreement:F --calibrate: the search on the calibrated pipeline ------------------------


class TotalRankEvaluator:
    """A fake evaluator: agreement grows with the total rank granted (a kept layer counts 96)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, planned, which: str) -> float:  # type: ignore[no-untyped-def]
        self.calls.append(which)
        total = sum(96 if kind == "skip" else sum(ranks) for kind, ranks, _ in planned.entries.values())
        return min(1.0, total / 300)


def test_agreement_target_with_calibration_searches_the_data_allocation(cal: Path, tmp_path: Path) -> None:
    """Each candidate is the calibration data's allocation at the fraction tried: the plan found is the
    one `--ranks data:f` gives at the fraction the search settled on."""
    ev = TotalRankEvaluator()
    cfg = CompressionConfig(target="agreement:0.6", calibrate=str(cal), data=str(tmp_path / "unused.npz"), validate=False)  # type: ignore[arg-type]
    p = api.plan(STACK, cfg, evaluator=ev)
    b = p.budget
    assert b is not None and b.metric == "agreement" and b.method == "data" and b.after >= 0.6
    assert ev.calls.count("held-out") == 1 and len(ev.calls) == b.evaluations <= 12
    f = b.macs_fraction
    assert f is not None and 0 < f < 1
    same = api.plan(STACK, CompressionConfig(ranks=f"data:{f!r}", calibrate=str(cal), validate=False))  # type: ignore[arg-type]
    assert [(lp.kind, lp.ranks) for lp in p.layers] == [(lp.kind, lp.ranks) for lp in same.layers]
    assert all(lp.policy == "target agreement:0.6" for lp in p.decomposed)


def test_agreement_target_with_calibration_refits_every_candidate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The real evaluator: each candidate model is refit on the calibration data before its agreement
    is measured (one refit per evaluation), then `compress` refits the result."""
    from onnx_tucker.calibration import stage

    model = make_small_cnn(batch="N", c1=16, c2=32, spatial=(8, 8))
    rng = np.random.default_rng(2)
    cal, data = tmp_path / "cal.npz", tmp_path / "data.npz"
    np.savez(cal, x=rng.standard_normal((24, 3, 8, 8)).astype(np.float32))
    np.savez(data, x=rng.standard_normal((24, 3, 8, 8)).astype(np.float32))
    refits: list[int] = []
    real = stage.calibrate

    def counting(*args, **kw):  # type: ignore[no-untyped-def]
        refits.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(stage, "calibrate", counting)  # the search's refits
    monkeypatch.setattr(api, "calibrate", counting)  # compress's own, of the result
    cfg = CompressionConfig(target="agreement:0.8", calibrate=str(cal), data=str(data), validate=False)  # type: ignore[arg-type]
    res = api.compress(model, cfg)
    b = res.budget
    assert b is not None and b.method == "data" and b.held_out is not None
    assert len(refits) == b.evaluations + 1  # every candidate, and the result


def test_latency_runtime_builds_no_timer_when_nothing_is_timed(monkeypatch: pytest.MonkeyPatch) -> None:
    from onnx_tucker.mobile import layertime

    def refuse(*args, **kw):  # type: ignore[no-untyped-def]
        raise AssertionError("a timer was built though nothing is timed")

    monkeypatch.setattr(layertime, "layer_timer_for", refuse)
    p = api.plan(STACK, CompressionConfig(latency_runtime="mnn", validate=False))  # type: ignore[arg-type]
    assert p.layer_timing is None and p.decomposed
    with pytest.raises(AssertionError, match="a timer was built"):
        api.plan(STACK, CompressionConfig(latency_runtime="mnn", latency_aware=True, validate=False))  # type: ignore[arg-type]
