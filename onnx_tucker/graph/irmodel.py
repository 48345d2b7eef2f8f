"""The model as onnx-ir sees it, plus what protobuf carries that onnx-ir does not.

`IRModel` wraps an `onnx_ir.Model` deserialised from a `ModelProto` (no weight is copied: inline
tensors stay the protobuf's, external ones become memory-mapped `ExternalTensor`s) and keeps the
source protobuf. The rewrite splices chains into `IRModel.model` with onnx-ir; `to_proto()` turns it
back into protobuf and restores, from the source, what onnx-ir drops or changes on a round trip
(measured on the onnx light models, the fixture and the CIFAR ResNets; node protos and initializer
bytes come back unchanged):

- model header fields (producer_version, domain, model_version, doc_string written as empty
  strings; opset_import written with an explicit domain), `training_info` and `functions`: taken
  from the source model as they were;
- `sparse_initializer` (onnx-ir drops them) and the graph's name, doc string and metadata: from the
  source graph; sparse `Constant` attributes (onnx-ir cannot load them): the node is handed to
  onnx-ir as a dense placeholder and its own protobuf is put back on the way out;
- value_info: the source's entries for tensors that still exist (onnx-ir adds one per initializer);
- graph inputs and outputs: the source's, minus dropped initializers, plus new initializers as
  inputs for IR < 4 (where every initializer must be listed as an input).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import onnx

if TYPE_CHECKING:  # imported where used: onnx-ir (and sympy with it) costs ~1 s of start-up
    import onnx_ir as ir

from .protos import ITEMSIZE, PROTOBUF_LIMIT, copy_fields, serialized_size

# Marks the dense stand-in for a sparse Constant (restored by `to_proto`).
_SPARSE_MARK = "onnx_tucker.sparse_constant"


def _has_sparse_constant(graph: onnx.GraphProto) -> bool:
    for node in graph.node:
        for a in node.attribute:
            if a.type in (onnx.AttributeProto.SPARSE_TENSOR, onnx.AttributeProto.SPARSE_TENSORS):
                return True
            for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                if _has_sparse_constant(sub):
                    return True
    return False


def _dense_stand_ins(graph: onnx.GraphProto, originals: dict[str, onnx.NodeProto]) -> None:
    """Replace every node with a sparse attribute by a placeholder onnx-ir can load (in a copy)."""
    for k, node in enumerate(graph.node):
        sparse = any(a.type in (onnx.AttributeProto.SPARSE_TENSOR, onnx.AttributeProto.SPARSE_TENSORS)
                     for a in node.attribute)
        if sparse:
            key = f"{len(originals)}"
            kept = onnx.NodeProto()
            kept.CopyFrom(node)
            originals[key] = kept
            stand_in = onnx.NodeProto()
            stand_in.CopyFrom(node)
            del stand_in.attribute[:]
            entry = stand_in.metadata_props.add()
            entry.key, entry.value = _SPARSE_MARK, key
            graph.node[k].CopyFrom(stand_in)
            continue
        for a in node.attribute:
            for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                _dense_stand_ins(sub, originals)


def _restore_sparse(graph: onnx.GraphProto, originals: Mapping[str, onnx.NodeProto]) -> None:
    for node in graph.node:
        key = next((e.value for e in node.metadata_props if e.key == _SPARSE_MARK), None)
        if key is not None:
            node.CopyFrom(originals[key])
            continue
        for a in node.attribute:
            for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                _restore_sparse(sub, originals)


class IRModel:
    """An onnx-ir model and the protobuf it came from (see the module docstring)."""

    def __init__(self, source: onnx.ModelProto, base_dir: str | None = None) -> None:
        import onnx_ir as ir

        self.source = source
        self._sparse: dict[str, onnx.NodeProto] = {}
        proto = source
        if _has_sparse_constant(source.graph):  # rare: a copy with dense stand-ins
            proto = onnx.ModelProto()
            proto.CopyFrom(source)
            _dense_stand_ins(proto.graph, self._sparse)
        self.model: ir.Model = ir.serde.deserialize_model(proto)
        if base_dir is not None:  # lazily loaded weights: external data relative to the input's folder
            ir.external_data.set_base_dir(self.model.graph, base_dir)

    @property
    def graph(self) -> ir.Graph:
        return self.model.graph

    # ---- back to protobuf -----------------------------------------------------------------------

    def to_proto(self, replace: Mapping[str, ir.TensorProtocol] | None = None) -> onnx.ModelProto:
        """The model as protobuf. `replace`: initializer name -> tensor to serialise in its place
        (external references written by the saver, stand-ins for big in-memory tensors)."""
        import onnx_ir as ir

        g = self.graph
        saved: list[tuple[ir.Value, ir.TensorProtocol | None]] = []
        try:
            for name, tensor in (replace or {}).items():
                v = g.initializers[name]
                saved.append((v, v.const_value))
                v.const_value = tensor
            serialized = ir.serde.serialize_model(self.model)
        finally:
            for v, t in saved:
                v.const_value = t
        return self._finish(serialized)

    def _finish(self, serialized: onnx.ModelProto) -> onnx.ModelProto:
        src = self.source
        sg, ng = src.graph, serialized.graph
        if self._sparse:
            _restore_sparse(ng, self._sparse)
        out = onnx.ModelProto()
        copy_fields(src, out, {"graph"})
        copy_fields(sg, out.graph, {"node", "initializer", "input", "value_info"})
        out.graph.node.extend(ng.node)
        out.graph.initializer.extend(ng.initializer)
        present = {t.name for t in ng.initializer} | {t.values.name for t in sg.sparse_initializer}
        for n in ng.node:
            present.update(x for x in n.output if x)
        old_inits = {t.name for t in sg.initializer}
        out.graph.input.extend(i for i in sg.input if i.name not in old_inits or i.name in present)
        if src.ir_version < 4:  # IR 3 requires every initializer to be listed as a graph input too
            out.graph.input.extend(
                onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                for t in ng.initializer
                if t.name not in old_inits
            )
        # value_info of what was dropped (initializers, dead weight producers' outputs) goes with it.
        gone = (old_inits | {x for n in sg.node for x in n.output if x}) - present
        out.graph.value_info.extend(v for v in sg.value_info if v.name not in gone)
        return out

    # ---- sizes and stand-ins for models over 2 GB -------------------------------------------------

    def initializer_tensors(self) -> Iterator[tuple[str, ir.TensorProtocol]]:
        for name, v in self.graph.initializers.items():
            if v.const_value is not None:
                yield name, v.const_value

    def loaded_tensors(self) -> dict[str, ir.TensorProtocol]:
        """In-memory stand-ins for the initializers still in a file (for `to_proto(...)` inline)."""
        import onnx_ir as ir

        return {
            name: ir.Tensor(t.numpy(), name=name)
            for name, t in self.initializer_tensors()
            if isinstance(t, ir.ExternalTensor)
        }

    def data_bytes(self) -> int:
        """Bytes of every top-level initializer's data (external or in memory)."""
        return sum(_nbytes(t) for _, t in self.initializer_tensors())

    def estimated_size(self) -> int:
        """Roughly the serialised size: the initializers' data plus the rest of the source model."""
        rest = serialized_size(_without_initializers(self.source))
        return self.data_bytes() + rest

    def over_protobuf_limit(self) -> bool:
        return self.estimated_size() > PROTOBUF_LIMIT

    def skeleton(self, min_bytes: int = 2**20) -> onnx.ModelProto:
        """The model as protobuf with every initializer of >= `min_bytes` as an external reference
        (memory ones to the location '<in memory>'): shapes and dtypes without the data, for counting,
        checking and sizing a model protobuf cannot hold."""
        import onnx_ir as ir

        stand_ins: dict[str, ir.TensorProtocol] = {}
        for name, t in self.initializer_tensors():
            if isinstance(t, ir.ExternalTensor) or _nbytes(t) < min_bytes:
                continue
            stand_ins[name] = ir.ExternalTensor(
                "<in memory>", offset=0, length=_nbytes(t), dtype=t.dtype, shape=t.shape, name=name  # type: ignore[arg-type]
            )
        return self.to_proto(stand_ins)


def _nbytes(t: ir.TensorProtocol) -> int:
    try:
        return int(t.nbytes)
    except Exception:  # noqa: BLE001 - exotic dtypes: estimate from the element count
        return math.prod(int(d) for d in t.shape) * ITEMSIZE.get(int(t.dtype), 4)  # type: ignore[arg-type,misc]


def _without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    light = onnx.ModelProto()
    copy_fields(model, light, {"graph"})
    copy_fields(model.graph, light.graph, {"initializer"})
    return light
