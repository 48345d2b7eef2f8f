"""`finetune()`: ONNX -> torch -> train -> ONNX, validated in onnxruntime, written atomically.

`finetune_model(proto, data, ...)` is the stage itself, in memory: a ModelProto in, the fine-tuned
ModelProto and its `FinetuneResult` out (what `compress --finetune` runs, with no file between);
`finetune(path, out, ...)` wraps it with the files (paths checked first, models loaded, OUT written).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..data import DataSet, load_data
from ..errors import ModelLoadError, OnnxTuckerError, Terminated, UsageError, ValidationError
from ..graph import optypes, torchready
from ..graph.load import load_model
from ..graph.probe import ElementTypes, write_initializers
from ..graph.save import OutputBatch, check_output_path, check_output_paths, make_temp
from ..ort import session_options
from ..runtime.validate import compare_outputs
from . import convert, subgraph
from .config import (
    EpochStats,
    FinetuneConfig,
    FinetuneInterrupted,
    FinetuneResult,
    TrainedSegment,
    default_torch_threads,
)
from .segment import trained_values
from .train import (
    Batches,
    EvalStats,
    Progress,
    evaluate,
    is_class_scores,
    make_optimizer,
    run_model,
    sequence_outputs,
    train_epoch,
)

CHECKPOINT_VERSION = 1


def _device(torch: Any, wanted: str) -> Any:
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if wanted.startswith("cuda"):
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise UsageError(f"--device {wanted}: torch sees no CUDA device (torch {torch.__version__}, {build}); use --device cpu")
        return torch.device(wanted)
    return torch.device("cpu")


def _distributed(torch: Any, device: Any) -> tuple[int, int, Any]:
    """(rank, world size, device) under `torchrun` (WORLD_SIZE > 1: one process per GPU, or gloo on CPU);
    (0, 1, device) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    if not torch.distributed.is_available():
        raise UsageError("WORLD_SIZE > 1 (torchrun) but this torch build has no torch.distributed; run one process")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def _check_samples(ds: DataSet, shapes: Mapping[str, list[Any]], option: str) -> None:
    for n, a in ds.inputs.items():
        want = shapes[n][1:]
        got = a.shape[1:]
        if len(want) != len(got) or any(isinstance(w, int) and w > 0 and w != g for w, g in zip(want, got, strict=False)):
            shown = tuple(w if isinstance(w, int) and w > 0 else "?" for w in want)
            raise UsageError(
                f"{option} {ds.path}: samples of '{n}' have shape {tuple(got)}, the model expects {shown}; "
                "fix the data (or --size / --layout for images)"
            )


# --val-split draws from its own stream (not the epochs' shuffles, seeded [seed, epoch]).
SPLIT_SEED_OFFSET = 7919

# Below this many held-out samples one sample moves accuracy by 5 points or more, and the best
# epoch is picked on noise.
MIN_HELD_OUT = 20


def _held_out_notes(val_ds: DataSet | None, val_data: object, share: float, count: int) -> list[str]:
    if val_ds is None:
        why = ("--val-split 0" if share <= 0 else f"{count} sample(s) cannot be split") + ", no --val-data"
        return [f"warning: no held-out data ({why}): accuracy and agreement are measured on the training data, "
                "which says little about unseen data; give --val-data, or more data with --val-split"]
    if val_ds.count < MIN_HELD_OUT:
        where = "--val-data" if val_data is not None else f"--val-split {share:g} of {count}"
        return [f"warning: only {val_ds.count} held-out sample(s) ({where}): one sample moves accuracy by "
                f"{100 / val_ds.count:.0f} points and the best epoch is chosen on them; hold out at least {MIN_HELD_OUT}"]
    return []


def _fmt_shape(dims: list[Any]) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) and d > 0 else "?" if d is None else str(d) for d in dims) + "]"


def _teacher_notes(teacher: str | os.PathLike[str], proto: onnx.ModelProto, t_out: list[str], in_names: list[str],
                   out_names: list[str], shapes: Mapping[str, list[Any]], dtypes: Mapping[str, np.dtype]) -> list[str]:
    """Refuse a teacher that cannot take the student's input (before any conversion or training); name the
    outputs paired by position when their names differ."""
    t_shapes, t_dtypes = torchready.io_shapes(proto), torchready.io_dtypes(proto)

    def clash(a: list[Any], b: list[Any]) -> bool:
        return len(a) != len(b) or any(isinstance(x, int) and isinstance(y, int) and x > 0 and y > 0 and x != y
                                       for x, y in zip(a, b, strict=True))

    for n in in_names:
        if clash(t_shapes[n], shapes[n]) or t_dtypes.get(n) != dtypes.get(n):
            raise UsageError(
                f"--teacher {teacher}: input '{n}' is {_fmt_shape(t_shapes[n])} {t_dtypes.get(n)}, the student's "
                f"{_fmt_shape(shapes[n])} {dtypes.get(n)}; the teacher must take the student's input "
                "(the model the student was compressed from)"
            )
    for s, t in zip(out_names, t_out, strict=True):
        if clash(t_shapes[t], shapes[s]):
            raise UsageError(
                f"--teacher {teacher}: output '{t}' has shape {_fmt_shape(t_shapes[t])}, the student's '{s}' "
                f"{_fmt_shape(shapes[s])}; the teacher must be the model the student was compressed from"
            )
    pairs = [f"student '{s}' <- teacher '{t}'" for s, t in zip(out_names, t_out, strict=True) if s != t]
    if not pairs:
        return []
    return [f"note: the teacher's output names differ; outputs paired by position: {', '.join(pairs)}"]


