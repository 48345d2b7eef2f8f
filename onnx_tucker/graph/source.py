"""The source model, loaded once: what every stage reads (issue 17: one in-memory model).

`SourceModel.load(path_or_proto, input_shapes)` loads and checks the model (lazily: big weights stay
in their file until `materialize`), fixes its input shapes, infers the shapes of every tensor once,
builds the graph index once and finds the candidate layers. Stages take it as it is and never
re-load, re-index or re-infer the model. `load_pair` is the same for the two models `validate`,
`bench` and `mobile_report` compare.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from ..errors import ModelLoadError, UsageError
from ..ops.layer import Layer, Shape
from ..ops.registry import find_handler, handler_for
from . import lazyload
from .irmodel import IRModel
from .load import check_model, load_model
from .model import ModelIndex, find_layers, infer_shapes, resolve_input_shapes
from .protos import graph_input_names
from .rewrite import Replacement, check_rewrite, rewrite

ModelLike = onnx.ModelProto | str | os.PathLike[str]


@dataclass(frozen=True)
class SourceModel:
    """The model to compress, as every stage reads it."""

    model: onnx.ModelProto = field(repr=False)
    path: str | None  # the file it came from (None: given in memory)
    input_shapes: dict[str, tuple[int, ...]]
    shapes: Mapping[str, Shape] = field(repr=False)  # every top-level tensor's inferred shape
    index: ModelIndex = field(repr=False)
    layers: tuple[Layer, ...]
    # Set when the model was loaded lazily: its big Conv/Gemm/MatMul weights are still in the file
    # (external data relative to this folder) and are read one at a time (see `lazyload`).
    base_dir: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def load(cls, model_or_path: ModelLike, input_shapes: Mapping[str, tuple[int, ...]] | None = None) -> SourceModel:
        """Load (a path: lazily) and check the model, fix its inputs to `input_shapes` (missing ones: the
        model's own, batch 1) and find its layers; a model onnxruntime could not run is refused here."""
        if isinstance(model_or_path, onnx.ModelProto):
            path = None
            model = check_model(model_or_path, "model")  # load_model runs the same checks on a file
        else:
            path = str(model_or_path)
            model = load_model(path, lazy=True)
        source = path or "model"
        fixed = resolve_input_shapes(model, dict(input_shapes or {}), source)
        shapes = infer_shapes(model, fixed)
        index = ModelIndex(model)
        layers = find_layers(model, shapes, index)
        _check_weight_shapes(layers, source)
        base_dir = str(Path(path).resolve().parent) if path is not None else None
        return cls(model, path, fixed, shapes, index, tuple(layers), base_dir)

    @property
    def name(self) -> str:
        """How messages name the model: its path, or "model"."""
        return self.path or "model"

    @property
    def runnable(self) -> onnx.ModelProto | str:
        """What onnxruntime loads: the file when there is one (its weights were loaded lazily)."""
        return self.path or self.model

    def materialize(self, model: onnx.ModelProto | None = None) -> None:
        """Load the weights still in the file into `model` (default: the source itself), in place, before
        onnxruntime or the user sees it."""
        if self.base_dir is not None:
            lazyload.materialize(self.model if model is None else model, self.base_dir)

    def read_weight(self, name: str) -> np.ndarray:
        """A constant's value by name: a lazily loaded weight from its file, else through the index
        (folded constants included). Safe from several threads."""
        t = self.index.initializers.get(name)
        if t is not None and self.base_dir is not None and lazyload.is_external(t):
            return lazyload.read_weight(t, self.base_dir)
        with self._lock:  # protobuf reads and constant folding stay on one thread at a time
            return self.index.constant_value(name)


def _check_weight_shapes(layers: list[Layer], source: str) -> None:
    """A weight that does not fit its input makes onnxruntime fail at run time (neither onnx.checker
    nor shape inference notices): say so before planning, naming the node."""
    for lay in layers:
        if find_handler(lay.op_type) is None or lay.weight_shape is None:
            continue
        found = handler_for(lay).input_mismatch(lay)
        if found is not None:
            what, have, want = found
            w, x = lay.weight_shape, lay.input_shape or ()
            raise ModelLoadError(
                f"{source}: node '{lay.layer_id}' ({lay.op_type}) has weight {list(w)} expecting input {what} {want}, "
                f"but its input {list(x)} has {have}; the model is inconsistent (onnxruntime would fail at run "
                "time): re-export it"
            )


# ---- the rewrite stage ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rewritten:
    """The compressed model: a ModelProto with every weight in memory, or over 2 GB (too big for one
    protobuf) the onnx-ir model, written straight from its arrays and the input's file as external
    data; `skeleton` is what counts and checks it (the model itself, or its protobuf without weights)."""

    model: onnx.ModelProto | IRModel = field(repr=False)
    skeleton: onnx.ModelProto = field(repr=False)


def rewrite_source(source: SourceModel, replacements: Mapping[int, Replacement]) -> Rewritten:
    """Each replaced node of `source` spliced out for its factor chain (`graph.rewrite`), checked."""
    rewritten = rewrite(source.model, replacements, source.base_dir, source.index)
    if rewritten.over_protobuf_limit():
        skeleton = rewritten.skeleton()
        check_rewrite(source.model, skeleton)
        return Rewritten(rewritten, skeleton)
    model = rewritten.to_proto()  # the factor arrays wrapped by `rewritten` are copied once, here
    check_rewrite(source.model, model)
    source.materialize(model)  # weights kept as they were come back from the file now
    return Rewritten(model, model)


# ---- two models to compare -------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelPair:
    """An original and its compressed version, loaded (lazily) and checked to match; `runnable_*` is what
    onnxruntime loads (the file when one was given: no protobuf copy of its weights)."""

    original: onnx.ModelProto = field(repr=False)
    compressed: onnx.ModelProto = field(repr=False)
    input_shapes: dict[str, tuple[int, ...]]
    runnable_original: onnx.ModelProto | str = field(repr=False)
    runnable_compressed: onnx.ModelProto | str = field(repr=False)


def load_pair(original: ModelLike, compressed: ModelLike, input_shapes: Mapping[str, tuple[int, ...]],
              lazy: bool = True) -> ModelPair:
    """Both models (loaded and checked when given as paths), checked to have the same inputs and
    outputs, and the original's resolved input shapes."""
    orig = original if isinstance(original, onnx.ModelProto) else load_model(original, lazy=lazy)
    comp = compressed if isinstance(compressed, onnx.ModelProto) else load_model(compressed, lazy=lazy)
    source = "model" if isinstance(original, onnx.ModelProto) else str(original)
    check_same_signature(orig, comp, source,
                         "the compressed model" if isinstance(compressed, onnx.ModelProto) else str(compressed))
    return ModelPair(orig, comp, resolve_input_shapes(orig, dict(input_shapes), source),
                     orig if isinstance(original, onnx.ModelProto) else str(original),
                     comp if isinstance(compressed, onnx.ModelProto) else str(compressed))


Signature = list[tuple[str, int, tuple[int | None, ...]]]


def _signature(model: onnx.ModelProto) -> tuple[Signature, Signature]:
    """(inputs, outputs) as (name, element type, dims; None for a symbolic or unknown one): what must
    match between a model and its compressed version (compression changes none of it)."""
    real = set(graph_input_names(model))

    def sig(values) -> Signature:  # type: ignore[no-untyped-def]
        return [(v.name, v.type.tensor_type.elem_type,
                 tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                       for d in v.type.tensor_type.shape.dim))
                for v in values]

    return sig([i for i in model.graph.input if i.name in real]), sig(model.graph.output)


def _same(a: Signature, b: Signature) -> bool:
    """Same names, types and ranks, and the same size wherever both models fix a dimension."""
    return len(a) == len(b) and all(
        na == nb and ta == tb and len(da) == len(db) and all(x is None or y is None or x == y for x, y in zip(da, db, strict=True))
        for (na, ta, da), (nb, tb, db) in zip(a, b, strict=True))


def check_same_signature(orig: onnx.ModelProto, comp: onnx.ModelProto, original: str, compressed: str) -> None:
    """Two unrelated models (another network, another input size) are a usage error, said before any run."""
    for what, a, b in zip(("inputs", "outputs"), _signature(orig), _signature(comp), strict=True):
        if not _same(a, b):
            def show(s: Signature) -> str:
                return ", ".join(
                    f"{n} ({onnx.TensorProto.DataType.Name(t).lower()} [{','.join('?' if d is None else str(d) for d in ds)}])"
                    for n, t, ds in s) or "none"

            raise UsageError(
                f"{compressed}: its {what} [{show(b)}] differ from those of {original} [{show(a)}]; "
                "give the compressed version of that very model"
            )
