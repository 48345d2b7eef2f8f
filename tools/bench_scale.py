#!/usr/bin/env python3
"""How `onnx-tucker compress --no-validate` scales with model size, and what --hooi-iters buys.

Scale table: ResNet-20 and ResNet-56 (../shared/data/cifar10-resnets), GoogLeNet and ResNet-50 (the
onnx wheel's light_* models with realistic weights), VGG-16 and VGG-16 at 512x512 inputs (a 2.3 GB
model with external data), all made by tools/make_synthetic.py when missing (into --work-dir).
Each run is a fresh process (tools/bench_compress.py: wall time, peak RSS from wait4); the table
gives medians over --runs runs and writes Markdown plus a PNG plot (parameters on the x axis).
The >2 GB model is deleted afterwards unless --keep-big.

HOOI table (--hooi-model): the same command with --hooi-iters 0, 1, 2, 4; the parameter-weighted
mean relative kernel error of the Tucker layers (from --save-plan) against the median wall time,
and the error removed per extra second.

    python tools/bench_scale.py --work-dir /tmp/bench --runs 3 --out tools/results/scale
    python tools/bench_scale.py --work-dir /tmp/bench --runs 3 --only none --hooi-model /tmp/bench/resnet50.onnx
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import onnx

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
sys.path.insert(0, str(TOOLS.parent))

import make_synthetic  # noqa: E402
from bench_compress import run_once  # noqa: E402

DATA = TOOLS.parents[1] / "shared" / "data" / "cifar10-resnets"
FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def model_facts(path: Path) -> tuple[int, int]:
    """(float parameters, bytes on disk including external data)."""
    m = onnx.load(str(path), load_external_data=False)
    params = sum(math.prod(t.dims) for t in m.graph.initializer if t.data_type in FLOATS)
    size = path.stat().st_size
    data = path.with_name(path.name + ".data")
    if data.exists():
        size += data.stat().st_size
    return params, size


def ensure(work: Path, name: str) -> Path | None:
    if name in ("resnet20", "resnet56"):
        p = DATA / f"{name}.onnx"
        return p if p.exists() else None
    p = work / f"{name}.onnx"
    if p.exists():
        return p
    print(f"making {p} ...", file=sys.stderr, flush=True)
    if name == "vgg16":
        make_synthetic.vgg16(p)
    elif name == "vgg16_512":
        make_synthetic.vgg16(p, image_size=512)
    else:
        make_synthetic.materialise_light(name, p)
    return p


def bench(path: Path, runs: int, extra: list[str]) -> tuple[float, float, int, list[float]]:
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        res = [run_once(path, extra, tmp) for _ in range(runs)]
    walls = [w for w, _ in res]
    return statistics.median(walls), min(walls), max(r for _, r in res), walls


def plot(rows: list[dict[str, object]], png: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    fig, ax1 = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    x = [float(r["params"]) / 1e6 for r in rows]  # type: ignore[arg-type]
    ax1.loglog(x, [r["wall"] for r in rows], "o-", color="tab:blue", label="wall time (s)")
    ax1.set_xlabel("parameters (millions)")
    ax1.set_ylabel("median wall time (s)", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.loglog(x, [float(r["rss"]) / 1e9 for r in rows], "s--", color="tab:red", label="peak RSS (GB)")  # type: ignore[arg-type]
    ax2.loglog(x, [float(r["size"]) / 1e9 for r in rows], ":", color="gray", label="model file (GB)")  # type: ignore[arg-type]
    ax2.set_ylabel("peak RSS / file size (GB)", color="tab:red")
    for r, xi in zip(rows, x, strict=True):
        ax1.annotate(str(r["name"]), (xi, r["wall"]), textcoords="offset points", xytext=(4, -10), fontsize=7)  # type: ignore[arg-type]
    ax1.set_title("onnx-tucker compress --no-validate (2 shared cores)", fontsize=9)
    fig.legend(loc="upper left", fontsize=7, bbox_to_anchor=(0.12, 0.88))
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def hooi_table(path: Path, runs: int, iters: list[int]) -> list[str]:
    """Settings interleaved run by run (k = 0, 1, 2, 4, 0, 1, ...), so load drift hits them alike."""
    walls: dict[int, list[float]] = {k: [] for k in iters}
    errors: dict[int, float] = {}
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        for _ in range(runs):
            for k in iters:
                plan = Path(tmp) / f"plan{k}.json"
                walls[k].append(run_once(path, ["--no-validate", "--hooi-iters", str(k), "--save-plan", str(plan)], tmp)[0])
                layers = json.loads(plan.read_text())["layers"]
                tucker = [lp for lp in layers if lp["kind"] in ("tucker2", "tucker1") and lp.get("rel_error") is not None]
                w = [lp["params_before"] for lp in tucker]
                errors[k] = sum(lp["rel_error"] * wi for lp, wi in zip(tucker, w, strict=True)) / sum(w)
    rows = [(k, statistics.median(walls[k]), errors[k]) for k in iters]
    t0, e0 = rows[0][1], rows[0][2]
    out = [
        "| --hooi-iters | median wall s | extra s | mean Tucker kernel error (params-weighted) | error removed | per extra second |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for k, t, e in rows:
        extra = t - t0
        gain = e0 - e
        per = f"{gain / extra:.2e}" if k and extra > 0 else "-"
        out.append(f"| {k} | {t:.2f} | {extra:+.2f} | {e:.5f} | {gain:.5f} | {per} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "onnx-tucker-bench")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", default="resnet20,resnet56,googlenet,resnet50,vgg16,vgg16_512",
                    help="comma-separated subset ('none' for no scale table)")
    ap.add_argument("--keep-big", action="store_true", help="keep the >2 GB model afterwards")
    ap.add_argument("--out", type=Path, default=TOOLS / "results" / "scale", help="writes OUT.md and OUT.png")
    ap.add_argument("--hooi-model", type=Path)
    ap.add_argument("--hooi-iters", default="0,1,2,4")
    args = ap.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    import numpy
    import onnxruntime

    head = (
        f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other jobs; Python {platform.python_version()}, "
        f"numpy {numpy.__version__}, onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}. "
        f"`onnx-tucker compress IN OUT --no-validate`, fresh process per run, medians of {args.runs} runs."
    )
    lines = [head, ""]
    rows: list[dict[str, object]] = []
    names = [] if args.only == "none" else args.only.split(",")
    if names:
        lines += [
            "| model | parameters | file MB | median s | min s | peak RSS MB | RSS / file | runs (s) |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
    for name in names:
        path = ensure(args.work_dir, name)
        if path is None:
            lines.append(f"| {name} | missing | | | | | | |")
            continue
        params, size = model_facts(path)
        med, lo, rss, walls = bench(path, args.runs, ["--no-validate"])
        rows.append({"name": name, "params": params, "size": size, "wall": med, "rss": rss})
        lines.append(
            f"| {name} | {params / 1e6:.1f} M | {size / 1e6:.0f} | {med:.2f} | {lo:.2f} | {rss / 1e6:.0f} | "
            f"{rss / size:.2f} | {', '.join(f'{w:.1f}' for w in walls)} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
        if name == "vgg16_512" and not args.keep_big:
            path.unlink()
            path.with_name(path.name + ".data").unlink(missing_ok=True)
    if args.hooi_model:
        lines += ["", f"HOOI sweeps on {args.hooi_model.name}:", ""]
        lines += hooi_table(args.hooi_model, args.runs, [int(k) for k in args.hooi_iters.split(",")])
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if rows:
        args.out.with_suffix(".md").write_text(text)
        plot(rows, args.out.with_suffix(".png"))
    elif args.hooi_model:
        args.out.with_name(args.out.name + "_hooi.md").write_text(text)


if __name__ == "__main__":
    main()
