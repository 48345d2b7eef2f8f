"""ONNX -> torch (onnx2torch, after graph normalisation) and torch -> ONNX (TorchScript exporter)."""

from __future__ import annotations

import io
import re
import sys
import types
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from ..errors import ModelLoadError, OnnxTuckerError
from ..graph import optypes, torchready
from ..ops.base import LABELS

INSTALL_HINT = "pip install 'onnx-tucker[finetune]' after a CPU torch (see the README: Fine-tuning)"

# Names given by the compressor to the nodes of a decomposed layer (ops/base.py LABELS, every kind's), as
# onnx2torch turns them into module names: '.../tucker_core', '.../svd_last_1', and '.../tucker_core.1'
# where onnx2torch wraps the conv in a Sequential (an asymmetric padding first).
FACTOR_MODULE = re.compile(rf"(^|/)({'|'.join(sorted({x for names in LABELS.values() for x in names}))})(_\d+)?(\.\d+)?$")
# Set on a converted module: parameter name -> the ONNX node that owns it, for the weights this module
# made parameters out of onnx2torch's constant buffers (a MatMul's weight).
OWNERS_ATTR = "_onnx_tucker_owners"

MAX_EXPORT_OPSET = 17
MIN_EXPORT_OPSET = 9


def import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise OnnxTuckerError(f"fine-tuning needs torch, which is not installed; {INSTALL_HINT}") from None
    return torch


def import_onnx2torch() -> Any:
    """onnx2torch imports torchvision at import time, for its NMS / RoiAlign converters only. Where
    torchvision is missing or broken (PyPI's torchvision next to a local CPU torch build fails with
    "operator torchvision::nms does not exist"), a stub module lets every CNN op convert."""
    import_torch()
    try:
        import onnx2torch
    except Exception as e:  # noqa: BLE001 - ImportError, or RuntimeError from a mismatched torchvision
        if not any(k == "torchvision" or k.startswith("torchvision.") for k in sys.modules) and "torchvision" not in str(e):
            raise OnnxTuckerError(f"fine-tuning needs onnx2torch ({type(e).__name__}: {e}); {INSTALL_HINT}") from None
        for k in [k for k in sys.modules if k.split(".")[0] in ("torchvision", "onnx2torch")]:
            del sys.modules[k]
        stub = types.ModuleType("torchvision")
        stub.ops = types.ModuleType("torchvision.ops")  # type: ignore[attr-defined]
        stub.__onnx_tucker_stub__ = True  # type: ignore[attr-defined]

        def _absent(*_: Any, **__: Any) -> Any:
            raise OnnxTuckerError("this model needs torchvision (NMS / RoiAlign), which does not import here")

        stub.ops.nms = stub.ops.roi_align = _absent  # type: ignore[attr-defined]
        sys.modules["torchvision"] = stub
        sys.modules["torchvision.ops"] = stub.ops  # type: ignore[attr-defined]
        try:
            import onnx2torch
        except Exception as e2:  # noqa: BLE001
            raise OnnxTuckerError(f"fine-tuning needs onnx2torch ({type(e2).__name__}: {e2}); {INSTALL_HINT}") from None
    from . import recurrent  # noqa: F401 - registers the LSTM / GRU converters with onnx2torch (once)

    return onnx2torch


def supported_ops() -> torchready.Supported:
    """onnx2torch's converters (ours registered too), as a predicate on (domain, op type, version)."""
    import_onnx2torch()
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY

    keys = {(k.domain, k.operation_type, k.version) for k in _CONVERTER_REGISTRY}
    # A detector with NMS in its graph trains the parts before it (subgraph fine-tuning).
    stubbed = getattr(sys.modules.get("torchvision"), "__onnx_tucker_stub__", False)
    never = optypes.UNTRAINABLE_OPS | (optypes.TORCHVISION_OPS if stubbed else frozenset())
    keys = {k for k in keys if k[1] not in never}

    def supported(domain: str, op: str, version: int) -> bool:
        return (domain if domain != "ai.onnx" else "", op, version) in keys

    return supported


def to_torch(model: onnx.ModelProto, source: str,
             input_dims: Mapping[str, Sequence[int]] | None = None) -> tuple[Any, torchready.Normalized]:
    """Normalise (dynamic non-batch input dims fixed to `input_dims`, the data's), then convert. Raises one
    ModelLoadError naming every op onnx2torch cannot take."""
    onnx2torch = import_onnx2torch()
    norm, bad = torchready.normalize(model, supported_ops(), source, input_dims)
    if bad:
        raise ModelLoadError(
            f"{source}: onnx2torch cannot convert {len(bad)} op type(s) at opset {norm.source_opset} or any opset tried: "
            f"{', '.join(bad)}; fine-tuning needs every op converted (replace them, or fine-tune the model in its own framework)"
        )
    try:
        module = onnx2torch.convert(norm.model)
    except ModelLoadError as e:  # our converters' refusals, naming the node and why
        raise ModelLoadError(f"{source}: {e}") from None
    except Exception as e:  # noqa: BLE001 - onnx2torch raises NotImplementedError, KeyError, ...
        msg = " ".join(str(e).split()) or type(e).__name__
        raise ModelLoadError(f"{source}: onnx2torch failed to convert the model ({msg[:300]}); please report this") from None
    _weights_as_parameters(module, norm.model)
    return module, norm


