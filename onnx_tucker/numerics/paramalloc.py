"""Allocation across layers under two budgets at once: MACs and parameters (`--ranks data:F --target
params:G`). Pure Python.

Each layer offers candidates (kind, ranks, MACs, error) as for `rankalloc.allocate_macs`, and each
candidate its parameter count (`params_of`). The problem, least total error with the summed MACs and
the summed parameters each within its budget, is a two-constraint knapsack (NP-hard); it is solved as
a Lagrangian sweep, the same idea as `timealloc.allocate_macs_and_time`:

1. For every weight w of a grid (0, then a geometric range, then parameters alone), the layers' lower
   convex hulls on the combined cost macs / M0 + w * params / P0 (M0, P0: the layers' originals), and
   the greedy walk from "everything kept" taking the cheapest error-per-cost step until *both* budgets
   hold. w = 0 is `allocate_macs` (MACs alone); a large w spends the parameters first.
2. Two more starting points aimed at feasibility: the least parameters within the MAC budget (the
   MAC walk with parameters as the "error") and the least MACs within the parameter budget.
3. Each result over a budget is repaired (the single-layer move that takes the most excess away per
   error added; when stuck, the best move of two layers at once), then every feasible one improved
   (the single-layer move that lowers the error most within both budgets, until none does; on the
   best one, moves of two layers at once too). Moves go to each layer's candidates that no other beats
   on MACs, parameters and error at once (`pareto`).

The feasible result with the least total error is returned. Exact when the parameter budget does not
bind (the w = 0 walk is `allocate_macs`'s solution, and the result is never worse than it when that one
meets the parameter budget); otherwise a Lagrangian solution (optimal among the choices of no more
combined cost at its weight), within the hulls' step of the true optimum. `met` is False when no
feasible choice was found (then `least_params` says the least parameters found within the MAC budget,
None when even the MAC budget is out of reach).
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .rankalloc import RankCandidate, allocate_macs, hull_by

# The weights w of the sweep (relative price of a parameter against a MAC, each as a share of the
# layers' originals): 0, a geometric range, and parameters alone (`None`).
SWEEP_WEIGHTS: tuple[float | None, ...] = (0.0, *(float(w) for w in np.geomspace(1e-3, 1e3, 25)), None)


@dataclass(frozen=True)
class Priced:
    """A candidate with its parameters and the combined cost of the sweep's current weight."""

    candidate: RankCandidate
    params: int
    cost: float

    @property
    def error(self) -> float:
        return self.candidate.error


@dataclass(frozen=True)
class MacParamAllocation:
    choice: tuple[RankCandidate, ...]  # one per layer
    macs: int
    params: int
    budget_macs: int
    budget_params: int
    met: bool
    # The least parameters found with the MACs within budget (every layer's options considered by the
    # sweep); None when the MAC budget itself is out of reach.
    least_params: int | None
    weight: float | None  # the sweep weight whose walk led to the choice (None: parameters alone or a repair start)


