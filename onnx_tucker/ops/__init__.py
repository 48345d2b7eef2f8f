"""One handler per operator (Conv, ConvTranspose, Gemm, MatMul), found through `registry`.

Protobuf-free: handlers see `Layer`s and numpy arrays and describe their replacement chains as
`NodeSpec`s, which the graph layer writes.
"""

from .base import OpHandler
from .layer import Chain, Im2col, Layer, LayerFactors, NodeSpec, RefitBlock
from .registry import (
    DECOMPOSABLE_OPS,
    HANDLERS,
    REPORTED_OPS,
    find_handler,
    handler_for,
    layer_cost,
    reported_reason,
    svd_matrix,
)

__all__ = [
    "DECOMPOSABLE_OPS", "HANDLERS", "REPORTED_OPS", "Chain", "Im2col", "Layer", "LayerFactors", "NodeSpec", "OpHandler",
    "RefitBlock", "find_handler", "handler_for", "layer_cost", "reported_reason", "svd_matrix",
]
