"""Ranks chosen on the calibration data *and* each layer's measured time: `--ranks data:F --latency-aware`
(a MAC budget) and `--target latency:F --calibrate` (a time budget).

`rankselect.select_ranks_data` gives every covered layer its candidates (kind, ranks, MACs, output
error on the data); `LatencyAllocator` takes its place as the allocator:

1. Per layer, only SIMD-friendly ranks are kept (`simd_candidates`: multiples of 8, or of --round-to),
   and of those only the lower convex hulls of (MACs, error): the only points an allocation picks.
2. An allocation on MACs alone says where on each hull the budget lands; at most `per_layer` points
   near it (an equal share of each kind's own hull, and each kind's cheapest: `to_time`) are timed
   against the original layer with the `LayerTimer` (cached per shape and ranks). A candidate's time is the layer's original time (median over its
   pairs) divided by the pair's measured speed-up, so drift between pairs does not reorder them.
3. Candidates not at least `min_speedup` times faster than the original are dropped; "keep the layer"
   stays. The MAC budget is then allocated on what is left, spent where it saves time too
   (`timealloc.allocate_macs_and_time`: MACs and time priced together, `TIME_WEIGHT`; on MACs alone,
   `rankalloc.allocate_macs`, when that walk misses), or the time budget on the measured times
   (`timealloc.allocate_time`); either meets its budget within one step of the timed ranks, or raises
   saying why. Every layer ends as the original or a chain measured faster,
   so the layers' summed time is never above the original's in the runtime they were timed in.

Layers outside the error model keep their weight-space plan, as in `rankselect`, after latency-aware
selection (`planning.latency.select_by_latency`, as the plan stage will apply it): their MACs and time
count as applied.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from ..errors import PlanError, UsageError
from ..numerics.rankalloc import Allocation, RankCandidate, allocate_macs, lower_hull
from ..numerics.timealloc import TimedCandidate, allocate_macs_and_time, allocate_time
from ..ops.layer import Layer
from ..ops.registry import handler_for
from ..planning.budget import BudgetOutcome
from ..planning.latency import LayerAllocation, TimedAllocation, rank_caps, select_by_latency
from ..planning.planner import LayerPlan, PlannedRanks, SkipCause
from ..types import LayerTimer

SIMD_MULTIPLE = 8  # ranks in multiples of 8 floats fill AVX2 registers (and NCHWc blocks of 8)
TIMED_PER_LAYER = 12  # chains timed per layer at most: 4 per kind for a spatial conv (Tucker-2, Tucker-1, spatial SVD)
# Under a MAC budget, the relative price of time against MACs (each as a share of the original's) the
# budget is spent at. CIFAR ResNet-56, data:0.5, 200 calibration images, onnxruntime 1 thread, on the
# same timings: 0 (MACs alone) gave x1.24 the summed layer time at a summed output error of 4.33; 1 gave
# x1.32 at 4.55; 4 gave x1.36 at 4.86.
TIME_WEIGHT = 1.0


def friendly_ranks(cap: int, multiple: int) -> list[int]:
    """Ranks below `cap` in multiples of `multiple`; of multiple / 2 when that leaves fewer than two."""
    ranks = list(range(multiple, cap, multiple))
    if len(ranks) < 2 and multiple > 1:
        ranks = list(range(max(multiple // 2, 1), cap, max(multiple // 2, 1)))
    return ranks


def simd_candidates(layer: Layer, cands: Sequence[RankCandidate], multiple: int) -> list[RankCandidate]:
    """The original and each kind of `cands` at SIMD-friendly ranks (`friendly_ranks` per mode) that
    costs fewer MACs than the original. A rank tuple not among `cands` (Tucker-2 input ranks lie on a
    grid) takes the error of the candidate with, on each mode, the largest rank not above it: more rank
    loses no more on the data, so that error bounds it from above."""
    original = next(c for c in cands if c.kind == "original")
    handler = handler_for(layer)
    out = [original]
    tables: dict[str, dict[tuple[int, ...], RankCandidate]] = {}
    for c in cands:
        if c.kind != "original":
            tables.setdefault(c.kind, {})[c.ranks] = c
    for kind, table in tables.items():
        caps = rank_caps(layer, kind)
        present = [sorted({r[m] for r in table}) for m in range(len(caps))]
        wanted = [friendly_ranks(cap, multiple) for cap in caps]
        for ranks in itertools.product(*wanted):
            base = tuple(max((p for p in present[m] if p <= r), default=0) for m, r in enumerate(ranks))
            if base not in table:
                continue
            macs = handler.cost(layer, kind, ranks)[1]
            if macs is None or macs >= original.macs:
                continue
            out.append(RankCandidate(kind, tuple(ranks), int(macs), table[base].error))
    return out


def to_time(cands: Sequence[RankCandidate], near_macs: int, most: int) -> list[RankCandidate]:
    """At most `most` decompositions of a layer to time: on each kind's own lower hull of (MACs,
    error) (a runtime may run one kind well and not the other: Tucker-1 has no input-mode 1x1), an
    equal share of the points nearest in log-MACs to `near_macs` (where an allocation on MACs alone
    lands), the cheaper on ties, and always the kind's cheapest."""
    original = next(c for c in cands if c.kind == "original")
    kinds = list(dict.fromkeys(c.kind for c in cands if c.kind != "original"))
    if not kinds or most < 1:
        return []
    share = max(most // len(kinds), 1)
    picked: list[RankCandidate] = []
    for kind in kinds:
        hull = [c for c in lower_hull([original, *(c for c in cands if c.kind == kind)]) if c.kind != "original"]
        if not hull:
            continue
        target = math.log(max(near_macs, 1))
        near = sorted(range(len(hull)), key=lambda j: (abs(math.log(max(hull[j].macs, 1)) - target), hull[j].macs))[:share]
        if len(hull) - 1 not in near:  # hull: MACs descending, the cheapest last
            near[-1] = len(hull) - 1
        picked += [hull[j] for j in sorted(near)]
    return picked[:most]


class LatencyAllocator:
    """A `rankselect.Allocator` on measured time (see the module docstring). `mode` "macs": the budget
    `select_ranks_data` gives; "latency": `fraction` of the layers' summed original time (then call
    `select_ranks_data` with fraction 1, which leaves the MACs free). After the call, `result` says what
    was timed and chosen, and `annotate` gives the plan the reasons of the layers kept whole."""

    def __init__(
        self, layers: Sequence[Layer], fallback: Sequence[LayerPlan], timer: LayerTimer, *, mode: str, fraction: float,
        option: str, min_speedup: float = 1.1, multiple: int = SIMD_MULTIPLE, per_layer: int = TIMED_PER_LAYER,
        runtime: str = "ort", round_multiples: Sequence[int] = (8, 16), time_weight: float = TIME_WEIGHT,
        measure_original: Callable[[Layer], float | None] | None = None,
        progress: Callable[[str, int, int], None] | None = None,
    ) -> None:
        assert mode in ("macs", "latency"), mode
        self.layers, self.fallback, self.timer = list(layers), list(fallback), timer
        self.mode, self.fraction, self.option = mode, fraction, option
        self.min_speedup, self.multiple, self.per_layer, self.runtime = min_speedup, multiple, per_layer, runtime
        self.round_multiples, self.measure_original, self.progress = tuple(round_multiples), measure_original, progress
        self.time_weight = time_weight
        self.result: TimedAllocation | None = None
        self.kept: dict[str, str] = {}  # covered layer -> why it is kept whole (no chain pays)
        self.options: list[list[TimedCandidate]] = []

    # ---- the layers outside the error model, as the plan stage will apply them ----------------------

    def _fixed(self, covered: set[str]) -> tuple[int, int, float, float]:
        """(MACs select_ranks_data counted for them, MACs as applied, ms before, ms as applied)."""
        counted = applied_macs = 0
        before_ms = after_ms = 0.0
        for lay, p in zip(self.layers, self.fallback, strict=True):
            if lay.layer_id in covered:
                continue
            counted += int(p.macs_after or p.macs_before or 0)
            applied = p
            if p.decomposed and p.ranks is not None and not lay.skip_reason:
                applied = select_by_latency(lay, p, self.timer, self.min_speedup, self.round_multiples)
            applied_macs += int((applied.macs_after if applied.decomposed else applied.macs_before) or 0)
            t0 = applied.time_before_ms
            if t0 is None and self.measure_original is not None and lay.weight_shape is not None and lay.node_index >= 0:
                t0 = self.measure_original(lay)
            if t0 is not None:
                before_ms += t0
                after_ms += applied.time_after_ms if applied.decomposed and applied.time_after_ms is not None else t0
        return counted, applied_macs, before_ms, after_ms

    # ---- the allocation ------------------------------------------------------------------------------

    def __call__(self, covered: Sequence[Layer], candidates: Sequence[Sequence[RankCandidate]], budget: int) -> Allocation:
        counted, fixed_macs, fixed_before_ms, fixed_after_ms = self._fixed({lay.layer_id for lay in covered})
        total_macs = sum(int(p.macs_before or 0) for p in self.fallback)
        simd = [simd_candidates(lay, cs, self.multiple) for lay, cs in zip(covered, candidates, strict=True)]
        hulls = [lower_hull(s) for s in simd]
        covered_macs = sum(h[0].macs for h in hulls)
        if self.mode == "macs":
            mac_budget = budget - (fixed_macs - counted)  # the fallback layers' MACs as applied
        else:  # where the time budget would land if time followed MACs
            mac_budget = math.floor(self.fraction * (covered_macs + fixed_macs)) - fixed_macs
        guess = allocate_macs(hulls, max(mac_budget, 0)).choice  # where MACs alone would put each layer
        options: list[list[TimedCandidate]] = []
        per_layer: list[LayerAllocation] = []
        lookups = 0
        for i, (lay, hull) in enumerate(zip(covered, hulls, strict=True)):  # noqa: B007 - hull[0]: the original
            if self.progress is not None:
                self.progress(f"timing {lay.layer_id}", i, len(covered))
            asked = to_time(simd[i], guess[i].macs, self.per_layer)
            lookups += len(asked)
            many = getattr(self.timer, "measure_many", None)  # one child per layer for a child-process runtime
            reqs = [(c.kind, c.ranks) for c in asked]
            got = many(lay, reqs) if many is not None else [self.timer.measure(lay, *r) for r in reqs]
            timed = [(c, t) for c, t in zip(asked, got, strict=True) if t is not None]
            original = hull[0]
            if not timed:
                ms = self.measure_original(lay) if self.measure_original is not None else None
                options.append([TimedCandidate(original, ms or 0.0)])
                per_layer.append(LayerAllocation(lay.layer_id, 0, 0, None, ms, ms))
                if len(hull) > 1:
                    self.kept[lay.layer_id] = f"could not be timed in {self.runtime} (input shape or dtype); kept as is"
                continue
            base = float(np.median([t.original_ms for _, t in timed]))
            paying = [TimedCandidate(c, base / t.speedup) for c, t in timed if t.speedup >= self.min_speedup]
            options.append([TimedCandidate(original, base), *paying])
            best = max(t.speedup for _, t in timed)
            per_layer.append(LayerAllocation(lay.layer_id, len(timed), len(paying), best, base, base))
            if not paying:
                why = f"slower in {self.runtime} (x{best:.2f})" if best < 1 else \
                    f"too little gain in {self.runtime} (x{best:.2f} < --min-speedup {self.min_speedup:g})"
                self.kept[lay.layer_id] = (f"{why}: best of the {len(timed)} SIMD-friendly ranks timed on its "
                                           f"error/MAC hull; kept as is by {self.option} --latency-aware")
        if self.progress is not None and covered:
            self.progress("timing", len(covered), len(covered))
        self.options = options  # per covered layer: the original and its chains that pay, with their times
        total_ms = fixed_before_ms + sum(o[0].ms for o in options)
        if self.mode == "macs":
            both = allocate_macs_and_time(options, max(mac_budget, 0), self.time_weight)
            if both.met:
                choice = list(both.choice)
            else:  # the combined walk can end over budget where MACs alone still meet it
                alloc = allocate_macs([[o.candidate for o in opts] for opts in options], max(mac_budget, 0))
                if not alloc.met:
                    self._unmet_macs(options, fixed_macs, total_macs)
                choice = [next(o for o in opts if o.candidate == c) for opts, c in zip(options, alloc.choice, strict=True)]
            budget_ms = None
        else:
            budget_ms = self.fraction * total_ms - fixed_after_ms
            t_alloc = allocate_time(options, budget_ms)
            if not t_alloc.met:
                self._unmet_time(t_alloc.least_ms + fixed_after_ms, total_ms)
            choice = list(t_alloc.choice)
        macs = sum(c.candidate.macs for c in choice)
        per_layer = [replace(pl, chosen_ms=c.ms) for pl, c in zip(per_layer, choice, strict=True)]
        after_ms = fixed_after_ms + sum(c.ms for c in choice)
        self.result = TimedAllocation(
            runtime=self.runtime, mode=self.mode, option=self.option, min_speedup=self.min_speedup,
            multiple=self.multiple, layers=len(covered), layers_paying=sum(pl.paying > 0 for pl in per_layer),
            layers_decomposed=sum(c.candidate.kind != "original" for c in choice), timed=lookups,
            most_per_layer=max((pl.timed for pl in per_layer), default=0), time_before_ms=total_ms,
            time_after_ms=after_ms, budget_ms=None if budget_ms is None else budget_ms + fixed_after_ms,
            macs_before=total_macs, macs_after=macs + fixed_macs,
            macs_budget=None if self.mode != "macs" else mac_budget + fixed_macs, per_layer=tuple(per_layer),
        )
        return Allocation(tuple(c.candidate for c in choice), macs, max(mac_budget, 0), True)

    def _unmet_macs(self, options: list[list[TimedCandidate]], fixed_macs: int, total_macs: int) -> None:
        least = fixed_macs + sum(min(o.candidate.macs for o in opts) for opts in options)
        none = sum(len(opts) == 1 for opts in options)
        share = least / max(total_macs, 1)
        fix = (f"use a fraction of at least {math.ceil(share * 100) / 100:g}, a lower --min-speedup, or leave out "
               "--latency-aware" if share < 1 else "lower --min-speedup, or leave out --latency-aware")
        raise UsageError(
            f"{self.option} --latency-aware: cannot keep the MACs at {self.fraction:g} of the original with chains "
            f"at least --min-speedup {self.min_speedup:g} times faster than their layer in {self.runtime}: {none} of "
            f"{len(options)} layers have none among the SIMD-friendly ranks timed, and the least the model reaches "
            f"with the others is {share:.3f} of its MACs; {fix}"
        )

    def _unmet_time(self, least_ms: float, total_ms: float) -> None:
        share = least_ms / total_ms if total_ms else 1.0
        raise PlanError(
            f"{self.option}: cannot be met: with the chains at least --min-speedup {self.min_speedup:g} times faster "
            f"than their layer in {self.runtime}, the layers' summed time reaches at least {share:.3f} of the original "
            f"({least_ms:.3f} of {total_ms:.3f} ms); the least reachable is about latency:{share:.3g}"
        )

    # ---- what the plan and the report say ----------------------------------------------------------

    def annotate(self, planned: PlannedRanks) -> PlannedRanks:
        """`planned` with the reasons of the layers kept whole: no chain paid, or (time budget) the budget."""
        reasons, causes = dict(planned.reasons), dict(planned.causes)
        policy = planned.policy
        if self.mode == "latency":
            policy = f"target {self.option.removeprefix('--target ')}"
            for name, cause in causes.items():
                if cause is SkipCause.BUDGET and name in reasons and reasons[name].startswith("kept by --ranks data"):
                    reasons[name] = (f"kept by {self.option}: decomposing it costs more output error per ms saved "
                                     "than the layers that were decomposed")
        for name, why in self.kept.items():
            reasons[name], causes[name] = why, SkipCause.SLOWER
        return PlannedRanks(dict(planned.entries), planned.source if self.mode == "macs" else self.option,
                            reasons=reasons, policy=policy, causes=causes, notes=dict(planned.notes))

    def outcome(self, target: str) -> BudgetOutcome | None:
        """The time budget's outcome as `--target latency:F` reports it (None under a MAC budget)."""
        r = self.result
        if r is None or self.mode != "latency":
            return None
        return BudgetOutcome(target=target, metric="latency", fraction=self.fraction, before=r.time_before_ms,
                             after=r.time_after_ms, layers_decomposed=r.layers_decomposed, layers_considered=r.layers,
                             steps=0, step=self.multiple, macs_fraction=r.macs_after / r.macs_before if r.macs_before else None,
                             evaluations=1, method="data")
