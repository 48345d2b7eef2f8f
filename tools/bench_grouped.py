"""Is a per-group Tucker chain faster than the grouped conv it replaces? (a benchmark, not a test)

For realistic grouped layers (AlexNet conv2/4/5 with group=2, a ResNeXt 3x3 group-32 layer) this
builds the original Conv and per-group decompositions at ranks that cut MACs about 2-4x:

- tucker2: grouped 1x1 S -> G*R3, grouped kxk core G*R3 -> G*R4, grouped 1x1 G*R4 -> T (all group=G)
- tucker1: grouped kxk core S -> G*R4, grouped 1x1 G*R4 -> T (group=G)
- svd (1x1 kernels, ShuffleNet's grouped 1x1): grouped 1x1 S -> G*R, grouped 1x1 G*R -> T (group=G)

Weights are synthetic low-rank-plus-noise per group; the chains come from a per-group HOSVD with
the same ranks in every group, so the factors stay block-diagonal. Latency: onnxruntime CPU,
1 thread, interleaved runs, medians (`onnx_tucker.runtime.bench.measure_latency`). A second table runs
the tool itself (`onnx_tucker.compress`, default EVBMF ranks) on the same layers. Results go to
docs/grouped-convs.md by hand.

    python tools/bench_grouped.py [--runs 40]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnx_tucker as ot  # noqa: E402
from onnx_tucker.numerics.tucker import tucker1, tucker2  # noqa: E402
from onnx_tucker.runtime.bench import measure_latency  # noqa: E402

# name -> (T, S, kernel, group, spatial, pads)
LAYERS = {
    "alexnet.conv2": (256, 96, 5, 2, 27, 2),
    "alexnet.conv4": (384, 384, 3, 2, 13, 1),
    "alexnet.conv5": (256, 384, 3, 2, 13, 1),
    "resnext.conv2(s1)": (128, 128, 3, 32, 56, 1),
    "shufflenet.gconv1x1": (240, 240, 1, 3, 28, 0),
}


def low_rank_group_kernel(rng: np.random.Generator, tg: int, sg: int, k: int, r_out: int, r_in: int) -> np.ndarray:
    core = rng.standard_normal((r_out, r_in, k, k))
    u = np.linalg.qr(rng.standard_normal((tg, r_out)))[0]
    v = np.linalg.qr(rng.standard_normal((sg, r_in)))[0]
    w = np.einsum("ab,bckl,dc->adkl", u, core, v)
    w = w / np.linalg.norm(w) * math.sqrt(tg)
    return w + 0.05 * np.std(w) * rng.standard_normal(w.shape)


def conv_node(x: str, w: str, y: str, k: int, group: int, pad: int) -> onnx.NodeProto:
    return helper.make_node("Conv", [x, w], [y], kernel_shape=[k, k], pads=[pad] * 4, group=group)


def model(nodes: list[onnx.NodeProto], inits: list[np.ndarray], S: int, hw: int) -> onnx.ModelProto:
    tensors = [numpy_helper.from_array(a.astype(np.float32), f"W{i}") for i, a in enumerate(inits)]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, S, hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)],
        tensors,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def chain(kind: str, w: np.ndarray, group: int, ranks: tuple[int, ...], pad: int, S: int, hw: int) -> onnx.ModelProto:
    tg = w.shape[0] // group
    k = w.shape[2]
    blocks = [w[g * tg : (g + 1) * tg].astype(np.float64) for g in range(group)]
    if kind == "tucker2":
        r4, r3 = ranks
        fs = [tucker2(b, r4, r3) for b in blocks]
        first = np.concatenate([f.u_in.T for f in fs])[:, :, None, None]  # G*R3 x Sg
        core = np.concatenate([f.core for f in fs])  # G*R4 x R3 x k x k
        last = np.concatenate([f.u_out for f in fs])[:, :, None, None]  # T x R4
        nodes = [
            conv_node("x", "W0", "a", 1, group, 0),
            conv_node("a", "W1", "b", k, group, pad),
            conv_node("b", "W2", "y", 1, group, 0),
        ]
        return model(nodes, [first, core, last], S, hw)
    if kind == "svd":
        (r,) = ranks
        parts = [np.linalg.svd(b.reshape(tg, -1), full_matrices=False) for b in blocks]
        first = np.concatenate([(vt[:r].T * s[:r]).T for _, s, vt in parts])[:, :, None, None]
        last = np.concatenate([u[:, :r] for u, _, _ in parts])[:, :, None, None]
        return model([conv_node("x", "W0", "b", 1, group, 0), conv_node("b", "W1", "y", 1, group, 0)], [first, last], S, hw)
    (r4,) = ranks
    gs = [tucker1(b, r4) for b in blocks]
    core = np.concatenate([f.core for f in gs])
    last = np.concatenate([f.u_out for f in gs])[:, :, None, None]
    return model([conv_node("x", "W0", "b", k, group, pad), conv_node("b", "W1", "y", 1, group, 0)], [core, last], S, hw)


def macs_per_px(kind: str, T: int, S: int, k: int, group: int, ranks: tuple[int, ...]) -> int:
    tg, sg = T // group, S // group
    if kind == "original":
        return group * tg * sg * k * k
    if kind == "tucker2":
        r4, r3 = ranks
        return group * (sg * r3 + r3 * r4 * k * k + r4 * tg)
    if kind == "svd":
        (r,) = ranks
        return group * r * (sg + tg)
    (r4,) = ranks
    return group * (r4 * sg * k * k + r4 * tg)


def rank_grid(T: int, S: int, k: int, group: int) -> list[tuple[str, tuple[int, ...]]]:
    """Ranks (same ratio on both channel modes) cutting MACs ~2x, ~3x, ~4x, plus Tucker-1 at ~2x."""
    tg, sg = T // group, S // group
    orig = macs_per_px("original", T, S, k, group, ())
    if k == 1:
        return [
            ("svd", (min(range(1, tg + 1), key=lambda r: abs(orig / macs_per_px("svd", T, S, k, group, (r,)) - t)),))
            for t in (2.0, 3.0, 4.0)
        ]
    out = []
    for target in (2.0, 3.0, 4.0):
        best = min(
            ((r4, max(1, round(r4 * sg / tg))) for r4 in range(1, tg + 1)),
            key=lambda r: abs(orig / macs_per_px("tucker2", T, S, k, group, r) - target),
        )
        out.append(("tucker2", best))
    r1 = min(range(1, tg + 1), key=lambda r: abs(orig / macs_per_px("tucker1", T, S, k, group, (r,)) - 2.0))
    out.append(("tucker1", (r1,)))
    return list(dict.fromkeys(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    import onnxruntime

    print(f"onnxruntime {onnxruntime.__version__}, 1 thread, {args.runs} interleaved runs, batch 1")
    print("| layer | decomposition | ranks (per group) | MACs cut | original ms | chain ms | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for name, (T, S, k, group, hw, pad) in LAYERS.items():
        tg, sg = T // group, S // group
        w = np.concatenate(
            [low_rank_group_kernel(rng, tg, sg, k, max(1, tg // 4), max(1, sg // 4)) for _ in range(group)]
        )
        orig = model([conv_node("x", "W0", "y", k, group, pad)], [w], S, hw)
        for kind, ranks in rank_grid(T, S, k, group):
            comp = chain(kind, w, group, ranks, pad, S, hw)
            cut = macs_per_px("original", T, S, k, group, ()) / macs_per_px(kind, T, S, k, group, ranks)
            rep = measure_latency(orig, comp, orig, {"x": (1, S, hw, hw)}, 1, args.warmup, args.runs)
            print(
                f"| {name} {T}x{sg}x{k}x{k} g={group} @{hw}x{hw} | {kind} | {ranks} | {cut:.1f}x | "
                f"{rep.original_median:.3f} | {rep.compressed_median:.3f} | {rep.speedup:.2f}x |",
                flush=True,
            )
    print("\nThe tool, default ranks (EVBMF, ranks per group):")
    print("| layer | plan | ranks (per group) | params cut | MACs cut | original ms | compressed ms | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for name, (T, S, k, group, hw, pad) in LAYERS.items():
        tg, sg = T // group, S // group
        w = np.concatenate(
            [low_rank_group_kernel(rng, tg, sg, k, max(1, tg // 4), max(1, sg // 4)) for _ in range(group)]
        )
        orig = model([conv_node("x", "W0", "y", k, group, pad)], [w], S, hw)
        res = ot.compress(orig, ot.CompressionConfig(samples=1))
        lp = res.plan.layers[0]
        if not lp.decomposed:
            print(f"| {name} | kept: {lp.reason} | | | | | | |")
            continue
        rep = measure_latency(orig, res.model, orig, {"x": (1, S, hw, hw)}, 1, args.warmup, args.runs)
        print(
            f"| {name} | {lp.kind} | {lp.ranks} | {lp.params_before / lp.params_after:.1f}x | "
            f"{lp.macs_before / lp.macs_after:.1f}x | {rep.original_median:.3f} | {rep.compressed_median:.3f} | "
            f"{rep.speedup:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
