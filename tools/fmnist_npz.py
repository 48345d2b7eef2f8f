"""Write Fashion-MNIST test images as a validation .npz for `onnx-tucker compress --data`.

    python tools/fmnist_npz.py /tmp/fmnist_test.npz            # all 10,000 test images + labels
    onnx-tucker compress fixtures/fmnist_vgg.onnx /tmp/fm.onnx --data /tmp/fmnist_test.npz

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
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    args = ap.parse_args()
    images, labels = load_fashion_mnist(args.data_dir, args.split)
    images, labels = images[: args.count], labels[: args.count]
    np.savez(args.out, input=normalise(images), labels=labels)
    print(f"wrote {args.out}: {len(labels)} images")


if __name__ == "__main__":
    main()
