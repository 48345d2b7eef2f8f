"""Block-wise recovery on calibration data (`compress --calibrate DATA --refine`): after the layer-wise
refit, the factors of each block of decomposed layers are optimised by gradient descent so that the
compressed block reproduces the original block's output on the calibration set (BRECQ-style block
reconstruction, Li et al., ICLR 2021, applied to the factors instead of quantisation steps). No labels:
it matches intermediate tensors, whatever the model's outputs mean.

A block is a run of consecutive decomposed layers (at most `RefineOptions.window`), ended early by a
layer whose output only feeds an `Add` (a residual branch: the block then ends at the Add, so its
target is the original sum and the skip path's error is absorbed too). Blocks are refined in graph
order, each one on the *compressed* model's input with every earlier block already refined (as the
refit is), against the original model's tensors of the same names. A block's segment (graph layer:
`extract_segment`) is converted to torch (onnx2torch) with only its factor convolutions trainable;
its other nodes (ReLU, pooling, BN folded into the factors, ...) are kept as they are.

Never worse: a share of the calibration images is held out; a block's new factors are kept only when
its held-out relative error falls, otherwise the refit's factors stay.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from ..graph.probe import (
    ElementTypes,
    extract_segment,
    factor_chain,
    node_io,
    prepare_for_torch,
    residual_partner,
    write_initializers,
)
from ..graph.rewrite import Replacement
from ..runtime.activations import ActivationCache
from .convert import import_torch
from .segment import bind_parameters, segment_module, trained_values


@dataclass(frozen=True)
class RefineOptions:
    # Adam steps per block, on minibatches of `batch` images. ResNet-56 at x2 MACs, 500 CIFAR images:
    # see docs/calibration.md for what steps bought.
    steps: int = 200
    batch: int = 32
    lr: float = 1e-3  # Adam, cosine-decayed to 0 over the steps (the start is the refit's optimum)
    window: int = 3  # most decomposed layers per block
    held_out: float = 0.2  # share of the calibration images that judges each block
    max_bytes: int = 1 << 30  # inputs + targets of one block held for training; fewer images beyond
    seed: int = 0
    threads: int = 1  # torch CPU threads (2-core machines: 1 was measured fastest for training)


@dataclass(frozen=True)
class BlockRefinement:
    """One block: its layers, the tensors matched, and the held-out relative squared error of those
    tensors with the refit's factors (`error_before`) and after gradient descent (`error_after`);
    `kept`: whether the new factors were kept (only when they are better on the held-out images)."""

    layers: tuple[str, ...]
    targets: tuple[str, ...]
    error_before: float
    error_after: float
    kept: bool
    images: int
    seconds: float
    note: str | None = None


def _ends_at_add(model: onnx.ModelProto, tensor: str) -> str | None:
    """The output of the Add that is `tensor`'s only reader (a residual branch's end), else None."""
    if residual_partner(model, tensor) is None:
        return None
    for node in model.graph.node:
        if tensor in node.input:
            return node.output[0]
    return None


def blocks_of(original: onnx.ModelProto, replacements: Mapping[int, Replacement], window: int) -> list[tuple[list[int], str]]:
    """The blocks, in graph order: (node indices of the original's decomposed layers, the tensor the
    block ends at: the last layer's output, or the Add its residual branch ends in)."""
    out: list[tuple[list[int], str]] = []
    current: list[int] = []
    for idx in sorted(replacements):
        current.append(idx)
        y = node_io(original, idx)[1]
        add = _ends_at_add(original, y)
        if add is not None or len(current) >= window:
            out.append((current, add or y))
            current = []
    if current:
        out.append((current, node_io(original, current[-1])[1]))
    return out


def _block_segment(compressed: onnx.ModelProto, chains: Sequence[Any], target: str,
                   types: ElementTypes) -> tuple[Any, list[str], dict[str, tuple[str, ...]]]:
    """The block's segment of `compressed` (everything computed before its first chain node is known),
    its data inputs in the order the converted module takes them, and per factor node its initializer
    inputs (`prepare_for_torch`: the nodes are renamed `n0`, `n1`, ..., unread graph inputs dropped)."""
    produced = {t for c in chains for t in c.produced}
    nodes = compressed.graph.node
    first = min(i for i, n in enumerate(nodes) if any(o in produced for o in n.output))
    known = types.of([o for n in nodes[:first] for o in n.output if o])
    seg = extract_segment(compressed, [target], known, live_out=True, types=types)
    feeds, owned = prepare_for_torch(seg)
    weights = {w for c in chains for w in c.weights}
    factors = {node.name: owned[node.name] for node in seg.model.graph.node
               if len(node.input) > 1 and node.input[1] in weights and any(o in produced for o in node.output)}
    return seg, feeds, factors


def _stack(values: Any, names: Sequence[str], limit: int) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    count = 0
    for batch in values:
        for n, v in zip(names, batch, strict=True):
            parts[n].append(np.asarray(v, dtype=np.float32))
        count += int(np.asarray(batch[0]).shape[0])
        if count >= limit:
            break
    return {n: np.concatenate(v)[:limit] for n, v in parts.items()}


def _outputs(module: Any, xs: Mapping[str, Any], feeds: Sequence[str], take: Any, matched: Sequence[int]) -> list[Any]:
    outs = module(*[xs[n][take] for n in feeds])
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    return [outs[k] for k in matched]


def _relative_error(torch: Any, module: Any, xs: Mapping[str, Any], ys: Sequence[Any], feeds: Sequence[str],
                    matched: Sequence[int], idx: np.ndarray, batch: int) -> float:
    """sum ||out - y||^2 / sum ||y||^2 over the images `idx`, all matched tensors together."""
    num = den = 0.0
    with torch.no_grad():
        for s in range(0, len(idx), batch):
            take = torch.from_numpy(idx[s : s + batch])
            for o, y in zip(_outputs(module, xs, feeds, take, matched), ys, strict=True):
                yt = y[take]
                num += float(((o - yt) ** 2).sum())
                den += float((yt**2).sum())
    return num / den if den > 0 else num


def refine_blocks(
    original: onnx.ModelProto,
    compressed: onnx.ModelProto,
    replacements: Mapping[int, Replacement],
    batches: Sequence[Mapping[str, np.ndarray]],
    options: RefineOptions | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    memory_bytes: int = 512 << 20,
) -> list[BlockRefinement]:
    """Refine the factors of `compressed` (modified in place) block by block (module docstring)."""
    opts = options or RefineOptions()
    torch = import_torch()
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, opts.threads))
    try:
        return _refine(torch, original, compressed, replacements, batches, opts, progress, memory_bytes)
    finally:
        torch.set_num_threads(threads)


