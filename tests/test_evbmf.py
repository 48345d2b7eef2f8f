"""EVBMF rank selection: true ranks of low-rank + noise matrices, noise estimate, the paper's closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

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

TAU_UBAR_AT_1 = 2.5129  # Nakajima et al. 2013: tau-bar for alpha = 1, scaled by sqrt(alpha)


def paper_threshold(shape: tuple[int, int], sigma2: float) -> float:
    """sqrt(M sigma2 (1 + tau)(1 + alpha / tau)), tau = 2.5129 sqrt(alpha), L <= M."""
    L, M = sorted(shape)
    alpha = L / M
    tau = TAU_UBAR_AT_1 * math.sqrt(alpha)
    return math.sqrt(M * sigma2 * (1 + tau) * (1 + alpha / tau))


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


@pytest.mark.parametrize(("L", "M", "rank"), [(200, 500, 20), (500, 200, 20), (64, 576, 8), (300, 300, 10)])
def test_threshold_matches_paper_closed_form(L: int, M: int, rank: int) -> None:
    a = low_rank_plus_noise(np.random.default_rng(11), (L, M), rank, sigma=0.5)
    est = select_rank_evbmf(a)
    assert est.threshold == pytest.approx(paper_threshold((L, M), est.sigma2), rel=1e-9)
    s = np.linalg.svd(a, compute_uv=False)
    assert est.rank == int(np.sum(s > est.threshold))


@pytest.mark.parametrize("sigma2", [0.01, 0.25, 1.0, 4.0])
def test_known_sigma2_rank_is_count_above_threshold(sigma2: float) -> None:
    """With sigma^2 given, nothing is estimated: rank = #{s > threshold(sigma^2)}."""
    rng = np.random.default_rng(3)
    a = low_rank_plus_noise(rng, (80, 240), 12, sigma=0.5, snr=(0.5, 8.0))  # spectrum spans the thresholds
    s = np.linalg.svd(a, compute_uv=False)
    est = select_rank_evbmf(a, sigma2=sigma2)
    thr = paper_threshold((80, 240), sigma2)
    assert est.sigma2 == sigma2
    assert est.threshold == pytest.approx(thr, rel=1e-12)
    assert est.rank == int(np.sum(s > thr))
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
