"""Options, one frozen dataclass per concern (Polygraphy's argument groups, onnxslim's dataclass groups).

Every field a user can set carries its command-line spelling (`opt(...)`: flags, help, default), so an
option is written once: cli.py turns each group into typer options under the group's help panel and
rebuilds the group from the parsed values, and the same flag is the same field in every command.
`CompressionConfig` composes the groups the compression pipeline reads and keeps its first, flat form:
`CompressionConfig(ranks="ratio:0.5", data="d.npz")` and `config.rank_scale` still work.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np

from .errors import UsageError

T = TypeVar("T")

# ---- the option registry: what cli.py reads to build typer parameters -----------------------------

REQUIRED: Any = ...  # Opt.cli_default of an option that must be given
FIELD_DEFAULT: Any = object()  # Opt.cli_default: the field's own default


@dataclass(frozen=True)
class Opt:
    """How a group's field is spelled on the command line. `cli_type` is what typer parses when it
    differs from the field's type (text the group parses itself: `--ranks ratio:0.5`); `panel`
    overrides the group's help panel."""

    flags: tuple[str, ...]
    help: str
    cli_type: Any = None
    cli_default: Any = FIELD_DEFAULT
    metavar: str | None = None
    hidden: bool = False
    panel: str | None = None


def opt(*flags: str, help: str, default: Any = MISSING, factory: Any = MISSING, **cli: Any) -> Any:
    """A dataclass field with its command-line option."""
    meta = {"cli": Opt(flags, help, **cli)}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def same_as(owner: str, default: Any) -> Any:
    """A field set by another group's option (`Group.field`): one --threads, one --seed per command."""
    return field(default=default, metadata={"same_as": owner})


def sub(cls: type, flatten: bool = False) -> Any:
    """A field holding another group; `flatten`: its fields read as the parent's own in the flat
    CompressionConfig form (`config.seed`)."""
    return field(default_factory=cls, metadata={"group": cls, "flatten": flatten})


# group class -> its help panel title, in definition order
GROUPS: dict[type, str] = {}


def group(panel: str) -> Callable[[type[T]], type[T]]:
    def register(cls: type[T]) -> type[T]:
        GROUPS[cls] = panel
        return cls

    return register


def cli_option(f: Field[Any]) -> Opt | None:
    return f.metadata.get("cli")


def group_by_name(name: str) -> type:
    return next(cls for cls in GROUPS if cls.__name__ == name)


@group("Image preprocessing")
@dataclass(frozen=True)
class Preprocess:
    """How images become model input. `size` is (height, width); None keeps the images' size.
    `layout` "auto" reads it from the model's input shape (channels of 1, 3 or 4 second: NCHW; last: NHWC).
    `scale`: the value a full-intensity pixel (255) has at the model input, before `mean` / `std`:
    1 divides pixels by 255, 255 keeps raw 0-255 values. None: 1 for image folders, and integer
    .npz arrays fed to a float input are refused (they are pixels whose scale nobody declared)."""

    size: tuple[int, int] | None = opt("--size", default=None, cli_type=str | None, help="Resize images (--data / --calibrate folders) to N or H,W.")
    mean: tuple[float, ...] | None = opt("--mean", default=None, cli_type=str | None, help="Per-channel mean subtracted from pixels scaled by --scale (images; integer .npz arrays), e.g. 0.485,0.456,0.406.")
    std: tuple[float, ...] | None = opt("--std", default=None, cli_type=str | None, help="Per-channel std images are divided by, e.g. 0.229,0.224,0.225.")
    layout: str = opt("--layout", default="auto", help="Image layout fed to the model: auto, nchw or nhwc.")  # auto | nchw | nhwc
    scale: float | None = opt("--scale", default=None, help="What a full-intensity pixel (255) is at the model input, before --mean/--std: 1 (pixels / 255, the default for image folders) or 255 (raw 0-255). Integer .npz arrays for a float input are pixels and need it; float arrays are used as they are.")
    # Image folders only, in this order (torchvision's Resize(N) + CenterCrop(H, W)): the shorter side
    # resized to `resize_shorter` (the longer one in proportion, truncated), then a centre crop; then
    # `channel_order` "bgr" reverses RGB(A) to BGR(A) for models trained on OpenCV-decoded images.
    resize_shorter: int | None = opt("--resize-shorter", default=None, help="Resize images (folders) so the shorter side is N, keeping the aspect ratio (torchvision's Resize(N)); then --crop.")
    crop: tuple[int, int] | None = opt("--crop", default=None, cli_type=str | None, help="Centre-crop images (folders) to N or H,W after --resize-shorter, e.g. 224 (ImageNet: --resize-shorter 256 --crop 224).")
    channel_order: str = opt("--channel-order", default="rgb", help="rgb, or bgr for models trained on OpenCV-decoded (BGR) images (folders).")  # rgb | bgr

    def __post_init__(self) -> None:
        _normalise_preprocess(self)
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
KIND_CHOICES = ("tucker2", "tucker1", "tucker1-in", "svd", "spatial-svd", "cp")  # what --kind may force


def kind_list(kind: str | None) -> tuple[str, ...] | None:
    """`--kind K[,K...]` as a tuple, in the order given; None when no kind is forced."""
    return None if kind is None else tuple(k.strip() for k in kind.split(",") if k.strip())


@dataclass(frozen=True)
class RankPolicy:
    """How ranks are chosen: `vbmf` (EVBMF, the paper), `ratio:F`, `energy:F`, `full`, or `data:F` (with
    calibration data: the whole model keeps a fraction F of its MACs, spent where the layers' outputs on
    the data lose least; calibration/rankselect.py)."""

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
TARGET_FORMS = "macs:F, params:F, latency:F or agreement:F (0 < F < 1)"  # every message lists all of them


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
            raise UsageError(f"--target {text}: not understood; use {TARGET_FORMS}, e.g. macs:0.3")
        metric = m.group(1)
        if metric not in TARGET_METRICS:
            later = " (accuracy-drop targets are not implemented yet)" if metric == "accuracy-drop" else ""
            raise UsageError(f"--target {text}: unknown metric {metric!r}{later}; use {TARGET_FORMS}")
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


# ---- the groups, one per concern ------------------------------------------------------------------


class _Normalised:
    """Groups parse the CLI spellings of their fields and check every field's type (tables below)."""

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]
        for name, value in _normalise(values, type(self).__name__).items():
            object.__setattr__(self, name, value)