def _refine(torch: Any, original: onnx.ModelProto, compressed: onnx.ModelProto, replacements: Mapping[int, Replacement],
            batches: Sequence[Mapping[str, np.ndarray]], opts: RefineOptions,
            progress: Callable[[str, int, int], None] | None, memory_bytes: int) -> list[BlockRefinement]:
    count = sum(int(next(iter(b.values())).shape[0]) for b in batches)
    blocks = blocks_of(original, replacements, opts.window)
    types = ElementTypes(compressed)
    in_original = {o for node in original.graph.node for o in node.output}
    results: list[BlockRefinement] = []
    with ActivationCache(compressed, batches, "compressed", memory_bytes // 2) as comp_cache, \
            ActivationCache(original, batches, "original", memory_bytes // 2) as orig_cache:
        for step, (indices, target) in enumerate(blocks):
            names = tuple(replacements[i].layer.layer_id for i in indices)
            if progress is not None:
                progress("refine " + ",".join(names), step, len(blocks))
            t0 = time.perf_counter()
            chains = []
            for i in indices:
                chain = factor_chain(compressed, node_io(original, i)[1], len(replacements[i].factors.arrays))
                if chain is not None and chain.problem is None:
                    chains.append(chain)
            if not chains:
                results.append(BlockRefinement(names, (target,), math.nan, math.nan, False, 0, 0.0,
                                               "its factor chains were not found"))
                continue
            seg, feeds, factors = _block_segment(compressed, chains, target, types)
            # Every tensor the block computes that is read outside it is matched, not only its end
            # (those the original has: a chain's inner tensors are read inside the block only).
            outs = [*seg.outputs, *seg.live_out]
            matched = [k for k, o in enumerate(outs) if o in in_original]
            names_matched = [outs[k] for k in matched]
            per_image = sum(int(np.prod(np.asarray(v).shape[1:])) for v in next(iter(comp_cache.values(feeds))))
            per_image += sum(int(np.prod(np.asarray(v).shape[1:])) for v in next(iter(orig_cache.values(names_matched))))
            limit = max(2, min(count, opts.max_bytes // max(4 * per_image, 1)))
            xs_np = _stack(comp_cache.values(feeds), feeds, limit)
            ys_np = _stack(orig_cache.values(names_matched), names_matched, limit)
            n = next(iter(xs_np.values())).shape[0]
            rec = _train_block(torch, seg, feeds, factors, xs_np, matched, [ys_np[o] for o in names_matched], opts, names)
            kept = rec["after"] < rec["before"]
            if kept:
                write_initializers(compressed, rec["values"])
                comp_cache.invalidate([t for c in chains for t in c.produced])
            results.append(BlockRefinement(names, tuple(names_matched), rec["before"], rec["after"], kept, n,
                                           time.perf_counter() - t0, rec.get("note")))
    if progress is not None and blocks:
        progress("refine", len(blocks), len(blocks))
    return results


def _train_block(torch: Any, seg: Any, feeds: Sequence[str], factors: Mapping[str, tuple[str, ...]],
                 xs_np: Mapping[str, np.ndarray], matched: Sequence[int], ys_np: Sequence[np.ndarray],
                 opts: RefineOptions, names: Sequence[str]) -> dict[str, Any]:
    # The segment's fed inputs come without shapes; the torch-readiness pass needs them (an auto_pad
    # SAME_UPPER conv's explicit pads follow from its input size).
    module, _ = segment_module(seg.model, {n: xs_np[n].shape for n in feeds}, f"block {','.join(names)}")
    bound = bind_parameters(module, seg.model, factors, set(factors))
    params = bound.params
    if not params:
        return {"before": math.nan, "after": math.nan, "values": {}, "note": "no trainable factor in the block"}
    n = next(iter(xs_np.values())).shape[0]
    rng = np.random.default_rng(opts.seed)
    order = rng.permutation(n)
    hold = max(1, int(round(opts.held_out * n))) if n > 1 else 0
    held, train = order[:hold], order[hold:] if n - hold > 0 else order
    xs = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in xs_np.items()}
    ys = [torch.from_numpy(np.ascontiguousarray(y)) for y in ys_np]
    judge = held if len(held) else train
    before = _relative_error(torch, module, xs, ys, feeds, matched, judge, opts.batch)
    start = {k: p.detach().clone() for k, p in params.items()}
    trainable = list(params.values())
    opt = torch.optim.Adam(trainable, lr=opts.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, opts.steps))
    energy = [float((y[torch.from_numpy(train)] ** 2).mean()) or 1.0 for y in ys]
    gen = torch.Generator().manual_seed(opts.seed)
    train_t = torch.from_numpy(train)
    for _ in range(opts.steps):
        take = train_t[torch.randint(len(train_t), (min(opts.batch, len(train_t)),), generator=gen)]
        outs = _outputs(module, xs, feeds, take, matched)
        loss = sum(((o - y[take]) ** 2).mean() / e for o, y, e in zip(outs, ys, energy, strict=True))
        opt.zero_grad()
        loss.backward()  # type: ignore[union-attr]
        opt.step()
        sched.step()
    after = _relative_error(torch, module, xs, ys, feeds, matched, judge, opts.batch)
    values: dict[str, np.ndarray] = {}
    if after < before:
        values = trained_values(bound)
    else:
        for k, p in params.items():
            with torch.no_grad():
                p.copy_(start[k])
    return {"before": before, "after": after, "values": values}
