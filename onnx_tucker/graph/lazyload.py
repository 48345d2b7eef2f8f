"""Loading a big model without its weights: the weights stay in the file and are read one at a time.

`read_skeleton(path)` scans the protobuf wire format of an .onnx file (memory-mapped: only the field
headers are touched) and parses a copy in which every big top-level initializer stored inline
(`raw_data`) is replaced by an external-data reference into the .onnx file itself (location = the
file's own name, offset and length of the raw bytes). That is ordinary ONNX external data, so every
check and `onnx.load_external_data_for_model` handle it; the model costs a few MB instead of twice
the file size, and loading, `onnx.checker` and `ByteSize()` stop serialising hundreds of MB.

`keep_weights_lazy(model, base_dir)` then loads back every referenced tensor that is not read
solely as the weight of a Conv / ConvTranspose / Gemm / MatMul (constant folding, subgraphs and graph outputs see
ordinary tensors); `read_array(tensor, base_dir)` reads one weight; `materialize(model, base_dir)`
loads whatever is still external (before handing the model to onnxruntime or to the user).
"""

from __future__ import annotations

import math
import mmap
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..ops.registry import find_handler
from .protos import DEFAULT_DOMAINS

_TP = onnx.TensorProto
# Inline tensors at least this big are left in the file.
LAZY_BYTES = 2**20
# Files smaller than this are parsed the ordinary way (nothing to gain).
MIN_FILE_BYTES = 64 * 2**20

# Field numbers (onnx.proto): ModelProto.graph, GraphProto.initializer, TensorProto.raw_data /
# external_data / data_location, StringStringEntryProto.key / value.
_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5
_T_RAW, _T_EXTERNAL, _T_LOCATION = 9, 13, 14


class SkeletonError(ValueError):
    """The file is not in the shape the scanner handles; parse it the ordinary way."""


