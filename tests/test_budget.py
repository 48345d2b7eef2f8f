"""Whole-model budget targets (issue 9): `--target macs:F` / `params:F` meet the target within one rank
step, spend the budget where the kernels lose least, and say plainly when a target cannot be met."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from onnx_tucker import api
from onnx_tucker.cli import app
from onnx_tucker.config import BudgetTarget, CompressionConfig
from onnx_tucker.errors import PlanError, UsageError
from onnx_tucker.graph.model import find_layers, infer_shapes, resolve_input_shapes
from onnx_tucker.ops.registry import handler_for
from onnx_tucker.planning.budget import RankSpace, allocate
from onnx_tucker.planning.latency import rank_caps
from tests.helpers import make_conv_stack, make_small_cnn, save

MODELS = {
    "small_cnn": lambda: make_small_cnn(low_rank=True, c1=32, c2=64, spatial=(16, 16)),
    "conv_stack": lambda: make_conv_stack(layers=3, C=32, rank=6, seed=1),
}


def _layers(model):  # type: ignore[no-untyped-def]
    return find_layers(model, infer_shapes(model, resolve_input_shapes(model, {})))


def _assert_within_one_step(model, plan, step: int) -> None:  # type: ignore[no-untyped-def]
    """The target is met, and no single further rank step (or reverting a layer) would still meet it."""
    b = plan.budget
    assert b is not None
    limit = b.fraction * b.before
    assert b.after <= limit
    metric = 1 if b.metric == "macs" else 0
    layers = {lay.layer_id: lay for lay in _layers(model)}
    for lp in plan.decomposed:
        layer = layers[lp.name]
        h = handler_for(layer)
        now = h.cost(layer, lp.kind, lp.ranks)[metric]
        original = h.cost(layer, "original")[metric]
        for m, (r, cap) in enumerate(zip(lp.ranks, rank_caps(layer, lp.kind), strict=True)):
            if r >= cap:
                continue
            up = lp.ranks[:m] + (min(r + step, cap),) + lp.ranks[m + 1:]
            extra = min(h.cost(layer, lp.kind, up)[metric], original) - now
            assert b.after + extra > limit, (lp.name, m, extra)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("target", ["macs:0.3", "macs:0.6", "params:0.2", "params:0.5"])
@pytest.mark.parametrize("round_to", [1, 4])
def test_target_met_within_one_rank_step(model_name: str, target: str, round_to: int) -> None:
    model = MODELS[model_name]()
    plan = api.plan(model, CompressionConfig.from_options(target=target, round_to=round_to, validate=False))
    assert plan.budget is not None and plan.decomposed
    _assert_within_one_step(model, plan, round_to)
    if plan.budget.metric == "macs":  # the plan's own MAC count is what the allocation predicted
        assert plan.totals()["macs_after"] == plan.budget.after
    for lp in plan.layers:
        assert lp.decomposed or lp.reason
        if lp.decomposed:
            assert lp.policy.startswith(f"target {target}") and all(r % round_to == 0 or r == c for r, c in
                                                                     zip(lp.ranks, rank_caps(_by_name(model, lp.name), lp.kind), strict=True))


def _by_name(model, name):  # type: ignore[no-untyped-def]
    return next(lay for lay in _layers(model) if lay.layer_id == name)


def test_params_target_holds_on_the_written_model() -> None:
    """The prediction counts every float parameter: the compressed model has exactly that many."""
    model = MODELS["small_cnn"]()
    result = api.compress(model, CompressionConfig.from_options(target="params:0.3", validate=False))
    b = result.budget
    assert b is not None
    assert (result.totals.params_before, result.totals.params_after) == (b.before, b.after)
    assert result.totals.params_after <= 0.3 * result.totals.params_before


def test_budget_goes_where_the_energy_is() -> None:
    """Two layers of equal cost: one kernel's energy in its first singular value, the other's spread
    evenly. The rank goes to the spread one."""
    n = 16
    peaked = np.r_[1.0, np.full(n - 1, 1e-6)]
    flat = np.full(n, 1.0 / n)

    def space(name: str, e: np.ndarray) -> RankSpace:
        return RankSpace(name, "svd", (e / e.sum(),), (n,), original_cost=n * n, cost=lambda r: 2 * n * r[0])

    chosen, outcome = allocate([space("peaked", peaked), space("flat", flat)], 0, 2 * n * n, BudgetTarget("macs", 0.5))
    assert chosen["peaked"] == (1,) and chosen["flat"] is not None and chosen["flat"][0] > 4
    assert outcome.after <= 0.5 * 2 * n * n


def test_unreachable_target_is_a_clear_error() -> None:
    with pytest.raises(PlanError, match=r"--target macs:0.001: cannot be met.*least reachable is about macs:"):
        api.plan(MODELS["small_cnn"](), CompressionConfig.from_options(target="macs:0.001", validate=False))


runner = CliRunner()


def test_cli_unreachable_target_exits_1(tmp_path: Path) -> None:
    src = save(MODELS["small_cnn"](), tmp_path / "m.onnx")
    res = runner.invoke(app, ["compress", str(src), str(tmp_path / "o.onnx"), "--target", "macs:0.001", "-q"])
    assert res.exit_code == 1 and "cannot be met" in res.output
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize(
    ("text", "words"),
    [("macs:1.5", "must be in (0, 1)"), ("accuracy-drop:0.5", "not implemented"), ("agreement:1.5", "must be in (0, 1)"),
     ("flops", "not understood"), ("energy:0.3", "unknown metric")],
)
def test_bad_targets_are_usage_errors(text: str, words: str) -> None:
    with pytest.raises(UsageError, match=words.replace("(", r"\(").replace(")", r"\)")):
        BudgetTarget.parse(text)


def test_cli_bad_target_exits_2(tmp_path: Path) -> None:
    src = save(MODELS["small_cnn"](), tmp_path / "m.onnx")
    res = runner.invoke(app, ["inspect", str(src), "--target", "accuracy-drop:1.0"])
    assert res.exit_code == 2 and "not implemented" in res.output


def test_target_and_plan_file_exclude_each_other(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--plan"):
        CompressionConfig.from_options(target="macs:0.5", plan=tmp_path / "p.json")


def test_cli_target_reports_what_was_chosen(tmp_path: Path) -> None:
    src = save(MODELS["small_cnn"](), tmp_path / "m.onnx")
    rep = tmp_path / "r.json"
    res = runner.invoke(app, ["compress", str(src), str(tmp_path / "o.onnx"), "--target", "macs:0.4", "--report", str(rep)])
    assert res.exit_code == 0, res.output
    assert "Target macs:0.4" in res.output
    import json

    t = json.loads(rep.read_text())["target"]
    assert t["metric"] == "macs" and t["achieved"] <= 0.4 and t["layers_decomposed"] >= 1


class MacsTimer:
    """A deterministic stand-in for onnxruntime: 1 ms per million MACs plus 0.02 ms per node."""

    def __init__(self) -> None:
        self.calls = 0

    def measure(self, layer, kind, ranks):  # type: ignore[no-untyped-def]
        from onnx_tucker.planning.latency import LayerTiming

        self.calls += 1
        h = handler_for(layer)
        before = (h.cost(layer, "original")[1] or 0) / 1e6 + 0.02
        nodes = 3 if kind == "tucker2" else 2
        return LayerTiming(before, (h.cost(layer, kind, ranks)[1] or 0) / 1e6 + 0.02 * nodes, runs=5)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("fraction", [0.3, 0.6])
def test_latency_target_met_on_the_layers_time(model_name: str, fraction: float) -> None:
    model = MODELS[model_name]()
    timer = MacsTimer()
    plan = api.plan(model, CompressionConfig.from_options(target=f"latency:{fraction}", validate=False), timer=timer)
    b = plan.budget
    assert b is not None and b.metric == "latency" and b.after <= fraction * b.before
    assert b.macs_fraction is not None and b.evaluations == 11
    # What the plan applies, timed by the same timer, is what the search predicted.
    timed = [lp for lp in plan.layers if lp.time_before_ms is not None]
    applied = sum(lp.time_after_ms if lp.decomposed else lp.time_before_ms for lp in timed)  # type: ignore[misc]
    before = sum(lp.time_before_ms for lp in timed)  # type: ignore[misc]
    assert applied <= fraction * before + 1e-9
    assert timer.calls > 0


def test_latency_target_uses_less_compression_for_a_looser_target() -> None:
    model = MODELS["small_cnn"]()
    loose, tight = (api.plan(model, CompressionConfig.from_options(target=f"latency:{f}", validate=False), timer=MacsTimer())
                    for f in (0.6, 0.3))
    assert loose.budget is not None and tight.budget is not None
    assert loose.budget.macs_fraction > tight.budget.macs_fraction  # type: ignore[operator]


def test_unreachable_latency_target_is_a_clear_error() -> None:
    with pytest.raises(PlanError, match=r"--target latency:0.01: cannot be met.*least reachable is about latency:"):
        api.plan(MODELS["small_cnn"](), CompressionConfig.from_options(target="latency:0.01", validate=False), timer=MacsTimer())


class RankEvaluator:
    """A fake evaluator: agreement grows with the total rank granted (a kept layer counts 64)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, planned, which: str) -> float:  # type: ignore[no-untyped-def]
        self.calls.append(which)
        total = sum(64 if kind == "skip" else sum(ranks) for kind, ranks, _ in planned.entries.values())
        return min(1.0, total / 100) - (0.01 if which == "held-out" else 0.0)


