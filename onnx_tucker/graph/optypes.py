"""The operators the graph layer recognises by structure, not as layers: the one module outside `ops/`
that compares op types (the rule is tests/test_boundaries.py's).

Folding, normalisation for torch and the probes of a rewritten model need to know a `Constant`
node, a pass-through (`Identity`, `Dropout`), a `Reshape`, a residual `Add`, the random and the
quantize ops, the pools whose padding is not zeros (`MaxPool`, `AveragePool`), Softmax (its opset-13
change) and the shape-computing ops. Layer operators
(Conv, ConvTranspose, Gemm, MatMul, the quantized and fused ones) are never named here: which nodes
are layers, and what they mean, is asked of `ops.registry`.
"""

from __future__ import annotations

from typing import Protocol

# Ops whose output is not a function of their inputs: never folded.
RANDOM_OPS = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli", "Dropout"}
)
# Quantized weights stay quantized: decomposing a dequantized copy would silently de-quantize the model.
QUANTIZED_OPS = frozenset({"DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear"})
# Pools whose padding is not a zero (torch-readiness: `auto_pad` made an explicit `Pad` node).
PADDED_POOLS = frozenset({"MaxPool", "AveragePool"})
# The structural ops the graph layer may name (besides the sets above).
# Ops whose meaning changed at opset 13 in a way onnx2torch exports badly (torch-readiness converts the opset).
SOFTMAX_OPS = frozenset({"Softmax", "LogSoftmax"})
# Ops that compute a shape from a shape (torch-readiness folds a Reshape's computed shape).
SHAPE_OPS = frozenset({"Shape", "Cast", "Squeeze", "Unsqueeze", "Concat", "Slice", "Gather"})
# Ops fine-tuning does not train through (subgraph fine-tuning trains around them): NMS gives indices, no
# loss or gradient goes through it; RoiAlign has no kernel without a working torchvision.
UNTRAINABLE_OPS = frozenset({"NonMaxSuppression"})
TORCHVISION_OPS = frozenset({"RoiAlign", "NonMaxSuppression"})
# Ops whose outputs lie in [0, 1] and that onnxruntime computes to an absolute, not a relative, precision
# (its float32 Sigmoid: ~1.5e-7 absolute, 0 under -18): a round trip measures such outputs against 1.
RANGE_ONE_OPS = frozenset({"Sigmoid"})
# Recurrent ops: torch's exporter writes their default (zero) state as zeros of the traced batch, so
# fine-tuning exports a model holding them from a batch of 1; the zeros it reads come from `ConstantOfShape`.
RECURRENT_OPS = frozenset({"LSTM", "GRU", "RNN"})
FILL_OPS = frozenset({"ConstantOfShape"})
STRUCTURAL_OPS = (frozenset({"Constant", "Identity", "Dropout", "Reshape", "Add"}) | RANDOM_OPS | QUANTIZED_OPS | PADDED_POOLS
                  | SOFTMAX_OPS | SHAPE_OPS | UNTRAINABLE_OPS | TORCHVISION_OPS | RANGE_ONE_OPS | RECURRENT_OPS | FILL_OPS)


class _Node(Protocol):
    @property
    def op_type(self) -> str: ...


def is_op(node: _Node, *op_types: str) -> bool:
    """`node` is one of `op_types`, names from `STRUCTURAL_OPS` (tests/test_boundaries.py checks every
    call); the domain is the caller's to check."""
    return node.op_type in op_types


def is_random(node: _Node) -> bool:
    return node.op_type in RANDOM_OPS


def is_quantize(node: _Node) -> bool:
    return node.op_type in QUANTIZED_OPS
