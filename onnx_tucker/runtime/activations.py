"""Intermediate activations from onnxruntime, batch by batch.

`ActivationCache` is for a walk through a model's layers in graph order (calibration, rank choice):
it keeps the tensors at the frontier of what has been computed, so the next request runs only the
nodes after them, and the whole walk costs about one pass over the model instead of one prefix per
layer (quadratic in depth). Its memory is the frontier's activations for the whole data set, capped
by `budget_bytes` (over it, the cache is dropped and the next request starts from the inputs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from ..errors import ValidationError
from ..graph.probe import ElementTypes, downstream, extract_segment, tensor_readers
from ..graph.protos import PROTOBUF_LIMIT, first_line
from .session import ort_session


def _session(model: onnx.ModelProto, what: str):  # type: ignore[no-untyped-def]
    if model.ByteSize() > PROTOBUF_LIMIT:
        raise ValidationError(f"the {what} model is over 2 GB: --calibrate does not support such models yet; leave it out")
    return ort_session(model.SerializeToString(), what, quiet=False)  # full optimisation, onnxruntime's threads


class ActivationCache:
    """Values of `model`'s tensors on every batch of `batches`, kept at the computed frontier.

    Computed tensors are kept while a node that has not run yet reads them; asked-for tensors until
    the next request. The model may change between requests (calibration rewrites factor weights in
    place): `invalidate(tensors)` with the outputs of the nodes whose weights changed drops every
    value computed from them, and those nodes run again when needed.
    """

    def __init__(self, model: onnx.ModelProto, batches: Sequence[Mapping[str, np.ndarray]], what: str = "model",
                 budget_bytes: int = 2 << 30) -> None:
        self.model, self.batches, self.what, self.budget = model, list(batches), what, budget_bytes
        self.cache: dict[str, list[np.ndarray]] = {}
        self.inputs = {i.name for i in model.graph.input}
        self.readers = tensor_readers(model)
        self.types = ElementTypes(model)  # one shape inference for the whole walk, not one per segment
        self.done: set[int] = set()  # nodes whose outputs are up to date (cached or no longer needed)
        self.runs = 0  # onnxruntime sessions created (tests and benchmarks read it)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for v in self.cache.values() for a in v)

    def values(self, names: Sequence[str]) -> list[list[np.ndarray]]:
        """Per batch, the values of `names`."""
        missing = [n for n in dict.fromkeys(names) if n not in self.cache and n not in self.inputs]
        fresh: dict[str, list[np.ndarray]] = {}
        if missing:
            known = {n: helper.np_dtype_to_tensor_dtype(v[0].dtype) for n, v in self.cache.items()}
            seg = extract_segment(self.model, missing, known, live_out=True, types=self.types)
            session = _session(seg.model, self.what)
            self.runs += 1
            wanted = [*seg.outputs, *seg.live_out]
            fresh = {n: [] for n in wanted}
            for i, feeds in enumerate(self.batches):
                run_feeds = dict(feeds)
                run_feeds.update({n: self.cache[n][i] for n in seg.fed})
                try:
                    outs = session.run(wanted, run_feeds)
                except Exception as e:  # noqa: BLE001 - onnxruntime raises several unrelated exception types
                    raise ValidationError(f"onnxruntime failed to run the {self.what} model ({first_line(e)})") from None
                for n, o in zip(wanted, outs, strict=True):
                    fresh[n].append(np.asarray(o))
            self.done |= seg.nodes
        self.cache.update(fresh)
        result = [[np.asarray(feeds[n]) if n in self.inputs else self.cache[n][i] for n in names]
                  for i, feeds in enumerate(self.batches)]
        # Keep what a node that has not run yet reads; drop the rest (and everything over the budget).
        self.cache = {n: v for n, v in self.cache.items() if not self.readers.get(n, set()) <= self.done}
        if self.nbytes > self.budget:
            self.cache = {}
            self.done = set()
        return result

    def invalidate(self, tensors: Sequence[str]) -> None:
        """Drop every cached value computed from `tensors` (outputs of nodes that changed)."""
        stale = downstream(self.model, tensors)
        self.cache = {n: v for n, v in self.cache.items() if n not in stale}
        self.done = {i for i in self.done if not any(o in stale for o in self.model.graph.node[i].output)}
