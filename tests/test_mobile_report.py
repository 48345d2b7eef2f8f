"""The mobile validation report (`onnx-tucker report`, `onnx_tucker.mobile_report`): each installed
runtime converts, runs and agrees with onnxruntime on a tiny conv net and its compressed version;
a runtime that crashes, hangs or refuses is a finding, not an exception; the HTML holds the plots
and tables; the Markdown shows the numbers of the JSON; bad input gives one clear error.

Runtimes that are not installed are skipped (`pip install -e '.[mobile]'` installs them).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

import onnx_tucker as ot
from onnx_tucker.cli import app
from onnx_tucker.errors import ModelLoadError, UsageError
from onnx_tucker.mobile import adapters
from onnx_tucker.mobile.adapters import ConversionFailed, OrtAdapter
from tests.helpers import make_conv_model, make_small_cnn, save

runner = CliRunner()
RUNTIMES = ("ort", "ort-mobile", "mnn", "ncnn")
# How closely each runtime must compute a model as onnxruntime does: ncnn stores weights as fp16 (pnnx).
FIDELITY = {"ort": 1e-5, "ort-mobile": 1e-5, "mnn": 1e-4, "ncnn": 1e-2}
FAST = ot.BenchConfig(threads=1, warmup=1, runs=3)


def installed(name: str) -> bool:
    modules = {"ort": ("onnxruntime",), "ort-mobile": ("onnxruntime",), "mnn": ("MNN",), "ncnn": ("ncnn", "pnnx")}[name]
    return all(importlib.util.find_spec(m) is not None for m in modules)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny conv net (conv, conv stride 2, pool, flatten, fc) and its EVBMF compression."""
    folder = tmp_path_factory.mktemp("mobile")
    original = save(make_small_cnn(low_rank=True), folder / "cnn.onnx")
    compressed = folder / "cnn.tucker.onnx"
    result = ot.compress(original, ot.CompressionConfig(), output=compressed)
    assert result.decomposed_layers >= 2
    return original, compressed


