"""Tucker-2, Tucker-1 and truncated SVD: exactness at full rank, orthonormality, optimality."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_tucker.numerics.tucker import (
    leading_left_vectors,
    reconstruct_tucker1,
    reconstruct_tucker2,
    relative_error,
    truncated_svd,
    tucker1,
    tucker2,
    unfold,
)
from onnx_tucker.ops.layer import Layer
from onnx_tucker.planning.decompose import decompose_layer
from onnx_tucker.planning.planner import LayerPlan
from tests.helpers import low_rank_kernel

# (T, S, kernel): square, tall and wide unfoldings, 1-D / 3-D kernels, S > T*k (input unfolding
# rank-capped) and T > S*k (output unfolding rank-capped).
KERNELS = [
    (16, 16, (3, 3)),
    (32, 8, (3, 3)),
    (8, 32, (3, 3)),
    (4, 48, (1, 3)),  # S = 48 > T*k = 12
    (96, 2, (3, 3)),  # T = 96 > S*k = 18
    (6, 5, (5, 5)),
    (8, 4, (3,)),
    (4, 6, (3, 3, 3)),
]


def _kernel(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


def _assert_orthonormal(u: np.ndarray) -> None:
    np.testing.assert_allclose(u.T @ u, np.eye(u.shape[1]), atol=1e-10)


@pytest.mark.parametrize(("T", "S", "k"), KERNELS)
def test_full_rank_tucker2_reproduces_kernel(T: int, S: int, k: tuple[int, ...]) -> None:
    w = _kernel((T, S, *k))
    f = tucker2(w, T, S)
    assert f.core.shape == (T, S, *k)
    assert f.u_out.shape == (T, T) and f.u_in.shape == (S, S)
    _assert_orthonormal(f.u_out)
    _assert_orthonormal(f.u_in)
    assert relative_error(w, reconstruct_tucker2(f)) < 1e-10


@pytest.mark.parametrize(("T", "S", "k"), KERNELS)
def test_rank_capped_tucker2_is_still_exact(T: int, S: int, k: tuple[int, ...]) -> None:
    """Ranks capped at each unfolding's rank (what --ranks full uses) lose nothing."""
    w = _kernel((T, S, *k), seed=1)
    r4, r3 = min(unfold(w, 0).shape), min(unfold(w, 1).shape)
    f = tucker2(w, r4, r3)
    assert f.core.shape == (r4, r3, *k)
    assert relative_error(w, reconstruct_tucker2(f)) < 1e-10


@pytest.mark.parametrize(("T", "S", "k"), KERNELS)
def test_full_rank_tucker1_reproduces_kernel(T: int, S: int, k: tuple[int, ...]) -> None:
    w = _kernel((T, S, *k), seed=2)
    g = tucker1(w, T)
    assert g.core.shape == (T, S, *k) and g.u_out.shape == (T, T)
    _assert_orthonormal(g.u_out)
    assert relative_error(w, reconstruct_tucker1(g)) < 1e-10
    capped = tucker1(w, min(unfold(w, 0).shape))
    assert relative_error(w, reconstruct_tucker1(capped)) < 1e-10


@pytest.mark.parametrize("shape", [(40, 40), (300, 20), (20, 300), (64, 576), (1, 10), (10, 1)])
def test_full_rank_svd_reproduces_matrix(shape: tuple[int, int]) -> None:
    w = _kernel(shape, seed=3)
    f = truncated_svd(w, min(shape))
    assert f.left.shape == (shape[0], min(shape)) and f.right.shape == (min(shape), shape[1])
    assert relative_error(w, f.left @ f.right) < 1e-10


@pytest.mark.parametrize("shape", [(50, 80), (80, 50), (30, 30), (16, 1152)])
@pytest.mark.parametrize("rank", [1, 5, 12])
def test_truncated_svd_is_eckart_young_optimal(shape: tuple[int, int], rank: int) -> None:
    w = _kernel(shape, seed=4)
    s = np.linalg.svd(w, compute_uv=False)
    f = truncated_svd(w, rank)
    err = np.linalg.norm(w - f.left @ f.right)
    assert err == pytest.approx(np.sqrt(np.sum(s[rank:] ** 2)), rel=1e-8)


@pytest.mark.parametrize("shape", [(50, 80), (80, 50)])
def test_truncated_svd_balances_singular_values(shape: tuple[int, int]) -> None:
    """left^T left = right right^T = diag(s): each factor carries sqrt(s), good for float32 weights."""
    w = _kernel(shape, seed=5)
    s = np.linalg.svd(w, compute_uv=False)[:7]
    f = truncated_svd(w, 7)
    np.testing.assert_allclose(f.left.T @ f.left, np.diag(s), atol=1e-9 * s[0])
    np.testing.assert_allclose(f.right @ f.right.T, np.diag(s), atol=1e-9 * s[0])


