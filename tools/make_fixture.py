#!/usr/bin/env python3
"""Build the shipped example model ``fixtures/fmnist_vgg.onnx``.

Trains a small VGG-style CNN on Fashion-MNIST (CPU, deterministic for a given
``--seed``), folds BatchNorm into the convolutions, exports the network to
ONNX (opset 17, dynamic batch axis) with the TorchScript exporter, validates
the file with ``onnx.checker`` and onnxruntime (top-1 accuracy on the full
10,000-image test set, agreement with torch), and writes a JSON metadata file
next to it (``fmnist_vgg.json``).

The data come from the Debian package ``dataset-fashion-mnist`` (gzipped IDX
files in ``/usr/share/datasets/fashion-mnist``); they are read in place and
never copied into the repository.

Model input: float32 ``[N, 1, 28, 28]``, normalised as
``(pixel / 255 - 0.2860) / 0.3530``.  Output: ``logits`` ``[N, 10]``.

Usage::

    python tools/make_fixture.py                     # defaults
    python tools/make_fixture.py --epochs 3 --seed 0 --out fixtures/fmnist_vgg.onnx

``load_fashion_mnist(data_dir, split)`` and ``normalise(images)`` can be
imported from this file for reuse (e.g. in integration tests); they only need
numpy.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "fixtures" / "fmnist_vgg.onnx"

MEAN = 0.2860
STD = 0.3530
OPSET = 17
CLASS_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_INSTALL_HINT = "install it with `apt-get install -y dataset-fashion-mnist` or pass --data-dir"


# --------------------------------------------------------------------------- data


def load_fashion_mnist(data_dir: str | os.PathLike[str] = DEFAULT_DATA_DIR, split: str = "test"):
    """Return ``(images, labels)`` of a Fashion-MNIST split.

    ``images`` is ``uint8 [N, 28, 28]``, ``labels`` is ``int64 [N]``
    (N = 60000 for ``split="train"``, 10000 for ``split="test"``).
    Raises ``FileNotFoundError`` naming the Debian package if the files are missing.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    data_dir = Path(data_dir)
    img_name, lbl_name = _FILES[split]
    img_path, lbl_path = data_dir / img_name, data_dir / lbl_name
    missing = [str(p) for p in (img_path, lbl_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST files not found: {', '.join(missing)}; {_INSTALL_HINT}")

    with gzip.open(img_path, "rb") as f:
        raw = f.read()
    magic, n, rows, cols = np.frombuffer(raw[:16], dtype=">u4")
    if magic != 2051:
        raise ValueError(f"{img_path}: bad IDX image magic {magic}")
    images = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(int(n), int(rows), int(cols)).copy()

    with gzip.open(lbl_path, "rb") as f:
        raw = f.read()
    magic, m = np.frombuffer(raw[:8], dtype=">u4")
    if magic != 2049:
        raise ValueError(f"{lbl_path}: bad IDX label magic {magic}")
    labels = np.frombuffer(raw, dtype=np.uint8, offset=8).astype(np.int64)
    if labels.shape[0] != images.shape[0] or int(m) != images.shape[0]:
        raise ValueError(f"{split}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def normalise(images: np.ndarray) -> np.ndarray:
    """uint8 ``[N, 28, 28]`` -> float32 ``[N, 1, 28, 28]`` model input."""
    x = images.astype(np.float32) / 255.0
    x = (x - np.float32(MEAN)) / np.float32(STD)
    return x[:, None, :, :]


# --------------------------------------------------------------------------- model

# (in, out, maxpool after?) for the five 3x3 convolutions
_CONV_CFG = [(1, 32, False), (32, 64, True), (64, 128, False), (128, 128, True), (128, 128, True)]


def _build(bn: bool):
    import torch.nn as nn

    class VGG(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers: list[nn.Module] = []
            for cin, cout, pool in _CONV_CFG:
                layers.append(nn.Conv2d(cin, cout, 3, padding=1, bias=not bn))
                if bn:
                    layers.append(nn.BatchNorm2d(cout))
                layers.append(nn.ReLU(inplace=True))
                if pool:
                    layers.append(nn.MaxPool2d(2))
            self.features = nn.Sequential(*layers)
            self.flatten = nn.Flatten()
            self.classifier = nn.Sequential(
                nn.Linear(128 * 3 * 3, 256),
                nn.ReLU(inplace=True),
                nn.Dropout(0.3),
                nn.Linear(256, 10),
            )

        def forward(self, x):
            return self.classifier(self.flatten(self.features(x)))

    return VGG()


def fold_batchnorm(trained):
    """Return an eval-mode copy of ``trained`` without BatchNorm / Dropout.

    Conv weights/biases absorb the BN running statistics; Dropout is dropped
    (identity at inference)."""
    import torch
    import torch.nn as nn

    folded = _build(bn=False)
    src = [m for m in trained.features if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    dst = [m for m in folded.features if isinstance(m, nn.Conv2d)]
    assert len(src) == 2 * len(dst)
    with torch.no_grad():
        for i, conv in enumerate(dst):
            c, b = src[2 * i], src[2 * i + 1]
            scale = b.weight / torch.sqrt(b.running_var + b.eps)
            conv.weight.copy_(c.weight * scale[:, None, None, None])
            bias = c.bias if c.bias is not None else torch.zeros_like(b.running_mean)
            conv.bias.copy_((bias - b.running_mean) * scale + b.bias)
        # classifier without Dropout: Linear, ReLU, Linear
        tl = [m for m in trained.classifier if isinstance(m, nn.Linear)]
        fl = [m for m in folded.classifier if isinstance(m, nn.Linear)]
        for s, d in zip(tl, fl, strict=True):
            d.weight.copy_(s.weight)
            d.bias.copy_(s.bias)
    folded.classifier = nn.Sequential(*[m for m in folded.classifier if not isinstance(m, nn.Dropout)])
    return folded.eval()


# --------------------------------------------------------------------------- train / eval


def _predict_torch(model, x: np.ndarray, batch: int = 1000) -> np.ndarray:
    import torch

    model.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            outs.append(model(torch.from_numpy(x[i : i + batch])).numpy())
    return np.concatenate(outs)


def train(model, x: np.ndarray, y: np.ndarray, epochs: int, seed: int, batch: int, lr: float, log=print):
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    n = len(xt)
    steps_per_epoch = n // batch  # drop the last partial batch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.25
    )
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        t0, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
        for s in range(steps_per_epoch):
            idx = perm[s * batch : (s + 1) * batch]
            xb, yb = xt[idx], yt[idx]
            # light augmentation: random horizontal flip (deterministic via gen)
            flip = torch.rand(len(xb), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            out = model(xb)
            loss = F.cross_entropy(out, yb, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(yb)
            loss_sum += loss.item() * len(yb)
            correct += (out.argmax(1) == yb).sum().item()
            if (s + 1) % 100 == 0:
                log(
                    f"  epoch {ep + 1}/{epochs} step {s + 1}/{steps_per_epoch} "
                    f"loss {loss_sum / seen:.4f} acc {correct / seen:.4f} "
                    f"({time.perf_counter() - t0:.0f}s)"
                )
        log(
            f"epoch {ep + 1}: train loss {loss_sum / seen:.4f} acc {correct / seen:.4f} ({time.perf_counter() - t0:.0f}s)"
        )
    return model.eval()


# --------------------------------------------------------------------------- export


def _publish(tmp: str, path: Path) -> None:
    """Give the temp file normal permissions (mkstemp makes it 0600), then os.replace."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def export_onnx(model, path: Path) -> None:
    """Export with the TorchScript exporter to a temp file, then os.replace."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros(1, 1, 28, 28)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.onnx.export(
            model,
            dummy,
            tmp,
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            do_constant_folding=True,
        )
        _publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_json_atomic(obj, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        _publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output .onnx path (default {DEFAULT_OUT})")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--epochs", type=int, default=3, help="training epochs (default 3)")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help=f"Fashion-MNIST IDX .gz folder (default {DEFAULT_DATA_DIR})",
    )
    p.add_argument("--batch-size", type=int, default=128, help="training batch size (default 128)")
    p.add_argument(
        "--lr", type=float, default=3e-3, help="peak learning rate, AdamW + one-cycle (default 3e-3)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument(
        "--min-accuracy",
        type=float,
        default=0.90,
        help="fail if ONNX test accuracy is below this (default 0.90)",
    )
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, flush=True)

    try:
        x_train_u8, y_train = load_fashion_mnist(args.data_dir, "train")
        x_test_u8, y_test = load_fashion_mnist(args.data_dir, "test")
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log(f"data: train {x_train_u8.shape}, test {x_test_u8.shape} from {args.data_dir}")

    import onnx
    import onnxruntime as ort
    import torch

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    x_train, x_test = normalise(x_train_u8), normalise(x_test_u8)

    model = _build(bn=True)
    log(
        f"training {args.epochs} epoch(s), seed {args.seed}, batch {args.batch_size}, lr {args.lr}, {args.threads} thread(s)"
    )
    t0 = time.perf_counter()
    train(model, x_train, y_train, args.epochs, args.seed, args.batch_size, args.lr, log=log)
    train_s = time.perf_counter() - t0
    log(f"training time {train_s:.1f}s")

    torch_logits_bn = _predict_torch(model, x_test)
    folded = fold_batchnorm(model)
    torch_logits = _predict_torch(folded, x_test)
    fold_diff = float(np.abs(torch_logits - torch_logits_bn).max())
    torch_acc = float((torch_logits.argmax(1) == y_test).mean())
    log(f"torch test accuracy {torch_acc:.4f} (BN fold max|diff| {fold_diff:.2e})")
    n_params = int(sum(p.numel() for p in folded.parameters()))

    out = args.out.resolve()
    export_onnx(folded, out)
    onnx_model = onnx.load(str(out))
    onnx.checker.check_model(onnx_model, full_check=True)
    op_types = sorted({n.op_type for n in onnx_model.graph.node})
    forbidden = {"BatchNormalization", "Dropout"} & set(op_types)
    if forbidden:
        raise RuntimeError(f"exported graph still contains {sorted(forbidden)}")

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])
    ort_logits = np.concatenate(
        [sess.run(["logits"], {"input": x_test[i : i + 1000]})[0] for i in range(0, len(x_test), 1000)]
    )
    onnx_acc = float((ort_logits.argmax(1) == y_test).mean())
    max_diff = float(np.abs(ort_logits - torch_logits).max())
    size = out.stat().st_size
    log(f"onnx: {out} {size / 1e6:.2f} MB, ops {op_types}, nodes {len(onnx_model.graph.node)}")
    log(f"onnxruntime test accuracy {onnx_acc:.4f}; max|onnx - torch| {max_diff:.2e}")
    if max_diff > 1e-3:
        raise RuntimeError(f"onnxruntime and torch disagree: max abs diff {max_diff}")
    if onnx_acc < args.min_accuracy:
        raise RuntimeError(f"test accuracy {onnx_acc:.4f} below --min-accuracy {args.min_accuracy}")

    meta = {
        "model": out.name,
        "dataset": "Fashion-MNIST",
        "input_name": "input",
        "output_name": "logits",
        "input_shape": ["batch", 1, 28, 28],
        "normalisation": {"formula": "(pixel / 255 - mean) / std", "mean": MEAN, "std": STD},
        "class_names": CLASS_NAMES,
        "seed": args.seed,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "threads": args.threads,
        "train_time_s": round(train_s, 1),
        "test_accuracy_onnxruntime": onnx_acc,
        "test_accuracy_torch": torch_acc,
        "max_abs_diff_onnx_vs_torch": max_diff,
        "test_images": int(len(y_test)),
        "parameter_count": n_params,
        "onnx_opset": OPSET,
        "op_types": op_types,
        "file_size_bytes": size,
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "onnxruntime_version": ort.__version__,
        "python_version": platform.python_version(),
        "generated_by": "tools/make_fixture.py",
    }
    json_path = out.with_suffix(".json")
    _write_json_atomic(meta, json_path)
    log(f"wrote {out} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
