"""Loading ONNX models with clear errors: every check on a model happens here, before planning.

A bad file gives one `ModelLoadError` of the form "<file>: <problem>; <fix>", never a traceback from
deep inside numpy or onnxruntime. We refuse a model only where onnxruntime would refuse it too: when
`onnx.checker` is stricter than onnxruntime (a graph output without a shape, an unsorted graph),
onnxruntime has the last word.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from collections import defaultdict, deque
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from ..errors import ModelLoadError
from .protos import (
    DEFAULT_DOMAINS,
    ITEMSIZE,
    PROTOBUF_LIMIT,
    TYPED_FIELD,
    all_tensors,
    copy_fields,
    first_line,
    node_label,
    serialized_size,
    subgraph_outer_reads,
)

log = logging.getLogger("onnx_tucker")

# The oldest default-domain opset onnx-tucker supports (issue 2: "opset 7 and up").
MIN_OPSET = 7

_REEXPORT = "re-export or re-download the model"


# ---- loading ------------------------------------------------------------------------------------


def load_model(path: str | os.PathLike[str], lazy: bool = False) -> onnx.ModelProto:
    """Read and check an ONNX model (with its external data) or raise ModelLoadError.

    The returned model passed every check of `check_model`; its nodes are in topological order.
    `lazy=True`: big Conv / ConvTranspose / Gemm / MatMul weights stay in the file as external data relative to the
    model's folder (inline ones too: see `lazyload`), to be read one at a time.
    """
    p = Path(path)
    if not p.exists():
        hint = " (a broken symbolic link)" if p.is_symlink() else ""
        raise ModelLoadError(f"{p}: no such file{hint}; check the path")
    if p.is_dir():
        found = sorted(p.glob("*.onnx"))
        hint = f" such as {found[0]}" if found else ""
        raise ModelLoadError(f"{p}: is a folder, not an ONNX file; pass the .onnx file inside it{hint}")
    if not p.is_file():
        raise ModelLoadError(f"{p}: not a regular file (a device or pipe?); pass an .onnx file")
    from . import lazyload

    skeleton = None
    try:
        size = p.stat().st_size
        if size == 0:
            raise ModelLoadError(f"{p}: the file is empty (0 bytes); {_REEXPORT}")
        if lazy:
            with contextlib.suppress(lazyload.SkeletonError, ValueError, OverflowError, OSError):
                skeleton = lazyload.read_skeleton(p)
        if skeleton is None:
            with open(p, "rb") as f:
                data = f.read()
    except OSError as e:
        raise ModelLoadError(f"{p}: cannot read the file ({e.strerror or e}); check its permissions") from None
    if skeleton is not None:
        model = skeleton
    else:
        model = _parse(data, p)
        del data
    model = check_model(model, str(p), model_path=p)
    if lazy:
        try:
            lazyload.keep_weights_lazy(model, p.resolve().parent)
        except (OSError, ValueError, onnx.checker.ValidationError) as e:
            raise ModelLoadError(f"{p}: cannot read external data ({first_line(e)}); check the data files") from None
    else:
        _load_external_data(model, p)
    return model


def _parse(data: bytes, p: Path) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise ModelLoadError(f"{p}: not a readable ONNX model ({_sniff(data) or first_line(e)}); {_REEXPORT}") from None
    if not model.HasField("graph"):
        raise ModelLoadError(f"{p}: parses as protobuf but is not an ONNX model ({_not_a_model(data)}); {_REEXPORT}")
    return model


def _sniff(data: bytes) -> str | None:
    """Name well-known non-ONNX formats, so the fix can say what to do with them."""
    head = data[:16]
    if head.startswith(b"PK\x03\x04"):
        return "a ZIP archive, e.g. a PyTorch checkpoint: export it with torch.onnx.export first"
    if head.startswith(b"\x89HDF"):
        return "an HDF5 file, e.g. a Keras model: convert it with tf2onnx first"
    if data[4:8] == b"TFL3":
        return "a TensorFlow Lite model: convert it with tf2onnx first"
    if data[4:8] == b"ORTM":
        return "an onnxruntime .ort model: use the .onnx model it was converted from"
    if head.lstrip().startswith((b"{", b"[")):
        return "a JSON file, not a protobuf"
    if re.match(rb"\s*<?\s*(ir_version|opset_import)", head):
        return "ONNX text format: convert it with onnx.parser.parse_model and onnx.save first"
    if head.lstrip()[:1] == b"<":
        return "an HTML/XML file, e.g. a download error page"
    return "protobuf parse failed: the file is truncated or not ONNX at all"


def _not_a_model(data: bytes) -> str:
    """What a protobuf without a graph probably is (a bare GraphProto / NodeProto / TensorProto)."""
    with contextlib.suppress(DecodeError, RuntimeError, ValueError):
        g = onnx.GraphProto()
        g.ParseFromString(data)
        if len(g.node) and (len(g.input) or len(g.output) or len(g.initializer)):
            return "it looks like a bare GraphProto: wrap it with onnx.helper.make_model"
    return "it holds no graph: it may be a TensorProto, a NodeProto or another protobuf"


def check_model(
    model: onnx.ModelProto, source: str = "model", model_path: Path | None = None
) -> onnx.ModelProto:
    """Every check a model must pass before planning, with one clear message per problem.

    Header (IR version, opsets), tensor data (sizes, external data locations), graph structure
    (one producer per tensor, every input defined, no cycle), then `onnx.checker`. Returns the
    model, or a copy with its nodes topologically sorted when they were not.
    """
    _check_header(model, source)
    _check_tensors(model, source, model_path)
    order = _check_structure(model, source)
    if order is not None:
        log.info("%s: nodes were not in topological order; sorted them", source)
        sorted_model = onnx.ModelProto()
        sorted_model.CopyFrom(model)
        nodes = [sorted_model.graph.node[i] for i in order]
        copies = [onnx.NodeProto() for _ in nodes]
        for c, n in zip(copies, nodes, strict=True):
            c.CopyFrom(n)
        del sorted_model.graph.node[:]
        sorted_model.graph.node.extend(copies)
        model = sorted_model
    _run_checker(model, source, model_path if order is None else None)
    return model


def _check_header(model: onnx.ModelProto, source: str) -> None:
    if model.ir_version <= 0:
        raise ModelLoadError(f"{source}: the model has no ir_version; {_REEXPORT} (onnx.helper.make_model sets it)")
    if model.ir_version > onnx.IR_VERSION:
        raise ModelLoadError(
            f"{source}: IR version {model.ir_version} is newer than this onnx {onnx.__version__} reads "
            f"(up to {onnx.IR_VERSION}); upgrade onnx (pip install -U onnx) or export with an older IR version"
        )
    if not model.opset_import and model.ir_version >= 3:
        raise ModelLoadError(f"{source}: the model declares no opset_import; re-export it with an opset")
    newest = onnx.defs.onnx_opset_version()
    for imp in model.opset_import:
        if imp.domain not in DEFAULT_DOMAINS:
            continue
        if imp.version < MIN_OPSET:
            raise ModelLoadError(
                f"{source}: opset {imp.version} is older than opset {MIN_OPSET}, the oldest onnx-tucker supports; "
                "upgrade the model: onnx.version_converter.convert_version(model, 13), or re-export it"
            )
        if imp.version > newest:
            raise ModelLoadError(
                f"{source}: opset {imp.version} of the default domain is newer than this onnx {onnx.__version__} "
                f"knows (up to {newest}); re-export the model with opset {newest} or older, or upgrade onnx"
            )


def _check_tensors(model: onnx.ModelProto, source: str, model_path: Path | None) -> None:
    """Sizes of every tensor's data, and external data references (inside the folder, present)."""
    from onnx.external_data_helper import uses_external_data

    base = model_path.resolve().parent if model_path is not None else None
    for t in all_tensors(model):
        if any(d < 0 for d in t.dims):
            raise ModelLoadError(f"{source}: tensor '{t.name}' has a negative dimension {list(t.dims)}; {_REEXPORT}")
        n = math.prod(t.dims)
        itemsize = ITEMSIZE.get(t.data_type)
        if uses_external_data(t):
            _check_external(t, n * itemsize if itemsize else None, source, base)
        elif itemsize is not None and t.HasField("raw_data"):
            if len(t.raw_data) != n * itemsize:
                raise ModelLoadError(
                    f"{source}: tensor '{t.name}' holds {len(t.raw_data)} bytes but its shape {list(t.dims)} "
                    f"needs {n * itemsize}; the file is corrupt: {_REEXPORT}"
                )
        elif t.data_type in TYPED_FIELD:
            field, per = TYPED_FIELD[t.data_type]
            have = len(getattr(t, field))
            if have != n * per:
                raise ModelLoadError(
                    f"{source}: tensor '{t.name}' holds {have // per} values but its shape {list(t.dims)} "
                    f"needs {n}; the file is corrupt: {_REEXPORT}"
                )


