"""Constant folding of the subgraphs that compute layer weights (protobuf; used by `graph` and `rewrite`).

Exporters rarely hand a Conv its kernel as a plain initializer: Caffe2 conversions write
`ConstantOfShape`, PyTorch writes `Identity` for tied weights and `Transpose` / `Reshape` for
re-laid-out ones, mixed-precision exports `Cast`, weight norm a few `Mul` / `Div` / `ReduceL2`.
A tensor is *foldable* when every path back from it ends in an initializer or a `Constant` node and
passes only through deterministic default-domain ops without subgraphs; such a tensor is
evaluated here (onnx's ReferenceEvaluator, onnxruntime as a fallback) and treated as a constant
weight. Nothing in the graph is changed by folding itself: after a rewrite, `dead_weight_producers`
names the nodes and initializers of the replaced weights' subgraphs that nobody reads any more,
and only those are dropped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from .optypes import is_op, is_quantize, is_random
from .protos import DEFAULT_DOMAINS, outer_scope_reads


@dataclass(frozen=True)
class Origin:
    """How a tensor of the top-level graph is produced, as far as folding cares."""

    reason: str | None  # None: constant (initializer, Constant node or foldable subgraph)
    nodes: tuple[int, ...] = ()  # indices in graph.node of the producing subgraph, in graph order
    initializers: tuple[str, ...] = ()  # the initializers it reads

    @property
    def constant(self) -> bool:
        return self.reason is None

    @property
    def folded(self) -> bool:
        """Computed by nodes (a lone Constant node included), not a plain initializer."""
        return self.reason is None and bool(self.nodes)


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _node_label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} '{node.name or node.output[0]}'"


class WeightFolder:
    """Origins and values of tensors computed from constants only. One per model; caches origins."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        g = model.graph
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in g.initializer}
        self.producer: dict[str, int] = {}
        for i, node in enumerate(g.node):
            for out in node.output:
                if out:
                    self.producer[out] = i
        self.sparse = {t.values.name for t in g.sparse_initializer}
        self.graph_inputs = {i.name for i in g.input} - set(self.initializers) - self.sparse
        self._origins: dict[str, Origin] = {}
        self._meta: dict[str, tuple[tuple[int, ...], int]] = {}

    # -- analysis -------------------------------------------------------------------------------------

    def origin(self, name: str) -> Origin:
        """Iterative post-order walk (a run-time weight may sit behind thousands of nodes)."""
        if name in self._origins:
            return self._origins[name]
        nodes = self.model.graph.node
        stack: list[tuple[str, bool]] = [(name, False)]
        visiting: set[str] = set()
        while stack:
            cur, expanded = stack.pop()
            if cur in self._origins:
                continue
            if not expanded and cur in visiting:
                self._origins[cur] = Origin(f"on a cycle of the graph (through '{cur}')")
                continue
            own = self._own_reason(cur)
            if own is not None or cur in self.initializers:
                self._origins[cur] = Origin(own) if own is not None else Origin(None, (), (cur,))
                continue
            node = nodes[self.producer[cur]]
            deps = [x for x in node.input if x]
            if not expanded:
                visiting.add(cur)
                stack.append((cur, True))
                stack.extend((d, False) for d in deps if d not in self._origins)
                continue
            failed = next((self._origins[d] for d in deps if not self._origins[d].constant), None)
            if failed is not None:
                result = Origin(failed.reason)
            else:
                idx = {self.producer[cur]}
                inits: set[str] = set()
                for d in deps:
                    idx.update(self._origins[d].nodes)
                    inits.update(self._origins[d].initializers)
                result = Origin(None, tuple(sorted(idx)), tuple(sorted(inits)))
            # Every output of a multi-output node shares its verdict.
            self._origins[cur] = result
        return self._origins[name]

    def _own_reason(self, name: str) -> str | None:
        """Why `name` is not constant judging by itself and its producer only (None: look further)."""
        if name in self.initializers:
            return None
        if name in self.sparse:
            return "a sparse initializer (sparse weights are left alone)"
        if name in self.graph_inputs:
            return f"computed at run time from graph input '{name}'"
        if name not in self.producer:
            return "produced by no node of the top-level graph (an undefined name)"
        node = self.model.graph.node[self.producer[name]]
        if node.domain not in DEFAULT_DOMAINS:
            return f"computed by custom-domain op {node.domain}.{node.op_type} '{node.name or node.output[0]}'"
        if is_quantize(node):
            return f"dequantized at run time by {_node_label(node)} (quantized weights are left alone)"
        if is_random(node):
            return f"computed by the non-deterministic op {_node_label(node)}"
        if _has_subgraph(node):
            return f"computed inside the control-flow op {_node_label(node)}"
        if is_op(node, "Constant") and any(a.name == "sparse_value" for a in node.attribute):
            return f"a sparse tensor ({_node_label(node)}; sparse weights are left alone)"
        return None

    # -- evaluation -----------------------------------------------------------------------------------

    def evaluate(self, names: Iterable[str]) -> dict[str, np.ndarray]:
        """Values of foldable tensors that are not initializers, in one evaluation of their union."""
        names = list(dict.fromkeys(names))
        origins = [self.origin(n) for n in names]
        bad = next((n for n, o in zip(names, origins, strict=True) if not o.constant), None)
        if bad is not None:
            raise ValueError(f"'{bad}' is not constant: {self.origin(bad).reason}")
        out: dict[str, np.ndarray] = {}
        todo = []
        for n, o in zip(names, origins, strict=True):
            if o.nodes:
                todo.append(n)
            else:
                out[n] = onnx.numpy_helper.to_array(self.initializers[n])
        if todo:
            out.update(self._run(todo))
        for n, v in out.items():
            self._meta[n] = (tuple(int(d) for d in np.shape(v)), helper.np_dtype_to_tensor_dtype(np.asarray(v).dtype))
        return out

    def value(self, name: str) -> np.ndarray:
        return self.evaluate([name])[name]

    def meta(self, name: str) -> tuple[tuple[int, ...], int]:
        """(shape, TensorProto dtype) of a constant tensor; evaluates it once, keeps only the metadata."""
        if name in self.initializers:
            t = self.initializers[name]
            return tuple(int(d) for d in t.dims), int(t.data_type)
        if name not in self._meta:
            self.evaluate([name])
        return self._meta[name]

    def _extract(self, names: list[str]) -> onnx.ModelProto:
        g = self.model.graph
        idx: set[int] = set()
        inits: set[str] = set()
        for n in names:
            o = self.origin(n)
            idx.update(o.nodes)
            inits.update(o.initializers)
        graph = onnx.GraphProto(name="weight_subgraph")
        graph.node.extend(g.node[i] for i in sorted(idx))
        graph.initializer.extend(self.initializers[n] for n in sorted(inits))
        graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
        m = helper.make_model(graph, opset_imports=list(self.model.opset_import))
        m.ir_version = max(self.model.ir_version, 4)  # initializers need not be listed as inputs
        return m

    def _run(self, names: list[str]) -> dict[str, np.ndarray]:
        m = self._extract(names)
        try:
            from onnx.reference import ReferenceEvaluator

            results = ReferenceEvaluator(m).run(None, {})
        except Exception as first:  # noqa: BLE001 - the reference runtime lacks a few ops: try onnxruntime
            try:
                results = _run_onnxruntime(m, names)
            except Exception:  # noqa: BLE001
                msg = str(first).strip().splitlines()[0] if str(first).strip() else type(first).__name__
                raise FoldError(f"could not evaluate the constant subgraph computing '{names[0]}' ({msg})") from None
        return {n: np.asarray(v) for n, v in zip(names, results, strict=True)}


