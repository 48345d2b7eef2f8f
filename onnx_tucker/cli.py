"""The `onnx-tucker` command line: a thin typer layer, one library call per command.

Options are defined once below and shared by every subcommand, so `--seed` or `--rtol` mean the
same everywhere. Exit codes: 0 success, 1 failure (bad model, failed step, failed validation),
2 usage error.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .config import CompressionConfig, RankPolicy, parse_input_shape
from .errors import OnnxTuckerError, UsageError

app = typer.Typer(
    name="onnx-tucker",
    help="Compress ONNX CNNs with EVBMF-ranked Tucker-2 / SVD decompositions (Kim et al., ICLR 2016), "
    "validated in onnxruntime.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# ---- shared options (one definition each) -------------------------------------------------------
InPath = Annotated[Path, typer.Argument(help="Input ONNX model.", show_default=False)]
RanksOpt = Annotated[str, typer.Option("--ranks", help="Rank policy: vbmf (EVBMF, default), ratio:F, energy:F, or full (verification: no truncation).")]
RankScaleOpt = Annotated[float, typer.Option("--rank-scale", help="Multiply every chosen rank by F (rounded up).")]
MinRankOpt = Annotated[int | None, typer.Option("--min-rank", help="Floor on every rank (also turns an EVBMF rank of 0 into N).", show_default=False)]
RoundToOpt = Annotated[int, typer.Option("--round-to", help="Round ranks up to a multiple of N (capped at the dimension), e.g. 8 for SIMD.")]
IncludeOpt = Annotated[str | None, typer.Option("--include", help="Only decompose nodes whose name matches this regex.", show_default=False)]
ExcludeOpt = Annotated[str | None, typer.Option("--exclude", help="Never decompose nodes whose name matches this regex.", show_default=False)]
HooiOpt = Annotated[int, typer.Option("--hooi-iters", help="HOOI sweeps after the HOSVD start (0: plain HOSVD).")]
InputShapeOpt = Annotated[list[str] | None, typer.Option("--input-shape", help="NAME:D0,D1,... fixes an input's dynamic dims (repeatable).", show_default=False)]
PlanOpt = Annotated[Path | None, typer.Option("--plan", help="Replay the kinds and ranks of a plan file written by --save-plan.", show_default=False)]
SavePlanOpt = Annotated[Path | None, typer.Option("--save-plan", help="Write the plan (kinds and ranks per layer) as JSON.", show_default=False)]
ReportOpt = Annotated[Path | None, typer.Option("--report", help="Write the full report as JSON (keys: layers, totals, validation).", show_default=False)]
MarkdownOpt = Annotated[Path | None, typer.Option("--markdown", help="Write the report as Markdown.", show_default=False)]
ValidateOpt = Annotated[bool, typer.Option("--validate/--no-validate", help="Compare original and compressed outputs in onnxruntime.")]
SamplesOpt = Annotated[int | None, typer.Option("--samples", help="Random inputs used for validation (default 8), or how many --data samples to use (default all).", show_default=False)]
DataOpt = Annotated[Path | None, typer.Option("--data", help="Validate on real data: a .npz with one array per model input (samples on the first axis) and optional 'labels' for accuracy.", show_default=False)]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of every random choice (validation inputs).")]
RtolOpt = Annotated[float | None, typer.Option("--rtol", help="Fail when max|orig-new| > RTOL * max|orig| on any output (default: report only; 1e-4 under --ranks full).", show_default=False)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="More detail (EVBMF noise estimates, timings).")]

# Piped output (CI logs, reports) gets wide tables instead of rich's 80-column default.
out_console = Console(width=None if sys.stdout.isatty() else 180)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 180)


@contextmanager
def _errors(verbose: bool = False):  # type: ignore[no-untyped-def]
    try:
        yield
    except OnnxTuckerError as e:
        err_console.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        err_console.print("interrupted; nothing was written", markup=False)
        raise typer.Exit(130) from None
    except MemoryError:
        err_console.print("error: out of memory; nothing was written", markup=False)
        raise typer.Exit(1) from None
    except Exception as e:  # noqa: BLE001 - last resort: one line, never a bare traceback
        if verbose:
            raise
        err_console.print(
            f"error: unexpected {type(e).__name__}: {e} (a bug in onnx-tucker: rerun with -v for the traceback "
            "and please report it); nothing was written",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1) from None


def _config(
    ranks: str, rank_scale: float, min_rank: int | None, round_to: int, include: str | None, exclude: str | None,
    hooi_iters: int, input_shape: list[str] | None, plan: Path | None, validate: bool, samples: int | None, seed: int,
    rtol: float | None, data: Path | None = None,
) -> CompressionConfig:
    return CompressionConfig(
        ranks=RankPolicy.parse(ranks),
        rank_scale=rank_scale,
        min_rank=min_rank,
        round_to=round_to,
        include=include,
        exclude=exclude,
        hooi_iters=hooi_iters,
        input_shapes=tuple(parse_input_shape(s) for s in input_shape or []),
        plan_file=str(plan) if plan else None,
        validate=validate,
        samples=samples,
        seed=seed,
        rtol=rtol,
        data=str(data) if data else None,
    )


@contextmanager
def _progress(enabled: bool):  # type: ignore[no-untyped-def]
    """A per-layer progress bar on a terminal; nothing otherwise."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True) as bar:
        task = bar.add_task("layers", total=None)

        def update(name: str, done: int, total: int) -> None:
            bar.update(task, description=name[-40:], completed=done, total=total)

        yield update


