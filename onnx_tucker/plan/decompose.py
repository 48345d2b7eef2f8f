"""Turn a planned layer and its weight into factor arrays, in execution order. Pure numpy.

Layouts (ONNX conventions, float64 here; the rewrite casts back to the model's dtype):
- tucker2: 1x1 S->R3 (R3 x S x 1..), core R3->R4 (R4 x R3 x k..), 1x1 R4->T (T x R4 x 1..)
- tucker1: core S->R4 (R4 x S x k..), 1x1 R4->T (T x R4 x 1..)
- svd of a 1x1 conv: 1x1 S->R (R x S x 1..), 1x1 R->T (T x R x 1..)
- svd of a Gemm / MatMul: P (K x R), Q (R x N) with x @ W_eff ~ (x @ P) @ Q
- grouped conv (group G, S and R per group): each group's kernel decomposed on its own with the
  same ranks, the factors stacked along the output axis (G*R3 x S, G*R4 x R3 x k.., T x R4, ...), so
  each factor is a grouped conv with group G: block-diagonal, never mixing groups
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..numerics.spectral import LayerSpectra
from ..numerics.tucker import (
    reconstruct_tucker1,
    reconstruct_tucker2,
    relative_error,
    truncated_svd,
    tucker1,
    tucker2,
)
from ..ops.cost import conv_groups
from ..ops.layer import Layer, LayerFactors
from .planner import LayerPlan, svd_matrix


def _as_1x1(m: np.ndarray, spatial_dims: int) -> np.ndarray:
    return m.reshape(m.shape + (1,) * spatial_dims)


def decompose_layer(
    layer: Layer, plan: LayerPlan, weight: np.ndarray, hooi_iters: int = 0, spectra: LayerSpectra | None = None
) -> LayerFactors:
    """`spectra`: the planner's eigendecompositions of this weight's matrices, reused when given."""
    assert plan.ranks is not None
    groups = conv_groups(layer)
    if groups > 1:
        return _decompose_grouped(layer, plan, np.asarray(weight), hooi_iters, groups)
    if plan.kind == "svd":
        # Kept in its own dtype: truncated_svd reads a float32 FC weight in float64 blocks.
        m = svd_matrix(layer, np.asarray(weight))
        s = truncated_svd(m, plan.ranks[0], spectra=spectra)
        err = s.rel_error if s.rel_error is not None else relative_error(m, s.left @ s.right)
        if layer.op_type == "Conv":
            nd = np.ndim(weight) - 2
            return LayerFactors("svd", (_as_1x1(s.right, nd), _as_1x1(s.left, nd)), err)
        return LayerFactors("svd", (s.left, s.right), err)
    w = np.asarray(weight, dtype=np.float64)
    if plan.kind == "tucker2":
        f = tucker2(w, plan.ranks[0], plan.ranks[1], hooi_iters=hooi_iters, spectra=spectra)
        nd = w.ndim - 2
        chain = (_as_1x1(f.u_in.T, nd), f.core, _as_1x1(f.u_out, nd))
        return LayerFactors("tucker2", chain, relative_error(w, reconstruct_tucker2(f)))
    if plan.kind == "tucker1":
        g = tucker1(w, plan.ranks[0], spectra=spectra)
        pair = (g.core, _as_1x1(g.u_out, w.ndim - 2))
        return LayerFactors("tucker1", pair, relative_error(w, reconstruct_tucker1(g)))
    raise ValueError(f"cannot decompose a layer planned as {plan.kind!r}")


def _decompose_grouped(layer: Layer, plan: LayerPlan, weight: np.ndarray, hooi_iters: int, groups: int) -> LayerFactors:
    per_group = weight.shape[0] // groups
    one = replace(layer, attrs={**layer.attrs, "group": 1}, weight_shape=(per_group, *weight.shape[1:]))
    blocks = [weight[g * per_group : (g + 1) * per_group] for g in range(groups)]
    parts = [decompose_layer(one, plan, b, hooi_iters) for b in blocks]
    arrays = tuple(np.concatenate(fs, axis=0) for fs in zip(*(p.arrays for p in parts), strict=True))
    # ||W - W~||^2 is the sum over the groups' errors, each relative to its own block.
    sq = [float(np.sum(np.square(b, dtype=np.float64))) for b in blocks]
    total = sum(sq)
    err = float(np.sqrt(sum(p.rel_error**2 * n for p, n in zip(parts, sq, strict=True)) / total)) if total > 0 else 0.0
    return LayerFactors(plan.kind, arrays, err)
