"""What a mobile report runs and counts (moved from api.py): the input batches every runtime is fed
(a `DataSet` in whole batches, from the user's data or seeded random samples) and the MACs of a model as it is."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..config import CompressionConfig
from ..data import DataSet, from_batches, load_for_model
from ..errors import UsageError
from ..graph.model import find_layers, infer_shapes
from ..graph.protos import graph_input_names
from ..ops.registry import find_handler, handler_for
from ..runtime.validate import DEFAULT_RANDOM_SAMPLES, random_inputs

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


def mobile_inputs(orig: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], config: CompressionConfig
                  ) -> tuple[DataSet, int]:
    """(the samples every runtime runs, in whole batches; the model's batch size): `config.data` (or the
    `--calibrate` data) when given, else `config.samples` random batches seeded with `config.seed`."""
    names = tuple(graph_input_names(orig))
    batch = shapes[names[0]][0] if shapes[names[0]] else 1
    path = config.data or config.calibrate  # real data whenever given (compress --calibrate --mobile-report)
    if path is None:
        rng = np.random.default_rng(config.seed)
        return from_batches([random_inputs(orig, shapes, rng) for _ in range(config.samples or DEFAULT_RANDOM_SAMPLES)]), batch
    data = load_for_model(path, orig, config.samples, config.preprocess)
    count = data.count // batch
    if count == 0:
        raise UsageError(f"--data {path}: {data.count} sample(s), fewer than the model's batch of {batch}")
    for n in names:
        a = data.inputs[n]
        if tuple(a.shape[1:]) != tuple(shapes[n][1:]):
            raise UsageError(
                f"--data {path}: samples of '{n}' have shape {tuple(a.shape[1:])}, the model expects "
                f"{tuple(shapes[n][1:])}; fix the data (--size, --layout) or --input-shape"
            )
    return data.select(slice(0, count * batch)), batch
