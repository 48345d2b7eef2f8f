"""The `onnx-tucker` command line: a thin typer layer, one library call per command.

Every option is a field of one option group (config.py, and the CLI-only groups below); each command
subscribes to the groups it uses, so `--seed` or `--threads` mean the same everywhere, and
`--help` lists the options under one panel per group. Exit codes: 0 success, 1 failure (bad model, failed step, failed validation),
2 usage error.
"""

from __future__ import annotations

import functools
import inspect as pyinspect
import signal
import sys
import threading
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import MISSING, Field, dataclass, fields, replace
from dataclasses import field as dc_field
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from typer.core import TyperCommand, TyperGroup

from .config import (
    FIELD_DEFAULT,
    GROUPS,
    REQUIRED,
    BenchConfig,
    CalibrationConfig,
    CompressionConfig,
    FinetuneConfig,
    FinetuneOptions,
    InputOptions,
    LatencyConfig,
    MobileReportOptions,
    Opt,
    OutputOptions,
    PlanIO,
    Preprocess,
    QuantizeConfig,
    RankOptions,
    TrainingData,
    ValidationConfig,
    cli_option,
    group,
    group_by_name,
    opt,
)
from .errors import OnnxTuckerError, Terminated, UsageError
from .report.console import make_console

try:  # recent typer vendors click as typer._click; older typer uses click itself
    from typer._click import exceptions as _click_exc
except ImportError:  # pragma: no cover
    from click import exceptions as _click_exc  # type: ignore[no-redef]
# `onnx-tucker` alone raises this (click >= 8.2) to print the help; older click prints it itself.
_NoArgsIsHelp = getattr(_click_exc, "NoArgsIsHelpError", ())

T = TypeVar("T")


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

    def format_options(self, ctx: Any, formatter: Any) -> None:
        """One section per option group (its help panel), in the order the command subscribes to them:
        typer draws panels only in rich mode, whose boxes would break the help text's plain lines."""
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                # --help, the one option of no group, ends the General panel (quiet, verbose)
                title = "Arguments" if param.param_type_name == "argument" else getattr(param, "rich_help_panel", None) or "General"
                sections.setdefault(title, []).append(record)
        for title, records in sections.items():
            with formatter.section(title):
                formatter.write_dl(records)


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

# Arguments get explicit metavars: typer would print them as `{input}`.
InPath = Annotated[Path, typer.Argument(metavar="INPUT", help="Input ONNX model.", show_default=False)]
OutPath = Annotated[Path, typer.Argument(metavar="OUTPUT", help="Where to write the compressed model (never the input).", show_default=False)]
OriginalPath = Annotated[Path, typer.Argument(metavar="ORIGINAL", help="The original model.", show_default=False)]
CompareToPath = Annotated[Path, typer.Argument(metavar="COMPRESSED", help="The model to compare with it.", show_default=False)]
TimeAgainstPath = Annotated[Path, typer.Argument(metavar="COMPRESSED", help="The model to time against it.", show_default=False)]

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



# ---- option groups -> typer parameters (issue 17 item 4) --------------------------------------------
# Every option is a field of one group (config.py; the CLI-only ones below) with its flag, help and
# default. `@options(...)` subscribes a command to groups: it generates the typer parameters once per
# group, under the group's help panel, and hands the command the groups rebuilt from the parsed values.


@group("General")
@dataclass(frozen=True)
class GeneralOptions:
    quiet: bool = opt("--quiet", "-q", default=False, help="Print nothing but errors.")
    verbose: bool = opt("--verbose", "-v", default=False, help="More detail (EVBMF noise estimates, timings).")


@group("Timing")
@dataclass(frozen=True)
class CompressSteps:
    """`compress`'s optional step that has no options of its own."""

    bench: bool = opt("--bench", default=False, help="Also measure latency of both models in onnxruntime CPU (interleaved runs, medians).")


@group("Aliases")
@dataclass(frozen=True)
class OldSpellings:
    """Hidden old names, kept so old scripts run; each is reconciled with its new name (`_alias`)."""

    # The JSON report is --report in every command; `report --json` was its first spelling.
    json: Path | None = opt("--json", default=None, hidden=True, help="Old spelling of --report.")
    # Before issue 16 finetune's --threads were torch's.
    threads: int | None = opt("--threads", default=None, hidden=True, help="Old name of --torch-threads.")


