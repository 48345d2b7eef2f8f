"""A segment of an ONNX model as a trainable torch module, and its parameters bound to the initializers
they came from: shared by block-wise refinement (`compress --refine`, refine.py) and subgraph
fine-tuning (subgraph.py), which both train part of a model towards the original's tensors and write
the trained values back into the ONNX model in place (everything else stays bit-identical).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from ..graph.probe import read_initializer, set_input_dims
from ..graph.torchready import Normalized
from .convert import OWNERS_ATTR, to_torch

# Where onnx2torch puts a node's own weights: `weight` from input 1 (Conv, ConvTranspose, Gemm, the BN
# scale), `bias` from input 2 (their bias, the BN shift). Others are tried after these.
_PREFERRED = {"weight": 1, "bias": 2}


@dataclass(frozen=True)
class Bound:
    """The module's parameters that train, by the initializer of the ONNX segment each one came from."""

    params: dict[str, Any]  # initializer name -> torch Parameter (requires_grad on)
    total: int  # elements of every parameter of the module (trainable or not)


def segment_module(model: onnx.ModelProto, dims: Mapping[str, Sequence[int]], source: str) -> tuple[Any, Normalized]:
    """`model` (a segment whose inputs are given the shapes `dims`: batch first) converted to a float32
    torch module in inference mode (any BatchNorm keeps its statistics, as in fine-tuning)."""
    set_input_dims(model, dims)
    module, norm = to_torch(model, source)
    return module.float().train(False), norm


def bind_parameters(module: Any, model: onnx.ModelProto, owned: Mapping[str, tuple[str, ...]],
                    trainable: Collection[str]) -> Bound:
    """Each parameter of `module` (converted from `model`, its nodes renamed by `prepare_for_torch`) whose
    owner node is in `trainable` is matched to the initializer among that node's inputs (`owned`) that holds
    exactly its starting value, and trains; every other parameter is frozen. Matching by value, not by
    position alone, keeps a transposed or reshaped copy from being written back into the wrong tensor."""
    owners = getattr(module, OWNERS_ATTR, {})
    values: dict[str, np.ndarray] = {}
    params: dict[str, Any] = {}
    total = 0
    for pname, p in module.named_parameters():
        total += p.numel()
        p.requires_grad_(False)
        owner, _, kind = pname.rpartition(".")
        owner = owners.get(pname, owner)
        inputs = owned.get(owner)
        if inputs is None or owner not in trainable:
            continue
        first = _PREFERRED.get(kind)
        order = ([first] if first is not None and first < len(inputs) else []) + [k for k in range(len(inputs)) if k != first]
        start = p.detach().cpu().numpy()
        for k in order:
            name = inputs[k]
            if not name or name in params:
                continue
            if name not in values:
                values[name] = read_initializer(model, name)
            v = values[name]
            if v.shape == start.shape and v.dtype == start.dtype and np.array_equal(v, start):
                p.requires_grad_(True)
                params[name] = p
                break
    return Bound(params, total)


def trained_values(bound: Bound) -> dict[str, np.ndarray]:
    """The trained parameters' values, by initializer name (what `write_initializers` takes)."""
    return {k: p.detach().cpu().numpy() for k, p in bound.params.items()}
