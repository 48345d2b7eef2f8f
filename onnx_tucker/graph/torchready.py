"""Normalising an ONNX graph before onnx2torch converts it (fine-tuning), and comparing structures.

Protobuf only: no torch here. What onnx2torch cannot take is rewritten into what it can, with the
same outputs at inference:
- `Dropout` (any opset) and `Identity` nodes are removed (consumers read the node's input); one
  that writes a graph output becomes / stays an `Identity`;
- a `Reshape` whose constant shape hard-codes the batch size (the old exporters' `[1, 2048]`) gets
  `0` there ("copy the input's dim 0"), and fixed batch dims of graph inputs / outputs become the
  symbol `batch`, so the model trains and exports with any batch;
- the opset is converted (onnx.version_converter) to one where onnx2torch has a converter for every
  node, when the model's own opset has none for some node.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..ops.registry import find_handler
from .optypes import is_op

# Opsets tried, in order, when some node has no onnx2torch converter at the model's own opset.
CANDIDATE_OPSETS = (13, 17, 11, 16, 14, 15, 12)

Supported = Callable[[str, str, int], bool]  # (domain, op_type, since_version) -> has a converter


@dataclass(frozen=True)
class Normalized:
    model: onnx.ModelProto
    opset: int  # the default-domain opset of `model`
    source_opset: int
    changes: tuple[str, ...]  # what was rewritten, in words (for -v and the report)


def default_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 1


def graph_io(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """(input names without initializers, output names)."""
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits], [o.name for o in model.graph.output]


def io_shapes(model: onnx.ModelProto) -> dict[str, list[int | str | None]]:
    """Declared shape of every graph input and output: int, symbol or None per dim."""
    out: dict[str, list[int | str | None]] = {}
    for v in [*model.graph.input, *model.graph.output]:
        dims: list[int | str | None] = []
        for d in v.type.tensor_type.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
        out[v.name] = dims
    return out


def io_dtypes(model: onnx.ModelProto) -> dict[str, np.dtype]:
    return {
        v.name: np.dtype(helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type))
        for v in [*model.graph.input, *model.graph.output]
        if v.type.tensor_type.elem_type
    }


def _since_version(node: onnx.NodeProto, opset: int) -> int | None:
    try:
        return int(onnx.defs.get_schema(node.op_type, opset, node.domain or "").since_version)
    except Exception:  # noqa: BLE001 - an op unknown to this onnx: no schema
        return None


def unsupported_ops(model: onnx.ModelProto, supported: Supported) -> list[str]:
    """'Op-version' labels (sorted, unique) of the nodes that have no converter at the model's opset."""
    opset = default_opset(model)
    bad = set()
    for node in _all_nodes(model.graph):
        v = _since_version(node, opset)
        if v is None or not supported(node.domain or "", node.op_type, v):
            dom = f"{node.domain}." if node.domain not in ("", "ai.onnx") else ""
            bad.add(f"{dom}{node.op_type}" + (f"-{v}" if v is not None else ""))
    return sorted(bad)


def _all_nodes(graph: onnx.GraphProto):  # type: ignore[no-untyped-def]
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(a.g)
            for g in a.graphs:
                yield from _all_nodes(g)


def _drop_passthrough(model: onnx.ModelProto, changes: list[str]) -> None:
    g = model.graph
    outputs = {o.name for o in g.output}
    rename: dict[str, str] = {}
    keep = []
    dropped = {"Dropout": 0, "Identity": 0}
    for n in g.node:
        for k, name in enumerate(n.input):
            if name in rename:
                n.input[k] = rename[name]
        if is_op(n, "Dropout", "Identity") and n.domain in ("", "ai.onnx") and n.input and n.input[0]:
            dropout = is_op(n, "Dropout")
            mask_used = dropout and len(n.output) > 1 and n.output[1]
            if mask_used:
                keep.append(n)  # its mask is read: leave it (reported as unsupported if it is)
                continue
            if n.output[0] in outputs:
                if dropout:
                    idn = helper.make_node("Identity", [n.input[0]], [n.output[0]], name=n.name)
                    keep.append(idn)
                    dropped["Dropout"] += 1
                else:
                    keep.append(n)
                continue
            rename[n.output[0]] = n.input[0]
            if dropout:
                dropped["Dropout"] += 1
            else:
                dropped["Identity"] += 1
            continue
        keep.append(n)
    if rename or dropped["Dropout"]:
        del g.node[:]
        g.node.extend(keep)
        # Nothing reads the removed tensors any more; their stale value_info entries go too.
        gone = set(rename)
        kept_vi = [v for v in g.value_info if v.name not in gone]
        del g.value_info[:]
        g.value_info.extend(kept_vi)
        for op, k in dropped.items():
            if k:
                changes.append(f"removed {k} {op} node(s) (identity at inference)")


