"""Benchmark `compress --calibrate` (issue 11): top-1 of one-shot vs. calibrated CIFAR ResNets.

    python tools/bench_calibrate.py                      # ResNet-20, the README table
    python tools/bench_calibrate.py --model ../shared/data/cifar10-resnets/resnet56.onnx \
        --ranks vbmf energy:0.97 --methods full

For each rank policy: decompose (the library path `compress` runs), measure top-1 of the one-shot
model on the test images, then refit with each calibration method on the calibration images and
measure again, with the wall time of the refit alone. Calibration images: `--cal-count` drawn
(seeded) from `--cal-dir` (labels unused); test images: `--test-count` drawn (seeded) from
`--test-dir`; preprocessing as tools/cifar_npz.py. Not a timed test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from cifar_npz import list_images, load  # noqa: E402

from onnx_tucker import api  # noqa: E402
from onnx_tucker.config import CompressionConfig, RankPolicy  # noqa: E402
from onnx_tucker.graph.rewrite import apply_replacements  # noqa: E402
from onnx_tucker.runtime.calibrate import CalibrationOptions, calibrate_model  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def images(folder: Path, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    files = list_images(folder)
    pick = np.sort(np.random.default_rng(seed).choice(len(files), min(count, len(files)), replace=False))
    return load([files[i] for i in pick])


def top1(model, x: np.ndarray, labels: np.ndarray) -> float:  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    logits = np.concatenate([s.run(None, {name: x[i : i + 250]})[0] for i in range(0, len(x), 250)])
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=SHARED / "cifar10-resnets" / "resnet20.onnx")
    ap.add_argument("--cal-dir", type=Path, default=SHARED / "cifar10" / "train")
    ap.add_argument("--test-dir", type=Path, default=SHARED / "cifar10" / "test")
    ap.add_argument("--cal-count", type=int, nargs="+", default=[500])
    ap.add_argument("--test-count", type=int, default=2000)
    ap.add_argument("--ranks", nargs="+", default=["energy:0.99", "energy:0.97", "ratio:0.75", "energy:0.9", "vbmf"])
    ap.add_argument("--methods", nargs="+", default=["last", "joint", "full"])
    ap.add_argument("--rows", type=int, default=CalibrationOptions().rows)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-residual", action="store_true", help="no residual compensation (CalibrationOptions.residual)")
    args = ap.parse_args()

    import onnx

    model = onnx.load(str(args.model))
    x_test, y_test = images(args.test_dir, args.test_count, args.seed)
    cal = {n: images(args.cal_dir, n, args.seed)[0] for n in args.cal_count}
    base = top1(model, x_test, y_test)
    print(f"{args.model.name}: original top-1 {100 * base:.2f} % on {len(y_test)} images of {args.test_dir}")
    print(f"residual compensation: {'off' if args.no_residual else 'on'}; rows per layer: {args.rows}")
    print("| ranks | MACs | one-shot | calibration images | method | calibrated | refit time |")
    print("|---|---|---|---|---|---|---|")
    for spec in args.ranks:
        cfg = CompressionConfig(ranks=RankPolicy.parse(spec), validate=False)
        result = api.compress(model, cfg)
        prep = api._prepare(model, cfg)
        _, reps = api._plan_and_decompose(prep, cfg, None)
        one_shot = apply_replacements(model, reps)
        acc0 = top1(one_shot, x_test, y_test)
        for n, x_cal in cal.items():
            batches = [{model.graph.input[0].name: x_cal[i : i + 64]} for i in range(0, len(x_cal), 64)]
            for method in args.methods:
                comp = copy.deepcopy(one_shot)
                t = time.perf_counter()
                calibrate_model(model, comp, reps, batches, CalibrationOptions(method=method, rows=args.rows, seed=args.seed,
                                                                            residual=not args.no_residual))
                dt = time.perf_counter() - t
                acc1 = top1(comp, x_test, y_test)
                print(f"| `{spec}` | x{result.totals.macs_ratio:.2f} | {100 * acc0:.2f} % | {n} | {method} | "
                      f"{100 * acc1:.2f} % | {dt:.1f} s |", flush=True)


if __name__ == "__main__":
    main()
