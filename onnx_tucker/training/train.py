"""The training loop: labelled cross-entropy and/or distillation from a teacher, numpy data in.

Losses, per batch:
- labels: cross-entropy on the first class-score output (shape [N, C], C > 1);
- teacher: summed over all outputs: KL(softmax(t / T) || softmax(s / T)) * T^2 where the teacher's
  output looks like class scores ([N, C], C > 1); the same KL per time step, over the last axis and
  averaged over steps and samples, on a time-first sequence of class scores ([T, N, C], C > 1, its
  batch axis 1 by the declared shapes: a CRNN's CTC logits, see `sequence_outputs`); else the MSE divided by the teacher output's
  mean square (scale-free, so outputs of different scales weigh alike: detector maps, embeddings,
  sequence logits);
- both: alpha * labelled + (1 - alpha) * distillation.

BatchNorm: the whole network stays in eval mode while it trains: BatchNorm layers normalise with
their frozen running statistics (their scale and shift still train) and are not re-estimated from
small or augmented batches; Dropout was removed before conversion. The exported graph is therefore
exactly the network that was trained.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..types import EventProgress
from .config import FinetuneConfig
from .convert import import_torch

Progress = EventProgress


def is_class_scores(shape: Sequence[int]) -> bool:
    return len(shape) == 2 and shape[1] > 1


def sequence_outputs(shapes: Mapping[str, Sequence[Any]], inputs: Sequence[str], outputs: Sequence[str]) -> frozenset[int]:
    """Indices of the outputs that are time-first sequences of class scores by their declared shapes:
    3-D, the batch on axis 1 (`torchready.batch_axes`), more than one class on axis 2 ([T, N, C]: a
    CRNN's per-step scores, torch's sequence-first default). A batch-first [N, A, B] output (a detector's
    boxes) is not one: its axes say nothing of which holds classes, and it keeps the scale-free MSE."""
    from ..graph import torchready

    axes = torchready.batch_axes(shapes, inputs, outputs)
    found = set()
    for k, name in enumerate(outputs):
        dims = list(shapes.get(name, []))
        if len(dims) == 3 and axes[name] == 1 and isinstance(dims[2], int) and dims[2] > 1:
            found.add(k)
    return frozenset(found)


@dataclass
class Batches:
    """Shuffled mini-batches of numpy arrays; augmentation on 4-D images: a crop (a zero-padded shift,
    or with `crop_scale` a random resized crop) and a horizontal flip, then optionally mixup."""

    inputs: Mapping[str, np.ndarray]
    labels: np.ndarray | None
    batch_size: int
    layout: Mapping[str, str | None]  # per input: nchw | nhwc | None (not an image)

    @property
    def count(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    # Distributed training (torchrun): this process takes batches rank, rank + world, ... of the same
    # seeded order, and every process the same number of them (DDP all-reduces once per step).
    rank: int = 0
    world: int = 1
    crop_scale: float | None = None
    mixup: float = 0.0

    def __len__(self) -> int:
        batches = math.ceil(self.count / self.batch_size)
        return batches if self.world == 1 else batches // self.world

    def iterate(self, rng: np.random.Generator | None, augment: bool):  # type: ignore[no-untyped-def]
        """Yields (inputs, labels, mix): mix is None, or (permutation, weight) when the inputs were mixed
        with their own permutation (every input alike), so a loss can mix the labels the same way."""
        order = rng.permutation(self.count) if rng is not None else np.arange(self.count)
        starts = list(range(0, self.count, self.batch_size))
        if self.world > 1:
            starts = starts[self.rank : len(self) * self.world : self.world]
        for start in starts:
            idx = np.sort(order[start : start + self.batch_size]) if rng is None else order[start : start + self.batch_size]
            xs = {}
            for n, a in self.inputs.items():
                x = a[idx]
                if augment and rng is not None and self.layout.get(n):
                    layout = self.layout[n]
                    x = _augment(x, layout, rng) if self.crop_scale is None else _resized_crops(x, layout, rng, self.crop_scale)  # type: ignore[arg-type]
                xs[n] = x
            mix = None
            if augment and rng is not None and self.mixup > 0 and len(idx) > 1:
                lam = float(rng.beta(self.mixup, self.mixup))
                perm = rng.permutation(len(idx))
                xs = {n: _mixed(x, perm, lam) for n, x in xs.items()}
                mix = (perm, lam)
            yield xs, (None if self.labels is None else self.labels[idx]), mix


def _augment(x: np.ndarray, layout: str, rng: np.random.Generator) -> np.ndarray:
    hw = (2, 3) if layout == "nchw" else (1, 2)
    h, w = x.shape[hw[0]], x.shape[hw[1]]
    if min(h, w) < 8:
        return x
    p = max(1, round(min(h, w) / 8))
    pad = [(0, 0)] * x.ndim
    pad[hw[0]] = pad[hw[1]] = (p, p)
    xp = np.pad(x, pad)
    out = np.empty_like(x)
    dy = rng.integers(0, 2 * p + 1, size=len(x))
    dx = rng.integers(0, 2 * p + 1, size=len(x))
    flip = rng.random(len(x)) < 0.5
    for i in range(len(x)):
        if layout == "nchw":
            c = xp[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
            out[i] = c[:, :, ::-1] if flip[i] else c
        else:
            c = xp[i, dy[i] : dy[i] + h, dx[i] : dx[i] + w, :]
            out[i] = c[:, ::-1, :] if flip[i] else c
    return out


def _mixed(x: np.ndarray, perm: np.ndarray, lam: float) -> np.ndarray:
    if not np.issubdtype(x.dtype, np.floating):
        return x  # token ids, masks: nothing to interpolate
    return (lam * x + (1.0 - lam) * x[perm]).astype(x.dtype, copy=False)


def _interpolation(n_out: int, start: int, size: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) bilinear weights (half-pixel centres, as torch's align_corners=False) mapping the
    window [start, start + size) of a length-n_in axis onto n_out samples."""
    pos = start + (np.arange(n_out) + 0.5) * (size / n_out) - 0.5
    pos = np.clip(pos, start, start + size - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, start + size - 1)
    frac = (pos - lo).astype(np.float32)
    m = np.zeros((n_out, n_in), dtype=np.float32)
    rows = np.arange(n_out)
    np.add.at(m, (rows, lo), 1.0 - frac)
    np.add.at(m, (rows, hi), frac)
    return m