def allocate_macs_and_params(layers: Sequence[Sequence[RankCandidate]], budget_macs: int, budget_params: int,
                             params_of: Callable[[int, RankCandidate], int],
                             weights: Sequence[float | None] = SWEEP_WEIGHTS) -> MacParamAllocation:
    """One candidate per layer, summed MACs <= `budget_macs` and summed parameters (`params_of(layer
    index, candidate)`) <= `budget_params`, at the least total error found (see the module docstring)."""
    params = [[int(params_of(i, c)) for c in cs] for i, cs in enumerate(layers)]
    macs0 = max(sum(max(c.macs for c in cs) for cs in layers), 1)
    params0 = max(sum(max(p) for p in params), 1)

    def priced(w: float | None) -> list[list[Priced]]:
        out = []
        for cs, ps in zip(layers, params, strict=True):
            if w is None:
                out.append([Priced(c, p, p / params0 + 1e-9 * c.macs / macs0) for c, p in zip(cs, ps, strict=True)])
            else:
                out.append([Priced(c, p, c.macs / macs0 + w * p / params0) for c, p in zip(cs, ps, strict=True)])
        return out

    def totals(choice: Sequence[Priced]) -> tuple[int, int]:
        return sum(c.candidate.macs for c in choice), sum(c.params for c in choice)

    starts: list[tuple[list[Priced], float | None]] = []
    for w in weights:
        hulls = [hull_by(cs, lambda c: c.cost) for cs in priced(w)]
        starts.append((_walk_both(hulls, budget_macs, budget_params), w))
    # Feasibility-minded starts: the least parameters within the MAC budget, the least MACs within the parameter one.
    by_key = [{(c.kind, c.ranks): Priced(c, p, 0.0) for c, p in zip(cs, ps, strict=True)} for cs, ps in zip(layers, params, strict=True)]
    as_params = [[RankCandidate(c.kind, c.ranks, c.macs, float(p)) for c, p in zip(cs, ps, strict=True)] for cs, ps in zip(layers, params, strict=True)]
    fewest = allocate_macs(as_params, budget_macs)
    as_macs = [[RankCandidate(c.kind, c.ranks, p, float(c.macs)) for c, p in zip(cs, ps, strict=True)] for cs, ps in zip(layers, params, strict=True)]
    leanest = allocate_macs(as_macs, budget_params)
    for alloc in (fewest, leanest):
        starts.append(([by_key[i][(c.kind, c.ranks)] for i, c in enumerate(alloc.choice)], None))
    moves = [pareto(list(b.values())) for b in by_key]  # what repair and improvement may move a layer to

    best: tuple[float, list[Priced], float | None] | None = None
    least_params: int | None = None  # the least-parameter start meets the MAC budget when anything does
    if fewest.met:
        least_params = sum(by_key[i][(c.kind, c.ranks)].params for i, c in enumerate(fewest.choice))
    seen: set[tuple[tuple[str, tuple[int, ...]], ...]] = set()
    for choice, w in starts:
        key = tuple((c.candidate.kind, c.candidate.ranks) for c in choice)
        if key in seen:
            continue
        seen.add(key)
        choice = _repair(choice, moves, budget_macs, budget_params, macs0, params0)
        for _ in range(len(layers)):  # stuck over budget: two layers at once, then one again
            m, p = totals(choice)
            if m <= budget_macs and p <= budget_params:
                break
            paired = _pair_move(choice, moves, budget_macs, budget_params, macs0, params0, repair=True)
            if paired is None:
                break
            choice = _repair(paired, moves, budget_macs, budget_params, macs0, params0)
        m, p = totals(choice)
        if m <= budget_macs:
            least_params = p if least_params is None else min(least_params, p)
        if m > budget_macs or p > budget_params:
            continue
        choice = _improve(choice, moves, budget_macs, budget_params)
        err = sum(c.error for c in choice)
        if best is None or err < best[0] - 1e-15:
            best = (err, choice, w)
    if best is None:  # nothing feasible: the least-parameter choice within the MAC budget (or the fewest MACs)
        fallback = [by_key[i][(c.kind, c.ranks)] for i, c in enumerate(fewest.choice)]
        m, p = totals(fallback)
        return MacParamAllocation(tuple(c.candidate for c in fallback), m, p, budget_macs, budget_params, False,
                                  least_params, None)
    _, choice, w = best
    for _ in range(PAIR_ROUNDS):  # the best one: moves of two layers at once too
        paired = _pair_move(choice, moves, budget_macs, budget_params, macs0, params0, repair=False)
        if paired is None:
            break
        choice = _improve(paired, moves, budget_macs, budget_params)
    m, p = totals(choice)
    return MacParamAllocation(tuple(c.candidate for c in choice), m, p, budget_macs, budget_params, True, least_params, w)


def pareto(cands: Sequence[Priced]) -> list[Priced]:
    """The candidates no other one beats on MACs, parameters and error at once (ties: the first kept):
    the only moves a choice under the two budgets needs."""
    front: list[Priced] = []
    stairs: list[tuple[int, int]] = []  # (MACs, params) of the front so far, MACs ascending, params descending
    for c in sorted(cands, key=lambda c: (c.error, c.candidate.macs, c.params)):
        m, p = c.candidate.macs, c.params
        k = bisect.bisect_right(stairs, (m, np.iinfo(np.int64).max))
        if k > 0 and stairs[k - 1][1] <= p:
            continue  # one with no more error, MACs and params exists
        front.append(c)
        j = k
        while j < len(stairs) and stairs[j][1] >= p:
            j += 1  # those with more MACs and no fewer params are beaten on the staircase now
        stairs[k:j] = [(m, p)]
    return front


def _walk_both(hulls: Sequence[Sequence[Priced]], budget_macs: int, budget_params: int) -> list[Priced]:
    """`rankalloc.greedy_walk` on the combined cost until the MACs and the parameters are both within budget."""
    state = {"macs": sum(h[0].candidate.macs for h in hulls), "params": sum(h[0].params for h in hulls)}
    pos = [0] * len(hulls)
    heap: list[tuple[float, int, int]] = []

    def push(i: int) -> None:
        h, k = hulls[i], pos[i]
        if k + 1 < len(h):
            heapq.heappush(heap, ((h[k + 1].error - h[k].error) / (h[k].cost - h[k + 1].cost), i, k))

    for i in range(len(hulls)):
        push(i)
    while (state["macs"] > budget_macs or state["params"] > budget_params) and heap:
        _, i, k = heapq.heappop(heap)
        if pos[i] != k:
            continue
        a, b = hulls[i][k], hulls[i][k + 1]
        state["macs"] += b.candidate.macs - a.candidate.macs
        state["params"] += b.params - a.params
        pos[i] = k + 1
        push(i)
    return [h[p] for h, p in zip(hulls, pos, strict=True)]


def _excess(macs: int, params: int, budget_macs: int, budget_params: int, macs0: int, params0: int) -> float:
    return max(macs - budget_macs, 0) / macs0 + max(params - budget_params, 0) / params0


