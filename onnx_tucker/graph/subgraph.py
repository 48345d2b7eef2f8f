"""The convertible parts of a model that hold its decomposed layers (subgraph fine-tuning).

When some nodes of a compressed model have no onnx2torch converter, fine-tuning trains only the part
around the decomposed layers instead: a *segment*, a set of top-level nodes that are all convertible,
whose inputs are tensors the rest of the model computes (onnxruntime runs that prefix) and whose outputs
are tensors the original model also has (its values there are the targets).

A segment must be *convex*: no path may leave it through an unconvertible node and come back, or its
inputs would depend on its own outputs. Each node's *level* is the largest number of unconvertible nodes
on a path from the graph inputs to it; levels never fall along a path, and rise past every unconvertible
node, so the convertible nodes of one level that are connected to each other form a convex group, and a
path between two of them never leaves the group. Within a group the segment is the smallest convex part
that holds its decomposed layers' factor nodes: the nodes downstream of one factor node and upstream of
one (the factor nodes included). Decomposed layers separated by an unconvertible node fall in different
groups: one segment each, trained one after another in graph order.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import onnx

from .protos import outer_names_used, subgraphs


@dataclass(frozen=True)
class SegmentSpec:
    """One segment of a model, by top-level node indices (graph order)."""

    nodes: tuple[int, ...]
    inputs: tuple[str, ...]  # the non-constant tensors it reads that it does not compute (graph inputs too)
    outputs: tuple[str, ...]  # the tensors it computes that a node outside it, or a graph output, reads
    factor_nodes: tuple[int, ...]  # its decomposed layers' nodes


def _reads(node: onnx.NodeProto) -> set[str]:
    out = {x for x in node.input if x}
    for sub in subgraphs(node):
        out |= outer_names_used(sub)
    return out


def convertible_segments(model: onnx.ModelProto, bad: Collection[int], factors: Collection[int]) -> list[SegmentSpec]:
    """The segments (module docstring) holding the factor nodes `factors`, in graph order, given the
    indices `bad` of the top-level nodes that cannot be converted. Factor nodes that are themselves in
    `bad` are in no segment."""
    g = model.graph
    nodes = list(g.node)
    bad_set = set(bad)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    reads = [_reads(n) for n in nodes]
    preds = [{producer[x] for x in r if x in producer} for r in reads]
    succs: list[set[int]] = [set() for _ in nodes]
    for i, ps in enumerate(preds):
        for p in ps:
            succs[p].add(i)
    level = [0] * len(nodes)
    for i in range(len(nodes)):  # nodes are in topological order (checked at load)
        level[i] = max((level[p] + (p in bad_set) for p in preds[i]), default=0)
    # Groups: connected components of the convertible nodes of one level.
    group = [-1] * len(nodes)
    groups: list[list[int]] = []
    for start in range(len(nodes)):
        if start in bad_set or group[start] >= 0:
            continue
        k = len(groups)
        members, stack = [], [start]
        group[start] = k
        while stack:
            i = stack.pop()
            members.append(i)
            for j in preds[i] | succs[i]:
                if j not in bad_set and group[j] < 0 and level[j] == level[i]:
                    group[j] = k
                    stack.append(j)
        groups.append(sorted(members))
    # Tensors that do not depend on a graph input (Constant nodes, shapes computed from them) are no inputs of
    # a segment: extraction pulls their producers in, so a segment's inputs all have the batch dim.
    dynamic = {v.name for v in g.input} - {t.name for t in g.initializer}
    for i in range(len(nodes)):
        if reads[i] & dynamic:
            dynamic.update(o for o in nodes[i].output if o)
    factor_set = set(factors) - bad_set
    outputs = {o.name for o in g.output}
    constants = {t.name for t in g.initializer}
    specs = []
    for members in groups:
        fs = [i for i in members if i in factor_set]
        if not fs:
            continue
        inside = set(members)
        down = _closure(fs, succs, inside)
        up = _closure(fs, preds, inside)
        seg = sorted(down & up)
        seg_set = set(seg)
        produced = {o for i in seg for o in nodes[i].output if o}
        ins = [x for i in seg for x in sorted(reads[i]) if x not in produced and x not in constants and x in dynamic]
        read_outside = set(outputs)
        for j in range(len(nodes)):
            if j not in seg_set:
                read_outside |= reads[j]
        outs = [o for i in seg for o in nodes[i].output if o and o in read_outside]
        specs.append(SegmentSpec(tuple(seg), tuple(dict.fromkeys(ins)), tuple(dict.fromkeys(outs)), tuple(fs)))
    return sorted(specs, key=lambda s: s.nodes[0])


def _closure(start: list[int], edges: list[set[int]], inside: set[int]) -> set[int]:
    seen, stack = set(start), list(start)
    while stack:
        i = stack.pop()
        for j in edges[i]:
            if j in inside and j not in seen:
                seen.add(j)
                stack.append(j)
    return seen


def nodes_named(model: onnx.ModelProto, keep: Callable[[str], bool]) -> list[int]:
    """Indices of the top-level nodes whose name `keep` accepts (the rewrite names a decomposed layer's
    nodes `LAYER/tucker_first`, ...: training's `FACTOR_MODULE` says which)."""
    return [i for i, n in enumerate(model.graph.node) if n.name and keep(n.name.replace(".", "/"))]
