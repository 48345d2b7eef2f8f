"""Count how often one `onnx-tucker` command converts the model (issue 17 item 3; a check, not a test).

    python tools/count_conversions.py -- compress fixtures/fmnist_vgg.onnx /tmp/c.onnx --ranks data:0.5 \
        --calibrate fixtures/fmnist_test_500.npz --calibration-samples 200 --finetune fixtures/fmnist_test_500.npz \
        --epochs 1 --teacher-is-original -q

Runs the CLI in this process with counters wrapped around the places a model changes representation:
onnxruntime sessions built, whole-model shape inferences, ModelProto serialisations (and their bytes)
and parses, deep copies, onnx-ir conversions, graph-index builds, torch conversions and exports,
models saved to files. Prints one JSON object.
"""

from __future__ import annotations

import collections
import functools
import json
import sys
from typing import Any

import onnx
import onnx.shape_inference
import onnxruntime

COUNTS: collections.Counter[str] = collections.Counter()


def _wrap(owner: Any, name: str, key: str, size: Any = None) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        COUNTS[key] += 1
        out = original(*args, **kwargs)
        if size is not None:
            COUNTS[key + "_bytes"] += size(out)
        return out

    setattr(owner, name, wrapper)


def install() -> None:
    _wrap(onnxruntime.InferenceSession, "__init__", "ort_sessions")
    _wrap(onnx.shape_inference, "infer_shapes", "shape_inferences")
    _wrap(onnx.ModelProto, "SerializeToString", "serialisations", size=len)
    _wrap(onnx.ModelProto, "ParseFromString", "parses")
    _wrap(onnx, "save_model", "onnx_save_model")
    onnx.save = onnx.save_model
    deep = onnx.ModelProto.__deepcopy__ if hasattr(onnx.ModelProto, "__deepcopy__") else None

    def deepcopy(self: onnx.ModelProto, memo: Any = None) -> onnx.ModelProto:
        COUNTS["model_deepcopies"] += 1
        if deep is not None:
            return deep(self, memo)
        m = onnx.ModelProto()
        m.CopyFrom(self)
        return m

    onnx.ModelProto.__deepcopy__ = deepcopy  # type: ignore[method-assign]
    import onnx_ir.serde as serde

    _wrap(serde, "deserialize_model", "ir_from_proto")
    _wrap(serde, "serialize_model", "ir_to_proto")
    from onnx_tucker.graph import model as gm

    _wrap(gm.ModelIndex, "__init__", "graph_index_builds")
    import importlib

    for name in ("onnx_tucker.training.convert", "onnx_tucker.finetune.convert"):  # the package was renamed
        try:
            conv = importlib.import_module(name)
        except ImportError:
            continue
        _wrap(conv, "to_torch", "onnx_to_torch")
        _wrap(conv, "export", "torch_to_onnx")
        break


def main() -> None:
    argv = sys.argv[1:]
    if argv and argv[0] == "--":
        argv = argv[1:]
    install()
    from onnx_tucker import cli

    sys.argv = ["onnx-tucker", *argv]
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = int(e.code or 0)
    print(json.dumps({"exit_code": code, **dict(sorted(COUNTS.items()))}, indent=1))


if __name__ == "__main__":
    main()
