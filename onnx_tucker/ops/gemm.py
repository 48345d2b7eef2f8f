"""Gemm (fully connected layers): truncated SVD into two Gemms.

y = alpha * A' B' + beta * C with a constant 2-D B. The factorised matrix is W_eff = alpha * B'
(K x N, y = x @ W_eff): x @ W_eff ~ (x @ P) @ Q. The first Gemm keeps transA (and transB, with its
factor stored transposed as PyTorch's Linear stores it); the second carries C and beta. C is
optional only from Gemm-11 on: older opsets get a zero C on the first Gemm.
"""

from __future__ import annotations

import numpy as np

from .base import LABELS, Fresh, OpHandler
from .layer import Chain, Im2col, Layer, LayerFactors, NodeSpec


class GemmHandler(OpHandler):
    op_type = "Gemm"
    runtime_kernels = ("Gemm", "FusedGemm")

    def _int(self, layer: Layer, name: str) -> int:
        return int(layer.attrs.get(name, 0))  # type: ignore[call-overload]

    def skip_reason(self, layer: Layer, bias_reason: str | None) -> str | None:
        # A run-time C is fine: the second Gemm adds it unchanged.
        n = len(layer.weight_shape or ())
        return None if n == 2 else f"Gemm weight has rank {n}; expected 2"

    def dims(self, layer: Layer) -> tuple[int, int]:
        """(K, N) of the weight as used: y = x @ W_eff with W_eff K x N."""
        assert layer.weight_shape is not None
        a, b = layer.weight_shape[0], layer.weight_shape[1]
        return (b, a) if self._int(layer, "transB") else (a, b)

    def input_mismatch(self, layer: Layer) -> tuple[str, int, int] | None:
        x = layer.input_shape
        if x is None or len(x) != 2 or len(layer.weight_shape or ()) != 2:
            return None
        k = x[0] if self._int(layer, "transA") else x[1]
        want = self.dims(layer)[0]
        return ("K", k, want) if k is not None and k != want else None

    def blocks(self, layer: Layer, weight: np.ndarray) -> list[np.ndarray]:
        # A view in the weight's own dtype where possible: a float64 copy of a 4096 x 25088 FC weight
        # alone would be 822 MB (the spectral code reads float32 in float64 blocks).
        w = weight.T if self._int(layer, "transB") else weight
        alpha = float(layer.attrs.get("alpha", 1.0))  # type: ignore[arg-type]
        if alpha != 1.0:
            w = w.astype(np.float64) * alpha
        return [w]

    def im2col(self, layer: Layer) -> Im2col | None:
        found = super().im2col(layer)
        return None if found is None else Im2col(found.width, found.outputs, trans_a=bool(self._int(layer, "transA")))

    def refit_problem(self, layer: Layer, factors: LayerFactors, bias: np.ndarray | None) -> str | None:
        # A C that broadcasts (a scalar, or one per row) is not one bias per output: left as it is.
        if bias is not None and bias.size != factors.arrays[1].shape[1]:
            return f"Gemm C of shape {bias.shape}"
        return super().refit_problem(layer, factors, bias)

    def factorisation_key(self, layer: Layer) -> tuple[object, ...]:
        return (self._int(layer, "transB"), float(layer.attrs.get("alpha", 1.0)))  # type: ignore[arg-type]

    def factorisation_note(self, layer: Layer) -> str:
        return f" as Gemm transB={self._int(layer, 'transB')} alpha={float(layer.attrs.get('alpha', 1.0)):g}"  # type: ignore[arg-type]

    def stored(self, layer: Layer, factors: LayerFactors) -> tuple[np.ndarray, ...]:
        if self._int(layer, "transB"):
            return tuple(a.T for a in factors.arrays)
        return factors.arrays

    def chain(self, layer: Layer, factors: LayerFactors, weights: list[str], fresh: Fresh, opset: int) -> Chain:
        base = layer.node_name or layer.outputs[0]
        first, last = LABELS["svd"]
        mid = fresh(f"{base}/{first}/out")
        trans_b = self._int(layer, "transB")
        constants = []
        first_inputs = [layer.inputs[0], weights[0]]
        if opset < 11:  # C is optional only from Gemm-11 on
            zero = fresh(f"{base}/{first}/C")
            constants.append((zero, np.zeros((factors.arrays[0].shape[1],))))
            first_inputs.append(zero)
        n1 = NodeSpec("Gemm", tuple(first_inputs), (mid,), fresh(f"{base}/{first}"),
                      (("transA", self._int(layer, "transA")), ("transB", trans_b)))
        bias = (layer.bias_name,) if layer.bias_name else ()
        attrs: tuple[tuple[str, object], ...] = (("transB", trans_b),)
        if bias:
            attrs += (("beta", float(layer.attrs.get("beta", 1.0))),)  # type: ignore[arg-type]
        n2 = NodeSpec("Gemm", (mid, weights[1], *bias), (layer.outputs[0],), fresh(f"{base}/{last}"), attrs)
        return Chain((n1, n2), tuple(constants))


HANDLER = GemmHandler()
