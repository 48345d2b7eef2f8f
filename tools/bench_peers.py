#!/usr/bin/env python3
"""onnx-tucker's decomposition against the tensorly-based peers, layer by layer, in the same run.

For every Conv / Gemm of a model (by default the synthetic VGG-16 of tools/make_synthetic.py), at
the ranks onnx-tucker's EVBMF chooses:
- ours:      EVBMF rank selection + HOSVD (Tucker-2/-1) or truncated SVD, as `compress` runs it
             (Gram matrix and tridiagonal reduction shared, float32 read in blocks);
- ours+HOOI: the same with `--hooi-iters H` (default 2);
- tensorly:  `tensorly.decomposition.partial_tucker(W, rank, modes=[0, 1], init="svd")` on the convs
             (what pytorch-tensor-decompositions and tensorly-torch run; modes=[0] for Tucker-1
             layers) and `np.linalg.svd(W, full_matrices=False)` truncated for the FC layers;
             no rank selection is timed for the peers (they are given our ranks);
- tltorch:   `tltorch.FactorizedConv.from_conv(conv, rank=(R4, R3, k, k), factorization="tucker")`
             per conv, when tensorly-torch is installed.
Relative reconstruction errors ||W - W_hat||_F / ||W||_F are computed the same way for all.
The variants of one layer run back to back (interleaved), so machine noise hits all alike;
totals are medians over --runs runs.

    python tools/bench_peers.py /tmp/bench/vgg16.onnx --runs 3 --markdown tools/results/peers.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnx_tucker.config import CompressionConfig  # noqa: E402
from onnx_tucker.graph import lazyload  # noqa: E402
from onnx_tucker.graph.load import load_model  # noqa: E402
from onnx_tucker.graph.model import ModelIndex, find_layers, infer_shapes, resolve_input_shapes  # noqa: E402
from onnx_tucker.numerics.spectral import LayerSpectra, single_threaded_lapack  # noqa: E402
from onnx_tucker.ops import svd_matrix
from onnx_tucker.planning.decompose import decompose_layer  # noqa: E402
from onnx_tucker.planning.planner import plan_layer  # noqa: E402


def _rel(w: np.ndarray, approx: np.ndarray) -> float:
    w64 = np.asarray(w, dtype=np.float64)
    return float(np.linalg.norm(w64 - approx) / np.linalg.norm(w64))


def _ours(layer, w, hooi):  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    spectra = LayerSpectra()
    with single_threaded_lapack():
        lp = plan_layer(layer, lambda _: w, CompressionConfig(validate=False), None, spectra)
        if not lp.decomposed:
            return lp, None, time.perf_counter() - t0
        f = decompose_layer(layer, lp, w, hooi, spectra)
    return lp, f.rel_error, time.perf_counter() - t0


def _tensorly(layer, lp, w):  # type: ignore[no-untyped-def]
    import tensorly
    from tensorly.decomposition import partial_tucker

    t0 = time.perf_counter()
    if lp.kind == "svd":
        m = svd_matrix(layer, w)
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        r = lp.ranks[0]
        approx = (u[:, :r] * s[:r]) @ vt[:r]
        dt = time.perf_counter() - t0
        return _rel(m, approx), dt
    modes = [0, 1] if lp.kind == "tucker2" else [0]
    with tensorly.backend_context("numpy"):  # importing tltorch switches the global backend to torch
        (core, factors), _ = partial_tucker(w, rank=list(lp.ranks), modes=modes, init="svd")
    dt = time.perf_counter() - t0
    approx = _tucker_rebuild(core, factors, modes)
    return _rel(w, approx), dt


def _tucker_rebuild(core, factors, modes):  # type: ignore[no-untyped-def]
    out = np.asarray(core, dtype=np.float64)
    for f, m in zip(factors, modes, strict=True):
        out = np.moveaxis(np.moveaxis(out, m, -1) @ np.asarray(f, dtype=np.float64).T, -1, m)
    return out


def _tltorch(layer, lp, w):  # type: ignore[no-untyped-def]
    try:
        import tltorch
        import torch
    except ImportError:
        return None, None
    if lp.kind == "svd" or layer.op_type != "Conv":
        return None, None
    t, s, kh, kw = w.shape
    conv = torch.nn.Conv2d(s, t, (kh, kw), bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(w)))
    rank = (lp.ranks[0], lp.ranks[1] if lp.kind == "tucker2" else s, kh, kw)
    t0 = time.perf_counter()
    fc = tltorch.FactorizedConv.from_conv(conv, rank=rank, factorization="tucker", decompose_weights=True,
                                          implementation="factorized")
    dt = time.perf_counter() - t0
    approx = fc.weight.to_tensor().detach().numpy().astype(np.float64).reshape(w.shape)
    return _rel(w, approx), dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--hooi", type=int, default=2, help="HOOI sweeps of the 'ours+HOOI' variant")
    ap.add_argument("--no-tltorch", action="store_true")
    ap.add_argument("--markdown", type=Path, help="also write the tables here")
    args = ap.parse_args()

    model = load_model(args.model, lazy=True)
    base = args.model.resolve().parent
    shapes = infer_shapes(model, resolve_input_shapes(model, {}))
    index = ModelIndex(model)
    layers = [lay for lay in find_layers(model, shapes, index) if not lay.skip_reason]

    def read(name: str) -> np.ndarray:
        t = index.initializers.get(name)
        return lazyload.read_array(t, base) if t is not None and lazyload.is_external(t) else index.constant_value(name)

    import tensorly

    try:
        import tltorch

        tlt_version = tltorch.__version__
    except ImportError:
        tlt_version = "not installed"
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared), Python {platform.python_version()}, "
        f"numpy {np.__version__}, tensorly {tensorly.__version__}, tensorly-torch {tlt_version}. "
        f"Model: {args.model.name}. {args.runs} runs, variants interleaved per layer.",
        "",
    ]
    per_run: list[dict[str, float]] = []
    rows: dict[str, dict[str, list[float]]] = {}
    for run in range(args.runs):
        tot = {"ours": 0.0, "ours_hooi": 0.0, "tensorly": 0.0, "tltorch": 0.0, "tltorch_ours": 0.0}
        for lay in layers:
            w = read(lay.weight_name or "")
            lp, e0, t0 = _ours(lay, w, 0)
            if e0 is None:
                continue
            _, eh, th = _ours(lay, w, args.hooi)
            et, tt = _tensorly(lay, lp, w)
            el, tl_ = (None, None) if args.no_tltorch else _tltorch(lay, lp, w)
            tot["ours"] += t0
            tot["ours_hooi"] += th
            tot["tensorly"] += tt
            if tl_ is not None:
                tot["tltorch"] += tl_
                tot["tltorch_ours"] += t0
            r = rows.setdefault(lay.layer_id, {})
            for k, v in (("kind", 0), ("t_ours", t0), ("e_ours", e0), ("t_hooi", th), ("e_hooi", eh), ("t_tl", tt),
                         ("e_tl", et), ("t_tlt", tl_), ("e_tlt", el)):
                if k == "kind":
                    r.setdefault("meta", [f"{lp.kind} {'x'.join(map(str, lay.weight_shape or ()))} r={lp.ranks}"])  # type: ignore[list-item]
                elif v is not None:
                    r.setdefault(k, []).append(float(v))
            del w
        per_run.append(tot)
        print(f"run {run + 1}: " + ", ".join(f"{k} {v:.2f} s" for k, v in tot.items()), file=sys.stderr, flush=True)

    def med(xs: list[float] | None) -> str:
        return f"{statistics.median(xs):.3f}" if xs else "-"

    lines += [
        f"| layer | kind, shape, ranks | ours s | ours err | ours+HOOI({args.hooi}) s | err | tensorly s | err | tltorch s | err |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['meta'][0]} | {med(r.get('t_ours'))} | {med(r.get('e_ours'))} | {med(r.get('t_hooi'))} | "
            f"{med(r.get('e_hooi'))} | {med(r.get('t_tl'))} | {med(r.get('e_tl'))} | {med(r.get('t_tlt'))} | {med(r.get('e_tlt'))} |"
        )
    m = {k: statistics.median(t[k] for t in per_run) for k in per_run[0]}
    lines += [
        "",
        "| total (median of runs) | seconds | speed-up of ours |",
        "|---|---:|---:|",
        f"| ours (EVBMF + HOSVD / SVD) | {m['ours']:.2f} | 1.00x |",
        f"| ours + HOOI({args.hooi}) | {m['ours_hooi']:.2f} | {m['ours_hooi'] / m['ours']:.2f}x |",
        f"| tensorly partial_tucker + numpy SVD | {m['tensorly']:.2f} | {m['tensorly'] / m['ours']:.2f}x (vs ours+HOOI: "
        f"{m['tensorly'] / m['ours_hooi']:.2f}x) |",
    ]
    if m["tltorch"] > 0:
        lines.append(f"| tltorch from_conv (convs only) vs ours on the same convs | {m['tltorch']:.2f} vs "
                     f"{m['tltorch_ours']:.2f} | {m['tltorch'] / max(m['tltorch_ours'], 1e-9):.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
