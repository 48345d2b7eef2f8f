"""Compression options: one frozen dataclass shared by the library API and every CLI command."""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

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
    # (calibration/calibrate.py); `calibration_samples` caps how many samples are read.
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
        _normalise_fields(self)
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
            raise UsageError(f"--target {self.target} needs --data (the images agreement is measured on); add --data DATA")
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


def _normalise_fields(cfg: CompressionConfig) -> None:
    """Parse the CLI spellings of the parsed fields and check the type of every other one (numpy
    scalars become Python numbers, paths strings: the config must serialise to JSON)."""
    def put(name: str, value: object) -> None:
        object.__setattr__(cfg, name, value)

    owner = "CompressionConfig"
    ranks = cfg.ranks
    if isinstance(ranks, str):
        put("ranks", RankPolicy.parse(ranks))
    elif not isinstance(ranks, RankPolicy):
        raise _wrong_type(owner, "ranks", ranks, "a RankPolicy or its CLI spelling", "'ratio:0.5' or RankPolicy('ratio', 0.5)")
    else:
        _check_policy(ranks)
    target = cfg.target
    if isinstance(target, str):
        put("target", BudgetTarget.parse(target))
    elif target is not None and not isinstance(target, BudgetTarget):
        raise _wrong_type(owner, "target", target, "a BudgetTarget, its CLI spelling or None", "'macs:0.3'")
    elif target is not None:
        BudgetTarget.parse(str(target))  # the same checks as the CLI spelling
    put("input_shapes", _normalise_shapes(cfg.input_shapes))
    pre = cfg.preprocess
    if isinstance(pre, Mapping):
        try:
            put("preprocess", Preprocess(**pre))
        except TypeError as e:
            raise UsageError(f"{owner}(preprocess={dict(pre)!r}): {e}; give the fields size, mean, std, layout") from None
    elif not isinstance(pre, Preprocess):
        raise _wrong_type(owner, "preprocess", pre, "a Preprocess or a dict of its fields", "Preprocess(size=(32, 32))")
    for name in _PATH_FIELDS:
        v = getattr(cfg, name)
        if isinstance(v, os.PathLike):
            put(name, os.fspath(v))
        elif v is not None and not isinstance(v, str):
            raise _wrong_type(owner, name, v, "a path (str or os.PathLike) or None", "'data.npz'")
    for name in _PATTERN_FIELDS:
        v = getattr(cfg, name)
        if isinstance(v, re.Pattern):
            put(name, v.pattern)
        elif v is not None and not isinstance(v, str):
            raise _wrong_type(owner, name, v, "a regular expression (str) or None", "'conv.*'")
    for name in _INT_FIELDS + _OPT_INT_FIELDS:
        v = getattr(cfg, name)
        if v is None and name in _OPT_INT_FIELDS:
            continue
        if not _is_int(v):
            raise _wrong_type(owner, name, v, "an int" + (" or None" if name in _OPT_INT_FIELDS else ""), "8")
        put(name, int(v))  # type: ignore[call-overload]
    for name in _FLOAT_FIELDS + _OPT_FLOAT_FIELDS:
        v = getattr(cfg, name)
        if v is None and name in _OPT_FLOAT_FIELDS:
            continue
        if not _is_real(v):
            raise _wrong_type(owner, name, v, "a float" + (" or None" if name in _OPT_FLOAT_FIELDS else ""), "1.5")
        put(name, float(v))  # type: ignore[arg-type]
    for name in _BOOL_FIELDS:
        v = getattr(cfg, name)
        if not isinstance(v, bool | np.bool_):
            raise _wrong_type(owner, name, v, "a bool", "True")
        put(name, bool(v))


def _check_policy(p: RankPolicy) -> None:
    """A RankPolicy built by hand gets the checks of its CLI spelling."""
    if p.method in ("vbmf", "full") and p.value is None:
        return
    if p.method not in RANK_METHODS or p.value is None or not _is_real(p.value):
        raise UsageError(f"RankPolicy({p.method!r}, {p.value!r}): not a rank policy; use RankPolicy('vbmf'), "
                         "RankPolicy('full') or RankPolicy(M, F) with M ratio, energy or data and 0 < F <= 1")
    RankPolicy.parse(f"{p.method}:{float(p.value)!r}")


def _normalise_shapes(value: object) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """input_shapes as the CLI spells them ("x:1,3,32,32", or a list of those), as a dict name -> dims,
    or as (name, dims) pairs: always a tuple of (name, tuple of positive ints)."""
    example = "['x:1,3,32,32'] or {'x': (1, 3, 32, 32)}"
    if isinstance(value, str):
        value = [value]
    if isinstance(value, Mapping):
        value = list(value.items())
    if not isinstance(value, list | tuple):
        raise _wrong_type("CompressionConfig", "input_shapes", value, "NAME:D0,D1,... strings or (name, dims) pairs", example)
    out = []
    for item in value:
        if isinstance(item, str):
            out.append(parse_input_shape(item))
            continue
        ok = isinstance(item, list | tuple) and len(item) == 2 and isinstance(item[0], str)
        dims = item[1] if ok else ()
        if not ok or isinstance(dims, str) or not isinstance(dims, list | tuple | np.ndarray) or not all(_is_int(d) for d in dims):
            raise UsageError(f"CompressionConfig(input_shapes=...): {item!r} is not a (name, dims) pair of a str and "
                             f"ints; pass e.g. input_shapes={example}")
        shape = tuple(int(d) for d in dims)
        if any(d <= 0 for d in shape):
            raise UsageError(f"CompressionConfig(input_shapes=...): {item!r} has a dimension < 1; give every dimension as a positive size")
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
    if not isinstance(p.layout, str):
        raise _wrong_type("Preprocess", "layout", p.layout, "a str (auto, nchw or nhwc)", "'nchw'")


@dataclass(frozen=True)
class BenchConfig:
    """How latency is measured: onnxruntime CPU, `threads` intra-op threads, `warmup` untimed runs,
    then `runs` timed runs of each model, interleaved."""

    threads: int = 1
    warmup: int = 5
    runs: int = 20

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
