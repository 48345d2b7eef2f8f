"""The `onnx-tucker` command line: a thin typer layer, one library call per command.

Options are defined once below and shared by every subcommand, so `--seed` or `--rtol` mean the
same everywhere. Exit codes: 0 success, 1 failure (bad model, failed step, failed validation),
2 usage error.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

from .config import BenchConfig, CompressionConfig, Preprocess
from .errors import OnnxTuckerError, Terminated, UsageError
from .report.console import make_console

try:  # recent typer vendors click as typer._click; older typer uses click itself
    from typer._click import exceptions as _click_exc
except ImportError:  # pragma: no cover
    from click import exceptions as _click_exc  # type: ignore[no-redef]
# `onnx-tucker` alone raises this (click >= 8.2) to print the help; older click prints it itself.
_NoArgsIsHelp = getattr(_click_exc, "NoArgsIsHelpError", ())


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class _OneLineErrors(TyperGroup):
    """Click's own parse errors (a missing argument, --samples abc, an unknown option) as one
    'error: ...' line with exit code 2, like every other error, instead of a usage block."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, windows_expand_args: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        except _NoArgsIsHelp as e:  # `onnx-tucker` alone: the help text
            e.show()
            sys.exit(e.exit_code)
        except _click_exc.ClickException as e:
            ctx = getattr(e, "ctx", None)
            where = ctx.command_path if ctx is not None else "onnx-tucker"
            msg = _one_line(e.format_message()).rstrip(".")
            print(f"error: {msg}; see '{where} --help'", file=sys.stderr)
            sys.exit(e.exit_code)
        except typer.Abort:
            print("error: aborted; nothing was written", file=sys.stderr)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