def _check_external(t: onnx.TensorProto, nbytes: int | None, source: str, base: Path | None) -> None:
    info = {e.key: e.value for e in t.external_data}
    location = info.get("location", "")
    if base is None:
        raise ModelLoadError(
            f"{source}: tensor '{t.name}' refers to external data '{location}' that was never loaded; "
            "load the model from its file (onnx_tucker.io.load_model) so the data is found"
        )
    target = (base / location).resolve()
    if not location or os.path.isabs(location) or not target.is_relative_to(base):
        raise ModelLoadError(
            f"{source}: tensor '{t.name}' points at external data '{location}' outside the model's folder; "
            "refused for safety: move the data file next to the model and set its location to the bare file name"
        )
    if not target.is_file():
        raise ModelLoadError(
            f"{source}: external data file '{location}' for tensor '{t.name}' is missing from {base}; "
            "copy it next to the model"
        )
    try:
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise ModelLoadError(f"{source}: tensor '{t.name}' has a malformed external data offset/length; {_REEXPORT}") from None
    avail = target.stat().st_size
    need = length if length is not None else nbytes
    if need is not None and offset + need > avail:
        raise ModelLoadError(
            f"{source}: external data file '{location}' has {avail} bytes but tensor '{t.name}' needs bytes "
            f"{offset}..{offset + need}; the data file is truncated or belongs to another model: copy the right one"
        )
    if length is not None and nbytes is not None and length != nbytes:
        raise ModelLoadError(
            f"{source}: tensor '{t.name}' stores {length} bytes externally but its shape {list(t.dims)} needs "
            f"{nbytes}; {_REEXPORT}"
        )


