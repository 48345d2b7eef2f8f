"""Allocation across layers on measured per-candidate times: a whole-model *time* budget, or a MAC
budget spent where it saves time too. Pure Python.

The MAC allocation (`rankalloc.allocate_macs`) walks each layer's lower convex hull of (MACs, error);
here the cost axis is a measured time in milliseconds (a float) instead: each layer offers candidates
(its original at its own time and error 0, and the decompositions that were timed), and the greedy walk
from "everything kept" takes, step by step, the move that saves time at the least error per
millisecond until the layers' summed time is within the budget. Exact on the hulls (the Lagrangian
solution), within one step of the budget. `allocate_macs_and_time` walks the same way on a combined
cost (MACs and time, each relative to the original's) until a MAC budget is met.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .rankalloc import RankCandidate, greedy_walk, hull_by


@dataclass(frozen=True)
class TimedCandidate:
    """A `RankCandidate` with the time (ms) its layer takes that way in the runtime it was measured in."""

    candidate: RankCandidate
    ms: float

    @property
    def error(self) -> float:
        return self.candidate.error


def time_hull(cands: Sequence[TimedCandidate]) -> list[TimedCandidate]:
    """The candidates on the lower convex hull of (ms, error), slowest first, errors rising."""
    return hull_by(cands, lambda c: c.ms)


@dataclass(frozen=True)
class TimeAllocation:
    choice: tuple[TimedCandidate, ...]  # one per layer
    ms: float  # summed time of the choice
    budget_ms: float
    met: bool
    least_ms: float  # the fastest the candidates allow (every layer at its fastest)


def allocate_time(layers: Sequence[Sequence[TimedCandidate]], budget_ms: float) -> TimeAllocation:
    """One candidate per layer, summed time <= `budget_ms` at the least total error (on the hulls):
    start from each layer's slowest hull point (its original, when given) and take the cheapest
    error-per-ms step until within budget. `met` is False when even the fastest choice everywhere
    exceeds the budget (the choice is then the fastest everywhere)."""
    hulls = [time_hull(c) for c in layers]
    pos, total = greedy_walk(hulls, lambda c: c.ms, lambda c: c.ms, budget_ms)
    choice = tuple(h[p] for h, p in zip(hulls, pos, strict=True))
    ms = float(sum(c.ms for c in choice))  # summed afresh: no drift from the running total
    return TimeAllocation(choice, ms, budget_ms, total <= budget_ms, float(sum(h[-1].ms for h in hulls)))


@dataclass(frozen=True)
class MacTimeAllocation:
    choice: tuple[TimedCandidate, ...]  # one per layer
    macs: int
    ms: float
    budget_macs: int
    met: bool


def allocate_macs_and_time(layers: Sequence[Sequence[TimedCandidate]], budget_macs: int,
                           time_weight: float = 1.0) -> MacTimeAllocation:
    """One candidate per layer, total MACs <= `budget_macs`, spending the budget where it saves time as
    well: the greedy walk of `allocate_time` on a combined cost, a candidate's MACs over all layers'
    original MACs plus `time_weight` times its time over their original time (the Lagrangian of the
    two resources at that relative price), from everything kept until the MACs are within budget.
    Exact on the combined hulls: no choice of candidates at no more combined cost has less total error.
    `met` is False when the walk ends over budget (`allocate_macs` on MACs alone may still meet it)."""
    macs0 = max(sum(max(c.candidate.macs for c in cs) for cs in layers), 1)
    ms0 = sum(max(c.ms for c in cs) for cs in layers) or 1.0
    # The combined cost rides in `ms` (time_hull's axis); each point keeps its candidate.
    priced = [[TimedCandidate(c.candidate, c.candidate.macs / macs0 + time_weight * c.ms / ms0) for c in cs] for cs in layers]
    hulls = [time_hull(c) for c in priced]
    pos, _ = greedy_walk(hulls, lambda c: c.ms, lambda c: c.candidate.macs, budget_macs)
    by_id = [{id(c.candidate): c for c in cs} for cs in layers]  # back to the measured times
    choice = tuple(b[id(h[p].candidate)] for b, h, p in zip(by_id, hulls, pos, strict=True))
    macs = sum(c.candidate.macs for c in choice)
    return MacTimeAllocation(choice, macs, float(sum(c.ms for c in choice)), budget_macs, macs <= budget_macs)
