"""Whole-model budget targets (`--target macs:0.3`, `params:0.2`): ranks for every layer at once.

Each decomposable layer offers a grid of ranks; at ranks r its kernel loses (HOSVD bound) the energy of
the singular values beyond r of each factorised unfolding, relative to the kernel's own energy, and it
costs `cost(r)` MACs (or parameters). Starting from the smallest ranks (one rank step everywhere), the
allocation repeatedly grants the rank step that wins back the most relative energy per unit of cost,
as long as the whole model stays within the budget; a layer whose next step would cost as much as the
original is offered "keep the original" instead (no error at all). The budget is thus spent where the
reconstruction error per unit saved is best, not by a uniform scale, and it ends within one rank
step of the target: no single further step fits. Pure numpy: the singular values come from the
planner's spectra. With a layer timer (--latency-aware) the allocation is timed and repeated with
cheaper ranks for the layers whose chains do not pay, so the target is met with chains that do.

`--target latency:F` searches the MAC fraction by bisection: each candidate allocation is timed layer
by layer (`planning.latency.LayerTimer`), and the least compression whose layers' summed time is F
of the original wins. `--target agreement:F` bisects it too, evaluating each candidate's top-1
agreement with the original on half of the user's data (an injected `Evaluator`).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from ..config import BudgetTarget, CompressionConfig, RankPolicy
from ..errors import PlanError
from ..numerics.spectral import LayerSpectra
from ..ops.base import OpHandler
from ..ops.layer import Layer
from ..ops.registry import handler_for
from ..types import LayerTimer
from .planner import LayerPlan, PlannedRanks, SkipCause, mode_energies, plan_layer

Ranks = tuple[int, ...]


@dataclass(frozen=True)
class RankSpace:
    """One layer's choices. `energies[m]`: squared singular values of mode m's matrix, descending,
    divided by the kernel's squared norm; `cost(ranks)`: the layer decomposed at `ranks` (a Tucker-2
    whose input rank reaches its cap is costed, and later built, as Tucker-1)."""

    name: str
    kind: str
    energies: tuple[np.ndarray, ...]
    caps: tuple[int, ...]
    original_cost: int
    cost: Callable[[Ranks], int]
    # Ranks costing this much or more are not worth it: the layer is kept instead. The original's cost,
    # unless timing showed chains this costly do not pay (budget_plan with a timer lowers it).
    keep_at: int | None = None

    @property
    def ceiling(self) -> int:
        return self.original_cost if self.keep_at is None else min(self.keep_at, self.original_cost)

    def lost(self, ranks: Ranks) -> float:
        """Relative squared reconstruction error bound at `ranks` (sum over the modes)."""
        return float(sum(float(np.sum(e[r:])) for e, r in zip(self.energies, ranks, strict=True)))


@dataclass(frozen=True)
class BudgetOutcome:
    """What the allocation chose, for the report."""

    target: str  # "macs:0.3"
    metric: str
    fraction: float
    before: float  # the whole model's MACs (or parameters; for latency: the layers' summed time, ms)
    after: float  # predicted at the chosen ranks
    layers_decomposed: int
    layers_considered: int
    steps: int  # rank steps granted
    step: int  # ranks move in multiples of this (--round-to)
    # latency / agreement: the MAC fraction the search settled on, and how many allocations it evaluated
    macs_fraction: float | None = None
    evaluations: int = 1
    # agreement: top-1 agreement with the original on the held-out half of --data, and the halves' sizes
    held_out: float | None = None
    search_samples: int = 0
    held_out_samples: int = 0
    # "data": allocated on the calibration data's error curves (with --calibrate), not on kernel energy
    method: str = ""

    @property
    def achieved(self) -> float:
        return self.after / self.before if self.before else 0.0


@dataclass(frozen=True)
class BudgetCheck:
    """A MAC budget the ranks were allocated for (`--ranks data:F`, or `--target macs:F` with
    `--calibrate`) checked against the plan as it came out: `--latency-aware` may keep layers whole or
    change their ranks after the allocation, and the plan then misses the budget. Reported, not hidden."""

    option: str  # "--ranks data:0.5"
    fraction: float
    macs_before: int
    macs_budget: int  # fraction x macs_before, rounded down
    macs_after: int  # of the plan as it will be applied
    layers_kept: int = 0  # decompositions --latency-aware reverted (slower in the runtime)
    layers_changed: int = 0  # ... or replaced by a faster variant (other ranks or kind)
    # `--target params:G` with data:F: the parameter budget (G x the model's float parameters, rounded
    # down) and the plan's parameters as `compress` counts them (every float parameter); None without it.
    params_fraction: float | None = None
    params_before: int | None = None
    params_budget: int | None = None
    params_after: int | None = None

    @property
    def achieved(self) -> float:
        return self.macs_after / self.macs_before if self.macs_before else 0.0

    @property
    def params_achieved(self) -> float | None:
        if self.params_after is None or not self.params_before:
            return None
        return self.params_after / self.params_before

    @property
    def params_over(self) -> int:
        """Parameters over their budget (0 when met or none)."""
        if self.params_after is None or self.params_budget is None:
            return 0
        return max(0, self.params_after - self.params_budget)

    @property
    def met(self) -> bool:
        return self.macs_after <= self.macs_budget and self.params_over == 0

    @property
    def over(self) -> int:
        """MACs over the budget (0 when met)."""
        return max(0, self.macs_after - self.macs_budget)

    @property
    def cause(self) -> str | None:
        if self.met:
            return None
        if self.layers_kept or self.layers_changed:
            return (f"--latency-aware kept {self.layers_kept} layer(s) whole and changed the ranks or kind of "
                    f"{self.layers_changed} after the allocation, where the allocated chain did not pay in the runtime")
        return "the applied ranks differ from the allocated ones"


def check_mac_budget(option: str, fraction: float, layers: list[LayerPlan] | tuple[LayerPlan, ...],
                     params_fraction: float | None = None, model_params: int | None = None) -> BudgetCheck:
    """The plan's MACs against `fraction` of the original's (`layers`: the final layer plans); with
    `params_fraction`, its parameters against that fraction of `model_params` (the model's whole float
    parameter count, less what the layers' plans save, as the totals count them)."""
    with_macs = [p for p in layers if p.params_before is not None and p.macs_before is not None]
    before = sum(p.macs_before or 0 for p in with_macs)
    after = sum(p.macs_after if p.macs_after is not None else (p.macs_before or 0) for p in with_macs)
    kept = sum(";latency: kept" in p.policy for p in layers)
    changed = sum(";latency:" in p.policy and " -> " in p.policy.split(";latency:", 1)[1] for p in layers)
    if params_fraction is None or model_params is None:
        return BudgetCheck(option, fraction, before, int(fraction * before), after, kept, changed)
    saved = sum((p.params_before or 0) - (p.params_after if p.params_after is not None else p.params_before or 0)
                for p in layers if p.params_before is not None)
    return BudgetCheck(option, fraction, before, int(fraction * before), after, kept, changed, params_fraction,
                       model_params, math.floor(params_fraction * model_params), model_params - saved)


def least_cost(spaces: list[RankSpace], fixed_cost: int, step: int = 1) -> int:
    """The whole model's cost at the smallest ranks everywhere (a layer that saves nothing there kept)."""
    total = fixed_cost
    for sp in spaces:
        c = sp.cost(tuple(min(step, cap) for cap in sp.caps))
        total += c if c < sp.ceiling else sp.original_cost
    return total


def allocate(
    spaces: list[RankSpace], fixed_cost: int, total_before: int, target: BudgetTarget, step: int = 1
) -> tuple[dict[str, Ranks | None], BudgetOutcome]:
    """Ranks per layer (None: keep the original) meeting `target` over `total_before`; `fixed_cost` is
    what the layers outside `spaces` cost (they are kept). Raises PlanError when even the smallest ranks
    everywhere do not meet it."""
    budget = target.fraction * total_before
    state: dict[int, Ranks | None] = {}
    cost_now: dict[int, int] = {}
    current = fixed_cost
    for i, sp in enumerate(spaces):
        low = tuple(min(step, c) for c in sp.caps)
        c = sp.cost(low)
        if c < sp.ceiling:
            state[i], cost_now[i] = low, c
        else:  # even the smallest ranks save nothing here
            state[i], cost_now[i] = None, sp.original_cost
        current += cost_now[i]
    if current > budget:
        least = current / total_before if total_before else 0.0
        raise PlanError(
            f"--target {target}: cannot be met: at the smallest ranks (rank {step} in every decomposable layer) "
            f"the model keeps {least:.4f} of its {target.metric} ({current:,} of {total_before:,}); the least "
            f"reachable is about {target.metric}:{least:.4g} (layers that are not decomposed keep their cost)"
        )
    version = dict.fromkeys(state, 0)
    heap: list[tuple[float, int, int, int, Ranks | None, int]] = []  # (-score, tiebreak, layer, version, move, its cost)
    counter = 0

    def push_moves(i: int) -> None:
        nonlocal counter
        ranks = state[i]
        if ranks is None:
            return
        sp = spaces[i]
        err = sp.lost(ranks)
        moves: list[tuple[Ranks | None, float, int]] = []
        for m, (r, cap) in enumerate(zip(ranks, sp.caps, strict=True)):
            if r >= cap:
                continue
            up = ranks[:m] + (min(r + step, cap),) + ranks[m + 1:]
            c = sp.cost(up)
            if c >= sp.ceiling:
                moves.append((None, err, sp.original_cost))
            else:
                moves.append((up, err - sp.lost(up), c))
        if all(r >= cap for r, cap in zip(ranks, sp.caps, strict=True)):
            moves.append((None, err, sp.original_cost))
        for move, gain, c in moves:
            extra = c - cost_now[i]
            score = np.inf if extra <= 0 else gain / extra
            counter += 1
            heapq.heappush(heap, (-score, counter, i, version[i], move, c))

    for i in state:
        push_moves(i)
    steps = 0
    while heap:
        _, _, i, ver, new, c = heapq.heappop(heap)
        if ver != version[i]:
            continue  # the layer moved since this was offered
        if current - cost_now[i] + c > budget:
            continue  # does not fit now, and the total only grows: never will
        current += c - cost_now[i]
        state[i], cost_now[i] = new, c
        version[i] += 1
        steps += 1
        push_moves(i)
    chosen = {sp.name: state[i] for i, sp in enumerate(spaces)}
    outcome = BudgetOutcome(
        target=str(target), metric=target.metric, fraction=target.fraction, before=total_before, after=int(current),
        layers_decomposed=sum(r is not None for r in chosen.values()), layers_considered=len(spaces), steps=steps,
        step=step,
    )
    return chosen, outcome


# ---- from a model's layers to a plan ------------------------------------------------------------


@dataclass(frozen=True)
class RankSpaces:
    """Every layer's choices for one metric: the decomposable ones, why the others are left out, and
    the layers' total cost before (`layers_before`)."""

    spaces: list[RankSpace]
    layers: dict[str, Layer]
    reasons: dict[str, str] = field(default_factory=dict)
    layers_before: int = 0
    causes: dict[str, SkipCause] = field(default_factory=dict)  # the code of each reason


def rank_spaces(
    layers: list[Layer], read_weight: Callable[[str], np.ndarray], config: CompressionConfig, metric: str, target: str
) -> RankSpaces:
    """Plan every layer at full rank (which can be decomposed, their kinds and costs) and turn its
    spectra into energies per mode. The eigendecompositions are not kept (memory): the decomposition
    pass computes them again."""
    full = replace(config, ranks=RankPolicy("full"), rank_scale=1.0, min_rank=None, round_to=1, target=None,
                   latency_aware=False, plan_file=None)
    index = 0 if metric == "params" else 1
    spaces: list[RankSpace] = []
    reasons: dict[str, str] = {}
    causes: dict[str, SkipCause] = {}
    layers_before = 0
    for layer in layers:
        spectra = LayerSpectra()
        lp = plan_layer(layer, read_weight, full, None, spectra)
        before = (lp.params_before, lp.macs_before)[index]
        layers_before += before or 0
        if not lp.decomposed or before is None or layer.shared_weight:
            if layer.skip_reason is None:
                causes[layer.layer_id] = lp.cause or SkipCause.BUDGET
                reasons[layer.layer_id] = lp.reason or (
                    f"weight shared by several layers: left out of --target {target}; kept as is" if layer.shared_weight
                    else f"MACs unknown (input shape not inferred): left out of --target {target}; kept as is")
            continue
        handler = handler_for(layer)
        energies = mode_energies(layer, read_weight(layer.weight_name or ""), lp.kind, spectra)
        caps = tuple(len(e) for e in energies)

        def cost(ranks: Ranks, layer: Layer = layer, kind: str = lp.kind, cap_in: int = caps[-1],
                 handler: OpHandler = handler) -> int:
            kind, ranks = as_built(kind, ranks, cap_in)
            return handler.cost(layer, kind, ranks)[index] or 0

        spaces.append(RankSpace(layer.layer_id, lp.kind, tuple(energies), caps, before, cost))
    return RankSpaces(spaces, {lay.layer_id: lay for lay in layers}, reasons, layers_before, causes)


def as_built(kind: str, ranks: Ranks, cap_in: int) -> tuple[str, Ranks]:
    """A Tucker-2 whose input rank reaches its cap saves nothing on the input mode: built as Tucker-1."""
    if kind == "tucker2" and ranks[1] >= cap_in:
        return "tucker1", ranks[:1]
    return kind, ranks


def planned_ranks(found: RankSpaces, chosen: dict[str, Ranks | None], target: BudgetTarget, why_kept: str) -> PlannedRanks:
    """The allocation as a plan the planner replays (`--plan`'s path), with its reasons."""
    entries: dict[str, tuple[str, Ranks | None, Ranks | None]] = {}
    reasons = dict(found.reasons)
    causes = dict(found.causes)
    for sp in found.spaces:
        ranks = chosen[sp.name]
        if ranks is None:
            entries[sp.name] = ("skip", None, None)
            reasons[sp.name] = why_kept
            causes[sp.name] = SkipCause.BUDGET
        else:
            entries[sp.name] = (*as_built(sp.kind, ranks, sp.caps[-1]), None)
    return PlannedRanks(entries, f"--target {target}", policy=f"target {target}", reasons=reasons, causes=causes)


# Rounds of "allocate, time, cap the layers whose chains do not pay" under --target with a timer.
MAX_TIMED_ROUNDS = 8


def budget_plan(
    layers: list[Layer], read_weight: Callable[[str], np.ndarray], config: CompressionConfig, target: BudgetTarget,
    total_params: int | None = None, timer: LayerTimer | None = None,
) -> tuple[PlannedRanks, BudgetOutcome]:
    """`--target macs:F` / `params:F`: `total_params` is the model's whole parameter count (biases, BN:
    what `params:F` is a fraction of); MACs are the layers' own.

    With a `timer` (--latency-aware), each allocation is timed layer by layer; a layer whose chain at the
    allocated ranks is not `config.min_speedup` times faster may from then on only take ranks that cost
    10-50 % less (`keep_at`, by how far it missed), and the budget is allocated again, until every
    allocated chain pays; after MAX_TIMED_ROUNDS rounds the layers still not paying are kept as they
    are and allocated once more without them. The target is thus met with chains that pay, instead of being overshot when
    latency-aware selection reverts them afterwards."""
    found = rank_spaces(layers, read_weight, config, target.metric, str(target))
    total = total_params if target.metric == "params" and total_params is not None else found.layers_before
    spaces = list(found.spaces)
    slow: dict[str, float] = {}  # last measured speed-up of the layers that did not pay

    def run(spaces: list[RankSpace]) -> tuple[dict[str, Ranks | None], BudgetOutcome]:
        return allocate(spaces, total - sum(sp.original_cost for sp in spaces), total, target, step=config.round_to)

    chosen, outcome = run(spaces)
    for round_ in range(MAX_TIMED_ROUNDS if timer is not None else 0):
        assert timer is not None
        not_paying: dict[str, tuple[float, int]] = {}
        for sp in spaces:
            ranks = chosen[sp.name]
            t = None if ranks is None else timer.measure(found.layers[sp.name], *as_built(sp.kind, ranks, sp.caps[-1]))
            if t is not None and ranks is not None and t.speedup < config.min_speedup:
                # Time grows about with cost: aim at the cost that would reach --min-speedup (a 10-50 % cut).
                cut = max(0.5, min(0.9, t.speedup / config.min_speedup))
                not_paying[sp.name] = (t.speedup, int(sp.cost(ranks) * cut))
        slow.update({n: s for n, (s, _) in not_paying.items()})
        for n in [n for n in slow if n not in not_paying and chosen.get(n) is not None]:
            del slow[n]  # pays at its new ranks
        if not not_paying:
            break
        if round_ == MAX_TIMED_ROUNDS - 1:  # give up on them: keep them as they are
            capped = [sp for sp in spaces if sp.name not in not_paying]
        else:
            capped = [replace(sp, keep_at=not_paying[sp.name][1]) if sp.name in not_paying else sp for sp in spaces]
        try:
            chosen, outcome = run(capped)
        except PlanError:
            # The target cannot be met with cheaper chains alone: keep the last allocation; latency-aware
            # selection then reverts what does not pay (the report shows the MACs that result).
            break
        spaces = capped
    chosen = {**dict.fromkeys(sp.name for sp in found.spaces), **chosen}
    why = f"kept by --target {target}: its rank steps win back less error per unit of {target.metric} than other layers'"
    plan = planned_ranks(found, chosen, target, why)
    for name, speedup in slow.items():
        if chosen.get(name) is not None:
            continue
        why_slow = f"slower in the runtime (x{speedup:.2f})" if speedup < 1 else f"too little gain in the runtime (x{speedup:.2f})"
        plan.causes[name] = SkipCause.SLOWER
        plan.reasons[name] = (f"{why_slow} at the ranks --target {target} gave it (--min-speedup {config.min_speedup:g}); "
                              "left out of the allocation; kept as is")
    return plan, outcome


# Bisection steps of the MAC fraction under a latency target: resolution (1 - least) / 2^10.
LATENCY_SEARCH_STEPS = 10


def latency_budget_plan(
    layers: list[Layer], read_weight: Callable[[str], np.ndarray], config: CompressionConfig, target: BudgetTarget,
    timer: LayerTimer, measure_original: Callable[[Layer], float | None] | None = None,
) -> tuple[PlannedRanks, BudgetOutcome]:
    """`--target latency:F`: the largest MAC fraction (the least compression) whose allocation brings the
    summed isolated time of the model's Conv/Gemm/MatMul layers to F of the original, found by bisection.

    Each candidate allocation is timed layer by layer (cached per shape and ranks); a decomposed layer
    that does not reach --min-speedup counts at its original time, as latency-aware selection will keep
    it. Layers outside the allocation count at their original time (`measure_original`; 0 without it).
    The target is on the layers' time as measured alone; the whole model also runs other operators."""
    found = rank_spaces(layers, read_weight, config, "macs", str(target))
    spaces, step = found.spaces, config.round_to
    fixed_macs = found.layers_before - sum(sp.original_cost for sp in spaces)
    original_ms: dict[str, float] = {}
    for sp in spaces:  # the original's time comes with any pair: time the smallest chain
        t = timer.measure(found.layers[sp.name], *as_built(sp.kind, tuple(min(step, c) for c in sp.caps), sp.caps[-1]))
        original_ms[sp.name] = t.original_ms if t is not None else 0.0
    in_spaces = set(original_ms)
    fixed_ms = 0.0
    if measure_original is not None:
        for lay in layers:
            if lay.layer_id not in in_spaces and lay.weight_shape is not None and lay.node_index >= 0:
                fixed_ms += measure_original(lay) or 0.0
    total_ms = fixed_ms + sum(original_ms.values())

    def predict(fraction: float) -> tuple[float, dict[str, Ranks | None], BudgetOutcome]:
        chosen, outcome = allocate(spaces, fixed_macs, found.layers_before, BudgetTarget("macs", fraction), step)
        ms = fixed_ms
        for sp in spaces:
            ranks = chosen[sp.name]
            t = None if ranks is None else timer.measure(found.layers[sp.name], *as_built(sp.kind, ranks, sp.caps[-1]))
            ms += t.decomposed_ms if t is not None and t.speedup >= config.min_speedup else original_ms[sp.name]
        return ms, chosen, outcome

    least = least_cost(spaces, fixed_macs, step) / found.layers_before if found.layers_before else 1.0
    lo, hi = least, 1.0
    ms, chosen, outcome = predict(lo)
    evaluations = 1
    if ms > target.fraction * total_ms:
        raise PlanError(
            f"--target {target}: cannot be met: at the smallest ranks (MACs at {least:.4g} of the original) the "
            f"layers' measured time is {ms / total_ms:.3f} of the original ({ms:.3f} of {total_ms:.3f} ms); the least "
            f"reachable is about latency:{ms / total_ms:.3g} (chains that do not pay keep the original layer)"
        )
    best = (ms, chosen, outcome, lo)
    for _ in range(LATENCY_SEARCH_STEPS):
        mid = (lo + hi) / 2
        ms_mid, chosen_mid, outcome_mid = predict(mid)
        evaluations += 1
        if ms_mid <= target.fraction * total_ms:
            lo, best = mid, (ms_mid, chosen_mid, outcome_mid, mid)
        else:
            hi = mid
    ms, chosen, outcome, fraction = best
    result = replace(outcome, target=str(target), metric="latency", fraction=target.fraction, before=total_ms, after=ms,
                     macs_fraction=fraction, evaluations=evaluations)
    why = (f"kept by --target {target}: at the MAC fraction the latency search settled on ({fraction:.3f}) its rank "
           "steps win back less error per MAC than other layers'")
    return planned_ranks(found, chosen, target, why), result


# Evaluates a candidate plan on data: top-1 agreement with the original on the search half ("search")
# or on the held-out half ("held-out").
Evaluator = Callable[[PlannedRanks, str], float]


# The allocation at a MAC fraction, as a plan to replay and its outcome (the agreement search's step).
PlanAt = Callable[[float], tuple[PlannedRanks, BudgetOutcome]]


def agreement_budget_plan(
    layers: list[Layer], read_weight: Callable[[str], np.ndarray], config: CompressionConfig, target: BudgetTarget,
    evaluate: Evaluator, samples: tuple[int, int] = (0, 0), plan_at: PlanAt | None = None, least: float | None = None,
) -> tuple[PlannedRanks, BudgetOutcome]:
    """`--target agreement:F --data D`: the most compression whose top-1 agreement with the original on
    the search half of D stays >= F. The MAC fraction is bisected (the rank allocation within a fraction
    is the energy one of `macs:F`, or `plan_at`'s, from `least` up: with --calibrate, the calibration
    data's); each step costs one evaluation of a compressed model on the search half, and the result one
    more on the held-out half: at most LATENCY_SEARCH_STEPS + 2 evaluations. Data-light: no per-layer
    sensitivity pass (which would cost one evaluation per layer and rank)."""
    if plan_at is None or least is None:
        found = rank_spaces(layers, read_weight, config, "macs", str(target))
        spaces, step = found.spaces, config.round_to
        fixed = found.layers_before - sum(sp.original_cost for sp in spaces)
        why = f"kept by --target {target}: its rank steps win back less error per MAC than other layers'"

        def energy_plan_at(fraction: float) -> tuple[PlannedRanks, BudgetOutcome]:
            chosen, outcome = allocate(spaces, fixed, found.layers_before, BudgetTarget("macs", fraction), step)
            return planned_ranks(found, chosen, target, why), outcome

        plan_at = energy_plan_at
        least = least_cost(spaces, fixed, step) / found.layers_before if found.layers_before else 1.0
    planned, outcome = plan_at(least)
    agreement = evaluate(planned, "search")
    evaluations, fraction = 1, least
    if agreement < target.fraction:  # bisect: lo fails, hi (nothing decomposed) agrees fully
        lo, hi = least, 1.0
        best: tuple[PlannedRanks, BudgetOutcome, float, float] | None = None
        for _ in range(LATENCY_SEARCH_STEPS):
            mid = (lo + hi) / 2
            p_mid, o_mid = plan_at(mid)
            a_mid = evaluate(p_mid, "search")
            evaluations += 1
            if a_mid >= target.fraction:
                hi, best = mid, (p_mid, o_mid, a_mid, mid)
            else:
                lo = mid
        if best is None:
            raise PlanError(
                f"--target {target}: cannot be met: even at MACs {hi:.4f} of the original the top-1 agreement on "
                f"--data is below {target.fraction:g} (last tried {a_mid:.4f}); lower the target or use --ranks"
            )
        planned, outcome, agreement, fraction = best
    held = evaluate(planned, "held-out")
    evaluations += 1
    result = replace(outcome, target=str(target), metric="agreement", fraction=target.fraction, before=1.0,
                     after=agreement, macs_fraction=fraction, evaluations=evaluations, held_out=held,
                     search_samples=samples[0], held_out_samples=samples[1])
    return planned, result
