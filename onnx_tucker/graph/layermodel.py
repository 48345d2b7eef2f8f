"""Tiny models for timing one layer in isolation: the original node alone, or its replacement chain.

Built from the `Layer` (op, attributes, real input shape) and the handler's `NodeSpec` chain, with
seeded random weights of the right shapes (`OpHandler.factor_shapes`): timing depends on shapes, not
on values, so no weight is read and no decomposition is run. The bias is left out of both models (the
same add in both; the chain carries it on its last node). Only this layer builds protobuf.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..ops.layer import COPY, Layer, LayerFactors
from ..ops.registry import handler_for

# Old opsets lack optional Gemm C (opset < 11); the timed ops mean the same from 11 on.
MIN_TIMING_OPSET = 11
_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64}
INPUT_NAME, OUTPUT_NAME = "x", "y"


def timing_input_shape(layer: Layer) -> tuple[int, ...] | None:
    """The layer's input shape with an unknown batch as 1; None when another dim is unknown."""
    shape = layer.input_shape
    if not shape:
        return None
    dims = [1 if (i == 0 and d is None) else d for i, d in enumerate(shape)]
    if any(d is None for d in dims):
        return None
    return tuple(int(d) for d in dims if d is not None)


def timing_dtype(layer: Layer) -> np.dtype | None:
    """The dtype the layer runs in; None when onnxruntime CPU cannot run it (bfloat16)."""
    t = _DTYPES.get(layer.weight_dtype or "float32")
    return None if t is None else np.dtype(t)


def _standalone(layer: Layer) -> Layer:
    """The layer renamed for a one-node model: input x, weight W, output y, no bias."""
    return replace(layer, inputs=(INPUT_NAME, "W"), outputs=(OUTPUT_NAME,), node_name="layer", bias_name=None)


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], dtype: np.dtype, x_shape: tuple[int, ...],
           opset: int) -> onnx.ModelProto:
    code = helper.np_dtype_to_tensor_dtype(dtype)
    graph = helper.make_graph(
        nodes, "layer", [helper.make_tensor_value_info(INPUT_NAME, code, list(x_shape))],
        [helper.make_tensor_value_info(OUTPUT_NAME, code, None)], initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", max(opset, MIN_TIMING_OPSET))],
                              producer_name="onnx-tucker-layertime")
    model.ir_version = 8
    return model


def original_layer_model(layer: Layer, opset: int, seed: int = 0) -> onnx.ModelProto:
    """The layer's node alone at its real input shape, with a seeded random weight."""
    x_shape, dtype = timing_input_shape(layer), timing_dtype(layer)
    assert x_shape is not None and dtype is not None and layer.weight_shape is not None
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(layer.weight_shape, dtype=np.float32).astype(dtype) * 0.05
    attrs: dict[str, Any] = {k: v for k, v in layer.attrs.items() if v != []}  # an empty list has no attribute type
    node = helper.make_node(layer.op_type, [INPUT_NAME, "W"], [OUTPUT_NAME], name="layer", **attrs)
    return _model([node], [numpy_helper.from_array(w, "W")], dtype, x_shape, opset)


def chain_layer_model(layer: Layer, kind: str, ranks: tuple[int, ...], opset: int, seed: int = 0) -> onnx.ModelProto:
    """The layer's replacement chain (`kind` at `ranks`) at its real input shape, with seeded random
    factors of the shapes the decomposition would produce."""
    x_shape, dtype = timing_input_shape(layer), timing_dtype(layer)
    assert x_shape is not None and dtype is not None
    handler = handler_for(layer)
    alone = _standalone(layer)
    rng = np.random.default_rng(seed)
    arrays = tuple(rng.standard_normal(s, dtype=np.float32).astype(dtype) * 0.1 for s in handler.factor_shapes(layer, kind, ranks))
    factors = LayerFactors(kind, arrays, 0.0)
    names = [f"F{j}" for j in range(len(arrays))]
    used = {INPUT_NAME, OUTPUT_NAME, "W", *names}

    def fresh(base: str) -> str:
        name, k = base, 1
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        return name

    chain = handler.chain(alone, factors, names, fresh, max(opset, MIN_TIMING_OPSET))
    inits = [numpy_helper.from_array(np.ascontiguousarray(a), n) for n, a in zip(names, handler.stored(alone, factors), strict=True)]
    inits += [numpy_helper.from_array(np.asarray(a, dtype=dtype), n) for n, a in chain.constants]
    nodes = []
    for spec in chain.nodes:
        attrs: dict[str, Any] = {}
        for name, value in spec.attrs:
            if value is COPY:
                if name in layer.attrs and layer.attrs[name] != []:
                    attrs[name] = layer.attrs[name]
            else:
                attrs[name] = value
        nodes.append(helper.make_node(spec.op_type, list(spec.inputs), list(spec.outputs), name=spec.name, **attrs))
    return _model(nodes, inits, dtype, x_shape, opset)


def identity_model(x_shape: tuple[int, ...], dtype: np.dtype, opset: int) -> onnx.ModelProto:
    """x -> Identity -> y: what one `run` costs without any layer (feeding, fetching, dispatch)."""
    node = helper.make_node("Identity", [INPUT_NAME], [OUTPUT_NAME], name="identity")
    return _model([node], [], dtype, x_shape, opset)
