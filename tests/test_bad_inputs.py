"""Bad-input corpus (issues 2 and 3): every broken or hostile input gives one clear error line.

Each case builds its broken input in tmp_path and runs `onnx-tucker compress` (or inspect /
validate) in-process. For every failure we check the whole contract at once:

* the exit code (2 for usage errors, 1 otherwise, 130 for Ctrl-C, 143 for SIGTERM),
* stderr is exactly one line starting with "error: ", with "; " before the fix, naming the
  file or node and the problem (regexes per case), and no traceback anywhere,
* every file under tmp_path is byte-identical afterwards (the input, a previous OUT, a secret
  file outside the model's folder) and no new file appeared (no OUT, no temporary file).

A few inputs are deliberately NOT errors (NaN weights, zero-size weights, no decomposable
layer, an unsorted graph, a model only onnx.checker dislikes): those tests check what happens instead.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from onnx_tucker.cli import app
from onnx_tucker.errors import ModelLoadError
from onnx_tucker.graph import load as tio
from onnx_tucker.graph import save as tio_save
from tests.helpers import make_conv_model, make_gemm_model, make_small_cnn, save

runner = CliRunner()


# ---- the contract -------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under root -> sha256 of its bytes (or the target of a symlink, or 'dir')."""
    snap = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            snap[rel] = "link:" + os.readlink(p)
        elif p.is_dir():
            snap[rel] = "dir"
        else:
            snap[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return snap


def error_line(result) -> str:  # type: ignore[no-untyped-def]
    """The single stderr line of a failed run; fails the test if there is not exactly one."""
    text = result.stderr + result.stdout
    assert "Traceback" not in text, text
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one error line, got {lines!r}"
    line = lines[0]
    assert line.startswith("error: "), line
    assert "; " in line, f"no fix after '; ' in {line!r}"
    return line


@dataclass
class Case:
    """A broken input: the CLI args and the expected exit code and message patterns."""

    args: list[str]
    code: int
    patterns: list[str] = field(default_factory=list)


CASES: dict[str, Callable[[Path, pytest.MonkeyPatch], Case]] = {}


def case(fn: Callable[[Path, pytest.MonkeyPatch], Case]) -> Callable[[Path, pytest.MonkeyPatch], Case]:
    CASES[fn.__name__.removeprefix("case_")] = fn
    return fn


def paths(tmp: Path) -> tuple[Path, Path]:
    """IN in tmp/in, OUT in tmp/out (both folders exist)."""
    (tmp / "in").mkdir(exist_ok=True)
    (tmp / "out").mkdir(exist_ok=True)
    return tmp / "in" / "model.onnx", tmp / "out" / "model.tucker.onnx"


def good_model() -> onnx.ModelProto:
    return make_small_cnn(low_rank=True)


def compress_args(inp: Path, out: Path, *extra: str) -> list[str]:
    return ["compress", str(inp), str(out), "--samples", "2", *extra]


def std(tmp: Path, model: onnx.ModelProto | bytes, code: int, *patterns: str, extra: tuple[str, ...] = ()) -> Case:
    """The common shape: write `model` as IN, compress it to OUT."""
    inp, out = paths(tmp)
    inp.write_bytes(model if isinstance(model, bytes) else model.SerializeToString())
    return Case(compress_args(inp, out, *extra), code, [re.escape(inp.name), *patterns] if code == 1 else list(patterns))


# ---- the file itself ----------------------------------------------------------------------------


@case
def case_missing_file(tmp, mp):
    inp, out = paths(tmp)
    return Case(compress_args(inp.with_name("nope.onnx"), out), 1, ["nope.onnx", "no such file", "check the path"])


@case
def case_folder_as_input(tmp, mp):
    inp, out = paths(tmp)
    save(good_model(), inp)
    return Case(compress_args(inp.parent, out), 1, ["is a folder", "model.onnx"])


@case
def case_empty_file(tmp, mp):
    return std(tmp, b"", 1, "empty")


@case
def case_random_bytes(tmp, mp):
    return std(tmp, np.random.default_rng(7).bytes(4096), 1, "not a readable ONNX model", "re-export")


@case
def case_truncated_protobuf(tmp, mp):
    data = good_model().SerializeToString()
    return std(tmp, data[: len(data) // 2], 1, "not a readable ONNX model|not an ONNX model", "truncated|re-export")


@case
def case_pytorch_checkpoint(tmp, mp):
    return std(tmp, b"PK\x03\x04" + bytes(200), 1, "ZIP", "torch.onnx.export")


@case
def case_html_download_page(tmp, mp):
    return std(tmp, b"<!DOCTYPE html>\n<html><body>404 Not Found</body></html>\n", 1, "HTML", "download error page")


@case
def case_onnx_text_format(tmp, mp):
    text = onnx.printer.to_text(good_model()).encode()
    return std(tmp, text, 1, "ONNX text format", "onnx.parser")


@case
def case_tensorproto_not_model(tmp, mp):
    t = numpy_helper.from_array(np.ones((4, 4), np.float32), "t")
    return std(tmp, t.SerializeToString(), 1, "not (a readable ONNX|an ONNX) model")


@case
def case_graphproto_not_model(tmp, mp):
    return std(tmp, good_model().graph.SerializeToString(), 1, "not an ONNX model", "bare GraphProto", "make_model")


# ---- header: IR version and opsets --------------------------------------------------------------


@case
def case_no_ir_version(tmp, mp):
    m = good_model()
    m.ir_version = 0
    return std(tmp, m, 1, "no ir_version")


@case
def case_ir_version_too_new(tmp, mp):
    m = good_model()
    m.ir_version = 99
    return std(tmp, m, 1, "IR version 99", "upgrade onnx")


@case
def case_opset_too_new(tmp, mp):
    m = good_model()
    m.opset_import[0].version = 99
    return std(tmp, m, 1, "opset 99", "re-export|upgrade onnx")


@case
def case_opset_too_old(tmp, mp):
    m = good_model()
    m.opset_import[0].version = 6
    return std(tmp, m, 1, "opset 6", "oldest", "version_converter")


@case
def case_no_opset_import(tmp, mp):
    m = good_model()
    del m.opset_import[:]
    return std(tmp, m, 1, "no opset_import")


# ---- graph structure and onnx.checker -----------------------------------------------------------


@case
def case_checker_missing_conv_weight(tmp, mp):
    m = good_model()
    del m.graph.node[0].input[1:]  # Conv with only X: the checker rejects it, so does onnxruntime
    return std(tmp, m, 1, "fails onnx.checker", "node 'conv1' \\(Conv\\)", "input size 1")


@case
def case_checker_unknown_op(tmp, mp):
    m = good_model()
    m.graph.node[1].op_type = "Fooo"
    return std(tmp, m, 1, "fails onnx.checker", "node 'relu1'", "Fooo")


@case
def case_undefined_tensor(tmp, mp):
    m = good_model()
    m.graph.node[2].input[0] = "ghost"
    return std(tmp, m, 1, "node 'conv2' \\(Conv\\)", "'ghost'", "no node, initializer or graph input")


@case
def case_graph_output_never_computed(tmp, mp):
    m = good_model()
    m.graph.output.append(helper.make_tensor_value_info("nowhere", TensorProto.FLOAT, [1]))
    return std(tmp, m, 1, "graph output 'nowhere'")


@case
def case_duplicate_tensor_producer(tmp, mp):
    m = good_model()
    m.graph.node[1].output[0] = "h1"  # relu1 writes conv1's output again
    return std(tmp, m, 1, "tensor 'h1' is written by both node 'conv1' \\(Conv\\) and node 'relu1'", "one producer")


@case
def case_node_output_shadows_input(tmp, mp):
    m = good_model()
    m.graph.node[1].output[0] = "x"
    m.graph.node[2].input[0] = "x"
    return std(tmp, m, 1, "tensor 'x' is written by both graph input 'x' and node 'relu1'")


@case
def case_duplicate_node_names(tmp, mp):
    # Documented choice: onnxruntime refuses two nodes with one name, so we refuse up front.
    m = good_model()
    m.graph.node[2].name = "conv1"
    return std(tmp, m, 1, "two nodes are named 'conv1'", "unique name")


@case
def case_cycle(tmp, mp):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 4])
    nodes = [
        helper.make_node("Add", ["x", "c"], ["a"], name="add"),
        helper.make_node("Relu", ["a"], ["b"], name="relu"),
        helper.make_node("Neg", ["b"], ["c"], name="neg"),
    ]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return std(tmp, m, 1, "cycle", "add -> relu -> neg -> add", "acyclic")


# ---- tensor data and external data --------------------------------------------------------------


@case
def case_raw_data_wrong_size(tmp, mp):
    m = good_model()
    w = m.graph.initializer[0]
    w.raw_data = w.raw_data[:-8]
    return std(tmp, m, 1, "tensor 'conv1.W' holds \\d+ bytes", "needs \\d+", "corrupt")


@case
def case_typed_data_wrong_count(tmp, mp):
    m = good_model()
    b = m.graph.initializer[1]
    b.ClearField("raw_data")
    b.float_data.extend([0.5, 0.25])  # shape [16] but two values
    return std(tmp, m, 1, "tensor 'conv1.B' holds 2 values", "needs 16")


def with_external(tmp: Path) -> tuple[Path, Path]:
    """IN saved with every weight in tmp/in/weights.bin."""
    inp, out = paths(tmp)
    onnx.save(good_model(), str(inp), save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    return inp, out


def set_location(inp: Path, location: str) -> None:
    m = onnx.load(str(inp), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    inp.write_bytes(m.SerializeToString())


@case
def case_external_data_missing(tmp, mp):
    inp, out = with_external(tmp)
    (inp.parent / "weights.bin").unlink()
    return Case(compress_args(inp, out), 1, ["model.onnx", "external data file 'weights.bin'", "missing", "copy it"])


@case
def case_external_data_truncated(tmp, mp):
    inp, out = with_external(tmp)
    data = inp.parent / "weights.bin"
    data.write_bytes(data.read_bytes()[:100])
    return Case(compress_args(inp, out), 1, ["model.onnx", "'weights.bin' has 100 bytes", "truncated"])


@case
def case_external_data_escapes_folder(tmp, mp):
    inp, out = with_external(tmp)
    # A real file outside the model's folder: refused all the same, and left untouched.
    os.replace(inp.parent / "weights.bin", tmp / "secret.bin")
    set_location(inp, "../secret.bin")
    return Case(compress_args(inp, out), 1, ["model.onnx", "'../secret.bin' outside the model's folder", "refused"])


@case
def case_external_data_absolute_path(tmp, mp):
    inp, out = with_external(tmp)
    os.replace(inp.parent / "weights.bin", tmp / "secret.bin")
    set_location(inp, str(tmp / "secret.bin"))
    return Case(compress_args(inp, out), 1, ["outside the model's folder", "refused"])


@case
def case_external_data_symlink_out(tmp, mp):
    inp, out = with_external(tmp)
    os.replace(inp.parent / "weights.bin", tmp / "secret.bin")
    (inp.parent / "weights.bin").symlink_to(tmp / "secret.bin")  # inside by name, outside in fact
    return Case(compress_args(inp, out), 1, ["outside the model's folder", "refused"])


# ---- layers that cannot run ---------------------------------------------------------------------


@case
def case_conv_weight_wrong_channels(tmp, mp):
    m = make_conv_model(T=8, S=8)
    m.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 16  # W expects 8 input channels
    return std(tmp, m, 1, "node 'conv' \\(Conv\\)", "channels 8", "has 16", "inconsistent")


@case
def case_gemm_weight_wrong_k(tmp, mp):
    m = make_gemm_model(K=12, N=10)
    m.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 7
    return std(tmp, m, 1, "node 'fc' \\(Gemm\\)", "K 12", "has 7")


@case
def case_zero_size_input_dim(tmp, mp):
    m = make_conv_model(T=8, S=8)
    m.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 0
    return std(tmp, m, 2, "input 'x' has zero-size dimensions \\(1,0,9,9\\)", "--input-shape x:")


# ---- OUT ----------------------------------------------------------------------------------------


@case
def case_out_equals_in(tmp, mp):
    inp, _ = paths(tmp)
    save(good_model(), inp)
    return Case(compress_args(inp, inp), 2, ["refusing to overwrite", "another OUT"])


@case
def case_out_same_file_other_spelling(tmp, mp):
    inp, _ = paths(tmp)
    save(good_model(), inp)
    return Case(compress_args(inp, tmp / "out" / ".." / "in" / "model.onnx"), 2, ["refusing to overwrite"])


@case
def case_out_hard_link_to_in(tmp, mp):
    inp, out = paths(tmp)
    save(good_model(), inp)
    os.link(inp, out)
    return Case(compress_args(inp, out), 2, ["refusing to overwrite"])


@case
def case_out_symlink_to_in(tmp, mp):
    inp, out = paths(tmp)
    save(good_model(), inp)
    out.symlink_to(inp)
    return Case(compress_args(inp, out), 2, ["refusing to overwrite"])


@case
def case_out_in_missing_folder(tmp, mp):
    inp, out = paths(tmp)
    save(good_model(), inp)
    return Case(compress_args(inp, tmp / "nowhere" / "m.onnx"), 2, ["does not exist", "mkdir -p"])


@case
def case_out_is_folder(tmp, mp):
    inp, out = paths(tmp)
    save(good_model(), inp)
    return Case(compress_args(inp, out.parent), 2, ["is a folder", "file name"])


@case
def case_out_under_a_file(tmp, mp):
    inp, out = paths(tmp)
    save(good_model(), inp)
    return Case(compress_args(inp, inp / "m.onnx"), 2, ["is a file, not a folder"])


def fail_in_out_folder(mp: pytest.MonkeyPatch, tmp: Path, target: str, exc: BaseException, nth: int = 1) -> None:
    """Make `target` (tempfile.mkstemp / os.fsync / os.replace) raise `exc` on its nth call that
    touches tmp/out; every other call (onnxruntime, pytest) goes through."""
    out_dir = str((tmp / "out").resolve())
    module, name = (tempfile, "mkstemp") if target == "mkstemp" else (os, target)
    real = getattr(module, name)
    calls = [0]

    def fake(*args, **kwargs):  # type: ignore[no-untyped-def]
        where = kwargs.get("dir") if target == "mkstemp" else args[-1] if target == "replace" else None
        hit = where is not None and str(where).startswith(out_dir)
        if target == "fsync":  # fsync gets a descriptor: check the file it belongs to
            hit = os.readlink(f"/proc/self/fd/{args[0]}").startswith(out_dir)
        if hit:
            calls[0] += 1
            if calls[0] == nth:
                raise exc
        return real(*args, **kwargs)

    mp.setattr(module, name, fake)


def with_previous_out(tmp: Path) -> tuple[Path, Path]:
    inp, out = paths(tmp)
    save(good_model(), inp)
    out.write_bytes(b"previous OUT: must survive byte for byte")
    return inp, out


@case
def case_out_folder_not_writable(tmp, mp):
    # Tests run as root, where chmod does not stop writes: simulate the refusal instead.
    inp, out = paths(tmp)
    save(good_model(), inp)
    fail_in_out_folder(mp, tmp, "mkstemp", PermissionError(errno.EACCES, "Permission denied"))
    return Case(compress_args(inp, out), 1, ["model.tucker.onnx", "Permission denied", "writable folder"])


@case
def case_disk_full(tmp, mp):
    inp, out = with_previous_out(tmp)
    fail_in_out_folder(mp, tmp, "fsync", OSError(errno.ENOSPC, "No space left on device"))
    return Case(compress_args(inp, out), 1, ["model.tucker.onnx", "No space left", "nothing was written", "free some disk space"])


@case
def case_disk_full_on_report_after_model(tmp, mp):
    # OUT is staged first and the report second: the report's failure must take OUT down with it.
    inp, out = with_previous_out(tmp)
    fail_in_out_folder(mp, tmp, "fsync", OSError(errno.ENOSPC, "No space left on device"), nth=2)
    return Case(compress_args(inp, out, "--report", str(out.parent / "r.json")), 1, ["r.json", "No space left"])


@case
def case_rename_fails(tmp, mp):
    inp, out = with_previous_out(tmp)
    fail_in_out_folder(mp, tmp, "replace", OSError(errno.EIO, "Input/output error"))
    return Case(compress_args(inp, out), 1, ["model.tucker.onnx", "Input/output error"])


@case
def case_keyboard_interrupt_while_writing(tmp, mp):
    inp, out = with_previous_out(tmp)
    fail_in_out_folder(mp, tmp, "fsync", KeyboardInterrupt())
    return Case(compress_args(inp, out), 130, ["interrupted", "no partial output"])


@case
def case_report_is_out(tmp, mp):
    inp, out = paths(tmp)
    save(good_model(), inp)
    return Case(compress_args(inp, out, "--report", str(out)), 2, ["--report", "same file as OUT"])


@case
def case_report_is_in(tmp, mp):
    inp, out = paths(tmp)
    save(good_model(), inp)
    return Case(compress_args(inp, out, "--save-plan", str(inp)), 2, ["refusing to overwrite"])


# ---- plan files ---------------------------------------------------------------------------------


def plan_case(tmp: Path, text: str | None, *patterns: str) -> Case:
    inp, out = paths(tmp)
    save(good_model(), inp)
    plan = tmp / "in" / "plan.json"
    if text is not None:
        plan.write_text(text)
    return Case(compress_args(inp, out, "--plan", str(plan)), 1, ["plan.json", *patterns])


def plan_of(layers: list[dict]) -> str:
    return json.dumps({"format": "onnx-tucker-plan", "version": 1, "layers": layers})


@case
def case_plan_not_json(tmp, mp):
    return plan_case(tmp, "ranks: 3\n", "not a readable plan file", "--save-plan")


@case
def case_plan_missing(tmp, mp):
    return plan_case(tmp, None, "not found", "--save-plan")


@case
def case_plan_not_a_plan(tmp, mp):
    return plan_case(tmp, json.dumps({"layers": 3}), "not an onnx-tucker plan")


@case
def case_plan_for_another_model(tmp, mp):
    return plan_case(tmp, plan_of([{"name": "resnet.layer4.conv9", "kind": "svd", "ranks": [3]}]),
                     "'resnet.layer4.conv9' is not in this model", "another model")


@case
def case_plan_wrong_weight_shape(tmp, mp):
    return plan_case(tmp, plan_of([{"name": "conv2", "kind": "tucker2", "ranks": [4, 4], "weight_shape": [64, 32, 3, 3]}]),
                     "'conv2' has weight shape", "another model")


@case
def case_plan_ranks_too_big(tmp, mp):
    return plan_case(tmp, plan_of([{"name": "fc", "kind": "svd", "ranks": [500]}]), "ranks \\(500,\\) do not fit")


# ---- options ------------------------------------------------------------------------------------


def option_case(tmp: Path, *extra: str) -> Case:
    inp, out = paths(tmp)
    save(good_model(), inp)
    return Case(compress_args(inp, out, *extra), 2, [re.escape(extra[0])])


OPTION_ERRORS = {
    "input_shape_no_colon": (["--input-shape", "1,3,16,16"], "NAME:D0,D1"),
    "input_shape_not_integer": (["--input-shape", "x:1,a,16,16"], "integers"),
    "input_shape_zero_dim": (["--input-shape", "x:1,3,0,16"], "positive size"),
    "input_shape_unknown_name": (["--input-shape", "image:1,3,16,16"], "no input of that name; its inputs are: x"),
    "input_shape_wrong_rank": (["--input-shape", "x:1,3,16"], "4 dimensions, not 3"),
    "ranks_foo": (["--ranks", "foo"], "not understood"),
    "ranks_ratio_0": (["--ranks", "ratio:0"], "\\(0, 1\\]"),
    "ranks_ratio_2": (["--ranks", "ratio:2"], "\\(0, 1\\]"),
    "ranks_energy_abc": (["--ranks", "energy:abc"], "energy:F"),
    "rank_scale_0": (["--rank-scale", "0"], "must be > 0"),
    "min_rank_0": (["--min-rank", "0"], ">= 1"),
    "round_to_0": (["--round-to", "0"], ">= 1"),
    "bad_regex": (["--include", "conv("], "not a valid regular expression"),
    "samples_not_int": (["--samples", "abc"], "valid integer"),
    "unknown_option": (["--rnaks", "vbmf"], "No such option"),
}


def _option(extra: list[str], pattern: str) -> Callable[[Path, pytest.MonkeyPatch], Case]:
    def make(tmp: Path, mp: pytest.MonkeyPatch) -> Case:
        c = option_case(tmp, *extra)
        c.patterns.append(pattern)
        return c
    return make


for _name, (_extra, _pattern) in OPTION_ERRORS.items():
    CASES[_name] = _option(_extra, _pattern)


@case
def case_missing_out_argument(tmp, mp):
    inp, _ = paths(tmp)
    save(good_model(), inp)
    return Case(["compress", str(inp)], 2, ["Missing argument", "--help"])


@case
def case_inspect_on_random_bytes(tmp, mp):
    inp, _ = paths(tmp)
    inp.write_bytes(np.random.default_rng(3).bytes(512))
    return Case(["inspect", str(inp)], 1, ["model.onnx", "not a readable ONNX model"])


@case
def case_validate_truncated_compressed(tmp, mp):
    inp, out = paths(tmp)
    save(good_model(), inp)
    data = inp.read_bytes()
    out.write_bytes(data[: len(data) // 3])
    return Case(["validate", str(inp), str(out), "--samples", "2"], 1, ["model.tucker.onnx", "not a readable ONNX model"])


# ---- issue 16 item 7: user text is printed verbatim (rich read ':fire:' as an emoji) ----------------


@case
def case_calibrate_path_with_emoji_codes(tmp, mp):
    inp, out = paths(tmp)
    save(good_model(), inp)
    return Case(compress_args(inp, out, "--calibrate", str(tmp / "in" / "run:fire:1.npz")), 2,
                ["--calibrate", "in/run:fire:1\\.npz: no such file"])


@case
def case_ranks_data_colon_abc(tmp, mp):
    inp, out = paths(tmp)
    save(good_model(), inp)
    return Case(compress_args(inp, out, "--ranks", "data:abc"), 2, ["--ranks data:abc: not understood"])


# ---- issue 16 item 9: SIGTERM is Ctrl-C with exit 143 (tests/test_files_signals.py: a real signal) -----


@case
def case_sigterm_while_writing(tmp, mp):
    from onnx_tucker.errors import Terminated

    inp, out = with_previous_out(tmp)
    fail_in_out_folder(mp, tmp, "fsync", Terminated())
    return Case(compress_args(inp, out), 143, ["terminated \\(SIGTERM\\)", "no partial output"])


# ---- issue 16: nothing wrong reported as success -------------------------------------------------


def nan_weight_model() -> onnx.ModelProto:
    """One NaN (and one Inf) in conv2's weight: the layer is skipped, every output is NaN."""
    m = good_model()
    w = numpy_helper.to_array(m.graph.initializer[2]).copy()  # conv2.W
    w[0, 0, 0, 0], w[1, 0, 0, 0] = np.nan, np.inf
    m.graph.initializer[2].CopyFrom(numpy_helper.from_array(w, "conv2.W"))
    return m


@case
def case_nan_outputs_fail_compress_validation(tmp, mp):
    c = std(tmp, nan_weight_model(), 1, "output 'logits' is not finite", r"original 20 NaN / 0 Inf",
            "was not written", "--no-validate")
    c.args += ["--rtol", "1e-4"]
    return c


@case
def case_validate_two_all_nan_models(tmp, mp):
    inp, out = paths(tmp)
    save(nan_weight_model(), inp)
    save(nan_weight_model(), out)
    return Case(["validate", str(inp), str(out), "--samples", "2", "--rtol", "1e-6"], 1,
                ["model.tucker.onnx", "output 'logits' is not finite", "compressed 20 NaN / 0 Inf of 20 values"])


def unrelated_pair(tmp: Path) -> tuple[Path, Path]:
    """Same input and output names, types and ranks, other sizes (1 channel, 12x12, 5 classes)."""
    inp, out = paths(tmp)
    save(good_model(), inp)
    save(make_small_cnn(in_ch=1, spatial=(12, 12), classes=5, low_rank=True), out)
    return inp, out


@case
def case_report_on_unrelated_models(tmp, mp):
    inp, out = unrelated_pair(tmp)
    return Case(["report", str(inp), str(out), "--runtimes", "ort", "--samples", "2"], 2,
                [re.escape(out.name), r"its inputs \[x \(float \[1,1,12,12\]\)\] differ from those of", "compressed version"])


@case
def case_validate_on_unrelated_models(tmp, mp):
    inp, out = unrelated_pair(tmp)
    return Case(["validate", str(inp), str(out), "--samples", "2"], 2, [re.escape(out.name), "its inputs", "differ"])


@case
def case_report_on_models_with_other_outputs(tmp, mp):
    inp, out = paths(tmp)
    save(good_model(), inp)
    save(make_small_cnn(classes=5, low_rank=True), out)
    return Case(["report", str(inp), str(out), "--runtimes", "ort", "--samples", "2"], 2,
                [r"its outputs \[logits \(float \[1,5\]\)\] differ"])


# ---- data files (issue 16 items 3, 4): one line naming the file and the problem, exit 2 --------------


def data_case(tmp: Path, write: Callable[[Path], None], *patterns: str, option: str = "--calibrate",
              extra: tuple[str, ...] = ()) -> Case:
    inp, out = paths(tmp)
    save(good_model(), inp)
    data = tmp / "in" / "data.npz"
    write(data)
    return Case(compress_args(inp, out, option, str(data), *extra), 2, [re.escape(option), "data\\.npz", *patterns])


def _pixels(dtype: type) -> Callable[[Path], None]:
    return lambda p: np.savez(p, x=np.random.default_rng(0).integers(0, 256, (4, 3, 16, 16)).astype(dtype))


def _floats_with(value: float, count: int | None = 1) -> Callable[[Path], None]:
    def write(p: Path) -> None:
        x = np.random.default_rng(0).random((4, 3, 16, 16)).astype(np.float32)
        x.reshape(-1)[: x.size if count is None else count] = value
        np.savez(p, x=x)
    return write


@case
def case_calibrate_uint8_pixels_undeclared(tmp, mp):
    return data_case(tmp, _pixels(np.uint8), "'x' holds integers \\(uint8\\)", "--scale 1", "--scale 255")


@case
def case_calibrate_int64_pixels_undeclared(tmp, mp):
    return data_case(tmp, _pixels(np.int64), "int64", "--scale")


@case
def case_validate_data_uint8_undeclared(tmp, mp):
    return data_case(tmp, _pixels(np.uint8), "uint8", "--scale", option="--data")


@case
def case_calibrate_one_nan(tmp, mp):
    return data_case(tmp, _floats_with(np.nan), "'x' has 1 NaN and 0 Inf", "in 1 sample")


@case
def case_calibrate_all_inf(tmp, mp):
    return data_case(tmp, _floats_with(np.inf, None), "0 NaN and 3,072 Inf", "in 4 sample")


@case
def case_validate_data_nan(tmp, mp):
    return data_case(tmp, _floats_with(np.nan, 5), "5 NaN", option="--data")


@case
def case_calibrate_truncated_npz(tmp, mp):
    def write(p: Path) -> None:
        _floats_with(0.5, 0)(p)
        p.write_bytes(p.read_bytes()[:3000])
    return data_case(tmp, write, "truncated or damaged \\.npz", "numpy\\.savez")


@case
def case_calibrate_random_bytes_npz(tmp, mp):
    def write(p: Path) -> None:
        p.write_bytes(np.random.default_rng(1).bytes(4096))
    return data_case(tmp, write, "not a readable \\.npz file", "^(?!.*pickle)")


@case
def case_calibrate_npy_named_npz(tmp, mp):
    return data_case(tmp, lambda p: p.write_bytes(_npy_bytes()), "single \\.npy array", "numpy\\.savez")


def _npy_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.zeros((4, 3, 16, 16), np.float32))
    return buf.getvalue()


@case
def case_scale_not_positive(tmp, mp):
    c = option_case(tmp, "--scale", "0")
    c.patterns.append("must be a positive number")
    return c


# ---- issue 16 item 8: options named, plan files checked, unreadable inputs exit 1 ----------------


def deny_reading(mp: pytest.MonkeyPatch, path: Path) -> None:
    """Make `path` unreadable as it would be to a user without permission (tests run as root, where
    chmod 000 stops nothing): os.access says no (typer's check) and open() raises (the library's)."""
    import builtins

    target = str(path.resolve())
    real_access, real_open = os.access, builtins.open

    def access(p, mode, *a, **k):  # type: ignore[no-untyped-def]
        if mode & os.R_OK and os.path.realpath(p) == target:
            return False
        return real_access(p, mode, *a, **k)

    def fake_open(file, *a, **k):  # type: ignore[no-untyped-def]
        if isinstance(file, str | os.PathLike) and os.path.realpath(file) == target:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *a, **k)

    mp.setattr(os, "access", access)
    mp.setattr(builtins, "open", fake_open)


@case
def case_unreadable_input(tmp, mp):
    inp, out = paths(tmp)
    save(good_model(), inp)
    deny_reading(mp, inp)
    return Case(compress_args(inp, out), 1, ["model.onnx", "cannot read the file \\(Permission denied\\)", "check its permissions"])


@case
def case_unreadable_compressed_in_validate(tmp, mp):
    inp, out = paths(tmp)
    save(good_model(), inp)
    save(good_model(), out)
    deny_reading(mp, out)
    return Case(["validate", str(inp), str(out), "--samples", "2"], 1, ["model.tucker.onnx", "cannot read the file"])


@case
def case_report_in_read_only_folder(tmp, mp):
    inp, out = paths(tmp)
    save(good_model(), inp)
    ro = tmp / "ro"
    ro.mkdir()
    real_access = os.access
    mp.setattr(os, "access", lambda p, mode, *a, **k: False if mode & os.W_OK and Path(p) == ro.resolve()
               else real_access(p, mode, *a, **k))
    return Case(compress_args(inp, out, "--report", str(ro / "r.json")), 1,
                ["^error: --report .*r.json: the folder .*ro is not writable", "choose another --report path"])


@case
def case_save_plan_is_in(tmp, mp):
    inp, out = paths(tmp)
    save(good_model(), inp)
    return Case(compress_args(inp, out, "--save-plan", str(inp)), 2,
                ["^error: --save-plan .*model.onnx: output is the input file", "choose another --save-plan path"])


@case
def case_inspect_report_is_in(tmp, mp):
    inp, _ = paths(tmp)
    save(good_model(), inp)
    return Case(["inspect", str(inp), "--report", str(inp)], 2, ["^error: --report ", "choose another --report path"])


@case
def case_plan_without_layers(tmp, mp):
    return plan_case(tmp, json.dumps({"format": "onnx-tucker-plan", "version": 1}), "no 'layers' list", "--save-plan")


@case
def case_plan_layers_not_a_list(tmp, mp):
    return plan_case(tmp, json.dumps({"format": "onnx-tucker-plan", "version": 1, "layers": {"fc": 3}}),
                     "'layers' is a dict, not a list")


@case
def case_plan_fractional_rank(tmp, mp):
    return plan_case(tmp, plan_of([{"name": "fc", "kind": "svd", "ranks": [8.7]}]), "malformed layer entry", "whole numbers")


@case
def case_plan_rank_as_text(tmp, mp):
    return plan_case(tmp, plan_of([{"name": "fc", "kind": "svd", "ranks": ["8"]}]), "malformed layer entry")


@case
def case_plan_unknown_version(tmp, mp):
    text = json.dumps({"format": "onnx-tucker-plan", "version": 99, "layers": []})
    return plan_case(tmp, text, "plan format version 99 is not known", "--save-plan")


OPTION_ERRORS.update({
    "target_nan": (["--target", "macs:nan"], "not understood; use macs:F, params:F, latency:F or agreement:F"),
    "target_unknown_metric": (["--target", "flops:0.3"], "agreement:F"),
})
for _name in ("target_nan", "target_unknown_metric"):
    CASES[_name] = _option(*OPTION_ERRORS[_name])


# ---- the corpus test ----------------------------------------------------------------------------


def test_corpus_is_big_enough() -> None:
    assert len(CASES) >= 20


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = CASES[name](tmp_path, monkeypatch)
    before = snapshot(tmp_path)
    result = runner.invoke(app, c.args)
    monkeypatch.undo()
    assert result.exit_code == c.code, (result.exit_code, result.stderr, result.stdout)
    line = error_line(result)
    for pattern in c.patterns:
        assert re.search(pattern, line), f"{pattern!r} not in {line!r}"
    assert snapshot(tmp_path) == before, "files changed, appeared or were left behind"


# ---- through a real process: exit codes and stderr of the installed command ---------------------


@pytest.mark.parametrize(
    ("name", "code"), [("random_bytes", 1), ("out_equals_in", 2), ("samples_not_int", 2), ("cycle", 1)]
)
def test_bad_input_subprocess(name: str, code: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = CASES[name](tmp_path, monkeypatch)
    before = snapshot(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "onnx_tucker.cli", *c.args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert snapshot(tmp_path) == before


# ---- inputs that are deliberately not errors ----------------------------------------------------


def run_ok(tmp: Path, model: onnx.ModelProto, *extra: str):  # type: ignore[no-untyped-def]
    inp, out = paths(tmp)
    save(model, inp)
    digest = hashlib.sha256(inp.read_bytes()).hexdigest()
    report = tmp / "out" / "report.json"
    result = runner.invoke(app, compress_args(inp, out, "--report", str(report), *extra))
    assert result.exit_code == 0, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert hashlib.sha256(inp.read_bytes()).hexdigest() == digest
    onnx.checker.check_model(onnx.load(str(out)))
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]
    return result, json.loads(report.read_text()), out


def test_nan_weights_skip_the_layer_with_a_reason(tmp_path: Path) -> None:
    # --no-validate: the outputs are NaN, which fails validation (issue 16 item 1, cases above).
    _, rep, _ = run_ok(tmp_path, nan_weight_model(), "--no-validate")
    layers = {lay["name"]: lay for lay in rep["layers"]}
    assert layers["conv2"]["kind"] == "skip"
    assert "2 NaN/Inf" in layers["conv2"]["reason"]
    assert any(lay["kind"] != "skip" for lay in rep["layers"])  # the healthy layers still compress


def test_zero_size_weight_skips_the_layer(tmp_path: Path) -> None:
    m = make_conv_model(T=8, S=8, bias=False)
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.zeros((0, 8, 3, 3), np.float32), "W"))
    m.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 0
    _, rep, _ = run_ok(tmp_path, m, "--no-validate")
    assert rep["layers"][0]["kind"] == "skip"
    assert "zero-size" in rep["layers"][0]["reason"]


def test_no_decomposable_layer_writes_an_unchanged_copy(tmp_path: Path) -> None:
    # Documented choice: exit 0, a note on stderr, OUT a copy of the model.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    m = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g", [x], [y]),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    result, rep, out = run_ok(tmp_path, m)
    assert "no layer of" in result.stderr and "unchanged copy" in result.stderr
    assert onnx.load(str(out)).graph == m.graph
    assert rep["layers"] == []


def test_unsorted_graph_is_sorted_not_refused(tmp_path: Path) -> None:
    # onnxruntime runs graphs whose nodes are out of order; so do we (onnx.checker alone would refuse).
    m = good_model()
    nodes = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(reversed(nodes))
    _, rep, out = run_ok(tmp_path, m)
    assert sum(lay["kind"] != "skip" for lay in rep["layers"]) >= 1
    names = [n.name for n in onnx.load(str(out)).graph.node]
    assert names.index("gap") < names.index("flatten")


def test_model_only_onnx_checker_rejects_is_loaded(tmp_path: Path) -> None:
    # A graph output typed without a shape: onnx.checker refuses it, onnxruntime runs it.
    m = good_model()
    m.graph.output[0].type.tensor_type.ClearField("shape")
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(m)
    path = save(m, tmp_path / "m.onnx")
    assert len(tio.load_model(path).graph.node) == len(m.graph.node)


def test_in_memory_model_is_checked_too(tmp_path: Path) -> None:
    from onnx_tucker import api

    m = good_model()
    m.graph.node[2].input[0] = "ghost"
    with pytest.raises(ModelLoadError, match="model: node 'conv2' \\(Conv\\) reads tensor 'ghost'"):
        api.compress(m)


def test_external_data_model_round_trips(tmp_path: Path) -> None:
    inp, out = with_external(tmp_path)
    m = tio.load_model(inp)
    ref = onnx.load(str(inp))
    assert [numpy_helper.to_array(t).tobytes() for t in m.graph.initializer] == [
        numpy_helper.to_array(t).tobytes() for t in ref.graph.initializer
    ]
    tio_save.save_model(m, out, inp, external_data=True)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.tucker.onnx", "model.tucker.onnx.data"]
    back = tio.load_model(out)
    assert [t.name for t in back.graph.initializer] == [t.name for t in ref.graph.initializer]
    assert all(np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
               for a, b in zip(back.graph.initializer, ref.graph.initializer, strict=True))
    # The in-memory model handed to save_model is left as it was (weights inline).
    assert all(t.data_location == TensorProto.DEFAULT and t.HasField("raw_data") for t in m.graph.initializer)


def test_output_batch_discards_everything_on_failure(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("old")
    before = snapshot(tmp_path)
    with pytest.raises(RuntimeError), tio_save.OutputBatch() as batch:
        batch.add_text(tmp_path / "a.txt", "new a")
        batch.add_text(tmp_path / "b.txt", "new b")
        raise RuntimeError("stop before commit")
    assert snapshot(tmp_path) == before


def test_nan_outputs_are_in_the_report_and_block_the_write(tmp_path: Path) -> None:
    # Issue 16 item 1: the JSON and Markdown reports say why; the model is not written.
    inp, out = paths(tmp_path)
    save(nan_weight_model(), inp)
    report, md = tmp_path / "out" / "r.json", tmp_path / "out" / "r.md"
    result = runner.invoke(app, compress_args(inp, out, "--report", str(report), "--markdown", str(md)))
    assert result.exit_code == 1 and "is not finite" in error_line(result)
    assert not out.exists()
    v = json.loads(report.read_text())["validation"]
    assert v["status"] == "failed" and not v["passed"]
    assert "output 'logits' is not finite" in v["problem"]
    assert v["outputs"][0]["nan_original"] == 20 and v["outputs"][0]["top1_agreement"] is None
    assert "**Failed:** output 'logits' is not finite" in md.read_text()
    assert "NaN/Inf" in result.stdout and "failed" in result.stdout


def test_nan_outputs_fail_validation_in_the_library() -> None:
    from onnx_tucker.runtime.validate import compare_outputs

    a = np.zeros((4, 3))
    b = a.copy()
    b[0, 0] = np.inf
    o = compare_outputs("y", a, a.copy())
    assert o.finite and o.passes(1e-6)
    bad = compare_outputs("y", a, b)
    assert not bad.finite and not bad.passes(None) and (bad.inf_original, bad.inf_compressed) == (0, 1)
    same_nan = compare_outputs("y", np.full((2, 2), np.nan), np.full((2, 2), np.nan))
    assert same_nan.max_abs_error == 0 and not same_nan.passes(1.0)
