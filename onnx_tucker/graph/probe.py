"""What calibration needs from the protobuf: expose intermediate tensors as outputs, find a replaced
node's factor chain, and write refitted factor values back into the rewritten model.

Everything leaving this module is names and numpy arrays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .optypes import is_op
from .protos import copy_fields, outer_names_used, subgraphs


def expose_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of `model` whose only outputs are the tensors `names`, keeping only the nodes they need.

    Element types come from the graph's value_info / inputs / outputs / initializers when known,
    else from shape inference, else float (onnxruntime needs an element type per output).
    """
    return extract_segment(model, names, {}).model


@dataclass(frozen=True)
class Segment:
    """A model computing `outputs` (then `live_out`) from the graph's inputs and some known tensors."""

    model: onnx.ModelProto
    outputs: tuple[str, ...]  # what was asked for
    live_out: tuple[str, ...]  # tensors computed here that nodes outside the segment read (worth keeping)
    fed: tuple[str, ...]  # the known tensors the segment reads, now graph inputs
    nodes: frozenset[int]  # indices of the top-level nodes it runs


def extract_segment(model: onnx.ModelProto, names: Sequence[str], known: Mapping[str, int],
                    live_out: bool = False, types: ElementTypes | None = None) -> Segment:
    """The nodes of `model` needed for the tensors `names`, stopping at the tensors `known` (name ->
    ONNX element type), which become graph inputs. With `live_out`, the segment also outputs every
    tensor it computes that a node outside it (or a graph output) reads, so the next segment can start
    from them instead of recomputing the prefix (`runtime.activations.ActivationCache`). `types`: the
    model's `ElementTypes`, kept by a caller extracting many segments (shape inference runs once)."""
    g = model.graph
    producer: dict[str, int] = {}
    for i, node in enumerate(g.node):
        for o in node.output:
            producer[o] = i
    needed: set[int] = set()
    fed: list[str] = []
    stack = list(names)
    seen: set[str] = set()
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        if t in known:
            fed.append(t)
            continue
        found = producer.get(t)
        if found is None or found in needed:
            continue
        needed.add(found)
        node = g.node[found]
        stack.extend(x for x in node.input if x)
        for sub in subgraphs(node):
            stack.extend(outer_names_used(sub))
    outputs = list(dict.fromkeys(names))
    extra: list[str] = []
    if live_out:
        read_outside: set[str] = {o.name for o in g.output}
        for i, node in enumerate(g.node):
            if i not in needed:
                read_outside.update(node.input)
                for sub in subgraphs(node):
                    read_outside.update(outer_names_used(sub))
        extra = [o for i in sorted(needed) for o in g.node[i].output
                 if o and o in read_outside and o not in outputs and o not in known]
    etypes = (types or ElementTypes(model)).of([*outputs, *extra])
    out = onnx.ModelProto()
    copy_fields(model, out, {"graph"})
    # Only the initializers the segment reads: copying (and serialising for onnxruntime) every weight of
    # the model per segment made a layer-by-layer walk quadratic in the model's size.
    copy_fields(g, out.graph, {"node", "output", "initializer", "value_info", "input"})
    reads: set[str] = set()
    for i in needed:
        reads.update(g.node[i].input)
        for sub in subgraphs(g.node[i]):
            reads |= outer_names_used(sub)
    out.graph.initializer.extend(t for t in g.initializer if t.name in reads)
    weights = {t.name for t in g.initializer}  # IR < 4 lists them as graph inputs too
    out.graph.input.extend(v for v in g.input if v.name not in weights or v.name in reads)
    out.graph.value_info.extend(v for v in g.value_info if v.name in seen)
    out.graph.input.extend(helper.make_tensor_value_info(n, known[n], None) for n in fed)
    out.graph.node.extend(node for i, node in enumerate(g.node) if i in needed)
    out.graph.output.extend(helper.make_tensor_value_info(n, etypes.get(n, onnx.TensorProto.FLOAT), None)
                            for n in [*outputs, *extra])
    return Segment(out, tuple(outputs), tuple(extra), tuple(fed), frozenset(needed))


