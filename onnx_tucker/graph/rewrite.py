"""Splice decomposed layers into the graph with onnx-ir.

Each replaced node becomes a short chain inserted at the node's own position
(`Graph.insert_before`), so the graph stays topologically sorted and every other node, initializer,
value_info, name, doc string and metadata is carried over unchanged. The chain's last node takes
over the original output (`replace_all_uses_with(..., replace_graph_outputs=True)`, then the value
gets the original name back), so every consumer (residual branches too) stays attached; the old
node goes with `Graph.remove(..., safe=True)`. Factor arrays become initializers
(`register_initializer`) that wrap the numpy arrays without a copy, which is what lets a model over
2 GB be written straight from them (`save`). The original model is never mutated.

What onnx-ir does not do stays here: fresh names that never collide with any name of the graph,
and what may be dropped (only the subgraphs that computed a replaced weight, found by the constant
folder, once nothing reads them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper

from ..errors import RewriteError
from ..ops.base import LABELS
from ..ops.layer import COPY, Layer, LayerFactors, NodeSpec
from ..ops.registry import handler_for
from .irmodel import IRModel
from .load import checker_message
from .model import ModelIndex
from .protos import opset_version, outer_scope_reads

if TYPE_CHECKING:  # imported where used (see irmodel)
    import onnx_ir as ir


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


def apply_replacements(model: onnx.ModelProto, replacements: Mapping[int, Replacement]) -> onnx.ModelProto:
    """A new model with node i replaced by the chain built from replacements[i] (protobuf), checked."""
    out = rewrite(model, replacements).to_proto()
    check_rewrite(model, out)
    return out


def rewrite(
    model: onnx.ModelProto, replacements: Mapping[int, Replacement], base_dir: str | None = None,
    index: ModelIndex | None = None,
) -> IRModel:
    """The rewritten model as onnx-ir (`IRModel`); node i is replaced by the chain of replacements[i].

    `base_dir`: the folder external data (lazily loaded weights) is relative to. `check_rewrite` runs
    onnx.checker on the result's protobuf (or its `skeleton()` when over 2 GB). `index`: `model`'s graph
    index when the caller has it (`graph.source.SourceModel.index`), else built here.
    """
    import onnx_ir as ir

    index = index if index is not None else ModelIndex(model)
    names = _Names(model)
    opset = opset_version(model)
    irm = IRModel(model, base_dir)
    graph = irm.graph
    nodes = list(graph)  # same order as model.graph.node
    values: dict[str, ir.Value] = {v.name: v for v in graph.inputs if v.name}
    values.update(graph.initializers)
    for n in nodes:
        values.update((v.name, v) for v in n.outputs if v.name)

    shared: dict[tuple[object, ...], list[str]] = {}
    for i, rep in sorted(replacements.items()):
        node = nodes[i]
        proto_node = model.graph.node[i]
        dtype = _weight_dtype(index, rep.layer)
        # Nodes sharing one weight share one set of factors (same arrays: identical decomposition).
        # Gemm transB / alpha change the factorised matrix, so they are part of the key.
        handler = handler_for(rep.layer)
        key = (rep.layer.weight_name or "", rep.factors.kind, tuple(a.shape for a in rep.factors.arrays),
               handler.factorisation_key(rep.layer))
        if key not in shared:
            base = proto_node.name or proto_node.output[0]
            labels = LABELS[rep.factors.kind][: len(rep.factors.arrays)]
            init_names = []
            for label, arr in zip(labels, handler.stored(rep.layer, rep.factors), strict=True):
                name = names.fresh(f"{base}/{label}/W")
                values[name] = _initializer(graph, name, arr, dtype)
                init_names.append(name)
            shared[key] = init_names
        built = handler.chain(rep.layer, rep.factors, shared[key], names.fresh, opset)
        for name, arr in built.constants:
            values[name] = _initializer(graph, name, arr, dtype)
        taken = {v.name: v for v in node.outputs if v.name}
        chain: list[ir.Node] = []
        renamed: list[tuple[ir.Value, ir.Value, str]] = []  # (new value, old value, name to give it)
        for spec in built.nodes:
            outputs = []
            for out in spec.outputs:
                if out in taken:  # the replaced node's output: a stand-in name until the old node is gone
                    v = ir.Value(name=names.fresh(f"{out}/tucker"))
                    renamed.append((v, taken[out], out))
                else:
                    v = ir.Value(name=out)
                    values[out] = v
                outputs.append(v)
            chain.append(ir.Node("", spec.op_type, [values[x] if x else None for x in spec.inputs],
                                 _attributes(spec, node), outputs=outputs, name=spec.name))
        graph.insert_before(node, chain)
        for new, old, _ in renamed:
            old.replace_all_uses_with(new, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        for new, old, name in renamed:
            names.used.discard(new.name)
            new.name = name
            new.type, new.shape = old.type, old.shape
            values[name] = new

    # Drop what computed the replaced weights (initializers, Constant / folded nodes) once nobody
    # reads it any more; everything else stays as it was.
    replaced_weights = {r.layer.weight_name for r in replacements.values() if r.layer.weight_name}
    _drop_dead_weight_producers(irm, model, nodes, replaced_weights, index)
    return irm


def check_rewrite(original: onnx.ModelProto, out: onnx.ModelProto) -> None:
    """onnx.checker on the rewritten model; only a problem the rewrite introduced is an error."""
    problem = checker_message(out)
    # An input onnxruntime accepts may already fail the checker: only what we introduced is an error.
    if problem is not None and checker_message(original) is None:
        raise RewriteError(f"the rewritten model fails onnx.checker ({problem}); please report this")


def _initializer(graph: ir.Graph, name: str, arr: np.ndarray, dtype: np.dtype) -> ir.Value:
    """A new initializer wrapping `arr` in the weight's dtype (no copy when it already is)."""
    import onnx_ir as ir

    data = np.ascontiguousarray(np.asarray(arr).astype(dtype, copy=False))
    tensor = ir.Tensor(data, name=name)
    v = ir.Value(name=name, shape=ir.Shape(data.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(v)
    return v


def _drop_dead_weight_producers(
    irm: IRModel, model: onnx.ModelProto, nodes: list[ir.Node], replaced_weights: set[str], index: ModelIndex
) -> None:
    """Remove the nodes and initializers of the replaced weights' constant subgraphs nobody reads.

    Only nodes and initializers inside the subgraphs computing `replaced_weights` are candidates: a
    weight subgraph also feeding other consumers stays, the rest of the graph is never touched.
    """
    graph = irm.graph
    cand_nodes: set[int] = set()
    cand_inits: set[str] = set()
    for w in replaced_weights:
        o = index.folder.origin(w)
        if o.constant:
            cand_nodes.update(o.nodes)
            cand_inits.update(o.initializers)
    outputs = {v.name for v in graph.outputs}
    pinned = outputs | outer_scope_reads(model.graph)

    def unread(v: ir.Value) -> bool:
        return not v.uses() and v.name not in pinned

    alive = {i for i in cand_nodes if nodes[i].graph is graph}
    while True:
        dead = [i for i in sorted(alive) if all(unread(v) for v in nodes[i].outputs)]
        if not dead:
            break
        graph.remove([nodes[i] for i in dead], safe=True)
        alive.difference_update(dead)
    for name in sorted(cand_inits):
        v = graph.initializers.get(name)
        if v is not None and unread(v):
            graph.initializers.pop(name)
            if v in graph.inputs:  # IR 3 lists initializers as inputs too
                graph.inputs.remove(v)


def _weight_dtype(index: ModelIndex, layer: Layer) -> np.dtype:
    code = index.constant_dtype(layer.weight_name or "")
    return np.dtype(helper.tensor_dtype_to_np_dtype(code or onnx.TensorProto.FLOAT))


def _attributes(spec: NodeSpec, original: ir.Node) -> list[ir.Attr]:
    """A chain node's attributes in order; `COPY` ones come from the replaced node unchanged."""
    import onnx_ir as ir

    out: list[ir.Attr] = []
    for name, value in spec.attrs:
        if value is COPY:
            if name in original.attributes:
                out.append(original.attributes[name])
        else:  # typed exactly as onnx.helper types it (ints stay INT, float lists FLOATS, ...)
            out.append(ir.serde.deserialize_attribute(helper.make_attribute(name, value)))
    return out
