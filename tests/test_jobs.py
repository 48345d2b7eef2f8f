"""`--jobs N`: layers planned and decomposed in parallel threads give exactly the serial result.

The model has Gram matrices of 256+ rows, where OpenBLAS results depend on the thread count of a
call: a parallel run that changed per-call thread counts would show up as different bytes.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

import onnx_tucker as ot
from onnx_tucker.cli import app
from onnx_tucker.config import CompressionConfig
from onnx_tucker.errors import UsageError
from tests.helpers import he_normal, low_rank_kernel, low_rank_plus_noise, save


def _wide_cnn(seed: int = 0) -> onnx.ModelProto:
    """conv 3->32 (Tucker-1), conv 32->256 3x3 (Tucker-2), conv 256->256 1x1 (SVD), two Gemms."""
    rng = np.random.default_rng(seed)
    w = {
        "c1.W": low_rank_kernel(rng, 32, 3, (3, 3), 8, 3),
        "c2.W": low_rank_kernel(rng, 256, 32, (3, 3), 24, 12, noise=0.05),
        "c3.W": low_rank_kernel(rng, 256, 256, (1, 1), 40, 40, noise=0.05),
        "fc1.W": low_rank_plus_noise(rng, (300, 256), 30, sigma=0.01).astype(np.float32),
        "fc2.W": he_normal(rng, (10, 300)),
    }
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    inits.append(numpy_helper.from_array((0.1 * rng.standard_normal(256)).astype(np.float32), "c2.B"))
    conv = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    nodes = [
        helper.make_node("Conv", ["x", "c1.W"], ["h1"], name="c1", **conv),
        helper.make_node("Relu", ["h1"], ["a1"], name="r1"),
        helper.make_node("Conv", ["a1", "c2.W", "c2.B"], ["h2"], name="c2", **conv),
        helper.make_node("Relu", ["h2"], ["a2"], name="r2"),
        helper.make_node("Conv", ["a2", "c3.W"], ["h3"], name="c3", kernel_shape=[1, 1]),
        helper.make_node("GlobalAveragePool", ["h3"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat", axis=1),
        helper.make_node("Gemm", ["f", "fc1.W"], ["z"], name="fc1", transB=1),
        helper.make_node("Gemm", ["z", "fc2.W"], ["y"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return save(_wide_cnn(), tmp_path_factory.mktemp("jobs") / "wide.onnx")


@pytest.mark.parametrize("hooi", [0, 2])
def test_output_model_is_byte_identical_for_jobs_1_2_3(wide_model, tmp_path, hooi: int) -> None:  # type: ignore[no-untyped-def]
    outs = []
    for jobs in (1, 2, 3):
        out = tmp_path / f"out{jobs}.onnx"
        res = ot.compress(wide_model, CompressionConfig(validate=False, jobs=jobs, hooi_iters=hooi), output=out)
        outs.append((out.read_bytes(), res.plan))
    # The run decomposed something real in every kind, so identical bytes mean identical factors.
    kinds = {lp.kind for lp in outs[0][1].layers}
    assert {"tucker1", "tucker2", "svd"} <= kinds, kinds
    assert outs[0][0] == outs[1][0] == outs[2][0]
    assert outs[0][1].layers == outs[1][1].layers == outs[2][1].layers  # ranks, sigma2, errors: all of it


def test_plan_is_identical_for_jobs(wide_model) -> None:  # type: ignore[no-untyped-def]
    p1 = ot.plan(wide_model, CompressionConfig(validate=False, jobs=1))
    p2 = ot.plan(wide_model, CompressionConfig(validate=False, jobs=2))
    assert p1.layers == p2.layers


def test_cli_jobs_option_same_bytes(wide_model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    runner = CliRunner()
    for jobs in ("1", "2"):
        r = runner.invoke(app, ["compress", str(wide_model), str(tmp_path / f"cli{jobs}.onnx"), "--no-validate", "-q",
                                "--jobs", jobs])
        assert r.exit_code == 0, r.output
    assert (tmp_path / "cli1.onnx").read_bytes() == (tmp_path / "cli2.onnx").read_bytes()


def test_jobs_must_be_positive(wide_model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UsageError, match="--jobs 0"):
        CompressionConfig(jobs=0)
    r = CliRunner().invoke(app, ["compress", str(wide_model), str(tmp_path / "x.onnx"), "--jobs", "0"])
    assert r.exit_code == 2
    assert "--jobs 0" in r.output


def test_progress_reports_every_layer_in_order_with_jobs(wide_model) -> None:  # type: ignore[no-untyped-def]
    seen: list[tuple[str, int, int]] = []
    ot.compress(wide_model, CompressionConfig(validate=False, jobs=2), progress=lambda n, d, t: seen.append((n, d, t)))
    done = [d for _, d, _ in seen]
    assert done == sorted(done) and done[-1] == seen[-1][2] == 5