def test_truncated_svd_of_rank_deficient_matrix() -> None:
    """Asking for more rank than the matrix has: still exact, no NaN from dividing by zero norms."""
    rng = np.random.default_rng(6)
    w = rng.standard_normal((30, 3)) @ rng.standard_normal((3, 40))
    f = truncated_svd(w, 10)
    assert np.all(np.isfinite(f.left)) and np.all(np.isfinite(f.right))
    assert relative_error(w, f.left @ f.right) < 1e-10


@pytest.mark.parametrize(("T", "S", "k", "r4", "r3"), [(32, 24, (3, 3), 8, 6), (24, 32, (3, 3), 6, 8), (64, 16, (5, 5), 10, 4)])
def test_truncated_factors_orthonormal_and_exact_on_low_rank_kernel(
    T: int, S: int, k: tuple[int, ...], r4: int, r3: int
) -> None:
    w = low_rank_kernel(np.random.default_rng(7), T, S, k, r4, r3, noise=0.0).astype(np.float64)
    f = tucker2(w, r4, r3)
    assert f.u_out.shape == (T, r4) and f.u_in.shape == (S, r3) and f.core.shape == (r4, r3, *k)
    _assert_orthonormal(f.u_out)
    _assert_orthonormal(f.u_in)
    # The generator returns float32: exact up to its rounding (~1e-7 relative).
    assert relative_error(w, reconstruct_tucker2(f)) < 1e-6
    # One rank less on either mode must lose something: the check above is not vacuous.
    assert relative_error(w, reconstruct_tucker2(tucker2(w, r4 - 1, r3))) > 1e-3
    assert relative_error(w, reconstruct_tucker2(tucker2(w, r4, r3 - 1))) > 1e-3


def test_hosvd_projection_error_identity() -> None:
    """For orthonormal factors, ||K||^2 = ||core||^2 + ||K - K_hat||^2 (the core is a projection)."""
    w = _kernel((24, 20, 3, 3), seed=8)
    f = tucker2(w, 7, 5)
    lhs = np.linalg.norm(w) ** 2
    rhs = np.linalg.norm(f.core) ** 2 + np.linalg.norm(w - reconstruct_tucker2(f)) ** 2
    assert lhs == pytest.approx(rhs, rel=1e-10)


@pytest.mark.parametrize(("T", "S", "k", "r4", "r3"), [(32, 32, (3, 3), 8, 8), (48, 16, (3, 3), 6, 10), (16, 48, (1, 3), 5, 7)])
def test_hooi_never_worse_than_hosvd(T: int, S: int, k: tuple[int, ...], r4: int, r3: int) -> None:
    rng = np.random.default_rng(9)
    w = low_rank_kernel(rng, T, S, k, r4 + 4, r3 + 4, noise=0.3).astype(np.float64)
    errors = [relative_error(w, reconstruct_tucker2(tucker2(w, r4, r3, hooi_iters=n))) for n in (0, 1, 2, 5)]
    for before, after in zip(errors, errors[1:], strict=False):
        assert after <= before + 1e-12, errors
    assert errors[-1] < errors[0]  # HOOI actually improves a noisy, truncated kernel


def test_hooi_matches_tensorly_partial_tucker() -> None:
    """Converged HOOI reaches the same error as tensorly's partial_tucker (an independent implementation)."""
    from tensorly.decomposition import partial_tucker

    w = low_rank_kernel(np.random.default_rng(10), 24, 20, (3, 3), 10, 9, noise=0.3).astype(np.float64)
    ours = relative_error(w, reconstruct_tucker2(tucker2(w, 6, 5, hooi_iters=50)))
    (core, factors), _ = partial_tucker(w, rank=[6, 5], modes=[0, 1], n_iter_max=200, tol=1e-12, init="svd")
    ref = np.einsum("abhw,ta,sb->tshw", core, factors[0], factors[1])
    assert ours == pytest.approx(relative_error(w, ref), rel=1e-4)


@pytest.mark.parametrize(("T", "S"), [(16, 64), (64, 16), (8, 8)])
def test_1x1_kernel_with_unfolding_rank_cap(T: int, S: int) -> None:
    """A 1x1 conv's unfoldings are T x S and S x T: both have rank <= min(T, S)."""
    w = _kernel((T, S, 1, 1), seed=11)
    cap = min(T, S)
    f = tucker2(w, cap, cap)
    assert relative_error(w, reconstruct_tucker2(f)) < 1e-10
    svd = truncated_svd(w.reshape(T, S), cap)
    assert relative_error(w.reshape(T, S), svd.left @ svd.right) < 1e-10


