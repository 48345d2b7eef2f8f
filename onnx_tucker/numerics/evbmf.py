"""Rank selection by empirical variational Bayesian matrix factorisation (EVBMF).

The global analytic solution of Nakajima, Sugiyama, Babacan and Tomioka (JMLR 14, 2013): the noise
variance sigma^2 is estimated from the matrix by minimising the free energy over a bounded
interval, and the singular values above the analytic threshold are kept. Pure numpy/scipy.

Unlike the widely copied Python port, this works for tall and wide matrices alike (the problem is
symmetric in L and M, so we always work with L <= M) and never runs a full SVD: the spectrum comes
from the eigenvalues of the small Gram matrix, which is what makes a 4096 x 25088 FC weight cheap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .spectral import GramEigen

# tau-bar for alpha = 1 (Nakajima et al. 2013, Eq. 34 solved numerically); scaled by sqrt(alpha).
_TAU_UBAR_AT_ALPHA_1 = 2.5129
_ROUNDOFF = 1e-6  # relative size of float32 round-off in a singular value (with some margin)


@dataclass(frozen=True)
class EVBMFEstimate:
    """What EVBMF says about one matrix."""

    rank: int  # number of singular values above the threshold (0: everything judged noise)
    sigma2: float  # estimated noise variance per entry
    threshold: float  # singular-value threshold implied by sigma2
    shape: tuple[int, int]  # (L, M) as given, before any transpose

    @property
    def max_rank(self) -> int:
        return min(self.shape)


def singular_values(matrix: np.ndarray) -> np.ndarray:
    """All min(L, M) singular values, descending, from the eigenvalues of the smaller Gram matrix."""
    a = np.asarray(matrix)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {a.shape}")
    # Gram accumulated in float64 blocks, tridiagonalised once (see `spectral`); the planner uses
    # a `LayerSpectra` instead so that the decomposition reuses the same work.
    return GramEigen(a).singular_values


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    b = x - (1.0 + alpha)
    return 0.5 * (b + np.sqrt(np.maximum(b * b - 4.0 * alpha, 0.0)))


def _free_energy(sigma2: float, L: int, M: int, s: np.ndarray, residual: float, xubar: float) -> float:
    """Free energy of EVBMF as a function of sigma^2 (up to constants); Nakajima et al. Eq. 38."""
    alpha = L / M
    x = s * s / (M * sigma2)
    z1 = x[x > xubar]
    z2 = x[x <= xubar]
    tau_z1 = _tau(z1, alpha)
    # Eq. 38 has -log(x_h) for every h (in z - log z and in log((tau + 1) / z)); -log(x_h) =
    # log(sigma2) - log(s_h^2 / M), and the second part does not depend on sigma2: drop it. Exact
    # zeros in the spectrum (pruned channels, rank-deficient weights) would otherwise make the
    # objective +inf for every sigma2 and leave the minimiser anywhere.
    term1 = np.sum(z2)
    term2 = np.sum(z1 - tau_z1)
    term3 = np.sum(np.log(tau_z1 + 1.0))
    term4 = alpha * np.sum(np.log(tau_z1 / alpha + 1.0))
    return float(term1 + term2 + term3 + term4 + residual / (M * sigma2) + L * np.log(sigma2))


def evbmf_from_singular_values(
    s: np.ndarray, shape: tuple[int, int], residual: float = 0.0, sigma2: float | None = None
) -> EVBMFEstimate:
    """EVBMF on a known spectrum.

    `s` holds the leading H singular values (descending) of an L x M matrix and `residual` the
    squared Frobenius norm of the rest (0 when all min(L, M) values are given). `sigma2` fixes the
    noise variance instead of estimating it.
    """
    L, M = (shape[0], shape[1]) if shape[0] <= shape[1] else (shape[1], shape[0])
    s = np.sort(np.asarray(s, dtype=np.float64))[::-1]
    H = s.size
    alpha = L / M
    tauubar = _TAU_UBAR_AT_ALPHA_1 * np.sqrt(alpha)
    xubar = (1.0 + tauubar) * (1.0 + alpha / tauubar)
    total = float(np.sum(s * s) + residual)
    if total <= 0.0 or L == 0:
        return EVBMFEstimate(rank=0, sigma2=0.0, threshold=0.0, shape=(shape[0], shape[1]))

    if sigma2 is None:
        # Bounds of Nakajima et al. Eq. 36; index as in the reference code, guarded for tiny L.
        eh_ub = int(min(np.ceil(L / (1.0 + alpha)) - 1, H)) - 1
        upper = total / (L * M)
        tail = s[eh_ub + 1 :] if eh_ub + 1 < H else s[-1:]
        lower = max(tail[0] ** 2 / (M * xubar), float(np.mean(tail**2)) / M)
        # A noise-free matrix would give 0. Weights are stored in float32 (or coarser), so singular
        # values below ~1e-6 of the largest are round-off, not signal: keep the noise level above
        # that floor, or exactly low-rank weights come out with spurious extra ranks.
        lower = max(lower, upper * 1e-12, (_ROUNDOFF * s[0]) ** 2 / M)
        if lower >= upper:
            sigma2 = upper
        else:
            # Optimise over log(sigma2): the free energy varies over decades, bounded Brent in
            # log space converges in a few dozen evaluations. (Imported here: scipy.optimize alone
            # costs ~0.5 s of start-up, which every `onnx-tucker --help` would pay.)
            from scipy.optimize import minimize_scalar

            res = minimize_scalar(
                lambda t: _free_energy(float(np.exp(t)), L, M, s, residual, xubar),
                bounds=(np.log(lower), np.log(upper)),
                method="bounded",
                options={"xatol": 1e-10},
            )
            sigma2 = float(np.exp(res.x))
    threshold = float(np.sqrt(M * sigma2 * (1.0 + tauubar) * (1.0 + alpha / tauubar)))
    rank = int(np.sum(s > threshold))
    return EVBMFEstimate(rank=rank, sigma2=float(sigma2), threshold=threshold, shape=(shape[0], shape[1]))


def select_rank_evbmf(matrix: np.ndarray, sigma2: float | None = None) -> EVBMFEstimate:
    """EVBMF rank of a matrix of any aspect ratio (noise variance estimated unless given)."""
    a = np.asarray(matrix)
    return evbmf_from_singular_values(singular_values(a), (a.shape[0], a.shape[1]), sigma2=sigma2)
