"""Build the mobile report: inputs, onnxruntime references, and each runtime through its child.

The parent never imports a native runtime. Each model in a runtime (converted, then run) and the
timing of both are one child process each, with a timeout, so the report says where a runtime fails: on the
original too, or only on the compressed model; at conversion, or at run time; by a message, a
signal or a timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data import DataSet
from ..errors import UsageError, ValidationError
from ..graph.protos import first_line
from ..runtime.session import ort_session
from ..runtime.validate import OutputComparison, compare_outputs
from .adapters import ADAPTERS, load_adapter, python_path
from .ort_mobile import safe_partitions
from .results import ModelRun, OrtMobileAnalysis, RuntimeResult, Timing

CHILD_FAILED = 3  # child.py's exit code for a step that failed with a message
DEFAULT_RUNTIMES = ("ort", "ort-mobile", "mnn", "ncnn")
Progress = Callable[[str, int, int], None]  # (runtime about to run, runtimes done, runtimes in all)


def parse_runtimes(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """'ort,mnn' -> ('ort', 'mnn'); unknown names are the user's mistake."""
    if text is None:
        return DEFAULT_RUNTIMES
    names = [n.strip().lower() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    unknown = [n for n in names if n not in ADAPTERS]
    if unknown or not names:
        raise UsageError(f"--runtimes {text if isinstance(text, str) else ','.join(text)}: unknown runtime "
                         f"'{unknown[0] if unknown else ''}'; choose from {','.join(ADAPTERS)}")
    return tuple(dict.fromkeys(names))


def _failure(proc: subprocess.CompletedProcess[str] | None, timeout: float) -> str:
    if proc is None:
        return f"timed out after {timeout:g} s"
    rc = proc.returncode
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = "unknown"
        return f"crashed (signal {-rc}, {name})"
    lines = (proc.stderr + "\n" + proc.stdout).strip().splitlines()
    ours = [ln.split("onnx-tucker-child:", 1)[1].strip() for ln in lines if "onnx-tucker-child:" in ln]
    native = [ln.strip() for ln in lines if "onnx-tucker-child:" not in ln
              and any(w in ln.lower() for w in ("error", "not support", "unsupported", "not exist", "fail"))]
    if rc == CHILD_FAILED and ours:
        msg = ours[-1]
        if native and native[-1] not in msg:
            msg += f" ({native[-1][:200]})"
        return msg
    return f"exited with code {rc}" + (f": {lines[-1][:200]}" if lines else "")


def call_child(job: dict[str, Any], folder: str, timeout: float) -> tuple[dict[str, Any] | None, str | None]:
    """Run one step in `python -m onnx_tucker.mobile.child`; (result, None) or (None, failure)."""
    fd, job_path = tempfile.mkstemp(suffix=".json", dir=folder)
    os.close(fd)
    job = dict(job, result=job_path + ".result")
    Path(job_path).write_text(json.dumps(job))
    env = dict(os.environ, PYTHONPATH=python_path())
    # Its own session (process group), so a timeout also ends what it started (pnnx, a converter).
    with subprocess.Popen([sys.executable, "-m", "onnx_tucker.mobile.child", job_path], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env, cwd=folder, start_new_session=True) as child:
        try:
            out, err = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
            return None, _failure(None, timeout)
    proc = subprocess.CompletedProcess(child.args, child.returncode, out, err)
    if proc.returncode != 0 or not Path(job["result"]).is_file():
        return None, _failure(proc, timeout)
    return json.loads(Path(job["result"]).read_text()), None


def reference_outputs(model_path: str, inputs: DataSet, batch: int, output_names: Sequence[str],
                      what: str) -> list[np.ndarray]:
    """Each output of `model_path` in onnxruntime CPU over every batch of `batch` samples, concatenated on axis 0."""
    sess = ort_session(model_path, what)
    per_batch = []
    for feeds in inputs.batches(batch):
        try:
            per_batch.append([np.asarray(a) for a in sess.run(list(output_names), feeds)])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises several unrelated exception types
            raise ValidationError(f"{model_path}: the {what} model does not run in onnxruntime ({first_line(e)})") from None
    return [np.concatenate([b[k] for b in per_batch]) for k in range(len(output_names))]


def _compare(refs: Sequence[np.ndarray], stacked: Mapping[str, np.ndarray], names: Sequence[str]) -> tuple[OutputComparison, ...]:
    out = []
    for k, name in enumerate(names):
        ref = refs[k]
        got = stacked[f"o{k}"]
        if got.size != ref.size:
            raise ValueError(f"output '{name}' has {got.size} values, onnxruntime gives {ref.size} ({tuple(ref.shape)})")
        out.append(compare_outputs(name, ref, got.reshape(ref.shape)))
    return tuple(out)


def _accuracy(first: np.ndarray, labels: np.ndarray | None) -> float | None:
    if labels is None or first.ndim != 2 or first.shape[0] != labels.shape[0]:
        return None
    return float(np.mean(np.argmax(first, axis=1) == labels))


def _size(files: Sequence[str]) -> int:
    return sum(Path(f).stat().st_size for f in files)


def run_runtime(
    name: str, adapter_path: str, original: str, compressed: str, inputs: DataSet, output_names: Sequence[str],
    input_npz: str, references: Mapping[str, Sequence[np.ndarray] | None], input_shapes: Mapping[str, tuple[int, ...]],
    threads: int, warmup: int, runs: int, timeout: float, folder: str,
) -> RuntimeResult:
    """Convert, run and time both models in one runtime; every failure is recorded, none raised."""
    adapter = load_adapter(adapter_path)
    common: dict[str, Any] = {"name": name, "label": adapter.label or name, "file_format": adapter.file_format}
    if not adapter.installed():
        return RuntimeResult(**common, status="not installed", install=adapter.install)
    version = adapter.version()
    shapes = {k: list(v) for k, v in input_shapes.items()}
    runs_by_role: dict[str, ModelRun] = {}
    files_by_role: dict[str, list[str]] = {}
    extras_by_role: dict[str, dict[str, Any]] = {}
    for role, model in (("original", original), ("compressed", compressed)):
        workdir = tempfile.mkdtemp(prefix=f"{name}-{role}-", dir=folder)
        out_npz, converted = os.path.join(workdir, "outputs.npz"), os.path.join(workdir, "converted.json")
        res, failure = call_child({"action": "model", "adapter": adapter_path, "model": str(Path(model).resolve()),
                                   "workdir": workdir, "input_shapes": shapes, "converted": converted,
                                   "threads": threads, "inputs": input_npz, "outputs": out_npz,
                                   "input_names": list(inputs.names), "output_names": list(output_names)},
                                  folder, timeout)
        if not Path(converted).is_file():  # the conversion itself failed (or crashed, or hung)
            runs_by_role[role] = ModelRun(converted=False, ran=False, failure=failure, failed_step="convert")
            continue
        conv = json.loads(Path(converted).read_text())
        files = conv["files"]
        files_by_role[role], extras_by_role[role] = files, conv.get("extras", {})
        size, seconds = _size(files), float(conv["seconds"])
        if res is None:
            runs_by_role[role] = ModelRun(True, False, failure, "run", size, seconds)
            continue
        with np.load(out_npz) as z:
            stacked = {k: z[k] for k in z.files}
        try:
            vs_original = _compare(references["original"] or [], stacked, output_names)
            same = references.get(role)
            fidelity = _compare(same, stacked, output_names) if same is not None else ()
        except ValueError as e:
            runs_by_role[role] = ModelRun(True, False, str(e), "run", size, seconds)
            continue
        first = stacked["o0"].reshape(references["original"][0].shape) if references["original"] else stacked["o0"]  # type: ignore[index]
        runs_by_role[role] = ModelRun(True, True, None, None, size, seconds, vs_original, fidelity,
                                      _accuracy(first, inputs.labels))
    timing = timing_failure = None
    if all(r.ran for r in runs_by_role.values()):
        t, timing_failure = call_child({"action": "time", "adapter": adapter_path, "files_a": files_by_role["original"],
                                        "files_b": files_by_role["compressed"], "threads": threads, "warmup": warmup,
                                        "runs": runs, "inputs": input_npz, "input_names": list(inputs.names),
                                        "output_names": list(output_names)}, folder, timeout)
        if t is not None:
            timing = Timing(threads, warmup, runs, tuple(t["original_ms"]), tuple(t["compressed_ms"]))
    ort_mobile = None
    if name == "ort-mobile":
        before, fail0 = safe_partitions(original)
        after, fail1 = safe_partitions(compressed)
        ort_mobile = OrtMobileAnalysis(
            before, after, tuple(extras_by_role.get("original", {}).get("required_ops", ())),
            tuple(extras_by_role.get("compressed", {}).get("required_ops", ())), fail0 or fail1,
        )
    ok = all(r.ran for r in runs_by_role.values())
    return RuntimeResult(**common, status="ok" if ok else "failed", version=version, original=runs_by_role["original"],
                         compressed=runs_by_role["compressed"], timing=timing, timing_failure=timing_failure,
                         ort_mobile=ort_mobile)


def run_runtimes(
    runtimes: Sequence[str], original: str, compressed: str, inputs: DataSet, batch: int, output_names: Sequence[str],
    input_shapes: Mapping[str, tuple[int, ...]], threads: int, warmup: int, runs: int, timeout: float,
    progress: Progress | None = None,
) -> tuple[RuntimeResult, ...]:
    """`inputs`: whole batches of `batch` samples; each runtime runs them one batch at a time."""
    references: dict[str, Sequence[np.ndarray] | None] = {
        "original": reference_outputs(original, inputs, batch, output_names, "original")}
    try:
        references["compressed"] = reference_outputs(compressed, inputs, batch, output_names, "compressed")
    except ValidationError:
        references["compressed"] = None  # the ort runtime's row says why
    results = []
    with tempfile.TemporaryDirectory(prefix="onnx-tucker-mobile-") as folder:
        input_npz = os.path.join(folder, "inputs.npz")
        arrays: dict[str, Any] = inputs.stacked(batch)  # the child runs [i] of each: one batch
        np.savez(input_npz, **arrays)
        for i, name in enumerate(runtimes):
            if progress is not None:
                progress(name, i, len(runtimes))
            results.append(run_runtime(name, ADAPTERS[name], original, compressed, inputs, output_names, input_npz, references,
                                       input_shapes, threads, warmup, runs, timeout, folder))
        if progress is not None:
            progress("runtimes", len(runtimes), len(runtimes))
    return tuple(results)
