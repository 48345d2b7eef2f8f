"""What a mobile report runs and counts (moved from api.py): the input batches every runtime is fed
(`Inputs`, from the user's data or seeded random samples) and the MACs of a model as it is."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..config import CompressionConfig
from ..errors import UsageError
from ..graph.model import find_layers, infer_shapes
from ..graph.protos import graph_input_names
from ..ops.registry import find_handler, handler_for
from ..runtime.validate import DEFAULT_RANDOM_SAMPLES, load_validation_data, random_inputs
from .build import Inputs

if TYPE_CHECKING:
    import onnx


def model_macs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> int:
    """MACs of every Conv / ConvTranspose / Gemm / MatMul as the model is (batch as in `shapes`)."""
    layers = find_layers(model, infer_shapes(model, shapes))
    total = 0
    for lay in layers:
        if find_handler(lay.op_type) is not None and lay.weight_shape is not None:
            macs = handler_for(lay).cost(lay, "original")[1]
            total += macs or 0
    return total


def mobile_inputs(orig: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], config: CompressionConfig):  # type: ignore[no-untyped-def]
    """The samples every runtime runs, stacked in batches of the model's batch size: `config.data` (or the
    `--calibrate` data) when given, else `config.samples` random batches seeded with `config.seed`."""
    names = tuple(graph_input_names(orig))
    outputs = tuple(o.name for o in orig.graph.output)
    path = config.data or config.calibrate  # real data whenever given (compress --calibrate --mobile-report)
    if path is None:
        rng = np.random.default_rng(config.seed)
        batches = [random_inputs(orig, shapes, rng) for _ in range(config.samples or DEFAULT_RANDOM_SAMPLES)]
        return Inputs(names, outputs, {n: np.stack([b[n] for b in batches]) for n in names}, None)
    data = load_validation_data(path, orig, config.samples, config.preprocess)
    batch = shapes[names[0]][0] if shapes[names[0]] else 1
    count = data.count // batch
    if count == 0:
        raise UsageError(f"--data {path}: {data.count} sample(s), fewer than the model's batch of {batch}")
    stacked = {}
    for n in names:
        a = np.asarray(data.inputs[n])
        if tuple(a.shape[1:]) != tuple(shapes[n][1:]):
            raise UsageError(
                f"--data {path}: samples of '{n}' have shape {tuple(a.shape[1:])}, the model expects "
                f"{tuple(shapes[n][1:])}; fix the data (--size, --layout) or --input-shape"
            )
        stacked[n] = a[: count * batch].reshape(count, batch, *a.shape[1:])
    labels = None if data.labels is None else np.asarray(data.labels)[: count * batch]
    return Inputs(names, outputs, stacked, labels)