@pytest.fixture(scope="module")
def report(pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[ot.MobileReport, Path]:
    folder = tmp_path_factory.mktemp("reports")
    rep = ot.mobile_report(*pair, runtimes=RUNTIMES, bench_config=FAST, html=folder / "r.html",
                           markdown=folder / "r.md", json_path=folder / "r.json")
    return rep, folder


# ---- each installed runtime -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", RUNTIMES)
def test_each_installed_runtime_converts_runs_and_agrees_with_onnxruntime(name: str, report) -> None:  # type: ignore[no-untyped-def]
    if not installed(name):
        pytest.skip(f"{name} is not installed (pip install -e '.[mobile]')")
    rep, _ = report
    r = rep.runtime(name)
    assert r is not None and r.status == "ok", r
    assert r.passed(rep.rtol)
    for run in (r.original, r.compressed):
        assert run is not None and run.converted and run.ran and run.failure is None
        assert run.size_bytes and run.size_bytes > 0
        assert run.fidelity_rel_error is not None and run.fidelity_rel_error <= FIDELITY[name], (name, run.fidelity_rel_error)
        assert run.top1_agreement is not None
    # The original in the runtime is the original: it matches onnxruntime's original.
    assert r.original.max_rel_error <= FIDELITY[name]  # type: ignore[union-attr, operator]
    # The compressed model differs from the original the same way in every runtime.
    ort_err = rep.runtime("ort").compressed.max_rel_error  # type: ignore[union-attr]
    assert r.compressed.max_rel_error == pytest.approx(ort_err, rel=0.05, abs=FIDELITY[name])  # type: ignore[union-attr]
    assert r.timing is not None and r.timing.runs == 3
    assert r.timing.original_median > 0 and r.timing.compressed_median > 0
    assert r.timing.original_p10 <= r.timing.original_median <= r.timing.original_p90


def test_ort_mobile_reports_partitions_ops_and_a_verdict(report) -> None:  # type: ignore[no-untyped-def]
    rep, folder = report
    a = rep.runtime("ort-mobile").ort_mobile
    assert a is not None and a.failure is None
    eps = {(p.ep, p.fixed_shapes) for p in a.compressed}
    assert ("NNAPI", True) in eps and ("CoreML MLProgram", False) in eps
    for p in a.original + a.compressed:
        assert 0 <= p.supported_nodes <= p.nodes and p.suitability in ("YES", "MAYBE", "NO")
    # The compressed net has more Conv nodes than the original: more nodes to partition.
    nnapi = {p.fixed_shapes: p for p in a.compressed if p.ep == "NNAPI"}
    assert nnapi[True].nodes > next(p.nodes for p in a.original if p.ep == "NNAPI" and p.fixed_shapes)
    assert a.original_ops and a.compressed_ops
    data = json.loads((folder / "r.json").read_text())
    ortm = next(r for r in data["runtimes"] if r["name"] == "ort-mobile")["ort_mobile"]
    assert ortm["verdict"].startswith("The compressed model is")
    assert ortm["added_ops"] == list(a.added_ops)


# ---- runtimes that fail are findings -------------------------------------------------------------------


class CopyingAdapter(OrtAdapter):
    """onnxruntime, with each model copied into its work folder (named after its role)."""

    name = "fake"
    label = "fake runtime"

    def convert(self, onnx_path, workdir, input_shapes):  # type: ignore[no-untyped-def]
        target = Path(workdir) / "model.onnx"
        target.write_bytes(Path(onnx_path).read_bytes())
        return [str(target)], {}


class SegfaultingAdapter(CopyingAdapter):
    """Crashes the process (as ncnn does on a graph it could not load) on the compressed model only."""

    def load(self, files, threads, input_names, output_names):  # type: ignore[no-untyped-def]
        if "compressed" in files[0]:
            os.kill(os.getpid(), signal.SIGSEGV)
        return super().load(files, threads, input_names, output_names)


class HangingAdapter(CopyingAdapter):
    def convert(self, onnx_path, workdir, input_shapes):  # type: ignore[no-untyped-def]
        time.sleep(60)
        return super().convert(onnx_path, workdir, input_shapes)


class RefusingAdapter(CopyingAdapter):
    """A converter without an operator both models use."""

    def convert(self, onnx_path, workdir, input_shapes):  # type: ignore[no-untyped-def]
        raise ConversionFailed("op GlobalAveragePool is not supported")


class AbsentAdapter(OrtAdapter):
    modules = ("no_such_runtime_module_xyz",)
    install = "pip install no-such-runtime"


@pytest.fixture
def fake_runtime(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    def register(cls: type) -> str:
        monkeypatch.setitem(adapters.ADAPTERS, "fake", f"{__name__}:{cls.__name__}")
        return "fake"

    return register


def test_a_runtime_that_segfaults_is_reported_not_raised(pair, fake_runtime) -> None:  # type: ignore[no-untyped-def]
    rep = ot.mobile_report(*pair, runtimes=["ort", fake_runtime(SegfaultingAdapter)], bench_config=FAST)
    r = rep.runtime("fake")
    assert r is not None and r.status == "failed"
    assert r.original is not None and r.original.ran  # the crash on the other model cost nothing
    assert r.compressed is not None and r.compressed.failed_step == "run"
    assert r.compressed.failure == "crashed (signal 11, SIGSEGV)"
    assert r.fails_on_original_too is False
    assert r.timing is None
    assert rep.failed_runtimes == ("fake",)
    assert rep.runtime("ort").status == "ok"  # type: ignore[union-attr]


def test_a_runtime_that_hangs_times_out(pair, fake_runtime) -> None:  # type: ignore[no-untyped-def]
    rep = ot.mobile_report(*pair, runtimes=[fake_runtime(HangingAdapter)], bench_config=FAST, timeout=1.5)
    r = rep.runtime("fake")
    assert r.original.failure == r.compressed.failure == "timed out after 1.5 s"  # type: ignore[union-attr]
    assert r.fails_on_original_too is True  # type: ignore[union-attr]


def test_a_converter_refusal_is_reported_with_its_message(pair, fake_runtime, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Exit 0 (a finding) unless --strict; the report is written either way."""
    fake_runtime(RefusingAdapter)
    out = tmp_path / "r.md"
    strict = runner.invoke(app, ["report", str(pair[0]), str(pair[1]), "--runtimes", "fake", "--strict", "-q", "--markdown", str(out)])
    assert strict.exit_code == 1
    assert "--strict: runtime(s) fake did not pass" in strict.output
    assert "failed at convert: op GlobalAveragePool is not supported" in out.read_text()
    rep = ot.mobile_report(*pair, runtimes=["fake"])
    assert rep.runtime("fake").original.failure == "op GlobalAveragePool is not supported"  # type: ignore[union-attr]


def test_a_runtime_not_installed_is_listed_with_its_pip_command(pair, fake_runtime) -> None:  # type: ignore[no-untyped-def]
    rep = ot.mobile_report(*pair, runtimes=[fake_runtime(AbsentAdapter)], bench_config=FAST)
    r = rep.runtime("fake")
    assert r.status == "not installed" and r.install == "pip install no-such-runtime"  # type: ignore[union-attr]
    assert "not installed (pip install no-such-runtime)" in ot.report.mobile.mobile_markdown(rep)


@pytest.mark.skipif(not installed("ncnn"), reason="ncnn / pnnx not installed")
def test_ncnn_on_a_strided_slice_is_a_finding(tmp_path: Path) -> None:
    """The CIFAR ResNets' option-A shortcut x[:, :, ::2, ::2]: pnnx emits Tensor.slice, which ncnn
    lacks (its extract then segfaults): reported, on the original as well."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    consts = [onnx.numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
              (("starts", [0, 0]), ("ends", [8, 8]), ("axes", [2, 3]), ("steps", [2, 2]))]
    conv = make_conv_model(T=8, S=8, pads=[1, 1, 1, 1], spatial=(4, 4))
    nodes = [helper.make_node("Slice", ["x", "starts", "ends", "axes", "steps"], ["s"], name="slice"),
             helper.make_node("Conv", ["s", "W", "B"], ["y"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "sliced", [x], [y], initializer=list(conv.graph.initializer) + consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    a = save(model, tmp_path / "a.onnx")
    b = save(model, tmp_path / "b.onnx")
    rep = ot.mobile_report(a, b, runtimes=["ncnn"], bench_config=FAST, timeout=60)
    r = rep.runtime("ncnn")
    assert r is not None and r.status == "failed"
    assert r.original is not None and r.original.failure is not None
    assert "Tensor.slice" in r.original.failure or "crashed" in r.original.failure


# ---- the report files ----------------------------------------------------------------------------------


class _Html(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: dict[str, int] = {}
        self.text: list[str] = []
        self.headers: list[str] = []
        self.links: list[str] = []
        self._in_th = False

    def handle_starttag(self, tag, attrs):  # type: ignore[no-untyped-def]
        self.tags[tag] = self.tags.get(tag, 0) + 1
        self._in_th = tag == "th"
        self.links += [v or "" for k, v in attrs if k in ("src", "href")]

    def handle_endtag(self, tag):  # type: ignore[no-untyped-def]
        if tag == "th":
            self._in_th = False

    def handle_data(self, data):  # type: ignore[no-untyped-def]
        self.text.append(data)
        if self._in_th:
            self.headers.append(data)


def test_the_html_is_self_contained_with_tables_and_plots(report) -> None:  # type: ignore[no-untyped-def]
    rep, folder = report
    page = _Html()
    page.feed((folder / "r.html").read_text())
    assert page.links == []  # nothing to fetch: it opens anywhere as it is
    assert page.tags.get("svg", 0) == 3  # MACs per layer, ranks vs channels, latency per runtime
    assert page.tags.get("rect", 0) > 10 and page.tags.get("circle", 0) >= 2
    assert page.tags.get("table", 0) >= 4  # whole model, runtimes, ORT mobile partitions, layers
    text = " ".join(page.text)
    for title in ("MACs per layer", "Chosen ranks against channel counts", "Latency per runtime", "Whole model",
                  "Validation per runtime", "ORT mobile", "Layers"):
        assert title in text
    for header in ("before", "after", "ratio", "kind", "ranks (out/in)", "rel. err", "median ms", "p10-p90 ms"):
        assert header in page.headers
    for p in rep.plan.layers:
        assert p.name in text


def test_json_help_names_the_keys_the_report_writes(report) -> None:  # type: ignore[no-untyped-def]
    # The JSON report is --report here too (issue 16 item 15); --json is a hidden alias.
    _, folder = report
    text = " ".join(runner.invoke(app, ["report", "--help"], env={"COLUMNS": "200"}).stdout.split())
    m = re.search(r"--report <path> .*?\(keys: ([a-z_, ]+)\)", text) or re.search(r"--report \S+ .*?\(keys: ([a-z_, ]+)\)", text)
    assert m, text
    assert [k.strip() for k in m.group(1).split(",")] == list(json.loads((folder / "r.json").read_text()))


def _md_rows(md: str, first_header: str) -> list[list[str]]:
    lines = md.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first_header} |"))
    rows = []
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", ln)[1:-1]])
    return rows


def test_the_markdown_shows_the_numbers_of_the_json(report) -> None:  # type: ignore[no-untyped-def]
    _, folder = report
    data = json.loads((folder / "r.json").read_text())
    md = (folder / "r.md").read_text()
    rows = _md_rows(md, "runtime")
    by_key = {(r[0], r[1]): r for r in rows}
    checked = 0
    for rt in data["runtimes"]:
        if rt["status"] == "not installed":
            continue
        for role in ("original", "compressed"):
            run, row = rt[role], by_key[(rt["label"], role)]
            assert row[4] == f"{run['max_rel_error']:.3g}"
            assert row[9] == f"{run['fidelity_rel_error']:.3g}"
            assert row[6] == f"{100 * run['top1_agreement']:.1f}%"
            median = rt["latency"][f"{role}_median_ms"]
            assert row[10] == f"{median:.3f}"
            checked += 1
    assert checked >= 4
    whole = {r[0]: r for r in _md_rows(md, "")}
    t = data["totals"]
    assert whole["MACs"][3] == f"x{t['macs_before'] / t['macs_after']:.2f}"
    for rt in data["runtimes"]:
        if rt["latency"]:
            row = next(v for k, v in whole.items() if k.startswith(f"{rt['label']} latency"))
            assert row[3] == f"x{rt['latency']['speedup']:.2f}"
    layers = {r[0]: r for r in _md_rows(md, "layer")}
    for layer in data["layers"]:
        assert layers[layer["name"]][2] == layer["kind"]


def test_compress_writes_a_mobile_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from onnx_tucker.mobile import build

    monkeypatch.setattr(build, "DEFAULT_RUNTIMES", ("ort",))  # the other runtimes are tested above
    src = save(make_small_cnn(low_rank=True), tmp_path / "m.onnx")
    html = tmp_path / "mobile.html"
    result = runner.invoke(app, ["compress", str(src), str(tmp_path / "m.t.onnx"), "--mobile-report", str(html), "--runs", "2", "-q"])
    assert result.exit_code == 0, result.output
    assert "<svg" in html.read_text() and "as compressed" in html.read_text()


# ---- data: the shared loader's three layouts -------------------------------------------------------------


def _images(folder: Path, count: int, rng: np.random.Generator) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")


@pytest.mark.parametrize("layout", ["npz", "classes", "flat"])
def test_data_in_each_layout_of_the_shared_loader(pair, tmp_path: Path, layout: str) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    if layout == "npz":
        data = tmp_path / "d.npz"
        np.savez(data, x=rng.standard_normal((5, 3, 16, 16)).astype(np.float32), labels=rng.integers(0, 10, 5))
    elif layout == "classes":
        data = tmp_path / "imgs"
        _images(data / "cat", 2, rng)
        _images(data / "dog", 3, rng)
    else:
        data = tmp_path / "flat"
        _images(data, 4, rng)
    rep = ot.mobile_report(*pair, ot.CompressionConfig(data=str(data)), runtimes=["ort"], bench_config=FAST)
    r = rep.runtime("ort")
    assert r is not None and r.status == "ok"
    assert rep.samples == (4 if layout == "flat" else 5)
    labelled = layout != "flat"
    assert rep.labels is labelled
    assert (r.original.accuracy is not None) is labelled  # type: ignore[union-attr]


# ---- bad input -------------------------------------------------------------------------------------------


def test_bad_inputs_give_one_clear_error(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    original, compressed = pair
    cases = []
    # a missing model
    cases.append((["report", str(tmp_path / "nope.onnx"), str(compressed)], 1, "nope.onnx"))
    # different signatures: another model's inputs
    other = save(make_small_cnn(in_ch=1), tmp_path / "other.onnx")
    other_sig = save(make_conv_model(), tmp_path / "conv.onnx")
    cases.append((["report", str(original), str(other_sig)], 2, "differ from those of"))
    # unknown runtime
    cases.append((["report", str(original), str(compressed), "--runtimes", "ort,tflite"], 2, "unknown runtime 'tflite'"))
    # --data that does not fit the model (1 channel where it takes 3)
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((2, 1, 16, 16), np.float32))
    cases.append((["report", str(original), str(compressed), "--runtimes", "ort", "--data", str(bad)], 2, "the model expects"))
    # an unwritable report path (a folder that does not exist)
    cases.append((["report", str(original), str(compressed), "--html", str(tmp_path / "no" / "r.html")], 2, "does not exist"))
    for args, code, words in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == code, (args, result.output)
        lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and words in lines[0], (args, result.output)
    assert other.exists()


def test_bad_inputs_raise_the_library_errors(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ModelLoadError):
        ot.mobile_report(tmp_path / "missing.onnx", pair[1])
    with pytest.raises(UsageError, match="unknown runtime"):
        ot.mobile_report(*pair, runtimes="ort,coreml")
    with pytest.raises(UsageError, match="--timeout"):
        ot.mobile_report(*pair, timeout=0)
