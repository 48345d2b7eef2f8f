"""Latency of the original and compressed models in onnxruntime (CPU), measured side by side.

Fixed thread count, sequential execution, full graph optimisation, warm-up runs, then the two
models run alternately (A, B, A, B, ...) on the same inputs so drift on a shared machine hits both
equally. Medians and p90 are reported, and the ratio of medians. FLOPs never stand in for speed:
the extra 1x1 convolutions of a Tucker chain are memory-bound and may not pay off.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from ..graph.irmodel import IRModel
from .session import ort_session, session_folder
from .validate import random_inputs


@dataclass(frozen=True)
class LatencyReport:
    threads: int
    warmup: int
    runs: int
    input_shapes: Mapping[str, tuple[int, ...]]
    original_ms: tuple[float, ...]
    compressed_ms: tuple[float, ...]

    @staticmethod
    def _median(xs: tuple[float, ...]) -> float:
        return float(np.median(xs))

    @staticmethod
    def _p90(xs: tuple[float, ...]) -> float:
        return float(np.percentile(xs, 90))

    @property
    def original_median(self) -> float:
        return self._median(self.original_ms)

    @property
    def compressed_median(self) -> float:
        return self._median(self.compressed_ms)

    @property
    def original_p90(self) -> float:
        return self._p90(self.original_ms)

    @property
    def compressed_p90(self) -> float:
        return self._p90(self.compressed_ms)

    @property
    def speedup(self) -> float:
        return self.original_median / self.compressed_median if self.compressed_median > 0 else float("inf")


def measure_latency(
    original: onnx.ModelProto | str | os.PathLike[str],
    compressed: onnx.ModelProto | IRModel | str | os.PathLike[str],
    reference: onnx.ModelProto,
    input_shapes: Mapping[str, tuple[int, ...]],
    threads: int = 1,
    warmup: int = 5,
    runs: int = 20,
    seed: int = 0,
) -> LatencyReport:
    """Median/p90 latency of both models, interleaved run by run, on one seeded random input."""
    with session_folder() as tmp:  # models over 2 GB are saved there first
        s0 = ort_session(original, "original", tmpdir=tmp, threads=threads)
        s1 = ort_session(compressed, "compressed", tmpdir=tmp, threads=threads)
    feeds = random_inputs(reference, input_shapes, np.random.default_rng(seed))
    t0, t1 = interleave(lambda: s0.run(None, feeds), lambda: s1.run(None, feeds), warmup, runs)
    return LatencyReport(threads, warmup, runs, dict(input_shapes), t0, t1)


def interleave(
    run_a: Callable[[], object], run_b: Callable[[], object], warmup: int, runs: int,
    clock: Callable[[], float] | None = None,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Milliseconds of `runs` timed calls of each of `run_a` and `run_b`, after `warmup` untimed calls of
    each. Timed runs alternate A B, B A, A B, ...: which one goes first flips every round, so neither
    always runs on the warmer cache, and drift on a shared machine hits both equally. `clock`: seconds
    (default `time.perf_counter`, looked up at call time)."""
    clock = clock or time.perf_counter
    for _ in range(warmup):
        run_a()
        run_b()
    ta: list[float] = []
    tb: list[float] = []
    for i in range(runs):
        order = ((run_a, ta), (run_b, tb)) if i % 2 == 0 else ((run_b, tb), (run_a, ta))
        for fn, times in order:
            start = clock()
            fn()
            times.append((clock() - start) * 1e3)
    return tuple(ta), tuple(tb)


def interleave_many(
    runs_of: list[Callable[[], object]], warmup: int, runs: int, clock: Callable[[], float] | None = None,
) -> tuple[tuple[float, ...], ...]:
    """`interleave` for any number of models (the four-way INT8 comparison): `warmup` untimed calls of
    each, then `runs` rounds in which every model runs once, the order rotated by one each round so that
    none always runs first or on the warmest cache. Milliseconds per model, in the order given."""
    clock = clock or time.perf_counter
    for _ in range(warmup):
        for fn in runs_of:
            fn()
    times: list[list[float]] = [[] for _ in runs_of]
    n = len(runs_of)
    for i in range(runs):
        for k in range(n):
            j = (i + k) % n
            start = clock()
            runs_of[j]()
            times[j].append((clock() - start) * 1e3)
    return tuple(tuple(t) for t in times)