def _check_structure(model: onnx.ModelProto, source: str) -> list[int] | None:
    """One producer per tensor, every tensor read is defined, and no cycle.

    Returns a topological order of the nodes when the graph is acyclic but not sorted (onnxruntime
    sorts such graphs itself), else None.
    """
    g = model.graph
    where: dict[str, str] = {}
    for i in g.input:
        where[i.name] = f"graph input '{i.name}'"
    for t in g.initializer:
        # Old IR lists initializers as graph inputs too: that is one definition, not two.
        where.setdefault(t.name, f"initializer '{t.name}'")
    for s in g.sparse_initializer:
        where.setdefault(s.values.name, f"sparse initializer '{s.values.name}'")
    # onnxruntime refuses two nodes with the same (non-empty) name, so we do too, before any work.
    named: dict[str, int] = {}
    for k, node in enumerate(g.node):
        if node.name and named.setdefault(node.name, k) != k:
            raise ModelLoadError(
                f"{source}: two nodes are named '{node.name}' ({g.node[named[node.name]].op_type} and "
                f"{node.op_type}); onnxruntime refuses duplicate node names: give every node a unique name"
            )
    producer: dict[str, int] = {}
    for k, node in enumerate(g.node):
        for out in node.output:
            if not out:
                continue
            if out in producer or out in where:
                first = node_label(g.node[producer[out]]) if out in producer else where[out]
                raise ModelLoadError(
                    f"{source}: tensor '{out}' is written by both {first} and {node_label(node)}; "
                    f"every tensor needs one producer: {_REEXPORT}"
                )
            producer[out] = k
    deps: list[set[int]] = []
    for node in g.node:
        reads = [x for x in node.input if x] + sorted(subgraph_outer_reads(node))
        mine: set[int] = set()
        for name in reads:
            if name in producer:
                mine.add(producer[name])
            elif name not in where and name in node.input:
                raise ModelLoadError(
                    f"{source}: {node_label(node)} reads tensor '{name}', which no node, initializer or graph "
                    f"input defines; the graph is broken: {_REEXPORT}"
                )
        deps.append(mine)
    for o in g.output:
        if o.name not in producer and o.name not in where:
            raise ModelLoadError(f"{source}: graph output '{o.name}' is never computed by any node; {_REEXPORT}")

    if all(d < k for k, dk in enumerate(deps) for d in dk):
        return None
    # Kahn's algorithm, stable: keeps the file's order wherever it is already valid.
    users: dict[int, list[int]] = defaultdict(list)
    missing = [len(d) for d in deps]
    for k, dk in enumerate(deps):
        for d in dk:
            users[d].append(k)
    ready = deque(k for k, m in enumerate(missing) if m == 0)
    order: list[int] = []
    while ready:
        k = ready.popleft()
        order.append(k)
        for u in sorted(users[k]):
            missing[u] -= 1
            if missing[u] == 0:
                ready.append(u)
    if len(order) < len(g.node):
        left = {k for k, m in enumerate(missing) if m > 0}
        raise ModelLoadError(
            f"{source}: the graph has a cycle: {_cycle(deps, left, g)}; ONNX graphs must be acyclic: {_REEXPORT}"
        )
    return order