class _Command(TyperCommand):
    """Usage line as click writes it, `compress [OPTIONS] INPUT OUTPUT`: typer wraps required
    arguments in braces (`{INPUT}`), which reads like a choice set."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name != "argument":
                pieces.extend(param.get_usage_pieces(ctx))
                continue
            name = param.metavar or (param.name or "").upper()
            name = name if param.required else f"[{name}]"
            pieces.append(name if param.nargs == 1 else f"{name}...")
        return pieces


app = typer.Typer(
    cls=_OneLineErrors,
    name="onnx-tucker",
    help="Compress ONNX CNNs with EVBMF-ranked Tucker-2 / SVD decompositions (Kim et al., ICLR 2016), "
    "validated in onnxruntime.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# ---- shared options (one definition each) -------------------------------------------------------
# Arguments get explicit metavars: typer would print them as `{input}`.
InPath = Annotated[Path, typer.Argument(metavar="INPUT", help="Input ONNX model.", show_default=False)]
OutPath = Annotated[Path, typer.Argument(metavar="OUTPUT", help="Where to write the compressed model (never the input).", show_default=False)]
OriginalPath = Annotated[Path, typer.Argument(metavar="ORIGINAL", help="The original model.", show_default=False)]
CompareToPath = Annotated[Path, typer.Argument(metavar="COMPRESSED", help="The model to compare with it.", show_default=False)]
TimeAgainstPath = Annotated[Path, typer.Argument(metavar="COMPRESSED", help="The model to time against it.", show_default=False)]
RanksOpt = Annotated[str, typer.Option("--ranks", help="Rank policy: vbmf (EVBMF, default), ratio:F, energy:F, full (verification: no truncation), or data:F (with --calibrate: keep a fraction F of the MACs, ranks chosen from the layers' outputs on the data).")]
RankScaleOpt = Annotated[float, typer.Option("--rank-scale", help="Multiply every chosen rank by F (rounded up).")]
MinRankOpt = Annotated[int | None, typer.Option("--min-rank", help="Floor on every rank (also turns an EVBMF rank of 0 into N).", show_default=False)]
RoundToOpt = Annotated[int, typer.Option("--round-to", help="Round ranks up to a multiple of N (capped at the dimension), e.g. 8 for SIMD.")]
IncludeOpt = Annotated[str | None, typer.Option("--include", help="Only decompose nodes whose name matches this regex.", show_default=False)]
ExcludeOpt = Annotated[str | None, typer.Option("--exclude", help="Never decompose nodes whose name matches this regex.", show_default=False)]
HooiOpt = Annotated[int, typer.Option("--hooi-iters", help="HOOI sweeps after the HOSVD start (0: plain HOSVD).")]
JobsOpt = Annotated[int, typer.Option("--jobs", "-j", help="Layers planned and decomposed in parallel (threads); the result is the same for every N.")]
InputShapeOpt = Annotated[list[str] | None, typer.Option("--input-shape", metavar="NAME:D0,D1,...", help="NAME:D0,D1,... fixes an input's dynamic dims (repeatable).", show_default=False)]
PlanOpt = Annotated[Path | None, typer.Option("--plan", help="Replay the kinds and ranks of a plan file written by --save-plan.", show_default=False)]
SavePlanOpt = Annotated[Path | None, typer.Option("--save-plan", help="Write the plan (kinds and ranks per layer) as JSON.", show_default=False)]
# --report writes a different JSON per command (report/data.py); each help names its top-level keys.
ReportOpt = Annotated[Path | None, typer.Option("--report", help="Write the full report as JSON (keys: layers, totals, validation, latency, calibration, finetune, target, mac_budget, layer_timing, config, model; latency is null without --bench, calibration without --calibrate, finetune without --finetune, target without --target, mac_budget without --ranks data:F, layer_timing without --latency-aware, validation under --no-validate).", show_default=False)]
InspectReportOpt = Annotated[Path | None, typer.Option("--report", help="Write the plan as a JSON report (keys: layers, totals, validation, target, mac_budget, layer_timing, config; validation is always null: nothing is run; target is null without --target, mac_budget without --ranks data:F, layer_timing without --latency-aware).", show_default=False)]
ValidateReportOpt = Annotated[Path | None, typer.Option("--report", help="Write the comparison as JSON (keys: validation).", show_default=False)]
FinetuneReportOpt = Annotated[Path | None, typer.Option("--report", help="Write the fine-tuning result as JSON (keys: finetune).", show_default=False)]
BenchReportOpt = Annotated[Path | None, typer.Option("--report", help="Write the latencies as JSON (keys: latency).", show_default=False)]
MarkdownOpt = Annotated[Path | None, typer.Option("--markdown", help="Write the report as Markdown.", show_default=False)]
ValidateOpt = Annotated[bool, typer.Option("--validate/--no-validate", help="Compare original and compressed outputs in onnxruntime.")]
SamplesOpt = Annotated[int | None, typer.Option("--samples", help="Random inputs used for validation (default 8), or how many --data samples to use (default all).", show_default=False)]
DataOpt = Annotated[Path | None, typer.Option("--data", help="Validate on real data: a .npz with one array per model input (samples on the first axis) and optional 'labels' for accuracy, or an image folder (one sub-folder per class: labels; pixels scaled to [0, 1]).", show_default=False)]
CalibrateOpt = Annotated[Path | None, typer.Option("--calibrate", help="Refit each decomposed layer's factors so its output matches the original's on this unlabeled data (.npz with one array per model input, or an image folder: see --size/--mean/--std); same graph. Without --data, validation runs on it too.", show_default=False)]
CalibrationSamplesOpt = Annotated[int, typer.Option("--calibration-samples", help="How many --calibrate samples to use (a random subset, seeded by --seed, when the file has more).")]
# Fine-tuning options (finetune, and compress --finetune)
EpochsOpt = Annotated[int, typer.Option("--epochs", help="Passes over the training data.")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", help="Samples per optimiser step.")]
OptimizerOpt = Annotated[str, typer.Option("--optimizer", help="sgd (momentum 0.9, the paper's; default) or adam.")]
LrOpt = Annotated[float | None, typer.Option("--lr", help="Learning rate (default 1e-3 for sgd, the paper's; 2e-3 for adam).", show_default=False)]
ScheduleOpt = Annotated[str, typer.Option("--schedule", help="cosine (to 0 over the run), step (lr / 10 every --step-epochs, the paper), or constant.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (cuda when available), cpu or cuda.")]
FinetuneDataOpt = Annotated[Path | None, typer.Option("--finetune", help="Fine-tune the compressed model on this data before validating and writing it (the paper's step 3; as `finetune --data`; needs the finetune extra).", show_default=False)]
ValDataOpt = Annotated[Path | None, typer.Option("--val-data", help="Held-out data for validation after each epoch (default: --val-split of DATA).", show_default=False)]
SizeOpt = Annotated[str | None, typer.Option("--size", help="Resize images (--data / --calibrate folders) to N or H,W.", show_default=False)]
MeanOpt = Annotated[str | None, typer.Option("--mean", help="Per-channel mean subtracted from pixels scaled by --scale (images; integer .npz arrays), e.g. 0.485,0.456,0.406.", show_default=False)]
StdOpt = Annotated[str | None, typer.Option("--std", help="Per-channel std images are divided by, e.g. 0.229,0.224,0.225.", show_default=False)]
LayoutOpt = Annotated[str, typer.Option("--layout", help="Image layout fed to the model: auto, nchw or nhwc.")]
ResizeShorterOpt = Annotated[int | None, typer.Option("--resize-shorter", help="Resize images (folders) so the shorter side is N, keeping the aspect ratio (torchvision's Resize(N)); then --crop.", show_default=False)]
CropOpt = Annotated[str | None, typer.Option("--crop", help="Centre-crop images (folders) to N or H,W after --resize-shorter, e.g. 224 (ImageNet: --resize-shorter 256 --crop 224).", show_default=False)]
ChannelOrderOpt = Annotated[str, typer.Option("--channel-order", help="rgb, or bgr for models trained on OpenCV-decoded (BGR) images (folders).")]
ScaleOpt = Annotated[float | None, typer.Option("--scale", help="What a full-intensity pixel (255) is at the model input, before --mean/--std: 1 (pixels / 255, the default for image folders) or 255 (raw 0-255). Integer .npz arrays for a float input are pixels and need it; float arrays are used as they are.", show_default=False)]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of every random choice (validation inputs).")]
RtolOpt = Annotated[float | None, typer.Option("--rtol", help="Fail when max|orig-new| > RTOL * max|orig| on any output (default: report only; 1e-4 under --ranks full).", show_default=False)]
BenchOpt = Annotated[bool, typer.Option("--bench", help="Also measure latency of both models in onnxruntime CPU (interleaved runs, medians).")]
ThreadsOpt = Annotated[int, typer.Option("--threads", help="onnxruntime intra-op threads, the one meaning of --threads in every command (--bench, --latency-aware; under 'report', every runtime's); torch's threads for fine-tuning are --torch-threads.")]
TorchThreadsOpt = Annotated[int | None, typer.Option("--torch-threads", help="torch CPU threads for fine-tuning (default: the CPUs not already busy, by the 1-minute load, at least 1: on a shared 2-core machine 2 threads ran up to 5x slower than 1 when another process was busy). Printed when training starts.", show_default=False)]
LatencyAwareOpt = Annotated[bool, typer.Option("--latency-aware", help="Time each layer and its chain alone in onnxruntime CPU (interleaved medians, cached per shape); keep a decomposition only where it is --min-speedup times faster, after trying ranks rounded to --round-to (else 8 and 16) and Tucker-1. With --plan: the plan replays exactly and its layers are only timed. With --ranks data:F it may miss the MAC budget: the output and the report say by how much.")]
MinSpeedupOpt = Annotated[float, typer.Option("--min-speedup", help="With --latency-aware: the measured speed-up a layer's chain must reach to be kept.")]
TargetOpt = Annotated[str | None, typer.Option("--target", help="Whole-model budget: macs:F or params:F (fraction of the original, 0 < F < 1): ranks spent where the kernels lose the least energy per MAC (or parameter) saved; latency:F: the least compression whose layers, timed alone in onnxruntime, take F of the original time (implies per-layer timing as --latency-aware); agreement:F (with --data): the most compression whose top-1 agreement with the original stays >= F.", show_default=False)]
RunsOpt = Annotated[int, typer.Option("--runs", help="Timed runs per model for latency (after --warmup runs).")]
WarmupOpt = Annotated[int, typer.Option("--warmup", help="Untimed warm-up runs per model before timing.")]
MobileReportOpt = Annotated[Path | None, typer.Option("--mobile-report", help="After writing OUTPUT, also write the mobile validation report (HTML) of INPUT against it in every installed runtime (see 'onnx-tucker report').", show_default=False)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="More detail (EVBMF noise estimates, timings).")]

# Piped output (CI logs, reports) gets wide tables instead of rich's 80-column default. No console
# interprets markup or emoji codes: paths and layer names print verbatim (report/console.py).
out_console = make_console(width=None if sys.stdout.isatty() else 180)
err_console = make_console(stderr=True, width=None if sys.stderr.isatty() else 180)


def _error_line(text: str) -> None:
    """Every error is exactly one line on stderr, starting with 'error: '."""
    err_console.print(f"error: {_one_line(text)}", markup=False, highlight=False, soft_wrap=True)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (kill, a scheduler's stop) raises Terminated, a KeyboardInterrupt: the same clean-up as
    Ctrl-C, exit 143. Only the first one: a second SIGTERM during clean-up is ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = [False]

    def handler(signum: int, frame: object) -> None:
        if not fired[0]:
            fired[0] = True
            raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _errors(verbose: bool = False):  # type: ignore[no-untyped-def]
    # Outputs are written through io.OutputBatch (temp file + rename), so whatever stops the run
    # here leaves no partial file and an existing OUT untouched.
    try:
        with _sigterm_as_interrupt():
            yield
    except OnnxTuckerError as e:
        _error_line(str(e))
        raise typer.Exit(e.exit_code) from None
    except Terminated:
        _error_line("terminated (SIGTERM); no partial output was left (outputs are written atomically)")
        raise typer.Exit(Terminated.exit_code) from None
    except KeyboardInterrupt:
        _error_line("interrupted; no partial output was left (outputs are written atomically)")
        raise typer.Exit(130) from None
    except MemoryError:
        _error_line("out of memory; nothing was written: try a machine with more memory, or --include fewer layers")
        raise typer.Exit(1) from None
    except Exception as e:  # noqa: BLE001 - last resort: one line, never a bare traceback
        if verbose:
            raise
        _error_line(
            f"unexpected {type(e).__name__}: {e} (a bug in onnx-tucker: rerun with -v for the traceback "
            "and please report it); nothing was written"
        )
        raise typer.Exit(1) from None


def _print(tables: list[Any]) -> None:
    for table in tables:
        out_console.print(table)


def _note(text: str) -> None:
    err_console.print(text, markup=False, highlight=False, soft_wrap=True)


def _preprocess(size: str | None, mean: str | None, std: str | None, layout: str, scale: float | None = None,
                resize_shorter: int | None = None, crop: str | None = None, channel_order: str = "rgb") -> Preprocess:
    from .config import parse_floats, parse_size

    return Preprocess(parse_size(size), parse_floats(mean, "--mean"), parse_floats(std, "--std"), layout, scale,
                      resize_shorter, parse_size(crop, "--crop"), channel_order)


@contextmanager
def _progress(enabled: bool):  # type: ignore[no-untyped-def]
    """A progress bar on a terminal (layers, then validation samples, agreement-search evaluations or
    runtimes: whatever the library reports as (step, done, total)); nothing otherwise."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True) as bar:
        task = bar.add_task("layers", total=None)

        def update(name: str, done: int, total: int) -> None:
            bar.update(task, description=name[-40:], completed=done, total=total)

        yield update


