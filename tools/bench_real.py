#!/usr/bin/env python3
"""Real models at real resolutions (issue 15): data-driven ranks, calibration and latency-aware
selection on the shared pretrained models, and the compressor's time and memory on the synthetic
ImageNet networks (a benchmark, not a test; the table is docs/real-models.md).

    python tools/bench_real.py --resume --results tools/results/real_models.jsonl --markdown docs/real-models.md
    python tools/bench_real.py --models darknet --rows original,data:0.5 --cal-samples 16 --eval-limit 50 \\
        --results /tmp/real_smoke.jsonl --work-dir /tmp/real-smoke          # a quick smoke run

Models (../shared/data/README.md says where each comes from and how it is scored):
- `darknet`: imagenet/darknet_tiny.onnx, scored on imagenet/val (shorter side 256, centre crop 224,
  RGB / 255, no mean/std): top-1, top-5, and top-1 agreement with the original on the same images;
  calibrated on photos/bsds500-trainval with the same preprocessing.
- `waifu2x`: superres/waifu2x_upconv7_photo_x2.onnx, PSNR (tools/real_scoring.py: the README's
  definition; the original must score 35.28 dB, which is asserted); calibrated on centre crops
  (`--superres-crop`, default 64) of the photos at half scale (`--resize-shorter 160`, as the x1/2
  inputs it is scored on), compressed, timed and planned at `Input1:1,3,CROP,CROP`.
- `resnet56`: cifar10-resnets/resnet56.onnx, top-1 and agreement on cifar10/test (tools/cifar_npz.py
  preprocessing), calibrated on a seeded draw of cifar10/train (500 images by default).
- `resnet50`, `vgg16`: tools/make_synthetic.py at 224 (written into the work folder once), calibrated
  on the photos; only the compressor's wall time, peak RSS and how many layers the data path chose
  ranks for (layers[].policy of the --report JSON) are measured, with `--no-validate` (the issue's
  command).

Rows: `original`; `data:F` (`--ranks data:F --calibrate ...`) for F = 0.67, 0.5, 0.33; `data:F+lat`
(the same with `--latency-aware`); `evbmf` (the default ranks, no calibration, for reference).
Synthetic models run `data:0.5` unless `--rows` says otherwise.

Each compress is a fresh child process (tools/bench_compress.py `run_once`: wall time and peak RSS
from wait4), writing its --report JSON, from which the MAC and parameter ratios, the MAC budget and
the per-layer policies are read. The scores run here in onnxruntime CPU (`--eval-threads`); the
latency ratios original / compressed come from `onnx-tucker report` (onnxruntime CPU, the ORT format
and MNN at 1 thread, each runtime in its own child with a timeout: a crash or refusal becomes a
finding in the row, never the end of the run). One JSON line per row is appended to `--results`
with the exact compress command (paths relative to the repository root; run it from there);
`--resume` skips rows whose model, row, command and evaluation size are already there with status
ok. `--markdown` writes the table (rendered by tools/results_tables.py from the rows), the commands,
the findings and the machine.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import real_scoring as rs  # noqa: E402
import results_tables  # noqa: E402
from bench_compress import compress_command, run_once  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
PHOTOS = SHARED / "photos" / "bsds500-trainval"
ROWS = ("original", "data:0.67", "data:0.5", "data:0.33", "data:0.67+lat", "data:0.5+lat", "data:0.33+lat", "evbmf")
RUNTIMES = ("ort", "ort-mobile", "mnn")
IMAGENET_PRE = ("--resize-shorter", "256", "--crop", "224")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    label: str
    kind: str  # imagenet | superres | cifar | synthetic
    relpath: str  # under ../shared/data, or the synthetic model's name
    default_rows: tuple[str, ...] = ROWS
    cal_samples: int = 256


MODELS = {
    "darknet": ModelSpec("darknet", "Darknet Tiny (ImageNet)", "imagenet", "imagenet/darknet_tiny.onnx"),
    "waifu2x": ModelSpec("waifu2x", "waifu2x upconv_7 x2", "superres", "superres/waifu2x_upconv7_photo_x2.onnx"),
    "resnet56": ModelSpec("resnet56", "CIFAR ResNet-56", "cifar", "cifar10-resnets/resnet56.onnx", cal_samples=500),
    "resnet50": ModelSpec("resnet50", "ResNet-50 (synthetic, 224)", "synthetic", "resnet50", ("data:0.5",)),
    "vgg16": ModelSpec("vgg16", "VGG-16 (synthetic, 224)", "synthetic", "vgg16", ("data:0.5",)),
}


def rel(path: str | Path) -> str:
    """A path as the commands show it: relative to the repository root (shared data: ../shared/data)."""
    return os.path.relpath(os.path.abspath(path), ROOT)


def display(cmd: list[str]) -> str:
    """The child's command line as a user types it from the repository root."""
    shown = ["onnx-tucker", cmd[3]] + [rel(a) if os.path.isabs(a) else a for a in cmd[4:]]
    return shlex.join(shown)


