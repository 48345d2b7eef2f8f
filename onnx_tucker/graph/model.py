"""Reading the graph: candidate layers, constant weights and inferred shapes.

With `io` and `rewrite`, the only modules that touch ONNX protobuf. Everything leaving this module
is plain Python / numpy (`Layer`, shape dicts), so planning and decomposition never see protobuf.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import UsageError
from ..ops.layer import Layer, Shape
from ..ops.registry import find_handler, handler_for, reported_reason
from .fold import FoldError, WeightFolder
from .optypes import is_op
from .protos import DEFAULT_DOMAINS, graph_input_names, layer_id_of, outer_names_used, subgraphs

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}



class ModelIndex:
    """Name lookups over a model's top-level graph, built once per pass.

    "Constant" means an initializer, a `Constant` node's output, or a tensor computed from those
    only (folded by `fold.WeightFolder`: ConstantOfShape, Identity, Cast, Reshape, Transpose, ...).
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        g = model.graph
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in g.initializer}
        self.constant_nodes: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[int]] = defaultdict(list)
        for i, node in enumerate(g.node):
            if is_op(node, "Constant") and node.domain in DEFAULT_DOMAINS and len(node.output) == 1:
                self.constant_nodes[node.output[0]] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(i)
        # Subgraphs may read outer-scope tensors: count those uses too, so we never drop them.
        for node in g.node:
            for sub in subgraphs(node):
                for name in outer_names_used(sub):
                    self.consumers[name].append(-1)
        self.graph_outputs = {o.name for o in g.output}
        self.graph_inputs = {i.name for i in g.input}
        self.folder = WeightFolder(model)

    def is_constant(self, name: str) -> bool:
        return self.folder.origin(name).constant

    def not_constant_reason(self, name: str) -> str | None:
        """Why `name` is not a constant (None when it is)."""
        return self.folder.origin(name).reason

    def is_folded(self, name: str) -> bool:
        """A constant computed by nodes other than a plain `Constant` node."""
        return name not in self.constant_nodes and self.folder.origin(name).folded

    def constant_dtype(self, name: str) -> int | None:
        if name in self.initializers:
            return self.initializers[name].data_type
        node = self.constant_nodes.get(name)
        if node is not None:
            for a in node.attribute:
                if a.name == "value":
                    return a.t.data_type
            return helper.np_dtype_to_tensor_dtype(self.constant_value(name).dtype)
        if self.is_constant(name):
            return self.folder.meta(name)[1]
        return None

    def constant_shape(self, name: str) -> tuple[int, ...] | None:
        if name in self.initializers:
            return tuple(self.initializers[name].dims)
        if name in self.constant_nodes:
            return tuple(self.constant_value(name).shape)
        if self.is_constant(name):
            return self.folder.meta(name)[0]
        return None

    def constant_value(self, name: str) -> np.ndarray:
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.constant_nodes.get(name)
        if node is None:
            return self.folder.value(name)
        for a in node.attribute:
            if a.name == "value":
                return numpy_helper.to_array(a.t)
            if a.name == "value_float":
                return np.array(a.f, dtype=np.float32)
            if a.name == "value_floats":
                return np.array(list(a.floats), dtype=np.float32)
            if a.name == "value_int":
                return np.array(a.i, dtype=np.int64)
            if a.name == "value_ints":
                return np.array(list(a.ints), dtype=np.int64)
        # sparse_value and friends: let the reference runtime materialise them.
        return self.folder.value(name)


def lowest_float_eps(model: onnx.ModelProto) -> float:
    """Machine epsilon of the least precise floating-point dtype among the top-level initializers (and
    Constant nodes): the precision factors are stored in (float32's when there is none)."""
    eps = float(np.finfo(np.float32).eps)
    codes = {t.data_type for t in model.graph.initializer}
    codes |= {a.t.data_type for n in model.graph.node if is_op(n, "Constant") for a in n.attribute if a.name == "value"}
    for code in codes & _FLOAT_TYPES:
        eps = max(eps, _EPS.get(code, eps))
    return eps


