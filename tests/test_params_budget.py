"""A joint MAC and parameter budget for ranks chosen on calibration data (`--ranks data:F --target
params:G --calibrate DATA`, issue 18).

The allocator (`numerics.paramalloc`) against brute force on small candidate sets; the whole path on a
tiny CNN whose fully-connected layer holds most parameters but few MACs (what a MAC budget alone leaves
nearly whole); the refusals."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from typer.testing import CliRunner

from onnx_tucker import api
from onnx_tucker.cli import app
from onnx_tucker.config import BudgetTarget, CompressionConfig, RankPolicy
from onnx_tucker.errors import UsageError
from onnx_tucker.graph.fold import float_parameter_count
from onnx_tucker.numerics.paramalloc import Priced, allocate_macs_and_params, pareto
from onnx_tucker.numerics.rankalloc import RankCandidate, allocate_macs
from tests.helpers import _finish, _init, he_normal, save

# ---- the allocator ---------------------------------------------------------------------------------


def _instance(rng: random.Random, layers: int, per_layer: int) -> tuple[list[list[RankCandidate]], dict[tuple[int, tuple[int, ...]], int]]:
    """Random layers: the original (MACs m0, params p0, error 0) and candidates below it on both."""
    out, params = [], {}
    for i in range(layers):
        m0, p0 = rng.randint(20, 100), rng.randint(20, 100)
        cands = [RankCandidate("original", (), m0, 0.0)]
        params[(i, ())] = p0
        for j in range(rng.randint(1, per_layer)):
            cands.append(RankCandidate("svd", (j,), rng.randint(1, m0), rng.random()))
            params[(i, (j,))] = rng.randint(1, p0)
        out.append(cands)
    return out, params


def _brute(layers: list[list[RankCandidate]], params_of, budget_macs: int, budget_params: int) -> float | None:
    best = None
    for combo in itertools.product(*layers):
        if sum(c.macs for c in combo) <= budget_macs and sum(params_of(i, c) for i, c in enumerate(combo)) <= budget_params:
            e = sum(c.error for c in combo)
            best = e if best is None else min(best, e)
    return best


@pytest.mark.parametrize("seed", range(60))
def test_joint_allocation_against_brute_force(seed: int) -> None:
    """Both budgets hold when it says so; it says so whenever brute force finds a feasible choice (not
    guaranteed in general, a two-budget knapsack, but true on these cases); it is never worse than the
    MAC-only allocation when that one happens to meet the parameter budget; and no better than brute force."""
    rng = random.Random(seed)
    layers, params = _instance(rng, rng.randint(1, 4), 5)
    total_m = sum(cs[0].macs for cs in layers)
    total_p = sum(params[(i, ())] for i in range(len(layers)))
    bm, bp = int(rng.uniform(0.2, 1) * total_m), int(rng.uniform(0.2, 1) * total_p)

    def params_of(i: int, c: RankCandidate) -> int:
        return params[(i, c.ranks)]

    a = allocate_macs_and_params(layers, bm, bp, params_of)
    assert a.macs == sum(c.macs for c in a.choice)
    assert a.params == sum(params_of(i, c) for i, c in enumerate(a.choice))
    best = _brute(layers, params_of, bm, bp)
    assert a.met == (best is not None)
    if not a.met:
        return
    assert a.macs <= bm and a.params <= bp
    err = sum(c.error for c in a.choice)
    assert err >= best - 1e-9
    mac_only = allocate_macs(layers, bm)
    if mac_only.met and sum(params_of(i, c) for i, c in enumerate(mac_only.choice)) <= bp:
        assert err <= sum(c.error for c in mac_only.choice) + 1e-9


layer_st = st.lists(st.tuples(st.integers(1, 60), st.integers(1, 60), st.floats(0, 1)), min_size=1, max_size=5)


@settings(max_examples=40, deadline=None)
@given(st.lists(layer_st, min_size=1, max_size=3), st.floats(0.05, 1.0))
def test_a_parameter_budget_that_does_not_bind_gives_the_mac_optimum(data: list, frac: float) -> None:
    """With the parameter budget at the originals' count nothing it allows is ruled out: the result is
    optimal (by brute force) among every choice with no more MACs than the MAC-only allocation's."""
    layers, params = [], {}
    for i, cands in enumerate(data):
        top_m, top_p = max(m for m, _, _ in cands) + 10, max(p for _, p, _ in cands) + 10
        layers.append([RankCandidate("original", (), top_m, 0.0)] +
                      [RankCandidate("svd", (j,), m, e) for j, (m, _, e) in enumerate(cands)])
        params[(i, ())] = top_p
        params.update({(i, (j,)): p for j, (_, p, _) in enumerate(cands)})

    def params_of(i: int, c: RankCandidate) -> int:
        return params[(i, c.ranks)]

    budget = int(frac * sum(cs[0].macs for cs in layers))
    loose = sum(params[(i, ())] for i in range(len(layers)))
    a = allocate_macs_and_params(layers, budget, loose, params_of)
    mac_only = allocate_macs(layers, budget)
    assert a.met == mac_only.met
    if not a.met:
        return
    err = sum(c.error for c in a.choice)
    assert err <= sum(c.error for c in mac_only.choice) + 1e-9
    for combo in itertools.product(*layers):
        if sum(c.macs for c in combo) <= mac_only.macs:
            assert sum(c.error for c in combo) >= err - 1e-9


