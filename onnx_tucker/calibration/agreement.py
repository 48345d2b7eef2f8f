"""`--target agreement:F --calibrate DATA --data D`: the agreement search on the calibrated pipeline.

The search is planning/budget.py's (`agreement_budget_plan`: bisect the MAC fraction, measure each
candidate's top-1 agreement with the original on half of D, the result once more on the other half),
with the two parts `compress --calibrate` changes: at each fraction the ranks are the calibration
data's allocation (`rankselect`: the per-layer output error curves are computed once, in one
statistics pass, and only re-allocated per fraction), and every candidate model is refit on the
calibration data before it is measured, as the result will be.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..config import BudgetTarget
from ..numerics.rankalloc import Allocation, RankCandidate, allocate_macs
from ..ops.layer import Layer
from ..planning.budget import BudgetOutcome, PlanAt
from ..planning.planner import PlannedRanks, SkipCause
from .rankselect import DataRankSelection


class CapturingAllocator:
    """A `rankselect.Allocator` that allocates as the default does and keeps the covered layers and
    their candidates, so they can be allocated again at other budgets."""

    def __init__(self) -> None:
        self.covered: list[Layer] = []
        self.candidates: list[list[RankCandidate]] = []

    def __call__(self, covered: Sequence[Layer], candidates: Sequence[Sequence[RankCandidate]], budget: int) -> Allocation:
        self.covered, self.candidates = list(covered), [list(c) for c in candidates]
        return allocate_macs(self.candidates, budget)


def data_plan_at(selection: DataRankSelection, captured: CapturingAllocator, target: BudgetTarget) -> tuple[PlanAt, float]:
    """The calibration data's allocation at any MAC fraction (as a plan to replay and its outcome), and
    the least fraction it reaches (rank 1 everywhere, the other layers at their fallback plan)."""
    total, fixed, template = selection.total_macs, selection.fixed_macs, selection.planned
    least = (fixed + sum(min(c.macs for c in cs) for cs in captured.candidates)) / max(total, 1)
    why = (f"kept by --target {target}: decomposing it costs more output error per MAC saved (on the calibration "
           "data) than the layers that were decomposed")

    def plan_at(fraction: float) -> tuple[PlannedRanks, BudgetOutcome]:
        alloc = allocate_macs(captured.candidates, max(math.floor(fraction * total) - fixed, 0))
        entries, reasons, causes = dict(template.entries), dict(template.reasons), dict(template.causes)
        for lay, c in zip(captured.covered, alloc.choice, strict=True):
            name = lay.layer_id
            if c.kind == "original":
                entries[name], reasons[name], causes[name] = ("skip", None, lay.weight_shape), why, SkipCause.BUDGET
            else:
                entries[name] = (c.kind, c.ranks, lay.weight_shape)
                reasons.pop(name, None)
                causes.pop(name, None)
        decomposed = sum(e[0] != "skip" for e in entries.values())
        planned = PlannedRanks(entries, f"--target {target}", reasons=reasons, policy=f"target {target}", causes=causes)
        outcome = BudgetOutcome(target=str(target), metric="macs", fraction=fraction, before=total, after=fixed + alloc.macs,
                                layers_decomposed=decomposed, layers_considered=len(entries), steps=0, step=1,
                                method="data")
        return planned, outcome

    return plan_at, least
