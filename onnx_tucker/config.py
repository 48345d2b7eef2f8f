"""Compression options: one frozen dataclass shared by the library API and every CLI command."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import UsageError


@dataclass(frozen=True)
class Preprocess:
    """How images become model input. `size` is (height, width); None keeps the images' size.
    `layout` "auto" reads it from the model's input shape (channels of 1, 3 or 4 second: NCHW; last: NHWC).
    `scale`: the value a full-intensity pixel (255) has at the model input, before `mean` / `std`:
    1 divides pixels by 255, 255 keeps raw 0-255 values. None: 1 for image folders, and integer
    .npz arrays fed to a float input are refused (they are pixels whose scale nobody declared)."""

    size: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layout: str = "auto"  # auto | nchw | nhwc
    scale: float | None = None
    # Image folders only, in this order (torchvision's Resize(N) + CenterCrop(H, W)): the shorter side
    # resized to `resize_shorter` (the longer one in proportion, truncated), then a centre crop; then
    # `channel_order` "bgr" reverses RGB(A) to BGR(A) for models trained on OpenCV-decoded images.
    resize_shorter: int | None = None
    crop: tuple[int, int] | None = None
    channel_order: str = "rgb"  # rgb | bgr

    def __post_init__(self) -> None:
        if self.layout not in ("auto", "nchw", "nhwc"):
            raise UsageError(f"--layout {self.layout}: not a layout; use nchw or nhwc")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise UsageError(f"--size {self.size}: give a positive size, e.g. 32 or 224,224")
        for what, v in (("--mean", self.mean), ("--std", self.std)):
            if v is not None and len(v) not in (1, 3, 4):
                raise UsageError(f"{what} {','.join(map(str, v))}: give 1 value or one per channel (e.g. 3)")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise UsageError(f"--std {','.join(map(str, self.std))}: every value must be > 0")
        if self.channel_order not in ("rgb", "bgr"):
            raise UsageError(f"--channel-order {self.channel_order}: not a channel order; use rgb or bgr")
        if self.resize_shorter is not None and self.resize_shorter < 1:
            raise UsageError(f"--resize-shorter {self.resize_shorter}: give a positive size, e.g. 256")
        if self.crop is not None and (len(self.crop) != 2 or min(self.crop) < 1):
            raise UsageError(f"--crop {self.crop}: give a positive size, e.g. 224 or 224,224")
        if self.size is not None and (self.resize_shorter is not None or self.crop is not None):
            raise UsageError("--size with --resize-shorter / --crop: --size stretches to H,W, the others keep the "
                             "aspect ratio; give --size alone, or --resize-shorter N --crop H,W")
        if self.scale is not None and not (math.isfinite(self.scale) and self.scale > 0):
            raise UsageError(f"--scale {self.scale:g}: must be a positive number; use 1 (pixels / 255) or 255 (raw 0-255)")

    @property
    def pixel_scale(self) -> float:
        """What a pixel of 255 becomes before mean / std (1 unless `scale` says otherwise)."""
        return 1.0 if self.scale is None else float(self.scale)



RANK_METHODS = ("vbmf", "ratio", "energy", "full", "data")


@dataclass(frozen=True)
class RankPolicy:
    """How ranks are chosen: `vbmf` (EVBMF, the paper), `ratio:F`, `energy:F`, `full`, or `data:F` (with
    calibration data: the whole model keeps a fraction F of its MACs, spent where the layers' outputs on
    the data lose least; runtime/rankselect.py)."""

    method: str = "vbmf"
    value: float | None = None

    def __str__(self) -> str:
        return self.method if self.value is None else f"{self.method}:{self.value:g}"

    @classmethod
    def parse(cls, text: str) -> RankPolicy:
        spec = text.strip().lower()
        if spec in ("vbmf", "evbmf"):
            return cls("vbmf")
        if spec == "full":
            return cls("full")
        m = re.fullmatch(r"(ratio|energy|data):([0-9.eE+-]+)", spec)
        if m:
            try:
                value = float(m.group(2))
            except ValueError:
                value = math.nan
            if not 0.0 < value <= 1.0:
                raise UsageError(f"--ranks {text}: {m.group(1)} must be in (0, 1]; use e.g. {m.group(1)}:0.5")
            return cls(m.group(1), value)
        raise UsageError(f"--ranks {text}: not understood; use vbmf, full, ratio:F, energy:F or data:F (0 < F <= 1)")


TARGET_METRICS = ("macs", "params", "latency", "agreement")


@dataclass(frozen=True)
class BudgetTarget:
    """`--target macs:0.3`: the whole model's MACs (or parameters, or its layers' measured time) at this
    fraction of the original."""

    metric: str
    fraction: float

    def __str__(self) -> str:
        return f"{self.metric}:{self.fraction:g}"

    @classmethod
    def parse(cls, text: str) -> BudgetTarget:
        spec = text.strip().lower()
        m = re.fullmatch(r"([a-z-]+):([0-9.eE+-]+)", spec)
        if not m:
            raise UsageError(f"--target {text}: not understood; use macs:F, params:F or latency:F (0 < F < 1), e.g. macs:0.3")
        metric = m.group(1)
        if metric not in TARGET_METRICS:
            later = " (accuracy-drop targets are not implemented yet)" if metric == "accuracy-drop" else ""
            raise UsageError(f"--target {text}: unknown metric {metric!r}{later}; use macs:F, params:F, latency:F or agreement:F")
        try:
            value = float(m.group(2))
        except ValueError:
            value = math.nan
        if not 0.0 < value < 1.0:
            example = "agreement:0.99 keeps 99% of the top-1 answers" if metric == "agreement" else f"{metric}:0.3 keeps 30%"
            raise UsageError(f"--target {text}: the fraction must be in (0, 1); e.g. {example}")
        return cls(metric, value)


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """`name:1,3,224,224` -> ("name", (1, 3, 224, 224)). The name may itself contain ':'."""
    name, sep, dims = text.rpartition(":")
    if not sep or not name:
        raise UsageError(f"--input-shape {text}: not NAME:D0,D1,...; write it like input:1,3,224,224")
    try:
        shape = tuple(int(d) for d in dims.split(","))
    except ValueError:
        raise UsageError(
            f"--input-shape {text}: dimensions must be integers; separate them by commas, e.g. {name}:1,3,224,224"
        ) from None
    if any(d <= 0 for d in shape):
        raise UsageError(f"--input-shape {text}: a dimension is < 1; give every dimension as a positive size")
    return name, shape


def compile_pattern(text: str | None, option: str) -> re.Pattern[str] | None:
    if text is None:
        return None
    try:
        return re.compile(text)
    except re.error as e:
        raise UsageError(f"{option} {text!r}: not a valid regular expression ({e}); fix it or quote it for your shell") from None


@dataclass(frozen=True)
class CompressionConfig:
    """Everything that decides the plan and the checks. Defaults follow the paper."""

    ranks: RankPolicy = field(default_factory=RankPolicy)
    rank_scale: float = 1.0
    min_rank: int | None = None  # None: an EVBMF rank of 0 keeps the layer as is
    round_to: int = 1
    include: str | None = None
    exclude: str | None = None
    hooi_iters: int = 0
    # Convs with fewer input channels than this get Tucker-1 (output mode only), as the paper does
    # for the first RGB conv: a 1x1 S->R3 with tiny S saves nothing.
    min_tucker2_channels: int = 8
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    validate: bool = True
    samples: int | None = None  # random inputs (default 8), or a cap on --data samples (default all)
    seed: int = 0
    # Validation passes when max|orig - new| <= rtol * max|orig| for every output. None: report only
    # (a lossy compression is expected to change outputs), except under --ranks full.
    rtol: float | None = None
    plan_file: str | None = None
    # Validate on user data (.npz: one array per input, optional `labels`) instead of random inputs.
    data: str | None = None
    # Layers planned and decomposed in parallel (threads). Changes speed only, never the result.
    jobs: int = 1
    # Refit the factors on unlabeled data (.npz, one array per input) after decomposing
    # (runtime/calibrate.py); `calibration_samples` caps how many samples are read.
    calibrate: str | None = None
    calibration_samples: int = 500
    # How images in --data / --calibrate folders become model input (size, mean/std, layout).
    preprocess: Preprocess = field(default_factory=Preprocess)
    # Keep a decomposition only where the runtime measures it at least `min_speedup` times faster than
    # the original layer (planning/latency.py); layers are timed alone in onnxruntime CPU with
    # `threads` intra-op threads.
    latency_aware: bool = False
    min_speedup: float = 1.1
    threads: int = 1
    # A whole-model budget instead of per-layer ranks (planning/budget.py): `macs:0.3`, `params:0.2`,
    # `latency:0.5` (which times the layers, as latency_aware does, and keeps only chains that pay).
    target: BudgetTarget | None = None

    def __post_init__(self) -> None:
        if not self.rank_scale > 0:
            raise UsageError(f"--rank-scale {self.rank_scale}: must be > 0; use e.g. 1.5 for 50% more rank")
        if self.min_rank is not None and self.min_rank < 1:
            raise UsageError(f"--min-rank {self.min_rank}: must be >= 1; leave it out for no floor")
        if self.round_to < 1:
            raise UsageError(f"--round-to {self.round_to}: must be >= 1; use 1 for no rounding")
        if self.hooi_iters < 0:
            raise UsageError(f"--hooi-iters {self.hooi_iters}: must be >= 0; use 0 for plain HOSVD")
        if self.samples is not None and self.samples < 1:
            raise UsageError(f"--samples {self.samples}: must be >= 1; e.g. --samples 8")
        if self.jobs < 1:
            raise UsageError(f"--jobs {self.jobs}: must be >= 1; use 1 for one layer at a time")
        if self.calibration_samples < 1:
            raise UsageError(f"--calibration-samples {self.calibration_samples}: must be >= 1; e.g. 500")
        if not self.min_speedup > 0:
            raise UsageError(f"--min-speedup {self.min_speedup}: must be > 0; e.g. 1.1 for 10% faster")
        if self.threads < 1:
            raise UsageError(f"--threads {self.threads}: must be >= 1; e.g. --threads 1")
        if self.target is not None and self.target.metric == "agreement" and self.data is None:
            raise UsageError(f"--target {self.target} needs --data (the images agreement is measured on)")
        if self.target is not None and self.ranks.method == "data":
            raise UsageError(f"--target {self.target} and --ranks {self.ranks} both set the MACs; give one of them "
                             "(with --calibrate, --target macs:F allocates on the data as data:F does)")
        if self.target is not None and self.plan_file is not None:
            raise UsageError(f"--target {self.target} and --plan both choose the ranks; give one of them")
        if self.rtol is not None and not self.rtol >= 0:
            raise UsageError(f"--rtol {self.rtol}: must be >= 0; e.g. --rtol 0.05")
        compile_pattern(self.include, "--include")
        compile_pattern(self.exclude, "--exclude")
        if self.ranks.method == "data" and not self.calibrate and not self.plan_file:
            raise UsageError(f"--ranks {self.ranks}: ranks chosen from data need the data; add --calibrate DATA.npz "
                             "(compress), or use a weight policy such as energy:0.9")

    def effective_rtol(self, weight_eps: float = 2.0**-23) -> float | None:
        """The tolerance validation checks: --rtol, else under --ranks full one that follows the
        precision of the model's weights (`weight_eps`: machine epsilon of the least precise float
        dtype: 1e-4 for float32, 1e-2 for float16, 8e-2 for bfloat16), else None (report only)."""
        if self.rtol is not None:
            return self.rtol
        return max(1e-4, 10 * weight_eps) if self.ranks.method == "full" else None

    @classmethod
    def from_options(
        cls,
        *,
        ranks: str = "vbmf",
        input_shape: list[str] | tuple[str, ...] | None = None,
        plan: str | os.PathLike[str] | None = None,
        data: str | os.PathLike[str] | None = None,
        calibrate: str | os.PathLike[str] | None = None,
        target: str | None = None,
        **options: Any,
    ) -> CompressionConfig:
        """From command-line values: `ranks` as text (`ratio:0.5`), `input_shape` as `NAME:D0,D1,...`
        strings, paths as paths; every other option by its field name."""
        return cls(
            ranks=RankPolicy.parse(ranks),
            input_shapes=tuple(parse_input_shape(s) for s in input_shape or ()),
            plan_file=str(plan) if plan else None,
            data=str(data) if data else None,
            calibrate=str(calibrate) if calibrate else None,
            target=BudgetTarget.parse(target) if target else None,
            **options,
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "ranks": str(self.ranks),
            "rank_scale": self.rank_scale,
            "min_rank": self.min_rank,
            "round_to": self.round_to,
            "include": self.include,
            "exclude": self.exclude,
            "hooi_iters": self.hooi_iters,
            "min_tucker2_channels": self.min_tucker2_channels,
            "input_shapes": {n: list(s) for n, s in self.input_shapes},
            "validate": self.validate,
            "samples": self.samples,
            "seed": self.seed,
            "rtol": self.rtol,
            "plan_file": self.plan_file,
            "data": self.data,
            "calibrate": self.calibrate,
            "calibration_samples": self.calibration_samples,
            "preprocess": {"size": self.preprocess.size, "mean": self.preprocess.mean, "std": self.preprocess.std,
                           "layout": self.preprocess.layout, "scale": self.preprocess.scale,
                           "resize_shorter": self.preprocess.resize_shorter, "crop": self.preprocess.crop,
                           "channel_order": self.preprocess.channel_order},
            "latency_aware": self.latency_aware,
            "min_speedup": self.min_speedup,
            "threads": self.threads,
            "target": None if self.target is None else str(self.target),
        }


@dataclass(frozen=True)
class BenchConfig:
    """How latency is measured: onnxruntime CPU, `threads` intra-op threads, `warmup` untimed runs,
    then `runs` timed runs of each model, interleaved."""

    threads: int = 1
    warmup: int = 5
    runs: int = 20

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise UsageError(f"--threads {self.threads}: must be >= 1; e.g. --threads 1")
        if self.warmup < 0:
            raise UsageError(f"--warmup {self.warmup}: must be >= 0; e.g. --warmup 5")
        if self.runs < 1:
            raise UsageError(f"--runs {self.runs}: must be >= 1; e.g. --runs 20")
