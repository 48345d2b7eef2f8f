"""EVBMF rank selection: true ranks of low-rank + noise matrices, noise estimate, the threshold against a
brute-force minimisation of the one-component VB free energy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.optimize import minimize

from onnx_tucker.numerics.evbmf import evbmf_from_singular_values, select_rank_evbmf, singular_values
from tests.helpers import low_rank_plus_noise

# (L, M, true rank): tall and wide, square, conv-unfolding-like (64 x 576 = 64 x 64*3*3).
SHAPES = [
    (200, 500, 20),
    (500, 200, 20),
    (512, 4608, 64),
    (4608, 512, 40),
    (300, 300, 10),
    (64, 576, 8),
    (576, 64, 8),
]

# Used only by `paper_free_energy` below (the sigma^2 objective of Eq. 38 is written with it); the
# singular-value threshold itself is checked against a brute-force minimisation, not this constant.
TAU_UBAR_AT_1 = 2.5129  # Nakajima et al. 2013: tau-bar for alpha = 1, scaled by sqrt(alpha)


# --- Brute-force EVB for one component, derived from the model (not from the paper's closed form) ---
#
# V = gamma * u v^T (L x M, one singular value gamma, noise variance sigma^2 = 1), model V = b a^T + E,
# a in R^M ~ N(0, c_a^2 I), b in R^L ~ N(0, c_b^2 I), E iid N(0, 1). The VB posterior is Gaussian,
# r(a) = N(a_hat v, s_a I), r(b) = N(b_hat u, s_b I) (isotropic: the stationary covariance is, and
# the means lie along the singular vectors). Up to constants that do not depend on the posterior,
#   2F = M log(c_a^2 / s_a) + (a_hat^2 + M s_a) / c_a^2 - M      (2 KL(r(a) || p(a)))
#      + L log(c_b^2 / s_b) + (b_hat^2 + L s_b) / c_b^2 - L      (2 KL(r(b) || p(b)))
#      - 2 gamma a_hat b_hat + (a_hat^2 + M s_a)(b_hat^2 + L s_b) (E ||V - b a^T||^2 - ||V||^2)
# Empirical Bayes also minimises over c_a^2, c_b^2: c_a^2 = (a_hat^2 + M s_a) / M, likewise c_b^2,
# which leaves M log(1 + x) + L log(1 + y) with x = a_hat^2 / (M s_a), y = b_hat^2 / (L s_b). Writing
# a_hat b_hat = w sqrt(x y), (a_hat^2 + M s_a)(b_hat^2 + L s_b) = w^2 (1 + x)(1 + y), w^2 = M L s_a s_b,
# and minimising over w > 0:
#   2F(x, y) = M log(1 + x) + L log(1 + y) - gamma^2 x y / ((1 + x)(1 + y)).
# The null solution (a_hat = b_hat = 0, s_a, s_b -> 0) has 2F -> 0, so EVB keeps the component iff
# min_{x, y > 0} 2F < 0, i.e. iff gamma^2 > min_{x, y > 0} (M log(1 + x) + L log(1 + y)) (1 + x)(1 + y) / (x y).


def vb_free_energy_full(p: np.ndarray, gamma: float, L: int, M: int) -> float:
    """2F of the one-component model over all six variables, in logs: a_hat, b_hat, s_a, s_b, c_a^2, c_b^2."""
    a, b, sa, sb, ca, cb = np.exp(p)
    return float(
        M * np.log(ca / sa) + (a * a + M * sa) / ca - M
        + L * np.log(cb / sb) + (b * b + L * sb) / cb - L
        - 2 * gamma * a * b + (a * a + M * sa) * (b * b + L * sb)
    )


def vb_free_energy_reduced(lx: np.ndarray, ly: np.ndarray, gamma: float, L: int, M: int) -> np.ndarray:
    x, y = np.exp(lx), np.exp(ly)
    return M * np.log1p(x) + L * np.log1p(y) - gamma**2 * x * y / ((1 + x) * (1 + y))


def _grid_then_polish(f, lo: float = -8.0, hi: float = 8.0, n: int = 401) -> tuple[float, np.ndarray]:
    """Global minimum of f(log x, log y) by a dense grid, then Nelder-Mead from the best grid point."""
    g = np.linspace(lo, hi, n)
    vals = f(g[:, None], g[None, :])
    i, j = np.unravel_index(np.argmin(vals), vals.shape)
    res = minimize(lambda q: float(f(q[0], q[1])), [g[i], g[j]], method="Nelder-Mead",
                   options={"xatol": 1e-12, "fatol": 1e-14, "maxiter": 4000})
    return float(min(res.fun, vals[i, j])), res.x


def brute_force_threshold(L: int, M: int, sigma2: float = 1.0) -> float:
    """Smallest singular value EVB keeps: sqrt(sigma2 * min_{x,y} (M log(1+x) + L log(1+y)) (1+x)(1+y) / (xy))."""

    def g(lx: np.ndarray, ly: np.ndarray) -> np.ndarray:
        x, y = np.exp(lx), np.exp(ly)
        return (M * np.log1p(x) + L * np.log1p(y)) * (1 + x) * (1 + y) / (x * y)

    return math.sqrt(sigma2 * _grid_then_polish(g)[0])


def brute_force_keeps(gamma: float, L: int, M: int) -> bool:
    """EVB keeps the component iff the minimum free energy over nonzero posteriors is below the null's 0."""
    fmin, _ = _grid_then_polish(lambda lx, ly: vb_free_energy_reduced(lx, ly, gamma, L, M))
    return fmin < -1e-9 * (L + M)