@dataclass(frozen=True)
class Use:
    """A command's subscription to a group: `only` some of its options, `help` per command (the
    --report help names the keys of that command's JSON)."""

    group: type
    only: tuple[str, ...] | None = None
    help: Mapping[str, str] = dc_field(default_factory=dict)

    def options(self) -> list[tuple[Field[Any], Opt]]:
        out = []
        for f in fields(self.group):
            o = cli_option(f)
            if o is not None and (self.only is None or f.name in self.only):
                out.append((f, o))
        if self.only is not None:
            missing = set(self.only) - {f.name for f, _ in out}
            assert not missing, f"{self.group.__name__} has no options {missing}"
        return out


class Groups:
    """The groups of one command invocation, built on first use from the parsed values: a field with
    an option takes its value (None: the field's default), a nested group the command's instance of
    that group, a `same_as` field the value of the option it shares."""

    def __init__(self, values: Mapping[tuple[type, str], Any]) -> None:
        self._values = values
        self._built: dict[type, Any] = {}

    def __getitem__(self, cls: type[T]) -> T:
        if cls not in self._built:
            kwargs: dict[str, Any] = {}
            for f in fields(cls):  # type: ignore[arg-type]
                if (cls, f.name) in self._values:
                    if self._values[cls, f.name] is not None:
                        kwargs[f.name] = self._values[cls, f.name]
                elif "same_as" in f.metadata:
                    owner, name = f.metadata["same_as"].split(".")
                    kwargs[f.name] = getattr(self[group_by_name(owner)], name)
                elif "group" in f.metadata:
                    kwargs[f.name] = self[f.metadata["group"]]
            self._built[cls] = cls(**kwargs)
        return self._built[cls]  # type: ignore[no-any-return]


def _param_name(cls: type, name: str) -> str:
    return f"{cls.__name__}__{name}"


def _field_types(cls: type) -> dict[str, Any]:
    """The group's annotations resolved. A group defined here is looked up in this module's own namespace
    too: run as a program by a runner (`python -m cProfile -m onnx_tucker.cli`, runpy), its `__module__` is
    "__main__", which names the runner, not this module."""
    module = sys.modules.get(cls.__module__)
    return typing.get_type_hints(cls, globalns={**globals(), **(vars(module) if module is not None else {})})


def _typer_parameter(use: Use, f: Field[Any], o: Opt) -> pyinspect.Parameter:
    hint = o.cli_type if o.cli_type is not None else _field_types(use.group)[f.name]
    default = f.default if o.cli_default is FIELD_DEFAULT else o.cli_default
    if default is MISSING:
        default = typing.cast(Callable[[], Any], f.default_factory)()
    info = typer.Option(*o.flags, help=use.help.get(f.name, o.help), metavar=o.metavar, hidden=o.hidden,
                        show_default=default is not None and default is not REQUIRED,
                        rich_help_panel=o.panel or GROUPS[use.group])
    return pyinspect.Parameter(_param_name(use.group, f.name), pyinspect.Parameter.KEYWORD_ONLY,
                             default=pyinspect.Parameter.empty if default is REQUIRED else default,
                             annotation=Annotated[hint, info])


def options(*uses: type | Use) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """The command's own parameters (its arguments) plus one typer option per subscribed field; the
    command is called with its arguments and `g`, the Groups."""
    subscribed = [u if isinstance(u, Use) else Use(u) for u in uses]

    def decorate(body: Callable[..., None]) -> Callable[..., None]:
        own = [p for name, p in pyinspect.signature(body).parameters.items() if name != "g"]
        hints = typing.get_type_hints(body, include_extras=True)
        own = [p.replace(annotation=hints[p.name]) for p in own]
        generated = [_typer_parameter(u, f, o) for u in subscribed for f, o in u.options()]
        keys = {_param_name(u.group, f.name): (u.group, f.name) for u in subscribed for f, _ in u.options()}
        flags = [flag for u in subscribed for _, o in u.options() for flag in o.flags]
        assert len(flags) == len(set(flags)), f"{body.__name__}: an option flag comes from two groups"

        @functools.wraps(body)
        def command(**kwargs: Any) -> None:
            values = {keys[k]: v for k, v in kwargs.items() if k in keys}
            body(**{k: v for k, v in kwargs.items() if k not in keys}, g=Groups(values))

        params = [*own, *generated]
        command.__signature__ = pyinspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.__wrapped_groups__ = subscribed  # type: ignore[attr-defined]
        del command.__wrapped__  # typer must read the generated signature, not the body's
        return command

    return decorate


