"""Compress the refactor baselines with one source tree, for `tools/compare_models.py` (a check, not a test).

    python tools/make_baselines.py OUT_DIR [--tree PATH]      # PYTHONPATH=PATH for every run (default: this tree)
    python tools/compare_models.py OUT_A/x.onnx OUT_B/x.onnx ...

The 21 models of the rebuild checks: the nine `light_*` models of the onnx wheel at the default EVBMF
ranks, and the fixture plus the three shared CIFAR ResNets at `vbmf`, `full` and `energy:0.9`
(the ResNets are skipped when ../shared/data is absent), plus the fixture calibrated on its shipped sample. Each is one `onnx-tucker compress --no-validate -q`
in a fresh process.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]
LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
RESNETS = ROOT.parent / "shared" / "data" / "cifar10-resnets"


def jobs() -> list[tuple[str, Path, str]]:
    out = [(p.stem, p, "vbmf") for p in sorted(LIGHT.glob("light_*.onnx"))]
    models = [ROOT / "fixtures" / "fmnist_vgg.onnx"] + [RESNETS / f"{n}.onnx" for n in ("resnet20", "resnet56", "resnet56_bn")]
    for m in models:
        if m.is_file():
            out += [(f"{m.stem}.{r.replace(':', '')}", m, r) for r in ("vbmf", "full", "energy:0.9")]
    # Beyond the 21: the calibration path (rank choice on the data and the refit) on the fixture's sample.
    cal = ROOT / "fixtures" / "fmnist_test_500.npz"
    if cal.is_file():
        out.append(("fmnist_vgg.data0.5.cal", ROOT / "fixtures" / "fmnist_vgg.onnx",
                    f"data:0.5 --calibrate {cal} --calibration-samples 200"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--tree", type=Path, default=ROOT)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(args.tree.resolve()))
    for name, model, ranks in jobs():
        dest = args.out / f"{name}.onnx"
        cmd = [sys.executable, "-m", "onnx_tucker.cli", "compress", str(model), str(dest), "--ranks", *ranks.split(), "--no-validate", "-q"]
        r = subprocess.run(cmd, cwd=args.tree, env=env, capture_output=True, text=True)
        print(f"{name}: {'ok' if r.returncode == 0 else 'FAILED ' + r.stderr.strip()}", flush=True)


if __name__ == "__main__":
    main()