def paper_free_energy(sigma2: float, s: np.ndarray, L: int, M: int) -> float:
    """EVBMF free energy as a function of sigma^2 (Nakajima et al. 2013, Eq. 38), written from the paper."""
    alpha = L / M
    tau_bar = TAU_UBAR_AT_1 * math.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    x = s**2 / (M * sigma2)
    big, small = x[x > x_bar], x[x <= x_bar]
    b = big - (1 + alpha)
    tau = 0.5 * (b + np.sqrt(b * b - 4 * alpha))
    return float(
        np.sum(small - np.log(small))
        + np.sum(big - tau)
        + np.sum(np.log((tau + 1) / big))
        + alpha * np.sum(np.log(tau / alpha + 1))
    )


@pytest.mark.parametrize(("L", "M", "rank"), SHAPES)
@pytest.mark.parametrize("sigma", [1.0, 0.003])
def test_true_rank_and_noise_variance(L: int, M: int, rank: int, sigma: float) -> None:
    rng = np.random.default_rng(L * 7 + M + rank)
    a = low_rank_plus_noise(rng, (L, M), rank, sigma=sigma)
    est = select_rank_evbmf(a)
    assert est.rank == rank
    assert est.sigma2 == pytest.approx(sigma**2, rel=0.05)
    assert est.shape == (L, M)
    assert est.max_rank == min(L, M)


@pytest.mark.parametrize(("L", "M"), [(256, 2304), (2304, 256), (100, 100), (30, 700), (8, 8)])
def test_pure_noise_gives_rank_zero(L: int, M: int) -> None:
    rng = np.random.default_rng(L + M)
    sigma = 0.05
    est = select_rank_evbmf(sigma * rng.standard_normal((L, M)))
    assert est.rank == 0
    if min(L, M) >= 30:  # too few values to estimate a variance precisely on an 8 x 8 matrix
        assert est.sigma2 == pytest.approx(sigma**2, rel=0.05)


@pytest.mark.parametrize(("L", "M", "rank"), [(200, 500, 20), (64, 576, 8), (300, 300, 10)])
def test_transpose_gives_same_rank_and_sigma2(L: int, M: int, rank: int) -> None:
    a = low_rank_plus_noise(np.random.default_rng(5), (L, M), rank, sigma=0.1)
    e, et = select_rank_evbmf(a), select_rank_evbmf(a.T)
    assert e.rank == et.rank == rank
    assert e.sigma2 == pytest.approx(et.sigma2, rel=1e-6)
    assert e.threshold == pytest.approx(et.threshold, rel=1e-6)
    assert et.shape == (M, L)