def _resized_crops(x: np.ndarray, layout: str, rng: np.random.Generator, min_area: float) -> np.ndarray:
    """Random resized crops (area min_area..1, aspect 3/4..4/3, as torchvision's RandomResizedCrop)
    resized back to the input's size, each flipped with probability 1/2."""
    hw = (2, 3) if layout == "nchw" else (1, 2)
    h, w = x.shape[hw[0]], x.shape[hw[1]]
    if min(h, w) < 8:
        return x
    out = np.empty_like(x)
    for i in range(len(x)):
        ch, cw = h, w
        for _ in range(10):
            area = h * w * rng.uniform(min_area, 1.0)
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            tw, th = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < tw <= w and 0 < th <= h:
                ch, cw = th, tw
                break
        y0 = int(rng.integers(0, h - ch + 1))
        x0 = int(rng.integers(0, w - cw + 1))
        ry = _interpolation(h, y0, ch, h)
        rx = _interpolation(w, x0, cw, w)
        if rng.random() < 0.5:
            rx = rx[::-1]
        img = x[i].astype(np.float32, copy=False)
        if layout == "nchw":
            r = np.einsum("yh,chw,xw->cyx", ry, img, rx, optimize=True)
        else:
            r = np.einsum("yh,hwc,xw->yxc", ry, img, rx, optimize=True)
        out[i] = r
    return out


def loss_terms(student: Sequence[Any], teacher: Sequence[Any] | None, labels: Any, cfg: FinetuneConfig,
               label_output: int | None, mix: tuple[Any, float] | None = None,
               sequences: frozenset[int] = frozenset()) -> Any:
    """The batch loss; `mix` (permutation, weight): the inputs were mixed, so is the labelled loss
    (the teacher saw the mixed inputs, its targets need nothing); `sequences`: the outputs that are
    time-first sequences of class scores (`sequence_outputs`), distilled by KL per time step."""
    torch = import_torch()
    F = torch.nn.functional
    total = None
    if labels is not None and label_output is not None:
        ce = F.cross_entropy(student[label_output], labels)
        if mix is not None:
            perm, lam = mix
            ce = lam * ce + (1.0 - lam) * F.cross_entropy(student[label_output], labels[perm])
        total = ce if teacher is None else cfg.alpha * ce
    if teacher is not None:
        d = 0.0
        for k, (s, t) in enumerate(zip(student, teacher, strict=True)):
            s = s.float()
            t = t.float()
            if k in sequences and t.ndim == 3 and t.shape[2] > 1:  # [T, N, C]: one distribution per step
                s, t = s.reshape(-1, t.shape[2]), t.reshape(-1, t.shape[2])
            if is_class_scores(tuple(t.shape)):
                T = cfg.temperature
                d = d + F.kl_div(F.log_softmax(s / T, dim=1), F.log_softmax(t / T, dim=1), log_target=True,
                                 reduction="batchmean") * (T * T)
            else:
                d = d + F.mse_loss(s, t) / (t.pow(2).mean() + 1e-8)
        w = 1.0 if total is None else 1.0 - cfg.alpha
        total = w * d if total is None else total + w * d
    return total


