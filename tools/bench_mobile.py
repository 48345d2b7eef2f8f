#!/usr/bin/env python3
"""The compressed models in the runtimes phones use (a benchmark, not a test; table in the README).

For each model: compress it with the default EVBMF ranks (`onnx_tucker.compress`), then
`onnx_tucker.mobile_report` in every runtime (onnxruntime CPU, ORT format, MNN, ncnn via pnnx) at 1
thread: do the outputs agree (max relative error of the compressed model against the original in
onnxruntime, and of the runtime against onnxruntime on the same model), top-1 agreement, latency
before / after (medians of interleaved runs) and the ratio, and the file size in that runtime's
format. Prints a Markdown table; `--json` keeps every report.

    python tools/bench_mobile.py                           # fixture + CIFAR ResNet-20/56 (../shared/data)
    python tools/bench_mobile.py --synthetic googlenet resnet50 vgg16   # + tools/make_synthetic.py models
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnx_tucker as ot  # noqa: E402
from onnx_tucker.report import mobile as fmt  # noqa: E402

RESNETS = ROOT.parent / "shared" / "data" / "cifar10-resnets"


def models(synthetic: list[str], folder: Path) -> list[tuple[str, Path]]:
    found = [("fmnist_vgg (fixture)", ROOT / "fixtures" / "fmnist_vgg.onnx")]
    for name in ("resnet20", "resnet56"):
        path = RESNETS / f"{name}.onnx"
        if path.is_file():
            found.append((f"CIFAR {name}", path))
        else:
            print(f"skipped {name}: {path} not found", file=sys.stderr)
    for name in synthetic:
        out = folder / f"{name}.onnx"
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_synthetic.py"), name, str(out)], check=True)
        found.append((f"{name} (synthetic)", out))
    return found


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synthetic", nargs="*", default=[], choices=["vgg16", "googlenet", "resnet50"])
    ap.add_argument("--runtimes", default="ort,ort-mobile,mnn,ncnn")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--json", type=Path, help="write every report's JSON into this folder")
    args = ap.parse_args(argv)
    print("| model | MACs | runtime | max rel err vs original | runtime vs ORT, same model | top-1 agree "
          "| latency ms before -> after | speed-up | size before -> after |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="bench-mobile-") as tmp:
        folder = Path(tmp)
        for label, path in models(args.synthetic, folder):
            out = folder / (path.stem + ".tucker.onnx")
            res = ot.compress(path, ot.CompressionConfig(validate=False), output=out)
            rep = ot.mobile_report(
                path, out, ot.CompressionConfig(samples=args.samples), runtimes=args.runtimes, layer_plan=res.plan,
                bench_config=ot.BenchConfig(threads=1, warmup=args.warmup, runs=args.runs), timeout=args.timeout,
                json_path=None if args.json is None else args.json / f"{path.stem}.json",
            )
            macs = f"x{rep.totals.macs_ratio:.1f}"
            for r in rep.runtimes:
                o, c, t = r.original, r.compressed, r.timing
                if r.status != "ok" or o is None or c is None:
                    print(f"| {label} | {macs} | {r.name} | {fmt.runtime_status(r)}: "
                          f"{(c.failure if c and c.failure else o.failure if o else '') or ''} | | | | | |")
                    continue
                lat = "-" if t is None else f"{t.original_median:.2f} -> {t.compressed_median:.2f}"
                print(f"| {label} | {macs} | {r.name} | {fmt.err(c.max_rel_error)} | {fmt.err(c.fidelity_rel_error)} | "
                      f"{fmt.pct(c.top1_agreement)} | {lat} | {fmt.speedup(None if t is None else t.speedup)} | "
                      f"{fmt.size(o.size_bytes)} -> {fmt.size(c.size_bytes)} |", flush=True)
            if args.json is not None:
                print(f"<!-- {json.dumps(str(args.json / (path.stem + '.json')))} -->")


if __name__ == "__main__":
    main()