def test_reduced_free_energy_is_the_full_one_minimised() -> None:
    """The 2-D reduction used below is right: minimising the six-variable free energy from the reduced
    optimum goes no lower, and the reduced optimum rebuilt as six variables has the same value."""
    L, M, gamma = 12, 30, 14.0  # above the threshold (~9.9): the optimum is a nonzero posterior
    fmin, (lx, ly) = _grid_then_polish(lambda a, b: vb_free_energy_reduced(a, b, gamma, L, M))
    x, y = math.exp(lx), math.exp(ly)
    w = gamma * math.sqrt(x * y) / ((1 + x) * (1 + y))
    sa = sb = w / math.sqrt(M * L)  # w^2 = M L s_a s_b; split evenly (the gauge is free)
    a, b = math.sqrt(x * M * sa), math.sqrt(y * L * sb)
    p0 = np.log([a, b, sa, sb, (a * a + M * sa) / M, (b * b + L * sb) / L])
    assert fmin < -1.0  # a real nonzero solution, not the null one
    assert vb_free_energy_full(p0, gamma, L, M) == pytest.approx(fmin, rel=1e-9)
    rng = np.random.default_rng(0)
    for start in [p0] + [p0 + rng.normal(scale=0.5, size=6) for _ in range(5)]:
        res = minimize(vb_free_energy_full, start, args=(gamma, L, M), method="BFGS", options={"gtol": 1e-10})
        assert res.fun >= fmin - 1e-6 * abs(fmin)


# Near-square shapes (and a transpose): alpha = L / M in [0.9, 1], where the implementation's
# tau-bar = 2.5129 sqrt(alpha) is accurate to ~1e-5 of the threshold.
SQUARE_ISH = [(20, 20), (18, 20), (20, 18), (64, 64)]


@pytest.mark.parametrize(("L", "M"), SQUARE_ISH)
@pytest.mark.parametrize("sigma2", [1.0, 0.04])
def test_threshold_matches_brute_force_free_energy(L: int, M: int, sigma2: float) -> None:
    """The analytic threshold equals the smallest singular value for which a brute-force minimisation
    of the one-component VB free energy (derived from the model above) prefers a nonzero solution.
    A 2 % change of the tau-bar constant moves the threshold by ~0.4 %: far outside rel=2e-4."""
    est = evbmf_from_singular_values(np.array([1.0]), (L, M), sigma2=sigma2)
    assert est.threshold == pytest.approx(brute_force_threshold(L, M, sigma2), rel=2e-4)


@pytest.mark.parametrize(("L", "M"), [(20, 20), (18, 20), (20, 18)])
def test_keeps_a_singular_value_iff_brute_force_optimum_is_nonzero(L: int, M: int) -> None:
    """Sweep singular values across the threshold: the analytic code keeps gamma exactly when the
    brute-force minimum of the free energy over nonzero posteriors beats the null solution."""
    centre = brute_force_threshold(L, M)
    for factor in (0.5, 0.9, 0.99, 0.998, 1.002, 1.01, 1.1, 2.0):
        gamma = factor * centre
        kept = evbmf_from_singular_values(np.array([gamma]), (L, M), sigma2=1.0).rank == 1
        assert kept == brute_force_keeps(gamma, L, M) == (factor > 1), factor


@pytest.mark.xfail(
    strict=True,
    reason="numerics/evbmf.py approximates tau-bar by 2.5129 sqrt(alpha) (as the reference MATLAB code "
    "does); the exact EVB threshold (brute force here, = zero crossing of log(1+t)/t + log(1+t/a)/(t/a) = 1) "
    "is higher by 0.07 % at alpha = 0.5, 0.54 % for a 64 x 576 conv unfolding, 0.57 % at 0.1, 1.0 % at 0.01",
)
@pytest.mark.parametrize(("L", "M"), [(10, 20), (64, 576), (10, 100), (3, 300)])
def test_threshold_matches_brute_force_for_thin_matrices(L: int, M: int) -> None:
    est = evbmf_from_singular_values(np.array([1.0]), (L, M), sigma2=1.0)
    assert est.threshold == pytest.approx(brute_force_threshold(L, M), rel=2e-4)


@pytest.mark.parametrize(("L", "M"), [(10, 20), (64, 576), (10, 100), (3, 300), (576, 64)])
def test_threshold_is_close_to_brute_force_for_thin_matrices(L: int, M: int) -> None:
    """Bound on the approximation above: the analytic threshold is never above the exact one and
    never more than 1.1 % below it (alpha >= 0.01)."""
    est = evbmf_from_singular_values(np.array([1.0]), (L, M), sigma2=1.0)
    exact = brute_force_threshold(L, M)
    assert 0.989 * exact <= est.threshold <= exact * (1 + 1e-6)


