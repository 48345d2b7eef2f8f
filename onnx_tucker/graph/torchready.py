"""Normalising an ONNX graph before onnx2torch converts it (fine-tuning), and comparing structures.

Protobuf only: no torch here. What onnx2torch cannot take is rewritten into what it can, with the
same outputs at inference:
- `Dropout` (any opset) and `Identity` nodes are removed (consumers read the node's input); one
  that writes a graph output becomes / stays an `Identity`;
- a `Reshape` whose constant shape hard-codes the batch size (the old exporters' `[1, 2048]`) gets
  `0` there ("copy the input's dim 0"), and fixed batch dims of graph inputs / outputs become the
  symbol `batch`, so the model trains and exports with any batch;
- weights held in `Constant` nodes (every Paddle2ONNX export) are lifted into initializers, so
  onnx2torch makes them parameters (trainable; the export writes them back as initializers);
- `auto_pad` SAME_UPPER / SAME_LOWER / VALID becomes explicit `pads` from the input's inferred
  shape (the handler says how for a transposed conv); where the padding depends on a spatial size
  not known until run time (stride > 1), an explicit `Pad` node computes it from the input's shape
  (-inf for a MaxPool); what cannot be made exact is refused naming the node;
- the opset is converted (onnx.version_converter) to one where onnx2torch has a converter for every
  node, when the model's own opset has none for some node.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ModelLoadError
from ..ops.base import same_pads
from ..ops.registry import find_handler
from .optypes import is_op
from .protos import subgraphs

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
            known = d.HasField("dim_value") and d.dim_value > 0  # Paddle declares -1 for a dynamic dim
            dims.append(d.dim_value if known else (d.dim_param or None))
        out[v.name] = dims
    return out


def batch_axes(shapes: Mapping[str, Sequence[int | str | None]], inputs: Sequence[str],
               outputs: Sequence[str]) -> dict[str, int]:
    """Each output's batch axis by its declared shape: where the first input's batch symbol is, else (an
    unnamed dynamic batch) its only dynamic dim (a time-first sequence [T, N, C]: 1); 0 when neither
    tells, and for every output of a model whose batch is static."""
    first = shapes.get(inputs[0], []) if inputs else []
    symbol = first[0] if first and isinstance(first[0], str) else None
    out: dict[str, int] = {}
    if first and isinstance(first[0], int):
        return dict.fromkeys(outputs, 0)
    for name in outputs:
        dims = list(shapes.get(name, []))
        dynamic = [i for i, d in enumerate(dims) if not isinstance(d, int)]
        if symbol is not None and symbol in dims:
            out[name] = dims.index(symbol)
        elif len(dynamic) == 1:
            out[name] = dynamic[0]
        else:
            out[name] = 0
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


def unconvertible_nodes(model: onnx.ModelProto, supported: Supported) -> dict[int, str]:
    """Top-level node index -> 'Op-version' label, for the nodes (a node's subgraphs included) that have no
    converter at the model's opset nor at any opset `normalize` would convert to: what keeps the whole model
    from converting, found before any conversion (subgraph fine-tuning trains around them)."""
    opsets = [default_opset(model), *CANDIDATE_OPSETS]
    out: dict[int, str] = {}
    for i, top in enumerate(model.graph.node):
        for node in _node_and_subgraphs(top):
            versions = [_since_version(node, o) for o in opsets]
            if any(v is not None and supported(node.domain or "", node.op_type, v) for v in versions):
                continue
            v = versions[0]
            dom = f"{node.domain}." if node.domain not in ("", "ai.onnx") else ""
            out[i] = f"{dom}{node.op_type}" + (f"-{v}" if v is not None else "")
            break
    return out


def _node_and_subgraphs(node: onnx.NodeProto) -> Iterator[onnx.NodeProto]:
    yield node
    for sub in subgraphs(node):
        yield from _all_nodes(sub)


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for n in graph.node:
        yield from _node_and_subgraphs(n)


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
    for v in [*inputs, *g.output]:  # Paddle declares a dynamic dim as -1 (invalid ONNX): a symbol
        for k, d in enumerate(v.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value < 0:
                d.dim_param = "batch" if k == 0 else f"{v.name}_dim{k}"
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
        if not is_op(n, "Reshape") or len(n.input) < 2 or _constant_value(g, n.input[0]) is not None:
            continue  # a constant reshaped (Paddle's biases to [1, C, 1, 1]) carries no batch
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


def _lift_constants(model: onnx.ModelProto, changes: list[str]) -> None:
    """`Constant` nodes of the main graph (tensor values) -> initializers of the same name."""
    g = model.graph
    outputs = {o.name for o in g.output}
    inits = {t.name for t in g.initializer}
    keep, lifted = [], []
    for n in g.node:
        value = None
        if is_op(n, "Constant") and n.domain in ("", "ai.onnx") and len(n.output) == 1 and n.output[0] not in outputs | inits:
            value = _constant_attr(n)
        if value is None:
            keep.append(n)
            continue
        t = numpy_helper.from_array(value, n.output[0])
        lifted.append(t)
    if not lifted:
        return
    del g.node[:]
    g.node.extend(keep)
    g.initializer.extend(lifted)
    if model.ir_version < 4:  # initializers must be graph inputs before IR 4
        g.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in lifted)
    weights = sum(1 for t in lifted if len(t.dims) >= 2)
    changes.append(f"lifted {len(lifted)} Constant node(s) into initializers ({weights} of them weight-shaped, now trainable)")


def _constant_attr(n: onnx.NodeProto) -> np.ndarray | None:
    for a in n.attribute:
        if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
            return numpy_helper.to_array(a.t)
        if a.name in ("value_float", "value_floats"):
            return np.asarray(helper.get_attribute_value(a), dtype=np.float32)
        if a.name in ("value_int", "value_ints"):
            return np.asarray(helper.get_attribute_value(a), dtype=np.int64)
    return None  # sparse or string values stay Constant nodes


AUTO_PADS = ("SAME_UPPER", "SAME_LOWER", "VALID")


def _attr(n: onnx.NodeProto, name: str) -> Any:
    for a in n.attribute:
        if a.name == name:
            v = helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return None


def _set_attr(n: onnx.NodeProto, name: str, value: Any) -> None:
    kept = [a for a in n.attribute if a.name != name]
    del n.attribute[:]
    n.attribute.extend(kept)
    if value is not None:
        n.attribute.append(helper.make_attribute(name, value))


def _inferred_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, list[int | None]]]:
    """(elem type, dims: None where not known) of every tensor shape inference reaches."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inference fails on odd graphs (and > 2 GB): the declared shapes only
        inferred = model
    out: dict[str, tuple[int, list[int | None]]] = {}
    g = inferred.graph
    for v in [*g.input, *g.value_info, *g.output]:
        tt = v.type.tensor_type
        if tt.HasField("shape"):
            out[v.name] = (tt.elem_type, [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim])
    for t in g.initializer:
        out[t.name] = (t.data_type, list(t.dims))
    return out


def _explicit_pads(model: onnx.ModelProto, changes: list[str], source: str) -> None:
    """Every `auto_pad` SAME_* / VALID of the default domain as explicit `pads` (or a `Pad` node)."""
    g = model.graph
    todo = {k for k, n in enumerate(g.node) if n.domain in ("", "ai.onnx") and _attr(n, "auto_pad") in AUTO_PADS}
    if not todo:
        return
    shapes = _inferred_shapes(model)
    existing = {t.name for t in g.initializer} | {o for n in g.node for o in n.output} | {i.name for i in g.input}

    def fresh(base: str) -> str:
        name, k = base, 1
        while name in existing:
            name, k = f"{base}_{k}", k + 1
        existing.add(name)
        return name

    opset = default_opset(model)
    new_nodes: list[onnx.NodeProto] = []
    static = dynamic = 0
    for k, n in enumerate(g.node):
        mode = _attr(n, "auto_pad")
        if k not in todo:
            new_nodes.append(n)
            continue
        where = f"{source}: node '{n.name}' ({n.op_type}, auto_pad {mode})"
        x = shapes.get(n.input[0])
        if x is None or len(x[1]) < 3:
            raise ModelLoadError(f"{where}: the rank of its input is not known, so its padding cannot be made explicit "
                                 "for onnx2torch; declare the model's input shapes")
        elem, dims = x
        rank = len(dims) - 2
        kernel = _attr(n, "kernel_shape")
        if kernel is None and len(n.input) > 1 and n.input[1] in shapes:
            kernel = shapes[n.input[1]][1][2:]
        if kernel is None or None in kernel or len(kernel) != rank:
            raise ModelLoadError(f"{where}: its kernel size is not known; give the node a kernel_shape attribute")
        strides = _attr(n, "strides") or [1] * rank
        dilations = _attr(n, "dilations") or [1] * rank
        out_pad = _attr(n, "output_padding") or [0] * rank
        if _attr(n, "output_shape") is not None:
            raise ModelLoadError(f"{where}: an output_shape attribute with auto_pad is not rewritten; export the "
                                 "model with explicit pads")
        per: list[tuple[int, int] | None] = []
        if mode == "VALID":
            per = [(0, 0)] * rank
        else:
            handler = find_handler(n.op_type)
            upper = mode == "SAME_UPPER"
            for i in range(rank):
                args = (dims[2 + i], int(kernel[i]), int(strides[i]), int(dilations[i]), int(out_pad[i]), upper)
                per.append(handler.auto_pads(*args) if handler is not None else same_pads(*args[:4], upper))
        if all(p is not None for p in per):
            pads = [p[0] for p in per if p] + [p[1] for p in per if p]
            static += 1
        elif any(p is None and dims[2 + i] is not None for i, p in enumerate(per)):
            raise ModelLoadError(f"{where}: its stride exceeds its kernel span, which needs negative pads; export the "
                                 "model with explicit pads")
        else:
            new_nodes.extend(_runtime_pad(n, elem, rank, [int(k) for k in kernel], [int(v) for v in strides],
                                          [int(v) for v in dilations], mode == "SAME_UPPER", opset, fresh, where, g))
            pads = [0] * (2 * rank)
            dynamic += 1
        _set_attr(n, "auto_pad", None)
        _set_attr(n, "pads", pads)
        if _attr(n, "ceil_mode"):  # the SAME output size ceil(in / stride) is what floor mode gives with these pads
            _set_attr(n, "ceil_mode", 0)
        new_nodes.append(n)
    del g.node[:]
    g.node.extend(new_nodes)
    if static:
        changes.append(f"made the auto_pad of {static} node(s) explicit pads (from the inferred input shapes)")
    if dynamic:
        changes.append(f"made the auto_pad of {dynamic} node(s) explicit Pad nodes (their padding depends on the input size)")


def _runtime_pad(n: onnx.NodeProto, elem: int, rank: int, kernel: list[int], strides: list[int], dilations: list[int],
                 upper: bool, opset: int, fresh: Callable[[str], str], where: str, g: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes computing SAME padding from the runtime shape of `n`'s input and padding it; `n` is rewired to
    read the padded tensor."""
    if opset < 11:
        raise ModelLoadError(f"{where}: its padding depends on a spatial size not known until run time, which needs a "
                             f"Pad node with computed pads (opset 11 or later; this model has {opset}); declare fixed input sizes")
    value: float = 0.0
    if is_op(n, "MaxPool"):
        value = float("-inf")
    elif is_op(n, "AveragePool") and not _attr(n, "count_include_pad"):
        raise ModelLoadError(f"{where}: its padding depends on a spatial size not known until run time, and an average "
                             "that leaves the padding out cannot read an explicitly padded input; declare fixed input sizes")
    base = n.name or n.output[0]
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]

    def const(name: str, values: list[int]) -> str:
        t = fresh(f"{base}_pad_{name}")
        g.initializer.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), t))
        return t

    nodes: list[onnx.NodeProto] = []

    def node(inputs: list[str], op: str, **attrs: Any) -> str:  # inputs first: no name here binds an op name
        out = fresh(f"{base}_pad_{op.lower()}")
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    shape = node([n.input[0]], "Shape")
    size = node([shape, const("start", [2]), const("stop", [2 + rank]), const("axis", [0])], "Slice")
    s = const("strides", strides)
    out = node([node([size, const("stride_minus_1", [v - 1 for v in strides])], "Add"), s], "Div")  # ceil(size / stride)
    need = node([node([node([node([out, const("one", [1] * rank)], "Sub"), s], "Mul"), const("span", span)], "Add"), size], "Sub")
    total = node([need, const("zero", [0] * rank)], "Max")
    half = node([total, const("two", [2] * rank)], "Div")
    rest = node([total, half], "Sub")
    begin, end = (half, rest) if upper else (rest, half)
    zeros2 = const("zero2", [0, 0])
    pads = node([zeros2, begin, zeros2, end], "Concat", axis=0)
    fill = fresh(f"{base}_pad_value")
    g.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=helper.tensor_dtype_to_np_dtype(elem)), fill))
    padded = node([n.input[0], pads, fill], "Pad", mode="constant")
    n.input[0] = padded
    return nodes


def _static_reshapes(model: onnx.ModelProto, changes: list[str]) -> None:
    """A `Reshape` whose shape is computed from `Shape` (Paddle's flatten: [batch, -1] built from the
    input's shape) exports from torch with the batch of the trace baked in. Where shape inference (with
    data propagation) knows every output dim but the batch, and the batch is the input's (computed from
    it, or a literal 0: "copy dim 0"), the shape becomes the constant [0, d1, ...]; the shape computation
    left unread is removed.

    onnx's inference leaves a Reshape with a computed shape rankless, and so every tensor after it:
    PP-OCRv4 rec's SVTR attention reshapes to Concat(Cast(0), Shape(x)[1], Cast(3), ...), after which
    onnx2torch's BatchNormalization reads a rank of 0 ("spatial rank == -2"). Each folded Reshape lets
    inference reach the next one, so the pass repeats until nothing more folds."""
    fixed = 0
    for _ in range(64):  # each round folds at least one Reshape; a model has far fewer than this
        done = _static_reshapes_once(model)
        fixed += done
        if not done:
            break
    if fixed:
        _drop_dead(model)
        changes.append(f"made the computed shape of {fixed} Reshape node(s) constant (all but the batch known)")


def _static_reshapes_once(model: onnx.ModelProto) -> int:
    g = model.graph
    todo = [n for n in g.node if is_op(n, "Reshape") and len(n.input) > 1 and _constant_value(g, n.input[1]) is None
            and not _attr(n, "allowzero")]
    if not todo:
        return 0
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - no inference: leave them
        return 0
    vi = {v.name: [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None)
                   for d in v.type.tensor_type.shape.dim]
          for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output] if v.type.tensor_type.HasField("shape")}
    producers = {o: m for m in g.node for o in m.output}
    existing = {t.name for t in g.initializer}
    fixed = 0
    for n in todo:
        x = vi.get(n.input[0])
        shape = _shape_value(n.input[1], producers, vi, g, 0)
        # shape[0]: the input's own dim 0 (a symbol or size read from its Shape), or 0, which without
        # allowzero copies the input's dim 0: either way the batch passes through, as with the constant's 0.
        if not x or shape is None or len(shape) < 2 or shape[0] is None or (shape[0] != x[0] and shape[0] != 0) \
                or any(not isinstance(d, int) for d in shape[1:]):
            continue
        name, k = f"{n.output[0]}_static_shape", 1
        while name in existing:
            name, k = f"{n.output[0]}_static_shape_{k}", k + 1
        existing.add(name)
        g.initializer.append(numpy_helper.from_array(np.asarray([0, *shape[1:]], dtype=np.int64), name))
        n.input[1] = name
        fixed += 1
    return fixed


def _shape_value(name: str, producers: dict[str, onnx.NodeProto], vi: dict[str, list[Any]], g: onnx.GraphProto,
                 depth: int) -> list[Any] | None:
    """The value of a small int tensor computed from shapes (Shape, Cast, Slice, Concat, Gather, Squeeze,
    Unsqueeze of constants and inferred dims), an entry a symbol where a dim is symbolic; None if not known."""
    const = _constant_value(g, name)
    if const is not None:
        return [int(v) for v in const.reshape(-1)] if const.ndim <= 1 and const.dtype.kind in "iu" else None
    n = producers.get(name)
    if n is None or depth > 12:
        return None
    ins = [_shape_value(i, producers, vi, g, depth + 1) if k else None for k, i in enumerate(n.input)]
    if is_op(n, "Shape"):
        dims = vi.get(n.input[0])
        start, end = _attr(n, "start") or 0, _attr(n, "end")
        return None if dims is None else list(dims[start:end])
    first = _shape_value(n.input[0], producers, vi, g, depth + 1)
    if first is None:
        return None
    if is_op(n, "Cast", "Squeeze", "Unsqueeze"):
        return first
    if is_op(n, "Concat"):
        parts = [first, *ins[1:]]
        return None if any(p is None for p in parts) else [d for p in parts for d in p]  # type: ignore[union-attr]
    if is_op(n, "Slice") and len(n.input) >= 3 and ins[1] is not None and ins[2] is not None:
        steps = ins[4] if len(n.input) > 4 and ins[4] is not None else [1]
        return first[slice(ins[1][0], ins[2][0], steps[0])]
    if is_op(n, "Gather") and ins[1] is not None:
        return [first[i] for i in ins[1]]
    return None


def _drop_dead(model: onnx.ModelProto) -> None:
    """Nodes whose outputs nothing reads (nor the graph outputs), removed until none is left."""
    g = model.graph
    while True:
        read = {o.name for o in g.output} | {i for n in g.node for i in n.input}
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    read |= {i for m in _all_nodes(a.g) for i in m.input}
        keep = [n for n in g.node if any(o and o in read for o in n.output)]
        if len(keep) == len(g.node):
            return
        del g.node[:]
        g.node.extend(keep)


def _split_multi_output(model: onnx.ModelProto, changes: list[str]) -> None:
    """onnx2torch returns the whole output tuple of a node with several outputs (an LSTM's Y, Y_h, Y_c) where
    one of them is a graph output: each such graph output gets its own `Identity`."""
    g = model.graph
    outputs = {o.name for o in g.output}
    existing = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {t.name for t in g.initializer}
    added = []
    for n in g.node:
        if len(n.output) < 2:
            continue
        for k, name in enumerate(n.output):
            if name in outputs:
                inner, j = f"{name}_tuple", 1
                while inner in existing:
                    inner, j = f"{name}_tuple_{j}", j + 1
                existing.add(inner)
                for m in g.node:  # other readers of the tensor read the renamed one
                    for i, x in enumerate(m.input):
                        if x == name:
                            m.input[i] = inner
                n.output[k] = inner
                added.append(helper.make_node("Identity", [inner], [name], name=f"{name}_output"))
    if added:
        g.node.extend(added)
        changes.append(f"gave {len(added)} graph output(s) of multi-output nodes their own Identity (onnx2torch maps them one by one)")


def _fix_input_dims(model: onnx.ModelProto, dims: Mapping[str, Sequence[int]], changes: list[str]) -> None:
    """Dynamic dims of the graph inputs other than the batch set to the training data's (the export keeps
    only the batch dynamic anyway): shape inference then reaches every node onnx2torch needs a rank of."""
    fixed = []
    for v in model.graph.input:
        want = dims.get(v.name)
        got = v.type.tensor_type.shape.dim
        if want is None or len(want) != len(got):
            continue
        for k in range(1, len(got)):
            if not (got[k].HasField("dim_value") and got[k].dim_value > 0):
                got[k].dim_value = int(want[k])
                fixed.append(f"{v.name}[{k}]={want[k]}")
    if fixed:
        changes.append(f"fixed the dynamic input dims to the training data's ({', '.join(fixed)})")


def normalize(model: onnx.ModelProto, supported: Supported, source: str = "the model",
              input_dims: Mapping[str, Sequence[int]] | None = None) -> tuple[Normalized, list[str]]:
    """A copy of `model` ready for onnx2torch, and the ops onnx2torch still cannot take (empty: fine).
    `input_dims` (name -> shape of the data): the dynamic non-batch dims of the inputs are fixed to them.
    Raises ModelLoadError (naming `source` and the node) for what cannot be rewritten exactly."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    changes: list[str] = []
    source_opset = default_opset(m)
    if input_dims:
        _fix_input_dims(m, input_dims, changes)
    _lift_constants(m, changes)
    _drop_passthrough(m, changes)
    _split_multi_output(m, changes)
    _explicit_pads(m, changes, source)
    _fix_batch(m, changes)
    _static_reshapes(m, changes)
    bad = unsupported_ops(m, supported)
    # onnx2torch's Softmax before opset 13 (flatten, softmax, reshape) exports with the batch baked in.
    old_softmax = source_opset < 13 and any(is_op(n, "Softmax", "LogSoftmax") for n in m.graph.node)
    if bad or old_softmax:
        for target in CANDIDATE_OPSETS:
            if target == source_opset:
                continue
            try:
                conv = onnx.version_converter.convert_version(m, target)
            except Exception:  # noqa: BLE001 - the converter raises many kinds; try the next opset
                continue
            if not unsupported_ops(conv, supported) and not (old_softmax and target < 13):
                conv.ir_version = max(conv.ir_version, m.ir_version)
                m, bad = conv, []
                changes.append(f"converted opset {source_opset} -> {target}")
                break
    return Normalized(m, default_opset(m), source_opset, tuple(changes)), bad


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