# --report writes a different JSON per command (report/data.py); each help names its top-level keys.
INSPECT_REPORT_HELP = "Write the plan as a JSON report (keys: layers, totals, validation, target, mac_budget, layer_timing, config; validation is always null: nothing is run; target is null without --target (and under --ranks data:F --target params:G, whose two budgets mac_budget gives), mac_budget without --ranks data:F, layer_timing without --latency-aware)."
VALIDATE_REPORT_HELP = "Write the comparison as JSON (keys: validation)."
FINETUNE_REPORT_HELP = "Write the fine-tuning result as JSON (keys: finetune)."
BENCH_REPORT_HELP = "Write the latencies as JSON (keys: latency)."
MOBILE_REPORT_HELP = "Write the report as JSON (keys: models, inputs, totals, layers, runtimes, failed_runtimes)."


@app.command(cls=_Command, epilog="Example: onnx-tucker compress model.onnx model.tucker.onnx --report report.json")
@options(RankOptions, PlanIO, Use(OutputOptions, only=("save_plan", "report", "markdown", "mobile_report")), InputOptions,
         ValidationConfig, Preprocess, CalibrationConfig, FinetuneOptions,
         Use(FinetuneConfig, only=("epochs", "batch_size", "optimizer", "lr", "schedule", "device", "threads")),
         CompressSteps, BenchConfig, LatencyConfig, QuantizeConfig, GeneralOptions)
def compress(input: InPath, output: OutPath, g: Groups) -> None:
    """Decompose every Conv / ConvTranspose / Gemm / MatMul that gains, validate, and write OUTPUT atomically."""
    from . import api
    from .report.mobile import runtime_status
    from .report.tables import result_tables

    quiet = g[GeneralOptions].quiet
    with _errors(g[GeneralOptions].verbose):
        cfg, out = g[CompressionConfig], g[OutputOptions]
        # --quantize-compare times the four models as --threads/--warmup/--runs say (and both, as --bench does)
        timing = g[BenchConfig] if g[CompressSteps].bench or g[QuantizeConfig].compare else None
        if out.mobile_report is not None:  # refused before any work, like every other output path
            from .graph.save import check_output_paths

            check_output_paths(input, {"OUT": output, "--mobile-report": out.mobile_report})
        step = g[FinetuneOptions].step()
        with _progress(not quiet) as progress:
            result = api.compress(input, cfg, output, progress, bench=timing, save_plan=out.save_plan, report=out.report,
                                  markdown=out.markdown, finetune=step,
                                  finetune_progress=None if quiet else _FinetuneProgress(),
                                  events=_calibration_events(quiet), quantize=g[QuantizeConfig])
        if not quiet:
            _print(result_tables(result))
        failure = result.validation_error()
        if failure is not None:
            raise failure
        if out.mobile_report is not None and result.output_path is not None:
            with _progress(not quiet) as progress:
                mobile = api.mobile_report(input, result.output_path, cfg, bench_config=g[BenchConfig],
                                           layer_plan=result.plan, html=out.mobile_report, progress=progress,
                                           int8=(result.quantize, result.comparison) if result.quantize else None)
            if not quiet:
                _note(f"wrote {out.mobile_report} (runtimes: " + ", ".join(f"{r.name} {runtime_status(r)}" for r in mobile.runtimes) + ")")
        if quiet:
            return
        if result.decomposed_layers == 0:
            _note(f"note: no layer of {input} was decomposed (see the reasons above); {output} is an unchanged copy")
        else:
            _note(f"wrote {result.output_path} ({result.decomposed_layers} layers decomposed, {result.seconds:.1f} s)")


@app.command(cls=_Command, epilog="Example: onnx-tucker inspect model.onnx --ranks ratio:0.25")
@options(RankOptions, PlanIO, Use(OutputOptions, only=("save_plan", "report"), help={"report": INSPECT_REPORT_HELP}),
         InputOptions, LatencyConfig, Use(BenchConfig, only=("threads",)), GeneralOptions)
def inspect(input: InPath, g: Groups) -> None:
    """Print the plan (kinds, ranks, predicted savings, kernel errors; measured per-layer time with --latency-aware); write no model."""
    from . import api
    from .report.tables import result_tables

    with _errors(g[GeneralOptions].verbose):
        cfg, out = replace(g[CompressionConfig], validate=False), g[OutputOptions]
        with _progress(not g[GeneralOptions].quiet) as progress:
            p = api.plan(input, cfg, progress, save_plan=out.save_plan, report=out.report,
                         events=_calibration_events(g[GeneralOptions].quiet))
        if not g[GeneralOptions].quiet:
            _print(result_tables(p))