_EPS = {onnx.TensorProto.FLOAT16: float(np.finfo(np.float16).eps), onnx.TensorProto.BFLOAT16: 2.0**-7,
        onnx.TensorProto.DOUBLE: float(np.finfo(np.float64).eps)}


def _dims(vi: onnx.ValueInfoProto) -> Shape | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim)


def resolve_input_shapes(
    model: onnx.ModelProto, overrides: Mapping[str, tuple[int, ...]], source: str = "model"
) -> dict[str, tuple[int, ...]]:
    """Concrete shapes for every real graph input: the user's, else the model's with batch -> 1."""
    names = graph_input_names(model)
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise UsageError(
            f"--input-shape {unknown[0]}: {source} has no input of that name; its inputs are: "
            + ", ".join(names)
        )
    by_name = {i.name: i for i in model.graph.input}
    shapes: dict[str, tuple[int, ...]] = {}
    for name in names:
        dims = _dims(by_name[name])
        if name in overrides:
            given = overrides[name]
            if dims is not None and len(dims) != len(given):
                raise UsageError(
                    f"--input-shape {name}:{','.join(map(str, given))}: input '{name}' of {source} has "
                    f"{len(dims)} dimensions, not {len(given)}; give all {len(dims)}, e.g. --input-shape {name}:"
                    + ",".join("1" if d is None else str(d) for d in dims)
                )
            shapes[name] = tuple(given)
            continue
        if dims is None:
            raise UsageError(f"{source}: input '{name}' has no declared shape; pass --input-shape {name}:D0,D1,...")
        fixed = [d if d is not None else (1 if i == 0 else None) for i, d in enumerate(dims)]
        if any(d is None for d in fixed):
            # Show a declared 0 as 0: a zero-size dimension is not the same problem as a symbolic one.
            raw = [d.dim_value if d.HasField("dim_value") else None for d in by_name[name].type.tensor_type.shape.dim]
            shown = ",".join("?" if d is None else str(d) for d in raw)
            what = "zero-size" if 0 in raw[1:] else "dynamic"
            raise UsageError(
                f"{source}: input '{name}' has {what} dimensions ({shown}); fix them with "
                f"--input-shape {name}:" + ",".join("1" if d is None else str(d) for d in dims)
            )
        shapes[name] = tuple(int(d) for d in fixed if d is not None)
    return shapes


def infer_shapes(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Shape]:
    """Shapes of every tensor of the top-level graph with the inputs fixed to `input_shapes`.

    Runs on a light copy: large initializers are replaced by typed graph inputs, so this costs
    next to no memory even for multi-GB models.
    """
    g = model.graph
    light = onnx.GraphProto()
    light.name = g.name
    light.node.extend(g.node)
    light.output.extend(g.output)
    light.value_info.extend(g.value_info)
    seen: set[str] = set()
    for t in g.initializer:
        if int(np.prod(t.dims)) <= 64 and t.data_location != onnx.TensorProto.EXTERNAL:
            light.initializer.append(t)
        else:
            light.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        seen.add(t.name)
    for i in g.input:
        if i.name in seen:
            continue
        vi = onnx.ValueInfoProto()
        vi.CopyFrom(i)
        if i.name in input_shapes:
            shape = vi.type.tensor_type.shape
            shape.ClearField("dim")
            for d in input_shapes[i.name]:
                shape.dim.add().dim_value = d
        light.input.append(vi)
    m = helper.make_model(light, opset_imports=list(model.opset_import))
    m.ir_version = max(model.ir_version, 4)
    shapes: dict[str, Shape] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(m, strict_mode=False, data_prop=True)
        graph = inferred.graph
    except Exception:  # noqa: BLE001 - shape inference is best effort: unknown shapes are reported
        graph = m.graph
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        dims = _dims(vi)
        if dims is not None:
            shapes[vi.name] = dims
    return shapes


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _normalise(value: object) -> object:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list):
        return [int(v) if isinstance(v, (int, np.integer)) else v for v in value]
    return value