def machine() -> dict[str, Any]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else platform.processor()
    mem = next((int(ln.split()[1]) * 1024 for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal")), 0) if Path("/proc/meminfo").is_file() else 0

    def version(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                                text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        commit = None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem / 2**30, 1), "os": platform.platform(),
            "python": platform.python_version(), "numpy": version("numpy"), "onnxruntime": version("onnxruntime"),
            "onnx": version("onnx"), "mnn": version("mnn"), "commit": commit, "load_1min": round(os.getloadavg()[0], 2)}


# ---- models, calibration data and the compress arguments of each row -----------------------------


def model_file(spec: ModelSpec, work: Path) -> Path:
    if spec.kind != "synthetic":
        path = SHARED / spec.relpath
        if not path.is_file():
            raise SystemExit(f"{spec.name}: {rel(path)} not found (../shared/data, see its README)")
        return path
    path = work / "synthetic" / f"{spec.relpath}.onnx"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"# {spec.name}: writing {rel(path)} with tools/make_synthetic.py", flush=True)
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_synthetic.py"), spec.relpath, str(path)], check=True)
    return path


def cifar_subset(folder: Path, count: int | None, seed: int | None) -> list[tuple[Path, int]]:
    """CIFAR files (path, label): `count` drawn at random with `seed`, or spread evenly (seed None)."""
    from cifar_npz import list_images

    files = list_images(folder)
    if count is None or count >= len(files):
        return files
    if seed is None:
        pick = np.linspace(0, len(files) - 1, count).round().astype(int)
    else:
        pick = np.sort(np.random.default_rng(seed).choice(len(files), count, replace=False))
    return [files[i] for i in pick]


def input_shape_args(spec: ModelSpec, args: argparse.Namespace) -> list[str]:
    return ["--input-shape", f"Input1:1,3,{args.superres_crop},{args.superres_crop}"] if spec.kind == "superres" else []


def calibration_args(spec: ModelSpec, args: argparse.Namespace, work: Path) -> list[str]:
    count = args.cal_samples or spec.cal_samples
    if spec.kind == "cifar":
        npz = work / spec.name / f"cifar_train_cal{count}_seed0.npz"
        if not npz.is_file():
            from cifar_npz import load

            npz.parent.mkdir(parents=True, exist_ok=True)
            x, y = load(cifar_subset(SHARED / "cifar10" / "train", count, seed=0))
            np.savez(npz, input=x, labels=y)
        return ["--calibrate", str(npz), "--calibration-samples", str(count)]
    pre = (["--resize-shorter", "160", "--crop", str(args.superres_crop)] if spec.kind == "superres" else list(IMAGENET_PRE))
    extra = ["--no-validate"] if spec.kind == "synthetic" else []
    return ["--calibrate", str(PHOTOS), *pre, "--calibration-samples", str(count), *extra]


