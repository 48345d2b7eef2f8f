"""Loss-aware layer weights (`compress --ranks data:F --calibrate DATA --loss-aware`): how much the
model's output moves per unit of relative squared error in each layer's output, measured on a few
calibration images. No labels.

The allocation of `data:F` adds the layers' *relative* output errors, as if an error of 1 % in the
first conv hurt the model as much as 1 % in the last. It does not: on Darknet Tiny one layer cut to a
predicted error of 0.36 costs 45 points of top-1 while others at that error cost a few. A layer's
weight rescales its candidates' errors before the allocation (weights' mean 1).

Two estimators (`method`):
- "probe" (the default): each layer's output is replaced, in a forward pass, by its projection on the
  leading principal channels of its own output covariance (what an output-space factorisation at that
  rank leaves: y -> mean + U_R U_R^T (y - mean)), R the least rank with a relative error of at most
  `probe_error`; the weight is the model's output change (KL from the original's class distribution,
  or the outputs' relative squared error for a model without class scores) divided by that relative
  error. One forward pass per layer; nonlinear effects downstream included.
- "fisher": the second-order expansion of KL(original || compressed), 0.5 dᵀ F d with F the Fisher
  information with respect to the layer's output, diagonal, the error spread over channels like the
  signal: weight sum_c v_c F_c, F_c = E[sum over positions of g_c^2], g the gradient of -log p(y | x)
  for a label y drawn from the model's own prediction (Kirkpatrick et al. 2017; Hsu et al. 2022 weight
  the SVD of weights the same way); a model without class scores gets the Gauss-Newton matrix of the
  output's squared error (g from vᵀ out / std(out), v ~ N(0, I)). Measured worse than no weighting on
  Darknet Tiny (docs/calibration.md: the diagonal and the small-error expansion both fail at the
  errors of x2 MACs), kept for the comparison.

The original is converted to torch (onnx2torch, the `finetune` extra) and each layer's output tensor
hooked; nothing is trained or written.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from ..config import LOSS_AWARE_METHODS as METHODS
from ..errors import OnnxTuckerError, UsageError
from .convert import import_torch, module_names, to_torch
from .train import is_class_scores


@dataclass(frozen=True)
class LayerTensor:
    """Where a layer's output is read: the ONNX tensor and the axis of its channels (1 for a conv's
    NCHW, -1 for a matrix layer's rows, -2 for the columns of A @ X)."""

    layer_id: str
    tensor: str
    channel_axis: int


@dataclass(frozen=True)
class LossWeights:
    """Each layer's weight (mean 1 over the layers measured) and its raw sensitivity (output change per
    unit of relative error), the estimator (`method`: probe | fisher) and the output change it measured
    (`loss`: kl for class scores, mse otherwise), the probe's relative error per layer (`probe_errors`),
    images, draws (fisher) and seconds; `missing`: layers whose output the converted module does not
    expose or that do not reach the output (they keep weight 1), with the reason."""

    weights: Mapping[str, float]
    raw: Mapping[str, float]
    method: str
    loss: str
    images: int
    seconds: float
    missing: Mapping[str, str]
    probe_errors: Mapping[str, float] = field(default_factory=dict)
    draws: int = 0


def _stack(batches: Sequence[Mapping[str, np.ndarray]], names: Sequence[str], limit: int) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    count = 0
    for b in batches:
        for n in names:
            parts[n].append(np.asarray(b[n]))
        count += int(np.asarray(b[names[0]]).shape[0])
        if count >= limit:
            break
    return {n: np.concatenate(v)[:limit] for n, v in parts.items()}


def _is_probabilities(torch: Any, out: Any) -> bool:
    return bool((out >= 0).all()) and bool(torch.allclose(out.sum(dim=1), torch.ones_like(out[:, 0]), atol=1e-3))


def _log_probs(torch: Any, out: Any) -> Any:
    return torch.log(out.clamp_min(1e-12)) if _is_probabilities(torch, out.detach()) else torch.log_softmax(out, dim=1)