def _constant_value(g: onnx.GraphProto, name: str) -> np.ndarray | None:
    for t in g.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for n in g.node:
        if is_op(n, "Constant") and n.output and n.output[0] == name:
            for a in n.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
    return None


def _fix_batch(model: onnx.ModelProto, changes: list[str]) -> None:
    g = model.graph
    inits = {t.name for t in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    batch_dims = set()
    for v in inputs:
        dims = v.type.tensor_type.shape.dim
        if len(dims) >= 2 and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            batch_dims.add(int(dims[0].dim_value))
    # A Reshape to [B, ...] with B the fixed batch (or 1 when the declared batch is symbolic).
    hard = batch_dims or {1}
    fixed = 0
    existing = {t.name for t in g.initializer} | {o for n in g.node for o in n.output}
    for n in g.node:
        if not is_op(n, "Reshape") or len(n.input) < 2:
            continue
        if any(a.name == "allowzero" and a.i for a in n.attribute):
            continue
        shape = _constant_value(g, n.input[1])
        if shape is None or shape.ndim != 1 or shape.size < 2 or int(shape[0]) not in hard:
            continue
        new = shape.astype(np.int64).copy()
        new[0] = 0  # copy the input's dim 0: the batch
        name, k = f"{n.input[1]}_dynamic_batch", 1
        while name in existing:
            name, k = f"{n.input[1]}_dynamic_batch_{k}", k + 1
        existing.add(name)
        g.initializer.append(numpy_helper.from_array(new, name))
        n.input[1] = name
        fixed += 1
    if fixed:
        changes.append(f"made the hard-coded batch size of {fixed} Reshape node(s) dynamic")
    if batch_dims or fixed:
        for v in [*inputs, *g.output]:
            dims = v.type.tensor_type.shape.dim
            if len(dims) >= 1 and dims[0].HasField("dim_value"):
                dims[0].dim_param = "batch"
        del g.value_info[:]  # shapes inferred for batch B would now be wrong
        changes.append("declared the batch dim of the graph inputs and outputs as dynamic")


def normalize(model: onnx.ModelProto, supported: Supported) -> tuple[Normalized, list[str]]:
    """A copy of `model` ready for onnx2torch, and the ops onnx2torch still cannot take (empty: fine)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    changes: list[str] = []
    source = default_opset(m)
    _drop_passthrough(m, changes)
    _fix_batch(m, changes)
    bad = unsupported_ops(m, supported)
    if bad:
        for target in CANDIDATE_OPSETS:
            if target == source:
                continue
            try:
                conv = onnx.version_converter.convert_version(m, target)
            except Exception:  # noqa: BLE001 - the converter raises many kinds; try the next opset
                continue
            if not unsupported_ops(conv, supported):
                conv.ir_version = max(conv.ir_version, m.ir_version)
                m, bad = conv, []
                changes.append(f"converted opset {source} -> {target}")
                break
    return Normalized(m, default_opset(m), source, tuple(changes)), bad


def weight_structure(model: onnx.ModelProto) -> list[tuple[str, tuple[int, ...]]]:
    """(op type, weight shape) of every Conv / ConvTranspose / Gemm / MatMul with a constant weight,
    in graph order: what fine-tuning must keep (Tucker chains stay three convs, nothing fused)."""
    g = model.graph
    consts = {t.name: tuple(t.dims) for t in g.initializer}
    for n in g.node:
        if is_op(n, "Constant") and n.output:
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = tuple(a.t.dims)
    out = []
    for n in g.node:
        handler = find_handler(n.op_type)
        if handler is not None and len(n.input) > 1:
            w = consts.get(n.input[1])
            if w is None and handler.weight_either_side:
                w = consts.get(n.input[0])
            if w is None:
                continue
            # Gemm's transB and torch's Linear may store the matrix either way round.
            out.append(handler.export_signature(w))
    return out
