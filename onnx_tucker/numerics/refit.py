"""Refitting a factorised linear layer to data: Gram statistics, ridge least squares, reduced-rank
regression, a data-aware first factor, and im2col at sampled output positions. Pure numpy/scipy.

A decomposed layer is linear in its input, y = z @ front @ last + b, where the rows of `z` are
- for a conv: the im2col of the chain's input to its spatial step (the first factor's output for
  Tucker-2, the layer input itself for Tucker-1 and a split 1x1 conv), one row per output pixel,
  columns ordered (channel, kernel offsets) like `W.reshape(R, -1)`;
- for Gemm / MatMul: the input rows.
`front` is d x R (the core, or the SVD's first factor) and `last` R x T (the last 1x1 factor).

Everything is computed from `GramStats` (sums and Gram matrices accumulated batch by batch in float64),
so memory is bounded by the layer's width d (d^2 + d T + T^2 numbers), never by the amount of data,
and every error below is exact on the accumulated rows without keeping them.

Ridge rule (documented, used everywhere): lambda = ridge * trace(C) / d, with C the (centred, when a
bias is fitted) Gram of the regressors, i.e. `ridge` times their mean variance; the bias is never
penalised. DEFAULT_RIDGE = 1e-4 keeps a rank-deficient Gram (dead ReLU channels, zero padding)
solvable while changing a well-posed solution by ~1e-4 relative.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import scipy.linalg
import scipy.linalg.blas

DEFAULT_RIDGE = 1e-4


class GramStats:
    """Sufficient statistics of regressors P (m x d) and targets Y (m x t), accumulated in float64.

    `add` updates one (d + t)-square upper triangle in place (BLAS syrk, beta = 1): no per-batch
    temporaries of the Gram's size; `pp`, `py` and `yy` are its blocks, symmetrised when read."""

    # Rows are buffered until this many, then added in one syrk: each update reads and writes the
    # whole triangle, so a few dozen rows per call (one 224 x 224 image's sampled positions) would make
    # it memory-bound (a 4096-wide layer: 134 MB touched per call).
    FLUSH_ROWS = 512

    def __init__(self, d: int, t: int) -> None:
        self.d, self.t, self.n = d, t, 0
        self.sum_p = np.zeros(d)
        self.sum_y = np.zeros(t)
        self._upper: np.ndarray | None = None  # (d + t)^2, Fortran order, upper triangle accumulated
        self._blocks: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_rows = 0

    def add(self, p: np.ndarray, y: np.ndarray) -> None:
        p = np.asarray(p).reshape(-1, self.d)
        y = np.asarray(y)
        rows = y.size // self.t if self.t else p.shape[0]  # no targets: a one-sided Gram (MomentStats)
        if p.shape[0] != rows:
            raise ValueError(f"{p.shape[0]} regressor rows for {rows} target rows")
        y = y.reshape(rows, self.t)
        if p.shape[0] == 0:
            return
        self.n += p.shape[0]
        self.sum_p += p.sum(axis=0, dtype=np.float64)  # float32 activations summed in float64
        self.sum_y += y.sum(axis=0, dtype=np.float64)
        self._pending.append((p, y))
        self._pending_rows += p.shape[0]
        if self._pending_rows >= self.FLUSH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        if self._upper is None:
            self._upper = np.zeros((self.d + self.t,) * 2, order="F")
            if self._blocks is not None:  # statistics set directly (projected ones) and then added to
                pp, py, yy = self._blocks
                self._upper[: self.d, : self.d], self._upper[: self.d, self.d :], self._upper[self.d :, self.d :] = pp, py, yy
        self._blocks = None
        both = np.empty((self.d + self.t, self._pending_rows), order="F")  # [P Y]^T, columns contiguous for syrk
        at = 0
        for p, y in self._pending:
            both[: self.d, at : at + p.shape[0]], both[self.d :, at : at + p.shape[0]] = p.T, y.T
            at += p.shape[0]
        self._pending, self._pending_rows = [], 0
        self._upper = scipy.linalg.blas.dsyrk(1.0, both, beta=1.0, c=self._upper, overwrite_c=1)

    def _split(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self._flush()
        if self._blocks is None:
            d, t = self.d, self.t
            if self._upper is None:
                self._blocks = (np.zeros((d, d)), np.zeros((d, t)), np.zeros((t, t)))
            else:
                g = self._upper
                pp, yy = np.triu(g[:d, :d]), np.triu(g[d:, d:])
                self._blocks = (pp + np.triu(pp, 1).T, np.array(g[:d, d:]), yy + np.triu(yy, 1).T)
        return self._blocks

    def _set(self, i: int, value: np.ndarray) -> None:
        blocks = list(self._split())
        blocks[i] = value
        self._blocks = (blocks[0], blocks[1], blocks[2])
        self._upper = None  # the blocks are now the truth; a later `add` rebuilds the triangle from them

    @property
    def pp(self) -> np.ndarray:
        return self._split()[0]

    @pp.setter
    def pp(self, value: np.ndarray) -> None:
        self._set(0, value)

    @property
    def py(self) -> np.ndarray:
        return self._split()[1]

    @py.setter
    def py(self, value: np.ndarray) -> None:
        self._set(1, value)

    @property
    def yy(self) -> np.ndarray:
        return self._split()[2]

    @yy.setter
    def yy(self, value: np.ndarray) -> None:
        self._set(2, value)

    def projected(self, front: np.ndarray) -> GramStats:
        """The statistics of the regressors P @ front (d x r), without another pass over the data."""
        f = np.asarray(front, dtype=np.float64)
        out = GramStats(f.shape[1], self.t)
        out.n, out.sum_y, out.yy = self.n, self.sum_y, self.yy
        out.sum_p = self.sum_p @ f
        out.pp = f.T @ self.pp @ f
        out.py = f.T @ self.py
        return out

    def projected_channels(self, a: np.ndarray, kk: int) -> GramStats:
        """`projected(kron(a, I_kk).T)` without forming the Kronecker product: the statistics of the
        im2col of a 1x1 conv `a` (r x S) applied to the input, columns (channel, offset) as here."""
        a = np.asarray(a, dtype=np.float64)
        r, s = a.shape
        out = GramStats(r * kk, self.t)
        out.n, out.sum_y, out.yy = self.n, self.sum_y, self.yy
        out.sum_p = (a @ self.sum_p.reshape(s, kk)).reshape(-1)
        left = np.tensordot(a, self.pp.reshape(s, kk, s, kk), axes=([1], [0]))  # (r, kk, s, kk)
        out.pp = np.tensordot(left, a, axes=([2], [1])).transpose(0, 1, 3, 2).reshape(r * kk, r * kk)
        out.py = np.tensordot(a, self.py.reshape(s, kk, self.t), axes=([1], [0])).reshape(r * kk, self.t)
        return out

    def scaled_targets(self, scale: np.ndarray) -> GramStats:
        """The statistics of the targets Y diag(scale) (one positive factor per target column), without
        another pass over the data: every fit on them minimises sum_t scale_t^2 ||y_t - y^_t||^2, and
        its last factor's columns and bias divided by `scale` are that fit in the original units."""
        s = np.asarray(scale, dtype=np.float64).reshape(self.t)
        out = GramStats(self.d, self.t)
        out.n, out.sum_p, out.pp = self.n, self.sum_p, self.pp
        out.sum_y = self.sum_y * s
        out.py = self.py * s[None, :]
        out.yy = self.yy * np.outer(s, s)
        return out

    def leading(self, k: int) -> GramStats:
        """The statistics of the first `k` regressor columns only (a sub-block: no pass over the data)."""
        out = GramStats(k, self.t)
        out.n, out.sum_y, out.yy = self.n, self.sum_y, self.yy
        out.sum_p, out.pp, out.py = self.sum_p[:k], self.pp[:k, :k], self.py[:k]
        return out

    def centred(self, intercept: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(Cpp, Cpy, Cyy, mean_p, mean_y); uncentred (means 0) when no bias is fitted."""
        if not intercept or self.n == 0:
            return self.pp, self.py, self.yy, np.zeros(self.d), np.zeros(self.t)
        mp, my = self.sum_p / self.n, self.sum_y / self.n
        return (self.pp - self.n * np.outer(mp, mp), self.py - self.n * np.outer(mp, my),
                self.yy - self.n * np.outer(my, my), mp, my)

    @property
    def target_energy(self) -> float:
        """sum ||y||^2 over the accumulated rows."""
        return float(np.trace(self.yy))


class MomentStats:
    """Sum and Gram of one side only, rows Z (m x d) accumulated in float64: the output Gram a rank-R
    output-space error needs (`rankalloc.output_space_tail`), or the input channel moment of a
    Tucker-2 first factor, without the d_in x d_out cross terms of `GramStats` (whose buffered,
    in-place accumulation it shares: a `GramStats` with no targets)."""

    def __init__(self, d: int) -> None:
        self.d = d
        self._g = GramStats(d, 0)
        self._zz: np.ndarray | None = None  # set directly (`of_targets`)
        self._n: int | None = None
        self._sum: np.ndarray | None = None

    def add(self, z: np.ndarray) -> None:
        z = np.asarray(z).reshape(-1, self.d)
        self._g.add(z, np.zeros((z.shape[0], 0)))

    @property
    def n(self) -> int:
        return self._g.n if self._n is None else self._n

    @property
    def sum_z(self) -> np.ndarray:
        return self._g.sum_p if self._sum is None else self._sum

    @property
    def zz(self) -> np.ndarray:
        return self._g.pp if self._zz is None else self._zz

    def centred(self, intercept: bool) -> np.ndarray:
        """The Gram, centred on the rows' mean when a bias is fitted."""
        if not intercept or self.n == 0:
            return self.zz
        m = self.sum_z / self.n
        return self.zz - self.n * np.outer(m, m)

    @classmethod
    def of(cls, n: int, sum_z: np.ndarray, zz: np.ndarray) -> MomentStats:
        """Moments given directly (`n` rows, their sum and Gram), sharing the arrays."""
        out = cls(zz.shape[0])
        out._n, out._sum, out._zz = n, sum_z, zz
        return out

    @classmethod
    def of_targets(cls, stats: GramStats) -> MomentStats:
        """The target side of `stats` (its output Gram), sharing its arrays."""
        return cls.of(stats.n, stats.sum_y, stats.yy)


def channel_moment(stats: GramStats, kk: int) -> np.ndarray:
    """Second moment of the input channels (S x S) over the receptive fields, from statistics on an
    im2col with columns (channel, kernel offset)."""
    pp = stats.pp
    return sum(pp[o::kk, o::kk] for o in range(kk)) / kk  # type: ignore[return-value]


def kernel_input_grams(weight: np.ndarray, groups: int = 1) -> list[np.ndarray]:
    """Per group, the input-mode Gram W_(1) W_(1)^T (S_g x S_g) of a conv kernel (T, S_g, *k)."""
    w = np.asarray(weight, dtype=np.float64)
    t = w.shape[0] // groups
    out = []
    for k in range(groups):
        m = np.moveaxis(w[k * t : (k + 1) * t], 1, 0).reshape(w.shape[1], -1)
        out.append(m @ m.T)
    return out


def residual(stats: GramStats, w: np.ndarray, b: np.ndarray | None = None) -> float:
    """sum ||y - p @ w - b||^2 over the accumulated rows, exactly, from the statistics."""
    w = np.asarray(w, dtype=np.float64)
    b = np.zeros(stats.t) if b is None else np.asarray(b, dtype=np.float64)
    rss = (np.trace(stats.yy) - 2 * np.sum(w * stats.py) + np.sum(w * (stats.pp @ w))
           - 2 * b @ stats.sum_y + 2 * (stats.sum_p @ w) @ b + stats.n * b @ b)
    return max(float(rss), 0.0)


def relative_error(stats: GramStats, w: np.ndarray, b: np.ndarray | None = None) -> float:
    """||Y - P W - b||_F / ||Y||_F on the accumulated rows."""
    e = stats.target_energy
    return float(np.sqrt(residual(stats, w, b) / e)) if e > 0 else float(np.sqrt(residual(stats, w, b)))


def ridge_lambda(c_pp: np.ndarray, ridge: float) -> float:
    d = c_pp.shape[0]
    return ridge * float(np.trace(c_pp)) / d if d else 0.0


def _solve_psd(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    try:
        return scipy.linalg.solve(a, b, assume_a="pos")
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
        return np.linalg.lstsq(a, b, rcond=None)[0]


def fit_ridge(stats: GramStats, intercept: bool, ridge: float = DEFAULT_RIDGE) -> tuple[np.ndarray, np.ndarray]:
    """Ridge least squares y ~ p @ W + b: (W d x t, b t); b = 0 when `intercept` is False."""
    cpp, cpy, _, mp, my = stats.centred(intercept)
    lam = ridge_lambda(cpp, ridge)
    w = _solve_psd(cpp + lam * np.eye(stats.d), cpy)
    return w, (my - mp @ w)


def fit_last(stats: GramStats, front: np.ndarray, intercept: bool,
             ridge: float = DEFAULT_RIDGE) -> tuple[np.ndarray, np.ndarray]:
    """Only the last factor (r x t) and the bias, with `front` (d x r) fixed: ridge on P @ front."""
    return fit_ridge(stats.projected(front), intercept, ridge)


def fit_reduced_rank(stats: GramStats, rank: int, intercept: bool,
                     ridge: float = DEFAULT_RIDGE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Front (d x rank) and last (rank x t) together: the reduced-rank ridge regression.

    min ||Y - P W - b||^2 + lambda ||W||^2 subject to rank(W) <= rank is solved exactly by the ridge
    solution W_r projected on the leading `rank` eigenvectors V of W_r^T (C + lambda I) W_r (the
    ridge problem is ordinary least squares on data augmented by sqrt(lambda) I rows):
    front = W_r V, last = V^T.
    """
    cpp, cpy, _, mp, my = stats.centred(intercept)
    lam = ridge_lambda(cpp, ridge)
    w = _solve_psd(cpp + lam * np.eye(stats.d), cpy)
    m = cpy.T @ w  # = W^T (C + lambda I) W, symmetric PSD
    m = (m + m.T) / 2
    r = min(rank, stats.t)
    _, vecs = scipy.linalg.eigh(m, subset_by_index=[stats.t - r, stats.t - 1])
    v = vecs[:, ::-1]
    front, last = w @ v, v.T
    if r < rank:  # more rank than outputs: pad with zero columns (the shapes stay those of the graph)
        front = np.hstack([front, np.zeros((stats.d, rank - r))])
        last = np.vstack([last, np.zeros((rank - r, stats.t))])
    return front, last, my - mp @ (front @ last)


def data_aware_basis(cov: np.ndarray, kernel_gram: np.ndarray, rank: int, ridge: float = DEFAULT_RIDGE) -> np.ndarray:
    """A first factor (rank x S) chosen from the input activations' channel covariance `cov` (S x S)
    and the kernel's input-mode Gram `kernel_gram` = W_(1) W_(1)^T (S x S).

    Minimises E||W (x - B A x)||^2 over rank-`rank` projections B A of the input channels, counting the
    kernel's spatial taps as independent (the usual whitened / data-aware decomposition): A spans the
    leading generalised eigenvectors of (cov G cov, cov) (i.e. of G cov). Rows are scaled so the
    output channels have unit variance (A cov A^T = I); the core fitted after it absorbs any scale.
    """
    s = cov.shape[0]
    lam = ridge_lambda(cov, max(ridge, 1e-8))
    reg = cov + max(lam, 1e-12 * max(float(np.trace(cov)), 1.0)) * np.eye(s)
    lhs = cov @ kernel_gram @ cov
    lhs = (lhs + lhs.T) / 2
    r = min(rank, s)
    _, vecs = scipy.linalg.eigh(lhs, reg, subset_by_index=[s - r, s - 1])
    a = vecs[:, ::-1].T
    if r < rank:
        a = np.vstack([a, np.zeros((rank - r, s))])
    return a


def spatial_front(basis: np.ndarray, kw: int) -> np.ndarray:
    """A spatial SVD's k x 1 factor `basis` (R x S*kh, columns (channel, row tap)) as the front of
    y = p @ front @ last on the layer's im2col p (columns (channel, row tap, column tap)): V kron I_kw
    transposed, (S*kh*kw) x (R*kw), columns (rank, column tap) rank-major. `spatial_basis` inverts it."""
    v = np.asarray(basis, dtype=np.float64)
    r, a = v.shape
    return np.einsum("ra,jb->ajrb", v, np.eye(kw)).reshape(a * kw, r * kw)


def spatial_basis(front: np.ndarray, kw: int) -> np.ndarray:
    """The R x S*kh k x 1 factor of a `spatial_front`."""
    return np.asarray(front)[::kw, ::kw].T


def conv_pads_begin(
    in_spatial: Sequence[int], out_spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
    dilations: Sequence[int], pads: Sequence[int] | None, auto_pad: str = "NOTSET",
) -> tuple[int, ...]:
    """Leading pads of an ONNX Conv, `auto_pad` resolved as onnxruntime does."""
    nd = len(kernel)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        out = []
        for i in range(nd):
            total = max((out_spatial[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - in_spatial[i], 0)
            out.append(total // 2 if auto_pad == "SAME_UPPER" else total - total // 2)
        return tuple(out)
    if auto_pad == "VALID" or not pads:
        return (0,) * nd
    return tuple(int(p) for p in pads[:nd])


def conv_out_spatial(
    in_spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
    pads: Sequence[int] | None, auto_pad: str = "NOTSET",
) -> tuple[int, ...]:
    """Output spatial size of an ONNX Conv (what onnxruntime computes), from its input's."""
    nd = len(kernel)
    out = []
    for i in range(nd):
        span = (kernel[i] - 1) * dilations[i] + 1
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out.append(-(-in_spatial[i] // strides[i]))
        else:
            total = 0 if auto_pad == "VALID" or not pads else int(pads[i]) + int(pads[i + nd])
            out.append((in_spatial[i] + total - span) // strides[i] + 1)
    return tuple(out)


def scatter_reception(
    in_spatial: Sequence[int], out_spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
    dilations: Sequence[int], pads: Sequence[int] | None, auto_pad: str = "NOTSET", output_padding: Sequence[int] | None = None,
) -> float:
    """Of a ConvTranspose: the taps (input pixel, kernel offset) that land inside the output, per output
    pixel and per kernel tap: 1 / prod(strides) away from the borders, less where the pads crop.
    Leading pads as the attributes give them, or (output_shape / auto_pad) half the total padding."""
    nd = len(kernel)
    ratio = 1.0
    for i in range(nd):
        span = (kernel[i] - 1) * dilations[i] + 1
        if pads and auto_pad in ("NOTSET", ""):
            begin = int(pads[i])
        else:
            extra = int(output_padding[i]) if output_padding else 0
            total = max(strides[i] * (in_spatial[i] - 1) + extra + span - out_spatial[i], 0)
            begin = total - total // 2 if auto_pad == "SAME_LOWER" else total // 2
        pos = np.arange(in_spatial[i])[:, None] * strides[i] + np.arange(kernel[i])[None, :] * dilations[i] - begin
        inside = int(np.count_nonzero((pos >= 0) & (pos < out_spatial[i])))
        ratio *= inside / (kernel[i] * max(out_spatial[i], 1))
    return ratio


def sample_positions(rng: np.random.Generator, batch: int, out_spatial: Sequence[int],
                     per_sample: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(sample index (m,), output coordinates (m, nd)): `per_sample` distinct output positions per
    sample drawn without replacement, or all of them (in order) when None or not fewer."""
    total = int(np.prod(out_spatial))
    if per_sample is None or per_sample >= total:
        flat = np.tile(np.arange(total), batch)
        n_idx = np.repeat(np.arange(batch), total)
    else:
        flat = np.concatenate([rng.choice(total, per_sample, replace=False) for _ in range(batch)])
        n_idx = np.repeat(np.arange(batch), per_sample)
    coords = np.stack(np.unravel_index(flat, tuple(out_spatial)), axis=1) if out_spatial else np.zeros((flat.size, 0), int)
    return n_idx, coords


def im2col(
    x: np.ndarray, n_idx: np.ndarray, coords: np.ndarray, kernel: Sequence[int], strides: Sequence[int],
    pads_begin: Sequence[int], dilations: Sequence[int],
) -> np.ndarray:
    """Rows (m, C * prod(kernel)) of the conv's receptive fields at output positions (n_idx, coords),
    zero outside the input; columns ordered (channel, kernel offsets) like W.reshape(T, -1)."""
    nd = len(kernel)
    in_sp = x.shape[2:]
    pad_width = [(0, 0), (0, 0)]
    for i in range(nd):
        last_needed = int(coords[:, i].max(initial=0)) * strides[i] + (kernel[i] - 1) * dilations[i] - pads_begin[i]
        pad_width.append((pads_begin[i], max(0, last_needed - (in_sp[i] - 1))))
    xp = np.pad(x, pad_width) if any(p != (0, 0) for p in pad_width) else x
    offsets = list(itertools.product(*(range(k) for k in kernel)))
    out = np.empty((n_idx.size, x.shape[1], len(offsets)), dtype=x.dtype)
    for j, off in enumerate(offsets):
        idx = tuple(coords[:, i] * strides[i] + off[i] * dilations[i] for i in range(nd))
        out[:, :, j] = xp[(n_idx, slice(None)) + idx]  # (m, C): advanced indices around a slice go first
    return out.reshape(n_idx.size, -1)


def balance_chain(weights: Sequence[np.ndarray], sweeps: int = 3) -> list[np.ndarray]:
    """The same chain of linear maps with each intermediate channel rescaled so the factor writing it
    and the factor reading it have equal norms on that channel (the product is unchanged).

    Weights are in conv layout (out, in, *kernel), executed in order: channel i of weights[k]'s output
    is channel i of weights[k+1]'s input. A refit leaves scales wherever the solve put them (a whitened
    first factor ~1e-2, a core ~1e2); gradient steps on such factors diverge, balanced ones train like
    the original layer.
    """
    out = [np.array(w, dtype=np.float64, copy=True) for w in weights]
    for _ in range(sweeps):
        for k in range(len(out) - 1):
            a, b = out[k], out[k + 1]
            na = np.sqrt(np.sum(a.reshape(a.shape[0], -1) ** 2, axis=1))
            nb = np.sqrt(np.sum(np.moveaxis(b, 1, 0).reshape(b.shape[1], -1) ** 2, axis=1))
            ok = (na > 0) & (nb > 0)
            c = np.ones_like(na)
            c[ok] = np.sqrt(nb[ok] / na[ok])
            out[k] = a * c.reshape((-1,) + (1,) * (a.ndim - 1))
            out[k + 1] = b / c.reshape((1, -1) + (1,) * (b.ndim - 2))
    return [o.astype(np.asarray(w).dtype) for o, w in zip(out, weights, strict=True)]


# Unknowns of the first factor up to which its normal equations are formed and solved directly (a
# 4096^2 float64 matrix is 134 MB); beyond, conjugate gradients on the same equations, matrix-free:
# ResNet-50's 256-channel 3x3 layers at input rank 128 have 32768 unknowns (an 8.6 GB matrix).
FIRST_DIRECT_MAX = 4096


def fit_first_given_rest(stats: GramStats, w: np.ndarray, rank: int, kk: int, intercept: bool,
                         ridge: float = DEFAULT_RIDGE, start: np.ndarray | None = None,
                         max_direct: int = FIRST_DIRECT_MAX, cg_iters: int = 60) -> np.ndarray:
    """The first factor A (rank x S) that best fits the targets with the rest of the chain fixed.

    `stats` are on the im2col of the chain's input (columns (channel s, offset k)); `w` (rank*kk x t,
    rows (r, k)) maps the im2col of A's output to the output, y ~ z @ w with z[(r,k)] = sum_s A[r,s]
    x[(s,k)]. The output is linear in A, so this is a ridge least squares in rank*S unknowns, solved
    from the Gram statistics: H vec(A) = B with H[(r,s),(r',s')] = sum_{k,k'} (w w^T)[(r,k),(r',k')]
    Cxx[(s,k),(s',k')] and B[r,s] = sum_{k,t} w[(r,k),t] Cxy[(s,k),t] (centred when a bias is fitted).
    Up to `max_direct` unknowns H is formed and solved exactly; beyond, conjugate gradients applies H
    without forming it (memory: the Gram's size), warm-started at `start` (the current first factor),
    so the result is never worse than `start` on the regularised objective. Alternating it with
    `fit_reduced_rank` on the projected statistics never increases the error.
    """
    cpp, cpy, _, _, _ = stats.centred(intercept)
    s = stats.d // kk
    n4 = (w @ w.T).reshape(rank, kk, rank, kk)
    p4 = cpp.reshape(s, kk, s, kk)
    b = np.einsum("akt,skt->as", w.reshape(rank, kk, -1), cpy.reshape(s, kk, -1), optimize=True).reshape(-1)
    if rank * s <= max_direct or start is None:
        h = np.einsum("akbl,skul->asbu", n4, p4, optimize=True).reshape(rank * s, rank * s)
        lam = ridge_lambda(h, ridge)
        return _solve_psd(h + lam * np.eye(h.shape[0]), b).reshape(rank, s)
    import scipy.sparse.linalg

    # trace(H) = sum_k (sum_r N[r,k,r,k]) (sum_s P[s,k,s,k]): the same ridge rule as the direct solve.
    trace = float(np.einsum("akak->k", n4) @ np.einsum("sksk->k", p4))
    lam = ridge * trace / (rank * s)
    pt = np.ascontiguousarray(p4.transpose(0, 1, 3, 2)).reshape(s, kk * kk * s)  # (s, (k, l, u))

    def matvec(v: np.ndarray) -> np.ndarray:
        a = v.reshape(rank, s)
        t1 = np.tensordot(n4, a, axes=([2], [0]))  # (r, k, l, u)
        return (t1.reshape(rank, -1) @ pt.T).reshape(-1) + lam * v

    op = scipy.sparse.linalg.LinearOperator((rank * s, rank * s), matvec=matvec, dtype=np.float64)
    x0 = np.asarray(start, dtype=np.float64).reshape(-1)
    x, _ = scipy.sparse.linalg.cg(op, b, x0=x0, rtol=1e-7, maxiter=cg_iters)

    def objective(v: np.ndarray) -> float:  # the regularised least squares, up to a constant
        return float(v @ matvec(v) - 2 * b @ v)

    return (x if objective(x) <= objective(x0) else x0).reshape(rank, s)
