"""Fine-tuning options and results (plain dataclasses: no torch needed to build or read them)."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

from ..config import Preprocess
from ..errors import OnnxTuckerError, UsageError

# The paper's optimiser and rate (SGD, momentum 0.9, lr 1e-3) are the default, with a cosine decay over
# the run; `schedule="step"` divides by 10 every `step_epochs` as the paper does. Measured on CIFAR
# ResNet-20 from a calibrated start (README, Fine-tuning): SGD 1e-3 cosine reaches the control in 3
# epochs; Adam 2e-3 (the default before calibration existed) wrecks an already good model (control
# 80.7 -> 12.9 %). A rate too high cannot hurt OUT: the starting weights compete as epoch 0.
PAPER_LR = 1e-3
DEFAULT_ADAM_LR = 2e-3


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
class FinetuneConfig:
    epochs: int = 3
    batch_size: int = 64
    optimizer: str = "sgd"  # sgd (momentum 0.9, the paper; default) | adam
    lr: float | None = None  # None: 1e-3 for sgd (the paper), 2e-3 for adam
    schedule: str = "cosine"  # cosine (per step, to 0) | step (divide by 10 every step_epochs, the paper) | constant
    step_epochs: int = 5
    momentum: float = 0.9
    weight_decay: float = 0.0
    max_steps: int | None = None  # stop after this many optimiser steps in all
    # Gradients rescaled to at most this global norm (None: never). Distillation at T^2 = 16 from a
    # calibrated start diverged at step 3 without it (SGD 1e-3, ResNet-20); normal steps are far below.
    clip_grad: float | None = 5.0
    temperature: float = 4.0  # distillation temperature for class-score outputs
    alpha: float = 0.5  # weight of the labelled loss when labels and a teacher are both given
    use_labels: bool = True  # False: ignore DATA's labels (pure distillation, labels used nowhere)
    train: str = "all"  # all | factors (only the decomposed layers' weights)
    augment: bool = True  # random crop (zero padding H/8) and horizontal flip for image inputs
    val_split: float = 0.1  # held-out share of DATA when no val_data is given (0: no validation)
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    threads: int | None = None  # torch CPU threads, `--torch-threads` (None: default_torch_threads())
    checkpoint: str | None = None  # None: OUT + ".finetune.pt"
    resume: bool = False
    preprocess: Preprocess = field(default_factory=Preprocess)
    rtol: float = 1e-4  # exported ONNX vs torch module: max|a-b| <= rtol * max|a|

    def __post_init__(self) -> None:
        def bad(opt: str, val: object, fix: str) -> None:
            raise UsageError(f"{opt} {val}: {fix}")

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
    export_max_rel_error: float  # onnxruntime on OUT vs the torch module, same inputs
    normalisation: tuple[str, ...]
    checkpoint: str
    world_size: int = 1  # processes under torchrun (DistributedDataParallel); batches are per process
    notes: tuple[str, ...] = ()  # warnings and notes shown when training started (held-out size, output pairing)
    torch_threads: int = 0  # torch CPU threads used (0: not recorded)

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
