"""What flows between the graph layer, the handlers, planning and decomposition: no protobuf inside.

`Layer` is one weight-carrying node as the rest of the pipeline sees it; `LayerFactors` the arrays a
handler's decomposition produced; `NodeSpec` one node of a replacement chain, which the graph layer
turns into protobuf.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

Shape = tuple[int | None, ...]


@dataclass(frozen=True)
class Layer:
    """One Conv / ConvTranspose / Gemm / MatMul node as the planner sees it (no protobuf inside)."""

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
    inputs: tuple[str, ...] = ()  # the node's input tensor names ("" for an omitted optional input)
    outputs: tuple[str, ...] = ()
    node_name: str = ""


@dataclass(frozen=True)
class LayerFactors:
    kind: str
    arrays: tuple[np.ndarray, ...]
    rel_error: float


class _CopyAttr:
    """Marker: take this attribute from the replaced node as it is (when the node has it)."""

    def __repr__(self) -> str:
        return "COPY"


COPY = _CopyAttr()


@dataclass(frozen=True)
class NodeSpec:
    """One node of a replacement chain. `attrs` in order; a value of `COPY` carries the replaced node's
    attribute of that name over unchanged (left out when the node does not have it)."""

    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    name: str
    attrs: tuple[tuple[str, object], ...] = ()


@dataclass(frozen=True)
class Chain:
    """What replaces one node: its nodes in execution order and any extra constants they read."""

    nodes: tuple[NodeSpec, ...]
    constants: tuple[tuple[str, np.ndarray], ...] = ()
