"""One handler per operator (Conv, ConvTranspose, Gemm, MatMul), found through `registry`.

Protobuf-free: handlers see `Layer`s and numpy arrays and describe their replacement chains as
`NodeSpec`s, which the graph layer writes.
"""

from .base import OpHandler
from .layer import Chain, Layer, LayerFactors, NodeSpec
from .registry import DECOMPOSABLE_OPS, HANDLERS, REPORTED_OPS, handler_for, layer_cost, svd_matrix

__all__ = [
    "DECOMPOSABLE_OPS", "HANDLERS", "REPORTED_OPS", "Chain", "Layer", "LayerFactors", "NodeSpec", "OpHandler",
    "handler_for", "layer_cost", "svd_matrix",
]
