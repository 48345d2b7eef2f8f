"""Fine-tuning results and CPU defaults (plain dataclasses: no torch needed); the options are config.py's."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

# The options live with every other group (config.py); imported from here too.
from ..config import DEFAULT_ADAM_LR, PAPER_LR, FinetuneConfig, FinetuneStep, Preprocess  # noqa: F401
from ..errors import OnnxTuckerError


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def default_torch_threads() -> tuple[int, str]:
    """(torch CPU threads, why): the usable CPUs not already busy (1-minute load average), at least 1.

    Measured on the shared 2-core VM (fixtures/fmnist_vgg.onnx, batch 64, 15 steps): idle, 2 threads
    ~810 img/s vs 1 thread ~550; with one other busy process, 2 threads 104-183 img/s vs 1 thread
    339-524 (the issue's ResNet-56: 3 vs 24 img/s). Torch's own default (every core) loses most when a
    core is taken, so threads go only to the cores that are free."""
    cpus = usable_cpus()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return cpus, f"{cpus} CPU(s)"
    threads = max(1, min(cpus, int(cpus - load + 0.5)))
    return threads, f"{cpus} CPU(s), load {load:.1f}"


class FinetuneInterrupted(OnnxTuckerError):
    """Ctrl-C during training: OUT is not written, the checkpoint of the last finished epoch stays."""

    exit_code = 130


@dataclass(frozen=True)
class EpochStats:
    epoch: int  # 1-based
    steps: int  # optimiser steps in this epoch
    lr: float  # learning rate at the start of the epoch
    train_loss: float
    train_accuracy: float | None  # top-1 on the (augmented) training batches, labelled data only
    val_loss: float | None
    val_accuracy: float | None  # top-1 against the validation labels
    val_agreement: float | None  # top-1 agreement with the teacher on the validation data
    images_per_s: float
    seconds: float
    best: bool  # this epoch's weights are the best so far (kept for OUT)


@dataclass(frozen=True)
class TrainedSegment:
    """Subgraph fine-tuning (the model has ops onnx2torch cannot convert): one convertible part around
    decomposed layers, trained to reproduce the original model's tensors of the same names at its outputs."""

    nodes: int  # top-level nodes of the compressed model in it
    first_node: str
    last_node: str
    layers: tuple[str, ...]  # the decomposed layers it holds
    inputs: tuple[str, ...]  # computed by onnxruntime on the compressed model (earlier segments trained)
    outputs: tuple[str, ...]  # matched against the original's same tensors
    trainable_params: int
    images: int  # training samples whose tensors were held (fewer than the data's when they did not fit)
    loss_before: float | None  # held-out distillation loss of its outputs (training data without a split)
    loss_after: float | None
    best_epoch: int | None
    seconds: float
    max_rel_error: float  # onnxruntime on the written segment vs the trained torch module


@dataclass(frozen=True)
class FinetuneResult:
    input_path: str
    output_path: str | None
    teacher_path: str | None
    mode: str  # labels | distill | labels+distill
    device: str
    train_samples: int
    val_samples: int
    trainable_params: int
    total_params: int
    epochs: int  # epochs run in this call (plus those resumed from the checkpoint)
    steps: int
    history: tuple[EpochStats, ...]
    best_epoch: int | None  # 0: no epoch beat the starting weights on the held-out data; OUT holds those
    best_metric: str  # val_accuracy | val_agreement | val_loss | train_loss
    # On the validation data (or the training data without a split), before training and for OUT.
    accuracy_before: float | None
    accuracy_after: float | None
    agreement_before: float | None
    agreement_after: float | None
    seconds: float  # training wall time (this call)
    export_opset: int
    export_max_rel_error: float  # onnxruntime on OUT vs the torch module, same inputs (a Sigmoid output's: vs its range, 1)
    normalisation: tuple[str, ...]
    checkpoint: str
    world_size: int = 1  # processes under torchrun (DistributedDataParallel); batches are per process
    notes: tuple[str, ...] = ()  # warnings and notes shown when training started (held-out size, output pairing)
    torch_threads: int = 0  # torch CPU threads used (0: not recorded)
    # Subgraph fine-tuning: the parts trained, and the nodes no converter takes (index: 'Op-version').
    segments: tuple[TrainedSegment, ...] = ()
    untrained_ops: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        return asdict(self)
