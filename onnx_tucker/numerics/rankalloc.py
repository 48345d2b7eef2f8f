"""Ranks chosen with data: per-layer error curves from calibration statistics, and the allocation of a
whole-model MAC budget across layers. Pure numpy/scipy.

Error model. For a layer y = W p + b (p the im2col row of its input), the best rank-R factorisation
in *output* space on the data is the reduced-rank regression (`refit.fit_reduced_rank`); its error is
the full regression's plus the tail of the eigenvalues of W^T C W (C the regressors' covariance),
i.e. the output activations' spectrum. So one eigendecomposition gives the error at every rank:
- `svd` / `tucker1` (one rank): for the *original* layer the outputs are exactly W p + b, so the
  full regression has no residual and W^T C W is the (centred) output Gram Cyy itself: the error at
  rank R is the tail of Cyy's eigenvalues (`output_space_tail`). Output-side statistics only (T x T),
  whatever the width of the input (a 25088 x 4096 Gemm needs a 4096^2 Gram); per group for a grouped
  conv (the groups' errors add, every group at the same rank); the same for a ConvTranspose (its
  output is a linear map of its input too) and for A @ X (the columns of y are the targets);
- `tucker2` (output rank R4, input rank R3): for each R3 of a grid, the data-aware first factor
  (`refit.data_aware_basis`) and then the same spectrum on the projected regressors: from the input
  im2col statistics (`tucker2_error_grid`), or, for im2col too wide for one Gram, from the statistics
  of the first factor's output at the largest input rank, whose leading sub-blocks are the smaller
  ranks' (`nested_tucker2_tails`: the generalised eigenvectors are nested);
- `spatial-svd` (a kh x 1 conv then a 1 x kw one; its k x 1 factor V is kept by calibration and the
  1 x kw one refit by least squares): for V the leading rows of a basis of the kernel's (S*kh)-side
  (weight-space singular vectors, or data-aware ones), the refit's error at every rank from one
  Cholesky factorisation of the statistics of V's output (`spatial_svd_tails`: nested regressors);
- `tucker1-in` (a 1x1 conv S -> R3 then the k x k core R3 -> T, both refit by calibration): for the
  1x1 factor the leading rows of the input mode's data-aware (or weight-space) basis, the core's least
  squares error at every R3 from one Cholesky factorisation likewise (`tucker1_in_tails`);
- `tucker2` of a ConvTranspose (no im2col: each input pixel is scattered over a window):
  `additive_tucker2_grid`, an approximation documented there;
- a layer calibration does not refit keeps its weight-space factors (HOSVD / truncated SVD): its
  errors are those factors' on the data, the outputs projected on the weight's leading output-mode
  singular vectors (`projection_tail`) and the inputs on its input-mode ones (`eigenbasis_tail`).
Errors are relative squared errors (divided by the layer's output energy, centred when it has a
bias), so layers of different scale compare.

Allocation. Each layer offers candidates (MACs, error), "keep the layer" among them (its original
MACs, error 0). Minimising the sum of errors under a MAC budget is solved on each layer's lower
convex hull by a greedy walk from "everything kept", always taking the step that saves MACs at the
least error per MAC (the Lagrangian solution; exact on the hulls, within one step of the budget).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import scipy.linalg

from .refit import DEFAULT_RIDGE, GramStats, MomentStats, channel_moment, data_aware_basis, ridge_lambda


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


def output_space_tail(out: MomentStats, intercept: bool) -> tuple[np.ndarray, float]:
    """(tail, energy) from the layer's output Gram alone: tail[R] = squared error of the best rank-R
    approximation of the (centred, when a bias is fitted) outputs, R = 0..t; energy = tail[0].

    For the original layer y = W p + b the reduced-rank regression's optimum at rank R is the outputs'
    projection on the leading R eigenvectors V of Cyy (Y V V^T = P (W V V^T) is a rank-R map of the
    regressors, and no rank-R map does better than the principal subspace), so this is
    `output_error_curve`'s numerator without the input Gram (equal up to its ridge)."""
    c = out.centred(intercept)
    eig = np.clip(np.sort(np.linalg.eigvalsh((c + c.T) / 2))[::-1], 0.0, None)
    tail = np.concatenate([np.cumsum(eig[::-1])[::-1], [0.0]])
    return tail, float(tail[0])