def _agreement_plan(target: str, tmp_path: Path, evaluator: RankEvaluator):  # type: ignore[no-untyped-def]
    cfg = CompressionConfig.from_options(target=target, data=tmp_path / "unused.npz", validate=False)
    return api.plan(MODELS["small_cnn"](), cfg, evaluator=evaluator)


@pytest.mark.parametrize("target", [0.5, 0.9])
def test_agreement_target_with_a_fake_evaluator(target: float, tmp_path: Path) -> None:
    ev = RankEvaluator()
    plan = _agreement_plan(f"agreement:{target}", tmp_path, ev)
    b = plan.budget
    assert b is not None and b.metric == "agreement"
    assert b.after >= target and b.held_out == pytest.approx(b.after - 0.01)
    assert b.evaluations == len(ev.calls) and ev.calls[-1] == "held-out" and ev.calls.count("held-out") == 1
    assert len(ev.calls) <= 12  # data-light: at most 1 + 10 bisection steps + 1 held-out


def test_looser_agreement_target_compresses_more(tmp_path: Path) -> None:
    loose, tight = (_agreement_plan(f"agreement:{t}", tmp_path, RankEvaluator()).budget for t in (0.5, 0.9))
    assert loose is not None and tight is not None
    assert loose.macs_fraction < tight.macs_fraction  # type: ignore[operator]


