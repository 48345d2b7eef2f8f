"""Option groups (issue 17 item 4): every option is a field of one group, written once; `--help` lists
them under one panel per group; the library's `validate` / `bench` take only their groups, and
`CompressionConfig` is the same built from its groups or from the flat names of its first form."""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import onnx_tucker as ot
from onnx_tucker import config as cfgmod
from onnx_tucker.cli import app
from onnx_tucker.config import (
    GROUPS,
    BenchConfig,
    CompressionConfig,
    FinetuneOptions,
    InputOptions,
    RankOptions,
    ValidationConfig,
    cli_option,
)
from onnx_tucker.errors import UsageError
from tests.helpers import make_small_cnn, save

runner = CliRunner()
COMMANDS = typer.main.get_command(app).commands  # type: ignore[attr-defined]

# A flag that means different things in two commands: kept from before the groups (option names do not
# change), each its own group field with its own help.
SAME_FLAG_OTHER_MEANING = {
    "--rtol": "report: a runtime against onnxruntime (MobileReportOptions), not original against compressed",
    "--data": "finetune: the training data (TrainingData), not the validation data",
    "--threads": "finetune: the hidden old name of --torch-threads (OldSpellings)",
}


def _owners() -> dict[str, list[tuple[type, str]]]:
    """flag -> every (group, field) that declares it."""
    owners: dict[str, list[tuple[type, str]]] = {}
    for cls in GROUPS:
        for f in fields(cls):
            o = cli_option(f)
            for flag in (o.flags if o else ()):
                for spelling in flag.split("/"):
                    owners.setdefault(spelling, []).append((cls, f.name))
    return owners


def _command_options(name: str) -> dict[str, list[str]]:
    """python parameter name -> its flags, for every option of a command (--help aside)."""
    cmd = COMMANDS[name]
    return {p.name: [*p.opts, *p.secondary_opts] for p in cmd.params
            if p.param_type_name == "option" and p.name != "help"}


def test_compress_help_is_grouped_under_panels() -> None:
    text = runner.invoke(app, ["compress", "--help"], env={"COLUMNS": "200"}).stdout
    lines = text.splitlines()
    for title in ("Ranks", "Plan files", "Output", "Inputs", "Validation and data", "Image preprocessing",
                  "Calibration", "Fine-tuning", "Timing", "Latency-aware planning", "General"):
        assert f"{title}:" in lines, title
    assert "Options:" not in lines  # nothing outside a panel (--help ends General)
    section = text.split("\nCalibration:\n", 1)[1].split("\n\n", 1)[0]
    assert "--calibrate" in section and "--calibration-samples" in section and "--ranks" not in section


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_is_defined_in_exactly_one_group(command: str) -> None:
    owners = _owners()
    subscribed = {(u.group, f.name) for u in COMMANDS[command].callback.__wrapped_groups__ for f, _ in u.options()}
    for pname, flags in _command_options(command).items():
        cls_name, _, field_name = pname.partition("__")
        assert field_name, f"{command} {flags}: not generated from a group"
        for flag in flags:
            mine = [(c, n) for c, n in owners.get(flag, []) if (c, n) in subscribed]
            assert [(c.__name__, n) for c, n in mine] == [(cls_name, field_name)], (command, flag, mine)


def test_the_same_flag_is_the_same_field_in_every_command() -> None:
    seen: dict[str, set[str]] = {}
    for command in COMMANDS:
        for pname, flags in _command_options(command).items():
            for flag in flags:
                seen.setdefault(flag, set()).add(pname)
    shared = {flag: names for flag, names in seen.items() if len(names) > 1}
    assert set(shared) == set(SAME_FLAG_OTHER_MEANING), shared
    assert all(len(names) == 2 for names in shared.values()), shared


def test_compression_config_from_groups_equals_the_flat_form() -> None:
    flat = CompressionConfig(ranks="ratio:0.5", seed=3, samples=4, calibrate="c.npz", threads=2)  # type: ignore[arg-type]
    grouped = CompressionConfig(rank=RankOptions(ranks="ratio:0.5"),  # type: ignore[arg-type]
                                validation=ValidationConfig(samples=4, inputs=InputOptions(seed=3)),
                                calibration=cfgmod.CalibrationConfig(calibrate="c.npz"),
                                latency=cfgmod.LatencyConfig(threads=2))
    assert flat == grouped and flat.to_dict() == grouped.to_dict()
    assert (flat.seed, flat.samples, flat.threads, flat.validation.inputs.seed) == (3, 4, 2, 3)
    moved = replace(flat, seed=5, validate=False, target=None)
    assert (moved.seed, moved.validate, moved.samples) == (5, False, 4)
    assert list(CompressionConfig().to_dict()) == [
        "ranks", "rank_scale", "min_rank", "round_to", "include", "exclude", "hooi_iters", "min_tucker2_channels",
        "input_shapes", "validate", "samples", "seed", "rtol", "plan_file", "data", "calibrate", "calibration_samples",
        "calibration_memory", "preprocess", "latency_aware", "min_speedup", "latency_runtime", "threads", "target", "kind"]
    with pytest.raises(TypeError, match="unexpected keyword argument 'sampels'"):
        CompressionConfig(sampels=3)


def test_the_rules_between_groups_hold_for_both_forms() -> None:
    with pytest.raises(UsageError, match="needs --data"):
        CompressionConfig(rank=RankOptions(target="agreement:0.9"))  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="only with --finetune DATA"):
        FinetuneOptions(val_data="v.npz").step()
    assert FinetuneOptions().step() is None
    step = FinetuneOptions(data=Path("t.npz"), teacher_is_original=True).step()  # type: ignore[arg-type]
    assert step is not None and step.data == "t.npz" and step.teacher_is_original


def test_validate_and_bench_take_their_groups(tmp_path: Path) -> None:
    model = save(make_small_cnn(low_rank=True), tmp_path / "m.onnx")
    v = ot.validate(model, model, ValidationConfig(samples=2, rtol=0.0, inputs=InputOptions(seed=1)))
    assert v.passed and v.samples == 2
    lat = ot.bench(model, model, BenchConfig(runs=1, warmup=0))
    assert lat.runs == 1