def test_an_unreachable_parameter_budget_says_the_least_found() -> None:
    layers = [[RankCandidate("original", (), 100, 0.0), RankCandidate("svd", (1,), 40, 0.3)],
              [RankCandidate("original", (), 10, 0.0), RankCandidate("svd", (1,), 8, 0.1)]]
    params = {(0, ()): 10, (0, (1,)): 9, (1, ()): 100, (1, (1,)): 60}
    a = allocate_macs_and_params(layers, 60, 20, lambda i, c: params[(i, c.ranks)])
    assert not a.met and a.least_params == 69  # both decomposed: 9 + 60 parameters is the least at 48 MACs
    b = allocate_macs_and_params(layers, 5, 1000, lambda i, c: params[(i, c.ranks)])
    assert not b.met and b.least_params is None  # the MAC budget itself is out of reach


def test_pareto_keeps_exactly_the_undominated_candidates() -> None:
    rng = random.Random(3)
    cands = [Priced(RankCandidate("svd", (j,), rng.randint(1, 20), rng.randint(0, 5) / 5), rng.randint(1, 20), 0.0)
             for j in range(200)]
    front = pareto(cands)

    def beats(a: Priced, b: Priced) -> bool:
        return a.candidate.macs <= b.candidate.macs and a.params <= b.params and a.error <= b.error

    for c in cands:
        assert any(beats(f, c) for f in front)
    for f in front:
        assert not any(beats(g, f) and g is not f for g in front)


# ---- the whole path --------------------------------------------------------------------------------


