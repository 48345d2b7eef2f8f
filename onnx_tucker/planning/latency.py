"""Latency-aware selection: keep a decomposition only where the runtime says it pays.

Fewer MACs do not mean less time (the paper's "1x1 convolution" section): the two extra 1x1 convs of
a Tucker chain are memory-bound. A `LayerTimer` measures one layer's original node against its
replacement chain (runtime/layertime.py does it in onnxruntime; tests inject a deterministic fake).
`select_by_latency` keeps the planned decomposition when it is at least `min_speedup` times faster;
otherwise it tries variants that may suit the runtime better (ranks rounded down and up to SIMD-friendly
multiples, Tucker-1 instead of Tucker-2: no input-mode 1x1, or its mirror Tucker-1-in: no output-mode
1x1) and keeps the fastest that pays; when none
does, the layer is kept as it is, with the measured ratio as the reason. Pure Python: no onnxruntime.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from ..ops.layer import Layer
from ..ops.registry import handler_for
from ..types import LayerTimer, LayerTiming, timing_key
from .planner import LayerPlan, SkipCause

__all__ = ["LayerTimer", "LayerTiming", "timing_key"]  # defined in the leaf `types` (shared with runtime/)

# Multiples tried when --round-to is 1: 8 and 16 floats fill AVX2 / AVX-512 registers.
DEFAULT_ROUND_MULTIPLES = (8, 16)


class CachedLayerTimer:
    """A `LayerTimer` that measures each `timing_key` once; `measured` counts the inner timer's calls."""

    def __init__(self, inner: LayerTimer) -> None:
        self.inner = inner
        self.cache: dict[tuple[object, ...], LayerTiming | None] = {}
        self.measured = 0
        self.lookups = 0

    def measure(self, layer: Layer, kind: str, ranks: tuple[int, ...]) -> LayerTiming | None:
        self.lookups += 1
        key = timing_key(layer, kind, ranks)
        if key not in self.cache:
            self.measured += 1
            self.cache[key] = self.inner.measure(layer, kind, ranks)
        return self.cache[key]

    def measure_many(self, layer: Layer, requests: Sequence[tuple[str, tuple[int, ...]]]) -> list[LayerTiming | None]:
        """`measure` of each (kind, ranks); the ones not cached go to the inner timer together when it
        can take them at once (a child process per layer, not per pair)."""
        many = getattr(self.inner, "measure_many", None)
        missing = list(dict.fromkeys(r for r in requests if timing_key(layer, *r) not in self.cache))
        if many is not None and len(missing) > 1:
            for (kind, ranks), t in zip(missing, many(layer, missing), strict=True):
                self.measured += 1
                self.cache[timing_key(layer, kind, ranks)] = t
        return [self.measure(layer, kind, ranks) for kind, ranks in requests]


def rank_caps(layer: Layer, kind: str) -> tuple[int, ...]:
    """The largest useful rank of each mode of `kind` (the rank of the matrix it applies to)."""
    assert layer.weight_shape is not None
    handler = handler_for(layer)
    probe = np.broadcast_to(np.zeros((), np.float32), layer.weight_shape)  # shapes only, no memory
    block = handler.blocks(layer, probe)[0]
    limits = handler.rank_limits(tuple(block.shape), kind)
    return limits if limits is not None else tuple(min(m.shape) for m in handler.matrices(block, kind))


def _pays(layer: Layer, plan: LayerPlan, kind: str, ranks: tuple[int, ...]) -> bool:
    """A variant is only worth timing when it lowers both parameters and MACs and is not full rank."""
    params, macs = handler_for(layer).cost(layer, kind, ranks)
    if plan.params_before is not None and params >= plan.params_before:
        return False
    if plan.macs_before is not None and macs is not None and macs >= plan.macs_before:
        return False
    return not all(r >= c for r, c in zip(ranks, rank_caps(layer, kind), strict=True))