@pytest.mark.parametrize(("L", "M", "rank"), [(200, 500, 20), (500, 200, 20), (64, 576, 8), (300, 300, 10)])
def test_rank_counts_singular_values_above_its_threshold(L: int, M: int, rank: int) -> None:
    """With sigma^2 estimated, the rank is the count above the threshold that sigma^2 implies (the
    threshold as a function of sigma^2 is checked against brute force above)."""
    a = low_rank_plus_noise(np.random.default_rng(11), (L, M), rank, sigma=0.5)
    est = select_rank_evbmf(a)
    fixed = evbmf_from_singular_values(np.array([1.0]), (L, M), sigma2=est.sigma2)
    assert est.threshold == pytest.approx(fixed.threshold, rel=1e-12)
    s = np.linalg.svd(a, compute_uv=False)
    assert est.rank == int(np.sum(s > est.threshold)) == rank


@pytest.mark.parametrize("sigma2", [0.01, 0.25, 1.0, 4.0])
def test_known_sigma2_rank_is_count_above_threshold(sigma2: float) -> None:
    """With sigma^2 given, nothing is estimated: rank = #{s > threshold(sigma^2)}."""
    rng = np.random.default_rng(3)
    a = low_rank_plus_noise(rng, (80, 240), 12, sigma=0.5, snr=(0.5, 8.0))  # spectrum spans the thresholds
    s = np.linalg.svd(a, compute_uv=False)
    est = select_rank_evbmf(a, sigma2=sigma2)
    thr = brute_force_threshold(80, 240, sigma2)
    assert est.sigma2 == sigma2
    # alpha = 1/3: the analytic threshold is 0.2 % below the exact one (see the xfail above).
    assert est.threshold == pytest.approx(thr, rel=3e-3)
    assert est.rank == int(np.sum(s > est.threshold)) == int(np.sum(s > thr))
    assert select_rank_evbmf(a.T, sigma2=sigma2).rank == est.rank


def test_known_sigma2_ranks_vary_with_sigma2() -> None:
    """The test above is not vacuous: different sigma^2 really select different ranks."""
    a = low_rank_plus_noise(np.random.default_rng(3), (80, 240), 12, sigma=0.5, snr=(0.5, 8.0))
    ranks = {select_rank_evbmf(a, sigma2=v).rank for v in (0.01, 0.25, 1.0, 4.0)}
    assert len(ranks) >= 3


@pytest.mark.parametrize(("L", "M", "rank"), [(200, 500, 20), (64, 576, 8), (100, 100, 30), (40, 400, 3)])
def test_sigma2_is_global_minimum_of_free_energy(L: int, M: int, rank: int) -> None:
    """The estimate minimises the paper's free energy over a dense log grid of sigma^2.

    With a clear gap between signal and noise the free energy has one basin, so the bounded 1-D
    search must land on the global minimum (weak, spread-out spectra can have several basins; the
    search, like the reference code's fminbnd, then returns a local one)."""
    a = low_rank_plus_noise(np.random.default_rng(21), (L, M), rank, sigma=0.2, snr=(1.2, 4.0))
    s = np.linalg.svd(a, compute_uv=False)
    est = select_rank_evbmf(a)
    Ls, Ms = sorted((L, M))
    grid = np.exp(np.linspace(np.log(est.sigma2 / 20), np.log(np.sum(s**2) / (Ls * Ms)), 3000))
    best = min(paper_free_energy(v, s, Ls, Ms) for v in grid)
    assert paper_free_energy(est.sigma2, s, Ls, Ms) <= best + 1e-6 * abs(best)


def test_partial_spectrum_with_residual_equals_full() -> None:
    """Passing the leading H values plus the residual energy gives the same answer as all values."""
    a = low_rank_plus_noise(np.random.default_rng(8), (120, 300), 10, sigma=0.3)
    s = np.linalg.svd(a, compute_uv=False)
    full = evbmf_from_singular_values(s, a.shape)
    part = evbmf_from_singular_values(s[:60], a.shape, residual=float(np.sum(s[60:] ** 2)))
    assert full.rank == part.rank == 10
    assert part.sigma2 == pytest.approx(full.sigma2, rel=1e-4)
    assert full.sigma2 == pytest.approx(0.09, rel=0.05)


@pytest.mark.parametrize("shape", [(7, 300), (300, 7), (64, 64), (1000, 40), (1, 50)])
def test_singular_values_match_numpy(shape: tuple[int, int]) -> None:
    a = np.random.default_rng(0).standard_normal(shape)
    ours = singular_values(a)
    ref = np.linalg.svd(a, compute_uv=False)
    assert ours.shape == (min(shape),)
    assert np.all(np.diff(ours) <= 0), "descending"
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-12 * ref[0])