def _fc_heavy_cnn(seed: int = 0) -> onnx.ModelProto:
    """x [N, 3, 16, 16] -> conv1 3x3 16 -> Relu -> conv2 3x3 32 stride 2 -> Relu -> Flatten -> fc1 (2048 ->
    64) -> Relu -> fc2 (64 -> 10): the convs hold most MACs, fc1 most parameters (as a VGG's classifier)."""
    rng = np.random.default_rng(seed)
    inits = [
        _init("conv1.W", he_normal(rng, (16, 3, 3, 3))), _init("conv1.B", np.zeros(16, np.float32)),
        _init("conv2.W", he_normal(rng, (32, 16, 3, 3))), _init("conv2.B", np.zeros(32, np.float32)),
        _init("fc1.W", he_normal(rng, (64, 2048))), _init("fc1.B", np.zeros(64, np.float32)),
        _init("fc2.W", he_normal(rng, (10, 64))), _init("fc2.B", np.zeros(10, np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv1.W", "conv1.B"], ["h1"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
        helper.make_node("Conv", ["a1", "conv2.W", "conv2.B"], ["h2"], name="conv2", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["h2"], ["a2"], name="relu2"),
        helper.make_node("Flatten", ["a2"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "fc1.W", "fc1.B"], ["h3"], name="fc1", transB=1),
        helper.make_node("Relu", ["h3"], ["a3"], name="relu3"),
        helper.make_node("Gemm", ["a3", "fc2.W", "fc2.B"], ["logits"], name="fc2", transB=1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])
    return _finish(nodes, [x], [y], inits, name="fc_heavy")


@pytest.fixture(scope="module")
def fc_heavy(tmp_path_factory: pytest.TempPathFactory) -> tuple[onnx.ModelProto, Path]:
    model = _fc_heavy_cnn()
    cal = tmp_path_factory.mktemp("cal") / "cal.npz"
    np.savez(cal, x=np.random.default_rng(1).standard_normal((80, 3, 16, 16)).astype(np.float32))
    return model, cal


def _macs(res: api.CompressionResult) -> float:
    return res.totals.macs_after / res.totals.macs_before


def test_data_ranks_with_a_params_target_meet_both_budgets(fc_heavy: tuple[onnx.ModelProto, Path]) -> None:
    model, cal = fc_heavy
    before = float_parameter_count(model)
    mac_only = api.compress(model, CompressionConfig(ranks=RankPolicy.parse("data:0.5"), calibrate=str(cal), validate=False))
    both = api.compress(model, CompressionConfig(ranks=RankPolicy.parse("data:0.5"), target=BudgetTarget.parse("params:0.2"),
                                                 calibrate=str(cal), validate=False))
    assert _macs(mac_only) <= 0.5 and _macs(both) <= 0.5
    after = float_parameter_count(both.model)  # type: ignore[arg-type]
    assert after <= 0.2 * before
    assert after == both.totals.params_after  # the report counts what was written
    assert float_parameter_count(mac_only.model) > 0.2 * before  # type: ignore[arg-type]  # the MAC budget alone leaves more
    check = both.budget_check
    assert check is not None and check.met and check.params_budget == int(0.2 * before) and check.params_after == after
    assert mac_only.budget_check is not None and mac_only.budget_check.params_budget is None
    for lp in both.plan.layers:
        assert lp.decomposed or "params:0.2" in (lp.reason or "")  # kept layers name both budgets
        assert not lp.decomposed or lp.policy == "data:0.5"


def test_cli_report_and_summary_say_the_params_budget(fc_heavy: tuple[onnx.ModelProto, Path], tmp_path: Path) -> None:
    model, cal = fc_heavy
    src, out, rep = save(model, tmp_path / "m.onnx"), tmp_path / "out.onnx", tmp_path / "r.json"
    r = CliRunner().invoke(app, ["compress", str(src), str(out), "--ranks", "data:0.5", "--target", "params:0.2",
                                 "--calibrate", str(cal), "--no-validate", "--report", str(rep)])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "MAC budget --ranks data:0.5 --target params:0.2" in text and "parameters (0.2 of" in text and "(met)" in text
    b = json.loads(rep.read_text())["mac_budget"]
    assert b["met"] and b["params_fraction"] == 0.2 and b["params_after"] <= b["params_budget"]
    assert b["params_after"] == float_parameter_count(onnx.load(out))
    assert b["params_achieved"] <= 0.2


def test_unreachable_params_budget_is_one_clear_line(fc_heavy: tuple[onnx.ModelProto, Path], tmp_path: Path) -> None:
    model, cal = fc_heavy
    src, out = save(model, tmp_path / "m.onnx"), tmp_path / "out.onnx"
    r = CliRunner().invoke(app, ["compress", str(src), str(out), "--ranks", "data:0.5", "--target", "params:0.001",
                                 "--calibrate", str(cal), "--no-validate"])
    assert r.exit_code == 2 and not out.exists()
    assert "the least found at that MAC fraction is" in r.output and "use a larger G or F" in r.output


@pytest.mark.parametrize("target", ["macs:0.5", "latency:0.5"])
def test_other_targets_with_data_ranks_are_refused(target: str, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="only --target params:G combines with data:F"):
        CompressionConfig(ranks=RankPolicy.parse("data:0.5"), target=BudgetTarget.parse(target), calibrate=str(tmp_path))


def test_params_target_with_data_ranks_and_latency_aware_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--latency-aware: not supported"):
        CompressionConfig(ranks=RankPolicy.parse("data:0.5"), target=BudgetTarget.parse("params:0.3"),
                          calibrate=str(tmp_path), latency_aware=True)