def loss_weights(
    original: onnx.ModelProto,
    layers: Sequence[LayerTensor],
    batches: Sequence[Mapping[str, np.ndarray]],
    source: str = "model",
    images: int = 64,
    method: str = "probe",
    probe_error: float = 0.2,
    draws: int = 2,
    batch: int = 16,
    seed: int = 0,
    threads: int = 1,
) -> LossWeights:
    """The loss-aware weight of each layer in `layers` (module docstring), from the first `images`
    images of `batches` (the calibration batches)."""
    if method not in METHODS:
        raise UsageError(f"loss-aware method {method!r}: use one of {', '.join(METHODS)}")
    torch = import_torch()
    saved = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        t0 = time.perf_counter()
        model = _Hooked(torch, original, layers, batches, source, images)
        try:
            if method == "probe":
                raw, loss, errors = _probe(torch, model, batch, probe_error)
                found = _normalised(raw, model.missing)
                return LossWeights(found, raw, method, loss, model.count, time.perf_counter() - t0, dict(model.missing), errors)
            raw, loss, _ = _fisher(torch, model, batch, draws, seed)
            return LossWeights(_normalised(raw, model.missing), raw, method, loss, model.count,
                               time.perf_counter() - t0, dict(model.missing), draws=draws)
        finally:
            model.close()
    finally:
        torch.set_num_threads(saved)


def _normalised(raw: Mapping[str, float], missing: dict[str, str]) -> dict[str, float]:
    finite = [v for v in raw.values() if math.isfinite(v) and v > 0]
    scale = float(np.mean(finite)) if finite else 1.0
    weights = {k: (v / scale if math.isfinite(v) and v > 0 else 1.0) for k, v in raw.items()}
    weights.update({k: 1.0 for k in missing})
    return weights


class _Hooked:
    """The original in torch with a forward hook on each layer's output module: it records the output
    (`captured`) and, when `replace` has a function for the layer, returns that function's result."""

    def __init__(self, torch: Any, original: onnx.ModelProto, layers: Sequence[LayerTensor],
                 batches: Sequence[Mapping[str, np.ndarray]], source: str, images: int) -> None:
        self.feeds = [v.name for v in original.graph.input if v.name in (batches[0] if batches else {})]
        if not self.feeds:
            raise UsageError(f"{source}: --loss-aware: the calibration data feeds none of the model's inputs")
        self.xs = _stack(batches, self.feeds, images)
        self.count = int(next(iter(self.xs.values())).shape[0])
        dims = {n: [1, *v.shape[1:]] for n, v in self.xs.items()}
        try:
            module, norm = to_torch(original, source, dims)
        except OnnxTuckerError as e:
            raise UsageError(f"--loss-aware needs the model in torch, and it does not convert: {e}; leave out --loss-aware") from None
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)
        self.module = module
        self.captured: dict[str, Any] = {}
        self.replace: dict[str, Any] = {}
        self.missing: dict[str, str] = {}
        self.hooks: list[Any] = []
        by_tensor = {node.output[0]: name for name, node in module_names(norm.model).items() if node.output}
        for lt in layers:
            name = by_tensor.get(lt.tensor)
            try:
                sub = module.get_submodule(name) if name is not None else None
            except AttributeError:
                sub = None
            if sub is None:
                self.missing[lt.layer_id] = f"its output '{lt.tensor}' is not a module's output in the converted model"
                continue
            self.hooks.append(sub.register_forward_hook(self._hook(lt.layer_id)))
        self.layers = [lt for lt in layers if lt.layer_id not in self.missing]

    def _hook(self, key: str) -> Any:
        def hook(_m: Any, _i: Any, out: Any) -> Any:
            if isinstance(out, (tuple, list)):
                return None  # a multi-output module: not a layer output we can stand in for
            fn = self.replace.get(key)
            if fn is not None:
                out = fn(out)
            self.captured[key] = out
            return out if fn is not None else None
        return hook

    def batches(self, torch: Any, size: int, grad: bool = False) -> Any:
        for s in range(0, self.count, size):
            yield [torch.from_numpy(np.ascontiguousarray(self.xs[n][s : s + size], dtype=np.float32)).requires_grad_(grad)
                   for n in self.feeds]

    def run(self, inputs: Sequence[Any]) -> list[Any]:
        self.captured.clear()
        outs = self.module(*inputs)
        return list(outs) if isinstance(outs, (tuple, list)) else [outs]

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def _channels_last(y: Any, axis: int) -> Any:
    ax = axis % y.ndim
    return y.movedim(ax, -1).reshape(-1, y.shape[ax])