@group("Ranks")
@dataclass(frozen=True)
class RankOptions(_Normalised):
    """How each layer's ranks are chosen, or the whole model's budget they are spent on."""

    ranks: RankPolicy = opt("--ranks", factory=RankPolicy, cli_type=str, cli_default="vbmf", help="Rank policy: vbmf (EVBMF, default), ratio:F, energy:F, full (verification: no truncation), or data:F (with --calibrate: keep a fraction F of the MACs, ranks chosen from the layers' outputs on the data).")
    rank_scale: float = opt("--rank-scale", default=1.0, help="Multiply every chosen rank by F (rounded up).")
    # None: an EVBMF rank of 0 keeps the layer as is
    min_rank: int | None = opt("--min-rank", default=None, help="Floor on every rank (also turns an EVBMF rank of 0 into N).")
    round_to: int = opt("--round-to", default=1, help="Round ranks up to a multiple of N (capped at the dimension), e.g. 8 for SIMD.")
    include: str | None = opt("--include", default=None, help="Only decompose nodes whose name matches this regex.")
    exclude: str | None = opt("--exclude", default=None, help="Never decompose nodes whose name matches this regex.")
    hooi_iters: int = opt("--hooi-iters", default=0, help="HOOI sweeps after the HOSVD start (0: plain HOSVD).")
    # Convs with fewer input channels than this get Tucker-1 (output mode only), as the paper does
    # for the first RGB conv: a 1x1 S->R3 with tiny S saves nothing.
    min_tucker2_channels: int = 8
    # None: each layer's default (Tucker-2, Tucker-1 for few input channels, SVD for 1x1 / matrices).
    kind: str | None = opt("--kind", default=None, help="Decompose every layer that allows it as this kind: tucker2, tucker1, tucker1-in (Tucker-1 on the input mode: a 1x1 S->R then the k x k R->T), svd, spatial-svd (a 2-D k x k conv as k x 1 then 1 x k, AIMET's spatial SVD) or cp (CP: 1x1, depthwise k x k, 1x1; ungrouped convs); the others keep their default. A comma-separated list: the first the layer allows. With --ranks data:F the data choose the kind per layer, among the listed ones when given (e.g. --kind tucker2,tucker1,spatial-svd,tucker1-in leaves CP out: fewer MACs for its error, but its depthwise conv ran slower than its MACs in onnxruntime CPU).")
    # Layers planned and decomposed in parallel (threads). Changes speed only, never the result.
    jobs: int = opt("--jobs", "-j", default=1, help="Layers planned and decomposed in parallel (threads); the result is the same for every N.")
    # A whole-model budget instead of per-layer ranks (planning/budget.py): `macs:0.3`, `params:0.2`,
    # `latency:0.5` (which times the layers, as latency_aware does, and keeps only chains that pay).
    target: BudgetTarget | None = opt("--target", default=None, cli_type=str | None, help="Whole-model budget: macs:F or params:F (fraction of the original, 0 < F < 1): ranks spent where the kernels lose the least energy per MAC (or parameter) saved; params:G with --ranks data:F --calibrate: both budgets at once (MACs <= F and all float parameters <= G of the original), allocated on the calibration data's output errors; latency:F: the least compression whose layers, timed alone in onnxruntime, take F of the original time (implies per-layer timing as --latency-aware; with --calibrate allocated on the data's output errors and the measured times); agreement:F (with --data): the most compression whose top-1 agreement with the original stays >= F (with --calibrate: the data's allocation, each candidate refit before it is measured).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.rank_scale > 0:
            raise UsageError(f"--rank-scale {self.rank_scale}: must be > 0; use e.g. 1.5 for 50% more rank")
        if self.min_rank is not None and self.min_rank < 1:
            raise UsageError(f"--min-rank {self.min_rank}: must be >= 1; leave it out for no floor")
        if self.round_to < 1:
            raise UsageError(f"--round-to {self.round_to}: must be >= 1; use 1 for no rounding")
        if self.hooi_iters < 0:
            raise UsageError(f"--hooi-iters {self.hooi_iters}: must be >= 0; use 0 for plain HOSVD")
        if self.jobs < 1:
            raise UsageError(f"--jobs {self.jobs}: must be >= 1; use 1 for one layer at a time")
        kinds = kind_list(self.kind)
        if kinds is not None:
            bad = [k for k in kinds if k not in KIND_CHOICES] or ([] if kinds else [str(self.kind)])
            if bad:
                raise UsageError(f"--kind {self.kind}: {', '.join(map(repr, bad))} is not a decomposition; "
                                 f"use one or more of {', '.join(KIND_CHOICES)}, comma-separated")
        compile_pattern(self.include, "--include")
        compile_pattern(self.exclude, "--exclude")


@group("Plan files")
@dataclass(frozen=True)
class PlanIO(_Normalised):
    """A plan file to replay (`--save-plan` writes one: OutputOptions)."""

    plan_file: str | None = opt("--plan", default=None, cli_type=Path | None, help="Replay the kinds and ranks of a plan file written by --save-plan.")


@group("Inputs")
@dataclass(frozen=True)
class InputOptions(_Normalised):
    """What the models are fed: fixed dynamic dimensions, and the seed of every random choice."""

    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = opt("--input-shape", default=(), cli_type=list[str] | None, cli_default=None, metavar="NAME:D0,D1,...", help="NAME:D0,D1,... fixes an input's dynamic dims (repeatable).")
    seed: int = opt("--seed", default=0, help="Seed of every random choice (validation inputs).")


@group("Validation and data")
@dataclass(frozen=True)
class ValidationConfig(_Normalised):
    """Original against compressed in onnxruntime: on `samples` seeded random inputs, or on user
    data (.npz: one array per input, optional `labels`; an image folder through `preprocess`)."""

    validate: bool = opt("--validate/--no-validate", default=True, help="Compare original and compressed outputs in onnxruntime.")
    # random inputs (default 8), or a cap on --data samples (default all)
    samples: int | None = opt("--samples", default=None, help="Random inputs used for validation (default 8), or how many --data samples to use (default all).")
    data: str | None = opt("--data", default=None, cli_type=Path | None, help="Validate on real data: a .npz with one array per model input (samples on the first axis) and optional 'labels' for accuracy, or an image folder (one sub-folder per class: labels; pixels scaled to [0, 1]).")
    # Validation passes when max|orig - new| <= rtol * max|orig| for every output. None: report only
    # (a lossy compression is expected to change outputs), except under --ranks full.
    rtol: float | None = opt("--rtol", default=None, help="Fail when max|orig-new| > RTOL * max|orig| on any output (default: report only; 1e-4 under --ranks full).")
    inputs: InputOptions = sub(InputOptions, flatten=True)
    # How images in --data / --calibrate folders become model input (size, mean/std, layout).
    preprocess: Preprocess = sub(Preprocess)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.samples is not None and self.samples < 1:
            raise UsageError(f"--samples {self.samples}: must be >= 1; e.g. --samples 8")
        if self.rtol is not None and not self.rtol >= 0:
            raise UsageError(f"--rtol {self.rtol}: must be >= 0; e.g. --rtol 0.05")

    @property
    def input_shapes(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        return self.inputs.input_shapes

    @property
    def seed(self) -> int:
        return self.inputs.seed

    def effective_rtol(self, weight_eps: float = 2.0**-23, full_rank: bool = False) -> float | None:
        """The tolerance checked: `rtol`, else under full ranks (nothing truncated) one that follows
        the precision of the model's weights (`weight_eps`: machine epsilon of the least precise float
        dtype: 1e-4 for float32, 1e-2 for float16, 8e-2 for bfloat16), else None (report only)."""
        if self.rtol is not None:
            return self.rtol
        return max(1e-4, 10 * weight_eps) if full_rank else None


LOSS_AWARE_METHODS = ("probe", "fisher")  # training/lossaware.py
REFIT_WEIGHTS = ("none", "fisher")  # calibration/calibrate.py's channel weights, training/lossaware.py


@group("Calibration")
@dataclass(frozen=True)
class CalibrationConfig(_Normalised):
    """Refit the factors on unlabeled data after decomposing (calibration/calibrate.py);
    `calibration_samples` caps how many samples are read."""

    calibrate: str | None = opt("--calibrate", default=None, cli_type=Path | None, help="Refit each decomposed layer's factors so its output matches the original's on this unlabeled data (.npz with one array per model input, or an image folder: see --size/--mean/--std); same graph. Without --data, validation runs on it too.")
    calibration_samples: int = opt("--calibration-samples", default=500, help="How many --calibrate samples to use (a random subset, seeded by --seed, when the file has more).")
    sensitivity: str | None = opt("--sensitivity", default=None, cli_type=Path | None, help="With ranks chosen on the calibration data (data:F, or a MAC, latency or agreement target with --calibrate): keep every layer's calibrated candidates in this JSON file, keyed by the model, the calibration data and the options; a later run with the same three (another F, --latency-aware) reads them instead of walking the model again. A file with another key is recomputed and rewritten.")
    refine: bool = opt("--refine", default=False, help="After the refit, optimise the factors of each block of decomposed layers (a residual block, or up to 3 consecutive layers) by gradient descent so the block reproduces the original's output on the --calibrate data (torch: the finetune extra); a block keeps its new factors only when its error on held-out calibration images falls.")
    loss_aware: bool = opt("--loss-aware", default=False, help="With ranks chosen on the calibration data (data:F, or a MAC or latency target with --calibrate): weight each layer's output error by how much the model's prediction moves per unit of it (measured without labels on 64 calibration images, see --loss-aware-method; torch: the finetune extra), so the MAC budget goes where errors cost the most. Measured no better than without on ResNet-20 and worse on Darknet Tiny (docs/calibration.md).")
    loss_aware_method: str = opt("--loss-aware-method", default="probe", help="With --loss-aware: probe (each layer's output projected on its leading channels in a forward pass, the output change measured) or fisher (a diagonal Fisher estimate from gradients: cheaper in theory, measured worse; docs/calibration.md).")
    refit_weights: str = opt("--refit-weights", default="none", help="With --calibrate: none (each layer's refit minimises its output's squared error) or fisher (each output channel's error weighted by the diagonal Fisher information of the original's prediction with respect to it, estimated without labels on 64 calibration images; torch: the finetune extra). See docs/calibration.md for what it measured.")
    refine_steps: int = opt("--refine-steps", default=200, help="With --refine: Adam steps per block (32 images each).")
    calibration_memory: str = opt("--calibration-memory", default="512M", help="Memory for the activations kept between the layers of a calibration walk (refit, data-driven ranks), e.g. 512M or 4G; beyond it they go to a temporary folder (TMPDIR) and are read back one batch at a time. Checked against the memory available before the work starts.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.calibration_samples < 1:
            raise UsageError(f"--calibration-samples {self.calibration_samples}: must be >= 1; e.g. 500")
        parse_bytes(self.calibration_memory, "--calibration-memory")
        if self.refine_steps < 1:
            raise UsageError(f"--refine-steps {self.refine_steps}: must be >= 1; e.g. 200")
        if self.loss_aware_method not in LOSS_AWARE_METHODS:
            raise UsageError(f"--loss-aware-method {self.loss_aware_method}: use {' or '.join(LOSS_AWARE_METHODS)}")
        if self.refit_weights not in REFIT_WEIGHTS:
            raise UsageError(f"--refit-weights {self.refit_weights}: use {' or '.join(REFIT_WEIGHTS)}")
        if self.refit_weights != "none" and not self.calibrate:
            raise UsageError(f"--refit-weights {self.refit_weights}: the weights are measured on the calibration data; add --calibrate DATA")
        if self.loss_aware and not self.calibrate:
            raise UsageError("--loss-aware: the layer weights are measured on the calibration data; add --calibrate DATA")
        if self.refine and not self.calibrate:
            raise UsageError("--refine: block-wise recovery runs on the calibration data; add --calibrate DATA")

    @property
    def calibration_memory_bytes(self) -> int:
        return parse_bytes(self.calibration_memory, "--calibration-memory")


# The runtimes per-layer timing can run in (--latency-runtime): adapters of mobile/adapters.py.
LATENCY_RUNTIMES = ("ort", "ort-mobile", "mnn", "ort-int8")  # ort-int8: quantize/layertime.py


@group("Latency-aware planning")
@dataclass(frozen=True)
class LatencyConfig(_Normalised):
    """Keep a decomposition only where the runtime measures it at least `min_speedup` times faster
    than the original layer (planning/latency.py); layers are timed alone in onnxruntime CPU with
    `threads` intra-op threads (BenchConfig's --threads: one meaning in every command)."""

    latency_aware: bool = opt("--latency-aware", default=False, help="Time each layer and its chain alone in onnxruntime CPU (interleaved medians, cached per shape); keep a decomposition only where it is --min-speedup times faster, after trying ranks rounded to --round-to (else 8 and 16) and Tucker-1. With --plan: the plan replays exactly and its layers are only timed. With --ranks data:F (or --target macs:F --calibrate) the MAC budget is allocated on the calibration data and the measured time together: SIMD-friendly ranks timed (at most 8 per layer), only chains that pay, the budget met within one rank step or the run stops saying why.")
    min_speedup: float = opt("--min-speedup", default=1.1, help="With --latency-aware: the measured speed-up a layer's chain must reach to be kept.")
    latency_runtime: str = opt("--latency-runtime", default="ort", help="Where --latency-aware and --target latency:F time each layer: ort (onnxruntime CPU, default), ort-mobile (the ORT format as onnxruntime's converter writes it for mobile: no NCHWc layout, as 'report' runs it), mnn (MNN, in a child process) or ort-int8 (onnxruntime CPU, each layer and its chain quantized to INT8 as --quantize int8 does: the INT8 chains' times).")
    threads: int = same_as("BenchConfig.threads", 1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.min_speedup > 0:
            raise UsageError(f"--min-speedup {self.min_speedup}: must be > 0; e.g. 1.1 for 10% faster")
        if not isinstance(self.latency_runtime, str):
            raise _wrong_type("LatencyConfig", "latency_runtime", self.latency_runtime, "a str (ort, ort-mobile or mnn)", "'ort'")
        runtime = self.latency_runtime.strip().lower()
        if runtime not in LATENCY_RUNTIMES:
            raise UsageError(f"--latency-runtime {self.latency_runtime}: not a runtime layers can be timed in; "
                             f"use {', '.join(LATENCY_RUNTIMES)}")
        object.__setattr__(self, "latency_runtime", runtime)
        if self.threads < 1:
            raise UsageError(f"--threads {self.threads}: must be >= 1; e.g. --threads 1")


@group("Timing")
@dataclass(frozen=True)
class BenchConfig:
    """How latency is measured: onnxruntime CPU, `threads` intra-op threads, `warmup` untimed runs,
    then `runs` timed runs of each model, interleaved, on inputs of `inputs`' shapes and seed."""

    threads: int = opt("--threads", default=1, help="onnxruntime intra-op threads, the one meaning of --threads in every command (--bench, --latency-aware; under 'report', every runtime's); torch's threads for fine-tuning are --torch-threads.")
    warmup: int = opt("--warmup", default=5, help="Untimed warm-up runs per model before timing.")
    runs: int = opt("--runs", default=20, help="Timed runs per model for latency (after --warmup runs).")
    inputs: InputOptions = sub(InputOptions)

    def __post_init__(self) -> None:
        for name in ("threads", "warmup", "runs"):
            v = getattr(self, name)
            if not _is_int(v):
                raise _wrong_type("BenchConfig", name, v, "an int", "5")
            object.__setattr__(self, name, int(v))
        if self.threads < 1:
            raise UsageError(f"--threads {self.threads}: must be >= 1; e.g. --threads 1")
        if self.warmup < 0:
            raise UsageError(f"--warmup {self.warmup}: must be >= 0; e.g. --warmup 5")
        if self.runs < 1:
            raise UsageError(f"--runs {self.runs}: must be >= 1; e.g. --runs 20")


@group("Mobile runtimes")
@dataclass(frozen=True)
class MobileReportOptions:
    """`report`: which runtimes convert, run and time both models, and when one passes."""

    runtimes: str = opt("--runtimes", default="ort,ort-mobile,mnn,ncnn", help="Comma-separated runtimes: ort (onnxruntime CPU), ort-mobile (ORT format + NNAPI/CoreML analysis), mnn, ncnn. One not installed is listed with its pip command.")
    timeout: float = opt("--timeout", default=120.0, help="Seconds a runtime may take to convert and run one model (and to time both) before it counts as hung.")
    # Not ValidationConfig's --rtol (original against compressed): a runtime against onnxruntime, same model.
    rtol: float = opt("--rtol", default=1e-2, help="A runtime passes when its outputs for the compressed model are within RTOL * max|output| of onnxruntime's (ncnn stores fp16 weights: ~1e-3).")
    strict: bool = opt("--strict", default=False, help="Exit 1 unless every listed runtime converts and runs both models and computes the compressed one as onnxruntime does (within --rtol).")


# --report writes a different JSON per command (report/data.py): each command gives its own help,
# naming its top-level keys (cli.py); this one is compress's.
COMPRESS_REPORT_HELP = "Write the full report as JSON (keys: layers, totals, validation, latency, calibration, finetune, target, mac_budget, layer_timing, config, quantize, comparison, model; latency is null without --bench, calibration without --calibrate, finetune without --finetune, target without --target (and under --ranks data:F --target params:G, whose two budgets mac_budget gives), mac_budget without --ranks data:F, layer_timing without --latency-aware, quantize without --quantize int8, comparison without --quantize-compare, validation under --no-validate)."


@group("Output")
@dataclass(frozen=True)
class OutputOptions:
    """Files written besides the model (each refused before any work when it is an input)."""

    save_plan: Path | None = opt("--save-plan", default=None, panel="Plan files", help="Write the plan (kinds and ranks per layer) as JSON.")
    report: Path | None = opt("--report", default=None, help=COMPRESS_REPORT_HELP)
    markdown: Path | None = opt("--markdown", default=None, help="Write the report as Markdown.")
    html: Path | None = opt("--html", default=None, help="Write the report as one self-contained HTML file (tables and plots).")
    mobile_report: Path | None = opt("--mobile-report", default=None, help="After writing OUTPUT, also write the mobile validation report (HTML) of INPUT against it in every installed runtime (see 'onnx-tucker report').")


# ---- fine-tuning options (no torch needed to build or read them) -----------------------------------

# The paper's optimiser and rate (SGD, momentum 0.9, lr 1e-3) are the default, with a cosine decay over
# the run; `schedule="step"` divides by 10 every `step_epochs` as the paper does. Measured on CIFAR
# ResNet-20 from a calibrated start (README, Fine-tuning): SGD 1e-3 cosine reaches the control in 3
# epochs; Adam 2e-3 (the default before calibration existed) wrecks an already good model (control
# 80.7 -> 12.9 %). A rate too high cannot hurt OUT: the starting weights compete as epoch 0.
PAPER_LR = 1e-3
DEFAULT_ADAM_LR = 2e-3


@group("Fine-tuning")
@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = opt("--epochs", default=3, help="Passes over the training data.")
    batch_size: int = opt("--batch-size", default=64, help="Samples per optimiser step.")
    # sgd (momentum 0.9, the paper; default) | adam
    optimizer: str = opt("--optimizer", default="sgd", help="sgd (momentum 0.9, the paper's; default) or adam.")
    # None: 1e-3 for sgd (the paper), 2e-3 for adam
    lr: float | None = opt("--lr", default=None, help="Learning rate (default 1e-3 for sgd, the paper's; 2e-3 for adam).")
    # cosine (per step, to 0) | step (divide by 10 every step_epochs, the paper) | constant
    schedule: str = opt("--schedule", default="cosine", help="cosine (to 0 over the run), step (lr / 10 every --step-epochs, the paper), or constant.")
    step_epochs: int = opt("--step-epochs", default=5, help="Epochs between the step schedule's lr / 10.")
    momentum: float = 0.9
    weight_decay: float = opt("--weight-decay", default=0.0, help="L2 weight decay.")
    max_steps: int | None = opt("--max-steps", default=None, help="Stop after this many optimiser steps in all.")
    # Gradients rescaled to at most this global norm (None: never). Distillation at T^2 = 16 from a
    # calibrated start diverged at step 3 without it (SGD 1e-3, ResNet-20); normal steps are far below.
    clip_grad: float | None = 5.0
    temperature: float = opt("--temperature", default=4.0, help="Distillation temperature for class-score outputs.")
    alpha: float = opt("--alpha", default=0.5, help="Weight of the labelled loss when DATA has labels and --teacher is given.")
    # False: ignore DATA's labels (pure distillation, labels used nowhere)
    use_labels: bool = opt("--labels/--no-labels", default=True, help="Use DATA's labels; --no-labels: pure distillation from --teacher.")
    # all | factors (only the decomposed layers' weights)
    train: str = opt("--train", default="all", help="all weights, or only the decomposed layers' factors.")
    # random crop (zero padding H/8) and horizontal flip for image inputs
    augment: bool = opt("--augment/--no-augment", default=True, help="Random crop (zero padding) and horizontal flip of image inputs.")
    # None: the zero-padded shift above; F: random resized crops (area F..1 of the image, aspect 3/4..4/3,
    # resized back bilinearly: the inception crop), for few images of a large input (distillation on photos)
    crop_scale: float | None = opt("--crop-scale", default=None, help="With --augment: random resized crops of F..1 of each image's area (aspect 3/4..4/3), resized back to the input size, instead of the zero-padded shift; e.g. 0.25 for few photos at 224x224.")
    # 0: off; A: each batch mixed with a shuffled copy of itself, weight ~ Beta(A, A), teacher and
    # labels mixed alike (function matching: the teacher answers on the same mixed input)
    mixup: float = opt("--mixup", default=0.0, help="With --augment: mix each batch with a shuffled copy of itself (weight ~ Beta(A, A)); the teacher sees the same mixed inputs, labels are mixed alike. 0: off.")
    # held-out share of DATA when no val_data is given (0: no validation)
    val_split: float = opt("--val-split", default=0.1, help="Share of DATA held out when there is no --val-data (0: none).")
    device: str = opt("--device", default="auto", help="auto (cuda when available), cpu or cuda.")  # auto | cpu | cuda
    seed: int = same_as("InputOptions.seed", 0)
    # torch CPU threads, `--torch-threads` (None: default_torch_threads())
    threads: int | None = opt("--torch-threads", default=None, help="torch CPU threads for fine-tuning (default: the CPUs not already busy, by the 1-minute load, at least 1: on a shared 2-core machine 2 threads ran up to 5x slower than 1 when another process was busy). Printed when training starts.")
    # None: OUT + ".finetune.pt"
    checkpoint: str | None = opt("--checkpoint", default=None, cli_type=Path | None, help="Checkpoint written after each epoch (default OUT.finetune.pt).")
    resume: bool = opt("--resume", default=False, help="Continue from the checkpoint (after Ctrl-C, or with more --epochs).")
    preprocess: Preprocess = sub(Preprocess)
    rtol: float = 1e-4  # exported ONNX vs torch module: max|a-b| <= rtol * max|a|

    def __post_init__(self) -> None:
        def bad(opt: str, val: object, fix: str) -> None:
            raise UsageError(f"{opt} {val}: {fix}")

        if isinstance(self.checkpoint, os.PathLike):
            object.__setattr__(self, "checkpoint", os.fspath(self.checkpoint))
        if self.epochs < 1:
            bad("--epochs", self.epochs, "give at least 1")
        if self.batch_size < 1:
            bad("--batch-size", self.batch_size, "give at least 1")
        if self.optimizer not in ("sgd", "adam"):
            bad("--optimizer", self.optimizer, "use sgd or adam")
        if self.schedule not in ("step", "cosine", "constant"):
            bad("--schedule", self.schedule, "use step, cosine or constant")
        if self.lr is not None and not self.lr > 0:
            bad("--lr", self.lr, "give a positive learning rate")
        if self.step_epochs < 1:
            bad("--step-epochs", self.step_epochs, "give at least 1")
        if self.weight_decay < 0:
            bad("--weight-decay", self.weight_decay, "give 0 or more")
        if self.clip_grad is not None and not self.clip_grad > 0:
            bad("--clip-grad", self.clip_grad, "give a positive gradient norm (or leave it out)")
        if self.max_steps is not None and self.max_steps < 1:
            bad("--max-steps", self.max_steps, "give at least 1")
        if not self.temperature > 0:
            bad("--temperature", self.temperature, "give a positive temperature")
        if not 0.0 <= self.alpha <= 1.0:
            bad("--alpha", self.alpha, "give a weight between 0 and 1")
        if self.train not in ("all", "factors"):
            bad("--train", self.train, "use all or factors")
        if self.crop_scale is not None and not 0.0 < self.crop_scale <= 1.0:
            bad("--crop-scale", self.crop_scale, "give the smallest crop's share of the image area, in (0, 1], e.g. 0.25")
        if not (math.isfinite(self.mixup) and self.mixup >= 0):
            bad("--mixup", self.mixup, "give 0 (off) or a positive Beta parameter, e.g. 1")
        if not 0.0 <= self.val_split < 1.0:
            bad("--val-split", self.val_split, "give a share in [0, 1)")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            bad("--device", self.device, "use auto, cpu or cuda")
        if self.threads is not None and self.threads < 1:
            bad("--torch-threads", self.threads, "give at least 1")

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return PAPER_LR if self.optimizer == "sgd" else DEFAULT_ADAM_LR

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class FinetuneStep:
    """`compress --finetune DATA`: fine-tune the compressed model before it is validated and written
    (the paper's third step in the same run). `teacher_is_original`: distil from the input model."""

    data: str
    config: FinetuneConfig = field(default_factory=FinetuneConfig)
    teacher_is_original: bool = False
    val_data: str | None = None


@group("Fine-tuning")
@dataclass(frozen=True)
class FinetuneOptions:
    """`compress --finetune DATA` and its companions; `step()` is the fine-tuning the run does, if any."""

    data: str | None = opt("--finetune", default=None, cli_type=Path | None, help="Fine-tune the compressed model on this data before validating and writing it (the paper's step 3; as `finetune --data`; needs the finetune extra).")
    teacher_is_original: bool = opt("--teacher-is-original", default=False, help="With --finetune: distil from INPUT's outputs (no labels needed; with labels both losses).")
    val_data: str | None = opt("--val-data", default=None, cli_type=Path | None, help="Held-out data for validation after each epoch (default: --val-split of DATA).")
    config: FinetuneConfig = sub(FinetuneConfig)

    def __post_init__(self) -> None:
        for name in ("data", "val_data"):
            v = getattr(self, name)
            if isinstance(v, os.PathLike):
                object.__setattr__(self, name, os.fspath(v))

    def step(self) -> FinetuneStep | None:
        """The fine-tuning step of `compress`; its companions without --finetune are a usage error."""
        if self.data is None:
            if self.teacher_is_original or self.val_data is not None or self.config.threads is not None:
                raise UsageError("--teacher-is-original / --val-data / --torch-threads: only with --finetune DATA; "
                                 "add --finetune TRAIN, or leave them out")
            return None
        return FinetuneStep(self.data, self.config, self.teacher_is_original, self.val_data)


@group("Fine-tuning")
@dataclass(frozen=True)
class TrainingData:
    """`finetune`: the data it trains on and the model it distils from."""

    data: Path | None = opt("--data", default=None, cli_default=REQUIRED, help="Training data: an image folder (one sub-folder per class: labels), a flat image folder, or a .npz (one array per input, optional 'labels').")
    teacher: Path | None = opt("--teacher", default=None, help="The original model: distil from its outputs (no labels needed).")


# ---- INT8 after low-rank (issue 18): quantize/ reads these; `compress --quantize int8` and `quantize` ----

QUANTIZE_MODES = ("int8",)
QUANTIZE_METHODS = ("minmax", "entropy", "percentile")


@group("Quantization")
@dataclass(frozen=True)
class QuantizeConfig:
    """Static post-training INT8 quantization with onnxruntime's quantizer (QDQ, per-channel weights),
    calibrated on the same data as the refit (`--calibrate`, else `--data`); quantize/stage.py."""

    quantize: str | None = opt("--quantize", default=None, help="int8: after compression (and --calibrate), quantize statically with onnxruntime's quantizer (QDQ format, per-channel INT8 weights, INT8 activations) calibrated on the --calibrate data (else --data); OUTPUT is the INT8 model.")
    method: str = opt("--quantize-method", default="minmax", help="How activation ranges are calibrated: minmax, entropy or percentile (onnxruntime's CalibrationMethod).")
    exclude: str | None = opt("--quantize-exclude", default=None, metavar="REGEX", help="Keep in FP32 every decomposed chain (layer name) or node whose name matches this regex (onnxruntime's nodes_to_exclude).")
    min_sqnr: float | None = opt("--quantize-min-sqnr", default=None, metavar="DB", help="Keep in FP32 every chain whose INT8 output, fed the FP32 input, is below DB dB SQNR against FP32 on the calibration data (the reason is in the report); default: report the SQNR only.")
    compare: bool = opt("--quantize-compare/--no-quantize-compare", default=False, help="Also quantize INPUT and measure the four models (original FP32 / INT8, compressed FP32 / INT8): agreement with the original, accuracy with labels, size, onnxruntime CPU latency.")
    round_to: int = opt("--quantize-round-to", default=4, metavar="N", help="Under --quantize int8, ranks are rounded up to a multiple of N when --round-to is left at 1: onnxruntime's INT8 kernels run ranks that are not a multiple of 4 up to x2.6 slower (docs/int8.md, measured); 1 to keep the ranks as planned.")
    keep_names: bool = opt("--quantize-keep-names", default=False, help="Keep the names onnxruntime's quantizer gives the tensors and nodes it adds (long: a quarter of a small INT8 file). Default: those tensors get short names (t0, t1, ...), identical constants are shared, and the layers' nodes keep their names; the computation is the same.")
    runtimes: str = opt("--quantize-runtimes", default="ort-mobile,mnn", help="Deploy runtimes the compared models are also converted, run and timed in, one column each (ort-mobile: ORT format; mnn; ncnn); 'none' for onnxruntime CPU only. A runtime that cannot convert or run a model (MNN and QDQ) is a finding in the table. MNN's INT8 rows are quantized by MNN's own mnnquant on the same calibration samples.")
    runtime_samples: int = opt("--quantize-runtime-samples", default=32, metavar="N", help="Samples of the data each deploy runtime runs every model on, for its agreement, SQNR and accuracy (the first N, in whole batches).")

    def __post_init__(self) -> None:
        if self.quantize is not None:
            mode = str(self.quantize).strip().lower()
            if mode not in QUANTIZE_MODES:
                raise UsageError(f"--quantize {self.quantize}: not a quantization; use {', '.join(QUANTIZE_MODES)}")
            object.__setattr__(self, "quantize", mode)
        method = str(self.method).strip().lower()
        if method not in QUANTIZE_METHODS:
            raise UsageError(f"--quantize-method {self.method}: not a calibration method; use {', '.join(QUANTIZE_METHODS)}")
        object.__setattr__(self, "method", method)
        compile_pattern(self.exclude, "--quantize-exclude")
        if not _is_int(self.round_to) or int(self.round_to) < 1:
            raise UsageError(f"--quantize-round-to {self.round_to}: a whole number >= 1, e.g. 4; 1 for no rounding")
        if self.min_sqnr is not None and not (_is_real(self.min_sqnr) and math.isfinite(float(self.min_sqnr))):
            raise UsageError(f"--quantize-min-sqnr {self.min_sqnr}: give a number of dB, e.g. 20")

    @property
    def enabled(self) -> bool:
        return self.quantize is not None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def quantize_data_option(calibrate: str | None, data: str | None, what: str = "--quantize int8") -> tuple[str, str]:
    """(the data the quantizer calibrates on, the option it came from): `--calibrate` (the refit's
    data), else `--data`; neither is the one-line usage error."""
    if calibrate:
        return calibrate, "--calibrate"
    if data:
        return data, "--data"
    raise UsageError(f"{what}: needs calibration data for the activation ranges; add --calibrate DATA or --data DATA "
                     "(a .npz with one array per input, or an image folder)")


# ---- the compression pipeline's options: the groups it reads, and its first (flat) form --------------

_GROUP_KWARGS = ("rank", "plan_io", "validation", "calibration", "latency")


class CompressionConfig:
    """Everything that decides the plan and the checks. Defaults follow the paper.

    Built from its groups (`CompressionConfig(rank=RankOptions(...), validation=...)`) or from the
    flat field names of its first form (`CompressionConfig(ranks="ratio:0.5", samples=4)`), which
    also read as attributes (`config.samples`) and work with `dataclasses.replace`."""

    if TYPE_CHECKING:  # a dataclass (below) that mypy reads as a plain class: replace() takes the flat names
        __dataclass_fields__: ClassVar[dict[str, Field[Any]]]

    rank: RankOptions = sub(RankOptions)
    plan_io: PlanIO = sub(PlanIO)
    validation: ValidationConfig = sub(ValidationConfig)
    calibration: CalibrationConfig = sub(CalibrationConfig)
    latency: LatencyConfig = sub(LatencyConfig)

    def __init__(self, rank: RankOptions | None = None, plan_io: PlanIO | None = None,
                 validation: ValidationConfig | None = None, calibration: CalibrationConfig | None = None,
                 latency: LatencyConfig | None = None, **flat: Any) -> None:
        unknown = sorted(set(flat) - set(_FLAT))
        if unknown:
            raise TypeError(f"CompressionConfig() got an unexpected keyword argument {unknown[0]!r}")
        given: dict[str, Any] = {"rank": rank, "plan_io": plan_io, "validation": validation,
                                 "calibration": calibration, "latency": latency}
        parts = {name: given[name] if given[name] is not None else f.metadata["group"]()
                 for name, f in ((f.name, f) for f in fields(self))}
        # The flat keywords: checked with this class's name in the messages, then set on their groups
        # (deepest first: seed on validation.inputs before the validation group is rebuilt).
        by_path: dict[tuple[str, ...], dict[str, Any]] = {}
        for name, value in _normalise(flat, "CompressionConfig").items():
            path = _FLAT[name]
            for depth in range(1, len(path)):
                by_path.setdefault(path[:depth], {})
            by_path.setdefault(path, {})[name] = value
        for path in sorted(by_path, key=len, reverse=True):
            owner: Any = parts[path[0]]
            for part in path[1:]:
                owner = getattr(owner, part)
            new = replace(owner, **by_path[path]) if by_path[path] else owner
            if len(path) > 1:
                by_path[path[:-1]][path[-1]] = new
            else:
                parts[path[0]] = new
        for name, value in parts.items():
            object.__setattr__(self, name, value)
        self._check()

    def _check(self) -> None:
        """The rules between groups."""
        target, ranks = self.rank.target, self.rank.ranks
        if target is not None and target.metric == "agreement" and self.validation.data is None:
            raise UsageError(f"--target {target} needs --data (the images agreement is measured on); add --data DATA")
        if target is not None and ranks.method == "data" and target.metric != "params":
            raise UsageError(f"--target {target} and --ranks {ranks} both set the MACs; give one of them "
                             "(only --target params:G combines with data:F: both budgets met; with --calibrate, "
                             "--target macs:F allocates on the data as data:F does)")
        if target is not None and target.metric == "params" and ranks.method == "data" and self.latency.latency_aware:
            raise UsageError(f"--ranks {ranks} --target {target} with --latency-aware: not supported (the MAC and "
                             "parameter allocation does not time the layers); leave out --latency-aware or --target")
        if target is not None and self.plan_io.plan_file is not None:
            raise UsageError(f"--target {target} and --plan both choose the ranks; give one of them")
        if ranks.method == "data" and not self.calibration.calibrate and not self.plan_io.plan_file:
            raise UsageError(f"--ranks {ranks}: ranks chosen from data need the data; add --calibrate DATA.npz "
                             "(compress), or use a weight policy such as energy:0.9")

    def __getattr__(self, name: str) -> Any:
        """The flat names of the first form: `config.samples` is `config.validation.samples`."""
        path = _FLAT.get(name)
        if path is None:
            raise AttributeError(f"'CompressionConfig' object has no attribute {name!r}")
        obj: Any = self
        for part in path:
            obj = object.__getattribute__(obj, part)
        return getattr(obj, name)

    def effective_rtol(self, weight_eps: float = 2.0**-23) -> float | None:
        """The tolerance validation checks: --rtol, else under --ranks full one that follows the
        precision of the model's weights, else None (report only): ValidationConfig.effective_rtol."""
        return self.validation.effective_rtol(weight_eps, full_rank=self.rank.ranks.method == "full")

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
        p = self.preprocess
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
            "calibration_memory": self.calibration_memory,
            "preprocess": {"size": p.size, "mean": p.mean, "std": p.std, "layout": p.layout, "scale": p.scale,
                           "resize_shorter": p.resize_shorter, "crop": p.crop, "channel_order": p.channel_order},
            "latency_aware": self.latency_aware,
            "min_speedup": self.min_speedup,
            "latency_runtime": self.latency_runtime,
            "threads": self.threads,
            "target": None if self.target is None else str(self.target),
            "kind": self.kind,
        }


dataclass(frozen=True, init=False)(CompressionConfig)


def _flat_paths(cls: type, prefix: tuple[str, ...] = ()) -> dict[str, tuple[str, ...]]:
    """Flat name -> the path of the group that holds it (`seed` -> ("validation", "inputs"))."""
    out: dict[str, tuple[str, ...]] = {}
    for f in fields(cls):
        sub_cls = f.metadata.get("group")
        if sub_cls is not None and (not prefix or f.metadata.get("flatten")):
            inner = _flat_paths(sub_cls, (*prefix, f.name))
            assert not set(inner) & set(out), f"two groups of {cls.__name__} hold {set(inner) & set(out)}"
            out.update(inner)
        else:
            out[f.name] = prefix
    return out


_FLAT = _flat_paths(CompressionConfig)


# ---- library callers: the CLI spellings of the parsed fields, and one line for a wrong type ----------
# `CompressionConfig(ranks="data:0.5")` used to fail deep inside with an AttributeError; the fields
# that the CLI parses from text take that text here too, and any other wrong type is a UsageError
# naming the field and the type it takes.

_INT_FIELDS = ("round_to", "hooi_iters", "min_tucker2_channels", "seed", "jobs", "calibration_samples", "threads")
_OPT_INT_FIELDS = ("min_rank", "samples")
_FLOAT_FIELDS = ("rank_scale", "min_speedup")
_OPT_FLOAT_FIELDS = ("rtol",)
_BOOL_FIELDS = ("validate", "latency_aware")
_PATH_FIELDS = ("plan_file", "data", "calibrate")
_PATTERN_FIELDS = ("include", "exclude")


def _wrong_type(owner: str, name: str, value: object, want: str, example: str) -> UsageError:
    return UsageError(f"{owner}({name}={value!r}): expected {want}, not {type(value).__name__}; pass e.g. {name}={example}")


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _normalise(values: dict[str, Any], owner: str) -> dict[str, Any]:
    """Parse the CLI spellings of the parsed fields and check the type of every other one (numpy
    scalars become Python numbers, paths strings: the config must serialise to JSON). Only the names
    present are looked at: each group passes its own fields, CompressionConfig its flat keywords."""
    out = dict(values)
    if "ranks" in out:
        ranks = out["ranks"]
        if isinstance(ranks, str):
            out["ranks"] = RankPolicy.parse(ranks)
        elif not isinstance(ranks, RankPolicy):
            raise _wrong_type(owner, "ranks", ranks, "a RankPolicy or its CLI spelling", "'ratio:0.5' or RankPolicy('ratio', 0.5)")
        else:
            _check_policy(ranks)
    if "target" in out:
        target = out["target"]
        if isinstance(target, str):
            out["target"] = BudgetTarget.parse(target)
        elif target is not None and not isinstance(target, BudgetTarget):
            raise _wrong_type(owner, "target", target, "a BudgetTarget, its CLI spelling or None", "'macs:0.3'")
        elif target is not None:
            BudgetTarget.parse(str(target))  # the same checks as the CLI spelling
    if "input_shapes" in out:
        out["input_shapes"] = _normalise_shapes(out["input_shapes"], owner)
    if "preprocess" in out:
        pre = out["preprocess"]
        if isinstance(pre, Mapping):
            try:
                out["preprocess"] = Preprocess(**pre)
            except TypeError as e:
                raise UsageError(f"{owner}(preprocess={dict(pre)!r}): {e}; give the fields size, mean, std, layout") from None
        elif not isinstance(pre, Preprocess):
            raise _wrong_type(owner, "preprocess", pre, "a Preprocess or a dict of its fields", "Preprocess(size=(32, 32))")
    for name in _PATH_FIELDS:
        v = out.get(name)
        if isinstance(v, os.PathLike):
            out[name] = os.fspath(v)
        elif v is not None and not isinstance(v, str):
            raise _wrong_type(owner, name, v, "a path (str or os.PathLike) or None", "'data.npz'")
    for name in _PATTERN_FIELDS:
        v = out.get(name)
        if isinstance(v, re.Pattern):
            out[name] = v.pattern
        elif v is not None and not isinstance(v, str):
            raise _wrong_type(owner, name, v, "a regular expression (str) or None", "'conv.*'")
    for name in _INT_FIELDS + _OPT_INT_FIELDS:
        if name not in out or (out[name] is None and name in _OPT_INT_FIELDS):
            continue
        v = out[name]
        if not _is_int(v):
            raise _wrong_type(owner, name, v, "an int" + (" or None" if name in _OPT_INT_FIELDS else ""), "8")
        out[name] = int(v)
    for name in _FLOAT_FIELDS + _OPT_FLOAT_FIELDS:
        if name not in out or (out[name] is None and name in _OPT_FLOAT_FIELDS):
            continue
        v = out[name]
        if not _is_real(v):
            raise _wrong_type(owner, name, v, "a float" + (" or None" if name in _OPT_FLOAT_FIELDS else ""), "1.5")
        out[name] = float(v)
    for name in _BOOL_FIELDS:
        if name not in out:
            continue
        v = out[name]
        if not isinstance(v, bool | np.bool_):
            raise _wrong_type(owner, name, v, "a bool", "True")
        out[name] = bool(v)
    return out


def _check_policy(p: RankPolicy) -> None:
    """A RankPolicy built by hand gets the checks of its CLI spelling."""
    if p.method in ("vbmf", "full") and p.value is None:
        return
    if p.method not in RANK_METHODS or p.value is None or not _is_real(p.value):
        raise UsageError(f"RankPolicy({p.method!r}, {p.value!r}): not a rank policy; use RankPolicy('vbmf'), "
                         "RankPolicy('full') or RankPolicy(M, F) with M ratio, energy or data and 0 < F <= 1")
    RankPolicy.parse(f"{p.method}:{float(p.value)!r}")


def _normalise_shapes(value: object, owner: str = "CompressionConfig") -> tuple[tuple[str, tuple[int, ...]], ...]:
    """input_shapes as the CLI spells them ("x:1,3,32,32", or a list of those), as a dict name -> dims,
    or as (name, dims) pairs: always a tuple of (name, tuple of positive ints)."""
    example = "['x:1,3,32,32'] or {'x': (1, 3, 32, 32)}"
    if isinstance(value, str):
        value = [value]
    if isinstance(value, Mapping):
        value = list(value.items())
    if not isinstance(value, list | tuple):
        raise _wrong_type(owner, "input_shapes", value, "NAME:D0,D1,... strings or (name, dims) pairs", example)
    out = []
    for item in value:
        if isinstance(item, str):
            out.append(parse_input_shape(item))
            continue
        ok = isinstance(item, list | tuple) and len(item) == 2 and isinstance(item[0], str)
        dims = item[1] if ok else ()
        if not ok or isinstance(dims, str) or not isinstance(dims, list | tuple | np.ndarray) or not all(_is_int(d) for d in dims):
            raise UsageError(f"{owner}(input_shapes=...): {item!r} is not a (name, dims) pair of a str and "
                             f"ints; pass e.g. input_shapes={example}")
        shape = tuple(int(d) for d in dims)
        if any(d <= 0 for d in shape):
            raise UsageError(f"{owner}(input_shapes=...): {item!r} has a dimension < 1; give every dimension as a positive size")
        out.append((item[0], shape))
    return tuple(out)


# The CLI's spellings of sizes and value lists (`--size 224,224`, `--mean 0.485,0.456,0.406`), parsed
# where the options are: `Preprocess` normalises them, the CLI reads them.

def parse_floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None or text == "":
        return None
    try:
        return tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise UsageError(f"{option} {text}: not a comma-separated list of numbers, e.g. 0.485,0.456,0.406") from None


_BYTE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: object, option: str) -> int:
    """`512M`, `2G`, `1.5G` or a number of bytes -> bytes (binary units; a trailing B or iB is allowed)."""
    t = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _BYTE_UNITS and t[-1:] else ""
    try:
        value = float(t[: len(t) - len(unit)])
    except ValueError:
        value = -1.0
    if not value > 0 or not math.isfinite(value):
        raise UsageError(f"{option} {text}: expected a size such as 512M or 2G")
    return int(value * _BYTE_UNITS[unit])


def parse_size(text: str | None, option: str = "--size") -> tuple[int, int] | None:
    if text is None or text == "":
        return None
    try:
        v = [int(s) for s in text.replace("x", ",").split(",")]
    except ValueError:
        raise UsageError(f"{option} {text}: not a size; give N or H,W (e.g. 32 or 224,224)") from None
    if len(v) == 1:
        v = v * 2
    if len(v) != 2 or min(v) < 1:
        raise UsageError(f"{option} {text}: give N or H,W with positive numbers")
    return (v[0], v[1])


def _normalise_preprocess(p: Preprocess) -> None:
    """Preprocess(size=32, mean="0.5,0.5,0.5") as the CLI spells them; lists become tuples."""
    size = p.size
    if isinstance(size, str):
        size = parse_size(size)
    elif _is_int(size):
        size = (int(size), int(size))  # type: ignore[call-overload]
    elif isinstance(size, list | tuple) and all(_is_int(d) for d in size):
        size = tuple(int(d) for d in size)  # type: ignore[assignment]
    elif size is not None:
        raise _wrong_type("Preprocess", "size", size, "N, (H, W) or the text 'H,W'", "(224, 224)")
    object.__setattr__(p, "size", size)
    for name, option in (("mean", "--mean"), ("std", "--std")):
        v = getattr(p, name)
        if isinstance(v, str):
            v = parse_floats(v, option)
        elif _is_real(v):
            v = (float(v),)  # type: ignore[arg-type]
        elif isinstance(v, list | tuple | np.ndarray) and all(_is_real(x) for x in v):
            v = tuple(float(x) for x in v)
        elif v is not None:
            raise _wrong_type("Preprocess", name, v, "floats (one, or one per channel) or the text 'A,B,C'", "(0.5, 0.5, 0.5)")
        object.__setattr__(p, name, v)
    crop = p.crop
    if isinstance(crop, str):
        crop = parse_size(crop, "--crop")
    elif _is_int(crop):
        crop = (int(crop), int(crop))  # type: ignore[call-overload]
    elif isinstance(crop, list | tuple) and all(_is_int(d) for d in crop):
        crop = tuple(int(d) for d in crop)  # type: ignore[assignment]
    elif crop is not None:
        raise _wrong_type("Preprocess", "crop", crop, "N, (H, W) or the text 'H,W'", "(224, 224)")
    object.__setattr__(p, "crop", crop)
    if not isinstance(p.layout, str):
        raise _wrong_type("Preprocess", "layout", p.layout, "a str (auto, nchw or nhwc)", "'nchw'")
