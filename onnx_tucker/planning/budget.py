"""Whole-model budget targets (`--target macs:0.3`, `params:0.2`): ranks for every layer at once.

Each decomposable layer offers a grid of ranks; at ranks r its kernel loses (HOSVD bound) the energy of
the singular values beyond r of each factorised unfolding, relative to the kernel's own energy, and it
costs `cost(r)` MACs (or parameters). Starting from the smallest ranks (one rank step everywhere), the
allocation repeatedly grants the rank step that wins back the most relative energy per unit of cost,
as long as the whole model stays within the budget; a layer whose next step would cost as much as the
original is offered "keep the original" instead (no error at all). The budget is thus spent where the
reconstruction error per unit saved is best, not by a uniform scale, and it ends within one rank
step of the target: no single further step fits. Pure numpy: the singular values come from the
planner's spectra.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..config import BudgetTarget
from ..errors import PlanError

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

    def lost(self, ranks: Ranks) -> float:
        """Relative squared reconstruction error bound at `ranks` (sum over the modes)."""
        return float(sum(float(np.sum(e[r:])) for e, r in zip(self.energies, ranks, strict=True)))


@dataclass(frozen=True)
class BudgetOutcome:
    """What the allocation chose, for the report."""

    target: str  # "macs:0.3"
    metric: str
    fraction: float
    before: int  # the whole model's MACs (or parameters)
    after: int  # predicted at the chosen ranks
    layers_decomposed: int
    layers_considered: int
    steps: int  # rank steps granted
    step: int  # ranks move in multiples of this (--round-to)

    @property
    def achieved(self) -> float:
        return self.after / self.before if self.before else 0.0


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
        if c < sp.original_cost:
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
            if c >= sp.original_cost:
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
