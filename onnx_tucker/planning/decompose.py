"""Decomposition: a planned layer and its weight -> factor arrays in execution order (pure numpy).

The handler of the layer's operator knows the layouts (see `ops/`); this step only connects a plan
to it.
"""

from __future__ import annotations

import numpy as np

from ..numerics.spectral import LayerSpectra
from ..ops.layer import Layer, LayerFactors
from ..ops.registry import handler_for
from .planner import LayerPlan


def decompose_layer(
    layer: Layer, plan: LayerPlan, weight: np.ndarray, hooi_iters: int = 0, spectra: LayerSpectra | None = None
) -> LayerFactors:
    """`spectra`: the planner's eigendecompositions of this weight's matrices, reused when given."""
    assert plan.ranks is not None
    if plan.kind not in ("tucker2", "tucker1", "tucker1-in", "svd", "spatial-svd", "cp"):
        raise ValueError(f"cannot decompose a layer planned as {plan.kind!r}")
    return handler_for(layer).decompose(layer, plan.kind, plan.ranks, weight, hooi_iters, spectra)
