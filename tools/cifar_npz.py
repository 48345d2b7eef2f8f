"""Write CIFAR-10 JPEGs (an image folder: one sub-folder per class) as a .npz for `--data` / `--calibrate`.

    python tools/cifar_npz.py ../shared/data/cifar10/train /tmp/cifar_cal500.npz --count 500 --seed 0
    python tools/cifar_npz.py ../shared/data/cifar10/test /tmp/cifar_test2000.npz --count 2000 --seed 0

Preprocessing is what the shared CIFAR ResNets expect (../shared/data/README.md): RGB / 255, then per
channel (x - mean) / std with mean (0.4914, 0.4822, 0.4465), std (0.2470, 0.2435, 0.2616), NCHW
float32. Labels: the index of the class folder in sorted order. `--count N` draws N files uniformly
at random (seeded) from the whole folder; without it every file is written, in sorted order.
Needs Pillow.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32)
STD = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32)


def list_images(folder: Path) -> list[tuple[Path, int]]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    return [(f, k) for k, c in enumerate(classes) for f in sorted((folder / c).iterdir()) if f.is_file()]


def load(files: list[tuple[Path, int]]) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    x = np.empty((len(files), 3, 32, 32), dtype=np.float32)
    for i, (f, _) in enumerate(files):
        with Image.open(f) as im:
            a = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        x[i] = ((a - MEAN) / STD).transpose(2, 0, 1)
    return x, np.array([k for _, k in files], dtype=np.int64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--count", type=int, default=None, help="N files drawn at random (seeded); default all")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    files = list_images(args.folder)
    if args.count is not None and args.count < len(files):
        pick = np.sort(np.random.default_rng(args.seed).choice(len(files), args.count, replace=False))
        files = [files[i] for i in pick]
    x, y = load(files)
    np.savez(args.out, input=x, labels=y)
    print(f"wrote {args.out}: {len(y)} images, {np.bincount(y, minlength=10).tolist()} per class")


if __name__ == "__main__":
    main()