@app.command(epilog="Example: onnx-tucker compress model.onnx model.tucker.onnx --report report.json")
def compress(
    input: InPath,
    output: Annotated[Path, typer.Argument(help="Where to write the compressed model (never the input).", show_default=False)],
    ranks: RanksOpt = "vbmf",
    rank_scale: RankScaleOpt = 1.0,
    min_rank: MinRankOpt = None,
    round_to: RoundToOpt = 1,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    hooi_iters: HooiOpt = 0,
    input_shape: InputShapeOpt = None,
    plan: PlanOpt = None,
    save_plan: SavePlanOpt = None,
    report: ReportOpt = None,
    markdown: MarkdownOpt = None,
    validate: ValidateOpt = True,
    samples: SamplesOpt = None,
    data: DataOpt = None,
    seed: SeedOpt = 0,
    rtol: RtolOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Decompose every Conv / Gemm / MatMul that gains, validate, and write OUTPUT atomically."""
    from . import api, report as rep
    from .io import check_output_path, write_text_atomic

    with _errors(verbose):
        cfg = _config(ranks, rank_scale, min_rank, round_to, include, exclude, hooi_iters, input_shape, plan,
                      validate, samples, seed, rtol, data)
        for side in (save_plan, report, markdown):
            if side is not None:
                check_output_path(side, input)
        with _progress(not quiet) as progress:
            result = api.compress(input, cfg, output=output, progress=progress)
        if not quiet:
            rep.print_result(result, out_console, verbose)
        if save_plan is not None:
            result.plan.save(save_plan)
        if report is not None:
            write_text_atomic(report, rep.result_json(result))
        if markdown is not None:
            write_text_atomic(markdown, rep.result_markdown(result))
        if result.validation is not None and not result.validation.passed:
            v = result.validation
            raise OnnxTuckerError(
                f"{input}: validation failed: max relative output error {v.passing_rtol:.3g} > --rtol {v.rtol:g}; "
                f"{output} was not written (raise --rtol, or keep more rank: --rank-scale / --ranks energy:F)"
            )
        if not quiet:
            if result.decomposed_layers == 0:
                err_console.print(
                    f"note: no layer of {input} was decomposed (see the reasons above); {output} is an unchanged copy",
                    markup=False, highlight=False, soft_wrap=True,
                )
            else:
                err_console.print(f"wrote {result.output_path} ({result.decomposed_layers} layers decomposed, "
                                  f"{result.seconds:.1f} s)", markup=False, highlight=False)


@app.command(epilog="Example: onnx-tucker inspect model.onnx --ranks ratio:0.25")
def inspect(
    input: InPath,
    ranks: RanksOpt = "vbmf",
    rank_scale: RankScaleOpt = 1.0,
    min_rank: MinRankOpt = None,
    round_to: RoundToOpt = 1,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    hooi_iters: HooiOpt = 0,
    input_shape: InputShapeOpt = None,
    plan: PlanOpt = None,
    save_plan: SavePlanOpt = None,
    report: ReportOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Print the plan (kinds, ranks, predicted savings, kernel errors); write no model."""
    from . import api, report as rep
    from .io import check_output_path, write_text_atomic

    with _errors(verbose):
        cfg = _config(ranks, rank_scale, min_rank, round_to, include, exclude, hooi_iters, input_shape, plan,
                      False, None, 0, None)
        for side in (save_plan, report):
            if side is not None:
                check_output_path(side, input)
        with _progress(not quiet) as progress:
            p = api.plan(input, cfg, progress=progress)
        if not quiet:
            rep.print_result(p, out_console, verbose)
        if save_plan is not None:
            p.save(save_plan)
        if report is not None:
            write_text_atomic(report, rep.result_json(p))


@app.command(name="validate", epilog="Example: onnx-tucker validate model.onnx model.tucker.onnx --rtol 0.05")
def validate_cmd(
    original: Annotated[Path, typer.Argument(help="The original model.", show_default=False)],
    compressed: Annotated[Path, typer.Argument(help="The model to compare with it.", show_default=False)],
    input_shape: InputShapeOpt = None,
    samples: SamplesOpt = None,
    data: DataOpt = None,
    seed: SeedOpt = 0,
    rtol: RtolOpt = None,
    report: ReportOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Compare two models' outputs on seeded random inputs in onnxruntime."""
    from . import api, report as rep
    from .io import write_text_atomic

    with _errors(verbose):
        cfg = _config("vbmf", 1.0, None, 1, None, None, 0, input_shape, None, True, samples, seed, rtol, data)
        v = api.validate(original, compressed, cfg)
        if not quiet:
            out_console.print(rep.validation_table(v))
        if report is not None:
            write_text_atomic(report, rep.json.dumps({"validation": rep.validation_dict(v)}, indent=2) + "\n")
        if not v.passed:
            raise OnnxTuckerError(f"{compressed}: validation failed: max relative output error {v.passing_rtol:.3g} > --rtol {v.rtol:g}")


def main() -> None:
    try:
        app()
    except UsageError as e:  # raised before a command's own handler (should not happen)
        err_console.print(f"error: {e}", markup=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
