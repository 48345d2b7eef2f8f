"""Turn a planned layer and its weight into factor arrays, in execution order. Pure numpy.

Layouts (ONNX conventions, float64 here; the rewrite casts back to the model's dtype):
- tucker2: 1x1 S->R3 (R3 x S x 1..), core R3->R4 (R4 x R3 x k..), 1x1 R4->T (T x R4 x 1..)
- tucker1: core S->R4 (R4 x S x k..), 1x1 R4->T (T x R4 x 1..)
- svd of a 1x1 conv: 1x1 S->R (R x S x 1..), 1x1 R->T (T x R x 1..)
- svd of a Gemm / MatMul: P (K x R), Q (R x N) with x @ W_eff ~ (x @ P) @ Q
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .graph import Layer
from .plan import LayerPlan, svd_matrix
from .tucker import reconstruct_tucker1, reconstruct_tucker2, relative_error, truncated_svd, tucker1, tucker2


@dataclass(frozen=True)
class LayerFactors:
    kind: str
    arrays: tuple[np.ndarray, ...]
    rel_error: float


def _as_1x1(m: np.ndarray, spatial_dims: int) -> np.ndarray:
    return m.reshape(m.shape + (1,) * spatial_dims)


def decompose_layer(layer: Layer, plan: LayerPlan, weight: np.ndarray, hooi_iters: int = 0) -> LayerFactors:
    assert plan.ranks is not None
    w = np.asarray(weight, dtype=np.float64)
    if plan.kind == "tucker2":
        f = tucker2(w, plan.ranks[0], plan.ranks[1], hooi_iters=hooi_iters)
        nd = w.ndim - 2
        chain = (_as_1x1(f.u_in.T, nd), f.core, _as_1x1(f.u_out, nd))
        return LayerFactors("tucker2", chain, relative_error(w, reconstruct_tucker2(f)))
    if plan.kind == "tucker1":
        g = tucker1(w, plan.ranks[0])
        pair = (g.core, _as_1x1(g.u_out, w.ndim - 2))
        return LayerFactors("tucker1", pair, relative_error(w, reconstruct_tucker1(g)))
    if plan.kind == "svd":
        m = svd_matrix(layer, w)
        s = truncated_svd(m, plan.ranks[0])
        err = relative_error(m, s.left @ s.right)
        if layer.op_type == "Conv":
            nd = w.ndim - 2
            return LayerFactors("svd", (_as_1x1(s.right, nd), _as_1x1(s.left, nd)), err)
        return LayerFactors("svd", (s.left, s.right), err)
    raise ValueError(f"cannot decompose a layer planned as {plan.kind!r}")
