"""Eigendecomposition of a Gram matrix, computed once per weight matrix and shared by EVBMF and the
decompositions. Pure numpy / scipy LAPACK.

For an L x M matrix A (either orientation), everything we need comes from G = S S^T where S is A
or A^T, whichever has fewer rows (n = min(L, M)):
- the singular values of A are the square roots of the eigenvalues of G (EVBMF needs all of them);
- the leading left/right singular vectors are G's leading eigenvectors (the decompositions need
  the top R, with R known only after EVBMF has seen the spectrum).

`GramEigen` reduces G to tridiagonal form once (LAPACK sytrd, the O(n^3) part), takes every
eigenvalue from the tridiagonal matrix (sterf, O(n^2)), and keeps the Householder reflectors so that
the top-R eigenvectors cost only an MRRR solve on the tridiagonal (stemr, O(nR)) and one
back-transformation (ormqr, O(n^2 R)) when they are asked for. That is exactly what LAPACK's syevr
does in one call, split in two so that the rank can be chosen in between; the planner and the
decomposition therefore share one Gram and one tridiagonalisation per matrix instead of two.

G is accumulated in float64 from column blocks of S, so a float32 weight is never copied whole to
float64 (a 4096 x 25088 FC weight would need 822 MB for that). LAPACK runs single-threaded inside
`single_threaded_lapack()` (the api wraps a whole run in it; see there why).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import scipy.linalg
from scipy.linalg import lapack

# Size of one float64 block of columns while accumulating the Gram matrix.
_BLOCK_BYTES = 32 * 2**20


def gram_short_side(matrix: np.ndarray) -> np.ndarray:
    """G = S S^T in float64 for S the orientation of `matrix` with fewer rows (full, symmetric).

    Blocks of columns of S are converted to float64 one at a time (32 MB each) and multiplied by
    numpy, which uses BLAS syrk for B @ B.T on all cores (syrk results do not depend on the thread
    count, so the Gram is the same for every --jobs).
    """
    a = np.asarray(matrix)
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float64)
    s = a if a.shape[0] <= a.shape[1] else a.T  # n x m, n <= m (a view)
    n, m = s.shape
    if n == 0 or m == 0:
        return np.zeros((n, n))
    step = max(1, _BLOCK_BYTES // (8 * n))
    if step >= m:
        b = np.ascontiguousarray(s, dtype=np.float64)
        return b @ b.T
    g = np.zeros((n, n))
    tmp = np.empty((n, n))
    for j in range(0, m, step):
        b = np.ascontiguousarray(s[:, j : j + step], dtype=np.float64)
        np.matmul(b, b.T, out=tmp)
        g += tmp
    return g


@contextlib.contextmanager
def single_threaded_lapack():  # type: ignore[no-untyped-def]
    """Run scipy's LAPACK on one thread (numpy's BLAS keeps all cores) while inside the block.

    The tridiagonal reduction (sytrd) is memory bound: a second OpenBLAS thread gains little on an
    idle machine and loses 3-6x on a busy one (its threads spin-wait when the cores are shared).
    Only scipy's own OpenBLAS is limited, and for a whole run, so every layer sees the same thread
    counts with any --jobs (results are identical). A no-op without threadpoolctl, or when scipy and
    numpy share one BLAS library.
    """
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        yield
        return
    libs = ThreadpoolController().lib_controllers
    numpy_dir = str(Path(np.__file__).resolve().parent.parent)
    scipy_libs = [
        lib
        for lib in libs
        if lib.user_api == "blas" and "scipy" in Path(lib.filepath).parent.name and "numpy" not in lib.filepath
    ]
    if not scipy_libs or any(lib.filepath.startswith(numpy_dir + "/numpy") for lib in scipy_libs):
        yield
        return
    before = [lib.num_threads for lib in scipy_libs]
    try:
        for lib in scipy_libs:
            lib.set_num_threads(1)
        yield
    finally:
        for lib, n in zip(scipy_libs, before, strict=True):
            lib.set_num_threads(n)


class GramEigen:
    """All singular values of a matrix and, on demand, its leading singular subspace.

    `singular_values` holds the min(L, M) singular values, descending. `eigenvectors(k)` returns the
    top-k eigenvectors of the short-side Gram matrix; `left_vectors(k, matrix)` the leading left
    singular vectors of the matrix itself (L x k).
    """

    def __init__(self, matrix: np.ndarray) -> None:
        a = np.asarray(matrix)
        if a.ndim != 2:
            raise ValueError(f"expected a 2-D matrix, got shape {a.shape}")
        self.shape: tuple[int, int] = (int(a.shape[0]), int(a.shape[1]))
        self.n = min(self.shape)
        g = gram_short_side(a)
        self.trace = float(np.trace(g))  # ||A||_F^2, before LAPACK overwrites g
        n = self.n
        if n <= 1:
            self._reflectors = None
            self._tau = np.zeros(0)
            self._d = np.array([g[0, 0]]) if n == 1 else np.zeros(0)
            self._e = np.zeros(0)
            eig = self._d.copy()
        else:
            lwork = int(lapack.dsytrd_lwork(n, lower=1)[0])
            # g is symmetric: its transpose is the same matrix in Fortran order (no copy).
            c, d, e, tau, info = lapack.dsytrd(g.T, lower=1, lwork=max(lwork, 1), overwrite_a=1)
            if info != 0:
                raise np.linalg.LinAlgError(f"dsytrd failed (info={info})")
            self._reflectors, self._tau, self._d, self._e = c, tau, d, e
            eig, info = lapack.dsterf(d.copy(), e.copy())
            if info != 0:
                raise np.linalg.LinAlgError(f"dsterf did not converge (info={info})")
        eig = np.clip(np.sort(eig)[::-1], 0.0, None)
        self.eigenvalues = eig
        self.singular_values = np.sqrt(eig)

    def eigenvectors(self, k: int) -> np.ndarray:
        """Top-k eigenvectors of the Gram matrix (n x k, orthonormal columns, descending order)."""
        n = self.n
        k = int(min(max(k, 0), n))
        if k == 0:
            return np.zeros((n, 0))
        if n == 1:
            return np.ones((1, 1))
        _, z = scipy.linalg.eigh_tridiagonal(
            self._d, self._e, select="i", select_range=(n - k, n - 1), lapack_driver="stemr"
        )
        # Back-transform with the reflectors of sytrd (lower): Q = H(1)...H(n-1) acts on rows 2..n
        # (this is LAPACK's ormtr, which scipy does not wrap, written with ormqr).
        q = np.array(z, order="F")
        assert self._reflectors is not None
        refl = self._reflectors[1:, : n - 1]
        sub = np.asfortranarray(q[1:, :])
        work = lapack.dormqr("L", "N", refl, self._tau, sub, lwork=-1)[1]
        sub, _, info = lapack.dormqr("L", "N", refl, self._tau, sub, lwork=max(int(work[0]), k), overwrite_c=1)
        if info != 0:
            raise np.linalg.LinAlgError(f"dormqr failed (info={info})")
        q[1:, :] = sub
        return np.ascontiguousarray(q[:, ::-1])

    def left_vectors(self, rank: int, matrix: np.ndarray) -> np.ndarray:
        """Orthonormal basis (L x rank) of the leading left singular subspace of `matrix` (L x M).

        `matrix` must be the matrix this object was built from (only its shape is checked).
        """
        a = np.asarray(matrix)
        if tuple(a.shape) != self.shape:
            raise ValueError(f"matrix shape {a.shape} is not the {self.shape} this spectrum was computed for")
        L, M = self.shape
        rank = int(min(rank, L))
        if rank <= 0:
            return np.zeros((L, 0))
        if L <= M:
            return self.eigenvectors(rank)
        # Tall: the left subspace is A times the leading right vectors; beyond rank(A) = M it is
        # completed with any orthonormal directions (they carry no energy).
        k = min(rank, M)
        basis = np.asarray(a, dtype=np.float64) @ self.eigenvectors(k)
        if rank > k:
            basis = np.concatenate([basis, np.random.default_rng(0).standard_normal((L, rank - k))], axis=1)
        q, _ = np.linalg.qr(basis)
        return q


class LayerSpectra:
    """The `GramEigen` of each matrix of one layer, keyed by position (mode 0, mode 1, ...).

    The planner fills it while choosing ranks; the decomposition of the same weight reuses it, so
    each Gram matrix is formed and tridiagonalised once. Entries are only reused for a matrix of the
    same shape; the caller guarantees that key i means the same matrix in both places.
    """

    def __init__(self) -> None:
        self._eig: dict[int, GramEigen] = {}

    def eigen(self, key: int, matrix: np.ndarray) -> GramEigen:
        e = self._eig.get(key)
        if e is None or e.shape != tuple(np.shape(matrix)):
            e = GramEigen(matrix)
            self._eig[key] = e
        return e

    def clear(self) -> None:
        self._eig.clear()