@app.command(cls=_Command, name="validate", epilog="Example: onnx-tucker validate model.onnx model.tucker.onnx --rtol 0.05")
@options(InputOptions, Use(ValidationConfig, only=("samples", "data", "rtol")), Preprocess,
         Use(OutputOptions, only=("report",), help={"report": VALIDATE_REPORT_HELP}), GeneralOptions)
def validate_cmd(original: OriginalPath, compressed: CompareToPath, g: Groups) -> None:
    """Compare two models' outputs on seeded random inputs (or --data) in onnxruntime."""
    from . import api
    from .report.tables import validation_table

    with _errors(g[GeneralOptions].verbose):
        with _progress(not g[GeneralOptions].quiet) as progress:
            v = api.validate(original, compressed, g[ValidationConfig], report=g[OutputOptions].report, progress=progress)
        if not g[GeneralOptions].quiet:
            _print([validation_table(v)])
        if not v.passed:
            raise OnnxTuckerError(f"{compressed}: validation failed: {v.problem}; {v.fix}")


@app.command(cls=_Command, name="bench", epilog="Example: onnx-tucker bench model.onnx model.tucker.onnx --threads 1 --runs 50")
@options(InputOptions, BenchConfig, Use(OutputOptions, only=("report",), help={"report": BENCH_REPORT_HELP}), GeneralOptions)
def bench_cmd(original: OriginalPath, compressed: TimeAgainstPath, g: Groups) -> None:
    """Latency of two models in onnxruntime CPU, measured side by side (medians, p90, ratio)."""
    from . import api
    from .report.tables import latency_table

    with _errors(g[GeneralOptions].verbose):
        lat = api.bench(original, compressed, g[BenchConfig], report=g[OutputOptions].report)
        if not g[GeneralOptions].quiet:
            _print([latency_table(lat)])


# ---- report (issue 10): the compressed model in the runtimes phones use ------------------------------
@app.command(cls=_Command, name="report", epilog="Example: onnx-tucker report model.onnx model.tucker.onnx --runtimes ort,mnn,ncnn --html report.html")
@options(MobileReportOptions, InputOptions, Use(ValidationConfig, only=("samples", "data")), Preprocess, PlanIO,
         Use(BenchConfig), Use(OutputOptions, only=("html", "markdown", "report"), help={"report": MOBILE_REPORT_HELP}),
         Use(OldSpellings, only=("json",)), GeneralOptions)
def report_cmd(original: OriginalPath, compressed: CompareToPath, g: Groups) -> None:
    """Convert, run and time both models in mobile runtimes (ORT format, MNN, ncnn) and compare with onnxruntime."""
    from . import api
    from .report.mobile import mobile_tables

    quiet, m, out = g[GeneralOptions].quiet, g[MobileReportOptions], g[OutputOptions]
    with _errors(g[GeneralOptions].verbose):
        report, json_alias = out.report, g[OldSpellings].json
        if json_alias is not None:
            if report is not None and report != json_alias:
                raise UsageError(f"--json {json_alias} and --report {report}: two paths for the one JSON report; "
                                 "give --report only (--json is its old spelling)")
            report = json_alias
        cfg = replace(g[CompressionConfig], validate=False)
        with _progress(not quiet) as progress:
            rep = api.mobile_report(
                original, compressed, cfg, runtimes=m.runtimes, bench_config=g[BenchConfig],
                timeout=m.timeout, rtol=m.rtol, html=out.html, markdown=out.markdown, report=report, progress=progress,
            )
        if not quiet:
            _print(mobile_tables(rep))
        if m.strict and rep.failed_runtimes:
            raise OnnxTuckerError(f"--strict: runtime(s) {', '.join(rep.failed_runtimes)} did not pass (see the report)")


# ---- quantize (issue 18): the uncompressed INT8 reference, as `compress --quantize int8` makes it --------
QUANTIZE_REPORT_HELP = "Write the INT8 result as JSON (keys: quantize, comparison)."