def prepare_for_torch(seg: Segment) -> tuple[list[str], dict[str, tuple[str, ...]]]:
    """Ready `seg.model` (in place) for onnx2torch and for writing trained weights back: the graph inputs
    it does not read are dropped, and its nodes are renamed `n0`, `n1`, ... (onnx2torch names its modules
    after the nodes, so a module names the node it came from). Returns the data inputs in the order the
    converted module takes them, and per (renamed) node its inputs that are initializers ('' for the others,
    by position: a Conv's weight is [1], its bias [2])."""
    g = seg.model.graph
    reads = {x for node in g.node for x in node.input}
    inits = {t.name for t in g.initializer}
    keep = [v for v in g.input if v.name in reads or v.name in inits]
    del g.input[:]
    g.input.extend(keep)
    feeds = [v.name for v in g.input if v.name not in inits]
    owned: dict[str, tuple[str, ...]] = {}
    for i, node in enumerate(g.node):
        node.name = f"n{i}"
        owned[node.name] = tuple(x if x in inits else "" for x in node.input)
    return feeds, owned


def set_input_dims(model: onnx.ModelProto, dims: Mapping[str, Sequence[int]]) -> None:
    """Declare the shapes of graph inputs (a segment's fed tensors come without): the batch dim a symbol,
    the others fixed; the torch-readiness pass needs them (an auto_pad conv's explicit pads, a BN's rank)."""
    for v in model.graph.input:
        if v.name in dims:
            shape = v.type.tensor_type.shape.dim
            del shape[:]
            for axis, d in enumerate(dims[v.name]):
                if axis:
                    shape.add().dim_value = int(d)
                else:
                    shape.add().dim_param = "N"


def tensor_readers(model: onnx.ModelProto) -> dict[str, set[int]]:
    """Tensor name -> indices of the top-level nodes that read it (subgraph reads count for their node);
    graph outputs are read by index -1."""
    readers: dict[str, set[int]] = {o.name: {-1} for o in model.graph.output}
    for i, node in enumerate(model.graph.node):
        reads = set(node.input)
        for sub in subgraphs(node):
            reads |= outer_names_used(sub)
        for x in reads:
            if x:
                readers.setdefault(x, set()).add(i)
    return readers


def downstream(model: onnx.ModelProto, tensors: Sequence[str]) -> set[str]:
    """Every tensor computed (transitively) from `tensors`, themselves included."""
    g = model.graph
    found = set(tensors)
    for node in g.node:  # nodes are in topological order (checked at load)
        reads = set(node.input)
        for sub in subgraphs(node):
            reads |= outer_names_used(sub)
        if reads & found:
            found.update(o for o in node.output if o)
    return found