def _single_moves(choice: list[Priced], moves: Sequence[Sequence[Priced]],
                  score: Callable[[int, int, Priced, Priced], float | None]) -> list[Priced]:
    """Repeatedly take the single-layer move of least `score(macs, params, current, option)` (None: not a
    move now) until no move is left; the MAC and parameter totals are kept as the choice changes."""
    choice = list(choice)
    m = sum(c.candidate.macs for c in choice)
    p = sum(c.params for c in choice)
    for _ in range(10 * sum(len(o) for o in moves) + 1):
        best: tuple[float, int, Priced] | None = None
        for i, opts in enumerate(moves):
            cur = choice[i]
            for o in opts:
                sc = score(m, p, cur, o)
                if sc is not None and (best is None or sc < best[0]):
                    best = (sc, i, o)
        if best is None:
            break
        _, i, o = best
        m += o.candidate.macs - choice[i].candidate.macs
        p += o.params - choice[i].params
        choice[i] = o
    return choice


def _repair(choice: list[Priced], moves: Sequence[Sequence[Priced]], budget_macs: int, budget_params: int,
            macs0: int, params0: int) -> list[Priced]:
    """While over a budget: the single-layer move that takes the most relative excess away per error
    added (a move that lowers the error too first)."""

    def score(m: int, p: int, cur: Priced, o: Priced) -> float | None:
        now = _excess(m, p, budget_macs, budget_params, macs0, params0)
        if now <= 0:  # within both budgets: repaired
            return None
        gain = now - _excess(m + o.candidate.macs - cur.candidate.macs, p + o.params - cur.params,
                             budget_macs, budget_params, macs0, params0)
        return (o.error - cur.error) / gain if gain > 1e-15 else None  # error per unit of excess removed

    return _single_moves(choice, moves, score)


def _improve(choice: list[Priced], moves: Sequence[Sequence[Priced]], budget_macs: int, budget_params: int) -> list[Priced]:
    """While some single-layer move lowers the total error within both budgets: the one that lowers it most."""

    def score(m: int, p: int, cur: Priced, o: Priced) -> float | None:
        de = o.error - cur.error
        within = (m + o.candidate.macs - cur.candidate.macs <= budget_macs
                  and p + o.params - cur.params <= budget_params)
        return de if de < -1e-15 and within else None

    return _single_moves(choice, moves, score)


# Pair moves are tried while the candidates of all pairs of layers stay under this many combinations.
PAIR_LIMIT = 20_000_000
PAIR_ROUNDS = 64  # improving pair moves taken at most


def _pair_move(choice: list[Priced], moves: Sequence[Sequence[Priced]], budget_macs: int, budget_params: int,
               macs0: int, params0: int, repair: bool) -> list[Priced] | None:
    """The best move of two layers at once, or None: under `repair`, the one that meets both budgets at
    the least error (else the one that takes the most excess away); otherwise the one that lowers the
    error most within both budgets. Vectorised over each pair's candidates."""
    sizes = [len(o) for o in moves]
    if sum(a * b for i, a in enumerate(sizes) for b in sizes[i + 1:]) > PAIR_LIMIT:
        return None
    m = sum(c.candidate.macs for c in choice)
    p = sum(c.params for c in choice)
    arr = [(np.array([o.candidate.macs for o in opts], dtype=np.int64) - c.candidate.macs,
            np.array([o.params for o in opts], dtype=np.int64) - c.params,
            np.array([o.error for o in opts], dtype=np.float64) - c.error) for opts, c in zip(moves, choice, strict=True)]
    now = _excess(m, p, budget_macs, budget_params, macs0, params0)
    best: tuple[float, int, int, int, int] | None = None  # (score, i, a, j, b)
    for i in range(len(moves)):
        for j in range(i + 1, len(moves)):
            mi, pi, ei = arr[i]
            mj, pj, ej = arr[j]
            mm = m + mi[:, None] + mj[None, :]
            pp = p + pi[:, None] + pj[None, :]
            de = ei[:, None] + ej[None, :]
            ok = (mm <= budget_macs) & (pp <= budget_params)
            if repair and not ok.any():
                ex = np.maximum(mm - budget_macs, 0) / macs0 + np.maximum(pp - budget_params, 0) / params0
                k = int(np.argmin(ex))
                score = 1e300 + float(ex.flat[k])  # below any feasible move's score: only when none is
                if float(ex.flat[k]) < now - 1e-15 and (best is None or score < best[0]):
                    best = (score, i, k // ex.shape[1], j, k % ex.shape[1])
                continue
            masked = np.where(ok, de, np.inf)
            k = int(np.argmin(masked))
            val = float(masked.flat[k])
            if not np.isfinite(val) or (not repair and val >= -1e-12):
                continue
            if best is None or val < best[0]:
                best = (val, i, k // masked.shape[1], j, k % masked.shape[1])
    if best is None:
        return None
    _, i, a, j, b = best
    out = list(choice)
    out[i], out[j] = moves[i][a], moves[j][b]
    return out
