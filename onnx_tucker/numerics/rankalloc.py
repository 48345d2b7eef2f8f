"""Ranks chosen with data: per-layer error curves from calibration statistics, and the allocation of a
whole-model MAC budget across layers. Pure numpy/scipy.

Error model. For a layer y = W p + b (p the im2col row of its input), the best rank-R factorisation
in *output* space on the data is the reduced-rank regression (`refit.fit_reduced_rank`); its error is
the full regression's plus the tail of the eigenvalues of W^T C W (C the regressors' covariance),
i.e. the output activations' spectrum. So one eigendecomposition gives the error at every rank:
- `svd` / `tucker1` (one rank): that spectrum on the input im2col;
- `tucker2` (output rank R4, input rank R3): for each R3 of a grid, the data-aware first factor
  (`refit.data_aware_basis`) and then the same spectrum on the projected regressors.
Errors are relative squared errors (divided by the layer's output energy, centred when it has a
bias), so layers of different scale compare.

Allocation. Each layer offers candidates (MACs, error), "keep the layer" among them (its original
MACs, error 0). Minimising the sum of errors under a MAC budget is solved on each layer's lower
convex hull by a greedy walk from "everything kept", always taking the step that saves MACs at the
least error per MAC (the Lagrangian solution; exact on the hulls, within one step of the budget).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from .refit import DEFAULT_RIDGE, GramStats, channel_moment, data_aware_basis, ridge_lambda


@dataclass(frozen=True)
class RankCandidate:
    """One way to treat a layer: `kind` ("original" keeps it) at `ranks`, its MACs and relative error."""

    kind: str
    ranks: tuple[int, ...]
    macs: int
    error: float


def _spectrum_tail(stats: GramStats, intercept: bool, ridge: float) -> tuple[np.ndarray, float, float]:
    """(tail[R] = error at rank R for R = 0..t, residual of the full regression, output energy)."""
    cpp, cpy, cyy, _, _ = stats.centred(intercept)
    lam = ridge_lambda(cpp, ridge)
    w = scipy.linalg.solve(cpp + lam * np.eye(stats.d), cpy, assume_a="pos")
    m = cpy.T @ w
    eig = np.clip(np.sort(np.linalg.eigvalsh((m + m.T) / 2))[::-1], 0.0, None)
    energy = float(np.trace(cyy))
    full_rss = max(energy - float(np.sum(eig)), 0.0)
    tail = np.concatenate([np.cumsum(eig[::-1])[::-1], [0.0]])  # tail[R] = sum of eig[R:]
    return tail, full_rss, energy


def output_error_curve(stats: GramStats, intercept: bool, ridge: float = DEFAULT_RIDGE) -> np.ndarray:
    """Relative squared error of the best rank-R output-space factorisation, R = 0..t."""
    tail, full_rss, energy = _spectrum_tail(stats, intercept, ridge)
    return (tail + full_rss) / energy if energy > 0 else np.zeros_like(tail)


def tucker2_error_grid(stats: GramStats, kernel_gram: np.ndarray, kk: int, input_ranks: Sequence[int],
                       intercept: bool, ridge: float = DEFAULT_RIDGE) -> dict[int, np.ndarray]:
    """For each input rank R3: the relative squared error at every output rank R4 = 0..t, with the
    data-aware first factor. `stats` are on the im2col of the input (columns (channel, offset))."""
    s = stats.d // kk
    moment = channel_moment(stats, kk)
    energy = float(np.trace(stats.centred(intercept)[2]))
    out: dict[int, np.ndarray] = {}
    for r3 in input_ranks:
        first = data_aware_basis(moment, kernel_gram, min(r3, s), ridge)
        proj = stats.projected_channels(first, kk)
        tail, full_rss, _ = _spectrum_tail(proj, intercept, ridge)
        out[r3] = (tail + full_rss) / energy if energy > 0 else np.zeros_like(tail)
    return out


def rank_grid(dim: int, points: int = 16) -> list[int]:
    """About `points` ranks from 1 to `dim`, dense at the low end (every rank when dim <= points)."""
    if dim <= points:
        return list(range(1, dim + 1))
    grid = np.unique(np.round(np.geomspace(1, dim, points)).astype(int))
    return [int(r) for r in grid]


def lower_hull(cands: Sequence[RankCandidate]) -> list[RankCandidate]:
    """The candidates on the lower convex hull of (MACs, error), from the most MACs to the fewest,
    errors rising: the only ones a MAC-budgeted sum of errors ever picks."""
    pts = sorted(cands, key=lambda c: (-c.macs, c.error))
    best: list[RankCandidate] = []
    for c in pts:  # the Pareto front: a candidate with fewer MACs and no more error dominates
        if best and c.macs == best[-1].macs:
            continue
        while best and c.error <= best[-1].error:
            best.pop()
        best.append(c)
    hull: list[RankCandidate] = []
    for c in best:  # macs descending: keep slopes (error gained per MAC saved) increasing
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            s_ab = (b.error - a.error) / (a.macs - b.macs)
            s_bc = (c.error - b.error) / (b.macs - c.macs)
            if s_bc <= s_ab:
                hull.pop()
            else:
                break
        hull.append(c)
    return hull


@dataclass(frozen=True)
class Allocation:
    choice: tuple[RankCandidate, ...]  # one per layer
    macs: int  # of the allocated layers
    budget: int
    met: bool


def allocate_macs(layers: Sequence[Sequence[RankCandidate]], budget: int) -> Allocation:
    """One candidate per layer, total MACs <= `budget` at the least total error (on the hulls): start
    from each layer's most expensive candidate and take the cheapest error-per-MAC step until within
    budget. `met` is False when even the cheapest candidates everywhere exceed the budget."""
    hulls = [lower_hull(c) for c in layers]
    pos = [0] * len(hulls)
    total = sum(h[0].macs for h in hulls)
    heap: list[tuple[float, int, int]] = []

    def push(i: int) -> None:
        h, k = hulls[i], pos[i]
        if k + 1 < len(h):
            slope = (h[k + 1].error - h[k].error) / max(h[k].macs - h[k + 1].macs, 1)
            heapq.heappush(heap, (slope, i, k))

    for i in range(len(hulls)):
        push(i)
    while total > budget and heap:
        _, i, k = heapq.heappop(heap)
        if pos[i] != k:
            continue
        total -= hulls[i][k].macs - hulls[i][k + 1].macs
        pos[i] = k + 1
        push(i)
    choice = tuple(h[p] for h, p in zip(hulls, pos, strict=True))
    return Allocation(choice, total, budget, total <= budget)
