"""MatMul with a constant 2-D right operand (X @ W, batched X): truncated SVD into two MatMuls.

The constant on the left (W @ X) and 3-D constant weights are kept, with the reason.
"""

from __future__ import annotations

from .base import LABELS, Fresh, OpHandler, prod
from .layer import Chain, Im2col, Layer, LayerFactors, NodeSpec


class MatMulHandler(OpHandler):
    op_type = "MatMul"
    runtime_kernels = ("MatMul", "FusedMatMul")

    def operands_reason(self, input_is_constant: bool, weight_is_constant: bool) -> str | None:
        if input_is_constant and not weight_is_constant:
            return "the constant is the left operand (W @ X); only X @ W is decomposed"
        return None

    def skip_reason(self, layer: Layer, bias_reason: str | None) -> str | None:
        n = len(layer.weight_shape or ())
        if n != 2:
            return f"MatMul weight has rank {n}; only 2-D constant weights are decomposed"
        if layer.input_shape is not None and len(layer.input_shape) < 1:
            return "MatMul input is a scalar"
        return None

    def input_mismatch(self, layer: Layer) -> tuple[str, int, int] | None:
        w, x = layer.weight_shape, layer.input_shape
        if w is None or len(w) != 2 or not x or x[-1] is None or x[-1] == w[0]:
            return None
        return "K", x[-1], w[0]

    def weight_on_left(self, layer: Layer) -> bool:
        """A @ X (the graph layer keeps those today; the data error model and the costs already read
        them: y^T = X^T A^T, a K x M matrix applied to every column of X)."""
        return len(layer.inputs) == 2 and layer.weight_name is not None and layer.weight_name == layer.inputs[0]

    def dims(self, layer: Layer) -> tuple[int, int]:
        assert layer.weight_shape is not None
        if self.weight_on_left(layer):
            return layer.weight_shape[1], layer.weight_shape[0]
        return super().dims(layer)

    def cost(self, layer: Layer, kind: str, ranks: tuple[int, ...] = ()) -> tuple[int, int | None]:
        params, macs = super().cost(layer, kind, ranks)
        shape = layer.output_shape
        if not self.weight_on_left(layer) or macs is None or shape is None or len(shape) < 2:
            return params, macs
        lead: tuple[int | None, ...] = tuple(shape[:-2])
        if lead and not lead[0]:  # an unknown batch counts as 1, as in `batch_rows`
            lead = (1, *lead[1:])
        cols = prod((*lead, shape[-1]))  # batch x N columns
        return params, None if cols is None else params * cols

    def im2col(self, layer: Layer) -> Im2col | None:
        # Only X @ W reads its input as rows; a constant left operand is kept.
        if len(layer.inputs) != 2 or layer.weight_name != layer.inputs[1]:
            return None
        return super().im2col(layer)

    def factorisation_key(self, layer: Layer) -> tuple[object, ...]:
        return (0, 1.0)  # as a Gemm with transB=0, alpha=1: such layers may share one factorisation

    def chain(self, layer: Layer, factors: LayerFactors, weights: list[str], fresh: Fresh, opset: int) -> Chain:
        base = layer.node_name or layer.outputs[0]
        first, last = LABELS["svd"]
        mid = fresh(f"{base}/{first}/out")
        n1 = NodeSpec("MatMul", (layer.inputs[0], weights[0]), (mid,), fresh(f"{base}/{first}"))
        n2 = NodeSpec("MatMul", (mid, weights[1]), (layer.outputs[0],), fresh(f"{base}/{last}"))
        return Chain((n1, n2))


HANDLER = MatMulHandler()
