"""Splice decomposed layers into the graph (protobuf; with `io` and `graph` the only such modules).

Each replaced node becomes a short chain written at the node's own position, so the graph stays
topologically sorted and every other node, initializer, value_info, name, doc string and metadata
is carried over unchanged. The chain's last node writes the original output tensor, so every
consumer (residual branches too) stays attached. The original model is never mutated.

We splice protobuf directly rather than round-tripping through onnx-graphsurgeon: gs re-creates
every tensor on export (a second copy of a multi-GB model), and its cleanup()/toposort() would
remove or reorder nodes we did not touch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import RewriteError
from ..ops.base import LABELS
from ..ops.layer import COPY, Layer, LayerFactors, NodeSpec
from ..ops.registry import handler_for
from .fold import dead_weight_producers, removed_tensor_names
from .load import checker_message
from .model import ModelIndex
from .protos import copy_fields, opset_version


@dataclass(frozen=True)
class Replacement:
    layer: Layer
    factors: LayerFactors


class _Names:
    """Fresh names derived from a base, never colliding with any name already in the graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.used: set[str] = {t.name for t in g.initializer} | {i.name for i in g.input} | {o.name for o in g.output}
        self.used |= {v.name for v in g.value_info}
        for n in g.node:
            self.used.add(n.name)
            self.used.update(n.input)
            self.used.update(n.output)

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            name, k = f"{base}_{k}", k + 1
        self.used.add(name)
        return name


def _spatial_attrs(node: onnx.NodeProto) -> list[onnx.AttributeProto]:
    return [a for a in node.attribute if a.name in ("strides", "pads", "dilations", "auto_pad", "kernel_shape")]


def apply_replacements(model: onnx.ModelProto, replacements: Mapping[int, Replacement]) -> onnx.ModelProto:
    """A new model with node i replaced by the chain built from replacements[i]."""
    index = ModelIndex(model)
    names = _Names(model)
    opset = opset_version(model)
    g = model.graph
    new_nodes: list[onnx.NodeProto] = []
    sources: list[int | None] = []  # where each new node comes from in g.node (None: new)
    new_inits: list[onnx.TensorProto] = []
    shared: dict[tuple[object, ...], list[str]] = {}
    for i, node in enumerate(g.node):
        rep = replacements.get(i)
        if rep is None:
            new_nodes.append(node)
            sources.append(i)
            continue
        dtype = _weight_dtype(index, rep.layer)
        # Nodes sharing one weight share one set of factors (same arrays: identical decomposition).
        # Gemm transB / alpha change the factorised matrix, so they are part of the key.
        handler = handler_for(rep.layer)
        key = (rep.layer.weight_name or "", rep.factors.kind, tuple(a.shape for a in rep.factors.arrays),
               handler.factorisation_key(rep.layer))
        if key not in shared:
            base = node.name or node.output[0]
            labels = LABELS[rep.factors.kind][: len(rep.factors.arrays)]
            init_names = []
            for label, arr in zip(labels, handler.stored(rep.layer, rep.factors), strict=True):
                t = numpy_helper.from_array(np.ascontiguousarray(arr.astype(dtype)), names.fresh(f"{base}/{label}/W"))
                new_inits.append(t)
                init_names.append(t.name)
            shared[key] = init_names
        built = handler.chain(rep.layer, rep.factors, shared[key], names.fresh, opset)
        new_inits.extend(numpy_helper.from_array(np.ascontiguousarray(v.astype(dtype)), n) for n, v in built.constants)
        chain = [_node(spec, node) for spec in built.nodes]
        new_nodes.extend(chain)
        sources.extend([None] * len(chain))
    # Drop what computed the replaced weights (initializers, Constant / folded nodes) once nobody
    # reads it any more; everything else stays byte for byte.
    replaced_weights = {r.layer.weight_name for r in replacements.values() if r.layer.weight_name}
    dead_nodes, dropped = dead_weight_producers(model, new_nodes, sources, replaced_weights, index.folder)
    gone = dropped | removed_tensor_names(model, dead_nodes)
    new_nodes = [n for n, src in zip(new_nodes, sources, strict=True) if src is None or src not in dead_nodes]

    out = onnx.ModelProto()
    copy_fields(model, out, {"graph"})
    copy_fields(g, out.graph, {"node", "initializer", "input", "value_info"})
    out.graph.node.extend(new_nodes)
    out.graph.value_info.extend(v for v in g.value_info if v.name not in gone)
    out.graph.initializer.extend(t for t in g.initializer if t.name not in dropped)
    out.graph.initializer.extend(new_inits)
    out.graph.input.extend(i for i in g.input if i.name not in dropped)
    if model.ir_version < 4:  # IR 3 requires every initializer to be listed as a graph input too
        out.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in new_inits)
    problem = checker_message(out)
    # An input onnxruntime accepts may already fail the checker: only what we introduced is an error.
    if problem is not None and checker_message(model) is None:
        raise RewriteError(f"the rewritten model fails onnx.checker ({problem}); please report this")
    return out


def _weight_dtype(index: ModelIndex, layer: Layer) -> np.dtype:
    code = index.constant_dtype(layer.weight_name or "")
    return np.dtype(helper.tensor_dtype_to_np_dtype(code or onnx.TensorProto.FLOAT))


def _node(spec: NodeSpec, original: onnx.NodeProto) -> onnx.NodeProto:
    """The protobuf of one chain node; `COPY` attributes come from the replaced node unchanged."""
    node = helper.make_node(spec.op_type, list(spec.inputs), list(spec.outputs), name=spec.name)
    kept = {a.name: a for a in original.attribute}
    for name, value in spec.attrs:
        if value is COPY:
            if name in kept:
                node.attribute.append(kept[name])
        else:
            node.attribute.append(helper.make_attribute(name, value))
    return node