def _cycle(deps: list[set[int]], left: set[int], g: onnx.GraphProto) -> str:
    """One cycle among the nodes Kahn's algorithm could not schedule, as 'a -> b -> a'."""
    k = min(left)
    path: list[int] = []
    seen: dict[int, int] = {}
    while k not in seen:
        seen[k] = len(path)
        path.append(k)
        k = min(d for d in deps[k] if d in left)
    loop = list(reversed(path[seen[k]:]))  # producer -> consumer order
    first = loop.index(min(loop))  # start at the node that comes first in the file
    loop = loop[first:] + loop[:first]
    names = [g.node[i].name or f"{g.node[i].op_type}:{g.node[i].output[0]}" for i in loop]
    return " -> ".join(names + names[:1])


def _run_checker(model: onnx.ModelProto, source: str, model_path: Path | None) -> None:
    """onnx.checker at the model's own IR/opset; when it fails, onnxruntime decides."""
    from onnx.external_data_helper import uses_external_data

    # Big initializers (inline or external) are left out of what the checker sees: their sizes and
    # locations were checked by _check_tensors, and serialising them costs seconds per GB.
    light = light_for_checker(model)
    target = light if light is not None else model
    external = any(uses_external_data(t) for t in all_tensors(target))
    try:
        if external and model_path is not None:
            onnx.checker.check_model(str(model_path))  # the path form finds the data files
        elif external:
            return  # cannot check a model whose data was left behind; ort fails later with a clear error
        else:
            if light is None and serialized_size(model) > PROTOBUF_LIMIT:
                return  # too big to hand to the checker in one message; the structure checks above ran
            onnx.checker.check_model(target)
    except (onnx.checker.ValidationError, ValueError) as e:
        if _onnxruntime_loads(model, model_path):
            # Not shown by default: the user's model is fine for onnxruntime, which is what counts.
            log.info("%s: onnx.checker: %s (onnxruntime loads it: continuing)", source, first_line(e))
            return
        raise ModelLoadError(f"{source}: fails onnx.checker: {_checker_message(e)}; {_REEXPORT}") from None


def checker_message(model: onnx.ModelProto) -> str | None:
    """What onnx.checker says about an in-memory model (None: it passes). For callers that must
    tell a problem they introduced from one the input already had (see `_run_checker`)."""
    light = light_for_checker(model)
    if light is None and serialized_size(model) > PROTOBUF_LIMIT:
        return None
    try:
        onnx.checker.check_model(light if light is not None else model)
    except (onnx.checker.ValidationError, ValueError) as e:
        return _checker_message(e)
    return None


# Initializers at least this big are left out of the copy handed to onnx.checker (see below).
_CHECKER_LIGHT_BYTES = 2**20


def light_for_checker(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """A copy of `model` for onnx.checker without its big top-level initializers (inline or external).

    The checker needs the model serialised (and upb's ByteSize() serialises too): for a 550 MB
    model that is two full copies and ~3 s, for checks that never look at weight values. Each
    initializer of >= 1 MiB becomes a graph input of the same name, type and shape instead (valid
    ONNX at any IR version; its data size was checked by `_check_tensors`). None: nothing to drop.
    """
    g = model.graph
    big = {
        t.name
        for t in g.initializer
        if t.data_type in ITEMSIZE
        and math.prod(t.dims) * ITEMSIZE[t.data_type] >= _CHECKER_LIGHT_BYTES
    }
    if not big:
        return None
    light = onnx.ModelProto()
    copy_fields(model, light, {"graph"})
    copy_fields(g, light.graph, {"initializer", "input"})
    light.graph.initializer.extend(t for t in g.initializer if t.name not in big)
    light.graph.input.extend(g.input)
    listed = {i.name for i in g.input}
    for t in g.initializer:
        if t.name in big and t.name not in listed:
            light.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return light


def _checker_message(e: BaseException) -> str:
    text = str(e)
    m = re.search(r"Name:\s*(\S*)\s+OpType:\s*(\S+)", text)
    first = first_line(e)
    if m:
        who = f"node '{m.group(1)}' ({m.group(2)})" if m.group(1) else f"a {m.group(2)} node"
        return f"{who}: {first}"
    return first


def _onnxruntime_loads(model: onnx.ModelProto, model_path: Path | None) -> bool:
    from ..errors import ValidationError
    from ..ort import new_session

    if model_path is None and serialized_size(model) > PROTOBUF_LIMIT:
        return False
    try:
        new_session(str(model_path) if model_path is not None else model.SerializeToString(), optimize=False)
    except (ValidationError, ImportError):
        return False
    return True


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    from onnx.external_data_helper import uses_external_data

    if not any(uses_external_data(t) for t in all_tensors(model)):
        return
    try:
        onnx.load_external_data_for_model(model, str(path.resolve().parent))
    except (OSError, ValueError, onnx.checker.ValidationError) as e:
        raise ModelLoadError(f"{path}: cannot read external data ({first_line(e)}); check the data files") from None