def row_args(row: str, spec: ModelSpec, args: argparse.Namespace, work: Path) -> list[str]:
    if row == "evbmf":
        return ["--no-validate"] if spec.kind == "synthetic" else []
    policy, _, flag = row.partition("+")
    extra = ["--ranks", policy, *calibration_args(spec, args, work)]
    return extra + (["--latency-aware", "--threads", "1"] if flag == "lat" else [])


# ---- scores -------------------------------------------------------------------------------------


def _session(path: Path, threads: int) -> Any:
    from onnx_tucker.ort import new_session

    return new_session(str(path), "evaluated", threads=threads)


def imagenet_logits(path: Path, limit: int | None, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels on imagenet/val, preprocessed by the library (`--resize-shorter 256 --crop 224`),
    decoded 50 images at a time (the whole set would be 600 MB of float32)."""
    import onnx

    from onnx_tucker.config import Preprocess
    from onnx_tucker.data import open_for_model

    files = open_for_model(SHARED / "imagenet" / "val", onnx.load(str(path)), limit,
                           Preprocess(resize_shorter=256, crop=(224, 224)), option="imagenet/val")
    sess = _session(path, threads)
    name = sess.get_inputs()[0].name
    out = []
    for start in range(0, files.count, 50):
        batch = files.read(np.arange(start, min(start + 50, files.count)))
        out.append(sess.run(None, {name: batch.inputs[name]})[0])
    assert files.labels is not None
    return np.concatenate(out), files.labels


def cifar_logits(path: Path, limit: int | None, threads: int) -> tuple[np.ndarray, np.ndarray]:
    from cifar_npz import load

    files = cifar_subset(SHARED / "cifar10" / "test", limit, seed=None)  # evenly spread over the classes
    sess = _session(path, threads)
    name = sess.get_inputs()[0].name
    logits, labels = [], []
    for start in range(0, len(files), 500):
        x, y = load(files[start : start + 500])
        logits.append(sess.run(None, {name: x})[0])
        labels.append(y)
    return np.concatenate(logits), np.concatenate(labels)


def superres_scores(path: Path, threads: int) -> tuple[float, dict[str, float]]:
    sess = _session(path, threads)
    name = sess.get_inputs()[0].name
    return rs.superres_psnr(lambda x: sess.run(None, {name: x})[0])


def classifier_metrics(logits: np.ndarray, labels: np.ndarray, original: np.ndarray | None) -> dict[str, Any]:
    m: dict[str, Any] = {"images": int(len(labels)), "top1": rs.topk_accuracy(logits, labels, 1),
                         "top5": rs.topk_accuracy(logits, labels, 5)}
    if original is not None:
        m["agreement"] = rs.top1_agreement(logits, original)
        m["top1_original"] = rs.topk_accuracy(original, labels, 1)
    return m


class Scorer:
    """The score of each row, with the original's outputs computed once (and kept in the work folder)."""

    def __init__(self, spec: ModelSpec, original: Path, args: argparse.Namespace, work: Path) -> None:
        self.spec, self.original, self.args, self.work = spec, original, args, work
        self._orig: Any = None

    def _logits(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        fn: Callable[[Path, int | None, int], tuple[np.ndarray, np.ndarray]] = (
            imagenet_logits if self.spec.kind == "imagenet" else cifar_logits)
        return fn(path, self.args.eval_limit, self.args.eval_threads)

    def original_outputs(self) -> Any:
        if self._orig is not None:
            return self._orig
        if self.spec.kind == "superres":
            mean, per = superres_scores(self.original, self.args.eval_threads)
            if round(mean, 2) != rs.SUPERRES_PSNR_DB:
                raise SystemExit(f"waifu2x: the original scores {mean:.3f} dB, not the README's "
                                 f"{rs.SUPERRES_PSNR_DB} dB: the scoring is wrong")
            self._orig = (mean, per)
        else:
            cache = self.work / self.spec.name / f"original_logits_{self.args.eval_limit or 'all'}.npz"
            if cache.is_file():
                with np.load(cache) as z:
                    self._orig = (z["logits"], z["labels"])
            else:
                self._orig = self._logits(self.original)
                cache.parent.mkdir(parents=True, exist_ok=True)
                np.savez(cache, logits=self._orig[0], labels=self._orig[1])
        return self._orig

    def score(self, path: Path | None) -> dict[str, Any]:
        """The row's metrics; `path` None: the original."""
        if self.spec.kind == "synthetic":
            return {}
        orig = self.original_outputs()
        if self.spec.kind == "superres":
            mean, per = orig if path is None else superres_scores(path, self.args.eval_threads)
            return {"psnr": mean, "psnr_per_photo": per, "psnr_original": orig[0], "psnr_delta": mean - orig[0]}
        logits, labels = orig if path is None else self._logits(path)
        return classifier_metrics(logits, labels, orig[0])


# ---- compress, latency, one row -----------------------------------------------------------------


def report_layers(report: dict[str, Any]) -> dict[str, Any]:
    """What the --report JSON says about the layers: how many there are, how many were decomposed,
    how many the data path chose ranks for (a policy starting with `data`, no fallback named), and the
    others with their policy and reason."""
    layers = report.get("layers") or []
    policies: dict[str, int] = {}
    others = []
    data = 0
    for lay in layers:
        policy = str(lay.get("policy") or "")
        head = policy.split(";")[0]
        policies[head] = policies.get(head, 0) + 1
        if head.startswith("data") and not any(w in policy for w in ("fallback", "vbmf", "weight")):
            data += 1
        else:
            others.append({"name": lay.get("name"), "op_type": lay.get("op_type"), "kind": lay.get("kind"),
                           "policy": policy, "reason": lay.get("reason")})
    return {"total": len(layers), "decomposed": sum(1 for lay in layers if lay.get("kind") != "skip"),
            "data_path": data, "policies": policies, "not_data_path": others}


def runtime_latency(original: Path, compressed: Path, spec: ModelSpec, args: argparse.Namespace, folder: Path,
                    runtimes: tuple[str, ...]) -> dict[str, Any]:
    """Latency original / compressed in each runtime, through `onnx-tucker report` (its own children)."""
    if not runtimes:
        return {}
    out = folder / "mobile.json"
    shape = input_shape_args(spec, args)
    cmd = [sys.executable, "-m", "onnx_tucker.cli", "report", str(original), str(compressed), "--runtimes",
           ",".join(runtimes), "--threads", "1", "--runs", str(args.runs), "--warmup", str(args.warmup),
           "--samples", "1", "--timeout", f"{args.runtime_timeout:g}", "--report", str(out), "--quiet", *shape]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.runtime_timeout * (2 * len(runtimes) + 2))
    except subprocess.TimeoutExpired:
        return {r: {"status": "failed", "failure": "onnx-tucker report timed out"} for r in runtimes}
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return {r: {"status": "failed", "failure": f"onnx-tucker report failed: {tail[:300]}"} for r in runtimes}
    found: dict[str, Any] = {}
    for r in json.loads(out.read_text())["runtimes"]:
        lat = r.get("latency") or {}
        failures = [str(x["failure"]) for x in (r.get("original") or {}, r.get("compressed") or {}) if x.get("failure")]
        found[r["name"]] = {
            "status": r["status"], "summary": r.get("summary"),
            "failure": "; ".join(failures) or r.get("latency_failure"),
            "original_ms": lat.get("original_median_ms"), "compressed_ms": lat.get("compressed_median_ms"),
            "speedup": lat.get("speedup"), "max_rel_error": (r.get("compressed") or {}).get("max_rel_error"),
        }
    return found


def row_key(r: dict[str, Any]) -> tuple[Any, ...]:
    return (r["model"], r["row"], r["command"], r.get("eval_limit"))


def run_row(spec: ModelSpec, row: str, model: Path, scorer: Scorer, args: argparse.Namespace, work: Path,
            runtimes: tuple[str, ...], done: dict[tuple[Any, ...], dict[str, Any]], info: dict[str, Any]) -> dict[str, Any] | None:
    folder = work / spec.name / row.replace(":", "").replace("+", "_")
    if row == "original":
        command = ""
        key_row = {"model": spec.name, "row": row, "command": command, "eval_limit": args.eval_limit}
    else:
        folder.mkdir(parents=True, exist_ok=True)
        extra = [*input_shape_args(spec, args), *row_args(row, spec, args, work), "--report", str(folder / "report.json")]
        cmd, out = compress_command(model, extra, str(folder))
        command = display(cmd)
        key_row = {"model": spec.name, "row": row, "command": command, "eval_limit": args.eval_limit}
    if args.resume and row_key(key_row) in done:
        print(f"# {spec.name} {row}: in {rel(args.results)} already (--resume)", flush=True)
        return None
    result: dict[str, Any] = {**key_row, "label": spec.label, "kind": spec.kind,
                              "cal_samples": None if row in ("original", "evbmf") else (args.cal_samples or spec.cal_samples),
                              "status": "ok", "error": None}
    print(f"# {spec.name} {row}: {command or 'scoring the original'}", flush=True)
    if row == "original":
        result["metrics"] = scorer.score(None)
    else:
        (folder / "report.json").unlink(missing_ok=True)
        try:
            wall, rss = run_once(model, extra, str(folder), timeout=args.compress_timeout)
        except SystemExit as e:  # a crash, a refusal or a timeout is a finding of the row
            result.update(status="failed", error=str(e).replace(str(model), rel(model))[-2000:])
            print(f"#   failed: {result['error'][:300]}", flush=True)
        else:
            report = json.loads((folder / "report.json").read_text())
            result.update(wall_s=round(wall, 2), peak_rss_mb=round(rss / 2**20, 1), totals=report.get("totals"),
                          mac_budget=report.get("mac_budget"), layers=report_layers(report),
                          calibration=report.get("calibration"), layer_timing=report.get("layer_timing"))
            result["metrics"] = scorer.score(Path(out))
            if spec.kind != "synthetic":
                result["runtimes"] = runtime_latency(model, Path(out), spec, args, folder, runtimes)
    result.update(machine=info, date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
    if result["status"] == "ok":
        print("#   " + summary(result), flush=True)
    return result


def summary(r: dict[str, Any]) -> str:
    parts = []
    if r.get("wall_s") is not None:
        parts.append(f"compress {r['wall_s']:.0f} s, {r['peak_rss_mb'] / 1024:.2f} GB")
    t = r.get("totals") or {}
    if t:
        parts.append(f"MACs x{t['macs_ratio']:.2f}, params x{t['params_ratio']:.2f}")
    lay = r.get("layers")
    if lay:
        parts.append(f"data path {lay['data_path']}/{lay['total']} layers")
    m = r.get("metrics") or {}
    if "top1" in m:
        parts.append(f"top-1 {100 * m['top1']:.1f} % (top-5 {100 * m['top5']:.1f} %, agreement {100 * m.get('agreement', 1):.1f} %, "
                     f"{m['images']} images)")
    if "psnr" in m:
        parts.append(f"PSNR {m['psnr']:.2f} dB ({m['psnr_delta']:+.2f})")
    for name, x in (r.get("runtimes") or {}).items():
        parts.append(f"{name} x{x['speedup']:.2f}" if x.get("speedup") else f"{name} {x['status']}: {x.get('failure')}")
    return "; ".join(parts) or str(r.get("error"))


# ---- the Markdown page --------------------------------------------------------------------------


def findings(rows: list[dict[str, Any]]) -> list[str]:
    """What a reader must not miss: failures, missed budgets, slower models, layers off the data path."""
    out = []
    for r in rows:
        where = f"{r['model']} `{r['row']}`"
        if r["status"] != "ok":
            out.append(f"{where}: compress failed: {str(r['error']).splitlines()[0][:300]}")
            continue
        budget = r.get("mac_budget") or {}
        if budget and not budget.get("met", True):
            out.append(f"{where}: MAC budget missed by {budget.get('over')} MACs ({budget.get('cause') or 'no cause given'})")
        for name, x in (r.get("runtimes") or {}).items():
            if x.get("status") != "ok" or x.get("speedup") is None:
                out.append(f"{where}: {name}: {x.get('failure') or x.get('status')}")
            elif x["speedup"] < 1 and "+lat" in r["row"]:
                out.append(f"{where}: slower than the original in {name} (x{x['speedup']:.2f}) under --latency-aware")
        lay = r.get("layers") or {}
        if lay.get("not_data_path") and r["row"].startswith("data"):
            names = ", ".join(f"{x['name']} ({x['policy'] or '-'})" for x in lay["not_data_path"][:8])
            more = len(lay["not_data_path"]) - 8
            out.append(f"{where}: {len(lay['not_data_path'])} of {lay['total']} layers not chosen by the data path: "
                       f"{names}{f', and {more} more' if more > 0 else ''}")
    return out


def write_markdown(path: Path, rows: list[dict[str, Any]], results: Path, invocation: str) -> None:
    latest = results_tables.real_models_latest(rows)
    machines = {json.dumps(r.get("machine"), sort_keys=True) for r in latest}
    info = json.loads(sorted(machines)[0]) if machines else {}
    commands = [f"- {r['model']} `{r['row']}`: `{r['command']}`" for r in latest if r["command"]]
    made = {str(r["model"]) for r in latest}
    if "resnet56" in made:
        commands.append("- the CIFAR calibration file `cifar_train_calN_seed0.npz` is what `python tools/cifar_npz.py "
                        "../shared/data/cifar10/train FILE --count N --seed 0` writes")
    commands += [f"- the synthetic {m}: `python tools/make_synthetic.py {m} FILE`" for m in ("resnet50", "vgg16") if m in made]
    lines = [
        "# Real models: data-driven ranks, calibration and latency at real resolutions",
        "",
        f"Generated by `{invocation}` (tools/bench_real.py; rows in `{rel(results)}`). Scores as "
        "../shared/data/README.md defines them (tools/real_scoring.py): Darknet Tiny on the 1,000 `imagenet/val` "
        "images (shorter side 256, centre crop 224), waifu2x PSNR on the five scikit-image photos (the original "
        f"reproduces {rs.SUPERRES_PSNR_DB} dB), ResNet-56 on `cifar10/test`. MACs and parameters are the ratios "
        "original / compressed of the --report totals; latency ratios original / compressed are medians of "
        "interleaved runs at 1 thread (`onnx-tucker report`); an original row shows the original's median in ms. "
        "Compress wall time and peak RSS: each compress in a fresh process (wait4). \"data path\": layers whose "
        "ranks the calibration data chose, of the layers in the report.",
        "",
        f"Machine: {info.get('cpu')}, {info.get('cores')} cores, {info.get('memory_gb')} GB; {info.get('os')}; "
        f"Python {info.get('python')}, numpy {info.get('numpy')}, onnxruntime {info.get('onnxruntime')}, "
        f"MNN {info.get('mnn')}; commit {info.get('commit')}; 1-minute load at the start {info.get('load_1min')}"
        + (" (rows from more than one machine or commit: see the rows)" if len(machines) > 1 else "") + ".",
        "",
        f"<!-- results-table: {results.name} -->",
        results_tables.real_models_table(rows).rstrip("\n"),
        "<!-- /results-table -->",
        "",
        "## Findings",
        "",
        *([f"- {f}" for f in findings(latest)] or ["- none"]),
        "",
        "## Commands (from the repository root)",
        "",
        *commands,
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")


# ---- main ---------------------------------------------------------------------------------------


def _names(text: str, known: tuple[str, ...], what: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise SystemExit(f"{what} {text}: unknown {bad[0] if bad else '(none)'}; choose from {','.join(known)}")
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ",".join(MODELS))
    ap.add_argument("--rows", default=None, help="comma-separated rows for every model (default: each model's): " + ",".join(ROWS))
    ap.add_argument("--cal-samples", type=int, default=None, help="calibration images (default 256 photos; 500 CIFAR images for resnet56)")
    ap.add_argument("--eval-limit", type=int, default=None, help="score on N images only (a quick smoke; spread over the classes)")
    ap.add_argument("--eval-threads", type=int, default=1, help="onnxruntime threads for the scores (not the latency)")
    ap.add_argument("--superres-crop", type=int, default=64, help="waifu2x: calibration crop and planning / timing input side")
    ap.add_argument("--work-dir", type=Path, default=ROOT / "build" / "real-models")
    ap.add_argument("--results", type=Path, default=ROOT / "tools" / "results" / "real_models.jsonl")
    ap.add_argument("--markdown", type=Path, default=None, help="write the table, findings, commands and machine here")
    ap.add_argument("--resume", action="store_true", help="skip rows already in --results (same model, row, command, eval size)")
    ap.add_argument("--skip-runtime", action="append", default=[], help="a runtime not to time (ort, ort-mobile, mnn; repeatable or comma-separated)")
    ap.add_argument("--runs", type=int, default=30, help="timed runs per model and runtime")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--runtime-timeout", type=float, default=300.0, help="seconds a runtime may take per model")
    ap.add_argument("--compress-timeout", type=float, default=3600.0, help="seconds one compress may take")
    args = ap.parse_args(argv)
    models = _names(args.models, tuple(MODELS), "--models")
    rows_asked = None if args.rows is None else _names(args.rows, ROWS, "--rows")
    skipped = {n.strip() for s in args.skip_runtime for n in s.split(",") if n.strip()}
    unknown = skipped - set(RUNTIMES)
    if unknown:
        raise SystemExit(f"--skip-runtime {','.join(sorted(unknown))}: choose from {','.join(RUNTIMES)}")
    runtimes = tuple(r for r in RUNTIMES if r not in skipped)
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    done: dict[tuple[Any, ...], dict[str, Any]] = {}
    if args.results.is_file():
        for line in args.results.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                if r.get("status") == "ok":
                    done[row_key(r)] = r
    info = machine()
    print(f"# {info['cpu']}, {info['cores']} cores, {info['memory_gb']} GB, load {info['load_1min']}; commit {info['commit']}", flush=True)
    t0 = time.perf_counter()
    for name in models:
        spec = MODELS[name]
        model = model_file(spec, work)
        scorer = Scorer(spec, model, args, work)
        for row in rows_asked or spec.default_rows:
            if spec.kind == "synthetic" and row == "original":
                continue  # nothing to measure: no scores, no compress
            result = run_row(spec, row, model, scorer, args, work, runtimes, done, info)
            if result is None:
                continue
            args.results.parent.mkdir(parents=True, exist_ok=True)
            with args.results.open("a") as f:
                f.write(json.dumps(result) + "\n")
    print(f"# done in {time.perf_counter() - t0:.0f} s; rows in {rel(args.results)}", flush=True)
    if args.markdown is not None:
        rows = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
        invocation = shlex.join(["python", "tools/bench_real.py", *[rel(a) if os.path.isabs(a) else a
                                                                    for a in (sys.argv[1:] if argv is None else argv)]])
        write_markdown(args.markdown, rows, args.results, invocation)
        print(f"# wrote {rel(args.markdown)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
