"""Write Fashion-MNIST test images as a validation .npz for `onnx-tucker compress --data`.

    python tools/fmnist_npz.py /tmp/fmnist_test.npz            # all 10,000 test images + labels
    onnx-tucker compress fixtures/fmnist_vgg.onnx /tmp/fm.onnx --data /tmp/fmnist_test.npz
    python tools/fmnist_npz.py fixtures/fmnist_test_500.npz --per-class 50   # the shipped sample

The shipped sample (`fixtures/fmnist_test_500.npz`, what the README's first command validates on) is
the first 50 test images of each class, in test-set order, written compressed.

The arrays are normalised exactly as the shipped fixture expects (see fixtures/fmnist_vgg.json).
Needs the Debian package dataset-fashion-mnist.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixture import DEFAULT_DATA_DIR, load_fashion_mnist, normalise  # noqa: E402


def load_split(split: str, data_dir: Path = DEFAULT_DATA_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images normalised as the fixture expects, labels) of the "train" or "test" split."""
    images, labels = load_fashion_mnist(data_dir, split)
    return normalise(images), labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--split", default="test", choices=["train", "test"])
    ap.add_argument("--count", type=int, default=None, help="first N images only")
    ap.add_argument("--per-class", type=int, default=None, help="the first N images of each class only (balanced)")
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    args = ap.parse_args()
    images, labels = load_fashion_mnist(args.data_dir, args.split)
    if args.per_class is not None:
        keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[: args.per_class] for c in np.unique(labels)]))
        images, labels = images[keep], labels[keep]
    images, labels = images[: args.count], labels[: args.count]
    # Compressed: the normalised background is one repeated value, so a few hundred images stay small.
    np.savez_compressed(args.out, input=normalise(images), labels=labels.astype(np.int64))
    print(f"wrote {args.out}: {len(labels)} images")


if __name__ == "__main__":
    main()
