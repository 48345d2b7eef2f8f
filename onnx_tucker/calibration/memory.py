"""What calibration will cost, known before it starts: the batch size, the work and the memory.

`--calibrate` and `--ranks data:F` walk the model layer by layer over the calibration images. Their
memory is (a) the calibration images, (b) the activations kept between steps, capped by
`--calibration-memory` (the rest goes to a temporary folder, `runtime.activations`), (c) one batch
running through onnxruntime, and (d) the widest layer's statistics (float64 Gram matrices of its
im2col width, and the solves on them). `plan_calibration` sizes the batch so (c) stays a small part
of the budget, adds the four up and compares the sum with the memory this machine has available:
over it, a `UsageError` names the part that does not fit and the option that shrinks it, before any
work (a process killed by the kernel, or a native crash, says nothing). Pure Python on shapes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import UsageError
from ..ops.layer import Layer, Shape
from ..ops.registry import find_handler

MAX_BATCH = 64
# One batch's live activations (several tensors of a segment at once, onnxruntime's arena around
# them) may take this share of --calibration-memory.
BATCH_SHARE = 8
# A layer's statistics: the accumulated (d + t)^2 triangle, its symmetric blocks, and the copies the
# solves make (centred Gram, ridge system, projected statistics).
GRAM_COPIES = 4


@dataclass(frozen=True)
class CalibrationEstimate:
    """The work and memory of one calibration walk (rank choice or refit), before it starts."""

    what: str  # "rank choice" or "refit"
    layers: int  # layers visited
    images: int
    batch: int
    input_size: str  # e.g. "3x224x224"
    gmacs_per_pass: float  # of the layers visited, over all images, per model pass
    activation_bytes: int  # the largest per-image frontier, over all images
    cache_bytes: int  # --calibration-memory: activations kept in memory
    spill_bytes: int  # the rest, written to the temporary folder
    stats_width: int  # widest statistics (im2col columns + outputs)
    stats_bytes: int
    data_bytes: int  # the calibration images in memory
    batch_bytes: int  # one batch's activations in flight
    peak_bytes: int  # what the walk is expected to hold at most
    available_bytes: int | None  # what the machine has available (None: unknown)


def available_memory() -> int | None:
    """Bytes this process may still use: MemAvailable, capped by a cgroup limit (None: unknown)."""
    found: list[int] = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
            with open(path.replace("memory.max", "memory.current").replace("limit_in_bytes", "usage_in_bytes")) as f:
                used = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if text.isdigit() and int(text) < 1 << 60:
            found.append(max(int(text) - used, 0))
    return min(found) if found else None


def _elements(shape: Shape | None) -> int:
    """Elements of one sample (the batch axis left out); 0 when a dim is unknown."""
    if not shape or len(shape) < 2 or any(d is None for d in shape[1:]):
        return 0
    return math.prod(int(d) for d in shape[1:] if d is not None)


def _stats_width(layer: Layer, full_input: bool) -> int:
    handler = find_handler(layer.op_type)
    im = handler.im2col(layer) if handler is not None else None
    if im is None:
        t = layer.output_shape[1] if layer.output_shape and len(layer.output_shape) > 1 else None
        return int(t or 0)
    return (im.width if full_input else 0) + im.outputs // max(im.groups, 1)


def plan_calibration(what: str, layers: Sequence[Layer], shapes: Mapping[str, Shape], images: int,
                     memory_bytes: int, data_bytes: int, max_width: int, batch: int | None = None,
                     input_size: str = "?", available: int | None = -1) -> CalibrationEstimate:
    """The batch size and the estimate of one walk over `layers` (see the module docstring); raises
    `UsageError` when it cannot fit. `batch`: fixed by the model (a static batch dim), else chosen.
    `available`: the machine's free memory (-1: measure it; None: unknown, no check)."""
    per_image = [_elements(s) * 4 for s in shapes.values()]  # float32 activations
    per_image.sort(reverse=True)
    live = sum(per_image[:3])  # a segment holds its input, its output and a temporary or two
    if batch is None:
        batch = max(1, min(MAX_BATCH, images, (memory_bytes // BATCH_SHARE) // max(live, 1)))
    batch_bytes = batch * live * 2  # the tensors and onnxruntime's arena around them
    # The frontier: between two layers of a ResNet, the block input and the branch (two tensors), in
    # each model walked (the refit walks the original and the compressed one side by side).
    frontier = sum(per_image[:2]) * images * (2 if what == "refit" else 1)
    widest = max((_stats_width(lay, True) for lay in layers), default=0)
    width = widest if widest <= max_width else max((_stats_width(lay, False) for lay in layers), default=0)
    width = max(width, min(widest, max_width))
    stats = GRAM_COPIES * 8 * width * width
    macs = 0
    for lay in layers:
        handler = find_handler(lay.op_type)
        if handler is not None:
            m = handler.cost(lay, "original")[1]
            batch_dim = lay.output_shape[0] if lay.output_shape and lay.output_shape[0] else 1
            macs += int(m or 0) // max(int(batch_dim), 1)
    cache = min(frontier, memory_bytes)
    peak = data_bytes + cache + batch_bytes + stats
    if available == -1:
        available = available_memory()
    est = CalibrationEstimate(what, len(layers), images, batch, input_size, macs * images / 1e9, frontier, cache,
                              max(frontier - memory_bytes, 0), width, stats, data_bytes, batch_bytes, peak, available)
    check_fits(est)
    return est


def _gb(n: int) -> str:
    return f"{n / 2**30:.1f} GB"


def check_fits(est: CalibrationEstimate) -> None:
    """A `UsageError` naming what does not fit, when the expected peak exceeds the available memory."""
    if est.available_bytes is None or est.peak_bytes <= est.available_bytes:
        return
    parts = {"the calibration images": est.data_bytes, "activations kept in memory (--calibration-memory)": est.cache_bytes,
             "one batch in flight": est.batch_bytes, f"the widest layer's statistics ({est.stats_width} wide)": est.stats_bytes}
    big = max(parts, key=lambda k: parts[k])
    fix = {"the calibration images": "use fewer with --calibration-samples",
           "activations kept in memory (--calibration-memory)": "lower --calibration-memory (the rest goes to TMPDIR)",
           "one batch in flight": "lower --calibration-memory (the batch follows it)"}.get(big, "exclude that layer with --exclude")
    raise UsageError(
        f"{est.what}: needs about {_gb(est.peak_bytes)} of memory but {_gb(est.available_bytes)} is available; "
        f"the largest part is {big} ({_gb(parts[big])}): {fix}"
    )
