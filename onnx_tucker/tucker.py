"""Tucker-2, Tucker-1 and truncated SVD of weight tensors, in numpy (float64 inside).

Kernels are in ONNX order: T x S x k1 x ... (output channels, input channels, spatial). Only the two
channel modes are ever factorised; the spatial modes stay in the core.

Leading singular vectors come from an eigendecomposition of the smaller Gram matrix of each
unfolding (channels x channels for a conv), which is exact and much cheaper than an SVD of the
wide unfolding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg


@dataclass(frozen=True)
class Tucker2Factors:
    """K ~ core x_0 u_out x_1 u_in; core R4 x R3 x k..., u_out T x R4, u_in S x R3."""

    core: np.ndarray
    u_out: np.ndarray
    u_in: np.ndarray


@dataclass(frozen=True)
class Tucker1Factors:
    """K ~ core x_0 u_out (output mode only); core R4 x S x k..., u_out T x R4."""

    core: np.ndarray
    u_out: np.ndarray


@dataclass(frozen=True)
class SVDFactors:
    """W ~ left @ right; left N x R, right R x K (singular values split evenly between them)."""

    left: np.ndarray
    right: np.ndarray


def unfold(tensor: np.ndarray, mode: int) -> np.ndarray:
    """Mode-n unfolding: mode `mode` becomes the rows, all other modes (in order) the columns."""
    return np.moveaxis(tensor, mode, 0).reshape(tensor.shape[mode], -1)


def leading_left_vectors(matrix: np.ndarray, rank: int) -> np.ndarray:
    """Orthonormal basis (L x rank) of the leading left singular subspace of `matrix` (L x M)."""
    a = np.asarray(matrix, dtype=np.float64)
    L, M = a.shape
    rank = int(min(rank, L))
    if rank <= 0:
        return np.zeros((L, 0))
    if L <= M:
        _, vecs = scipy.linalg.eigh(a @ a.T, subset_by_index=[L - rank, L - 1])
        return np.ascontiguousarray(vecs[:, ::-1])
    # Tall: the left subspace is A times the leading right vectors; beyond rank(A) = M it is
    # completed with any orthonormal directions (they carry no energy).
    k = min(rank, M)
    _, v = scipy.linalg.eigh(a.T @ a, subset_by_index=[M - k, M - 1])
    basis = a @ v[:, ::-1]
    if rank > k:
        basis = np.concatenate([basis, np.random.default_rng(0).standard_normal((L, rank - k))], axis=1)
    q, _ = np.linalg.qr(basis)
    return q


def _mode_product(tensor: np.ndarray, matrix: np.ndarray, mode: int) -> np.ndarray:
    """tensor x_mode matrix^T, i.e. project mode `mode` onto the columns of `matrix`."""
    moved = np.moveaxis(tensor, mode, -1)
    return np.moveaxis(moved @ matrix, -1, mode)


def tucker2(kernel: np.ndarray, rank_out: int, rank_in: int, hooi_iters: int = 0) -> Tucker2Factors:
    """Tucker-2 of a T x S x k... kernel: HOSVD start, then `hooi_iters` HOOI sweeps."""
    k = np.asarray(kernel, dtype=np.float64)
    u_out = leading_left_vectors(unfold(k, 0), rank_out)
    u_in = leading_left_vectors(unfold(k, 1), rank_in)
    for _ in range(hooi_iters):
        u_out = leading_left_vectors(unfold(_mode_product(k, u_in, 1), 0), rank_out)
        u_in = leading_left_vectors(unfold(_mode_product(k, u_out, 0), 1), rank_in)
    core = _mode_product(_mode_product(k, u_out, 0), u_in, 1)
    return Tucker2Factors(core=core, u_out=u_out, u_in=u_in)


def tucker1(kernel: np.ndarray, rank_out: int) -> Tucker1Factors:
    """Tucker-1 on the output mode: a k x k conv S -> R4 followed by a 1x1 conv R4 -> T."""
    k = np.asarray(kernel, dtype=np.float64)
    u_out = leading_left_vectors(unfold(k, 0), rank_out)
    return Tucker1Factors(core=_mode_product(k, u_out, 0), u_out=u_out)


def truncated_svd(matrix: np.ndarray, rank: int) -> SVDFactors:
    """Best rank-`rank` factorisation W ~ left @ right of an N x K matrix."""
    w = np.asarray(matrix, dtype=np.float64)
    transposed = w.shape[0] > w.shape[1]
    a = w.T if transposed else w  # work on the wide orientation: Gram is min(N, K) square
    u = leading_left_vectors(a, rank)
    proj = u.T @ a  # R x long side; rows have norms = singular values
    norms = np.linalg.norm(proj, axis=1)
    if norms.size and norms.min() > 1e-12 * max(norms.max(), 1e-300):
        scale = np.sqrt(norms)
        left, right = u * scale, proj / scale[:, None]
    else:
        left, right = u, proj
    if transposed:  # W = a^T ~ right^T @ left^T
        return SVDFactors(left=right.T, right=left.T)
    return SVDFactors(left=left, right=right)


def reconstruct_tucker2(f: Tucker2Factors) -> np.ndarray:
    return _mode_product(_mode_product(f.core, f.u_out.T, 0), f.u_in.T, 1)


def reconstruct_tucker1(f: Tucker1Factors) -> np.ndarray:
    return _mode_product(f.core, f.u_out.T, 0)


def relative_error(original: np.ndarray, approx: np.ndarray) -> float:
    """||original - approx||_F / ||original||_F (0 for an all-zero original reproduced exactly)."""
    o = np.asarray(original, dtype=np.float64)
    num = float(np.linalg.norm(o - approx))
    den = float(np.linalg.norm(o))
    return num / den if den > 0 else num
