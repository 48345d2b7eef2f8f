"""Shared value types and small protocols: the vocabulary stages exchange without importing each other.

A leaf: it imports nothing of the package (tests/test_boundaries.py checks it), so any module may
import it. A layer appears here only by duck type (`op_type`, `attrs`, `weight_shape`, `input_shape`,
`weight_dtype`: `ops.layer.Layer`), never by import.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

# Progress callbacks. Stages over layers or samples: (step or layer name, done, total).
StepProgress = Callable[[str, int, int], None]
# Event-shaped progress (fine-tuning): (event name, its fields), e.g. ("epoch", {"stats": ...}).
EventProgress = Callable[[str, Mapping[str, Any]], None]


@dataclass(frozen=True)
class LayerTiming:
    """Medians (ms) of one layer's original node and of its replacement chain, timed interleaved."""

    original_ms: float
    decomposed_ms: float
    runs: int = 0

    @property
    def speedup(self) -> float:
        """original / decomposed: above 1 the decomposition is faster."""
        return self.original_ms / self.decomposed_ms if self.decomposed_ms > 0 else math.inf


class LayerTimer(Protocol):
    """Times `layer` (an `ops.layer.Layer`) as it is against `layer` decomposed as `kind` at `ranks`
    (None: cannot be timed, e.g. its input shape is unknown). `runtime.layertime.OrtLayerTimer` does
    it in onnxruntime; tests inject a deterministic fake."""

    def measure(self, layer: Any, kind: str, ranks: tuple[int, ...]) -> LayerTiming | None: ...


def timing_key(layer: Any, kind: str, ranks: tuple[int, ...]) -> tuple[object, ...]:
    """What decides a timing: the op and its attributes, weight and input shapes, dtype, kind, ranks.
    Identical layers (ResNet stages repeat them) share one measurement."""
    attrs = tuple(sorted((k, repr(v)) for k, v in layer.attrs.items()))
    return (layer.op_type, attrs, layer.weight_shape, layer.input_shape, layer.weight_dtype, kind, tuple(ranks))