class ElementTypes:
    """Tensor name -> ONNX element type: from the graph's value_info / inputs / outputs / initializers,
    and where a name is missing there, from whole-model shape inference, run at most once. Element
    types do not change when initializer values are rewritten in place (calibration)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.model = model
        self.known = {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.input, *g.output)}
        self.known.update({t.name: t.data_type for t in g.initializer})
        self._merged: dict[str, int] | None = None

    def _with_inferred(self) -> dict[str, int]:
        if self._merged is None:
            merged = dict(self.known)
            try:
                inferred = onnx.shape_inference.infer_shapes(self.model)
                merged.update({v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info})
            except Exception:  # noqa: BLE001 - inference is a convenience here; float is the fallback
                pass
            self._merged = merged
        return self._merged

    def of(self, names: Sequence[str]) -> dict[str, int]:
        known = self.known if all(self.known.get(n) for n in names) else self._with_inferred()
        return {n: known[n] for n in names if known.get(n)}


@dataclass(frozen=True)
class FactorChain:
    """The nodes that replaced one layer, read back from the rewritten model."""

    input: str  # the chain's (= the original node's) data input
    weights: tuple[str, ...]  # initializer names, in execution order
    bias: str | None  # the last node's bias input (Conv B / Gemm C), if any
    beta: float  # Gemm's beta on the bias (1 for Conv)
    problem: str | None  # why the factors cannot be written back (shared, not initializers), else None
    produced: tuple[str, ...] = ()  # the chain nodes' outputs (what changes when the factors do)
    last_input: str = ""  # what the last node reads (the refit of a pointwise last factor regresses on it)


def factor_chain(model: onnx.ModelProto, output: str, length: int) -> FactorChain | None:
    """The chain of `length` nodes ending in the node that writes `output` (None when not found)."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    uses: dict[str, int] = {}
    for n in g.node:
        for x in n.input:
            uses[x] = uses.get(x, 0) + 1
    nodes = []
    t = output
    for _ in range(length):
        node = producer.get(t)
        if node is None or len(node.input) < 2:
            return None
        nodes.append(node)
        t = node.input[0]
    nodes.reverse()
    weights = tuple(n.input[1] for n in nodes)
    last = nodes[-1]
    bias = last.input[2] if len(last.input) > 2 and last.input[2] else None
    # A Gemm's C is scaled by beta; no other chain node has the attribute (beta 1).
    beta = float(next((a.f for a in last.attribute if a.name == "beta"), 1.0))
    problem = None
    for w in weights:
        if w not in inits:
            problem = f"factor '{w}' is not an initializer"
        elif uses.get(w, 0) != 1:
            problem = f"factor '{w}' is shared by {uses[w]} nodes"
    if bias is not None and problem is None:
        if bias not in inits:
            problem = f"bias '{bias}' is not an initializer"
        elif uses.get(bias, 0) != 1:
            problem = f"bias '{bias}' is shared by {uses[bias]} nodes"
    return FactorChain(t, weights, bias, beta, problem, tuple(o for n in nodes for o in n.output if o), last.input[0])


def read_initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise KeyError(name)


def write_initializers(model: onnx.ModelProto, values: Mapping[str, np.ndarray]) -> None:
    """Replace the values of initializers in place, keeping each one's name, dtype and shape."""
    todo = dict(values)
    for i, t in enumerate(model.graph.initializer):
        if t.name not in todo:
            continue
        arr = np.asarray(todo.pop(t.name))
        shape = tuple(t.dims)
        if arr.size != int(np.prod(shape)):
            raise ValueError(f"initializer '{t.name}': {arr.shape} does not fit {shape}")
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        model.graph.initializer[i].CopyFrom(
            numpy_helper.from_array(np.ascontiguousarray(arr.reshape(shape).astype(dtype)), t.name)
        )
    if todo:
        raise KeyError(f"no initializer named {sorted(todo)[0]!r}")


def node_io(model: onnx.ModelProto, node_index: int) -> tuple[str, str]:
    """(data input, first output) of top-level node `node_index`."""
    node = model.graph.node[node_index]
    return node.input[0], node.output[0]


def residual_partner(model: onnx.ModelProto, tensor: str) -> str | None:
    """The other input of the `Add` that is the only reader of `tensor` (None otherwise, or when that
    input is a constant or the tensor is a graph output)."""
    if tensor in {o.name for o in model.graph.output}:
        return None
    readers = [n for n in model.graph.node if tensor in n.input]
    if len(readers) != 1 or not is_op(readers[0], "Add") or readers[0].domain not in ("", "ai.onnx"):
        return None
    ins = list(readers[0].input)
    if len(ins) != 2 or ins.count(tensor) != 1:
        return None
    other = ins[1] if ins[0] == tensor else ins[0]
    constants = {t.name for t in model.graph.initializer}
    constants |= {n.output[0] for n in model.graph.node if is_op(n, "Constant")}
    return None if other in constants else other