def find_layers(model: onnx.ModelProto, shapes: Mapping[str, Shape], index: ModelIndex | None = None) -> list[Layer]:
    """Every Conv / ConvTranspose / Gemm / MatMul of the model, with the reason when it can never be decomposed."""
    idx = index or ModelIndex(model)
    layers: list[Layer] = []
    weight_uses = Counter(
        node.input[1] for node in model.graph.node if find_handler(node.op_type) is not None and len(node.input) > 1
    )
    for i, node in enumerate(model.graph.node):
        for sub in subgraphs(node):
            layers.extend(_subgraph_layers(sub, layer_id_of(node)))
        reported = reported_reason(node.op_type)
        if reported is not None:
            layers.append(Layer(layer_id=layer_id_of(node), op_type=node.op_type, node_index=i, skip_reason=reported))
            continue
        if find_handler(node.op_type) is None or node.domain not in DEFAULT_DOMAINS:
            continue
        layers.append(_describe(node, i, idx, shapes, weight_uses))
    for fn in model.functions:
        for node in fn.node:
            if find_handler(node.op_type) is not None:
                layers.append(Layer(layer_id=layer_id_of(node), op_type=node.op_type, node_index=-1,
                                    skip_reason=f"inside model-local function '{fn.name}' (functions are left alone)"))
    return layers


def _subgraph_layers(graph: onnx.GraphProto, owner: str) -> list[Layer]:
    found = []
    for node in graph.node:
        for sub in subgraphs(node):
            found.extend(_subgraph_layers(sub, owner))
        if find_handler(node.op_type) is not None:
            found.append(
                Layer(
                    layer_id=layer_id_of(node),
                    op_type=node.op_type,
                    node_index=-1,
                    skip_reason=f"inside a subgraph of '{owner}' (If/Loop/Scan bodies are left alone)",
                )
            )
    return found


def _describe(
    node: onnx.NodeProto, i: int, idx: ModelIndex, shapes: Mapping[str, Shape], weight_uses: Counter[str]
) -> Layer:
    """The generic checks of a layer's weight here; what the operator itself requires, its handler."""
    handler = handler_for(node.op_type)
    attrs = {k: _normalise(v) for k, v in _attrs(node).items()}
    x = node.input[0] if node.input else ""
    w = node.input[1] if len(node.input) > 1 else ""
    base = dict(
        layer_id=layer_id_of(node),
        op_type=node.op_type,
        node_index=i,
        attrs=attrs,
        input_shape=shapes.get(x),
        output_shape=shapes.get(node.output[0]) if node.output else None,
        inputs=tuple(node.input),
        outputs=tuple(node.output),
        node_name=node.name,
    )

    def skip(reason: str, **extra: object) -> Layer:
        return Layer(**base, **extra, skip_reason=reason)  # type: ignore[arg-type]

    why_operands = handler.operands_reason(bool(x) and idx.is_constant(x), bool(w) and idx.is_constant(w))
    if why_operands is not None:
        return skip(why_operands)
    if not w:
        return skip(f"{node.op_type} has no weight input")
    why = idx.not_constant_reason(w)
    if why is not None:
        tail = "; only constant weights are decomposed" if "run time from graph input" in why else ""
        return skip(f"weight '{w}' is {why}{tail}")
    folded = idx.is_folded(w)
    try:
        wshape = idx.constant_shape(w) or ()
        dtype_code = idx.constant_dtype(w)
    except FoldError as e:
        return skip(f"{e}; layer left as is")
    dtype = onnx.helper.tensor_dtype_to_np_dtype(dtype_code).name if dtype_code else "?"
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    layer = Layer(
        **base,  # type: ignore[arg-type]
        weight_name=w,
        weight_shape=tuple(int(d) for d in wshape),
        weight_dtype=dtype,
        shared_weight=weight_uses[w] > 1,
        weight_folded=folded,
        bias_name=bias,
    )
    if dtype_code not in _FLOAT_TYPES:
        reason: str | None = f"weight dtype {dtype} is not floating point (quantized layers are left alone)"
    elif any(d == 0 for d in wshape):
        reason = f"weight has a zero-size dimension {tuple(wshape)}"
    else:
        reason = handler.skip_reason(layer, idx.not_constant_reason(bias) if bias is not None else None)
    return layer if reason is None else replace(layer, skip_reason=reason, bias_name=None)
