"""Per-layer timing in the runtimes `report` measures whole models in (`--latency-runtime`).

`runtime.layertime.OrtLayerTimer` times a layer's node alone against its replacement chain in
onnxruntime CPU. Here the same tiny models (graph/layermodel.py) run elsewhere:

- `OrtFormatLayerTimer` ("ort-mobile"): each tiny model converted to the ORT format by onnxruntime's
  own converter with the settings `report` uses (`adapters.OrtMobileAdapter`: target arm, fixed
  optimisation, so no NCHWc layout transform), then timed in onnxruntime as `report` runs it.
- `ChildLayerTimer` ("mnn"): converted and timed by a runtime adapter in a child process
  (`child.py`, action "time-layers"), so the parent never loads the native runtime and a crash or a
  hang is a message; all the pairs one allocation asks of a layer go to one child (`measure_many`).

Both subtract the cost of one run call (an Identity model on the same input), as the onnxruntime
timer does. `layer_timer_for(runtime, ...)` builds the timer a `--latency-runtime` names.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import UsageError
from ..graph.layermodel import (
    chain_layer_model,
    identity_model,
    original_layer_model,
    timing_dtype,
    timing_input_shape,
)
from ..ops.layer import Layer
from ..ops.registry import handler_for
from ..planning.latency import rank_caps
from ..runtime.layertime import OrtLayerTimer, _net
from ..runtime.session import ort_session
from ..types import LayerTiming
from .adapters import ADAPTERS, load_adapter
from .build import call_child

if TYPE_CHECKING:  # annotations only: the graph layer builds the models
    import onnx

CHILD_TIMEOUT = 300.0  # seconds one child may take to convert and time one layer's pairs


class OrtFormatLayerTimer(OrtLayerTimer):
    """`OrtLayerTimer` on the ORT format (see the module docstring)."""

    runtime = "ort-mobile"

    def __init__(self, opset: int, threads: int = 1, warmup: int = 3, runs: int = 15, seed: int = 0) -> None:
        super().__init__(opset, threads, warmup, runs, seed)
        self._adapter = load_adapter(ADAPTERS["ort-mobile"])

    def session(self, model: onnx.ModelProto, what: str) -> Any:
        with tempfile.TemporaryDirectory(prefix="onnx-tucker-ortm-") as tmp:
            path = os.path.join(tmp, "layer.onnx")
            Path(path).write_bytes(model.SerializeToString())
            root = logging.getLogger()
            handlers = list(root.handlers)
            try:  # onnxruntime's tools configure the root logger and log a line per file
                with contextlib.redirect_stderr(io.StringIO()):
                    files, _ = self._adapter.convert(path, tmp, {})
            finally:
                root.handlers[:] = handlers
            return ort_session(files[0], what, threads=self.threads)  # loaded before the folder goes


class ChildLayerTimer:
    """Times layers in the runtime adapter `runtime` (mobile/adapters.py) in a child process."""

    def __init__(self, runtime: str, opset: int, threads: int = 1, warmup: int = 3, runs: int = 15, seed: int = 0,
                 timeout: float = CHILD_TIMEOUT) -> None:
        self.runtime, self.opset, self.threads, self.warmup, self.runs, self.seed = runtime, opset, threads, warmup, runs, seed
        self.timeout = timeout
        adapter = load_adapter(ADAPTERS[runtime])
        if not adapter.installed():
            raise UsageError(f"--latency-runtime {runtime}: {adapter.label or runtime} is not installed; "
                             f"{adapter.install}, or time in onnxruntime (--latency-runtime ort)")

    def measure(self, layer: Layer, kind: str, ranks: tuple[int, ...]) -> LayerTiming | None:
        return self.measure_many(layer, [(kind, ranks)])[0]

    def measure_many(self, layer: Layer, requests: Sequence[tuple[str, tuple[int, ...]]]) -> list[LayerTiming | None]:
        """Each (kind, ranks) of `layer` against its original, in one child."""
        x_shape, dtype = timing_input_shape(layer), timing_dtype(layer)
        if x_shape is None or dtype is None or layer.weight_shape is None or dtype != np.float32:
            return [None] * len(requests)
        if not requests:
            return []
        with tempfile.TemporaryDirectory(prefix=f"onnx-tucker-{self.runtime}-") as tmp:
            paths = {"identity": identity_model(x_shape, dtype, self.opset),
                     "original": original_layer_model(layer, self.opset, self.seed)}
            for i, (kind, ranks) in enumerate(requests):
                paths[f"chain{i}"] = chain_layer_model(layer, kind, ranks, self.opset, self.seed)
            for name, model in paths.items():
                Path(tmp, f"{name}.onnx").write_bytes(model.SerializeToString())
            files = {name: os.path.join(tmp, f"{name}.onnx") for name in paths}
            work = Path(tmp) / "work"
            work.mkdir()
            job = {"action": "time-layers", "adapter": ADAPTERS[self.runtime], "workdir": str(work),
                   "input_shape": list(x_shape), "seed": self.seed, "threads": self.threads, "warmup": self.warmup,
                   "runs": self.runs, "identity": files["identity"],
                   "pairs": [[files["original"], files[f"chain{i}"]] for i in range(len(requests))],
                   "input_names": ["x"], "output_names": ["y"]}
            result, failure = call_child(job, tmp, self.timeout)
        if result is None:
            raise UsageError(f"--latency-runtime {self.runtime}: timing layer '{layer.layer_id}' failed: {failure}; "
                             "time in onnxruntime instead (--latency-runtime ort)")
        base = float(np.median(result["identity_ms"]))
        return [LayerTiming(_net(tuple(a), base), _net(tuple(b), base), self.runs) for a, b in result["pairs"]]

    def measure_original(self, layer: Layer) -> float | None:
        """The layer's node alone (ms), timed against its cheapest Tucker/SVD chain."""
        kinds = handler_for(layer).kinds(layer)
        if not kinds or layer.weight_shape is None:
            return None
        t = self.measure(layer, kinds[-1], tuple(1 for _ in rank_caps(layer, kinds[-1])))
        return None if t is None else t.original_ms


def layer_timer_for(runtime: str, opset: int, threads: int = 1, seed: int = 0) -> Any:
    """The per-layer timer of `--latency-runtime runtime` (onnxruntime's for "ort")."""
    if runtime == "ort":
        return OrtLayerTimer(opset, threads, seed=seed)
    if runtime == "ort-mobile":
        return OrtFormatLayerTimer(opset, threads, seed=seed)
    if runtime in ADAPTERS:
        return ChildLayerTimer(runtime, opset, threads, seed=seed)
    raise UsageError(f"--latency-runtime {runtime}: not a runtime layers can be timed in; use ort, ort-mobile or mnn")