def _output_change(torch: Any, ref: Sequence[Any], outs: Sequence[Any], classes: bool) -> float:
    """Summed over the batch: KL(ref || outs) of the class distributions, or each output's squared
    error relative to the reference's mean energy."""
    if classes:
        lp, lq = _log_probs(torch, ref[0]), _log_probs(torch, outs[0])
        return float((lp.exp() * (lp - lq)).sum())
    total = 0.0
    for r, o in zip(ref, outs, strict=True):
        if r.is_floating_point():
            per_image = float((r.double() ** 2).mean()) or 1.0
            total += float(((o.double() - r.double()) ** 2).flatten(1).mean(1).sum()) / per_image
    return total


def _probe(torch: Any, model: _Hooked, batch: int, probe_error: float) -> tuple[dict[str, float], str, dict[str, float]]:
    """Each layer's output change per unit of relative error under its output-space projection."""
    moments: dict[str, list[Any]] = {}
    refs: list[list[Any]] = []
    with torch.no_grad():
        for inputs in model.batches(torch, batch):
            refs.append(model.run(inputs))
            for lt in model.layers:
                flat = _channels_last(model.captured[lt.layer_id], lt.channel_axis).double()
                m = moments.setdefault(lt.layer_id, [0, 0, 0])
                m[0] = m[0] + flat.sum(0)
                m[1] = m[1] + flat.T @ flat
                m[2] += int(flat.shape[0])
    classes = len(refs[0]) == 1 and is_class_scores(tuple(refs[0][0].shape))
    raw: dict[str, float] = {}
    errors: dict[str, float] = {}
    for lt in model.layers:
        total, gram, n = moments[lt.layer_id]
        mean = total / n
        cov = gram / n - torch.outer(mean, mean)
        evals, evecs = torch.linalg.eigh((cov + cov.T) / 2)
        evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
        energy = float(evals.sum())
        if energy <= 0:
            model.missing[lt.layer_id] = "its output does not vary on the calibration images"
            continue
        tail = torch.cat([evals.flip(0).cumsum(0).flip(0), evals.new_zeros(1)]) / energy  # tail[R]
        rank = int((tail <= probe_error).nonzero()[0])
        if rank >= evals.shape[0]:
            model.missing[lt.layer_id] = "no rank below full reaches the probe's error"
            continue
        basis = evecs[:, :rank].float()
        mu = mean.float()

        def project(y: Any, basis: Any = basis, mu: Any = mu, axis: int = lt.channel_axis) -> Any:
            ax = axis % y.ndim
            z = y.movedim(ax, -1) - mu
            return ((z @ basis) @ basis.T + mu).movedim(-1, ax)

        model.replace = {lt.layer_id: project}
        change = 0.0
        with torch.no_grad():
            for inputs, ref in zip(model.batches(torch, batch), refs, strict=True):
                change += _output_change(torch, ref, model.run(inputs), classes)
        model.replace = {}
        errors[lt.layer_id] = float(tail[rank])
        raw[lt.layer_id] = change / model.count / max(float(tail[rank]), 1e-12)
    return raw, "kl" if classes else "mse", errors


