"""Subgraph fine-tuning on a real model (issue 20 item 3; not a test): how much a model recovers when an
op no converter takes keeps `finetune` from training it whole, against whole-model distillation.

The shared CIFAR ResNet-20 has no such op, so one is made without changing the model: `--swap K` of its
Relu nodes (evenly spaced) become `ThresholdedRelu(alpha=0)`, which is exactly Relu (checked in
onnxruntime) and which onnx2torch cannot convert. The model is compressed once (`--ranks data:0.5
--calibrate` on unlabeled training images), the same nodes are swapped in the compressed model, and
from that one start:
- `whole`: the Relu model distilled whole (`finetune --no-labels --teacher`, the usual path; with and
  without augmentation, since the parts cannot augment);
- `parts`: the swapped model, trained part by part around the swapped nodes (same options).
Each is scored on the test folder in onnxruntime: top-1, and agreement with the original.

    python tools/bench_subgraph.py ../shared/data/cifar10-resnets/resnet20.onnx \\
        --train /tmp/cifar_cal500.npz --test /tmp/cifar_test.npz --swap 2 --epochs 5 \\
        --work /tmp/sgbench --results tools/results/subgraph_resnet20.jsonl

`--train` / `--test`: .npz files from tools/cifar_npz.py (the test one with labels).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import onnx_tucker as ot  # noqa: E402
from onnx_tucker.config import RankPolicy  # noqa: E402
from onnx_tucker.training import FinetuneConfig  # noqa: E402


def swap_relus(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        if node.name in names:
            assert node.op_type == "Relu", node
            node.op_type = "ThresholdedRelu"
            node.attribute.append(helper.make_attribute("alpha", 0.0))
    return out


def predict(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i : i + 500]})[0] for i in range(0, len(x), 500)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--train", type=Path, required=True)
    ap.add_argument("--test", type=Path, required=True)
    ap.add_argument("--swap", type=int, default=2)
    ap.add_argument("--ranks", default="data:0.5")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--work", type=Path, default=Path("/tmp/sgbench"))
    ap.add_argument("--results", type=Path, default=None)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    orig = onnx.load(a.model)
    relus = [n.name for n in orig.graph.node if n.op_type == "Relu"]
    step = len(relus) / (a.swap + 1)
    names = [relus[int(round(step * (k + 1))) - 1] for k in range(a.swap)]
    test = np.load(a.test)
    x, y = test["x"] if "x" in test else test[test.files[0]], test["labels"]
    ref = predict(orig, x)
    swapped = swap_relus(orig, names)
    assert np.array_equal(predict(swapped, x[:500]), ref[:500]), "ThresholdedRelu(0) differs from Relu"
    comp_path = a.work / "comp.onnx"
    t0 = time.perf_counter()
    if not comp_path.exists():
        ot.compress(a.model, ot.CompressionConfig(ranks=RankPolicy.parse(a.ranks), calibrate=str(a.train), validate=False),
                    output=comp_path)
    comp_s = time.perf_counter() - t0
    comp = onnx.load(comp_path)
    paths = {"orig": a.model, "orig_swapped": a.work / "orig_swapped.onnx", "comp_swapped": a.work / "comp_swapped.onnx"}
    onnx.save(swapped, paths["orig_swapped"])
    onnx.save(swap_relus(comp, names), paths["comp_swapped"])

    def score(model: onnx.ModelProto) -> dict[str, float]:
        p = predict(model, x)
        return {"top1": float(np.mean(p.argmax(1) == y)), "agreement": float(np.mean(p.argmax(1) == ref.argmax(1)))}

    rows = [{"variant": "original", **score(orig)}, {"variant": f"compressed ({a.ranks})", **score(comp),
                                                      "seconds": round(comp_s, 1)}]
    base = dict(epochs=a.epochs, batch_size=a.batch_size, optimizer="adam", lr=a.lr, threads=1, use_labels=False)
    runs = [("whole, --augment", comp_path, a.model, FinetuneConfig(**base, augment=True)),
            ("whole, --no-augment", comp_path, a.model, FinetuneConfig(**base, augment=False)),
            (f"parts ({a.swap} ThresholdedRelu)", paths["comp_swapped"], paths["orig_swapped"], FinetuneConfig(**base, augment=False))]
    for label, student, teacher, cfg in runs:
        out = a.work / (label.split()[0].strip(",") + ("_aug" if cfg.augment else "") + ".onnx")
        r = ot.finetune(student, out, a.train, teacher=teacher, config=cfg)
        rows.append({"variant": label, **score(onnx.load(out)), "seconds": round(r.seconds, 1),
                     "parts": len(r.segments), "trained": r.trainable_params})
    for row in rows:
        row.update(model=a.model.name, swapped=names, ranks=a.ranks, train=str(a.train), test_images=int(len(y)),
                   epochs=a.epochs, lr=a.lr)
        print(json.dumps(row))
        if a.results is not None:
            with open(a.results, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
