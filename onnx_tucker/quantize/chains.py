"""The decomposed chains of a (pre-processed) model, and the signal-to-quantization-noise ratio.

A chain is the nodes the rewrite built for one layer: named after the layer (`L/tucker_first`,
`L/tucker_core`, `L/tucker_last`, `L/svd_first`, ...), or the layer's node itself when it was not
decomposed (the uncompressed reference). Its input is the first node's first input, its output the
last node's first output, as the quantized model names them (onnxruntime's quantizer folds a
following Relu into the chain's last node, whose output then carries the Relu's name).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx


@dataclass(frozen=True)
class Chain:
    name: str  # the layer's name (the original node's)
    nodes: tuple[str, ...]  # node names in graph order
    input: str
    output: str


def chain_nodes(model: onnx.ModelProto, layer: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.name == layer or n.name.startswith(layer + "/")]


def find_chains(model: onnx.ModelProto, layers: Iterable[str]) -> list[Chain]:
    """Every layer of `layers` that has nodes in `model`, as a `Chain` (graph order: the graph is sorted)."""
    out = []
    for layer in layers:
        nodes = chain_nodes(model, layer)
        if nodes and nodes[0].input and nodes[-1].output:
            out.append(Chain(layer, tuple(n.name for n in nodes), nodes[0].input[0], nodes[-1].output[0]))
    return out


def excluded_nodes(model: onnx.ModelProto, chains: Sequence[Chain], pattern: str | None) -> tuple[set[str], set[str]]:
    """(node names to keep in FP32, chain names they cover) for `--quantize-exclude REGEX`: a chain whose
    layer name or any node name matches is kept whole; any other node whose name matches, alone."""
    if pattern is None:
        return set(), set()
    rx = re.compile(pattern)
    nodes: set[str] = set()
    names: set[str] = set()
    for c in chains:
        if rx.search(c.name) or any(rx.search(n) for n in c.nodes):
            nodes |= set(c.nodes)
            names.add(c.name)
    nodes |= {n.name for n in model.graph.node if n.name and rx.search(n.name)}
    return nodes, names


class SqnrSum:
    """Running sums of signal and noise energy; `db` the SQNR 10 log10(sum ref^2 / sum (ref - q)^2)."""

    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0

    def add(self, ref: np.ndarray, new: np.ndarray) -> None:
        a = np.asarray(ref, dtype=np.float64)
        b = np.asarray(new, dtype=np.float64)
        self.signal += float(np.sum(a * a))
        self.noise += float(np.sum((a - b) ** 2))

    @property
    def db(self) -> float:
        if not math.isfinite(self.noise):
            return -math.inf
        if self.noise == 0.0:
            return math.inf
        if self.signal == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.signal / self.noise)


def sqnr_db(ref: np.ndarray, new: np.ndarray) -> float:
    s = SqnrSum()
    s.add(ref, new)
    return s.db