@app.command(cls=_Command, epilog="Example: onnx-tucker compress model.onnx model.tucker.onnx --report report.json")
def compress(
    input: InPath,
    output: OutPath,
    ranks: RanksOpt = "vbmf",
    rank_scale: RankScaleOpt = 1.0,
    min_rank: MinRankOpt = None,
    round_to: RoundToOpt = 1,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    hooi_iters: HooiOpt = 0,
    jobs: JobsOpt = 1,
    input_shape: InputShapeOpt = None,
    plan: PlanOpt = None,
    save_plan: SavePlanOpt = None,
    report: ReportOpt = None,
    markdown: MarkdownOpt = None,
    mobile_report: MobileReportOpt = None,
    validate: ValidateOpt = True,
    samples: SamplesOpt = None,
    data: DataOpt = None,
    calibrate: CalibrateOpt = None,
    calibration_samples: CalibrationSamplesOpt = 500,
    finetune: FinetuneDataOpt = None,
    teacher_is_original: Annotated[bool, typer.Option("--teacher-is-original", help="With --finetune: distil from INPUT's outputs (no labels needed; with labels both losses).")] = False,
    val_data: ValDataOpt = None,
    epochs: EpochsOpt = 3,
    batch_size: BatchSizeOpt = 64,
    optimizer: OptimizerOpt = "sgd",
    lr: LrOpt = None,
    schedule: ScheduleOpt = "cosine",
    device: DeviceOpt = "auto",
    torch_threads: TorchThreadsOpt = None,
    size: SizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    layout: LayoutOpt = "auto",
    scale: ScaleOpt = None,
    resize_shorter: ResizeShorterOpt = None,
    crop: CropOpt = None,
    channel_order: ChannelOrderOpt = "rgb",
    seed: SeedOpt = 0,
    rtol: RtolOpt = None,
    bench: BenchOpt = False,
    threads: ThreadsOpt = 1,
    runs: RunsOpt = 20,
    warmup: WarmupOpt = 5,
    latency_aware: LatencyAwareOpt = False,
    min_speedup: MinSpeedupOpt = 1.1,
    target: TargetOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Decompose every Conv / ConvTranspose / Gemm / MatMul that gains, validate, and write OUTPUT atomically."""
    from . import api
    from .report.mobile import runtime_status
    from .report.tables import result_tables

    with _errors(verbose):
        cfg = CompressionConfig.from_options(
            ranks=ranks, rank_scale=rank_scale, min_rank=min_rank, round_to=round_to, include=include, exclude=exclude,
            hooi_iters=hooi_iters, jobs=jobs, input_shape=input_shape, plan=plan, validate=validate, samples=samples,
            data=data, seed=seed, rtol=rtol, calibrate=calibrate, calibration_samples=calibration_samples,
            preprocess=_preprocess(size, mean, std, layout, scale, resize_shorter, crop, channel_order),
            latency_aware=latency_aware, min_speedup=min_speedup, threads=threads, target=target,
        )
        timing = BenchConfig(threads=threads, warmup=warmup, runs=runs) if bench else None
        if mobile_report is not None:  # refused before any work, like every other output path
            from .graph.save import check_output_paths

            check_output_paths(input, {"OUT": output, "--mobile-report": mobile_report})
        step = None
        if finetune is not None:
            from .training.config import FinetuneConfig, FinetuneStep

            step = FinetuneStep(str(finetune), FinetuneConfig(
                epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr, schedule=schedule, device=device,
                seed=seed, preprocess=cfg.preprocess, threads=torch_threads), teacher_is_original, str(val_data) if val_data else None)
        elif teacher_is_original or val_data is not None or torch_threads is not None:
            raise UsageError("--teacher-is-original / --val-data / --torch-threads: only with --finetune DATA; "
                             "add --finetune TRAIN, or leave them out")
        with _progress(not quiet) as progress:
            result = api.compress(input, cfg, output, progress, bench=timing, save_plan=save_plan, report=report,
                                  markdown=markdown, finetune=step,
                                  finetune_progress=None if quiet else _FinetuneProgress())
        if not quiet:
            _print(result_tables(result))
        failure = result.validation_error()
        if failure is not None:
            raise failure
        if mobile_report is not None and result.output_path is not None:
            with _progress(not quiet) as progress:
                mobile = api.mobile_report(input, result.output_path, cfg, bench_config=BenchConfig(threads=threads, warmup=warmup, runs=runs),
                                           layer_plan=result.plan, html=mobile_report, progress=progress)
            if not quiet:
                _note(f"wrote {mobile_report} (runtimes: " + ", ".join(f"{r.name} {runtime_status(r)}" for r in mobile.runtimes) + ")")
        if quiet:
            return
        if result.decomposed_layers == 0:
            _note(f"note: no layer of {input} was decomposed (see the reasons above); {output} is an unchanged copy")
        else:
            _note(f"wrote {result.output_path} ({result.decomposed_layers} layers decomposed, {result.seconds:.1f} s)")


@app.command(cls=_Command, epilog="Example: onnx-tucker inspect model.onnx --ranks ratio:0.25")
def inspect(
    input: InPath,
    ranks: RanksOpt = "vbmf",
    rank_scale: RankScaleOpt = 1.0,
    min_rank: MinRankOpt = None,
    round_to: RoundToOpt = 1,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    hooi_iters: HooiOpt = 0,
    jobs: JobsOpt = 1,
    input_shape: InputShapeOpt = None,
    plan: PlanOpt = None,
    save_plan: SavePlanOpt = None,
    report: InspectReportOpt = None,
    latency_aware: LatencyAwareOpt = False,
    min_speedup: MinSpeedupOpt = 1.1,
    threads: ThreadsOpt = 1,
    target: TargetOpt = None,
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Print the plan (kinds, ranks, predicted savings, kernel errors; measured per-layer time with --latency-aware); write no model."""
    from . import api
    from .report.tables import result_tables

    with _errors(verbose):
        cfg = CompressionConfig.from_options(
            ranks=ranks, rank_scale=rank_scale, min_rank=min_rank, round_to=round_to, include=include, exclude=exclude,
            hooi_iters=hooi_iters, jobs=jobs, input_shape=input_shape, plan=plan, validate=False,
            latency_aware=latency_aware, min_speedup=min_speedup, threads=threads, target=target, seed=seed,
        )
        with _progress(not quiet) as progress:
            p = api.plan(input, cfg, progress, save_plan=save_plan, report=report)
        if not quiet:
            _print(result_tables(p))


@app.command(cls=_Command, name="validate", epilog="Example: onnx-tucker validate model.onnx model.tucker.onnx --rtol 0.05")
def validate_cmd(
    original: OriginalPath,
    compressed: CompareToPath,
    input_shape: InputShapeOpt = None,
    samples: SamplesOpt = None,
    data: DataOpt = None,
    size: SizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    layout: LayoutOpt = "auto",
    scale: ScaleOpt = None,
    resize_shorter: ResizeShorterOpt = None,
    crop: CropOpt = None,
    channel_order: ChannelOrderOpt = "rgb",
    seed: SeedOpt = 0,
    rtol: RtolOpt = None,
    report: ValidateReportOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Compare two models' outputs on seeded random inputs (or --data) in onnxruntime."""
    from . import api
    from .report.tables import validation_table

    with _errors(verbose):
        cfg = CompressionConfig.from_options(input_shape=input_shape, samples=samples, data=data, seed=seed, rtol=rtol,
                                             preprocess=_preprocess(size, mean, std, layout, scale, resize_shorter, crop, channel_order))
        with _progress(not quiet) as progress:
            v = api.validate(original, compressed, cfg, report=report, progress=progress)
        if not quiet:
            _print([validation_table(v)])
        if not v.passed:
            raise OnnxTuckerError(f"{compressed}: validation failed: {v.problem}; {v.fix}")


@app.command(cls=_Command, name="bench", epilog="Example: onnx-tucker bench model.onnx model.tucker.onnx --threads 1 --runs 50")
def bench_cmd(
    original: OriginalPath,
    compressed: TimeAgainstPath,
    input_shape: InputShapeOpt = None,
    threads: ThreadsOpt = 1,
    runs: RunsOpt = 20,
    warmup: WarmupOpt = 5,
    seed: SeedOpt = 0,
    report: BenchReportOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Latency of two models in onnxruntime CPU, measured side by side (medians, p90, ratio)."""
    from . import api
    from .report.tables import latency_table

    with _errors(verbose):
        cfg = CompressionConfig.from_options(input_shape=input_shape, seed=seed, validate=False)
        lat = api.bench(original, compressed, cfg, BenchConfig(threads=threads, warmup=warmup, runs=runs), report=report)
        if not quiet:
            _print([latency_table(lat)])


# ---- report (issue 10): the compressed model in the runtimes phones use ------------------------------
RuntimesOpt = Annotated[str, typer.Option("--runtimes", help="Comma-separated runtimes: ort (onnxruntime CPU), ort-mobile (ORT format + NNAPI/CoreML analysis), mnn, ncnn. One not installed is listed with its pip command.")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="Seconds a runtime may take to convert and run one model (and to time both) before it counts as hung.")]
StrictOpt = Annotated[bool, typer.Option("--strict", help="Exit 1 unless every listed runtime converts and runs both models and computes the compressed one as onnxruntime does (within --rtol).")]
# Not the compress/validate --rtol (original against compressed): here a runtime against onnxruntime, same model.
RuntimeRtolOpt = Annotated[float, typer.Option("--rtol", help="A runtime passes when its outputs for the compressed model are within RTOL * max|output| of onnxruntime's (ncnn stores fp16 weights: ~1e-3).")]
HtmlOpt = Annotated[Path | None, typer.Option("--html", help="Write the report as one self-contained HTML file (tables and plots).", show_default=False)]
MobileReportJsonOpt = Annotated[Path | None, typer.Option("--report", help="Write the report as JSON (keys: models, inputs, totals, layers, runtimes, failed_runtimes).", show_default=False)]
# The JSON report is --report in every command; `report --json` was its first spelling and still works.
JsonAliasOpt = Annotated[Path | None, typer.Option("--json", hidden=True, help="Old spelling of --report.", show_default=False)]


@app.command(cls=_Command, name="report", epilog="Example: onnx-tucker report model.onnx model.tucker.onnx --runtimes ort,mnn,ncnn --html report.html")
def report_cmd(
    original: OriginalPath,
    compressed: CompareToPath,
    runtimes: RuntimesOpt = "ort,ort-mobile,mnn,ncnn",
    input_shape: InputShapeOpt = None,
    samples: SamplesOpt = None,
    data: DataOpt = None,
    size: SizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    layout: LayoutOpt = "auto",
    scale: ScaleOpt = None,
    resize_shorter: ResizeShorterOpt = None,
    crop: CropOpt = None,
    channel_order: ChannelOrderOpt = "rgb",
    plan: PlanOpt = None,
    seed: SeedOpt = 0,
    threads: ThreadsOpt = 1,
    runs: RunsOpt = 20,
    warmup: WarmupOpt = 5,
    timeout: TimeoutOpt = 120.0,
    rtol: RuntimeRtolOpt = 1e-2,
    strict: StrictOpt = False,
    html: HtmlOpt = None,
    markdown: MarkdownOpt = None,
    report: MobileReportJsonOpt = None,
    json_alias: JsonAliasOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Convert, run and time both models in mobile runtimes (ORT format, MNN, ncnn) and compare with onnxruntime."""
    from . import api
    from .report.mobile import mobile_tables

    with _errors(verbose):
        if json_alias is not None:
            if report is not None and report != json_alias:
                raise UsageError(f"--json {json_alias} and --report {report}: two paths for the one JSON report; "
                                 "give --report only (--json is its old spelling)")
            report = json_alias
        cfg = CompressionConfig.from_options(input_shape=input_shape, samples=samples, data=data, seed=seed, plan=plan,
                                             validate=False, preprocess=_preprocess(size, mean, std, layout, scale, resize_shorter, crop, channel_order))
        with _progress(not quiet) as progress:
            rep = api.mobile_report(
                original, compressed, cfg, runtimes=runtimes, bench_config=BenchConfig(threads=threads, warmup=warmup, runs=runs),
                timeout=timeout, rtol=rtol, html=html, markdown=markdown, report=report, progress=progress,
            )
        if not quiet:
            _print(mobile_tables(rep))
        if strict and rep.failed_runtimes:
            raise OnnxTuckerError(f"--strict: runtime(s) {', '.join(rep.failed_runtimes)} did not pass (see the report)")


# ---- finetune (issue 8): ONNX -> torch -> train -> ONNX; torch is imported only when it runs ----------
FtData = Annotated[Path, typer.Option("--data", help="Training data: an image folder (one sub-folder per class: labels), a flat image folder, or a .npz (one array per input, optional 'labels').", show_default=False)]


@app.command(cls=_Command, name="finetune", epilog="Example: onnx-tucker finetune model.tucker.onnx model.ft.onnx --data train/ --teacher model.onnx "
             "--mean 0.4914,0.4822,0.4465 --std 0.2470,0.2435,0.2616")
def finetune_cmd(
    input: InPath,
    output: Annotated[Path, typer.Argument(metavar="OUTPUT", help="Where to write the fine-tuned model (never the input).", show_default=False)],
    data: FtData,
    teacher: Annotated[Path | None, typer.Option("--teacher", help="The original model: distil from its outputs (no labels needed).", show_default=False)] = None,
    val_data: ValDataOpt = None,
    val_split: Annotated[float, typer.Option("--val-split", help="Share of DATA held out when there is no --val-data (0: none).")] = 0.1,
    epochs: EpochsOpt = 3,
    batch_size: BatchSizeOpt = 64,
    optimizer: OptimizerOpt = "sgd",
    lr: LrOpt = None,
    schedule: ScheduleOpt = "cosine",
    step_epochs: Annotated[int, typer.Option("--step-epochs", help="Epochs between the step schedule's lr / 10.")] = 5,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="L2 weight decay.")] = 0.0,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Stop after this many optimiser steps in all.", show_default=False)] = None,
    temperature: Annotated[float, typer.Option("--temperature", help="Distillation temperature for class-score outputs.")] = 4.0,
    alpha: Annotated[float, typer.Option("--alpha", help="Weight of the labelled loss when DATA has labels and --teacher is given.")] = 0.5,
    labels: Annotated[bool, typer.Option("--labels/--no-labels", help="Use DATA's labels; --no-labels: pure distillation from --teacher.")] = True,
    train: Annotated[str, typer.Option("--train", help="all weights, or only the decomposed layers' factors.")] = "all",
    augment: Annotated[bool, typer.Option("--augment/--no-augment", help="Random crop (zero padding) and horizontal flip of image inputs.")] = True,
    size: SizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    layout: LayoutOpt = "auto",
    scale: ScaleOpt = None,
    resize_shorter: ResizeShorterOpt = None,
    crop: CropOpt = None,
    channel_order: ChannelOrderOpt = "rgb",
    device: DeviceOpt = "auto",
    torch_threads: TorchThreadsOpt = None,
    # Before issue 16 finetune's --threads were torch's; kept, hidden, so old scripts run unchanged.
    threads: Annotated[int | None, typer.Option("--threads", hidden=True)] = None,
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="Checkpoint written after each epoch (default OUT.finetune.pt).", show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the checkpoint (after Ctrl-C, or with more --epochs).")] = False,
    seed: SeedOpt = 0,
    report: FinetuneReportOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Fine-tune a compressed model with labels or by distillation from the original; write OUTPUT as ONNX."""
    from .training import FinetuneConfig, finetune

    with _errors(verbose):
        if threads is not None and torch_threads is not None and threads != torch_threads:
            raise UsageError(f"--threads {threads} and --torch-threads {torch_threads}: finetune's --threads is the old "
                             "name of --torch-threads; give --torch-threads only")
        torch_threads = threads if torch_threads is None else torch_threads
        cfg = FinetuneConfig(
            epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr, schedule=schedule, step_epochs=step_epochs,
            weight_decay=weight_decay, max_steps=max_steps, temperature=temperature, alpha=alpha, use_labels=labels, train=train,
            augment=augment, val_split=val_split, device=device, seed=seed, threads=torch_threads,
            checkpoint=str(checkpoint) if checkpoint else None, resume=resume,
            preprocess=_preprocess(size, mean, std, layout, scale, resize_shorter, crop, channel_order),
        )
        result = finetune(input, output, data, teacher=teacher, val_data=val_data, config=cfg,
                          progress=None if quiet else _FinetuneProgress(), report=report)
        if not quiet:
            def pct(v: float | None) -> str:
                return "-" if v is None else f"{100 * v:.2f} %"

            err_console.print(
                f"wrote {result.output_path}: {result.mode}, {result.epochs} epoch(s), {result.steps} steps, "
                f"{result.seconds:.0f} s on {result.device}; best epoch {result.best_epoch} ({result.best_metric}); "
                f"{'on the training data (no held-out data): ' if result.val_samples == 0 else ''}"
                f"accuracy {pct(result.accuracy_before)} -> {pct(result.accuracy_after)}, agreement with the teacher "
                f"{pct(result.agreement_before)} -> {pct(result.agreement_after)}; onnxruntime vs torch max rel error "
                f"{result.export_max_rel_error:.2g}", markup=False, highlight=False, soft_wrap=True)
            if result.best_epoch == 0:
                err_console.print(
                    f"note: no epoch improved {result.best_metric} on the held-out data; {result.output_path} holds the "
                    "starting weights (lower --lr, or more data)", markup=False, highlight=False, soft_wrap=True)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


class _FinetuneProgress:
    """One line per epoch on stderr; a live bar for the steps on a terminal."""

    # The speed is printed once, this many steps into the run (or after EARLY_S seconds), so a run that
    # will take hours says so in its first minute.
    EARLY_STEPS = 5
    EARLY_S = 10.0

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.epochs_left = 0
        self.threads = ""
        self.speed_shown = False

    def __call__(self, kind: str, d: Any) -> None:
        def pct(v: float | None) -> str:
            return "-" if v is None else f"{100 * v:.2f}%"

        if kind == "start":
            b = d["before"]
            changes = "; ".join(d["changes"]) or "none"
            err_console.print(
                f"finetune: {d['mode']} on {d['device']}, {d['train']} training / {d['val']} validation samples, "
                f"{d['trainable']:,} of {d['total']:,} weights trained; graph normalisation: {changes}; "
                f"before: accuracy {pct(b['accuracy'])}, agreement {pct(b['agreement'])}",
                markup=False, highlight=False, soft_wrap=True)
            for note in d.get("notes", ()):
                _note(note)
            self.epochs_left = d["epochs"] - d["first_epoch"] + 1
            if "threads" in d and d["device"] == "cpu":
                self.threads = f"; torch threads {d['threads']} ({d['threads_why']}; --torch-threads N to set)"
        elif kind == "step" and not self.speed_shown and d["step"] < d["steps"] and (
                d["step"] >= self.EARLY_STEPS or d.get("seconds", 0.0) >= self.EARLY_S):
            self.speed_shown = True
            ips = d["images_per_s"]
            per_epoch = d.get("images", 0) / ips if ips > 0 else 0.0
            if self.tty:
                sys.stderr.write("\r" + " " * 78 + "\r")
            _note(f"speed: {ips:.0f} img/s after {d['step']} steps: about {_duration(per_epoch)} per epoch, "
                  f"{_duration(per_epoch * max(1, self.epochs_left))} for {max(1, self.epochs_left)} epoch(s){self.threads}")
        if kind == "step" and self.tty:
            sys.stderr.write(f"\r  epoch {d['epoch']} {d['step']}/{d['steps']} loss {d['loss']:.4f} "
                             f"acc {pct(d['accuracy'])} {d['images_per_s']:.0f} img/s   ")
            sys.stderr.flush()
        elif kind == "epoch":
            s = d["stats"]
            if self.tty:
                sys.stderr.write("\r" + " " * 78 + "\r")
            err_console.print(
                f"epoch {s.epoch}/{d['epochs']}: lr {s.lr:.2g} loss {s.train_loss:.4f} train acc {pct(s.train_accuracy)} | "
                f"val loss {'-' if s.val_loss is None else f'{s.val_loss:.4f}'} acc {pct(s.val_accuracy)} "
                f"agreement {pct(s.val_agreement)} | {s.images_per_s:.0f} img/s, {s.seconds:.0f} s{' *best' if s.best else ''}",
                markup=False, highlight=False, soft_wrap=True)


def _library_reads_the_files() -> None:
    """typer refuses an existing path it cannot read as a usage error (exit 2, "Invalid value for
    'INPUT'"); the library reads every file itself and says which one and why, with its exit code
    (an unreadable model: 1, as the README says). So typer's readable check is off for every path."""
    import typing

    from typer.models import ParameterInfo

    for command in app.registered_commands:
        for hint in typing.get_type_hints(command.callback, include_extras=True).values():
            for meta in getattr(hint, "__metadata__", ()):
                if isinstance(meta, ParameterInfo):
                    meta.readable = False


_library_reads_the_files()


def main() -> None:
    try:
        app()
    except UsageError as e:  # raised before a command's own handler (should not happen)
        _error_line(str(e))
        sys.exit(2)


if __name__ == "__main__":
    main()
