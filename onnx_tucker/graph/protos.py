"""Small protobuf helpers shared by the graph layer (and only by it).

Walking subgraphs, the names a subgraph reads from its enclosing scope, node labels for messages,
field-by-field copies of a message without some of its fields, and the few constants every module
of the graph layer agrees on.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import EncodeError

from ..errors import first_line  # noqa: F401 - re-exported: the graph layer and its callers use it from here

# Protobuf refuses to serialise a message over 2 GiB; stay clearly below it.
PROTOBUF_LIMIT = 2**31 - 2**24
# The names the default ONNX operator domain goes by.
DEFAULT_DOMAINS = ("", "ai.onnx")

_TP = onnx.TensorProto
# Bytes per element of the fixed-size dtypes (packed 4-bit and string tensors are not size-checked).
ITEMSIZE: dict[int, int] = {
    _TP.FLOAT: 4, _TP.DOUBLE: 8, _TP.FLOAT16: 2, _TP.BFLOAT16: 2, _TP.INT8: 1, _TP.UINT8: 1,
    _TP.INT16: 2, _TP.UINT16: 2, _TP.INT32: 4, _TP.UINT32: 4, _TP.INT64: 8, _TP.UINT64: 8,
    _TP.BOOL: 1, _TP.COMPLEX64: 8, _TP.COMPLEX128: 16,
}
# Which typed field holds the values when raw_data is not used (and values per element).
TYPED_FIELD: dict[int, tuple[str, int]] = {
    _TP.FLOAT: ("float_data", 1), _TP.DOUBLE: ("double_data", 1), _TP.INT64: ("int64_data", 1),
    _TP.INT32: ("int32_data", 1), _TP.INT16: ("int32_data", 1), _TP.INT8: ("int32_data", 1),
    _TP.UINT16: ("int32_data", 1), _TP.UINT8: ("int32_data", 1), _TP.BOOL: ("int32_data", 1),
    _TP.FLOAT16: ("int32_data", 1), _TP.BFLOAT16: ("int32_data", 1), _TP.UINT32: ("uint64_data", 1),
    _TP.UINT64: ("uint64_data", 1), _TP.COMPLEX64: ("float_data", 2), _TP.COMPLEX128: ("double_data", 2),
}


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of the model: initializers, Constant attributes, subgraphs, functions."""
    from onnx.external_data_helper import _get_all_tensors

    return iter(_get_all_tensors(model))


def is_default_domain(node: onnx.NodeProto) -> bool:
    return node.domain in DEFAULT_DOMAINS


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The bodies of an If / Loop / Scan node (nothing for other nodes)."""
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def outer_names_used(graph: onnx.GraphProto) -> set[str]:
    """Names `graph` (a subgraph) and its own subgraphs read from an enclosing scope."""
    local = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    for n in graph.node:
        local.update(n.output)
    used: set[str] = set()
    for n in graph.node:
        used.update(x for x in n.input if x and x not in local)
        for sub in subgraphs(n):
            used.update(x for x in outer_names_used(sub) if x not in local)
    return used


def subgraph_outer_reads(node: onnx.NodeProto) -> set[str]:
    """Names an If/Loop/Scan node's bodies read from the enclosing graph (its implicit inputs)."""
    reads: set[str] = set()
    for sub in subgraphs(node):
        reads |= outer_names_used(sub)
    return reads


def outer_scope_reads(graph: onnx.GraphProto) -> set[str]:
    """Names the subgraphs of `graph`'s nodes read from `graph` (must never be dropped)."""
    used: set[str] = set()
    for node in graph.node:
        used |= subgraph_outer_reads(node)
    return used


def node_label(node: onnx.NodeProto) -> str:
    """For messages: "node 'conv1' (Conv)", or "Conv node writing 'y'" when the node has no name."""
    out = node.output[0] if node.output else "?"
    return f"node '{node.name}' ({node.op_type})" if node.name else f"{node.op_type} node writing '{out}'"


def layer_id_of(node: onnx.NodeProto) -> str:
    """A node's name, or "<op>:<first output>" for unnamed nodes: how the report names a layer."""
    return node.name if node.name else f"{node.op_type}:{node.output[0] if node.output else '?'}"


def _is_repeated(fd: FieldDescriptor) -> bool:
    rep = getattr(fd, "is_repeated", None)  # protobuf >= 5 (upb); older releases only have label
    return bool(rep) if rep is not None else fd.label == FieldDescriptor.LABEL_REPEATED


def copy_fields(src: object, dst: object, skip: set[str]) -> None:
    """Copy every set field of message `src` into `dst` except those named in `skip`."""
    for fd, value in src.ListFields():  # type: ignore[attr-defined]
        if fd.name in skip:
            continue
        if _is_repeated(fd):
            getattr(dst, fd.name).extend(value)
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def opset_version(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in DEFAULT_DOMAINS:
            return int(imp.version)
    return 1


def graph_input_names(model: onnx.ModelProto) -> list[str]:
    """Real inputs: graph inputs that are not initializers (old IR lists weights as inputs)."""
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def input_specs(model: onnx.ModelProto) -> tuple[list[str], dict[str, list[int | None]], dict[str, np.dtype]]:
    """(real input names, their declared shapes with None for an unknown dim, their numpy dtypes): what
    the data loaders (data/) need to know of a model."""
    names = graph_input_names(model)
    by_name = {i.name: i for i in model.graph.input}
    dtypes = {n: np.dtype(onnx.helper.tensor_dtype_to_np_dtype(by_name[n].type.tensor_type.elem_type)) for n in names}
    shapes = {n: [d.dim_value if d.HasField("dim_value") else None for d in by_name[n].type.tensor_type.shape.dim]
              for n in names}
    return names, shapes, dtypes


def serialized_size(model: onnx.ModelProto) -> int:
    """Bytes of the serialised model, or a number above PROTOBUF_LIMIT when protobuf cannot serialise
    it (protobuf >= 7 raises in ByteSize() itself above 2 GiB)."""
    try:
        return model.ByteSize()
    except EncodeError:
        return 2**31


def size_on_disk(path: str | os.PathLike[str], model: onnx.ModelProto) -> int:
    """Bytes of the .onnx file plus every external data file its tensors reference (each file once)."""
    base = Path(path).resolve()
    files = {base}
    for t in all_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if loc:
                files.add((base.parent / loc).resolve())
    return sum(f.stat().st_size for f in files if f.is_file())


