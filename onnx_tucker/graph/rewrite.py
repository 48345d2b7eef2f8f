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
from ..ops.layer import Layer, LayerFactors, factorised_as
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
        key = (rep.layer.weight_name or "", rep.factors.kind, tuple(a.shape for a in rep.factors.arrays),
               factorised_as(rep.layer))
        if key not in shared:
            base = node.name or node.output[0]
            labels = _labels(rep.factors.kind, len(rep.factors.arrays))
            init_names = []
            for label, arr in zip(labels, _stored_arrays(node, rep), strict=True):
                t = numpy_helper.from_array(np.ascontiguousarray(arr.astype(dtype)), names.fresh(f"{base}/{label}/W"))
                new_inits.append(t)
                init_names.append(t.name)
            shared[key] = init_names
        chain = _chain(node, rep, shared[key], names, opset, dtype, new_inits)
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


def _labels(kind: str, n: int) -> list[str]:
    return {"tucker2": ["tucker_first", "tucker_core", "tucker_last"], "tucker1": ["tucker_core", "tucker_last"]}.get(
        kind, ["svd_first", "svd_last"]
    )[:n]


def _chain(
    node: onnx.NodeProto,
    rep: Replacement,
    weights: list[str],
    names: _Names,
    opset: int,
    dtype: np.dtype,
    new_inits: list[onnx.TensorProto],
) -> list[onnx.NodeProto]:
    base = node.name or node.output[0]
    kind = rep.factors.kind
    labels = _labels(kind, len(weights))
    x = node.input[0]
    bias = [node.input[2]] if len(node.input) > 2 and node.input[2] else []
    mids = [names.fresh(f"{base}/{label}/out") for label in labels[:-1]]
    ins = [x, *mids]
    outs = [*mids, node.output[0]]
    nodes = []
    if node.op_type == "Conv":
        nd = len(rep.factors.arrays[0].shape) - 2
        ones = helper.make_attribute("kernel_shape", [1] * nd)
        spatial = _spatial_attrs(node)
        # A grouped conv's factors are block-diagonal: every node of the chain keeps its group.
        group = [a for a in node.attribute if a.name == "group" and a.i != 1]
        for j, label in enumerate(labels):
            arr = rep.factors.arrays[j]
            is_spatial_step = (kind in ("tucker2",) and label == "tucker_core") or (kind == "tucker1" and j == 0) or (
                kind == "svd" and j == 0
            )
            if is_spatial_step:
                attrs = [a for a in spatial if a.name != "kernel_shape"]
                attrs.append(helper.make_attribute("kernel_shape", list(arr.shape[2:])))
            else:
                attrs = [ones]
            n = helper.make_node(
                "Conv",
                [ins[j], weights[j], *(bias if j == len(labels) - 1 else [])],
                [outs[j]],
                name=names.fresh(f"{base}/{label}"),
            )
            n.attribute.extend(attrs + group)
            nodes.append(n)
        return nodes
    if node.op_type == "Gemm":
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        trans_b = int(a.get("transB", 0))
        w1, w2 = weights
        first_inputs = [x, w1]
        if opset < 11:  # C is optional only from Gemm-11 on
            zero = numpy_helper.from_array(
                np.zeros((rep.factors.arrays[0].shape[1],), dtype=dtype), names.fresh(f"{base}/svd_first/C")
            )
            new_inits.append(zero)
            first_inputs.append(zero.name)
        n1 = helper.make_node("Gemm", first_inputs, [mids[0]], name=names.fresh(f"{base}/svd_first"),
                              transA=int(a.get("transA", 0)), transB=trans_b)
        second_inputs = [mids[0], w2, *bias]
        n2 = helper.make_node("Gemm", second_inputs, [node.output[0]], name=names.fresh(f"{base}/svd_last"), transB=trans_b)
        if bias:
            n2.attribute.append(helper.make_attribute("beta", float(a.get("beta", 1.0))))
        return [n1, n2]
    if node.op_type == "MatMul":
        n1 = helper.make_node("MatMul", [x, weights[0]], [mids[0]], name=names.fresh(f"{base}/svd_first"))
        n2 = helper.make_node("MatMul", [mids[0], weights[1]], [node.output[0]], name=names.fresh(f"{base}/svd_last"))
        return [n1, n2]
    raise RewriteError(f"node '{base}': cannot rewrite op {node.op_type}")


def _stored_arrays(node: onnx.NodeProto, rep: Replacement) -> tuple[np.ndarray, ...]:
    """Factors as stored: a Gemm with transB=1 keeps its weights transposed (PyTorch's Linear layout)."""
    if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
        return tuple(a.T for a in rep.factors.arrays)
    return rep.factors.arrays
