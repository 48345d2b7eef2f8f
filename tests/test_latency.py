"""Latency-aware selection (issue 9): the keep/revert decision with a fake timer, the per-shape timing
cache, the interleaving bookkeeping, and the tiny timing models. No test asserts on wall-clock time."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from onnx_tucker import api
from onnx_tucker.cli import app
from onnx_tucker.config import CompressionConfig
from onnx_tucker.graph.layermodel import chain_layer_model, original_layer_model
from onnx_tucker.graph.model import find_layers, infer_shapes, resolve_input_shapes
from onnx_tucker.ops.layer import Layer
from onnx_tucker.ops.registry import handler_for
from onnx_tucker.planning.latency import CachedLayerTimer, LayerTiming, timing_key
from onnx_tucker.runtime.bench import interleave
from tests.helpers import (
    make_conv_model,
    make_conv_stack,
    make_gemm_model,
    make_matmul_model,
    make_small_cnn,
    run_ort,
    save,
)

Speedup = Callable[[str, tuple[int, ...]], float]


class FakeTimer:
    """Deterministic: the original takes 1 ms, the chain 1 / speedup(kind, ranks) ms; records calls."""

    def __init__(self, speedup: Speedup) -> None:
        self.speedup = speedup
        self.calls: list[tuple[str, str, tuple[int, ...]]] = []

    def measure(self, layer: Layer, kind: str, ranks: tuple[int, ...]) -> LayerTiming:
        self.calls.append((layer.layer_id, kind, tuple(ranks)))
        return LayerTiming(1.0, 1.0 / self.speedup(kind, tuple(ranks)), runs=7)


def _layers(model):  # type: ignore[no-untyped-def]
    shapes = infer_shapes(model, resolve_input_shapes(model, {}))
    return find_layers(model, shapes)


def _plan(model, speedup: Speedup, **cfg):  # type: ignore[no-untyped-def]
    timer = FakeTimer(speedup)
    p = api.plan(model, CompressionConfig.from_options(latency_aware=True, validate=False, **cfg), timer=timer)
    return p, timer


STACK = make_conv_stack(layers=1, C=32, rank=9)  # EVBMF ranks (9, 9): not a multiple of 8


@pytest.mark.parametrize(
    ("speedup", "kind", "reason"),
    [
        (1.5, "tucker2", None),  # pays: kept as planned
        (1.1, "tucker2", None),  # exactly --min-speedup: kept
        (0.93, "skip", "slower in the runtime (x0.93)"),
        (1.05, "skip", "too little gain in the runtime (x1.05 < --min-speedup 1.1)"),
    ],
)
def test_keep_or_revert_by_measured_speedup(speedup: float, kind: str, reason: str | None) -> None:
    p, _ = _plan(STACK, lambda k, r: speedup)
    (lp,) = p.layers
    assert lp.kind == kind
    assert lp.time_before_ms == 1.0 and lp.time_speedup == pytest.approx(speedup)
    if reason is None:
        assert lp.reason is None and lp.ranks == (9, 9)
    else:
        assert lp.reason is not None and lp.reason.startswith(reason) and "kept as is" in lp.reason
        assert lp.params_after == lp.params_before and lp.macs_after == lp.macs_before


def test_min_speedup_option_moves_the_threshold() -> None:
    p, _ = _plan(STACK, lambda k, r: 1.3, min_speedup=1.5)
    assert p.layers[0].kind == "skip" and "x1.30 < --min-speedup 1.5" in (p.layers[0].reason or "")


def test_tucker1_chosen_when_only_it_pays() -> None:
    p, timer = _plan(STACK, lambda k, r: 1.6 if k == "tucker1" else 0.9)
    (lp,) = p.layers
    assert lp.kind == "tucker1" and lp.ranks is not None and len(lp.ranks) == 1
    assert lp.evbmf_ranks is not None and len(lp.evbmf_ranks) == 1
    assert "tucker1" in lp.policy and lp.time_speedup == pytest.approx(1.6)
    assert timer.calls[0] == ("conv0", "tucker2", (9, 9))  # the planned decomposition is timed first
    # The rewrite follows the choice: a 2-node chain.
    result = api.compress(STACK, CompressionConfig(latency_aware=True, validate=False),
                          timer=FakeTimer(lambda k, r: 1.6 if k == "tucker1" else 0.9))
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "Conv", "Relu"]


def test_rounded_ranks_chosen_when_they_pay() -> None:
    def fast_on_multiples_of_16(kind: str, ranks: tuple[int, ...]) -> float:
        return 1.4 if kind == "tucker2" and all(r % 16 == 0 for r in ranks) else 0.95

    p, timer = _plan(STACK, fast_on_multiples_of_16)
    (lp,) = p.layers
    assert (lp.kind, lp.ranks) == ("tucker2", (16, 16))
    tried = {(k, r) for _, k, r in timer.calls}
    assert {("tucker2", (8, 8)), ("tucker2", (16, 16)), ("tucker1", (9,))} <= tried


def test_round_to_option_sets_the_multiples_tried() -> None:
    p, timer = _plan(STACK, lambda k, r: 0.9, round_to=4)  # planned ranks are then (12, 12)
    tried = {r for _, k, r in timer.calls if k == "tucker2"}
    assert tried == {(12, 12)}  # already multiples of 4: nothing else to try but Tucker-1 and Tucker-1-in
    assert p.layers[0].kind == "skip" and "best of 3 variants" in (p.layers[0].reason or "")


def test_the_planned_decomposition_is_kept_when_it_pays_without_trying_variants() -> None:
    _, timer = _plan(STACK, lambda k, r: 2.0)
    assert timer.calls == [("conv0", "tucker2", (9, 9))]


def test_identical_layers_are_timed_once() -> None:
    model = make_conv_stack(layers=4, C=32, rank=8, seed=3)
    p, timer = _plan(model, lambda k, r: 1.5, ranks="ratio:0.25")  # every layer at ranks (8, 8)
    assert [lp.kind for lp in p.layers] == ["tucker2"] * 4
    assert len(timer.calls) == 1
    assert p.layer_timing is not None and (p.layer_timing.measured, p.layer_timing.lookups) == (1, 4)


def test_cache_keys_on_shape_and_ranks() -> None:
    layers = _layers(make_small_cnn(low_rank=True))
    inner = FakeTimer(lambda k, r: 1.0)
    cached = CachedLayerTimer(inner)
    conv1, conv2 = layers[0], layers[1]
    for _ in range(3):
        cached.measure(conv2, "tucker2", (8, 4))
    cached.measure(conv2, "tucker2", (8, 8))
    cached.measure(conv2, "tucker1", (8,))
    cached.measure(conv1, "tucker1", (4,))
    assert (cached.measured, cached.lookups, len(inner.calls)) == (4, 6, 4)
    assert timing_key(conv1, "tucker1", (4,)) != timing_key(conv2, "tucker1", (4,))


def test_interleaving_bookkeeping() -> None:
    log: list[str] = []
    now = [0.0]

    def clock() -> float:
        return now[0]

    def runner(name: str, seconds: float) -> Callable[[], None]:
        def run() -> None:
            log.append(name)
            now[0] += seconds

        return run

    ta, tb = interleave(runner("a", 0.002), runner("b", 0.005), warmup=2, runs=4, clock=clock)
    assert log == ["a", "b", "a", "b"] + ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert ta == pytest.approx((2.0,) * 4) and tb == pytest.approx((5.0,) * 4)


CASES = {
    "conv": (make_conv_model(T=16, S=12, spatial=(9, 9)), [("tucker2", (5, 4)), ("tucker1", (5,))]),
    "conv-strided": (make_conv_model(T=16, S=12, strides=(2, 2), pads=(1, 1, 1, 1), spatial=(10, 10)), [("tucker2", (5, 4))]),
    "conv-grouped": (make_conv_model(T=16, S=8, group=2), [("tucker2", (3, 2)), ("tucker1", (3,))]),
    "conv-1x1": (make_conv_model(T=16, S=12, kernel=(1, 1)), [("svd", (5,))]),
    "conv-1d": (make_conv_model(T=8, S=8, kernel=(3,)), [("tucker2", (3, 3))]),
    "gemm-transB": (make_gemm_model(K=12, N=10, trans_b=1), [("svd", (4,))]),
    "gemm": (make_gemm_model(K=12, N=10), [("svd", (4,))]),
    "matmul": (make_matmul_model(K=12, N=10), [("svd", (4,))]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_factor_shapes_match_the_decomposition(name: str) -> None:
    model, variants = CASES[name]
    (layer,) = _layers(model)
    w = next(np.asarray(t.float_data or np.frombuffer(t.raw_data, np.float32)).reshape(tuple(t.dims))
             for t in model.graph.initializer if t.name == layer.weight_name)
    handler = handler_for(layer)
    for kind, ranks in variants:
        real = handler.decompose(layer, kind, ranks, w)
        assert handler.factor_shapes(layer, kind, ranks) == tuple(a.shape for a in real.arrays), (kind, ranks)


@pytest.mark.parametrize("name", list(CASES))
def test_timing_models_run_and_agree_in_output_shape(name: str) -> None:
    model, variants = CASES[name]
    (layer,) = _layers(model)
    x = {"x": np.random.default_rng(0).standard_normal(tuple(d or 1 for d in layer.input_shape or ())).astype(np.float32)}
    (y0,) = run_ort(original_layer_model(layer, 17), x).values()
    for kind, ranks in variants:
        (y1,) = run_ort(chain_layer_model(layer, kind, ranks, 17), x).values()
        assert y1.shape == y0.shape


runner = CliRunner()


def test_cli_compress_latency_aware_reports_times(tmp_path: Path) -> None:
    """The real onnxruntime timer end to end (values are not checked: the machine is shared)."""
    src = save(make_small_cnn(low_rank=True, c1=32, c2=64, spatial=(16, 16)), tmp_path / "m.onnx")
    rep = tmp_path / "r.json"
    res = runner.invoke(app, ["compress", str(src), str(tmp_path / "o.onnx"), "--latency-aware", "--no-validate",
                              "--report", str(rep), "-q"])
    assert res.exit_code == 0, res.output
    d = json.loads(rep.read_text())
    timed = [lay for lay in d["layers"] if lay["time_before_ms"] is not None]
    assert timed and all(lay["time_after_ms"] > 0 for lay in timed)
    for lay in d["layers"]:  # every layer not decomposed says why
        assert lay["kind"] != "skip" or lay["reason"]
    t = d["layer_timing"]
    assert t["threads"] == 1 and t["measured"] >= 1 and t["profiled_ms"] > 0 and t["isolated_ms"] > 0


def test_cli_inspect_shows_predicted_and_measured_gain(tmp_path: Path) -> None:
    src = save(make_small_cnn(low_rank=True, c1=32, c2=64), tmp_path / "m.onnx")
    res = runner.invoke(app, ["inspect", str(src), "--latency-aware", "--min-speedup", "0.5"])
    assert res.exit_code == 0, res.output
    assert "MAC gain" in res.output and "time gain" in res.output and "Per-layer timing" in res.output


def test_markdown_report_gains_time_columns(tmp_path: Path) -> None:
    model = make_conv_stack(layers=2, C=32, rank=8)
    md = tmp_path / "r.md"
    api.compress(model, CompressionConfig(latency_aware=True, validate=False), timer=FakeTimer(lambda k, r: 1.5), markdown=md)
    text = md.read_text()
    assert "| time ms | time gain |" in text and "1.000 -> 0.667 | x1.50 |" in text


def test_profile_lists_the_layer_kernels() -> None:
    """onnxruntime's profiler is parsed per node; which names it uses is onnxruntime's business, so only
    the op types are checked."""
    from onnx_tucker.runtime.layertime import LAYER_KERNELS, profile_layer_times

    model = make_conv_stack(layers=2, C=16, rank=4)
    profile = profile_layer_times(model, model, {"x": (1, 16, 16, 16)}, runs=2)
    assert sum(op in LAYER_KERNELS for op, _ in profile.values()) == 2
