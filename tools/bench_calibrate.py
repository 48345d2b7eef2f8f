"""Benchmark `compress --calibrate` (issue 11): top-1 of one-shot vs. calibrated models at matched MAC
ratios, for three rank policies, with several calibration set sizes. Not a timed test.

    python tools/bench_calibrate.py --model ../shared/data/cifar10-resnets/resnet20.onnx \\
        --ratios 1.5 2 3 --cal-counts 500 --results tools/results/calibrate_resnet20.jsonl
    python tools/bench_calibrate.py --model ... --policies data --ratios 2 --cal-counts 100 500 2000 ...

Policies, each brought to the same MAC ratio (whole model, Conv/Gemm/MatMul):
- `vbmf`:   EVBMF ranks (the paper) times a `--rank-scale` found by bisection;
- `energy`: `--ranks energy:F`, F found by bisection (weight-space energy per layer);
- `data`:   `--ranks data:1/ratio` (ranks chosen from the layers' outputs on the calibration data);
- `data+refine`: the same, then `--refine` (block-wise recovery on the same images, `--refine-steps`).
For each: the one-shot model (no refit), then `--calibrate` with each calibration set size (drawn
seeded from `--cal-dir`, labels unused), top-1 on the whole `--test-dir` in onnxruntime, and the wall
time of the library's compress call with calibration (rank selection + decomposition + refit, no
validation). CIFAR images preprocessed as tools/cifar_npz.py; `--fmnist` for the Fashion-MNIST fixture
(Debian dataset-fashion-mnist, tools/fmnist_npz.py). Rows are appended to `--results` as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from onnx_tucker import api  # noqa: E402
from onnx_tucker.config import CompressionConfig, RankPolicy  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def cifar(folder: Path, count: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from cifar_npz import list_images, load

    files = list_images(folder)
    if count is not None and count < len(files):
        pick = np.sort(np.random.default_rng(seed).choice(len(files), count, replace=False))
        files = [files[i] for i in pick]
    return load(files)


def fmnist(split: str, count: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from fmnist_npz import load_split

    x, y = load_split(split)
    if count is not None and count < len(x):
        pick = np.sort(np.random.default_rng(seed).choice(len(x), count, replace=False))
        x, y = x[pick], y[pick]
    return x, y


def predictions(model, x: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return np.concatenate([np.argmax(s.run(None, {name: x[i : i + 500]})[0], axis=1) for i in range(0, len(x), 500)])


def top1(model, x: np.ndarray, labels: np.ndarray) -> float:  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    logits = np.concatenate([s.run(None, {name: x[i : i + 500]})[0] for i in range(0, len(x), 500)])
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def macs_ratio(model, cfg: CompressionConfig) -> float:  # type: ignore[no-untyped-def]
    t = api.plan(model, cfg).totals()
    return t["macs_before"] / max(t["macs_after"], 1)


def matched(model, policy: str, ratio: float) -> CompressionConfig:  # type: ignore[no-untyped-def]
    """A weight-space config whose plan has about `ratio` fewer MACs (bisection on its parameter)."""
    lo, hi = (0.05, 3.0) if policy == "vbmf" else (0.3, 0.99999)

    def cfg(v: float) -> CompressionConfig:
        if policy == "vbmf":
            return CompressionConfig(ranks=RankPolicy("vbmf"), rank_scale=v, validate=False)
        return CompressionConfig(ranks=RankPolicy("energy", v), validate=False)

    for _ in range(18):  # the ratio falls as rank scale / energy rises
        mid = (lo + hi) / 2
        if macs_ratio(model, cfg(mid)) > ratio:
            lo = mid
        else:
            hi = mid
    return cfg(lo)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=SHARED / "cifar10-resnets" / "resnet20.onnx")
    ap.add_argument("--fmnist", action="store_true", help="Fashion-MNIST data (the fixture) instead of CIFAR-10")
    ap.add_argument("--cal-dir", type=Path, default=SHARED / "cifar10" / "train")
    ap.add_argument("--test-dir", type=Path, default=SHARED / "cifar10" / "test")
    ap.add_argument("--test-count", type=int, default=None, help="default: the whole test set")
    ap.add_argument("--policies", nargs="+", default=["vbmf", "energy", "data"])
    ap.add_argument("--ratios", nargs="+", type=float, default=[1.5, 2.0, 3.0])
    ap.add_argument("--cal-counts", nargs="+", type=int, default=[500])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", type=Path, default=None)
    ap.add_argument("--refine-steps", type=int, default=200, help="data+refine: Adam steps per block")
    a = ap.parse_args()

    import onnx

    model = onnx.load(str(a.model))
    if a.fmnist:
        x_test, y_test = fmnist("test", a.test_count, a.seed)
        cals = {n: fmnist("train", n, a.seed)[0] for n in a.cal_counts}
    else:
        x_test, y_test = cifar(a.test_dir, a.test_count, a.seed)
        cals = {n: cifar(a.cal_dir, n, a.seed)[0] for n in a.cal_counts}
    base = top1(model, x_test, y_test)
    base_pred = predictions(model, x_test)
    print(f"{a.model.name}: original top-1 {100 * base:.2f} % on {len(y_test)} test images", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-calibrate-"))
    name = model.graph.input[0].name
    cal_paths = {}
    for n, x in cals.items():
        cal_paths[n] = tmp / f"cal{n}.npz"
        np.savez(cal_paths[n], **{name: x})
    print("| policy | MACs | params | one-shot | calibration images | calibrated | agreement | wall time |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for ratio in a.ratios:
        for policy in a.policies:
            if policy in ("data", "data+refine"):
                weight_cfg = None
            else:
                weight_cfg = matched(model, policy, ratio)
                one = api.compress(model, weight_cfg)
                acc0 = top1(one.model, x_test, y_test)
            for n, path in cal_paths.items():
                if policy in ("data", "data+refine"):
                    cfg = CompressionConfig(ranks=RankPolicy("data", 1.0 / ratio), calibrate=str(path), validate=False,
                                            calibration_samples=n, seed=a.seed, refine=policy == "data+refine",
                                            refine_steps=a.refine_steps)
                else:
                    assert weight_cfg is not None
                    from dataclasses import replace

                    cfg = replace(weight_cfg, calibrate=str(path), calibration_samples=n, seed=a.seed)
                t0 = time.perf_counter()
                res = api.compress(model, cfg)
                wall = time.perf_counter() - t0
                if policy in ("data", "data+refine"):  # its one-shot: the same ranks without the refit
                    plan_path = tmp / "plan.json"
                    plan_path.write_text(res.plan.to_json())
                    acc0 = top1(api.compress(model, CompressionConfig(plan_file=str(plan_path), validate=False)).model,
                                x_test, y_test)
                pred = predictions(res.model, x_test)
                acc1 = float(np.mean(pred == y_test))
                name_of = str(cfg.ranks) + (" + refine" if policy == "data+refine" else "")
                row = {"model": a.model.name, "original": base, "policy": name_of if policy != "vbmf" else
                       f"vbmf x{cfg.rank_scale:.3f}", "target_ratio": ratio, "agreement": float(np.mean(pred == base_pred)),
                       "refine_steps": a.refine_steps if policy == "data+refine" else None, "macs_ratio": res.totals.macs_ratio,
                       "params_ratio": res.totals.params_ratio, "one_shot": acc0, "cal_images": n, "calibrated": acc1,
                       "wall_s": wall, "test_images": int(len(y_test))}
                print(f"| {row['policy']} | x{res.totals.macs_ratio:.2f} | x{res.totals.params_ratio:.2f} | "
                      f"{100 * acc0:.2f} % | {n} | {100 * acc1:.2f} % | {100 * row['agreement']:.1f} % | {wall:.0f} s |",
                      flush=True)
                if a.results is not None:
                    with open(a.results, "a") as f:
                        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