def test_singular_values_of_rank_deficient_matrix_are_nonnegative() -> None:
    a = np.outer(np.arange(1.0, 51.0), np.arange(1.0, 21.0))  # rank 1: Gram eigenvalues may round below 0
    s = singular_values(a)
    assert np.all(s >= 0)
    assert s[0] == pytest.approx(np.linalg.norm(a), rel=1e-12)
    assert np.all(s[1:] <= 1e-6 * s[0])


def test_singular_values_rejects_non_matrix() -> None:
    with pytest.raises(ValueError):
        singular_values(np.zeros((2, 3, 4)))


def test_zero_matrix_is_rank_zero() -> None:
    est = select_rank_evbmf(np.zeros((10, 20)))
    assert est.rank == 0 and est.sigma2 == 0.0


def test_noise_free_low_rank_matrix_keeps_its_rank() -> None:
    """Exactly rank-r weights (no noise) must keep rank r: the noise estimate must not blow up."""
    rng = np.random.default_rng(2)
    a = rng.standard_normal((60, 5)) @ rng.standard_normal((5, 200))
    with np.errstate(divide="raise", invalid="raise"):
        est = select_rank_evbmf(a)
    assert est.rank == 5
    assert est.sigma2 < 1e-6 * float(np.mean(a**2))


@pytest.mark.parametrize("transpose", [False, True])
def test_pruned_channels_do_not_inflate_noise(transpose: bool) -> None:
    """Exact zero rows (pruned channels) give exact zero singular values; they must not make the free
    energy infinite everywhere (which left sigma^2 at an arbitrary point and lost signal components)."""
    rng = np.random.default_rng(0)
    a = low_rank_plus_noise(rng, (100, 300), 10, sigma=0.1, snr=(1.2, 2.0))
    a[:20] = 0.0
    a = a.T if transpose else a
    with np.errstate(all="raise"):
        est = select_rank_evbmf(a)
    assert est.rank == 10
    # 80 % of the entries carry noise 0.01: the per-entry estimate lies between 0.8x and 1x of it.
    assert 0.7 * 0.01 <= est.sigma2 <= 1.05 * 0.01


def test_float32_input_matches_float64() -> None:
    a = low_rank_plus_noise(np.random.default_rng(4), (64, 576), 8, sigma=0.05)
    e64, e32 = select_rank_evbmf(a), select_rank_evbmf(a.astype(np.float32))
    assert e32.rank == e64.rank == 8
    assert e32.sigma2 == pytest.approx(e64.sigma2, rel=1e-3)


def test_large_fc_matrix_never_takes_a_full_svd(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 768 x 6144 FC weight goes through the small Gram matrix, never an SVD of the wide matrix
    (speed itself is measured in tools/bench_scale.py, not in unit tests)."""

    def no_svd(*args: object, **kwargs: object) -> None:
        raise AssertionError("full SVD called")

    monkeypatch.setattr(np.linalg, "svd", no_svd)
    import scipy.linalg

    monkeypatch.setattr(scipy.linalg, "svd", no_svd)
    a = low_rank_plus_noise(np.random.default_rng(9), (768, 6144), 50, sigma=0.01).astype(np.float32)
    assert select_rank_evbmf(a).rank == 50


@given(
    L=st.integers(min_value=16, max_value=160),
    M=st.integers(min_value=16, max_value=320),
    frac=st.floats(min_value=0.0, max_value=0.25),
    log_sigma=st.floats(min_value=-6.0, max_value=2.0),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_property_strong_signal_gives_true_rank(L: int, M: int, frac: float, log_sigma: float, seed: int) -> None:
    rank = int(frac * min(L, M))
    a = low_rank_plus_noise(np.random.default_rng(seed), (L, M), rank, sigma=math.exp(log_sigma), snr=(3.0, 8.0))
    assert select_rank_evbmf(a).rank == rank


def test_exactly_rank_one_float32_weight_gives_rank_one() -> None:
    """Round-off singular values of an exactly rank-1 float32 weight are not signal (the
    constant-filled light_* models of the onnx wheel hit this)."""
    import numpy as np

    from onnx_tucker.numerics.evbmf import select_rank_evbmf

    rng = np.random.default_rng(0)
    w = np.outer(rng.standard_normal(1000), rng.standard_normal(1024)).astype(np.float32)
    assert select_rank_evbmf(w).rank == 1
    assert select_rank_evbmf(np.full((512, 2000), 0.02, np.float32)).rank == 1
