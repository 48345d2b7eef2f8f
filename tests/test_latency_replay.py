"""--latency-aware with a plan or a data budget (issue 16 item 11).

`--plan P --latency-aware` replays P exactly and only times its layers (before: it silently re-selected
26 of 56 layers); `--ranks data:F --latency-aware` allocates on the measured time (issue 15, see
test_latency_alloc.py) and says plainly when its MAC budget cannot be met with faster chains. With a fake timer: no
test asserts on wall-clock time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from onnx_tucker import api
from onnx_tucker.config import CompressionConfig
from onnx_tucker.errors import UsageError
from onnx_tucker.planning.budget import BudgetCheck
from onnx_tucker.report.tables import mac_budget_line, result_tables
from tests.helpers import make_small_cnn
from tests.test_latency import FakeTimer


def _text(tables: list) -> str:  # type: ignore[type-arg]
    console = Console(width=400, record=True)
    for t in tables:
        console.print(t)
    return console.export_text()


def slower(kind: str, ranks: tuple[int, ...]) -> float:
    return 0.5  # every chain twice as slow as its layer: latency-aware selection keeps them all whole


def test_plan_with_latency_aware_replays_exactly_and_times(tmp_path: Path) -> None:
    model = make_small_cnn(low_rank=True)
    plan_file = tmp_path / "plan.json"
    saved = api.plan(model, CompressionConfig(validate=False), save_plan=plan_file)
    assert saved.decomposed
    timer = FakeTimer(slower)
    cfg = CompressionConfig(plan_file=str(plan_file), latency_aware=True, validate=False)
    replayed = api.plan(model, cfg, timer=timer)
    assert [(p.name, p.kind, p.ranks) for p in replayed.layers] == [(p.name, p.kind, p.ranks) for p in saved.layers]
    # Every decomposed layer timed once as planned, no variant tried, the time in the plan.
    assert sorted((n, k, r) for n, k, r in timer.calls) == sorted((p.name, p.kind, p.ranks) for p in saved.decomposed)
    assert all(p.time_before_ms == 1.0 and p.time_after_ms == 2.0 for p in replayed.decomposed)
    assert replayed.layer_timing is not None and replayed.layer_timing.timed_only
    assert "replay as they are (--plan): timed, not re-selected" in _text(result_tables(replayed))
    res = api.compress(model, cfg, timer=timer)
    assert [(p.kind, p.ranks) for p in res.plan.layers] == [(p.kind, p.ranks) for p in saved.layers]
    # Without --plan the same timer reverts every layer: the replay above is not a coincidence.
    assert not api.plan(model, CompressionConfig(latency_aware=True, validate=False), timer=FakeTimer(slower)).decomposed


@pytest.fixture
def cal(tmp_path: Path) -> Path:
    path = tmp_path / "cal.npz"
    np.savez(path, x=np.random.default_rng(0).standard_normal((24, 3, 16, 16)).astype(np.float32))
    return path


def test_data_budget_out_of_reach_under_latency_aware_is_said_plainly(cal: Path, tmp_path: Path) -> None:
    """--ranks data:F --latency-aware allocates on the measured time (issue 15): when no chain pays, the
    budget cannot be met with faster chains, and it says so instead of writing a model over budget."""
    model = make_small_cnn(batch="N")
    cfg = CompressionConfig(ranks="data:0.5", calibrate=str(cal), latency_aware=True, validate=False)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"--ranks data:0.5 --latency-aware: cannot keep the MACs at 0.5 .* 3 of 3 "
                                         r"layers have none .*lower --min-speedup, or leave out --latency-aware"):
        api.plan(model, cfg, timer=FakeTimer(slower), report=tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()


def test_budget_missed_is_said_plainly() -> None:
    """A plan over its MAC budget (the check stays for any path that could still miss it): the line says
    by how much and why."""
    b = BudgetCheck("--ranks data:0.5", 0.5, 1000, 500, 600, layers_kept=2)
    assert not b.met and b.over == 100 and "--latency-aware kept 2 layer(s)" in (b.cause or "")
    text = _text([mac_budget_line(b)])
    assert "BUDGET MISSED: MAC budget --ranks data:0.5" in text and "100 MACs (20.0%) over the budget" in text


def test_data_budget_met_is_reported_too(cal: Path, tmp_path: Path) -> None:
    model = make_small_cnn(batch="N")
    res = api.compress(model, CompressionConfig(ranks="data:0.5", calibrate=str(cal), validate=False))  # type: ignore[arg-type]
    b = res.budget_check
    assert b is not None and b.met and b.over == 0 and b.cause is None
    assert b.macs_after == res.totals.macs_after
    assert "MAC budget --ranks data:0.5" in _text(result_tables(res)) and "(met)" in _text(result_tables(res))
    # Other policies have no MAC budget to check.
    assert api.plan(model, CompressionConfig(validate=False)).budget_check is None