def _as_list(out: Any) -> list[Any]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def run_model(module: Any, feeds: Mapping[str, np.ndarray], names: Sequence[str], device: Any) -> list[Any]:
    torch = import_torch()
    args = [torch.from_numpy(np.ascontiguousarray(feeds[n])).to(device) for n in names]
    return _as_list(module(*args))


@dataclass
class EvalStats:
    loss: float | None
    accuracy: float | None
    agreement: float | None


def evaluate(student: Any, teacher: Any, data: Batches, names: Sequence[str], cfg: FinetuneConfig,
             label_output: int | None, device: Any, sequences: frozenset[int] = frozenset()) -> EvalStats:
    torch = import_torch()
    n = correct = agree = 0
    loss_sum = 0.0
    with torch.no_grad():
        for xs, ys, _ in data.iterate(None, False):
            s = run_model(student, xs, names, device)
            t = run_model(teacher, xs, names, device) if teacher is not None else None
            y = torch.from_numpy(ys).to(device) if ys is not None else None
            loss = loss_terms(s, t, y, cfg, label_output, sequences=sequences)
            b = len(next(iter(xs.values())))
            if loss is not None:
                loss_sum += float(loss) * b
            if label_output is not None:
                pred = s[label_output].argmax(1)
                if y is not None:
                    correct += int((pred == y).sum())
                if t is not None:
                    agree += int((pred == t[label_output].argmax(1)).sum())
            n += b
    return EvalStats(
        loss_sum / n if n else None,
        correct / n if n and label_output is not None and data.labels is not None else None,
        agree / n if n and label_output is not None and teacher is not None else None,
    )


def make_optimizer(params: list[Any], cfg: FinetuneConfig, steps_per_epoch: int) -> tuple[Any, Any]:
    torch = import_torch()
    lr = cfg.learning_rate
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
    if cfg.schedule == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_epochs, gamma=0.1)  # per epoch
    elif cfg.schedule == "cosine":
        total = cfg.epochs * steps_per_epoch
        if cfg.max_steps is not None:
            total = min(total, cfg.max_steps)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total))  # per step
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return opt, sched


def train_epoch(student: Any, teacher: Any, data: Batches, names: Sequence[str], cfg: FinetuneConfig,
                label_output: int | None, device: Any, opt: Any, sched: Any, rng: np.random.Generator,
                epoch: int, steps_left: int | None, progress: Progress | None,
                sequences: frozenset[int] = frozenset()) -> tuple[float, float | None, int, float]:
    """One pass; returns (mean loss, train accuracy or None, steps, images/s); `sequences`: as `loss_terms`."""
    torch = import_torch()
    t0 = time.perf_counter()
    n = correct = steps = 0
    loss_sum = 0.0
    total = len(data)
    for xs, ys, mix in data.iterate(rng, cfg.augment):
        if steps_left is not None and steps >= steps_left:
            break
        lr = float(opt.param_groups[0]["lr"])  # the rate this step uses (the scheduler moves it after the step)
        y = torch.from_numpy(ys).to(device) if ys is not None else None
        s = run_model(student, xs, names, device)
        if teacher is not None:
            with torch.no_grad():
                t = run_model(teacher, xs, names, device)
        else:
            t = None
        tmix = None if mix is None else (torch.from_numpy(mix[0]).to(device), mix[1])
        loss = loss_terms(s, t, y, cfg, label_output, tmix, sequences)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.clip_grad)
        opt.step()
        if cfg.schedule == "cosine":
            sched.step()
        lv = float(loss.detach())
        if not math.isfinite(lv):
            from ..errors import OnnxTuckerError

            # The data was checked for NaN / Inf when it was loaded, and the starting loss was finite:
            # the steps diverged. Name the rate they used (after the step the scheduler may show 0).
            raise OnnxTuckerError(
                f"the training loss became {lv} in epoch {epoch} (step {steps + 1}) at learning rate {lr:g}; "
                f"lower --lr (it is {cfg.learning_rate:g}) or use --optimizer adam"
            )
        b = len(next(iter(xs.values())))
        loss_sum += lv * b
        if y is not None and label_output is not None:
            correct += int((s[label_output].argmax(1) == y).sum())
        n += b
        steps += 1
        if progress is not None:
            dt = time.perf_counter() - t0
            progress("step", {"epoch": epoch, "step": steps, "steps": total, "loss": loss_sum / n, "seconds": dt,
                              "images": data.count,
                              "accuracy": correct / n if ys is not None and label_output is not None else None,
                              "images_per_s": n / dt if dt > 0 else 0.0})
    if cfg.schedule == "step":
        sched.step()
    dt = time.perf_counter() - t0
    acc = correct / n if n and data.labels is not None and label_output is not None else None
    return (loss_sum / n if n else float("nan")), acc, steps, (n / dt if dt > 0 else 0.0)
