"""Do ranks rounded to a multiple pay under INT8? Per-layer times of Tucker-2 chains, FP32 and INT8.

For a few layer shapes of ResNet-56 (../shared/data/cifar10-resnets/resnet56.onnx) and Darknet Tiny
(../shared/data/imagenet/darknet_tiny.onnx), the chain at a base rank r0 (about 0.4 x channels, not a
multiple of 2) and at r0 rounded up to a multiple of 4, 8 and 16, timed as `--latency-aware` times a
layer (runtime/layertime.py: the node alone against its chain, real input shape, seeded random weights,
interleaved, minus one run call) in FP32 and in INT8 (quantize/layertime.py: each tiny model quantized
with onnxruntime's quantize_static, QDQ, per-channel). onnxruntime CPU, 1 thread. A benchmark, not a test:

    python tools/bench_int8_ranks.py --runs 200 --markdown docs/int8-ranks.md
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402

from onnx_tucker.graph.model import find_layers, infer_shapes  # noqa: E402
from onnx_tucker.graph.protos import opset_version  # noqa: E402
from onnx_tucker.quantize.layertime import OrtInt8LayerTimer  # noqa: E402
from onnx_tucker.runtime.layertime import OrtLayerTimer  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
MODELS = {
    "resnet56": (DATA / "cifar10-resnets" / "resnet56.onnx", (1, 3, 32, 32)),
    "darknet": (DATA / "imagenet" / "darknet_tiny.onnx", (1, 3, 224, 224)),
}
MULTIPLES = (1, 4, 8, 16)


def _shape_key(lay):  # type: ignore[no-untyped-def]
    return (lay.weight_shape, tuple(lay.input_shape or ()), tuple(sorted((k, str(v)) for k, v in lay.attrs.items())))


def layers_of(name: str, limit: int):  # type: ignore[no-untyped-def]
    path, shape = MODELS[name]
    model = onnx.load(path)
    inp = model.graph.input[0].name
    layers = find_layers(model, infer_shapes(model, {inp: shape}))
    seen, out = set(), []
    for lay in layers:  # distinct 3x3 convs with >= 16 input channels, the largest last
        w = lay.weight_shape
        if lay.op_type != "Conv" or not w or len(w) != 4 or w[2] != 3 or w[1] < 16 or _shape_key(lay) in seen:
            continue
        seen.add(_shape_key(lay))
        out.append(lay)
    return model, out[-limit:] if name == "darknet" else out[:limit]


def ranks_for(c_out: int, c_in: int) -> list[tuple[int, tuple[int, int]]]:
    r0 = [max(3, int(0.4 * c) | 1) for c in (c_out, c_in)]  # odd: a multiple of nothing
    return [(m, tuple(min(c, m * math.ceil(r / m)) for r, c in zip(r0, (c_out, c_in), strict=True)))  # type: ignore[misc]
            for m in MULTIPLES]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--layers", type=int, default=3, help="distinct layer shapes per model")
    ap.add_argument("--models", default="resnet56,darknet")
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    rows = []
    for name in args.models.split(","):
        if not MODELS[name][0].is_file():
            print(f"skip {name}: {MODELS[name][0]} absent")
            continue
        model, layers = layers_of(name, args.layers)
        timers = {"FP32": OrtLayerTimer(opset_version(model), 1, args.warmup, args.runs),
                  "INT8": OrtInt8LayerTimer(opset_version(model), 1, args.warmup, args.runs)}
        for lay in layers:
            w, x = lay.weight_shape, lay.input_shape
            for m, ranks in ranks_for(w[0], w[1]):
                cells = {}
                for prec, timer in timers.items():
                    t = timer.measure(lay, "tucker2", ranks)
                    cells[prec] = t
                row = (name, lay.layer_id, f"{w[1]}->{w[0]} @ {x[2]}x{x[3]}", m, ranks,
                       cells["FP32"].original_ms, cells["FP32"].decomposed_ms,
                       cells["INT8"].original_ms, cells["INT8"].decomposed_ms)
                rows.append(row)
                print(f"{name} {row[2]:>22} round {m:>2} ranks {ranks}: FP32 {row[5]:.4f} / chain {row[6]:.4f} ms; "
                      f"INT8 {row[7]:.4f} / chain {row[8]:.4f} ms", flush=True)
    if args.markdown:
        lines = ["| model | layer (in->out @ HxW) | round to | ranks (R4, R3) | FP32 layer ms | FP32 chain ms | "
                 "INT8 layer ms | INT8 chain ms | INT8 chain vs round 1 |", "|---|---|---:|---|---:|---:|---:|---:|---:|"]
        base: dict[tuple[str, str], float] = {}
        for r in rows:
            if r[3] == 1:
                base[(r[0], r[1])] = r[8]
            rel = r[8] / base[(r[0], r[1])]
            lines.append(f"| {r[0]} | {r[2]} | {r[3]} | {r[4][0]}, {r[4][1]} | {r[5]:.4f} | {r[6]:.4f} | {r[7]:.4f} | "
                         f"{r[8]:.4f} | x{rel:.2f} |")
        args.markdown.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