def output_space_curve(out: MomentStats, intercept: bool) -> np.ndarray:
    """Relative squared error of the best rank-R output-space factorisation, R = 0..t, from the
    outputs only (see `output_space_tail`)."""
    tail, energy = output_space_tail(out, intercept)
    return tail / energy if energy > 0 else np.zeros_like(tail)


class NormMoments:
    """Sums over rows z of ||z||^2, ||z||^4 and ||z||^2 z (float64): what the Ledoit-Wolf intensity of a
    (centred) Gram needs beyond the Gram itself (`shrunk_moment`)."""

    def __init__(self, d: int) -> None:
        self.s2, self.s4, self.v3 = 0.0, 0.0, np.zeros(d)

    def add(self, z: np.ndarray) -> None:
        z = np.asarray(z, dtype=np.float64).reshape(-1, self.v3.shape[0])
        q = np.einsum("ij,ij->i", z, z)
        self.s2 += float(q.sum())
        self.s4 += float(q @ q)
        self.v3 += q @ z


def shrunk_moment(out: MomentStats, norms: NormMoments, prior: np.ndarray, intercept: bool) -> tuple[MomentStats, float]:
    """The output moment with its (centred) covariance S shrunk towards `prior` (T x T, the outputs'
    covariance were the inputs white: W W^T), scaled to S's trace: (1 - a) S + a F, `a` the
    Ledoit-Wolf (2004) intensity min(1, b^2 / ||S - F||^2), b^2 = sum_i ||z_i z_i^T - S||^2 / n^2 the
    sampling noise of S. With fewer rows than outputs S has rank < T and prices every rank above the
    row count at zero error; the shrunk one keeps the data's leading directions and the weight's
    spectrum for the rest, and tends to S as rows grow (b^2 ~ 1/n). Returns (moment, a)."""
    n = out.n
    if n == 0:
        return out, 0.0
    mean = out.sum_z / n if intercept else np.zeros(out.d)
    s = out.centred(intercept) / n
    m2 = float(mean @ mean)
    fourth = (norms.s4 + 4 * float(mean @ out.zz @ mean) - 4 * float(mean @ norms.v3)
              + 2 * m2 * norms.s2 - 3 * n * m2 * m2)  # sum_i ||z_i - mean||^4, expanded
    p = np.asarray(prior, dtype=np.float64)
    tp = float(np.trace(p))
    f = p * (float(np.trace(s)) / tp) if tp > 0 else np.eye(out.d) * (float(np.trace(s)) / out.d)
    noise = max(fourth / n - float(np.sum(s * s)), 0.0) / n
    gap = float(np.sum((s - f) ** 2))
    a = 1.0 if gap <= 0 else min(1.0, noise / gap)
    c = n * ((1 - a) * s + a * f)
    return MomentStats.of(n, out.sum_z, c + n * np.outer(mean, mean) if intercept else c), a


def combine_groups(tails: Sequence[np.ndarray], energies: Sequence[float]) -> np.ndarray:
    """Relative error of a grouped layer, every group at the same rank: the groups' squared errors
    and output energies add (block-diagonal factors never mix groups)."""
    energy = float(sum(energies))
    total = np.sum(np.stack(tails), axis=0)
    return total / energy if energy > 0 else np.zeros_like(total)


def tucker2_tails(stats: GramStats, kernel_gram: np.ndarray, kk: int, input_ranks: Sequence[int],
                  intercept: bool, ridge: float = DEFAULT_RIDGE) -> dict[int, np.ndarray]:
    """`tucker2_error_grid` before the division by the output energy (squared errors: they add over groups)."""
    s = stats.d // kk
    moment = channel_moment(stats, kk)
    out: dict[int, np.ndarray] = {}
    for r3 in input_ranks:
        first = data_aware_basis(moment, kernel_gram, min(r3, s), ridge)
        tail, full_rss, _ = _spectrum_tail(stats.projected_channels(first, kk), intercept, ridge)
        out[r3] = tail + full_rss
    return out


