"""Original FP32 / INT8 against compressed FP32 / INT8: one table of the models side by side.

Every model runs in onnxruntime CPU on the same data and is compared with the first (the FP32
original) by `runtime.validate.compare_outputs`, the project's agreement metric: top-1 agreement for
class-score outputs, cosine and SQNR of the first output; accuracy against the labels when the data
has them; the serialised size; and the latency, all models interleaved (`runtime.bench.interleave_many`,
fixed threads, medians and p90).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from ..config import BenchConfig
from ..data import DataSet
from ..graph.protos import serialized_size
from ..runtime.bench import interleave_many
from ..runtime.session import ort_session
from ..runtime.validate import compare_outputs, data_batches
from .chains import sqnr_db

if TYPE_CHECKING:
    from ..mobile.results import RuntimeColumn

RUNTIME_TIMEOUT = 120.0  # seconds a deploy runtime may take to convert and run one model (mobile's --timeout)


@dataclass(frozen=True)
class ModelRow:
    """One model of the comparison; agreement, cosine and SQNR are of its first output against the
    reference model's (the first row: itself)."""

    name: str
    path: str | None
    size_bytes: int
    top1_agreement: float | None
    cosine: float
    sqnr_db: float
    max_rel_error: float
    accuracy: float | None
    latency_ms: float | None  # median
    latency_p90_ms: float | None


@dataclass(frozen=True)
class FourWayReport:
    """The models side by side (four under `compress --quantize int8 --quantize-compare`, two under
    `quantize`), on `samples` samples of `source`; latency with `threads` threads, `runs` interleaved runs."""

    rows: tuple[ModelRow, ...]
    samples: int
    source: str
    output: str  # the output compared
    threads: int | None
    warmup: int
    runs: int
    # The deploy runtimes besides onnxruntime CPU (--quantize-runtimes: ORT format, MNN, ncnn), one column
    # each: every model converted, run and timed there (mobile/many.py); a model a runtime cannot
    # convert or run is a cell with its failure.
    runtimes: tuple[RuntimeColumn, ...] = ()

    def row(self, name: str) -> ModelRow:
        return next(r for r in self.rows if r.name == name)

    def runtime(self, name: str) -> RuntimeColumn | None:
        return next((c for c in self.runtimes if c.name == name), None)


def deploy_runtimes(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """`--quantize-runtimes`: 'ort-mobile,mnn' -> ('ort-mobile', 'mnn'); 'none' or '' -> (); 'ort' is left out
    (onnxruntime CPU is the table's own latency column); an unknown name is the one-line usage error."""
    from ..mobile.build import parse_runtimes

    if text is None or (isinstance(text, str) and text.strip().lower() in ("", "none")):
        return ()
    return tuple(n for n in parse_runtimes(text) if n != "ort")


def compare_models(models: Sequence[tuple[str, onnx.ModelProto, str | None]], data: DataSet,
                   input_shapes: Mapping[str, tuple[int, ...]], bench: BenchConfig | None = None,
                   seed: int = 0, runtimes: str | Sequence[str] = (), timeout: float = RUNTIME_TIMEOUT,
                   calibration: DataSet | None = None, runtime_samples: int | None = None) -> FourWayReport:
    """`models`: (row name, model, path or None), the reference first; `bench` None: no latency;
    `runtimes`: the deploy runtimes (mobile/adapters.py names) each model is also converted, run and timed in;
    `calibration`: the samples the INT8 models were calibrated on: a runtime with its own quantizer (MNN's
    mnnquant) makes its "X INT8" rows from the "X FP32" models with it, on these samples; `runtime_samples`:
    the samples each deploy runtime runs (None: mobile.many.RUN_SAMPLES)."""
    reference = models[0][1]
    batches = data_batches(data, input_shapes, reference)
    sessions = [ort_session(m.SerializeToString(), name) for name, m, _ in models]
    out_name = sessions[0].get_outputs()[0].name
    outs: list[list[np.ndarray]] = [[] for _ in models]
    for feeds in batches:
        for k, s in enumerate(sessions):
            outs[k].append(np.asarray(s.run([out_name], dict(feeds))[0]))
    firsts = [np.concatenate(o, axis=0) for o in outs]
    count = int(firsts[0].shape[0])
    labels = data.labels[:count] if data.labels is not None else None
    latency: tuple[tuple[float, ...], ...] | None = None
    if bench is not None:
        timed = [ort_session(m.SerializeToString(), name, threads=bench.threads) for name, m, _ in models]
        feed = dict(batches[0])
        feed = {k: v[:1] for k, v in feed.items()} if _dynamic(reference) else feed
        latency = interleave_many([_runner(s, feed) for s in timed], bench.warmup, bench.runs)
    rows = []
    for k, (name, model, path) in enumerate(models):
        c = compare_outputs(out_name, firsts[0], firsts[k])
        acc = None
        if labels is not None and firsts[k].ndim == 2 and firsts[k].shape[1] > 1:
            acc = float(np.mean(np.argmax(firsts[k], axis=1) == labels))
        lat = latency[k] if latency is not None else None
        rows.append(ModelRow(name, path, serialized_size(model), c.top1_agreement, c.cosine,
                             sqnr_db(firsts[0], firsts[k]), c.max_rel_error, acc,
                             float(np.median(lat)) if lat else None, float(np.percentile(lat, 90)) if lat else None))
    columns: tuple[RuntimeColumn, ...] = ()
    runtimes = deploy_runtimes(runtimes)
    if runtimes:
        from ..mobile.many import runtime_columns

        b = bench or BenchConfig()
        batch = 1 if _dynamic(reference) else int(next(iter(batches[0].values())).shape[0])
        names = [name for name, _, _ in models]
        sources = {n: n.replace("INT8", "FP32") for n in names if n.endswith("INT8") and n.replace("INT8", "FP32") in names}
        columns = runtime_columns(runtimes, [(name, m) for name, m, _ in models], data, batch,
                                  b.threads, b.warmup, b.runs, timeout, calibration, sources, runtime_samples)
    return FourWayReport(tuple(rows), count, data.path, out_name, bench.threads if bench else None,
                         bench.warmup if bench else 0, bench.runs if bench else 0, columns)


def _runner(session: Any, feed: dict[str, np.ndarray]) -> Callable[[], object]:
    return lambda: session.run(None, feed)


def _dynamic(model: onnx.ModelProto) -> bool:
    from ..runtime.validate import dynamic_batch

    return dynamic_batch(model)


@dataclass(frozen=True)
class QuantizeRun:
    """`onnx-tucker quantize`: the INT8 step on the uncompressed model and the FP32/INT8 comparison."""

    result: object  # stage.QuantizeResult (typed loosely: compare.py does not import the stage)
    comparison: FourWayReport | None
    input_path: str | None
    output_path: str | None
