"""Intermediate activations from onnxruntime, batch by batch (nothing is kept between batches)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx

from ..errors import ValidationError
from ..graph.probe import expose_outputs
from ..graph.protos import PROTOBUF_LIMIT, first_line


def _session(model: onnx.ModelProto, what: str):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        if model.ByteSize() > PROTOBUF_LIMIT:
            raise ValidationError(f"the {what} model is over 2 GB: --calibrate does not support such models yet; leave it out")
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except ValidationError:
        raise
    except Exception as e:  # noqa: BLE001 - onnxruntime raises several unrelated exception types
        raise ValidationError(f"the {what} model does not load in onnxruntime ({first_line(e)})") from None


def iter_activations(
    model: onnx.ModelProto, names: Sequence[str], batches: Iterable[Mapping[str, np.ndarray]], what: str = "model"
) -> Iterator[list[np.ndarray]]:
    """For each batch of feeds, the values of the tensors `names` (graph inputs are passed through).

    Only the nodes these tensors depend on run (see `graph.probe.expose_outputs`).
    """
    graph_inputs = {i.name for i in model.graph.input}
    computed = [n for n in names if n not in graph_inputs]
    session = _session(expose_outputs(model, computed), what) if computed else None
    for feeds in batches:
        values: dict[str, np.ndarray] = {}
        if session is not None:
            try:
                outs = session.run(computed, dict(feeds))
            except Exception as e:  # noqa: BLE001
                raise ValidationError(f"onnxruntime failed to run the {what} model ({first_line(e)})") from None
            values = dict(zip(computed, outs, strict=True))
        yield [np.asarray(values[n]) if n in values else np.asarray(feeds[n]) for n in names]