def tucker2_error_grid(stats: GramStats, kernel_gram: np.ndarray, kk: int, input_ranks: Sequence[int],
                       intercept: bool, ridge: float = DEFAULT_RIDGE) -> dict[int, np.ndarray]:
    """For each input rank R3: the relative squared error at every output rank R4 = 0..t, with the
    data-aware first factor. `stats` are on the im2col of the input (columns (channel, offset))."""
    energy = float(np.trace(stats.centred(intercept)[2]))
    tails = tucker2_tails(stats, kernel_gram, kk, input_ranks, intercept, ridge)
    return {r3: t / energy if energy > 0 else np.zeros_like(t) for r3, t in tails.items()}


def spatial_svd_tails(stats: GramStats, basis: np.ndarray, kw: int, intercept: bool,
                      ridge: float = DEFAULT_RIDGE) -> np.ndarray:
    """Squared errors at ranks R = 0..r of a spatial SVD whose k x 1 factor is the leading R rows of
    `basis` (r x S*kh, rows over (channel, row tap)) and whose 1 x k factor and bias are the ridge least
    squares fit on the data. `stats`: on the layer's im2col (columns (channel, row tap, column tap)).

    The k x 1 factor's output at every column tap, q = (V kron I_kw) p, has columns (rank, column tap),
    rank-major, so rank R's regressors are q's leading R*kw columns: with the Cholesky factor L of Cqq
    and w = L^-1 Cqy, the variance explained by the leading m columns is ||w[:m]||^2 (L's leading block
    is the leading block's factor). One factorisation gives every rank. With the ridge lambda this is
    the ridge objective's minimum (rss + lambda ||w||^2, as `_spectrum_tail` counts Tucker-2): above
    the fit's rss by about lambda / (mean regressor variance) = `ridge` of the energy."""
    return nested_block_tails(stats.projected_channels(basis, kw), kw, intercept, ridge)


def tucker1_in_tails(stats: GramStats, basis: np.ndarray, kk: int, intercept: bool,
                     ridge: float = DEFAULT_RIDGE) -> np.ndarray:
    """Squared errors at ranks R = 0..r of a Tucker-1-in chain (1x1 S -> R, then the k x k core R -> T)
    whose 1x1 factor is the leading R rows of `basis` (r x S) and whose core and bias are the ridge least
    squares fit on the data (what calibration refits). `stats`: on the layer's im2col (columns (channel,
    offset)). The 1x1 factor's im2col has columns (rank, offset), rank-major, so rank R's regressors are
    its leading R*kk columns: one Cholesky factorisation gives every rank (`nested_block_tails`), as for
    spatial SVD. It is Tucker-2's error at R4 = T (no output-mode factor) at every input rank."""
    return nested_block_tails(stats.projected_channels(basis, kk), kk, intercept, ridge)


