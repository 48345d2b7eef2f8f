"""Intermediate activations from onnxruntime, batch by batch.

`ActivationCache` is for a walk through a model's layers in graph order (calibration, rank choice):
it keeps the tensors at the frontier of what has been computed, so the next request runs only the
nodes after them, and the whole walk costs about one pass over the model instead of one prefix per
layer (quadratic in depth). The frontier is kept in memory up to `budget_bytes`; beyond, each batch's
value goes to a file in a private temporary folder (`TMPDIR`), read back one batch at a time, so the
process's memory is bounded by the budget plus one batch whatever the number of calibration images
and the resolution (ResNet-50 at 224 x 224 with 256 images: a 56 x 56 x 256 frontier is 822 MB).
The folder is removed when the cache is closed (or collected).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping, Sequence

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


class _OnDisk:
    """One batch's value of one tensor, in a file of the spill folder (deleted with this object)."""

    def __init__(self, path: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.shape, self.dtype = path, shape, dtype
        weakref.finalize(self, _remove, path)

    def load(self) -> np.ndarray:
        return np.fromfile(self.path, dtype=self.dtype).reshape(self.shape)


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


Stored = np.ndarray | _OnDisk


class _Spill:
    """The private folder values over the memory budget go to (made on first use)."""

    def __init__(self, what: str) -> None:
        self.what, self.count, self.bytes = what, 0, 0
        self.dir: str | None = None
        self._finalizer: weakref.finalize | None = None

    def put(self, arr: np.ndarray) -> _OnDisk:
        if self.dir is None:
            self.dir = tempfile.mkdtemp(prefix="onnx-tucker-activations-")
            self._finalizer = weakref.finalize(self, shutil.rmtree, self.dir, True)
        folder: str = self.dir
        self.count += 1
        path = os.path.join(folder, f"{self.count}.bin")
        try:
            np.ascontiguousarray(arr).tofile(path)
        except OSError as e:
            _remove(path)
            raise ValidationError(
                f"calibration: cannot write the {self.what} model's activations to {self.dir} ({e.strerror}); "
                "free disk space there, point TMPDIR at a bigger disk, or raise --calibration-memory"
            ) from None
        self.bytes += arr.nbytes
        return _OnDisk(path, tuple(arr.shape), arr.dtype)

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()


def _load(v: Stored) -> np.ndarray:
    return v.load() if isinstance(v, _OnDisk) else v


class BatchValues:
    """Per batch, the values of the asked-for tensors (a list, in the order asked); iterable more than
    once, one batch in memory at a time for the values that were spilled to disk."""

    def __init__(self, names: Sequence[str], columns: list[list[Stored] | None],
                 batches: Sequence[Mapping[str, np.ndarray]]) -> None:
        self.names, self.columns, self.batches = list(names), columns, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[np.ndarray]]:
        for i, feeds in enumerate(self.batches):
            yield [np.asarray(feeds[n]) if col is None else _load(col[i]) for n, col in zip(self.names, self.columns, strict=True)]


class ActivationCache:
    """Values of `model`'s tensors on every batch of `batches`, kept at the computed frontier.

    Computed tensors are kept while a node that has not run yet reads them; asked-for tensors as long
    as the caller holds the `BatchValues`. The model may change between requests (calibration rewrites
    factor weights in place): `invalidate(tensors)` with the outputs of the nodes whose weights changed
    drops every value computed from them, and those nodes run again when needed. Use it as a context
    manager (or call `close`) to remove the spill folder at once.
    """

    def __init__(self, model: onnx.ModelProto, batches: Sequence[Mapping[str, np.ndarray]], what: str = "model",
                 budget_bytes: int = 2 << 30) -> None:
        self.model, self.batches, self.what, self.budget = model, list(batches), what, budget_bytes
        self.cache: dict[str, list[Stored]] = {}
        self.inputs = {i.name for i in model.graph.input}
        self.readers = tensor_readers(model)
        self.types = ElementTypes(model)  # one shape inference for the whole walk, not one per segment
        self.done: set[int] = set()  # nodes whose outputs are up to date (cached or no longer needed)
        self.runs = 0  # onnxruntime sessions created (tests and benchmarks read it)
        self.spill = _Spill(what)
        self.peak_bytes = 0  # most bytes held in memory at once (benchmarks read it)

    def __enter__(self) -> ActivationCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.cache = {}
        self.spill.close()

    @property
    def nbytes(self) -> int:
        """Bytes of cached values held in memory (the spilled ones are on disk)."""
        return sum(a.nbytes for v in self.cache.values() for a in v if isinstance(a, np.ndarray))

    @property
    def spilled_bytes(self) -> int:
        """Bytes written to the spill folder so far."""
        return self.spill.bytes

    def values(self, names: Sequence[str]) -> BatchValues:
        """Per batch, the values of `names` (see `BatchValues`)."""
        missing = [n for n in dict.fromkeys(names) if n not in self.cache and n not in self.inputs]
        if missing:
            known = {n: helper.np_dtype_to_tensor_dtype(v[0].dtype) for n, v in self.cache.items()}
            seg = extract_segment(self.model, missing, known, live_out=True, types=self.types)
            session = _session(seg.model, self.what)
            self.runs += 1
            wanted = [*seg.outputs, *seg.live_out]
            fresh: dict[str, list[Stored]] = {n: [] for n in wanted}
            held = self.nbytes
            for i, feeds in enumerate(self.batches):
                run_feeds = dict(feeds)
                run_feeds.update({n: _load(self.cache[n][i]) for n in seg.fed})
                try:
                    outs = session.run(wanted, run_feeds)
                except Exception as e:  # noqa: BLE001 - onnxruntime raises several unrelated exception types
                    raise ValidationError(f"onnxruntime failed to run the {self.what} model ({first_line(e)})") from None
                for n, o in zip(wanted, outs, strict=True):
                    arr = np.asarray(o)
                    if held + arr.nbytes > self.budget:
                        fresh[n].append(self.spill.put(arr))
                    else:
                        held += arr.nbytes
                        fresh[n].append(arr)
                self.peak_bytes = max(self.peak_bytes, held)
                del outs, run_feeds
            self.done |= seg.nodes
            self.cache.update(fresh)
        result = BatchValues(names, [None if n in self.inputs else self.cache[n] for n in names], self.batches)
        # Keep what a node that has not run yet reads; drop the rest (the result keeps what it needs).
        self.cache = {n: v for n, v in self.cache.items() if not self.readers.get(n, set()) <= self.done}
        return result

    def invalidate(self, tensors: Sequence[str]) -> None:
        """Drop every cached value computed from `tensors` (outputs of nodes that changed)."""
        stale = downstream(self.model, tensors)
        self.cache = {n: v for n, v in self.cache.items() if n not in stale}
        self.done = {i for i in self.done if not any(o in stale for o in self.model.graph.node[i].output)}