@app.command(cls=_Command, name="quantize", epilog="Example: onnx-tucker quantize model.onnx model.int8.onnx --data calib.npz --report int8.json")
@options(Use(QuantizeConfig, only=("method", "exclude", "min_sqnr", "keep_names", "runtimes")), InputOptions,
         Use(ValidationConfig, only=("samples", "data")), Use(CalibrationConfig, only=("calibrate", "calibration_samples")),
         Preprocess, BenchConfig, Use(OutputOptions, only=("report", "markdown", "html"), help={"report": QUANTIZE_REPORT_HELP}),
         GeneralOptions)
def quantize_cmd(
    input: InPath,
    output: Annotated[Path, typer.Argument(metavar="OUTPUT", help="Where to write the INT8 model (never the input).", show_default=False)],
    g: Groups,
) -> None:
    """Quantize a float model to INT8 (onnxruntime's static quantizer, QDQ) on --data / --calibrate; compare with FP32."""
    from . import api
    from .report.quantize import quantize_tables

    with _errors(g[GeneralOptions].verbose):
        out = g[OutputOptions]
        run = api.quantize(input, output, g[CompressionConfig], g[QuantizeConfig], bench=g[BenchConfig],
                           report=out.report, markdown=out.markdown, html=out.html)
        if not g[GeneralOptions].quiet:
            _print(quantize_tables(run.result, run.comparison))
            _note(f"wrote {run.output_path} ({run.result.qdq_nodes} QuantizeLinear/DequantizeLinear nodes, "
                  f"{run.result.seconds:.1f} s)")


# ---- finetune (issue 8): ONNX -> torch -> train -> ONNX; torch is imported only when it runs ----------
@app.command(cls=_Command, name="finetune", epilog="Example: onnx-tucker finetune model.tucker.onnx model.ft.onnx --data train/ --teacher model.onnx "
             "--mean 0.4914,0.4822,0.4465 --std 0.2470,0.2435,0.2616")
@options(TrainingData, Use(FinetuneOptions, only=("val_data",)), FinetuneConfig, Preprocess, Use(InputOptions, only=("seed",)),
         Use(OldSpellings, only=("threads",)), Use(OutputOptions, only=("report",), help={"report": FINETUNE_REPORT_HELP}),
         GeneralOptions)
def finetune_cmd(
    input: InPath,
    output: Annotated[Path, typer.Argument(metavar="OUTPUT", help="Where to write the fine-tuned model (never the input).", show_default=False)],
    g: Groups,
) -> None:
    """Fine-tune a compressed model with labels or by distillation from the original; write OUTPUT as ONNX."""
    from .config import FinetuneConfig
    from .training import finetune

    quiet = g[GeneralOptions].quiet
    with _errors(g[GeneralOptions].verbose):
        cfg, threads = g[FinetuneConfig], g[OldSpellings].threads
        if threads is not None and cfg.threads is not None and threads != cfg.threads:
            raise UsageError(f"--threads {threads} and --torch-threads {cfg.threads}: finetune's --threads is the old "
                             "name of --torch-threads; give --torch-threads only")
        if threads is not None:
            cfg = replace(cfg, threads=threads)
        td = g[TrainingData]
        if td.data is None:  # typer requires --data; this is for the type checker and library-style calls
            raise UsageError("--data: missing; give the training data (an image folder or a .npz)")
        result = finetune(input, output, td.data, teacher=td.teacher, val_data=g[FinetuneOptions].val_data, config=cfg,
                          progress=None if quiet else _FinetuneProgress(), report=g[OutputOptions].report)
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
            if result.segments:
                from .report.tables import segments_table

                err_console.print(segments_table(result))
            if result.best_epoch == 0:
                err_console.print(
                    f"note: no epoch improved {result.best_metric} on the held-out data; {result.output_path} holds the "
                    "starting weights (lower --lr, or more data)", markup=False, highlight=False, soft_wrap=True)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _calibration_events(quiet: bool):  # type: ignore[no-untyped-def]
    """Prints the one-line estimate before each calibration walk (on a terminal or in a log)."""
    if quiet:
        return None

    def show(kind: str, d: Any) -> None:
        if kind == "calibration-estimate":
            from .report.tables import calibration_estimate_line

            _note(calibration_estimate_line(d["estimate"]))
        elif kind == "loss-weights":
            from .report.tables import loss_weights_line

            _note(loss_weights_line(d["weights"]))

    return show


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

        if kind == "note":
            _note(d["text"])
        elif kind == "segment":
            from .report.tables import segment_start_line

            _note(segment_start_line(d))
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
