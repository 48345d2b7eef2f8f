"""Several models in each mobile runtime, side by side: the deploy-runtime columns of the four-way INT8
comparison (issue 18).

`runtime_columns` writes the models to a temporary folder, then per runtime converts and runs each in
its own child process (`child.py`, action `model`, with a timeout), compares its first output with the
reference model (the first) in onnxruntime CPU, and times every model that ran in one more child, all
interleaved (`time-many`). A converter that aborts on a QDQ model (MNN 3.6 does), a run that crashes or
a timing that hangs is that cell's `failure`: a finding, never the end of the comparison.

A runtime with its own INT8 quantizer (MNN: `mnnquant`) does not get the QDQ files for its INT8 rows:
the child converts the matching FP32 model and quantizes it with that tool on the calibration samples
onnxruntime's quantizer used; the cell names the quantizer (`RuntimeCell.quantizer`), and a crash or
hang of the quantizer is the cell's failure at step `quantize`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..data import DataSet
from ..runtime.validate import compare_outputs
from .adapters import ADAPTERS, load_adapter
from .build import call_child, reference_outputs
from .results import RuntimeCell, RuntimeColumn

RUN_SAMPLES = 32  # samples each runtime runs to measure its agreement (batch `batch`, one run each)


def runtime_columns(runtimes: Sequence[str], models: Sequence[tuple[str, Any]], data: DataSet, batch: int,
                    threads: int, warmup: int, runs: int, timeout: float, calibration: DataSet | None = None,
                    int8_sources: Mapping[str, str] | None = None, samples: int | None = None) -> tuple[RuntimeColumn, ...]:
    """`models`: (row name, onnx.ModelProto), the reference first; `data`: its first whole batches of
    `batch` samples (up to `samples`, default RUN_SAMPLES) are run in each runtime, the first batch timed.

    `int8_sources`: INT8 row -> its FP32 row ("original INT8" -> "original FP32"); in a runtime with its
    own quantizer (`Adapter.quantizer`: MNN's mnnquant) that INT8 row is the FP32 row's model quantized by
    that tool on `calibration` (the samples onnxruntime's quantizer used), not the QDQ model."""
    import onnx  # the graph layer's models arrive as protos; the child processes read files

    count = max(batch, min(data.count, samples or RUN_SAMPLES) // batch * batch)
    inputs = data.select(slice(0, count))
    with tempfile.TemporaryDirectory(prefix="onnx-tucker-many-") as folder:
        paths = []
        for k, (_, model) in enumerate(models):
            paths.append(os.path.join(folder, f"model{k}.onnx"))
            onnx.save(model, paths[-1])
        out_names = [o.name for o in models[0][1].graph.output]
        ref = reference_outputs(paths[0], inputs, batch, out_names[:1], "reference")[0]
        input_npz = os.path.join(folder, "inputs.npz")
        stacked: dict[str, Any] = inputs.stacked(batch)
        np.savez(input_npz, **stacked)
        shapes = {k: [batch, *v.shape[1:]] for k, v in inputs.inputs.items()}  # what the runtimes are fed
        own = _OwnInt8(None, {}, inputs.labels)
        rows = [n for n, _ in models]
        if calibration is not None and int8_sources:
            cal_npz = os.path.join(folder, "calibration.npz")
            cal_arrays: dict[str, Any] = {k: np.asarray(v) for k, v in calibration.inputs.items()}
            np.savez(cal_npz, **cal_arrays)
            own = _OwnInt8(cal_npz, {r: rows.index(s) for r, s in int8_sources.items() if r in rows and s in rows},
                           inputs.labels, calibration.count)
        return tuple(_column(name, rows, paths, inputs.names, out_names, input_npz, shapes, ref,
                             threads, warmup, runs, timeout, folder, own) for name in runtimes)


@dataclass(frozen=True)
class _OwnInt8:
    calibration: str | None  # the calibration samples (.npz), for a runtime's own quantizer
    sources: dict[str, int]  # INT8 row -> index of its FP32 model
    labels: np.ndarray | None = None  # of the samples run
    samples: int = 0


def _quantizer_words(extras: Mapping[str, Any]) -> str:
    words = f"{extras.get('quantizer')}, {extras.get('feature_quantize_method')} activations, " \
            f"{extras.get('weight_quantize_method')} weights, {extras.get('calibration_samples')} calibration samples"
    err = extras.get("image_encoding_max_error")
    return words + ("" if err is None or err < 1e-5 else f" (8-bit image encoding, max error {err:.2g})")


def _column(name: str, rows: Sequence[str], paths: Sequence[str], input_names: Sequence[str], out_names: Sequence[str],
            input_npz: str, shapes: dict[str, list[int]], ref: np.ndarray, threads: int, warmup: int, runs: int,
            timeout: float, folder: str, own: _OwnInt8) -> RuntimeColumn:
    adapter_path = ADAPTERS[name]
    adapter = load_adapter(adapter_path)
    common: dict[str, Any] = {"name": name, "label": adapter.label or name, "threads": threads, "samples": int(ref.shape[0])}
    if not adapter.installed():
        return RuntimeColumn(**common, status="not installed", install=adapter.install)
    cells: dict[str, RuntimeCell] = {}
    files: dict[str, list[str]] = {}
    own_int8 = adapter.quantizer is not None and own.calibration is not None
    for row, path in zip(rows, paths, strict=True):
        workdir = tempfile.mkdtemp(prefix=f"{name}-", dir=folder)
        out_npz, converted = os.path.join(workdir, "outputs.npz"), os.path.join(workdir, "converted.json")
        job: dict[str, Any] = {"action": "model", "adapter": adapter_path, "model": path, "workdir": workdir,
                               "input_shapes": shapes, "converted": converted, "threads": threads,
                               "inputs": input_npz, "outputs": out_npz, "input_names": list(input_names),
                               "output_names": list(out_names)}
        quantizing = own_int8 and row in own.sources
        said = None
        if quantizing:  # the FP32 row's model, quantized by the runtime's own tool
            job["model"] = paths[own.sources[row]]
            said = f"{adapter.quantizer} (the runtime's own quantizer, from {rows[own.sources[row]]})"
        failed: list[str] = []  # the quantizer's methods that failed, with how
        for method in (adapter.quantize_methods or (None,)) if quantizing else (None,):
            if quantizing:
                job["quantize"] = {"calibration": own.calibration, "method": method}
                Path(converted).unlink(missing_ok=True)
            res, failure = call_child(job, folder, timeout)
            if not quantizing or not Path(converted).is_file():
                break
            if json.loads(Path(converted).read_text()).get("quantized"):
                break
            failed.append(f"{method}: {failure}")
        if not Path(converted).is_file():
            cells[row] = RuntimeCell(row, failure=failure, failed_step="convert", quantizer=said)
            continue
        conv = json.loads(Path(converted).read_text())
        size = sum(Path(f).stat().st_size for f in conv["files"])
        if quantizing and not conv.get("quantized"):
            cells[row] = RuntimeCell(row, failure="; ".join(failed), failed_step="quantize", quantizer=said)
            continue
        if quantizing:
            said = _quantizer_words(conv["extras"]) + "".join(f"; {f.split(':')[0]} failed ({f.split(': ', 1)[1]})"
                                                              for f in failed)
        if res is None:
            cells[row] = RuntimeCell(row, size, failure=failure, failed_step="run", quantizer=said)
            continue
        with np.load(out_npz) as z:
            got = z["o0"]
        if got.size != ref.size:
            cells[row] = RuntimeCell(row, size, failure=f"output has {got.size} values, onnxruntime gives {ref.size}",
                                     failed_step="run", quantizer=said)
            continue
        got = got.reshape(ref.shape)
        agreement = compare_outputs(out_names[0], ref, got).top1_agreement
        acc = None
        if own.labels is not None and got.ndim == 2 and got.shape[1] > 1:
            acc = float(np.mean(np.argmax(got, axis=1) == own.labels[:got.shape[0]]))
        files[row] = conv["files"]
        cells[row] = RuntimeCell(row, size, top1_agreement=agreement, quantizer=said,
                                 sqnr_db=finite_or_none(sqnr_db(ref, got)), accuracy=acc)
    ran = [r for r in rows if r in files]
    if ran:
        t, failure = call_child({"action": "time-many", "adapter": adapter_path, "files": [files[r] for r in ran],
                                 "threads": threads, "warmup": warmup, "runs": runs, "inputs": input_npz,
                                 "input_names": list(input_names), "output_names": list(out_names)}, folder, timeout)
        for k, r in enumerate(ran):
            c = cells[r]
            if t is None:
                cells[r] = replace(c, failure=failure, failed_step="time")
            else:
                ms = t["ms"][k]
                cells[r] = replace(c, latency_ms=float(np.median(ms)), latency_p90_ms=float(np.percentile(ms, 90)))
    ok = all(c.failure is None for c in cells.values())
    return RuntimeColumn(**common, status="ok" if ok else "failed", cells=tuple(cells[r] for r in rows),
                         version=adapter.version(), warmup=warmup, runs=runs)


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    noise = float(np.sum((ref.astype(np.float64) - got) ** 2))
    return math.inf if noise == 0 else 10.0 * math.log10(float(np.sum(ref.astype(np.float64) ** 2)) / noise)


def finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None