def variants(layer: Layer, plan: LayerPlan, multiples: Sequence[int]) -> list[tuple[str, tuple[int, ...]]]:
    """The alternatives to the planned (kind, ranks): each rank rounded down and up to each multiple
    (capped at the mode's rank), and Tucker-1 (no input-mode 1x1) at each output rank of a Tucker-2,
    Tucker-1-in (no output-mode 1x1) at each input rank."""
    assert plan.ranks is not None
    kind, ranks = plan.kind, plan.ranks
    caps = rank_caps(layer, kind)
    found: list[tuple[str, tuple[int, ...]]] = []
    for m in multiples:
        for up in (False, True):
            rr = tuple(min(math.ceil(r / m) * m if up else (r // m) * m, c) for r, c in zip(ranks, caps, strict=True))
            if min(rr) >= 1:
                found.append((kind, rr))
    if kind == "tucker2" and "tucker1" in handler_for(layer).kinds(layer):
        found += [("tucker1", (rr[0],)) for _, rr in [(kind, ranks), *found]]
    if kind == "tucker2" and "tucker1-in" in handler_for(layer).kinds(layer):
        found += [("tucker1-in", (rr[1],)) for k, rr in [(kind, ranks), *found] if k == "tucker2"]
    seen = {(kind, ranks)}
    out = []
    for v in found:
        if v not in seen and _pays(layer, plan, *v):
            seen.add(v)
            out.append(v)
    return out


def _with_timing(plan: LayerPlan, t: LayerTiming | None) -> LayerPlan:
    if t is None:
        return plan
    return replace(plan, time_before_ms=t.original_ms, time_after_ms=t.decomposed_ms)


def measure_plan(layer: Layer, plan: LayerPlan, timer: LayerTimer) -> LayerPlan:
    """The plan with its measured time before/after (decomposed layers only; others unchanged)."""
    if not plan.decomposed or plan.ranks is None:
        return plan
    return _with_timing(plan, timer.measure(layer, plan.kind, plan.ranks))


def select_by_latency(
    layer: Layer, plan: LayerPlan, timer: LayerTimer, min_speedup: float = 1.1,
    multiples: Sequence[int] = DEFAULT_ROUND_MULTIPLES,
) -> LayerPlan:
    """Keep `plan` where its measured speed-up is >= `min_speedup`; else the fastest variant that is;
    else the layer as it is, with the measured ratio as the reason."""
    if not plan.decomposed or plan.ranks is None:
        return plan
    first = timer.measure(layer, plan.kind, plan.ranks)
    if first is None:
        return replace(plan, policy=plan.policy + ";latency: not timed (input shape unknown)")
    if first.speedup >= min_speedup:
        return _with_timing(replace(plan, policy=plan.policy + f";latency: x{first.speedup:.2f}"), first)
    tried: list[tuple[str, tuple[int, ...], LayerTiming]] = [(plan.kind, plan.ranks, first)]
    for kind, ranks in variants(layer, plan, multiples):
        t = timer.measure(layer, kind, ranks)
        if t is not None:
            tried.append((kind, ranks, t))
    paying = [v for v in tried[1:] if v[2].speedup >= min_speedup]
    if paying:
        kind, ranks, t = max(paying, key=lambda v: v[2].speedup)
        params, macs = handler_for(layer).cost(layer, kind, ranks)
        n = len(plan.evbmf_ranks or ()) if kind == plan.kind else len(ranks)
        return _with_timing(replace(
            plan, kind=kind, ranks=ranks, params_after=params, macs_after=macs,
            evbmf_ranks=(plan.evbmf_ranks or ())[:n] or None, sigma2=(plan.sigma2 or ())[:n] or None,
            policy=plan.policy + f";latency: {plan.kind} {plan.ranks} x{first.speedup:.2f} -> {kind} {ranks} "
            f"x{t.speedup:.2f} (best of {len(tried)} variants)",
        ), t)
    kind, ranks, best = max(tried, key=lambda v: v[2].speedup)
    s = best.speedup
    why = f"slower in the runtime (x{s:.2f})" if s < 1 else f"too little gain in the runtime (x{s:.2f} < --min-speedup {min_speedup:g})"
    return _with_timing(replace(
        plan, kind="skip", params_after=plan.params_before, macs_after=plan.macs_before,
        policy=plan.policy + ";latency: kept",
        reason=f"{why}; best of {len(tried)} variants ({kind} {'/'.join(map(str, ranks))}); kept as is",
        cause=SkipCause.SLOWER,
    ), best)


@dataclass(frozen=True)
class LayerAllocation:
    """One layer under an allocation on measured time: chains timed, how many paid, the best speed-up
    measured, the original's time and the chosen candidate's (ms)."""

    name: str
    timed: int
    paying: int
    best_speedup: float | None
    original_ms: float | None
    chosen_ms: float | None


@dataclass(frozen=True)
class TimedAllocation:
    """What an allocation on measured per-layer time chose (`calibration/latency_alloc.py`): under a
    MAC budget (`mode` "macs": --ranks data:F --latency-aware) or a time budget ("latency": --target
    latency:F --calibrate). Times are the layers' summed times alone in `runtime` (every layer, the
    ones outside the allocation as applied); `timed`: chains timed for the allocation."""

    runtime: str
    mode: str
    option: str
    min_speedup: float
    multiple: int  # the SIMD-friendly rank multiple
    layers: int  # layers allocated on the data
    layers_paying: int  # ... with at least one chain at --min-speedup or faster
    layers_decomposed: int
    timed: int
    most_per_layer: int
    time_before_ms: float
    time_after_ms: float
    budget_ms: float | None
    macs_before: int
    macs_after: int
    macs_budget: int | None
    per_layer: tuple[LayerAllocation, ...] = ()

    @property
    def speedup(self) -> float | None:
        """Summed original time / summed allocated time (>= 1: never slower)."""
        return self.time_before_ms / self.time_after_ms if self.time_after_ms > 0 else None


@dataclass(frozen=True)
class LatencySummary:
    """How the per-layer timings were made, and how well they add up to a whole-model profile."""

    threads: int
    min_speedup: float
    measured: int  # pairs actually timed (identical layers share one)
    lookups: int  # timings asked for
    # The sum of every layer's isolated original time against the same kernels in onnxruntime's
    # profile of the whole original model (None when not profiled).
    isolated_ms: float | None = None
    profiled_ms: float | None = None
    layout_ms: float | None = None  # NCHWc reorders in the whole model, in neither sum
    profile_runs: int = 0
    layers_summed: int = 0
    # --plan with --latency-aware: the plan file's kinds and ranks replay exactly; layers are only timed
    timed_only: bool = False
    runtime: str = "ort"  # --latency-runtime: where the layers were timed
    # --ranks data:F --latency-aware / --target latency:F --calibrate: the allocation on measured time
    allocation: TimedAllocation | None = None

    @property
    def profile_ratio(self) -> float | None:
        """isolated / profiled: 1 when the per-layer timings add up to the model's own."""
        if self.isolated_ms is None or not self.profiled_ms:
            return None
        return self.isolated_ms / self.profiled_ms
