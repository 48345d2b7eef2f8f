"""Models exported from PyTorch (torch.onnx.export, TorchScript exporter) at opsets 9, 11, 13 and 17.

Conv1d/2d/3d with stride / padding / dilation / bias variants, padding='same' (exported as
auto_pad=SAME_UPPER), reflect padding (a Pad node in front of the Conv), groups and depthwise,
nn.Linear on 2-D input (Gemm transB=1) and on 3-D input (MatMul + Add), and a ResNet basic block
with BatchNorm in eval mode (folded into the convs by the exporter, or kept with constant folding
off). Weights are made low-rank (plus a little noise) so that default EVBMF ranks decompose them.

Each export must compress with `--ranks full` and reproduce its outputs (validation at 1e-4), and
compress with default ranks, run, and stay close (low-rank weights: small truncation error).
The module is skipped when torch is not installed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnx_tucker as ot
from onnx_tucker import CompressionConfig, RankPolicy
from tests.helpers import low_rank_kernel, low_rank_plus_noise, run_ort

torch = pytest.importorskip("torch")
nn = torch.nn

OPSETS = (9, 11, 13, 17)


class ResBlock(nn.Module):
    """torchvision's BasicBlock: conv3x3-BN-ReLU-conv3x3-BN + identity, ReLU."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):  # type: ignore[no-untyped-def]
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + x)


