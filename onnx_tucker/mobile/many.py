"""Several models in each mobile runtime, side by side: the deploy-runtime columns of the four-way INT8
comparison (issue 18).

`runtime_columns` writes the models to a temporary folder, then per runtime converts and runs each in
its own child process (`child.py`, action `model`, with a timeout), compares its first output with the
reference model (the first) in onnxruntime CPU, and times every model that ran in one more child, all
interleaved (`time-many`). A converter that aborts on a QDQ model (MNN 3.6 does), a run that crashes or
a timing that hangs is that cell's `failure`: a finding, never the end of the comparison.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
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
                    threads: int, warmup: int, runs: int, timeout: float) -> tuple[RuntimeColumn, ...]:
    """`models`: (row name, onnx.ModelProto), the reference first; `data`: its first whole batches of
    `batch` samples (up to RUN_SAMPLES) are run in each runtime, the first batch timed."""
    import onnx  # the graph layer's models arrive as protos; the child processes read files

    count = max(batch, min(data.count, RUN_SAMPLES) // batch * batch)
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
        return tuple(_column(name, [n for n, _ in models], paths, inputs.names, out_names, input_npz, shapes, ref,
                             threads, warmup, runs, timeout, folder) for name in runtimes)


def _column(name: str, rows: Sequence[str], paths: Sequence[str], input_names: Sequence[str], out_names: Sequence[str],
            input_npz: str, shapes: dict[str, list[int]], ref: np.ndarray, threads: int, warmup: int, runs: int,
            timeout: float, folder: str) -> RuntimeColumn:
    adapter_path = ADAPTERS[name]
    adapter = load_adapter(adapter_path)
    common: dict[str, Any] = {"name": name, "label": adapter.label or name, "threads": threads}
    if not adapter.installed():
        return RuntimeColumn(**common, status="not installed", install=adapter.install)
    cells: dict[str, RuntimeCell] = {}
    files: dict[str, list[str]] = {}
    for row, path in zip(rows, paths, strict=True):
        workdir = tempfile.mkdtemp(prefix=f"{name}-", dir=folder)
        out_npz, converted = os.path.join(workdir, "outputs.npz"), os.path.join(workdir, "converted.json")
        res, failure = call_child({"action": "model", "adapter": adapter_path, "model": path, "workdir": workdir,
                                   "input_shapes": shapes, "converted": converted, "threads": threads,
                                   "inputs": input_npz, "outputs": out_npz, "input_names": list(input_names),
                                   "output_names": list(out_names)}, folder, timeout)
        if not Path(converted).is_file():
            cells[row] = RuntimeCell(row, failure=failure, failed_step="convert")
            continue
        conv = json.loads(Path(converted).read_text())
        size = sum(Path(f).stat().st_size for f in conv["files"])
        if res is None:
            cells[row] = RuntimeCell(row, size, failure=failure, failed_step="run")
            continue
        with np.load(out_npz) as z:
            got = z["o0"]
        if got.size != ref.size:
            cells[row] = RuntimeCell(row, size, failure=f"output has {got.size} values, onnxruntime gives {ref.size}",
                                     failed_step="run")
            continue
        agreement = compare_outputs(out_names[0], ref, got.reshape(ref.shape)).top1_agreement
        files[row] = conv["files"]
        cells[row] = RuntimeCell(row, size, top1_agreement=agreement)
    ran = [r for r in rows if r in files]
    if ran:
        t, failure = call_child({"action": "time-many", "adapter": adapter_path, "files": [files[r] for r in ran],
                                 "threads": threads, "warmup": warmup, "runs": runs, "inputs": input_npz,
                                 "input_names": list(input_names), "output_names": list(out_names)}, folder, timeout)
        for k, r in enumerate(ran):
            c = cells[r]
            if t is None:
                cells[r] = RuntimeCell(r, c.size_bytes, top1_agreement=c.top1_agreement, failure=failure,
                                       failed_step="time")
            else:
                ms = t["ms"][k]
                cells[r] = RuntimeCell(r, c.size_bytes, float(np.median(ms)), float(np.percentile(ms, 90)),
                                       c.top1_agreement)
    ok = all(c.failure is None for c in cells.values())
    return RuntimeColumn(**common, status="ok" if ok else "failed", cells=tuple(cells[r] for r in rows),
                         version=adapter.version(), warmup=warmup, runs=runs)