def nested_block_tails(q: GramStats, block: int, intercept: bool, ridge: float = DEFAULT_RIDGE) -> np.ndarray:
    """Squared errors of the ridge least squares fit of the targets on q's leading R*`block` regressor
    columns, R = 0..q.d / block, from one Cholesky factorisation of Cqq (see `spatial_svd_tails`)."""
    cqq, cqy, cyy, _, _ = q.centred(intercept)
    lam = ridge_lambda(cqq, ridge)
    energy = float(np.trace(cyy))
    eye = np.eye(q.d)
    for jitter in (lam, 1e-8 * max(float(np.trace(cqq)), 1e-300), 1e-4 * max(float(np.trace(cqq)) / max(q.d, 1), 1e-300)):
        try:
            low = scipy.linalg.cholesky(cqq + jitter * eye, lower=True)
            break
        except np.linalg.LinAlgError:
            continue
    else:  # no factorisation: price nothing (the layer keeps its other kinds)
        return np.full(q.d // block + 1, energy)
    w = scipy.linalg.solve_triangular(low, cqy, lower=True)
    explained = np.cumsum(np.sum(w * w, axis=1))[block - 1 :: block]
    return np.clip(np.concatenate([[energy], energy - explained]), 0.0, None)


def nested_tucker2_tails(proj: GramStats, kk: int, input_ranks: Sequence[int], intercept: bool,
                         ridge: float = DEFAULT_RIDGE) -> dict[int, np.ndarray]:
    """`tucker2_tails` from the statistics `proj` of the im2col of the data-aware first factor's
    output at the largest input rank (columns (rank, offset), rank-major), without the input im2col's
    Gram: the generalised eigenvectors `data_aware_basis` takes are nested, so the first factor at a
    smaller rank R3 is the leading R3 rows of the largest one and its statistics the leading R3*kk
    columns of `proj`. Ranks above proj's are left out."""
    r_max = proj.d // kk
    out: dict[int, np.ndarray] = {}
    for r3 in input_ranks:
        if r3 <= r_max:
            tail, full_rss, _ = _spectrum_tail(proj.leading(r3 * kk), intercept, ridge)
            out[r3] = tail + full_rss
    return out


def input_projection_tail(moment: np.ndarray, kernel_gram: np.ndarray) -> np.ndarray:
    """tail[R] = min over rank-R projections B A of the input channels of E[(x - BAx)^T G (x - BAx)],
    R = 0..S (`moment` M = E[x x^T] per pixel, G the kernel's input-mode Gram): the trailing eigenvalues
    of G M (those of M^1/2 G M^1/2), the error `data_aware_basis` minimises, taps counted independent."""
    w, v = np.linalg.eigh((moment + moment.T) / 2)
    root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = root @ kernel_gram @ root
    eig = np.clip(np.sort(np.linalg.eigvalsh((m + m.T) / 2))[::-1], 0.0, None)
    return np.concatenate([np.cumsum(eig[::-1])[::-1], [0.0]])


def projection_tail(gram: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """tail[R] = trace(C) - sum_{i<R} b_i^T C b_i, R = 0..r: the squared error of projecting rows with
    Gram C (d x d) on the leading R of the orthonormal columns of `basis` (d x r), e.g. the outputs on
    a weight's leading output-mode singular vectors (a truncated SVD / HOSVD as built, not refit)."""
    b = np.asarray(basis, dtype=np.float64)
    kept = np.einsum("ir,ij,jr->r", b, gram, b)
    return np.clip(float(np.trace(gram)) - np.concatenate([[0.0], np.cumsum(kept)]), 0.0, None)


def eigenbasis_tail(moment: np.ndarray, kernel_gram: np.ndarray) -> np.ndarray:
    """tail[R] = E[(x - VV^T x)^T G (x - VV^T x)] for V the leading R eigenvectors of the kernel's
    input-mode Gram G (the HOSVD input factor), R = 0..S: sum_{i>=R} lambda_i v_i^T M v_i, exactly
    (G commutes with the projection), M the input channel moment; taps counted independent."""
    lam, v = np.linalg.eigh((kernel_gram + kernel_gram.T) / 2)
    lam, v = np.clip(lam[::-1], 0.0, None), v[:, ::-1]
    part = lam * np.einsum("ir,ij,jr->r", v, moment, v)
    return np.concatenate([np.cumsum(part[::-1])[::-1], [0.0]])


def output_basis(block: np.ndarray) -> np.ndarray:
    """The left singular vectors (descending) of a weight block's output unfolding (T x ...)."""
    m = np.asarray(block, dtype=np.float64).reshape(block.shape[0], -1)
    _, u = np.linalg.eigh(m @ m.T)
    return u[:, ::-1]


def additive_tucker2_grid(out_tail: np.ndarray, in_tail: np.ndarray, input_ranks: Sequence[int]) -> dict[int, np.ndarray]:
    """Tucker-2 squared errors of a layer without an im2col (ConvTranspose), as the sum of the output
    rank's error and the input rank's: tail_out[R4] + tail_in[R3] (both in the same units, summed over
    the same pixels).

    An approximation, with its direction stated: for the output projection P (on the leading R4
    eigenvectors of Cyy) and the input projection Q (data-aware, rank R3), the chain's output P y_Q
    errs by ||y - P y||^2 + ||P (y - y_Q)||^2 <= tail_out[R4] + ||y - y_Q||^2 (orthogonal parts), and
    ||y - y_Q||^2 = tail_in[R3] when the kernel taps' contributions of the input error are uncorrelated
    (exact in expectation for spatially white inputs; correlated neighbours make it an estimate).
    So it errs high by at most the part of the input error outside the kept output subspace."""
    return {r3: out_tail + in_tail[min(r3, len(in_tail) - 1)] for r3 in input_ranks}


def rank_grid(dim: int, points: int = 16) -> list[int]:
    """About `points` ranks from 1 to `dim`, dense at the low end (every rank when dim <= points)."""
    if dim <= points:
        return list(range(1, dim + 1))
    grid = np.unique(np.round(np.geomspace(1, dim, points)).astype(int))
    return [int(r) for r in grid]


class _OnHull(Protocol):
    @property
    def error(self) -> float: ...


H = TypeVar("H", bound=_OnHull)


def hull_by(cands: Sequence[H], cost: Callable[[H], float]) -> list[H]:
    """The candidates on the lower convex hull of (cost, error), costliest first, errors rising: the
    only ones a cost-budgeted sum of errors ever picks (MACs here, measured time in `timealloc`)."""
    pts = sorted(cands, key=lambda c: (-cost(c), c.error))
    best: list[H] = []
    for c in pts:  # the Pareto front: a cheaper candidate with no more error dominates
        if best and cost(c) == cost(best[-1]):
            continue
        while best and c.error <= best[-1].error:
            best.pop()
        best.append(c)
    hull: list[H] = []
    for c in best:  # cost descending: keep slopes (error gained per cost saved) increasing
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            s_ab = (b.error - a.error) / (cost(a) - cost(b))
            s_bc = (c.error - b.error) / (cost(b) - cost(c))
            if s_bc <= s_ab:
                hull.pop()
            else:
                break
        hull.append(c)
    return hull


def lower_hull(cands: Sequence[RankCandidate]) -> list[RankCandidate]:
    """`hull_by` on MACs."""
    return hull_by(cands, lambda c: c.macs)


def greedy_walk(hulls: Sequence[Sequence[H]], cost: Callable[[H], float], spend: Callable[[H], float],
                budget: float) -> tuple[list[int], float]:
    """(position on each hull, total spent): from every hull's first point, take the step with the least
    error gained per `cost` saved until the summed `spend` is within `budget` (the Lagrangian walk;
    `spend` is `cost` unless the hulls are on a combined cost, as in `timealloc`)."""
    pos = [0] * len(hulls)
    total = sum(spend(h[0]) for h in hulls)
    heap: list[tuple[float, int, int]] = []

    def push(i: int) -> None:
        h, k = hulls[i], pos[i]
        if k + 1 < len(h):
            heapq.heappush(heap, ((h[k + 1].error - h[k].error) / (cost(h[k]) - cost(h[k + 1])), i, k))

    for i in range(len(hulls)):
        push(i)
    while total > budget and heap:
        _, i, k = heapq.heappop(heap)
        if pos[i] != k:
            continue
        total += spend(hulls[i][k + 1]) - spend(hulls[i][k])
        pos[i] = k + 1
        push(i)
    return pos, total


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
    pos, spent = greedy_walk(hulls, lambda c: c.macs, lambda c: c.macs, budget)
    total = int(spent)
    choice = tuple(h[p] for h, p in zip(hulls, pos, strict=True))
    return Allocation(choice, total, budget, total <= budget)
