"""The one place an onnxruntime CPU session is created.

From a `ModelProto` (serialised in memory, or saved with external data to a temporary folder when
protobuf cannot serialise it: over 2 GB) or from a path. Failures become `ValidationError`s with one
line naming which model failed; `hint` says what the user can do.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import onnx

from ..errors import ValidationError
from ..graph.irmodel import IRModel
from ..graph.protos import PROTOBUF_LIMIT, first_line, serialized_size

ModelSource = onnx.ModelProto | IRModel | str | os.PathLike[str] | bytes


def session_options(threads: int | None = None, optimize: bool = True, quiet: bool = True) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4 if quiet else 3  # errors become our one-line message, not ORT's log lines
    if threads is not None:  # timing: fixed threads, sequential execution
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    return opts


def ort_session(
    model: ModelSource, what: str = "", *, tmpdir: str | None = None, threads: int | None = None,
    optimize: bool = True, hint: str = "",
) -> Any:
    """An `onnxruntime.InferenceSession` on CPU. `tmpdir`: where a model over 2 GB is saved first (it
    must outlive the session's creation); without it such a model is refused."""
    import onnxruntime as ort

    opts = session_options(threads, optimize)
    try:
        if isinstance(model, (onnx.ModelProto, IRModel)):
            big = model.over_protobuf_limit() if isinstance(model, IRModel) else serialized_size(model) > PROTOBUF_LIMIT
            if big:
                if tmpdir is None:
                    raise ValidationError(f"the {what} model is over 2 GB; save it to a file first")
                from ..graph.save import save_model

                path = os.path.join(tmpdir, f"{what or 'model'}.onnx")
                save_model(model, path, external_data=True)
                return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
            proto = model.to_proto(model.loaded_tensors()) if isinstance(model, IRModel) else model
            return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        src = model if isinstance(model, bytes) else str(model)
        return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    except ValidationError:
        raise
    except Exception as e:  # noqa: BLE001 - onnxruntime raises several unrelated exception types
        raise ValidationError(
            f"the {what} model does not load in onnxruntime ({first_line(e)})" + (f"; {hint}" if hint else "")
        ) from None


@contextmanager
def session_folder() -> Iterator[str]:
    """A temporary folder for models that must be saved before onnxruntime can load them."""
    with tempfile.TemporaryDirectory(prefix="onnx-tucker-") as tmp:
        yield tmp
