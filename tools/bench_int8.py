#!/usr/bin/env python3
"""Low-rank x INT8 (issue 18): original FP32 / INT8 and compressed FP32 / INT8 on the shared models, one
`onnx-tucker compress ... --quantize int8 --quantize-compare` per model (a benchmark, not a test; the
table is docs/int8.md).

    python tools/bench_int8.py --results tools/results/int8.jsonl --markdown docs/int8.md
    python tools/bench_int8.py --models resnet56 --eval-count 500 --results /tmp/int8_smoke.jsonl   # quick

Models (../shared/data/README.md):
- `resnet56`: cifar10-resnets/resnet56.onnx; calibrated (refit and INT8 ranges) on 500 seeded images of
  cifar10/train, scored on cifar10/test (all 10,000 JPEGs unless --eval-count), tools/cifar_npz.py
  preprocessing.
- `fmnist`: the shipped fixtures/fmnist_vgg.onnx; calibrated on 500 seeded Fashion-MNIST train images,
  scored on the 10,000 test images (Debian dataset-fashion-mnist; tools/fmnist_npz.py).
- `darknet`: imagenet/darknet_tiny.onnx; calibrated on photos/bsds500-trainval (256 photos), scored on
  imagenet/val (1,000 images), shorter side 256, centre crop 224, RGB / 255.

Each row is the compress command run in a child process (its wall time: compress + refit + quantize the
compressed model + quantize the original + the four-way measurement), its --report JSON read for the
four-way table (accuracy, top-1 agreement with the FP32 original, output SQNR, size, onnxruntime CPU
latency at 1 thread, batch 1, all four models interleaved) and the per-chain SQNR.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "tools"))


def rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(ROOT.resolve()))
    except ValueError:
        import os

        return os.path.relpath(p.resolve(), ROOT.resolve())


def cifar_files(work: Path, eval_count: int | None) -> tuple[Path, Path]:
    import numpy as np
    from cifar_npz import list_images, load

    cal, test = work / "cifar_cal500_seed0.npz", work / f"cifar_test{eval_count or 'all'}.npz"
    if not cal.exists():
        files = list_images(DATA / "cifar10" / "train")
        pick = np.random.default_rng(0).choice(len(files), 500, replace=False)
        x, y = load([files[i] for i in sorted(pick)])
        np.savez(cal, input=x, labels=y)
    if not test.exists():
        files = list_images(DATA / "cifar10" / "test")
        if eval_count:
            pick = np.random.default_rng(0).choice(len(files), eval_count, replace=False)
            files = [files[i] for i in sorted(pick)]
        x, y = load(files)
        np.savez(test, input=x, labels=y)
    return cal, test


def fmnist_files(work: Path, eval_count: int | None) -> tuple[Path, Path]:
    """500 seeded Fashion-MNIST train images (calibration) and the test set (Debian dataset-fashion-mnist)."""
    import numpy as np
    from fmnist_npz import load_split

    cal, test = work / "fmnist_cal500_seed0.npz", work / f"fmnist_test{eval_count or 'all'}.npz"
    if not cal.exists():
        x, y = load_split("train")
        pick = np.sort(np.random.default_rng(0).choice(len(x), 500, replace=False))
        np.savez(cal, input=x[pick], labels=y[pick])
    if not test.exists():
        x, y = load_split("test")
        if eval_count:
            pick = np.sort(np.random.default_rng(0).choice(len(x), eval_count, replace=False))
            x, y = x[pick], y[pick]
        np.savez(test, input=x, labels=y)
    return cal, test


def command(model: str, work: Path, args: argparse.Namespace) -> list[str]:
    out = work / (model if args.params is None else f"{model}-params{args.params:g}")
    out.mkdir(parents=True, exist_ok=True)
    common = ["--ranks", f"data:{args.fraction:g}", "--quantize", "int8", "--quantize-compare",
              "--quantize-method", args.method, "--threads", "1", "--runs", str(args.runs), "--no-validate", "-q",
              "--report", rel(out / "report.json")]
    if args.runtime_samples is not None:  # the deploy runtimes' agreement / accuracy on more than 32 samples
        common += ["--quantize-runtime-samples", str(args.runtime_samples)]
    if args.params is not None:  # the data allocation meets a parameter budget as well (the x6 size target)
        common[2:2] = ["--target", f"params:{args.params:g}"]
    if model == "resnet56":
        cal, test = cifar_files(work, args.eval_count)
        src = DATA / "cifar10-resnets" / "resnet56.onnx"
        return ["onnx-tucker", "compress", rel(src), rel(out / "int8.onnx"), "--calibrate", rel(cal),
                "--calibration-samples", "500", "--data", rel(test), *common]
    if model == "fmnist":
        cal, test = fmnist_files(work, args.eval_count)
        return ["onnx-tucker", "compress", "fixtures/fmnist_vgg.onnx", rel(out / "int8.onnx"), "--calibrate", rel(cal),
                "--calibration-samples", "500", "--data", rel(test), *common]
    src = DATA / "imagenet" / "darknet_tiny.onnx"
    return ["onnx-tucker", "compress", rel(src), rel(out / "int8.onnx"), "--calibrate",
            rel(DATA / "photos" / "bsds500-trainval"), "--calibration-samples", "256", "--data",
            rel(DATA / "imagenet" / "val"), "--resize-shorter", "256", "--crop", "224", *common]


def run(model: str, work: Path, args: argparse.Namespace) -> dict[str, object]:
    cmd = command(model, work, args)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "onnx_tucker.cli", *cmd[1:]], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    row: dict[str, object] = {"model": model, "params_fraction": args.params, "command": shlex.join(cmd), "wall_s": round(wall, 1),
                              "status": "ok" if proc.returncode == 0 else f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"}
    if proc.returncode == 0:
        rep = json.loads((ROOT / cmd[cmd.index("--report") + 1]).read_text())  # relative to the root, or absolute
        row |= {"comparison": rep["comparison"], "macs_ratio": rep["totals"]["macs_ratio"],
                "quantize_seconds": rep["quantize"]["seconds"], "output_sqnr_db": rep["quantize"]["output_sqnr_db"],
                "chains": [{k: c[k] for k in ("name", "sqnr_db", "cumulative_sqnr_db", "precision")}
                           for c in rep["quantize"]["chains"]],
                "ranks": {lay["name"]: lay.get("ranks") for lay in rep["layers"] if lay.get("kind") != "skip"}}
    return row


def table(rows: list[dict[str, object]]) -> str:
    lines = []
    for r in rows:
        lines += [f"### {r['model']}", "", f"`{r['command']}`", "", f"wall time {r['wall_s']} s; status {r['status']}", ""]
        if r["status"] != "ok":
            continue
        c = r["comparison"]
        lines += [f"{c['samples']} samples of `{c['source']}`; latency onnxruntime CPU, {c['threads']} thread, batch 1, "
                  f"{c['runs']} interleaved runs; MACs x{r['macs_ratio']:.2f} (compressed)", "",
                  "| model | accuracy | top-1 agreement | output SQNR dB | size | size ratio | latency ms | latency ratio |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        ref = c["models"][0]
        for m in c["models"]:
            acc = "-" if m["accuracy"] is None else f"{100 * m['accuracy']:.2f}%"
            sq = "exact" if m["sqnr_db"] is None else f"{m['sqnr_db']:.1f}"
            lines.append(f"| {m['name']} | {acc} | {100 * m['top1_agreement']:.2f}% | {sq} | {m['size_bytes'] / 1e6:.2f} MB | "
                         f"x{ref['size_bytes'] / m['size_bytes']:.2f} | {m['latency_ms']:.3f} | "
                         f"x{ref['latency_ms'] / m['latency_ms']:.2f} |")
        chains = sorted((ch for ch in r["chains"] if ch["sqnr_db"] is not None), key=lambda ch: ch["sqnr_db"])  # type: ignore[union-attr, index]
        if chains:
            worst = ", ".join(f"`{ch['name']}` {ch['sqnr_db']:.1f} dB" for ch in chains[:3])
            lines += ["", f"Chains quantizing worst (SQNR alone): {worst}; median "
                      f"{chains[len(chains) // 2]['sqnr_db']:.1f} dB over {len(chains)} chains."]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet56,darknet")
    ap.add_argument("--fraction", type=float, default=0.5, help="--ranks data:F")
    ap.add_argument("--params", type=float, default=None,
                    help="also --target params:G: the data allocation keeps at most G of the parameters")
    ap.add_argument("--method", default="minmax")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--runtime-samples", type=int, default=None,
                    help="--quantize-runtime-samples: samples each deploy runtime (ORT format, MNN) runs (default 32)")
    ap.add_argument("--eval-count", type=int, default=None, help="CIFAR / Fashion-MNIST test images (default all 10,000)")
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/int8-bench"))
    ap.add_argument("--results", type=Path, default=None, help="append one JSON line per model")
    ap.add_argument("--markdown", type=Path, default=None)
    args = ap.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA}: the shared data is absent")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in args.models.split(","):
        row = run(model, args.work_dir, args)
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("model", "wall_s", "status")}), flush=True)
        if args.results is not None:
            with open(args.results, "a") as f:
                f.write(json.dumps(row) + "\n")
    text = table(rows)
    print(text)
    if args.markdown is not None:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