def test_leading_left_vectors_span_top_subspace() -> None:
    rng = np.random.default_rng(12)
    for shape in [(10, 40), (40, 10)]:
        a = rng.standard_normal(shape)
        u_ref = np.linalg.svd(a)[0][:, :4]
        u = leading_left_vectors(a, 4)
        _assert_orthonormal(u)
        # Same subspace: the projectors agree.
        np.testing.assert_allclose(u @ u.T, u_ref @ u_ref.T, atol=1e-9)
    assert leading_left_vectors(rng.standard_normal((5, 7)), 0).shape == (5, 0)


def test_float32_kernel_is_decomposed_in_float64() -> None:
    w = _kernel((12, 10, 3, 3), seed=13).astype(np.float32)
    f = tucker2(w, 12, 10)
    assert f.core.dtype == np.float64
    assert relative_error(w, reconstruct_tucker2(f)) < 1e-10


def test_unfold_mode_layout() -> None:
    w = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    np.testing.assert_array_equal(unfold(w, 0), w.reshape(2, 12))
    np.testing.assert_array_equal(unfold(w, 1), w.transpose(1, 0, 2).reshape(3, 8))


def _conv_layer(T: int, S: int, k: tuple[int, ...]) -> Layer:
    return Layer(layer_id="c", op_type="Conv", node_index=0, weight_name="W", weight_shape=(T, S, *k), weight_dtype="float32")


def test_decompose_layer_tucker2_arrays_compose_to_kernel() -> None:
    """Execution-order arrays: 1x1 S->R3, core R3->R4, 1x1 R4->T; composing them gives the kernel back."""
    T, S, k = 12, 10, (3, 3)
    w = _kernel((T, S, *k), seed=14)
    lp = LayerPlan(name="c", op_type="Conv", kind="tucker2", ranks=(T, S))
    first, core, last = decompose_layer(_conv_layer(T, S, k), lp, w).arrays
    assert first.shape == (S, S, 1, 1) and core.shape == (T, S, 3, 3) and last.shape == (T, T, 1, 1)
    composed = np.einsum("ta,abhw,bs->tshw", last[:, :, 0, 0], core, first[:, :, 0, 0])
    np.testing.assert_allclose(composed, w, atol=1e-10)


def test_decompose_layer_svd_of_1x1_conv() -> None:
    T, S = 6, 20
    w = _kernel((T, S, 1, 1), seed=15)
    lp = LayerPlan(name="c", op_type="Conv", kind="svd", ranks=(T,))
    f = decompose_layer(_conv_layer(T, S, (1, 1)), lp, w)
    first, last = f.arrays
    assert first.shape == (T, S, 1, 1) and last.shape == (T, T, 1, 1)
    np.testing.assert_allclose(last[:, :, 0, 0] @ first[:, :, 0, 0], w[:, :, 0, 0], atol=1e-10)
    assert f.rel_error < 1e-10


@pytest.mark.parametrize("shape", [(48, 700), (700, 48)])
@pytest.mark.parametrize("rank", [48, 20, 47])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lean_projection_matches_the_float64_projection(
    monkeypatch: pytest.MonkeyPatch, shape: tuple[int, int], rank: int, dtype: type
) -> None:
    """The memory-lean path for huge FC matrices (issue 7: a > 2 GB output) gives the same factors as
    the float64 projection, up to the weight dtype's rounding, and the same relative error."""
    import onnx_tucker.numerics.tucker as tk

    rng = np.random.default_rng(3)
    w = (rng.standard_normal((shape[0], 30)) @ rng.standard_normal((30, shape[1]))
         + 0.05 * rng.standard_normal(shape)).astype(dtype)
    ref = truncated_svd(w, rank)
    monkeypatch.setattr(tk, "_LEAN_BYTES", 0)
    lean = truncated_svd(w, rank)
    big = lean.left if shape[0] > shape[1] else lean.right
    assert big.dtype == dtype  # written straight in the weight's dtype: no float64 copy of it
    tol = 1e-6 if dtype == np.float32 else 1e-12
    for a, b in ((ref.left, lean.left), (ref.right, lean.right)):
        assert np.max(np.abs(a - b)) <= tol * np.max(np.abs(a))
    assert lean.rel_error == pytest.approx(ref.rel_error, rel=1e-6, abs=1e-9)
    np.testing.assert_allclose(lean.left @ lean.right, w, atol=(lean.rel_error + tol) * 10 * np.abs(w).max())