def module_names(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """onnx2torch's module name of each node of `model` (OnnxGraph.generate_node_name: the domain, the
    node's name with dots as slashes or its op type, numbered from the second of a name)."""
    names: dict[str, onnx.NodeProto] = {}
    counts: dict[str, int] = {}
    for n in model.graph.node:
        base = (f"{n.domain}/" + (n.name.replace(".", "/") or n.op_type)).lstrip("/")
        k = counts.get(base, 0)
        counts[base] = k + 1
        names[base + (f"_{k}" if k else "")] = n
    return names


def _weights_as_parameters(module: Any, model: onnx.ModelProto) -> None:
    """onnx2torch keeps the initializers a layer op reads as data (a MatMul's weight: Paddle's and the
    Tucker SVD chains' fully connected layers) as constant buffers, which no optimizer sees. Each float
    buffer of 2+ dims read by a layer node becomes a parameter, its ONNX owner recorded for --train factors."""
    torch = import_torch()
    from ..ops.registry import find_handler

    container = getattr(module, "initializers", None)
    graph = getattr(module, "graph", None)
    if container is None or graph is None:
        return
    ops = {name: n.op_type for name, n in module_names(model).items()}
    owners: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "get_attr" or not str(node.target).startswith("initializers."):
            continue
        name = str(node.target).split(".", 1)[1]
        t = container._buffers.get(name)
        if t is None or not t.is_floating_point() or t.ndim < 2:
            continue
        users = [str(u.target) for u in node.users if u.op == "call_module"]
        layer = next((u for u in users if find_handler(ops.get(u, "")) is not None), None)
        if layer is None:
            continue
        del container._buffers[name]
        container.register_parameter(name, torch.nn.Parameter(t))
        owners[f"initializers.{name}"] = layer
    if owners:
        setattr(module, OWNERS_ATTR, owners)


def select_trainable(module: Any, train: str, source: str) -> tuple[list[str], int, int]:
    """Set requires_grad per `train` (all | factors); returns (trainable names, trainable count, total)."""
    from ..errors import UsageError

    names = []
    total = trainable = 0
    owners = getattr(module, OWNERS_ATTR, {})
    for name, p in module.named_parameters():
        owner = owners.get(name, name.rsplit(".", 1)[0])
        on = train == "all" or bool(FACTOR_MODULE.search(owner))
        p.requires_grad_(on)
        total += p.numel()
        if on:
            trainable += p.numel()
            names.append(name)
    if not names:
        why = "has no decomposed layers (nodes named .../tucker_*, .../svd_* or .../spatial_*)" if train == "factors" else "has no weights"
        raise UsageError(f"{source}: the model {why}; nothing to train: use --train all, or compress it first")
    return names, trainable, total


def export(
    module: Any,
    sample: dict[str, np.ndarray],
    input_names: Sequence[str],
    output_names: Sequence[str],
    opset: int,
    dynamic_batch: bool,
    batch_axes: Mapping[str, int] | None = None,
) -> onnx.ModelProto:
    """torch.onnx.export(dynamo=False) of the module (on CPU, eval mode), same input/output names;
    `dynamic_batch`: each input's and output's batch axis is dynamic, axis 0 unless `batch_axes` names
    another (a time-first sequence output [T, N, C]: 1)."""
    torch = import_torch()
    module = module.to("cpu").eval()
    args = tuple(torch.from_numpy(np.ascontiguousarray(sample[n])) for n in input_names)
    where = batch_axes or {}
    axes = {n: {where.get(n, 0): "batch"} for n in [*input_names, *output_names]} if dynamic_batch else None
    target = max(MIN_EXPORT_OPSET, min(MAX_EXPORT_OPSET, opset))
    buf = io.BytesIO()
    try:
        import warnings

        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, args, buf, input_names=list(input_names), output_names=list(output_names),
                dynamic_axes=axes, opset_version=target, dynamo=False, do_constant_folding=True,
            )
    except Exception as e:  # noqa: BLE001 - the exporter raises many kinds
        msg = " ".join(str(e).split()) or type(e).__name__
        raise OnnxTuckerError(f"torch.onnx.export failed at opset {target} ({msg[:300]}); please report this") from None
    return onnx.load_from_string(buf.getvalue())