def _varint(buf: mmap.mmap | bytes, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise SkeletonError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _enc_varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _fields(buf: mmap.mmap | bytes, pos: int, end: int):  # type: ignore[no-untyped-def]
    """(field number, wire type, start of the field, start of payload, end) for each field."""
    while pos < end:
        start = pos
        tag, pos = _varint(buf, pos, end)
        field, wt = tag >> 3, tag & 7
        if wt == 0:
            _, pos2 = _varint(buf, pos, end)
            yield field, wt, start, pos, pos2
        elif wt == 1:
            yield field, wt, start, pos, pos + 8
            pos2 = pos + 8
        elif wt == 2:
            ln, p = _varint(buf, pos, end)
            pos2 = p + ln
            yield field, wt, start, p, pos2
        elif wt == 5:
            pos2 = pos + 4
            yield field, wt, start, pos, pos2
        else:
            raise SkeletonError(f"unsupported wire type {wt}")
        if pos2 > end:
            raise SkeletonError("field runs past its message")
        pos = pos2


def _len_field(field: int, payload: bytes) -> bytes:
    return _enc_varint(field << 3 | 2) + _enc_varint(len(payload)) + payload


def _tensor(buf: mmap.mmap, start: int, end: int, location: str) -> tuple[bytes, bool]:
    """The tensor's bytes with a big raw_data turned into an external reference (and whether it was)."""
    raw = None
    for field, wt, _, p, q in _fields(buf, start, end):
        if field in (_T_EXTERNAL, _T_LOCATION):
            return buf[start:end], False  # already external (or odd): leave it alone
        if field == _T_RAW and wt == 2:
            raw = (p, q)
    if raw is None or raw[1] - raw[0] < LAZY_BYTES:
        return buf[start:end], False
    parts = [buf[s:e] for f, _, s, _, e in _fields(buf, start, end) if f != _T_RAW]
    parts.append(_enc_varint(_T_LOCATION << 3 | 0) + _enc_varint(_TP.EXTERNAL))
    for key, value in (("location", location), ("offset", str(raw[0])), ("length", str(raw[1] - raw[0]))):
        entry = _len_field(1, key.encode()) + _len_field(2, value.encode())
        parts.append(_len_field(_T_EXTERNAL, entry))
    return b"".join(parts), True


def _skeleton_bytes(buf: mmap.mmap, location: str) -> tuple[bytes, int]:
    out: list[bytes] = []
    lazy = 0
    for field, wt, s, p, q in _fields(buf, 0, len(buf)):
        if field != _MODEL_GRAPH or wt != 2:
            out.append(buf[s:q])
            continue
        graph: list[bytes] = []
        for gf, gwt, gs, gp, gq in _fields(buf, p, q):
            if gf == _GRAPH_INITIALIZER and gwt == 2:
                t, moved = _tensor(buf, gp, gq, location)
                lazy += moved
                graph.append(_len_field(_GRAPH_INITIALIZER, t))
            else:
                graph.append(buf[gs:gq])
        out.append(_len_field(_MODEL_GRAPH, b"".join(graph)))
    return b"".join(out), lazy


def read_skeleton(path: str | os.PathLike[str]) -> onnx.ModelProto | None:
    """The model at `path` with its big inline initializers left in the file (None: not worth it).

    Raises SkeletonError when the file cannot be scanned (the caller parses it the ordinary way,
    which also produces the right error message for a broken file).
    """
    p = Path(path)
    if p.stat().st_size < MIN_FILE_BYTES:
        return None
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        data, lazy = _skeleton_bytes(buf, p.name)
    if not lazy:
        return None
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as e:  # noqa: BLE001 - any parse problem: fall back to the ordinary path
        raise SkeletonError(str(e)) from None
    return model


def is_external(t: onnx.TensorProto) -> bool:
    return t.data_location == _TP.EXTERNAL


def _weight_only(model: onnx.ModelProto) -> set[str]:
    """Top-level initializers read only as the weight input of Conv / ConvTranspose / Gemm / MatMul nodes."""
    g = model.graph
    ok: dict[str, bool] = {}
    for node in g.node:
        handler = find_handler(node.op_type) if node.domain in DEFAULT_DOMAINS else None
        pos = handler.weight_input if handler is not None else None
        for i, name in enumerate(node.input):
            if name:
                ok[name] = ok.get(name, True) and i == pos
        for a in node.attribute:  # anything a subgraph reads from outside counts as "not only a weight"
            subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            for sub in subs:
                for name in _names_read(sub):
                    ok[name] = False
    for o in g.output:
        ok[o.name] = False
    return {t.name for t in g.initializer if ok.get(t.name, False)}


def _names_read(graph: onnx.GraphProto) -> set[str]:
    names: set[str] = set()
    for node in graph.node:
        names.update(x for x in node.input if x)
        for a in node.attribute:
            for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                names |= _names_read(sub)
    return names


def load_tensor(t: onnx.TensorProto, base_dir: str | os.PathLike[str]) -> None:
    """Bring an external tensor's bytes into it, exactly as if it had been stored inline."""
    from onnx.external_data_helper import load_external_data_for_tensor

    load_external_data_for_tensor(t, str(base_dir))
    t.ClearField("data_location")  # onnx sets DEFAULT explicitly: the bytes would differ from the file's


def keep_weights_lazy(model: onnx.ModelProto, base_dir: str | os.PathLike[str]) -> int:
    """Load every external tensor except the Conv / ConvTranspose / Gemm / MatMul weights; return how many stay external."""
    weights = _weight_only(model)
    left = 0
    for t in model.graph.initializer:
        if is_external(t):
            if t.name in weights:
                left += 1
            else:
                load_tensor(t, base_dir)
    for t in _nested_tensors(model.graph):
        if is_external(t):
            load_tensor(t, base_dir)
    return left


def _nested_tensors(graph: onnx.GraphProto):  # type: ignore[no-untyped-def]
    """Tensors in node attributes and subgraphs (everything but the top-level initializers)."""
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                yield from sub.initializer
                yield from _nested_tensors(sub)


def read_array(t: onnx.TensorProto, base_dir: str | os.PathLike[str]) -> np.ndarray:
    """The values of an external tensor, read straight into one numpy array (no bytes copy)."""
    info = {e.key: e.value for e in t.external_data}
    location = info["location"]
    base = Path(base_dir).resolve()
    target = (base / location).resolve()
    if os.path.isabs(location) or not target.is_relative_to(base):
        raise ValueError(f"tensor '{t.name}': external data '{location}' is outside {base}")
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).newbyteorder("<")
    count = math.prod(t.dims)
    arr = np.fromfile(target, dtype=dtype, count=count, offset=int(info.get("offset", 0)))
    if arr.size != count:
        raise ValueError(f"tensor '{t.name}': external data '{location}' is truncated")
    return arr.astype(arr.dtype.newbyteorder("="), copy=False).reshape(tuple(t.dims))


def read_weight(t: onnx.TensorProto, base_dir: str | os.PathLike[str]) -> np.ndarray:
    """An external tensor's values: straight from the file (one copy), or through onnx's own reader for
    dtypes numpy cannot map directly (bfloat16, ...)."""
    try:
        return read_array(t, base_dir)
    except (TypeError, ValueError):
        return numpy_helper.to_array(t, str(base_dir))


def materialize(model: onnx.ModelProto, base_dir: str | os.PathLike[str]) -> None:
    """Load every tensor that is still external into the model (in place)."""
    for t in [*model.graph.initializer, *_nested_tensors(model.graph)]:
        if is_external(t):
            load_tensor(t, base_dir)
