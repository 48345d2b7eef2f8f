"""Op type -> handler. Adding an operator is one new module in `ops/` with a `HANDLER`, listed here.

Also the layer ops users expect to see in the report although they are never decomposed, each with
the reason.
"""

from __future__ import annotations

from . import conv, conv_transpose, gemm, matmul
from .base import OpHandler
from .layer import Layer

HANDLERS: dict[str, OpHandler] = {h.op_type: h for h in (conv.HANDLER, conv_transpose.HANDLER, gemm.HANDLER, matmul.HANDLER)}
DECOMPOSABLE_OPS = tuple(HANDLERS)
# The op types onnxruntime runs the layers as (fused, or in its NCHWc layout), as its profiler names them.
LAYER_KERNELS = tuple(k for h in HANDLERS.values() for k in h.runtime_kernels)

_ONLY = "only " + ", ".join(DECOMPOSABLE_OPS[:-1]) + f" and {DECOMPOSABLE_OPS[-1]} are"
REPORTED_OPS = {
    "QLinearConv": "quantized conv (QLinearConv): quantized layers are left alone",
    "ConvInteger": "quantized conv (ConvInteger): quantized layers are left alone",
    "QLinearMatMul": "quantized MatMul (QLinearMatMul): quantized layers are left alone",
    "MatMulInteger": "quantized MatMul (MatMulInteger): quantized layers are left alone",
    "FusedConv": "onnxruntime fused op (FusedConv): export the model without onnxruntime optimisations",
    "FusedGemm": "onnxruntime fused op (FusedGemm): export the model without onnxruntime optimisations",
    "FusedMatMul": "onnxruntime fused op (FusedMatMul): export the model without onnxruntime optimisations",
    "Einsum": f"Einsum is not decomposed ({_ONLY})",
}


# The layer ops that are already integer (quantized) kernels: an input holding one is quantized already.
QUANTIZED_LAYER_OPS = frozenset(op for op, reason in REPORTED_OPS.items() if reason.startswith("quantized"))


def is_quantized_layer(op_type: str) -> bool:
    """`op_type` is an integer layer kernel (QLinearConv, ConvInteger, QLinearMatMul, MatMulInteger)."""
    return op_type in QUANTIZED_LAYER_OPS


def find_handler(op_type: str) -> OpHandler | None:
    """The handler of `op_type`, None when onnx-tucker does not decompose that operator."""
    return HANDLERS.get(op_type)


def reported_reason(op_type: str) -> str | None:
    """Why a layer op that is never decomposed (quantized, fused, Einsum) is kept; None for other ops."""
    return REPORTED_OPS.get(op_type)


def is_layer_kernel(op_name: str) -> bool:
    """`op_name` (from onnxruntime's profile) is a kernel that runs a layer."""
    return op_name in LAYER_KERNELS


def handler_for(layer_or_op: Layer | str) -> OpHandler:
    op = layer_or_op if isinstance(layer_or_op, str) else layer_or_op.op_type
    try:
        return HANDLERS[op]
    except KeyError:
        raise ValueError(f"no handler for op {op!r}") from None


def layer_cost(layer: Layer, kind: str, ranks: tuple[int, ...] = ()) -> tuple[int, int | None]:
    """(parameters, MACs) of `layer` decomposed as `kind` ("original", "tucker2", "tucker1", "svd")."""
    return handler_for(layer).cost(layer, kind, ranks)


def svd_matrix(layer: Layer, weight):  # type: ignore[no-untyped-def]
    """The matrix an SVD of this layer factorises (a view in the weight's dtype where possible)."""
    h = handler_for(layer)
    (block,) = h.blocks(layer, weight)
    (matrix,) = h.matrices(block, "svd")
    return matrix