def _fisher(torch: Any, model: _Hooked, batch: int, draws: int,
            seed: int) -> tuple[dict[str, float], str, dict[str, np.ndarray]]:
    """Each layer's sum_c v_c F_c (module docstring, "fisher"), the loss, and each layer's F_c."""
    fisher: dict[str, Any] = {}
    sums: dict[str, Any] = {}
    squares: dict[str, Any] = {}
    counts: dict[str, int] = {}
    gen = torch.Generator().manual_seed(int(seed))
    classes = False
    for inputs in model.batches(torch, batch, grad=True):
        outs = model.run(inputs)
        for lt in model.layers:
            model.captured[lt.layer_id].retain_grad()
            flat = _channels_last(model.captured[lt.layer_id].detach(), lt.channel_axis).double()
            sums[lt.layer_id] = sums.get(lt.layer_id, 0) + flat.sum(0)
            squares[lt.layer_id] = squares.get(lt.layer_id, 0) + (flat**2).sum(0)
            counts[lt.layer_id] = counts.get(lt.layer_id, 0) + int(flat.shape[0])
        classes = len(outs) == 1 and is_class_scores(tuple(outs[0].shape))
        logp = _log_probs(torch, outs[0]) if classes else None
        nb = int(inputs[0].shape[0])
        for d in range(draws):
            if logp is not None:
                drawn = torch.multinomial(logp.detach().exp(), 1, generator=gen).squeeze(1)
                loss = -logp.gather(1, drawn[:, None]).sum()
            else:
                loss = None
                for o in outs:
                    if o.is_floating_point() and o.requires_grad:
                        v = torch.randn(o.shape, generator=gen, dtype=o.dtype)
                        term = (v * o).sum() / (float(o.detach().std()) or 1.0)
                        loss = term if loss is None else loss + term
                if loss is None:
                    raise UsageError("--loss-aware: no float model output depends on the input")
            for lt in model.layers:
                model.captured[lt.layer_id].grad = None
            loss.backward(retain_graph=d < draws - 1)
            for lt in model.layers:
                y = model.captured[lt.layer_id]
                if y.grad is None:
                    model.missing[lt.layer_id] = "the model's output does not depend on it"
                    continue
                ax = lt.channel_axis % y.ndim
                g2 = (y.grad.detach().double() ** 2).movedim(ax, -1).reshape(nb, -1, y.shape[ax]).sum(1).sum(0)
                fisher[lt.layer_id] = fisher.get(lt.layer_id, 0) + g2
    raw: dict[str, float] = {}
    channels: dict[str, np.ndarray] = {}
    for lt in model.layers:
        if lt.layer_id in model.missing:
            continue
        n = counts[lt.layer_id]
        mean = sums[lt.layer_id] / n
        var = (squares[lt.layer_id] / n - mean**2).clamp_min(0)
        f_c = fisher[lt.layer_id] / (model.count * draws)
        raw[lt.layer_id] = float((var * f_c).sum())
        channels[lt.layer_id] = f_c.numpy().astype(np.float64)
    return raw, "kl" if classes else "mse", channels


@dataclass(frozen=True)
class ChannelWeights:
    """`--refit-weights fisher`: per layer id, one weight per output channel for the refit's objective
    (sum_c w_c ||y_c - y^_c||^2), F_c / mean_c F_c clipped to [floor, 1 / floor]: the diagonal of
    the Fisher information with respect to the layer's output (`_fisher`), so the weighted error is
    twice the second-order growth of KL(original || compressed) the layer's error alone would cause.
    `missing`: layers left unweighted, with the reason; images, draws, seconds as for `LossWeights`."""

    weights: Mapping[str, np.ndarray]
    loss: str
    images: int
    draws: int
    seconds: float
    missing: Mapping[str, str]
    floor: float


def channel_weights(
    original: onnx.ModelProto,
    layers: Sequence[LayerTensor],
    batches: Sequence[Mapping[str, np.ndarray]],
    source: str = "model",
    images: int = 64,
    draws: int = 2,
    batch: int = 16,
    seed: int = 0,
    threads: int = 1,
    floor: float = 1e-2,
) -> ChannelWeights:
    """Each layer's per-channel refit weights (`ChannelWeights`) from the first `images` images of
    `batches`: a channel the model's output does not depend on (a dead ReLU) gets `floor`."""
    if not 0 < floor <= 1:
        raise UsageError(f"channel weight floor {floor}: must be in (0, 1]")
    torch = import_torch()
    saved = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        t0 = time.perf_counter()
        model = _Hooked(torch, original, layers, batches, source, images)
        try:
            _, loss, channels = _fisher(torch, model, batch, draws, seed)
        finally:
            model.close()
    finally:
        torch.set_num_threads(saved)
    weights: dict[str, np.ndarray] = {}
    for key, f_c in channels.items():
        mean = float(f_c.mean())
        if not (math.isfinite(mean) and mean > 0):
            model.missing[key] = "its Fisher information is zero or not finite on the calibration images"
            continue
        weights[key] = np.clip(f_c / mean, floor, 1 / floor)
    return ChannelWeights(weights, loss, model.count, draws, time.perf_counter() - t0, dict(model.missing), floor)
