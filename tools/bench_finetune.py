"""Fine-tuning benchmark (issue 8; not a test): compress at default EVBMF ranks, then fine-tune with
labels, by distillation only, and the control (the *original* fine-tuned with the same schedule);
top-1 of each ONNX model on the test folder in onnxruntime, wall time of each fine-tuning run.

Every fine-tuning run is the CLI in a fresh process (`python -m onnx_tucker.cli finetune ...`), the
exact command is recorded with its result, and rows are appended to a JSON-lines file as they finish.

    python tools/bench_finetune.py ../shared/data/cifar10-resnets/resnet20.onnx \\
        --train ../shared/data/cifar10/train --test ../shared/data/cifar10/test \\
        --mean 0.4914,0.4822,0.4465 --std 0.2470,0.2435,0.2616 --epochs 3 --optimizer adam \\
        --variants labels,distill,control --work /tmp/ftbench --results tools/results/finetune_resnet20.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def top1(model: Path, x: np.ndarray, y: np.ndarray, threads: int) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    pred = np.concatenate([np.argmax(sess.run(None, {name: x[i : i + 500]})[0], axis=1) for i in range(0, len(x), 500)])
    return float(np.mean(pred == y))


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--train", type=Path, required=True)
    ap.add_argument("--test", type=Path, required=True)
    ap.add_argument("--mean", default=None)
    ap.add_argument("--std", default=None)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--optimizer", default="adam")
    ap.add_argument("--lr", default=None)
    ap.add_argument("--schedule", default="cosine")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads (1: steadiest on a shared machine)")
    ap.add_argument("--variants", default="labels,distill,control")
    ap.add_argument("--compress-args", default="", help="extra arguments for `compress` (quoted)")
    ap.add_argument("--extra", default="", help="extra arguments for every `finetune` run (quoted)")
    ap.add_argument("--tag", default="", help="suffix for the output names of this configuration")
    ap.add_argument("--work", type=Path, default=Path("/tmp/ftbench"))
    ap.add_argument("--results", type=Path, required=True)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m", "onnx_tucker.cli"]
    stem = a.model.stem
    compressed = a.work / f"{stem}.tucker.onnx"
    # Default ranks: the paper's EVBMF. Writes a report for the MAC / parameter ratios.
    rep = a.work / f"{stem}.compress.json"
    cmd = [*py, "compress", str(a.model), str(compressed), "--quiet", "--report", str(rep), *shlex.split(a.compress_args)]
    subprocess.run(cmd, check=True)
    totals = json.loads(rep.read_text())["totals"]

    from onnx_tucker.config import parse_floats
    from onnx_tucker.data import Preprocess, load_data

    pre = Preprocess(None, parse_floats(a.mean, "--mean"), parse_floats(a.std, "--std"))
    import onnx

    from onnx_tucker.graph.torchready import graph_io, io_dtypes, io_shapes

    proto = onnx.load(str(a.model), load_external_data=False)
    (name,), _ = graph_io(proto)
    test = load_data(a.test, [name], io_shapes(proto), io_dtypes(proto), pre)
    x, y = test.inputs[name], test.labels
    assert y is not None
    base = {"model": str(a.model), "test_images": int(len(y)), "totals": totals, "threads": a.threads}
    rows = [("original", a.model), ("compressed", compressed)]
    out_rows = []
    for name, path in rows:
        out_rows.append({**base, "row": name, "top1": top1(path, x, y, a.threads)})
    common = ["--data", str(a.train), "--epochs", str(a.epochs), "--optimizer", a.optimizer, "--schedule", a.schedule,
              "--batch-size", str(a.batch_size), "--torch-threads", str(a.threads), "--device", "cpu"]
    if a.lr:
        common += ["--lr", a.lr]
    if a.mean:
        common += ["--mean", a.mean]
    if a.std:
        common += ["--std", a.std]
    common += shlex.split(a.extra)
    for v in a.variants.split(","):
        out = a.work / f"{stem}.{v}{a.tag}.onnx"
        rpt = a.work / f"{stem}.{v}{a.tag}.json"
        if v == "labels":
            cmd = [*py, "finetune", str(compressed), str(out), *common]
        elif v == "distill":  # unlabelled: the teacher's outputs are the only targets
            cmd = [*py, "finetune", str(compressed), str(out), *common, "--teacher", str(a.model), "--no-labels"]
        elif v == "both":
            cmd = [*py, "finetune", str(compressed), str(out), *common, "--teacher", str(a.model)]
        elif v == "control":
            cmd = [*py, "finetune", str(a.model), str(out), *common]
        else:
            raise SystemExit(f"unknown variant {v}")
        cmd += ["--report", str(rpt)]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - t0
        ft = json.loads(rpt.read_text())["finetune"]
        out_rows.append({**base, "row": v + a.tag, "top1": top1(out, x, y, a.threads), "wall_s": wall,
                         "train_s": ft["seconds"], "epochs": ft["epochs"], "best_epoch": ft["best_epoch"],
                         "val_history": [(h["val_accuracy"], h["val_agreement"]) for h in ft["history"]],
                         "command": "onnx-tucker " + " ".join(shlex.quote(c) for c in cmd[3:])})
        print(json.dumps(out_rows[-1]), flush=True)
        if len(out_rows) == 3:  # the original and compressed rows with the first run
            for r in out_rows[:2]:
                _append(a.results, r)
        _append(a.results, out_rows[-1])
    for r in out_rows:
        print(f"{r['row']:>12}: top-1 {100 * r['top1']:.2f} %" + (f", {r['wall_s']:.0f} s" if "wall_s" in r else ""))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
