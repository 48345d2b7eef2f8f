#!/usr/bin/env python3
"""MAC ratio against latency ratio: default ranks, --latency-aware, --target macs:F (a benchmark, not a test).

For each model and variant: compress in-process (no validation), then time the original and the
compressed model in onnxruntime CPU at 1 thread (sequential, full optimisation), warm-up runs, then
interleaved runs (A B, B A, ...), medians. Prints a Markdown table: MAC ratio, latency ratio and
their quotient (latency ratio / MAC ratio: 1 means the runtime delivers every MAC saved), and for the
latency-aware variants how many layers were reverted, how many kept layers time slower than their
original alone, and the sum of isolated layer times against the whole-model profile. Appends one JSON
line per row to --jsonl. The machine may be shared: medians of interleaved runs, never a single time.

    python tools/make_synthetic.py vgg16 /tmp/vgg16.onnx   # and googlenet, resnet50
    python tools/bench_latency.py ../shared/data/cifar10-resnets/resnet20.onnx /tmp/googlenet.onnx --runs 30
    python tools/bench_latency.py /tmp/vgg16.onnx --target vgg16=0.203   # the paper's x4.93
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnx_tucker as ot  # noqa: E402
from onnx_tucker.graph.load import load_model  # noqa: E402
from onnx_tucker.graph.model import resolve_input_shapes  # noqa: E402
from onnx_tucker.runtime.bench import measure_latency  # noqa: E402

# Whole-network MAC fractions to target: the paper's FLOP ratios (VGG-16 x4.93, GoogLeNet x2.06,
# ../shared/PAPER.md); x2 for the ResNets (the ResNet-56 bar: a MAC ratio of at least x2).
PAPER_FRACTIONS = {"vgg16": 1 / 4.93, "googlenet": 1 / 2.06, "resnet50": 0.5, "resnet20": 0.5, "resnet56": 0.5}


def variants(name: str, fraction: float, latency: float | None) -> list[tuple[str, dict[str, object]]]:
    t = f"macs:{fraction:.3g}"
    found: list[tuple[str, dict[str, object]]] = [
        ("default (EVBMF)", {}),
        ("--latency-aware", {"latency_aware": True}),
        (f"--target {t}", {"target": t}),
        (f"--target {t} --latency-aware", {"target": t, "latency_aware": True}),
    ]
    if latency is not None:
        found.append((f"--target latency:{latency:g}", {"target": f"latency:{latency:g}"}))
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--runs", type=int, default=30, help="interleaved timed runs per model pair (median)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--target", action="append", default=[], metavar="MODEL=F", help="MAC fraction for a model stem")
    ap.add_argument("--latency-target", type=float, default=None, metavar="F", help="also run --target latency:F")
    ap.add_argument("--only", action="append", default=[], help="run only variants whose label contains this")
    ap.add_argument("--jsonl", type=Path, default=None, help="append one JSON line per row")
    args = ap.parse_args()
    fractions = dict(PAPER_FRACTIONS)
    for item in args.target:
        stem, _, f = item.partition("=")
        fractions[stem] = float(f)
    import onnxruntime

    print(f"# {platform.machine()}, {os.cpu_count()} cores (shared), onnxruntime {onnxruntime.__version__}, "
          f"{args.threads} thread(s), {args.warmup} warm-up + {args.runs} interleaved runs, medians")
    print("| model | variant | layers decomposed | MACs | latency ms | latency ratio | quotient | ratio of minima | reverted | kept but slower alone | isolated / profile | s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for model in args.models:
        stem = model.stem
        fraction = fractions.get(stem, 0.5)
        for label, opts in variants(stem, fraction, args.latency_target):
            if args.only and not any(o in label for o in args.only):
                continue
            t0 = time.perf_counter()
            cfg = ot.CompressionConfig.from_options(validate=False, threads=args.threads, **opts)  # type: ignore[arg-type]
            result = ot.compress(model, cfg)
            seconds = time.perf_counter() - t0
            orig = load_model(str(model), lazy=True)
            shapes = resolve_input_shapes(orig, {})
            lat = measure_latency(str(model), result.model, orig, shapes, args.threads, args.warmup, args.runs, cfg.seed)
            plan = result.plan
            reverted = sum(1 for p in plan.layers if p.reason and "in the runtime" in p.reason)
            slower = sum(1 for p in plan.decomposed if p.time_speedup is not None and p.time_speedup < 1)
            s = result.layer_timing
            agree = f"x{s.profile_ratio:.2f}" if s is not None and s.profile_ratio is not None else "-"
            quotient = lat.speedup / result.totals.macs_ratio
            # The fastest run of each: less sensitive to other jobs on a shared machine than the medians.
            min_ratio = min(lat.original_ms) / min(lat.compressed_ms)
            print(f"| {stem} | {label} | {result.decomposed_layers} | x{result.totals.macs_ratio:.2f} | "
                  f"{lat.original_median:.2f} -> {lat.compressed_median:.2f} | x{lat.speedup:.2f} | {quotient:.2f} | x{min_ratio:.2f} | "
                  f"{reverted if s else '-'} | {slower if s else '-'} | {agree} | {seconds:.0f} |", flush=True)
            if args.jsonl is not None:
                row = {"model": stem, "variant": label, "decomposed": result.decomposed_layers,
                       "macs_ratio": result.totals.macs_ratio, "params_ratio": result.totals.params_ratio,
                       "original_ms": lat.original_median, "compressed_ms": lat.compressed_median,
                       "latency_ratio": lat.speedup, "quotient": quotient, "min_ratio": min_ratio, "reverted": reverted,
                       "kept_but_slower": slower, "threads": args.threads, "runs": args.runs,
                       "isolated_ms": s.isolated_ms if s else None, "profiled_ms": s.profiled_ms if s else None,
                       "compress_seconds": seconds,
                       "slow_kinds": sorted({f"{p.op_type} {'x'.join(map(str, p.weight_shape or ()))}"
                                             for p in plan.layers if p.reason and "in the runtime" in p.reason})}
                with args.jsonl.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            del result
            gc.collect()


if __name__ == "__main__":
    main()
