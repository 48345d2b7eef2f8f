"""Per-layer times of INT8 chains: `--latency-aware`'s timer with each tiny model quantized first.

`OrtInt8LayerTimer` is `runtime.layertime.OrtLayerTimer` (the layer's node alone against its
replacement chain, at the layer's real input shape, seeded random weights, interleaved runs minus one
`run` call's overhead) whose tiny models are quantized as `--quantize int8` quantizes a whole model
(onnxruntime's `quantize_static`: QDQ, per-channel INT8 weights, INT8 activations calibrated on a few
seeded random inputs) before they are timed, so the ratios say what a rank costs in the integer kernels.
`tools/bench_int8_ranks.py` uses it to measure whether ranks rounded to a multiple pay under INT8.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np
import onnx

from ..runtime.layertime import OrtLayerTimer
from ..runtime.session import ort_session
from .stage import _ort_quiet, _quantize

CALIBRATION_BATCHES = 4  # seeded random inputs the tiny models' activation ranges are calibrated on


class OrtInt8LayerTimer(OrtLayerTimer):
    """Times the INT8 (QDQ) form of the layer and of its chain; the Identity model stays float (it is
    the cost of one `run` call on the same float input, which the INT8 models are also fed)."""

    runtime = "ort-int8"

    def session(self, model: onnx.ModelProto, what: str) -> Any:
        if what == "identity":
            return super().session(model, what)
        return ort_session(quantize_tiny(model, self.seed), f"INT8 {what}", threads=self.threads)


def quantize_tiny(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """A tiny timing model (input x of a fixed shape) quantized as `--quantize int8` does, calibrated on
    CALIBRATION_BATCHES seeded standard-normal inputs."""
    shape = tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim)
    rng = np.random.default_rng(seed)
    batches = [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(CALIBRATION_BATCHES)]
    with tempfile.TemporaryDirectory(prefix="onnx-tucker-int8-layer-") as tmp:
        src, dst = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
        onnx.save(model, src)
        with _ort_quiet():
            _quantize(src, dst, batches, "minmax", ())
        return onnx.load(dst)
