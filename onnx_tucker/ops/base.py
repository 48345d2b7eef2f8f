"""The operator handler: everything one operator means to onnx-tucker, in one class.

A handler recognises its node's weight and checks it (`skip_reason`, `input_mismatch`), says which
decompositions it allows and which is the default (`kinds`, `default_kind`), which matrices they
factorise (`blocks`, `matrices`), what each costs at real resolutions (`cost`), computes the factors
(`decompose`, pure numpy) and builds the replacement chain (`chain`, protobuf-free `NodeSpec`s the
graph layer writes). For calibration it says how the layer reads its input as rows (`im2col`) and
lays its factors out as matrices and back (`refit_blocks`, `from_refit_blocks`, `balance`).
Planning, decomposition, costing, rewriting and calibration ask the handler found through
`registry.handler_for` and never branch on the op type.

Ranks are (R_out, R_in) for tucker2, (R_out,) for tucker1, (R_in,) for tucker1-in (Tucker-1's mirror:
a 1x1 conv S->R then the k x k conv R->T), (R,) for svd and spatial-svd (a 2-D conv as a kh x 1 conv
S->R then a 1 x kw conv R->T) and cp (CP with the spatial modes as one: a 1x1 S->R, a depthwise k x k
R->R, a 1x1 R->T). Grouped layers are
decomposed group by group with the same ranks in every group: `blocks` splits the weight into its
groups once, and every factor of the chain is itself a grouped (block-diagonal) operator.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ..numerics.refit import balance_chain
from ..numerics.spectral import LayerSpectra
from ..numerics.tucker import (
    cp,
    cp_rank_bound,
    reconstruct_spatial_svd,
    reconstruct_tucker1,
    reconstruct_tucker1_in,
    reconstruct_tucker2,
    relative_error,
    spatial_svd,
    spatial_unfold,
    truncated_svd,
    tucker1,
    tucker1_in,
    tucker2,
    unfold,
)
from .layer import Chain, Im2col, Layer, LayerFactors, RefitBlock

Fresh = Callable[[str], str]  # a name derived from the argument that collides with nothing in the graph

LABELS = {
    "tucker2": ("tucker_first", "tucker_core", "tucker_last"),
    "tucker1": ("tucker_core", "tucker_last"),
    # Node labels double as fine-tuning's factor names (training/convert.py FACTOR_MODULE matches each).
    "tucker1-in": ("tucker_first", "tucker_core"),
    "svd": ("svd_first", "svd_last"),
    "spatial-svd": ("spatial_vertical", "spatial_horizontal"),
    "cp": ("cp_first", "cp_depthwise", "cp_last"),
}
MODE_NAMES = {"tucker2": ("output", "input"), "tucker1": ("output",), "tucker1-in": ("input",), "svd": ("matrix",),
              "spatial-svd": ("spatial",), "cp": ("cp",)}


def same_pads(size: int | None, kernel: int, stride: int, dilation: int, upper: bool) -> tuple[int, int] | None:
    """(begin, end) padding of one spatial axis under `auto_pad` SAME_UPPER / SAME_LOWER for a windowed
    op that slides over its input (Conv, the pools): output ceil(size / stride), the odd pixel at the end
    (UPPER) or the beginning (LOWER). None when it depends on a `size` not known (stride > 1)."""
    span = (kernel - 1) * dilation + 1
    if stride == 1:
        total = span - 1
    elif size is None:
        return None
    else:
        total = max(0, (-(-size // stride) - 1) * stride + span - size)
    small, big = total // 2, total - total // 2
    return (small, big) if upper else (big, small)


def prod(dims: tuple[int | None, ...] | None) -> int | None:
    """Product of known dims (None when any is unknown)."""
    if dims is None or any(d is None for d in dims):
        return None
    return math.prod(int(d) for d in dims if d is not None)


def batch_rows(layer: Layer) -> int | None:
    """How many weight-vector products a Gemm / MatMul does (batch rows)."""
    shape = layer.output_shape
    if shape is None or len(shape) == 0:
        return None
    lead = list(shape[:-1])
    if lead and not lead[0]:  # an unknown batch counts as 1, as for convs (a Pad can lose it upstream)
        lead[0] = 1
    return prod(tuple(lead))


def as_1x1(m: np.ndarray, spatial_dims: int) -> np.ndarray:
    return m.reshape(m.shape + (1,) * spatial_dims)


class OpHandler:
    """Base class; the defaults suit a layer whose weight is one matrix factorised by SVD."""

    op_type: str = ""
    weight_input: int = 1  # the node input that holds the weight
    # The op types onnxruntime runs this layer as (fused, or in its NCHWc layout): its profiled kernels.
    runtime_kernels: tuple[str, ...] = ()
    # torch (Linear, matmul) may store a matrix weight either way round and on either side of the product.
    weight_either_side: bool = True

    # ---- recognising ---------------------------------------------------------------------------
    def operands_reason(self, input_is_constant: bool, weight_is_constant: bool) -> str | None:
        """Why the node is not a layer with a constant weight at all (None: it may be)."""
        return None

    def skip_reason(self, layer: Layer, bias_reason: str | None) -> str | None:
        """Why this layer (constant float weight of `layer.weight_shape`) can never be decomposed.
        `bias_reason`: why the bias input is not a constant (None: constant or absent)."""
        return None

    def input_mismatch(self, layer: Layer) -> tuple[str, int, int] | None:
        """(what, input has, weight expects) when the weight does not fit the input's shape."""
        return None

    # ---- factorising ---------------------------------------------------------------------------
    def groups(self, layer: Layer) -> int:
        return 1

    def kinds(self, layer: Layer) -> tuple[str, ...]:
        """The decompositions `chain` can build for this layer (a plan file may name any of them)."""
        return ("svd",)

    def default_kind(self, layer: Layer, min_tucker2_channels: int) -> str:
        return "svd"

    def blocks(self, layer: Layer, weight: np.ndarray) -> list[np.ndarray]:
        """The weight in the layout the numerics factorise, one array per group."""
        return [weight]

    def matrices(self, block: np.ndarray, kind: str) -> list[np.ndarray]:
        """The matrices whose ranks are chosen: channel-mode unfoldings of a kernel, or the matrix."""
        if kind == "tucker2":
            return [unfold(block, 0), unfold(block, 1)]
        if kind == "tucker1":
            return [unfold(block, 0)]
        if kind == "tucker1-in":
            return [unfold(block, 1)]
        if kind == "spatial-svd":
            return [spatial_unfold(block)]
        if kind == "cp":  # a weight-space policy reads the output mode's spectrum (`rank_limits`: the cap)
            return [unfold(block, 0)]
        return [block if block.ndim == 2 else block.reshape(block.shape[0], -1)]  # a 1x1 kernel: T x S

    def rank_limits(self, block_shape: tuple[int, ...], kind: str) -> tuple[int, ...] | None:
        """The largest meaningful rank of each mode of `kind` where it is not the smaller side of its
        matrix (`matrices`): CP's exact rank bound. None: the matrices' smaller sides."""
        if kind == "cp" and len(block_shape) >= 3:
            return (cp_rank_bound(block_shape[0], block_shape[1], math.prod(block_shape[2:])),)
        return None

    def dims(self, layer: Layer) -> tuple[int, int]:
        """(K, N) of the matrix as used: y = x @ W with W K x N."""
        assert layer.weight_shape is not None
        return layer.weight_shape[0], layer.weight_shape[1]

    def cost(self, layer: Layer, kind: str, ranks: tuple[int, ...] = ()) -> tuple[int, int | None]:
        """(parameters, MACs) of the layer decomposed as `kind` ("original" for the layer as it is).
        MACs are None when shapes are unknown; biases are left out (they are carried over). Here: a
        matrix applied to every row of the input (batch and leading dims), SVD-split into two."""
        K, N = self.dims(layer)
        if kind == "original":
            params = K * N
        elif kind == "svd":
            params = ranks[0] * (K + N)
        else:
            raise ValueError(kind)
        rows = batch_rows(layer)
        return params, None if rows is None else params * rows

    def factorisation_key(self, layer: Layer) -> tuple[object, ...]:
        """What decides the factors beyond the weight itself: layers sharing a weight share one set of
        factors only when these agree."""
        return ()

    def factorisation_note(self, layer: Layer) -> str:
        """For messages about shared weights: how this layer reads its weight, when it matters."""
        return ""

    def decompose(
        self, layer: Layer, kind: str, ranks: tuple[int, ...], weight: np.ndarray,
        hooi_iters: int = 0, spectra: LayerSpectra | None = None,
    ) -> LayerFactors:
        """Factor arrays in the chain's execution order and layout. `spectra`: the planner's
        eigendecompositions of this weight's matrices, reused when given (single-group layers)."""
        blocks = self.blocks(layer, np.asarray(weight))
        if len(blocks) == 1:
            arrays, err = self.factor_block(kind, ranks, blocks[0], hooi_iters, spectra)
            return LayerFactors(kind, self.to_layout(layer, kind, arrays), err)
        parts = [self.factor_block(kind, ranks, b, hooi_iters, None) for b in blocks]
        arrays = tuple(np.concatenate(fs, axis=0) for fs in zip(*(p[0] for p in parts), strict=True))
        # ||W - W~||^2 is the sum over the groups' errors, each relative to its own block.
        sq = [float(np.sum(np.square(b, dtype=np.float64))) for b in blocks]
        total = sum(sq)
        err = float(np.sqrt(sum(p[1] ** 2 * n for p, n in zip(parts, sq, strict=True)) / total)) if total > 0 else 0.0
        return LayerFactors(kind, self.to_layout(layer, kind, arrays), err)

    def factor_block(
        self, kind: str, ranks: tuple[int, ...], block: np.ndarray, hooi_iters: int, spectra: LayerSpectra | None
    ) -> tuple[tuple[np.ndarray, ...], float]:
        """One block's factors and relative error. Matrix handlers: (P, Q) with block ~ P @ Q."""
        if kind != "svd":
            raise ValueError(f"cannot decompose a {self.op_type} as {kind!r}")
        s = truncated_svd(block, ranks[0], spectra=spectra)
        err = s.rel_error if s.rel_error is not None else relative_error(block, s.left @ s.right)
        return (s.left, s.right), err

    def to_layout(self, layer: Layer, kind: str, arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        """The concatenated per-group factors in the layout the chain's nodes read."""
        return arrays

    def block_factor_shapes(self, kind: str, ranks: tuple[int, ...], block_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        """Shapes of `factor_block`'s arrays for a block of this shape (no arithmetic). Here (P, Q)."""
        if kind != "svd":
            raise ValueError(f"cannot decompose a {self.op_type} as {kind!r}")
        return (block_shape[0], ranks[0]), (ranks[0], block_shape[1])

    def factor_shapes(self, layer: Layer, kind: str, ranks: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        """Shapes of `decompose(...).arrays` for `kind` at `ranks`, without reading or factorising the
        weight: what the per-layer timer needs to build a chain with random factors of the right shapes."""
        assert layer.weight_shape is not None
        # A zero-stride view of the weight's shape: `blocks` slices and transposes it without memory.
        probe = np.broadcast_to(np.zeros((), np.float32), layer.weight_shape)
        blocks = self.blocks(layer, probe)
        per_block = self.block_factor_shapes(kind, ranks, tuple(blocks[0].shape))
        arrays = tuple(np.zeros((s[0] * len(blocks), *s[1:]), np.float32) for s in per_block)  # rank-sized
        return tuple(tuple(a.shape) for a in self.to_layout(layer, kind, arrays))

    # ---- calibrating (statistics of the layer on data) ------------------------------------------
    def im2col(self, layer: Layer) -> Im2col | None:
        """How the layer reads its data input as rows (None: calibration and data-driven ranks do not
        cover it). Here y = x @ W with W K x N: the rows of x's last axis."""
        if layer.weight_shape is None or len(layer.weight_shape) != 2:
            return None
        k, n = self.dims(layer)
        return Im2col(k, n)

    def scatter(self, layer: Layer) -> Im2col | None:
        """For a layer that writes each input pixel over a kernel window (ConvTranspose), which has no
        im2col: its geometry (input channels per group x taps, output channels, groups, kernel,
        strides, dilations, pads, auto_pad), what data-driven ranks read. None for any other layer."""
        return None

    def weight_on_left(self, layer: Layer) -> bool:
        """y = W @ X with the constant on the left: the columns of X are the regressors."""
        return False

    def refits(self, layer: Layer) -> bool:
        """Whether calibration refits this layer's factors on data (data-driven ranks then count the
        error of data-aware factors; otherwise that of the weight-space factors, as built)."""
        return self.im2col(layer) is not None

    def refit_problem(self, layer: Layer, factors: LayerFactors, bias: np.ndarray | None) -> str | None:
        """Why calibration cannot refit this layer's chain (None: it can); `bias`: the chain's bias."""
        return None if self.im2col(layer) is not None else f"calibration does not cover {self.op_type} layers"

    def refit_front(self, layer: Layer, factors: LayerFactors) -> str | None:
        """Why calibration keeps the chain's front factor (the im2col side of `refit_blocks`) and refits
        only the last one and the bias, whatever the method (None: the front may be refit too)."""
        return None

    def pointwise_last(self, layer: Layer, factors: LayerFactors) -> bool:
        """The chain ends in a 1x1 Conv (stride 1, no padding, the layer's groups) at the output
        resolution, so calibration can refit that factor per pixel where `im2col` is None."""
        return False

    def refit_blocks(self, layer: Layer, factors: LayerFactors) -> list[RefitBlock]:
        """`factors` as matrices, one `RefitBlock` per group, in float64. Here (P, Q): y = x @ P @ Q."""
        a = [np.asarray(x, dtype=np.float64) for x in factors.arrays]
        return [(None, a[0], a[1])]

    def from_refit_blocks(self, layer: Layer, factors: LayerFactors, blocks: list[RefitBlock]) -> list[np.ndarray]:
        """Refit `blocks` back in the layout of `factors` (the chain's execution order)."""
        ((_, front, last),) = blocks
        return [front, last]

    def balance(self, layer: Layer, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """The same chain with even scales along its factors (trainable afterwards); `balance_chain`
        reads factors as conv weights (out x in), a matrix chain is x @ P @ Q."""
        return [a.T for a in balance_chain([a.T for a in arrays])]

    def export_signature(self, weight_shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
        """What a round trip through torch keeps of this layer (fine-tuning's export check): matrix
        layers come back as Gemm or MatMul, their weight either way round."""
        return "Gemm/MatMul", tuple(sorted(weight_shape))

    def auto_pads(self, size: int | None, kernel: int, stride: int, dilation: int, output_padding: int,
                  upper: bool) -> tuple[int, int] | None:
        """`auto_pad` SAME_* as explicit (begin, end) pads of one axis (fine-tuning's torch-readiness pass);
        None when they depend on a size not known."""
        return same_pads(size, kernel, stride, dilation, upper)

    # ---- rewriting -----------------------------------------------------------------------------
    def stored(self, layer: Layer, factors: LayerFactors) -> tuple[np.ndarray, ...]:
        """The factors as stored in the model (e.g. transposed for a Gemm with transB=1)."""
        return factors.arrays

    def chain(self, layer: Layer, factors: LayerFactors, weights: list[str], fresh: Fresh, opset: int) -> Chain:
        """The nodes replacing `layer`, reading the factor initializers `weights`; the last one writes
        the layer's own output, so every consumer stays attached."""
        raise NotImplementedError


def tensor_factor_shapes(kind: str, ranks: tuple[int, ...], block_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Shapes of `tensor_factors`' arrays for a T x S x k... block (no arithmetic)."""
    T, S, spatial = block_shape[0], block_shape[1], tuple(block_shape[2:])
    one = (1,) * len(spatial)
    if kind == "svd":
        return (ranks[0], S, *one), (T, ranks[0], *one)
    if kind == "tucker2":
        r4, r3 = ranks
        return (r3, S, *one), (r4, r3, *spatial), (T, r4, *one)
    if kind == "tucker1":
        return (ranks[0], S, *spatial), (T, ranks[0], *one)
    if kind == "tucker1-in":
        return (ranks[0], S, *one), (T, ranks[0], *spatial)
    if kind == "spatial-svd" and len(spatial) == 2:
        return (ranks[0], S, spatial[0], 1), (T, ranks[0], 1, spatial[1])
    if kind == "cp":
        return (ranks[0], S, *one), (ranks[0], 1, *spatial), (T, ranks[0], *one)
    raise ValueError(f"cannot decompose a kernel as {kind!r}")


def tensor_factors(
    kind: str, ranks: tuple[int, ...], block: np.ndarray, hooi_iters: int, spectra: LayerSpectra | None
) -> tuple[tuple[np.ndarray, ...], float]:
    """Factors of a T x S x k... kernel block as conv weights: tucker2 (1x1 S->R3, core R3->R4, 1x1
    R4->T), tucker1 (core S->R4, 1x1 R4->T), tucker1-in (1x1 S->R3, core R3->T), svd of a 1x1 kernel (1x1 S->R, 1x1 R->T), spatial-svd
    of a 2-D kernel (kh x 1 S->R, 1 x kw R->T) or cp (1x1 S->R, depthwise k x k R->R, 1x1 R->T)."""
    nd = block.ndim - 2
    if kind == "svd":
        # Kept in its own dtype: truncated_svd reads float32 in float64 blocks.
        m = block.reshape(block.shape[0], -1)
        s = truncated_svd(m, ranks[0], spectra=spectra)
        err = s.rel_error if s.rel_error is not None else relative_error(m, s.left @ s.right)
        return (as_1x1(s.right, nd), as_1x1(s.left, nd)), err
    w = np.asarray(block, dtype=np.float64)
    if kind == "tucker2":
        f = tucker2(w, ranks[0], ranks[1], hooi_iters=hooi_iters, spectra=spectra)
        return (as_1x1(f.u_in.T, nd), f.core, as_1x1(f.u_out, nd)), relative_error(w, reconstruct_tucker2(f))
    if kind == "tucker1":
        g = tucker1(w, ranks[0], spectra=spectra)
        return (g.core, as_1x1(g.u_out, nd)), relative_error(w, reconstruct_tucker1(g))
    if kind == "tucker1-in":
        mi = tucker1_in(w, ranks[0], spectra=spectra)
        return (as_1x1(mi.u_in.T, nd), mi.core), relative_error(w, reconstruct_tucker1_in(mi))
    if kind == "spatial-svd":
        sp = spatial_svd(block, ranks[0], spectra=spectra)
        err = sp.rel_error if sp.rel_error is not None else relative_error(w, reconstruct_spatial_svd(sp))
        return (sp.vertical, sp.horizontal), err
    if kind == "cp":
        c = cp(w, ranks[0])
        r = c.out.shape[1]
        depthwise = c.taps.T.reshape((r, 1, *block.shape[2:]))
        return (as_1x1(c.inp.T, nd), depthwise, as_1x1(c.out, nd)), float(c.rel_error or 0.0)
    raise ValueError(f"cannot decompose a kernel as {kind!r}")