class LinearHead(nn.Module):
    """Flatten + nn.Linear on 2-D input: exported as Gemm(transB=1)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(48, 24)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.fc(torch.flatten(x, 1))


def _seq(*mods: nn.Module) -> nn.Module:
    return nn.Sequential(*mods)


# name -> (module factory, input shape, (decomposed, skipped) layer counts under --ranks full,
#          dynamic batch, exporter constant folding)
CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], tuple[int, int], bool, bool]] = {
    "conv1d-stride-pad": (lambda: nn.Conv1d(8, 16, 3, stride=2, padding=1), (1, 8, 15), (1, 0), False, True),
    "conv1d-dilation-nobias": (lambda: nn.Conv1d(8, 12, 5, dilation=2, padding=3, bias=False), (1, 8, 17), (1, 0), False, True),
    "conv2d-stride-asym": (lambda: nn.Conv2d(8, 16, 3, stride=(2, 1), padding=(1, 2)), (1, 8, 9, 9), (1, 0), False, True),
    "conv2d-dilation-nobias": (
        lambda: nn.Conv2d(12, 16, 3, dilation=(2, 1), padding=(2, 0), bias=False), (2, 12, 9, 9), (1, 0), True, True
    ),
    "conv2d-same-even-kernel": (lambda: nn.Conv2d(8, 12, 4, padding="same"), (1, 8, 9, 9), (1, 0), False, True),
    "conv2d-reflect-pad": (lambda: nn.Conv2d(8, 12, 3, padding=1, padding_mode="reflect"), (1, 8, 9, 9), (1, 0), False, True),
    "conv3d": (lambda: nn.Conv3d(8, 12, (3, 1, 2), stride=(1, 2, 1), padding=(1, 0, 1)), (1, 8, 5, 6, 5), (1, 0), False, True),
    "conv2d-groups": (lambda: nn.Conv2d(8, 16, 3, padding=1, groups=2), (1, 8, 9, 9), (1, 0), False, True),
    "depthwise-separable": (
        lambda: _seq(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(), nn.Conv2d(8, 16, 1)), (1, 8, 9, 9), (1, 1), False, True
    ),
    "linear-2d-gemm": (LinearHead, (2, 3, 4, 4), (1, 0), True, True),
    "linear-3d-matmul-add": (lambda: nn.Linear(32, 20), (2, 5, 32), (1, 0), True, True),
    "resblock-bn-folded": (ResBlock, (1, 16, 8, 8), (2, 0), True, True),
    "resblock-bn-kept": (ResBlock, (1, 16, 8, 8), (2, 0), False, False),
}


def low_rank_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every Conv / Linear weight a clear low-rank structure (about a quarter of each side)."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                T, sg, *k = m.weight.shape
                g = m.groups
                tg = T // g
                blocks = [low_rank_kernel(rng, tg, sg, k, max(1, tg // 4), max(1, sg // 4)) for _ in range(g)]
                m.weight.copy_(torch.from_numpy(np.concatenate(blocks)))
            elif isinstance(m, nn.Linear):
                n, k = m.weight.shape
                w = low_rank_plus_noise(rng, (n, k), max(1, min(n, k) // 4), sigma=0.01, snr=(60.0, 100.0))
                m.weight.copy_(torch.from_numpy(w / np.linalg.norm(w) * math.sqrt(n)).float())
            elif isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, so folding them matters
                c = m.num_features
                m.running_mean.copy_(torch.from_numpy(0.1 * rng.standard_normal(c)).float())
                m.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, c)).float())
                m.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, c)).float())
                m.bias.copy_(torch.from_numpy(0.1 * rng.standard_normal(c)).float())
    return module.eval()


def export(name: str, opset: int, folder: Path) -> Path:
    factory, shape, _, dynamic, folding = CASES[name]
    module = low_rank_(factory())
    path = folder / f"{name}-opset{opset}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(
            module,
            (torch.randn(*shape),),
            str(path),
            opset_version=opset,
            dynamo=False,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}} if dynamic else None,
            do_constant_folding=folding,
        )
    return path


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], Path]:
    folder = tmp_path_factory.mktemp("torch-exports")
    return {(name, opset): export(name, opset, folder) for name in CASES for opset in OPSETS}


def _patterns(model: onnx.ModelProto) -> dict[str, int]:
    ops: dict[str, int] = {}
    for n in model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return ops


def test_exports_show_the_expected_patterns(exports: dict[tuple[str, int], Path]) -> None:
    """The exporter patterns these tests are about really are in the exported files."""
    for opset in OPSETS:
        def load(name: str, opset: int = opset) -> onnx.ModelProto:
            m = onnx.load(str(exports[(name, opset)]))
            assert m.opset_import[0].version == opset
            return m

        same = load("conv2d-same-even-kernel").graph.node[0]
        assert {a.name: a.s for a in same.attribute}.get("auto_pad") == b"SAME_UPPER"
        gemm = [n for n in load("linear-2d-gemm").graph.node if n.op_type == "Gemm"]
        assert len(gemm) == 1 and any(a.name == "transB" and a.i == 1 for a in gemm[0].attribute)
        assert {"MatMul", "Add"} <= set(_patterns(load("linear-3d-matmul-add")))
        assert "Pad" in _patterns(load("conv2d-reflect-pad"))
        assert "BatchNormalization" not in _patterns(load("resblock-bn-folded"))
        assert _patterns(load("resblock-bn-kept"))["BatchNormalization"] == 2
        dw = load("depthwise-separable").graph.node[0]
        assert any(a.name == "group" and a.i == 8 for a in dw.attribute)


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_full_ranks_reproduce_outputs(exports: dict[tuple[str, int], Path], tmp_path: Path, name: str, opset: int) -> None:
    src = exports[(name, opset)]
    before = src.read_bytes()
    out = tmp_path / "full.onnx"
    res = ot.compress(src, CompressionConfig(ranks=RankPolicy("full"), samples=2), output=out)
    decomposed, skipped = CASES[name][2]
    assert res.decomposed_layers == decomposed, [(lp.name, lp.kind, lp.reason) for lp in res.plan.layers]
    kept = [lp for lp in res.plan.layers if not lp.decomposed]
    assert len(kept) == skipped
    assert all(lp.reason and lp.reason.startswith("depthwise conv (group=8)") for lp in kept), kept
    v = res.validation
    assert v is not None and v.passed and v.rtol == 1e-4, [(o.name, o.max_rel_error) for o in v.outputs]
    assert res.output_path == str(out) and src.read_bytes() == before
    written = onnx.load(str(out))
    onnx.checker.check_model(written, full_check=True)
    original = onnx.load(str(src))
    assert written.ir_version == original.ir_version
    assert list(written.opset_import) == list(original.opset_import)


@pytest.mark.parametrize("opset", (9, 17))
@pytest.mark.parametrize("name", sorted(CASES))
def test_default_ranks_compress_and_run(exports: dict[tuple[str, int], Path], tmp_path: Path, name: str, opset: int) -> None:
    src = exports[(name, opset)]
    out = tmp_path / "default.onnx"
    res = ot.compress(src, CompressionConfig(samples=2), output=out)
    assert res.output_path == str(out)
    # Low-rank weights: EVBMF finds the structure, the layers shrink, the outputs barely move.
    assert res.decomposed_layers == CASES[name][2][0], [(lp.name, lp.kind, lp.ranks, lp.reason) for lp in res.plan.layers]
    assert res.totals.params_after < res.totals.params_before
    v = res.validation
    assert v is not None and v.status == "measured"
    assert all(o.max_rel_error < 0.05 and o.cosine > 0.999 for o in v.outputs), [(o.name, o.max_rel_error) for o in v.outputs]

    # The written file runs on its own, with a batch other than the one validated where it is dynamic.
    shape = CASES[name][1]
    batch = 3 if CASES[name][3] else shape[0]
    x = np.random.default_rng(1).standard_normal((batch, *shape[1:])).astype(np.float32)
    y = run_ort(onnx.load(str(out)), {"x": x})["y"]
    assert y.shape[0] == batch and np.all(np.isfinite(y))


def test_same_padding_with_dilation_is_refused_by_onnxruntime(tmp_path: Path) -> None:
    """An exporter pattern onnxruntime itself cannot run: padding='same' with dilation > 1 is written as
    auto_pad=SAME_UPPER plus dilations, which onnxruntime's Conv refuses. Validation says so (the
    original fails too) and writes nothing; with --no-validate the chain keeps exactly that padding."""
    module = low_rank_(nn.Conv2d(8, 12, 3, padding="same", dilation=2))
    src = tmp_path / "same-dilated.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(1, 8, 9, 9),), str(src), opset_version=17, dynamo=False,
                          input_names=["x"], output_names=["y"])
    out = tmp_path / "out.onnx"
    with pytest.raises(ot.OnnxTuckerError, match="Dilation not supported for AutoPadType::SAME_UPPER"):
        ot.compress(src, CompressionConfig(ranks=RankPolicy("full")), output=out)
    assert not out.exists()
    res = ot.compress(src, CompressionConfig(ranks=RankPolicy("full"), validate=False), output=out)
    assert res.decomposed_layers == 1
    core = [n for n in res.model.graph.node if any(a.name == "auto_pad" for a in n.attribute)]
    assert len(core) == 1
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in core[0].attribute}
    assert attrs["auto_pad"] == b"SAME_UPPER" and attrs["dilations"] == [2, 2] and attrs["kernel_shape"] == [3, 3]
