"""Tucker-2, Tucker-1 (on either channel mode), truncated SVD and spatial SVD of weight tensors, in
numpy (float64 inside).

Kernels are in ONNX order: T x S x k1 x ... (output channels, input channels, spatial). Tucker
factorises only the two channel modes (the spatial modes stay in the core): Tucker-1 the output mode
(a k x k conv S -> R then a 1x1 R -> T), its mirror `tucker1_in` the input mode (a 1x1 S -> R then a
k x k conv R -> T); spatial SVD (AIMET's)
splits a 2-D kernel T x S x kh x kw into a kh x 1 conv S -> R and a 1 x kw conv R -> T: the
kernel's rearrangement (S*kh) x (T*kw) truncated at rank R (`spatial_unfold`).

Leading singular vectors come from an eigendecomposition of the smaller Gram matrix of each
unfolding (channels x channels for a conv), which is exact and much cheaper than an SVD of the
wide unfolding. Pass the `LayerSpectra` the planner filled (`spectra=`) and the Gram matrices and
their tridiagonal reductions are reused instead of computed again (see `spectral`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from .spectral import GramEigen, LayerSpectra

# Column block (float64 bytes) of the truncated SVD's projection: the weight is never copied whole.
_BLOCK_BYTES = 32 * 2**20
# A float64 projection (rank x long side) bigger than this is never formed whole: it is written block
# by block straight into the factor, in the weight's own dtype (`_lean_projection`). Below it the
# projection is computed as before, bit for bit.
_LEAN_BYTES = 2**30


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
class Tucker1InFactors:
    """K ~ core x_1 u_in (input mode only, Tucker-1's mirror); core T x R3 x k..., u_in S x R3."""

    core: np.ndarray
    u_in: np.ndarray


@dataclass(frozen=True)
class SVDFactors:
    """W ~ left @ right; left N x R, right R x K (singular values split evenly between them)."""

    left: np.ndarray
    right: np.ndarray
    # ||W - left @ right||_F / ||W||_F, computed without forming left @ right (None: not computed).
    rel_error: float | None = None


@dataclass(frozen=True)
class SpatialSVDFactors:
    """K[t, s, i, j] ~ sum_r horizontal[t, r, 0, j] vertical[r, s, i, 0]: vertical R x S x kh x 1 (run
    first), horizontal T x R x 1 x kw."""

    vertical: np.ndarray
    horizontal: np.ndarray
    rel_error: float | None = None


def unfold(tensor: np.ndarray, mode: int) -> np.ndarray:
    """Mode-n unfolding: mode `mode` becomes the rows, all other modes (in order) the columns."""
    return np.moveaxis(tensor, mode, 0).reshape(tensor.shape[mode], -1)


def leading_left_vectors(matrix: np.ndarray, rank: int, eigen: GramEigen | None = None) -> np.ndarray:
    """Orthonormal basis (L x rank) of the leading left singular subspace of `matrix` (L x M).

    `eigen`: the matrix's `GramEigen` when already computed (the planner's), else computed here.
    """
    a = np.asarray(matrix)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {a.shape}")
    if min(rank, a.shape[0]) <= 0:
        return np.zeros((a.shape[0], 0))
    return (eigen if eigen is not None else GramEigen(a)).left_vectors(rank, a)


def _eigen(spectra: LayerSpectra | None, key: int, matrix: np.ndarray) -> GramEigen | None:
    return spectra.eigen(key, matrix) if spectra is not None else None


def _mode_product(tensor: np.ndarray, matrix: np.ndarray, mode: int) -> np.ndarray:
    """tensor x_mode matrix^T, i.e. project mode `mode` onto the columns of `matrix`."""
    moved = np.moveaxis(tensor, mode, -1)
    # One 2-D BLAS product: `moved @ matrix` on the 4-D view is a batched matmul of thin slices,
    # ~50x slower (3.9 s vs 0.09 s for a 512x512x3x3 kernel).
    lead = moved.shape[:-1]
    out = (moved.reshape(-1, moved.shape[-1]) @ matrix).reshape(*lead, matrix.shape[1])
    return np.moveaxis(out, -1, mode)


def tucker2(
    kernel: np.ndarray, rank_out: int, rank_in: int, hooi_iters: int = 0, spectra: LayerSpectra | None = None
) -> Tucker2Factors:
    """Tucker-2 of a T x S x k... kernel: HOSVD start, then `hooi_iters` HOOI sweeps.

    `spectra` (keys 0 and 1: the output- and input-mode unfoldings) reuses the planner's work.
    """
    k = np.asarray(kernel, dtype=np.float64)
    m0, m1 = unfold(k, 0), unfold(k, 1)
    u_out = leading_left_vectors(m0, rank_out, _eigen(spectra, 0, m0))
    u_in = leading_left_vectors(m1, rank_in, _eigen(spectra, 1, m1))
    del m0, m1
    for _ in range(hooi_iters):
        u_out = leading_left_vectors(unfold(_mode_product(k, u_in, 1), 0), rank_out)
        u_in = leading_left_vectors(unfold(_mode_product(k, u_out, 0), 1), rank_in)
    core = _mode_product(_mode_product(k, u_out, 0), u_in, 1)
    return Tucker2Factors(core=core, u_out=u_out, u_in=u_in)


def tucker1(kernel: np.ndarray, rank_out: int, spectra: LayerSpectra | None = None) -> Tucker1Factors:
    """Tucker-1 on the output mode: a k x k conv S -> R4 followed by a 1x1 conv R4 -> T."""
    k = np.asarray(kernel, dtype=np.float64)
    m0 = unfold(k, 0)
    u_out = leading_left_vectors(m0, rank_out, _eigen(spectra, 0, m0))
    return Tucker1Factors(core=_mode_product(k, u_out, 0), u_out=u_out)


def tucker1_in(kernel: np.ndarray, rank_in: int, spectra: LayerSpectra | None = None) -> Tucker1InFactors:
    """Tucker-1 on the input mode (the mirror of `tucker1`): a 1x1 conv S -> R3 (u_in^T) followed by a
    k x k conv R3 -> T (the core W x_1 u_in^T). u_in: the leading left singular vectors of the mode-1
    (input) unfolding, so the error is that unfolding's tail (Eckart-Young: the best such pair).
    `spectra` key 0: the input-mode unfolding (the only matrix this kind factorises)."""
    k = np.asarray(kernel, dtype=np.float64)
    m1 = unfold(k, 1)
    u_in = leading_left_vectors(m1, rank_in, _eigen(spectra, 0, m1))
    return Tucker1InFactors(core=_mode_product(k, u_in, 1), u_in=u_in)


def truncated_svd(matrix: np.ndarray, rank: int, spectra: LayerSpectra | None = None) -> SVDFactors:
    """Best rank-`rank` factorisation W ~ left @ right of an N x K matrix.

    The matrix keeps its dtype: a float32 weight is read in float64 blocks, never copied whole, and
    the error is computed without forming left @ right. `spectra` (key 0: this matrix) reuses the
    planner's eigendecomposition.
    """
    w = np.asarray(matrix)
    if w.dtype not in (np.float32, np.float64):
        w = w.astype(np.float64)
    transposed = w.shape[0] > w.shape[1]
    a = w.T if transposed else w  # work on the wide orientation: Gram is min(N, K) square
    eigen = _eigen(spectra, 0, w) or GramEigen(w)
    u = eigen.eigenvectors(rank)  # the wide orientation's left vectors: the short-side eigenvectors
    n, m = a.shape
    step = max(1, _BLOCK_BYTES // (8 * max(n, 1)))
    total = eigen.trace  # ||A||_F^2, from the Gram matrix
    if u.shape[1] * m * 8 > _LEAN_BYTES and w.dtype in (np.float32, np.float64):
        left, right, rel = _lean_projection(a, u, total, step, w.dtype)
    else:
        left, right, rel = _projection(a, u, total, step)
    if transposed:  # W = a^T ~ right^T @ left^T
        return SVDFactors(left=right.T, right=left.T, rel_error=rel)
    return SVDFactors(left=left, right=right, rel_error=rel)


def _projection(a: np.ndarray, u: np.ndarray, total: float, step: int) -> tuple[np.ndarray, np.ndarray, float]:
    """left (n x R), right (R x m) with a ~ left @ right, and the relative error: the float64
    projection U^T A formed whole (R x long side)."""
    n, m = a.shape
    proj = np.empty((u.shape[1], m))  # R x long side; rows have norms = singular values
    for j in range(0, m, step):
        proj[:, j : j + step] = u.T @ np.asarray(a[:, j : j + step], dtype=np.float64)
    # ||A - U U^T A||^2 = ||A||^2 - ||U^T A||^2 (U orthonormal); recomputed exactly, block by block,
    # when the difference is too small to trust (near-full rank).
    resid = total - float(np.sum(proj * proj))
    if resid <= 1e-6 * total:
        resid = 0.0
        for j in range(0, m, step):
            blk = np.asarray(a[:, j : j + step], dtype=np.float64)
            d = blk - u @ proj[:, j : j + step]
            resid += float(np.sum(d * d))
    rel = float(np.sqrt(max(resid, 0.0) / total)) if total > 0 else float(np.sqrt(max(resid, 0.0)))
    norms = np.linalg.norm(proj, axis=1)
    if norms.size and norms.min() > 1e-12 * max(norms.max(), 1e-300):
        scale = np.sqrt(norms)
        return u * scale, proj / scale[:, None], rel
    return u, proj, rel


def _lean_projection(
    a: np.ndarray, u: np.ndarray, total: float, step: int, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray, float]:
    """`_projection` for a projection too big to hold in float64 (an FC6 of 4096 x 131072 at full rank:
    4.3 GB, plus as much again for its scaled copy): each float64 block of U^T A is written straight
    into the R x m factor in the weight's dtype and scaled there in place, so memory is the weight
    plus one factor of its size. Row norms and the residual are accumulated in float64 block by block
    (the exact residual in the same pass when the rank is the full short side)."""
    n, m = a.shape
    r = u.shape[1]
    right = np.empty((r, m), dtype=dtype)
    sq = np.zeros(r)
    exact = r >= n  # full rank: ||A||^2 - ||U^T A||^2 is all rounding, measure the residual directly
    resid = 0.0
    for j in range(0, m, step):
        blk = np.asarray(a[:, j : j + step], dtype=np.float64)
        p = u.T @ blk
        sq += np.einsum("ij,ij->i", p, p)
        if exact:
            d = blk - u @ p
            resid += float(np.sum(d * d))
        right[:, j : j + step] = p
    if not exact:
        resid = total - float(np.sum(sq))
        if resid <= 1e-6 * total:  # near full rank: the difference cannot be trusted, recompute
            resid = 0.0
            for j in range(0, m, step):
                blk = np.asarray(a[:, j : j + step], dtype=np.float64)
                d = blk - u @ (u.T @ blk)
                resid += float(np.sum(d * d))
    rel = float(np.sqrt(max(resid, 0.0) / total)) if total > 0 else float(np.sqrt(max(resid, 0.0)))
    norms = np.sqrt(sq)
    if norms.size and norms.min() > 1e-12 * max(norms.max(), 1e-300):
        scale = np.sqrt(norms)
        for j in range(0, m, step):
            blk = right[:, j : j + step]
            np.divide(blk, scale[:, None], out=blk, casting="unsafe")
        return u * scale, right, rel
    return u, right, rel


def spatial_unfold(kernel: np.ndarray) -> np.ndarray:
    """The (S*kh) x (T*kw) rearrangement of a T x S x kh x kw kernel, rows (s, i), columns (t, j):
    its rank-R factorisations are exactly the kernels of a kh x 1 conv S -> R followed by a 1 x kw
    conv R -> T."""
    k = np.asarray(kernel)
    if k.ndim != 4:
        raise ValueError(f"spatial SVD needs a 2-D kernel (T x S x kh x kw), got shape {k.shape}")
    t, s, kh, kw = k.shape
    return k.transpose(1, 2, 0, 3).reshape(s * kh, t * kw)


def spatial_svd(kernel: np.ndarray, rank: int, spectra: LayerSpectra | None = None) -> SpatialSVDFactors:
    """Spatial SVD of a T x S x kh x kw kernel at rank `rank` (`spectra` key 0: `spatial_unfold`'s
    matrix): the best such factorisation in the Frobenius norm of the kernel."""
    k = np.asarray(kernel)
    t, s, kh, kw = k.shape
    f = truncated_svd(spatial_unfold(k), rank, spectra=spectra)  # left (S kh) x R, right R x (T kw)
    r = f.left.shape[1]
    vertical = f.left.T.reshape(r, s, kh, 1)
    horizontal = f.right.reshape(r, t, kw).transpose(1, 0, 2).reshape(t, r, 1, kw)
    return SpatialSVDFactors(vertical, horizontal, f.rel_error)


def reconstruct_spatial_svd(f: SpatialSVDFactors) -> np.ndarray:
    """The T x S x kh x kw kernel the two convs compute together."""
    return np.einsum("trj,rsi->tsij", f.horizontal[:, :, 0, :], f.vertical[:, :, :, 0])


def reconstruct_tucker2(f: Tucker2Factors) -> np.ndarray:
    return _mode_product(_mode_product(f.core, f.u_out.T, 0), f.u_in.T, 1)


def reconstruct_tucker1(f: Tucker1Factors) -> np.ndarray:
    return _mode_product(f.core, f.u_out.T, 0)


def reconstruct_tucker1_in(f: Tucker1InFactors) -> np.ndarray:
    return _mode_product(f.core, f.u_in.T, 1)


def relative_error(original: np.ndarray, approx: np.ndarray) -> float:
    """||original - approx||_F / ||original||_F (0 for an all-zero original reproduced exactly)."""
    o = np.asarray(original, dtype=np.float64)
    num = float(np.linalg.norm(o - approx))
    den = float(np.linalg.norm(o))
    return num / den if den > 0 else num


@dataclass(frozen=True)
class CPFactors:
    """K[t, s, taps] ~ sum_r out[t, r] inp[s, r] taps[tap, r] (the spatial modes kept together: each
    component's kernel is a free k x k slice); out T x R, inp S x R, taps k x R, components by
    decreasing norm."""

    out: np.ndarray
    inp: np.ndarray
    taps: np.ndarray
    rel_error: float | None = None


def cp_rank_bound(t: int, s: int, k: int) -> int:
    """The rank at which `cp` is exact for every T x S x k kernel (the smallest of the three slice
    counts: one component per (s, tap), (t, tap) or (t, s) pair)."""
    return min(s * k, t * k, t * s)


def _exact_cp(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An exact CP of a T x S x k tensor with `cp_rank_bound` components: one-hot on two modes."""
    t, s, k = w.shape
    if s * k <= min(t * k, t * s):
        a = w.reshape(t, s * k)
        b = np.repeat(np.eye(s), k, axis=1)
        c = np.tile(np.eye(k), (1, s))
    elif t * k <= t * s:
        a = np.repeat(np.eye(t), k, axis=1)
        b = w.transpose(1, 0, 2).reshape(s, t * k)
        c = np.tile(np.eye(k), (1, t))
    else:
        a = np.repeat(np.eye(t), s, axis=1)
        b = np.tile(np.eye(s), (1, t))
        c = w.transpose(2, 0, 1).reshape(k, t * s)
    return a, b, c


def cp(kernel: np.ndarray, rank: int, iters: int = 40, seed: int = 0, tol: float = 1e-5) -> CPFactors:
    """CP (CANDECOMP/PARAFAC, Lebedev et al. 2015) of a T x S x k... kernel with its spatial modes
    as one mode of k taps, by alternating least squares from an HOSVD start (random columns, seeded,
    where the rank exceeds a mode's size); exact at `cp_rank_bound` and above (built directly)."""
    w = np.asarray(kernel, dtype=np.float64)
    t, s = w.shape[:2]
    x = w.reshape(t, s, -1)
    k = x.shape[2]
    if rank >= cp_rank_bound(t, s, k):
        a, b, c = _exact_cp(x)
    else:
        rng = np.random.default_rng(seed)

        def start(m: np.ndarray) -> np.ndarray:
            u = leading_left_vectors(m, min(rank, m.shape[0]))
            extra = rng.standard_normal((m.shape[0], rank - u.shape[1])) / np.sqrt(m.shape[0])
            return np.concatenate([u, extra], axis=1)

        b, c = start(unfold(x, 1)), start(unfold(x, 2))
        a = np.zeros((t, rank))
        norm2 = float(np.sum(x * x))
        lam = 1e-12 * max(norm2, 1e-300)
        prev = np.inf
        eye = lam * np.eye(rank)

        def solve(rhs: np.ndarray, gram: np.ndarray) -> np.ndarray:  # rhs @ gram^-1, gram symmetric PSD
            try:
                return scipy.linalg.cho_solve(scipy.linalg.cho_factor(gram + eye), rhs.T).T
            except np.linalg.LinAlgError:
                return rhs @ np.linalg.pinv(gram + eye)

        x_ts_k, x_t_sk = x.reshape(t * s, k), x.reshape(t, s * k)
        for _ in range(iters):
            # The three MTTKRPs as two GEMMs per sweep: x contracted with the taps factor serves both
            # channel modes (the taps factor changes last).
            z = (x_ts_k @ c).reshape(t, s, rank)
            a = solve(np.einsum("tsr,sr->tr", z, b), (b.T @ b) * (c.T @ c))
            b = solve(np.einsum("tsr,tr->sr", z, a), (a.T @ a) * (c.T @ c))
            m = np.einsum("rsk,sr->kr", (a.T @ x_t_sk).reshape(rank, s, k), b)
            c = solve(m, (a.T @ a) * (b.T @ b))
            # ||X - [[a, b, c]]||^2 from the Grams: no reconstruction per sweep.
            fit = norm2 - 2 * float(np.sum(m * c)) + float(np.sum((a.T @ a) * (b.T @ b) * (c.T @ c)))
            err = np.sqrt(max(fit, 0.0) / norm2) if norm2 > 0 else 0.0
            if abs(prev - err) < tol:
                break
            prev = err
    # Even scales across the three factors, components by decreasing weight.
    a, b, c = even_scales(a, b, c)
    weight = np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0) * np.linalg.norm(c, axis=0)  # scale-free
    order = np.argsort(-weight, kind="stable")
    a, b, c = a[:, order], b[:, order], c[:, order]
    f = CPFactors(a, b, c.reshape(k, -1))
    return CPFactors(f.out, f.inp, f.taps, relative_error(w, reconstruct_cp(f, w.shape)))


def even_scales(*factors: np.ndarray) -> list[np.ndarray]:
    """Factors of a sum of rank-1 terms (each n_i x R, column r of each a term's factor) rescaled so
    that every term's factors have equal norms, their product unchanged (a term with a zero factor is
    left as it is)."""
    norms = [np.linalg.norm(f, axis=0) for f in factors]
    ok = np.all([n > 0 for n in norms], axis=0)
    g = np.prod(norms, axis=0) ** (1.0 / len(factors))
    return [f * np.where(ok, g / np.where(n > 0, n, 1.0), 1.0) for f, n in zip(factors, norms, strict=True)]


def reconstruct_cp(f: CPFactors, shape: tuple[int, ...]) -> np.ndarray:
    """The T x S x k... kernel of a CP (`shape`: the kernel's)."""
    return np.einsum("tr,sr,kr->tsk", f.out, f.inp, f.taps).reshape(shape)
