"""Per-layer timing in onnxruntime, and a whole-model profile to check it against.

`OrtLayerTimer.measure` builds two tiny models (graph/layermodel.py): the layer's node alone and its
replacement chain, both at the layer's real input shape with seeded random weights; runs each in its
own session with fixed threads (sequential execution, full graph optimisation); warms both up and
times them interleaved (`bench.interleave`), reporting medians minus the cost of one `run` call of an
Identity model on the same input (what a layer inside a whole model does not pay; it would otherwise
pull every ratio towards 1). `measure_original` times the node alone. Wrap it in
`planning.latency.CachedLayerTimer` so identical layers are timed once.

`profile_layer_times` runs a whole model with onnxruntime's profiler and returns the median time of
each node, which the api compares (`planning.latency.LatencySummary`) with the sum of the isolated per-layer times: in the
whole model a layer sees warm caches, fused activations and layout reorders that a one-node model
does not, so the two agree only roughly; the report says how roughly.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx

from ..graph.layermodel import (
    chain_layer_model,
    identity_model,
    original_layer_model,
    timing_dtype,
    timing_input_shape,
)
from ..ops.layer import Layer
from ..ops.registry import LAYER_KERNELS as LAYER_KERNELS  # re-exported: the kernels the profile counts
from ..ops.registry import is_layer_kernel
from ..ort import inference_session
from ..types import LayerTiming, timing_key
from .bench import interleave
from .session import ort_session, session_options
from .validate import random_inputs

LAYOUT_KERNELS = ("ReorderInput", "ReorderOutput")


# A floor for a layer's net time: the median minus the call overhead can reach 0 for tiny layers.
MIN_NET_MS = 1e-3


def _net(times: tuple[float, ...], overhead_ms: float) -> float:
    return max(float(np.median(times)) - overhead_ms, MIN_NET_MS)


class OrtLayerTimer:
    """Times a layer against its chain in onnxruntime CPU (see the module docstring)."""

    def __init__(self, opset: int, threads: int = 1, warmup: int = 3, runs: int = 15, seed: int = 0) -> None:
        self.opset, self.threads, self.warmup, self.runs, self.seed = opset, threads, warmup, runs, seed
        self._originals: dict[tuple[object, ...], float] = {}
        self._overheads: dict[tuple[object, ...], float] = {}

    runtime = "ort"

    def session(self, model: onnx.ModelProto, what: str) -> Any:
        """The session one tiny model is timed in (subclasses: another form of the same model)."""
        return ort_session(model, what, threads=self.threads)

    def measure(self, layer: Layer, kind: str, ranks: tuple[int, ...]) -> LayerTiming | None:
        x_shape, dtype = timing_input_shape(layer), timing_dtype(layer)
        if x_shape is None or dtype is None or layer.weight_shape is None:
            return None
        s0 = self.session(original_layer_model(layer, self.opset, self.seed), f"one-node '{layer.layer_id}'")
        s1 = self.session(chain_layer_model(layer, kind, ranks, self.opset, self.seed), f"chain of '{layer.layer_id}'")
        x = np.random.default_rng(self.seed).standard_normal(x_shape, dtype=np.float32).astype(dtype)
        feeds = {"x": x}
        t0, t1 = interleave(lambda: s0.run(None, feeds), lambda: s1.run(None, feeds), self.warmup, self.runs)
        base = self.call_overhead(x_shape, dtype)
        return LayerTiming(_net(t0, base), _net(t1, base), self.runs)

    def call_overhead(self, x_shape: tuple[int, ...], dtype: np.dtype) -> float:
        """Median ms of running an Identity model on this input: the cost of one `run` call (binding,
        copies, dispatch) that a layer inside a whole model does not pay; subtracted from both times."""
        key = (x_shape, dtype.str)
        if key not in self._overheads:
            sess = self.session(identity_model(x_shape, dtype, self.opset), "identity")
            feeds = {"x": np.zeros(x_shape, dtype)}
            t, _ = interleave(lambda: sess.run(None, feeds), lambda: None, self.warmup, self.runs)
            self._overheads[key] = float(np.median(t))
        return self._overheads[key]

    def measure_original(self, layer: Layer) -> float | None:
        """Median ms of the layer's node alone (for the whole-model profile check), cached per shape."""
        x_shape, dtype = timing_input_shape(layer), timing_dtype(layer)
        if x_shape is None or dtype is None or layer.weight_shape is None:
            return None
        key = timing_key(layer, "original", ())
        if key not in self._originals:
            sess = self.session(original_layer_model(layer, self.opset, self.seed), f"one-node '{layer.layer_id}'")
            feeds = {"x": np.random.default_rng(self.seed).standard_normal(x_shape, dtype=np.float32).astype(dtype)}
            t0, _ = interleave(lambda: sess.run(None, feeds), lambda: None, self.warmup, self.runs)
            self._originals[key] = _net(t0, self.call_overhead(x_shape, dtype))
        return self._originals[key]


def profile_layer_times(
    model: onnx.ModelProto | str | os.PathLike[str], reference: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]],
    threads: int = 1, runs: int = 10, seed: int = 0,
) -> dict[str, tuple[str, float]]:
    """Node name -> (op type, median ms per run) from onnxruntime's profiler over `runs` runs."""

    with tempfile.TemporaryDirectory(prefix="onnx-tucker-profile-") as tmp:
        opts = session_options(threads)
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "profile")
        src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
        sess = inference_session(src, opts)
        feeds = random_inputs(reference, input_shapes, np.random.default_rng(seed))
        for _ in range(runs):
            sess.run(None, feeds)
        path = sess.end_profiling()
        with open(path, encoding="utf-8") as f:
            events = json.load(f)
    per_node: dict[str, list[float]] = defaultdict(list)
    ops: dict[str, str] = {}
    for e in events:
        name = str(e.get("name", ""))
        if e.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        node = name[: -len("_kernel_time")]
        per_node[node].append(float(e.get("dur", 0)) / 1e3)
        ops[node] = str(e.get("args", {}).get("op_name", ""))
    return {n: (ops[n], float(np.median(ts))) for n, ts in per_node.items()}


def profiled_layer_ms(profile: Mapping[str, tuple[str, float]]) -> tuple[float, float]:
    """(ms in the whole model's Conv/Gemm/MatMul kernels, ms in its NCHWc layout reorders) per run."""
    layers = sum(ms for op, ms in profile.values() if is_layer_kernel(op))
    layout = sum(ms for op, ms in profile.values() if op in LAYOUT_KERNELS)
    return float(layers), float(layout)
