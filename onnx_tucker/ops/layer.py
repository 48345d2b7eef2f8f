"""`Layer`: one weight-carrying node as planning, costing and decomposition see it (no protobuf inside)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

Shape = tuple[int | None, ...]


@dataclass(frozen=True)
class Layer:
    """One Conv / Gemm / MatMul node as the planner sees it (no protobuf inside)."""

    layer_id: str  # node name, or "<op>:<first output>" for unnamed nodes
    op_type: str
    node_index: int  # position in graph.node (-1 inside subgraphs)
    weight_name: str | None = None
    weight_shape: tuple[int, ...] | None = None
    weight_dtype: str | None = None
    bias_name: str | None = None
    attrs: Mapping[str, object] = field(default_factory=dict)
    input_shape: Shape | None = None
    output_shape: Shape | None = None
    skip_reason: str | None = None  # set when the node can never be decomposed
    shared_weight: bool = False  # the weight also feeds other nodes
    weight_folded: bool = False  # the weight is computed from constants (ConstantOfShape, Cast, ...), folded



def factorised_as(layer: Layer) -> tuple[int, float]:
    """What decides how a weight is factorised, beyond the weight itself: Gemm (transB, alpha), Conv
    (group, 1.0): a grouped conv's factors are block-diagonal per group.

    Layers sharing one weight can share one set of factors only when these agree.
    """
    if layer.op_type == "Conv":
        return (int(layer.attrs.get("group", 1)), 1.0)  # type: ignore[call-overload]
    if layer.op_type != "Gemm":
        return (0, 1.0)
    return (int(layer.attrs.get("transB", 0)), float(layer.attrs.get("alpha", 1.0)))  # type: ignore[call-overload,arg-type]




@dataclass(frozen=True)
class LayerFactors:
    kind: str
    arrays: tuple[np.ndarray, ...]
    rel_error: float