class FoldError(RuntimeError):
    """A constant-only weight subgraph could not be evaluated (the layer is skipped with this reason)."""


def _run_onnxruntime(m: onnx.ModelProto, names: list[str]) -> list[np.ndarray]:
    from ..ort import new_session

    return list(new_session(m.SerializeToString(), "constant subgraph").run(names, {}))


FLOAT_TYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
)


def float_parameter_count(model: onnx.ModelProto, folder: WeightFolder | None = None) -> int:
    """Floating-point parameters as the graph reads them: every constant tensor (initializer, Constant
    or folded result) that a run-time node, a subgraph or a graph output reads, counted once.

    So `ConstantOfShape` weights count at their materialised size, and `W -> Cast -> Conv` counts W
    once (as the Cast's result).
    """
    folder = folder or WeightFolder(model)
    g = model.graph
    read: set[str] = {o.name for o in g.output} | outer_scope_reads(g)
    for node in g.node:
        outs = [o for o in node.output if o]
        if outs and folder.origin(outs[0]).constant:
            continue  # part of a constant subgraph: its result is counted where it is read
        read.update(x for x in node.input if x)
    total = 0
    for name in read:
        if not folder.origin(name).constant:
            continue
        try:
            shape, dtype = folder.meta(name)
        except FoldError:
            continue
        if dtype in FLOAT_TYPES:
            total += int(np.prod(shape, dtype=np.int64))
    return total