def test_agreement_target_needs_data() -> None:
    with pytest.raises(UsageError, match="needs --data"):
        CompressionConfig.from_options(target="agreement:0.99")


def test_macs_target_with_latency_aware_meets_the_target_with_chains_that_pay() -> None:
    """A layer whose chain is slow in the (fake) runtime is left out of the allocation and kept; the
    other layers take the whole budget, so the MAC target still holds after the rewrite."""
    from tests.test_latency import FakeTimer

    model = make_conv_stack(layers=3, C=32, rank=6, seed=1)
    layer = _layers(model)[0]
    h = handler_for(layer)
    macs0 = h.cost(layer, "original")[1]

    def speedup(kind: str, ranks: tuple[int, ...]) -> float:  # a chain pays only below 0.36 of the MACs
        return 0.4 * macs0 / h.cost(layer, kind, ranks)[1]  # type: ignore[operator]

    timer = FakeTimer(speedup)
    plan = api.plan(model, CompressionConfig.from_options(target="macs:0.5", latency_aware=True, validate=False), timer=timer)
    totals = plan.totals()
    assert totals["macs_after"] <= 0.5 * totals["macs_before"]
    assert plan.decomposed and all(lp.time_speedup is not None and lp.time_speedup >= 1.1 for lp in plan.decomposed)
    assert all(lp.decomposed or "in the runtime" in (lp.reason or "") or "kept by --target" in (lp.reason or "")
               for lp in plan.layers)
    # Without the timer the same target spends the budget on chains that do not pay.
    plain = api.plan(model, CompressionConfig.from_options(target="macs:0.5", validate=False))
    assert any(speedup(lp.kind, lp.ranks) < 1.1 for lp in plain.decomposed if lp.ranks)