def _layouts(ds: DataSet, shapes: Mapping[str, list[Any]], cfg: FinetuneConfig) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for n, a in ds.inputs.items():
        if a.ndim != 4 or not np.issubdtype(a.dtype, np.floating):
            out[n] = None
        elif cfg.preprocess.layout != "auto":
            out[n] = cfg.preprocess.layout
        else:
            out[n] = "nhwc" if a.shape[1] not in (1, 3, 4) and a.shape[3] in (1, 3, 4) else "nchw"
    return out


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _save_checkpoint(torch: Any, path: Path, state: dict[str, Any]) -> None:
    tmp = make_temp(path)  # named so a leftover of a killed run is recognised; the checkpoint's mode
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _ort_outputs(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    from ..ort import inference_session

    opts = session_options()  # onnxruntime's defaults (full optimisation, its threads), quiet
    try:
        sess = inference_session(model.SerializeToString(), opts)
        return list(sess.run(None, dict(feeds)))
    except Exception as e:  # noqa: BLE001 - onnxruntime raises several unrelated types
        msg = " ".join(str(e).split())[:300] or type(e).__name__
        raise ValidationError(f"the exported model does not run in onnxruntime ({msg}); please report this") from None


@dataclass(frozen=True)
class _Paths:
    src: Path
    out: Path | None
    ckpt: Path | None


def _paths(model: str | os.PathLike[str], output: str | os.PathLike[str] | None, data: str | os.PathLike[str],
           teacher: str | os.PathLike[str] | None, report: str | os.PathLike[str] | None, cfg: FinetuneConfig) -> _Paths:
    """Step 1: where everything is read and written, checked before any work (the input is never overwritten)."""
    src = Path(model)
    out = Path(output) if output is not None else None
    if out is not None:
        check_output_path(out, src)
        if teacher is not None:
            check_output_path(out, teacher)
        check_output_path(out, data)
    ckpt = Path(cfg.checkpoint) if cfg.checkpoint else (Path(f"{out}.finetune.pt") if out is not None else None)
    if ckpt is not None:
        check_output_path(ckpt, src, "--checkpoint")
        if out is not None and ckpt.resolve() == out.resolve():
            raise UsageError(f"--checkpoint {ckpt}: the same file as OUT; give the checkpoint its own path")
    check_output_paths(src, {"OUT": out, "--checkpoint": ckpt, "--report": report})
    if cfg.resume and (ckpt is None or not ckpt.is_file()):
        raise UsageError(f"--resume: no checkpoint at {ckpt}; run without --resume first (or give --checkpoint)")
    return _Paths(src, out, ckpt)


@dataclass(frozen=True)
class _Protos:
    student: onnx.ModelProto
    teacher: onnx.ModelProto | None
    in_names: list[str]
    out_names: list[str]
    shapes: dict[str, list[Any]]
    dtypes: dict[str, np.dtype]
    notes: list[str]


def _check_protos(student_proto: onnx.ModelProto, teacher_proto: onnx.ModelProto | None,
                  teacher: str | os.PathLike[str] | None) -> _Protos:
    """Step 2a: the student's inputs and outputs, the teacher checked against them (`teacher`: how messages
    name it)."""
    in_names, out_names = torchready.graph_io(student_proto)
    shapes = torchready.io_shapes(student_proto)
    dtypes = torchready.io_dtypes(student_proto)
    notes: list[str] = []
    if teacher_proto is not None:
        t_in, t_out = torchready.graph_io(teacher_proto)
        if t_in != in_names or len(t_out) != len(out_names):
            raise UsageError(
                f"--teacher {teacher}: inputs {t_in} / {len(t_out)} output(s) do not match the student's "
                f"{in_names} / {len(out_names)}; the teacher must be the model the student was compressed from"
            )
        notes += _teacher_notes(str(teacher), teacher_proto, t_out, in_names, out_names, shapes, dtypes)
    return _Protos(student_proto, teacher_proto, in_names, out_names, dict(shapes), dict(dtypes), notes)


@dataclass(frozen=True)
class _Data:
    train: DataSet
    val: DataSet | None
    eval: DataSet  # the held-out data, or the training data without any
    notes: list[str]


def _load_data(data: str | os.PathLike[str], val_data: str | os.PathLike[str] | None, teacher: object,
               protos: _Protos, cfg: FinetuneConfig) -> _Data:
    """Step 3: the training and held-out data (loaded, checked against the model, split, labels dropped)."""
    in_names, shapes, dtypes = protos.in_names, protos.shapes, protos.dtypes
    ds = load_data(data, in_names, shapes, dtypes, cfg.preprocess, option="--data")
    _check_samples(ds, shapes, "--data")
    val_ds: DataSet | None
    if val_data is not None:
        train_ds, val_ds = ds, load_data(val_data, in_names, shapes, dtypes, cfg.preprocess, option="--val-data")
        _check_samples(val_ds, shapes, "--val-data")
    else:
        train_ds, val_ds = ds, None
        if cfg.val_split > 0 and ds.count >= 2:
            val_ds, train_ds = ds.split(cfg.seed + SPLIT_SEED_OFFSET, float(cfg.val_split))
    if not cfg.use_labels:
        if teacher is None:
            raise UsageError("--no-labels: needs --teacher ORIG.onnx (distillation is the only loss without labels)")
        train_ds = replace(train_ds, labels=None)
        val_ds = None if val_ds is None else replace(val_ds, labels=None)
    if train_ds.labels is None and teacher is None:
        raise UsageError(
            f"--data {data}: no labels (a flat folder, or a .npz without 'labels'); give --teacher ORIG.onnx "
            "to distil from the original model, or labelled data (one sub-folder per class)"
        )
    eval_ds = val_ds if val_ds is not None else train_ds
    return _Data(train_ds, val_ds, eval_ds, _held_out_notes(val_ds, val_data, cfg.val_split, ds.count))


@dataclass(frozen=True)
class _Modules:
    student: Any  # the torch module being trained (eval mode: frozen BatchNorm statistics)
    teacher: Any  # frozen, or None
    norm: torchready.Normalized  # what was normalised for onnx2torch; its model is the export's reference
    n_train: int
    n_total: int
    threads: int
    threads_why: str


def _torch_setup(torch: Any, device: Any, cfg: FinetuneConfig) -> tuple[int, str]:
    threads, threads_why = (cfg.threads, "--torch-threads") if cfg.threads is not None else default_torch_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    return threads, threads_why


def _to_torch(torch: Any, device: Any, src: str, teacher: str | os.PathLike[str] | None, protos: _Protos,
              cfg: FinetuneConfig, input_dims: Mapping[str, tuple[int, ...]] | None = None) -> _Modules:
    """Step 2b: torch threads and seeds, then both models converted to torch modules on `device`."""
    threads, threads_why = _torch_setup(torch, device, cfg)
    student, norm = convert.to_torch(protos.student, str(src), input_dims)
    t_module = None
    if protos.teacher is not None:
        t_module, _ = convert.to_torch(protos.teacher, str(teacher), input_dims)
        t_module = t_module.to(device).eval()
        for p in t_module.parameters():
            p.requires_grad_(False)
    student = student.to(device).eval()  # eval mode throughout: frozen BatchNorm statistics (train.py)
    _, n_train, n_total = convert.select_trainable(student, cfg.train, str(src))
    return _Modules(student, t_module, norm, n_train, n_total, threads, threads_why)


def _label_output(torch: Any, device: Any, src: str, data: str | os.PathLike[str], teacher: object, protos: _Protos,
                  mods: _Modules, ds: _Data) -> int | None:
    """What the outputs look like, from one small batch (the teacher must give the same shapes): the
    index of the class-score output the labels are checked against, or None."""
    in_names, out_names = protos.in_names, protos.out_names
    probe = {n: a[: min(2, ds.eval.count)] for n, a in ds.eval.inputs.items()}
    with torch.no_grad():
        s_out = run_model(mods.student, probe, in_names, device)
        if len(s_out) != len(out_names):
            raise ModelLoadError(f"{src}: the converted model gives {len(s_out)} outputs, the ONNX model {len(out_names)}; please report this")
        if mods.teacher is not None:
            t_probe = run_model(mods.teacher, probe, in_names, device)
            s_shapes = [tuple(o.shape) for o in s_out]
            t_shapes = [tuple(o.shape) for o in t_probe]
            for name, s_shape, t_shape in zip(out_names, s_shapes, t_shapes, strict=True):
                if s_shape != t_shape:
                    raise UsageError(
                        f"--teacher {teacher}: output '{name}' has shape {t_shape}, the student's {s_shape}; "
                        "the teacher must be the model the student was compressed from"
                    )
    label_output = next((k for k, so in enumerate(s_out) if is_class_scores(tuple(so.shape))), None)
    train_ds, val_ds = ds.train, ds.val
    if train_ds.labels is not None:
        if label_output is None:
            raise UsageError(
                f"--data {data}: has labels but no model output looks like class scores [N, C]; "
                "give --teacher ORIG.onnx and unlabelled data instead"
            )
        classes = int(s_out[label_output].shape[1])
        top = int(max(train_ds.labels.max(), -1 if val_ds is None or val_ds.labels is None else val_ds.labels.max()))
        if top >= classes or int(train_ds.labels.min()) < 0:
            raise UsageError(f"--data {data}: label {top} is out of range for the model's {classes} classes (output '{out_names[label_output]}')")
    return label_output


@dataclass(frozen=True)
class _Trained:
    history: list[EpochStats]
    steps: int
    best_epoch: int | None
    metric: str
    before: dict[str, Any]
    after: EvalStats
    seconds: float
    train_count: int
    eval_batches: Batches


def _train(torch: Any, device: Any, rank: int, world: int, where: _Where, protos: _Protos, mods: _Modules, ds: _Data,
           label_output: int | None, mode: str, cfg: FinetuneConfig, progress: Progress | None) -> _Trained:
    """Step 4: the training loop, resumed from the checkpoint when asked; a checkpoint after every epoch; the
    best epoch's weights (the starting weights compete as epoch 0) loaded into the student at the end."""
    src, ckpt = where.source, where.ckpt
    in_names, student, t_module = protos.in_names, mods.student, mods.teacher
    train_ds, val_ds, eval_ds = ds.train, ds.val, ds.eval
    labelled = train_ds.labels is not None
    train_labels = train_ds.labels if labelled else None
    layouts = _layouts(train_ds, protos.shapes, cfg)
    train_b = Batches(train_ds.inputs, train_labels, cfg.batch_size, layouts, rank=rank, world=world,
                      crop_scale=cfg.crop_scale, mixup=cfg.mixup)
    eval_b = Batches(eval_ds.inputs, eval_ds.labels if labelled or eval_ds.labels is not None else None,
                     max(cfg.batch_size, 256), layouts)
    seqs = sequence_outputs(protos.shapes, in_names, protos.out_names)
    params = [p for n, p in student.named_parameters() if p.requires_grad]
    opt, sched = make_optimizer(params, cfg, len(train_b))
    trained = student
    if world > 1:  # gradients averaged over the processes at every step
        ids = [device.index] if device.type == "cuda" else None
        trained = torch.nn.parallel.DistributedDataParallel(student, device_ids=ids)

    fingerprint = where.fingerprint() if ckpt is not None else ""  # what a checkpoint was written for
    history: list[EpochStats] = []
    start_epoch = 0
    steps_done = 0
    best_state = None
    best_value: float | None = None
    best_epoch: int | None = None
    if val_ds is not None and val_ds.labels is not None and label_output is not None:
        metric, higher = "val_accuracy", True
    elif val_ds is not None:  # distillation: its own loss (top-1 agreement is too coarse, it saturates early)
        metric, higher = "val_loss", False
    else:
        metric, higher = "train_loss", False
    before = None
    if cfg.resume:
        assert ckpt is not None
        try:
            state = torch.load(ckpt, map_location=device, weights_only=False)
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file
            raise UsageError(f"--resume: {ckpt} is not a readable checkpoint ({type(e).__name__}); delete it and start again") from None
        if state.get("version") != CHECKPOINT_VERSION or state.get("source_sha256") != fingerprint:
            raise UsageError(f"--resume: {ckpt} was written for another model than {src}; delete it or give --checkpoint")
        student.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if cfg.schedule == "cosine":  # more --epochs than the interrupted run: stretch the cosine to the new end
            total = cfg.epochs * len(train_b) if cfg.max_steps is None else min(cfg.epochs * len(train_b), cfg.max_steps)
            sched.T_max = max(1, total)
        start_epoch, steps_done = int(state["epoch"]), int(state["steps"])
        best_state, best_value, best_epoch = state["best_state"], state["best_value"], state["best_epoch"]
        history = [EpochStats(**h) for h in state["history"]]
        before = state["before"]
    t_start = time.perf_counter()
    if before is None:
        ev0 = evaluate(student, t_module, eval_b, in_names, cfg, label_output, device, seqs)
        if ev0.loss is not None and not np.isfinite(ev0.loss):
            raise OnnxTuckerError(
                f"{src}: the loss is {ev0.loss} before any training step (the data is finite: the model's outputs "
                "on it are not); check the model with onnx-tucker validate, nothing was written"
            )
        before = {"accuracy": ev0.accuracy, "agreement": ev0.agreement, "loss": ev0.loss}
        # The starting weights are "epoch 0" of the best-checkpoint race: an epoch that makes the
        # held-out metric worse (too high a learning rate for a well-trained model) never reaches OUT.
        start = {"val_accuracy": ev0.accuracy, "val_agreement": ev0.agreement, "val_loss": ev0.loss}.get(metric)
        if start is not None and val_ds is not None:
            best_value, best_epoch = float(start), 0
            best_state = {k: v.detach().to("cpu").clone() for k, v in student.state_dict().items()}
    if progress is not None:
        progress("start", {"epochs": cfg.epochs, "first_epoch": start_epoch + 1, "steps": len(train_b), "mode": mode,
                           "device": str(device), "train": train_b.count, "val": 0 if val_ds is None else val_ds.count,
                           "trainable": mods.n_train, "total": mods.n_total, "before": before, "metric": metric,
                           "changes": mods.norm.changes, "notes": tuple(protos.notes + ds.notes),
                           "threads": mods.threads, "threads_why": mods.threads_why, "batch_size": cfg.batch_size})
    epoch = saved_epoch = start_epoch  # saved_epoch: what the checkpoint on disk holds
    try:
        for epoch in range(start_epoch + 1, cfg.epochs + 1):
            if cfg.max_steps is not None and steps_done >= cfg.max_steps:
                break
            rng = np.random.default_rng([cfg.seed, epoch])
            torch.manual_seed(cfg.seed * 1000003 + epoch)
            lr = float(opt.param_groups[0]["lr"])
            t0 = time.perf_counter()
            left = None if cfg.max_steps is None else cfg.max_steps - steps_done
            loss, acc, steps, ips = train_epoch(trained, t_module, train_b, in_names, cfg, label_output, device, opt,
                                                sched, rng, epoch, left, progress, seqs)
            steps_done += steps
            ev: EvalStats | None = (
                evaluate(student, t_module, eval_b, in_names, cfg, label_output, device, seqs) if val_ds is not None else None
            )
            v_loss = ev.loss if ev is not None else None
            v_acc = ev.accuracy if ev is not None else None
            v_agree = ev.agreement if ev is not None else None
            values: dict[str, float | None] = {"val_accuracy": v_acc, "val_agreement": v_agree, "val_loss": v_loss,
                                               "train_loss": loss}
            value = values[metric]
            is_best = value is not None and (best_value is None or (value > best_value if higher else value < best_value))
            if is_best:
                best_value, best_epoch = float(value), epoch  # type: ignore[arg-type]
                best_state = {k: v.detach().to("cpu").clone() for k, v in student.state_dict().items()}
            stats = EpochStats(epoch, steps, lr, loss, acc, v_loss, v_acc, v_agree,
                               ips, time.perf_counter() - t0, is_best)
            history.append(stats)
            if ckpt is not None and rank == 0:
                _save_checkpoint(torch, ckpt, {
                    "version": CHECKPOINT_VERSION, "source_sha256": fingerprint, "epoch": epoch, "steps": steps_done,
                    "model": student.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "best_state": best_state, "best_value": best_value, "best_epoch": best_epoch,
                    "history": [asdict(h) for h in history], "before": before, "config": cfg.to_dict(),
                })
                saved_epoch = epoch
            if progress is not None:
                progress("epoch", {"stats": stats, "epochs": cfg.epochs})
    except KeyboardInterrupt as e:
        done = saved_epoch  # not history[-1]: a stop while saving leaves the previous checkpoint
        kept = f"the checkpoint {ckpt} holds epoch {done}: rerun with --resume" if ckpt is not None and done else "no epoch finished"
        how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        stop = FinetuneInterrupted(f"{src}: {how} during epoch {epoch}; nothing was written to OUT; {kept}")
        if isinstance(e, Terminated):
            stop.exit_code = Terminated.exit_code
        raise stop from None
    seconds = time.perf_counter() - t_start

    if best_state is not None:
        student.load_state_dict(best_state)
    after = evaluate(student, t_module, eval_b, in_names, cfg, label_output, device, seqs)
    return _Trained(history, steps_done, best_epoch, metric, before, after, seconds, train_b.count, eval_b)


# Outputs computed by optypes.RANGE_ONE_OPS have their export error measured against their range [0, 1], not
# against their largest value: onnxruntime's float32 Sigmoid (MLAS, 0.5 + a rational odd function) is accurate to
# ~1.5e-7 absolute but has no relative precision below ~1e-5 (exactly 0 under -18, up to x4.6 off near
# 1e-7), so a probability map that is all but zero (a detector on noise: PP-OCRv4 det, max 3e-7) differs
# from torch's exact sigmoid by a "relative" 0.3 while its logits agree to 1e-6.
def _range_one_outputs(model: onnx.ModelProto) -> set[str]:
    """The graph outputs of `model` computed by an op of optypes.RANGE_ONE_OPS (through Identity nodes)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    found = set()
    for out in model.graph.output:
        n = producer.get(out.name)
        while n is not None and optypes.is_op(n, "Identity"):
            n = producer.get(n.input[0])
        if n is not None and n.domain in ("", "ai.onnx") and optypes.is_op(n, *optypes.RANGE_ONE_OPS):
            found.add(out.name)
    return found


def _export_and_verify(src: str, protos: _Protos, mods: _Modules, ds: _Data,
                       cfg: FinetuneConfig) -> tuple[onnx.ModelProto, float]:
    """Step 5: back to ONNX with the same names and the structure of the compressed model, checked in
    onnxruntime against the trained torch module: (the exported model, the worst relative error; a Sigmoid
    output's relative to its range, 1)."""
    in_names, out_names, student, norm, eval_ds = protos.in_names, protos.out_names, mods.student, mods.norm, ds.eval
    # torch's exporter writes an nn.LSTM / nn.GRU's default (zero) state as zeros of the traced batch expanded
    # to the batch: only a batch of 1 expands to every batch (torch's own advice); other models trace 2 rows.
    recurrent = any(optypes.is_op(n, *optypes.RECURRENT_OPS) and n.domain in ("", "ai.onnx") for n in norm.model.graph.node)
    sample = {n: a[: min(1 if recurrent else 2, eval_ds.count)] for n, a in eval_ds.inputs.items()}
    norm_shapes = torchready.io_shapes(norm.model)
    dynamic = all(not isinstance(norm_shapes[n][0], int) for n in in_names if norm_shapes[n])
    exported = convert.export(copy.deepcopy(student).to("cpu"), sample, in_names, out_names, norm.opset, dynamic,
                              torchready.batch_axes(norm_shapes, in_names, out_names))
    want, got = torchready.weight_structure(norm.model), torchready.weight_structure(exported)
    if want != got:
        raise OnnxTuckerError(
            f"{src}: the exported model's layers differ from the compressed model's ({len(got)} vs {len(want)} weighted "
            "nodes); nothing was written; please report this"
        )
    for p in protos.student.metadata_props:
        exported.metadata_props.add(key=p.key, value=p.value)
    if protos.student.doc_string:
        exported.doc_string = protos.student.doc_string
    check = {n: a[: min(8, eval_ds.count)] for n, a in eval_ds.inputs.items()}
    ref = [t.detach().cpu().numpy() for t in run_model(student.to("cpu"), check, in_names, "cpu")]
    got_out = _ort_outputs(exported, check)
    worst = 0.0
    range_one = _range_one_outputs(exported)
    for name, r_out, o_out in zip(out_names, ref, got_out, strict=True):
        c = compare_outputs(name, r_out, o_out)
        worst = max(worst, c.max_abs_error if name in range_one else c.max_rel_error)
    if not worst <= cfg.rtol:
        raise ValidationError(
            f"{src}: the exported model differs from the trained torch module (max relative error {worst:.3g} > {cfg.rtol:g}); "
            "nothing was written; please report this"
        )
    return exported, worst


def _write(exported: onnx.ModelProto, paths: _Paths, report: str | os.PathLike[str] | None, result: FinetuneResult) -> None:
    """Step 6: OUT and the report appear together or not at all."""
    with OutputBatch() as batch:
        if paths.out is not None:
            batch.add_model(exported, paths.out, paths.src)
        if report is not None:
            batch.add_text(report, json.dumps({"finetune": result.to_dict()}, indent=2, default=str) + "\n")
        batch.commit()


@dataclass(frozen=True)
class _Where:
    """How one run names its model, where it keeps its checkpoint, and what the checkpoint is written for."""

    source: str
    teacher: str | None
    ckpt: Path | None
    fingerprint: Callable[[], str]


def finetune(
    model: str | os.PathLike[str],
    output: str | os.PathLike[str] | None,
    data: str | os.PathLike[str],
    *,
    teacher: str | os.PathLike[str] | None = None,
    val_data: str | os.PathLike[str] | None = None,
    config: FinetuneConfig | None = None,
    progress: Progress | None = None,
    report: str | os.PathLike[str] | None = None,
) -> FinetuneResult:
    """Fine-tune the (compressed) ONNX `model` on `data` and write it to `output` (None: write nothing).

    With labels in DATA: cross-entropy; with `teacher` (the original ONNX model): distillation,
    no labels needed; with both: `alpha` * labelled + (1 - alpha) * distillation. The best epoch's
    weights (on the held-out data) are exported with the same input/output names, checked in
    onnxruntime against the torch module, and written atomically; the input is never overwritten.
    A checkpoint (`config.checkpoint`, default OUT.finetune.pt) is kept after every epoch for `resume`.
    `report`: also write the result as JSON (key `finetune`), together with OUT. In memory:
    `finetune_model`.
    """
    cfg = config or FinetuneConfig()
    paths = _paths(model, output, data, teacher, report, cfg)

    def load() -> tuple[onnx.ModelProto, onnx.ModelProto | None]:
        student = load_model(paths.src)
        return student, None if teacher is None else load_model(teacher)

    where = _Where(str(paths.src), None if teacher is None else str(teacher), paths.ckpt, lambda: _sha(paths.src))
    exported, result = _finetune(load, where, data, val_data, cfg, progress)
    if exported is None:  # another process of a distributed run: rank 0 writes
        return result
    result = replace(result, output_path=None if paths.out is None else str(paths.out))
    _write(exported, paths, report, result)
    return result


def finetune_model(
    model: onnx.ModelProto,
    data: str | os.PathLike[str],
    *,
    teacher: onnx.ModelProto | None = None,
    val_data: str | os.PathLike[str] | None = None,
    config: FinetuneConfig | None = None,
    progress: Progress | None = None,
    source: str = "(model in memory)",
    teacher_source: str = "(original in memory)",
) -> tuple[onnx.ModelProto, FinetuneResult]:
    """`finetune` in memory: the fine-tuned model (checked in onnxruntime against the trained module)
    and how it went; nothing is written but the checkpoint, when `config.checkpoint` names one (the
    model is fingerprinted from its bytes then). `source` / `teacher_source`: how messages and the
    result name the two models. `model` and `teacher` are read, never changed."""
    cfg = config or FinetuneConfig()
    ckpt = Path(cfg.checkpoint) if cfg.checkpoint else None
    if cfg.resume and (ckpt is None or not ckpt.is_file()):
        raise UsageError(f"--resume: no checkpoint at {ckpt}; give config.checkpoint (written by a run without resume)")

    def fingerprint() -> str:
        return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()

    where = _Where(source, None if teacher is None else teacher_source, ckpt, fingerprint)
    exported, result = _finetune(lambda: (model, teacher), where, data, val_data, cfg, progress)
    if exported is None:  # another process of a distributed run: rank 0 has the model
        raise OnnxTuckerError(f"{source}: fine-tuning in memory runs in one process; use finetune(path, out, ...) under torchrun")
    return exported, result


def _finetune(load: Callable[[], tuple[onnx.ModelProto, onnx.ModelProto | None]], where: _Where,
              data: str | os.PathLike[str], val_data: str | os.PathLike[str] | None, cfg: FinetuneConfig,
              progress: Progress | None) -> tuple[onnx.ModelProto | None, FinetuneResult]:
    with warnings.catch_warnings():
        # onnx2torch's converted modules warn on every call (tensor indexing with a list); not actionable.
        warnings.filterwarnings("ignore", module=r"onnx2torch(\.|$)")
        return _run(load, where, data, val_data, cfg, progress)


def _run(load: Callable[[], tuple[onnx.ModelProto, onnx.ModelProto | None]], where: _Where,
         data: str | os.PathLike[str], val_data: str | os.PathLike[str] | None, cfg: FinetuneConfig,
         progress: Progress | None) -> tuple[onnx.ModelProto | None, FinetuneResult]:
    """Steps 2-5 on loaded models: (the exported model, or None in a process other than rank 0; the result)."""
    torch = convert.import_torch()
    rank, world, device = _distributed(torch, _device(torch, cfg.device))
    if rank != 0:
        progress = None  # one process reports (and writes: checkpoint, OUT, report)
    student_proto, teacher_proto = load()
    teacher = where.teacher
    protos = _check_protos(student_proto, teacher_proto, teacher)
    ds = _load_data(data, val_data, teacher, protos, cfg)
    dims = {n: a.shape for n, a in ds.train.inputs.items()}
    parts = subgraph.plan(student_proto, convert.supported_ops(), where.source, dims)
    if parts.bad:  # some ops have no converter: train the convertible parts around the decomposed layers
        if teacher_proto is None:
            raise subgraph.refuse_without_teacher(where.source, parts.bad)
        subgraph.check_plan(where.source, parts, world, cfg.resume)
        return _run_segments(torch, device, where, protos, ds, cfg, progress, parts)
    mods = _to_torch(torch, device, where.source, teacher, protos, cfg, {n: a.shape for n, a in ds.train.inputs.items()})
    label_output = _label_output(torch, device, where.source, data, teacher, protos, mods, ds)
    labelled = ds.train.labels is not None
    mode = "labels+distill" if labelled and teacher is not None else ("labels" if labelled else "distill")
    run = _train(torch, device, rank, world, where, protos, mods, ds, label_output, mode, cfg, progress)
    notes = tuple(protos.notes + ds.notes)  # shown when training started (progress "start") and kept in the result
    common = dict(
        input_path=where.source, teacher_path=teacher, mode=mode,
        device=str(device), train_samples=run.train_count, val_samples=0 if ds.val is None else ds.val.count,
        trainable_params=mods.n_train, total_params=mods.n_total, epochs=len(run.history), steps=run.steps,
        history=tuple(run.history), best_epoch=run.best_epoch, best_metric=run.metric,
        accuracy_before=run.before["accuracy"], accuracy_after=run.after.accuracy,
        agreement_before=run.before["agreement"], agreement_after=run.after.agreement, seconds=run.seconds,
        normalisation=mods.norm.changes, world_size=world, notes=notes, torch_threads=mods.threads,
    )
    if world > 1:
        torch.distributed.destroy_process_group()
        if rank != 0:  # the weights are the same in every process: rank 0 exports and writes them
            return None, FinetuneResult(output_path=None, export_opset=0, export_max_rel_error=0.0, checkpoint="",
                                        **common)  # type: ignore[arg-type]
    exported, worst = _export_and_verify(where.source, protos, mods, ds, cfg)
    result = FinetuneResult(
        output_path=None, export_opset=torchready.default_opset(exported),
        export_max_rel_error=worst, checkpoint=str(where.ckpt) if where.ckpt is not None else "",
        **common,  # type: ignore[arg-type]
    )
    return exported, result


def _run_segments(torch: Any, device: Any, where: _Where, protos: _Protos, ds: _Data, cfg: FinetuneConfig,
                  progress: Progress | None, parts: subgraph.Plan) -> tuple[onnx.ModelProto, FinetuneResult]:
    """Subgraph fine-tuning (training/subgraph.py): each part trained by distillation towards the original's
    tensors, in graph order, its weights written back into a copy of the compressed model."""
    src = where.source
    assert protos.teacher is not None
    student, teacher = copy.deepcopy(protos.student), protos.teacher
    threads, threads_why = _torch_setup(torch, device, cfg)
    label_output = subgraph.class_output(student)
    before = subgraph.full_model_stats(student, teacher, ds.eval, label_output)
    ops = ", ".join(dict.fromkeys(parts.bad.values()))
    notes = [*protos.notes, *ds.notes,
             f"note: no torch converter trains through {ops} ({len(parts.bad)} node(s)): training the {len(parts.segments)} "
             "convertible part(s) around the decomposed layers, each towards the original's tensors at its outputs"]
    if ds.train.labels is not None:
        notes.append("note: labels are not used to train a part of the model (distillation only); they score the whole model")
    if cfg.augment:
        notes.append("note: no augmentation: a part starts at tensors computed inside the model, not at the images")
    if parts.left_out:
        notes.append(f"note: decomposed layer(s) {', '.join(parts.left_out)} cannot be converted themselves: not trained")
    for note in notes:
        if progress is not None:
            progress("note", {"text": note})
    seg_cfg = replace(cfg, augment=False, checkpoint=None, resume=False)
    types = ElementTypes(student)  # shape inference once (training changes weights only)
    done: list[TrainedSegment] = []
    history: list[EpochStats] = []
    steps = 0
    seconds = 0.0
    changes: list[str] = []
    for k, spec in enumerate(parts.segments):
        name = f"{src} (part {k + 1} of {len(parts.segments)})"
        data = subgraph.segment_data(student, teacher, spec, ds.train, ds.val, cfg.train == "all", types)
        s_mod, t_mod, bound, norm = subgraph.segment_modules(data, name)
        first, last = subgraph.spans(student, spec)
        layers = subgraph.factor_layers(data, student)
        n_train = sum(int(p.numel()) for p in bound.params.values())
        if progress is not None:
            progress("segment", {"index": k + 1, "count": len(parts.segments), "nodes": len(spec.nodes), "first": first,
                                 "last": last, "layers": layers, "inputs": spec.inputs, "outputs": data.target_names,
                                 "trainable": n_train, "samples": data.train.count, "notes": tuple(data.notes)})
        if not bound.params:
            raise OnnxTuckerError(f"{name}: no weight of its decomposed layers {', '.join(layers)} was found in the "
                                  "converted part; nothing was written; please report this")
        shapes = {key: [None, *a.shape[1:]] for key, a in data.train.inputs.items()}
        dtypes = {key: a.dtype for key, a in data.train.inputs.items()}
        seg_protos = _Protos(data.seg.model, None, data.keys, data.target_names, shapes, dtypes, list(data.notes))
        seg_mods = _Modules(s_mod.to(device), t_mod, norm, n_train, bound.total, threads, threads_why)
        seg_ds = _Data(data.train, data.val, data.val if data.val is not None else data.train, [])
        run = _train(torch, device, 0, 1, _Where(name, where.teacher, None, lambda: ""), seg_protos, seg_mods, seg_ds,
                     None, "distill", seg_cfg, progress)
        s_mod.to("cpu")
        write_initializers(student, trained_values(bound))
        worst = subgraph.check_written(student, data, s_mod, cfg.rtol)
        if not worst <= cfg.rtol:
            raise ValidationError(
                f"{name}: onnxruntime on the written part differs from the trained torch module (max relative error "
                f"{worst:.3g} > {cfg.rtol:g}); nothing was written; please report this"
            )
        done.append(TrainedSegment(len(spec.nodes), first, last, layers, spec.inputs, tuple(data.target_names), n_train,
                                   data.train.count, run.before["loss"], run.after.loss, run.best_epoch, run.seconds, worst))
        history += run.history
        steps += run.steps
        seconds += run.seconds
        changes += [c for c in norm.changes if c not in changes]
    after = subgraph.full_model_stats(student, teacher, ds.eval, label_output)
    _ort_outputs(student, {n: a[: min(2, ds.eval.count)] for n, a in ds.eval.inputs.items()})  # the whole model runs
    bests = [s.best_epoch for s in done if s.best_epoch is not None]
    total = sum(int(np.prod(t.dims)) for t in student.graph.initializer
                if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE))
    result = FinetuneResult(
        input_path=src, output_path=None, teacher_path=where.teacher, mode="distill", device=str(device),
        train_samples=ds.train.count, val_samples=0 if ds.val is None else ds.val.count,
        trainable_params=sum(s.trainable_params for s in done), total_params=total,
        epochs=cfg.epochs, steps=steps, history=tuple(history),
        best_epoch=max(bests) if len(bests) == len(done) and bests else None,
        best_metric="val_loss" if ds.val is not None else "train_loss",
        accuracy_before=before.accuracy, accuracy_after=after.accuracy,
        agreement_before=before.agreement, agreement_after=after.agreement, seconds=seconds,
        export_opset=torchready.default_opset(student), export_max_rel_error=max((s.max_rel_error for s in done), default=0.0),
        normalisation=tuple(changes), checkpoint="", world_size=1, notes=tuple(notes), torch_threads=threads,
        segments=tuple(done), untrained_ops=subgraph.untrained_ops(student, parts.bad),
    )
    return student, result


__all__ = ["finetune", "finetune_model"]
