"""What flows between the graph layer, the handlers, planning and decomposition: no protobuf inside.

`Layer` is one weight-carrying node as the rest of the pipeline sees it; `LayerFactors` the arrays a
handler's decomposition produced; `NodeSpec` one node of a replacement chain, which the graph layer
turns into protobuf.
"""

from __future__ import annotations

import math
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
class Im2col:
    """How a layer reads its data input as rows of a matrix against its output: what calibration and
    data-driven ranks accumulate statistics on. A conv reads receptive fields (its kernel, strides,
    pads, dilations and auto_pad, per group); a matrix layer reads the rows of its input (the last
    axis; the columns under Gemm's transA)."""

    width: int  # columns per group: input channels per group x kernel taps, or K
    outputs: int  # output channels (all groups), or N
    groups: int = 1
    kernel: tuple[int, ...] = ()  # spatial kernel; empty for a matrix layer
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    pads: tuple[int, ...] | None = None  # None: the node has no pads (auto_pad decides, or none)
    auto_pad: str = "NOTSET"
    trans_a: bool = False

    @property
    def conv(self) -> bool:
        return bool(self.kernel)

    @property
    def taps(self) -> int:
        return math.prod(self.kernel) if self.kernel else 1


# One group's factors as matrices, y = (x [@ first]) @ front @ last: first R3 x S_g (Tucker-2 only),
# front d x R (the core, or the SVD's first factor), last R x T_g; float64.
RefitBlock = tuple[np.ndarray | None, np.ndarray, np.ndarray]


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
