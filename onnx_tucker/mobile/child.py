"""The child process that converts, runs and times models in one runtime:
`python -m onnx_tucker.mobile.child JOB.json`.

A job is one model (convert it, with `quantize` then quantize the result with the runtime's own
INT8 tool, then run it on every input batch), the timing of two models
already converted, or of any number of them (`time-many`: the four-way INT8 comparison). The conversion's result is written before the model runs, so when the run
crashes the parent still knows the conversion succeeded (and the size of the result). Inputs and outputs travel as .npz files in
the job's temporary folder; the result is a JSON file next to the job. A Python exception ends the
process with exit code 3 and one line on stderr; a native crash ends it by a signal, which the
parent reports as such.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .adapters import ConversionFailed, load_adapter

FAILED = 3  # exit code: the step failed with a message on stderr


def _batches(path: str, names: list[str]) -> list[dict[str, np.ndarray]]:
    with np.load(path) as z:
        stacked = {n: z[n] for n in names}
    count = next(iter(stacked.values())).shape[0]
    return [{n: stacked[n][i] for n in names} for i in range(count)]


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    adapter = load_adapter(job["adapter"])
    action = job["action"]
    inputs, outputs = job["input_names"], job["output_names"]
    if action == "model":
        t0 = time.perf_counter()
        files, extras = adapter.convert(job["model"], job["workdir"], {k: tuple(v) for k, v in job["input_shapes"].items()})
        converted = {"files": files, "extras": extras, "seconds": time.perf_counter() - t0}
        Path(job["converted"]).write_text(json.dumps(converted))
        if job.get("quantize"):  # the runtime's own INT8 quantizer on the converted FP32 model
            files, q_extras = adapter.quantize(files, job["workdir"], job["quantize"]["calibration"], inputs,
                                               job["quantize"].get("method"))
            converted = {"files": files, "extras": extras | q_extras, "seconds": time.perf_counter() - t0,
                         "quantized": True}
            Path(job["converted"]).write_text(json.dumps(converted))
        batches = _batches(job["inputs"], inputs)
        run = adapter.load(files, job["threads"], inputs, outputs)
        results = [run(b) for b in batches]
        arrays: dict[str, Any] = {f"o{k}": np.stack([r[k] for r in results]) for k in range(len(outputs))}
        np.savez(job["outputs"], **arrays)
        return converted
    if action == "time-many":  # the four-way INT8 comparison: any number of models, interleaved
        from ..runtime.bench import interleave_many

        feeds = _batches(job["inputs"], inputs)[0]
        fns = [adapter.bench_fn(files, job["threads"], inputs, outputs, feeds) for files in job["files"]]
        return {"ms": [list(t) for t in interleave_many(fns, job["warmup"], job["runs"])]}
    if action == "time-layers":  # per-layer timing: the job brings its own tiny models and input shape
        return _time_layers(adapter, job)
    batches = _batches(job["inputs"], inputs)
    if action == "time":
        runs = [adapter.load(files, job["threads"], inputs, outputs) for files in (job["files_a"], job["files_b"])]
        feeds = batches[0]
        for _ in range(job["warmup"]):
            for run in runs:
                run(feeds)
        times: list[list[float]] = [[], []]
        for i in range(job["runs"]):
            # Alternate which model goes first, so neither always runs on a warmer cache.
            order = (0, 1) if i % 2 == 0 else (1, 0)
            for k in order:
                start = time.perf_counter()
                runs[k](feeds)
                times[k].append((time.perf_counter() - start) * 1e3)
        return {"original_ms": times[0], "compressed_ms": times[1]}
    raise ValueError(f"unknown action {action!r}")


def _time_layers(adapter: Any, job: dict[str, Any]) -> dict[str, Any]:
    """Per-layer timing (mobile/layertime.py): tiny ONNX models (input x, output y) converted once each,
    an Identity model alone (the cost of one run call) and each (original, chain) pair interleaved."""
    from ..runtime.bench import interleave

    shape = tuple(job["input_shape"])
    feeds = {"x": np.random.default_rng(job["seed"]).standard_normal(shape).astype(np.float32)}
    runs: dict[str, Any] = {}

    def bench(path: str) -> Any:
        if path not in runs:
            workdir = Path(job["workdir"]) / f"m{len(runs)}"
            workdir.mkdir()
            files, _ = adapter.convert(path, str(workdir), {"x": shape})
            runs[path] = adapter.bench_fn(files, job["threads"], ["x"], ["y"], feeds)
        return runs[path]

    ident = bench(job["identity"])
    t_id, _ = interleave(ident, lambda: None, job["warmup"], job["runs"])
    pairs = []
    for original, chain in job["pairs"]:
        a, b = bench(original), bench(chain)
        pairs.append(interleave(a, b, job["warmup"], job["runs"]))
    return {"identity_ms": list(t_id), "pairs": [[list(ta), list(tb)] for ta, tb in pairs]}


def main(argv: list[str]) -> int:
    job_path = Path(argv[0])
    job = json.loads(job_path.read_text())
    try:
        result = run_job(job)
    except ConversionFailed as e:
        print(f"onnx-tucker-child: {e}", file=sys.stderr)
        return FAILED
    except Exception as e:  # noqa: BLE001 - any runtime error is a finding, reported by the parent
        text = str(e).strip().splitlines()
        # The adapters raise RuntimeError with the runtime's own words; other types are named.
        kind = "" if type(e) is RuntimeError else f"{type(e).__name__}: "
        print(f"onnx-tucker-child: {kind}{text[0] if text else type(e).__name__}", file=sys.stderr)
        return FAILED
    Path(job["result"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
