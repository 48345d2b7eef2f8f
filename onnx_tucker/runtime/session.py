"""The session factory the stages use: an onnxruntime CPU session from a model in any form.

From a `ModelProto` (serialised in memory, or saved with external data to a temporary folder when
protobuf cannot serialise it: over 2 GB) or from a path. Failures become `ValidationError`s with one
line naming which model failed; `hint` says what the user can do. The session itself is constructed
in `onnx_tucker.ort` (the one `InferenceSession` call, shared with the graph layer's fallbacks).
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
from ..ort import inference_session, session_options

ModelSource = onnx.ModelProto | IRModel | str | os.PathLike[str] | bytes


def ort_session(
    model: ModelSource, what: str = "", *, tmpdir: str | None = None, threads: int | None = None,
    optimize: bool = True, hint: str = "", quiet: bool = True, options: Any = None,
) -> Any:
    """An `onnxruntime.InferenceSession` on CPU. `tmpdir`: where a model over 2 GB is saved first (it
    must outlive the session's creation); without it such a model is refused. `options`: prepared
    `SessionOptions` (profiling) instead of those `threads`, `optimize` and `quiet` make."""
    import onnxruntime  # noqa: F401 - a missing onnxruntime stays an ImportError, not "does not load"

    opts = options if options is not None else session_options(threads, optimize, quiet)
    try:
        if isinstance(model, (onnx.ModelProto, IRModel)):
            big = model.over_protobuf_limit() if isinstance(model, IRModel) else serialized_size(model) > PROTOBUF_LIMIT
            if big:
                if tmpdir is None:
                    raise ValidationError(f"the {what} model is over 2 GB; save it to a file first")
                from ..graph.save import save_model

                path = os.path.join(tmpdir, f"{what or 'model'}.onnx")
                save_model(model, path, external_data=True)
                return inference_session(path, opts)
            proto = model.to_proto(model.loaded_tensors()) if isinstance(model, IRModel) else model
            return inference_session(proto.SerializeToString(), opts)
        src = model if isinstance(model, bytes) else str(model)
        return inference_session(src, opts)
    except ValidationError:
        raise
    except Exception as e:  # noqa: BLE001 - onnxruntime raises several unrelated exception types
        raise ValidationError(
            f"the {what} model does not load in onnxruntime ({first_line(e)})" + (f"; {hint}" if hint else "")
        ) from None


__all__ = ["ModelSource", "ort_session", "session_folder", "session_options"]


@contextmanager
def session_folder() -> Iterator[str]:
    """A temporary folder for models that must be saved before onnxruntime can load them."""
    with tempfile.TemporaryDirectory(prefix="onnx-tucker-") as tmp:
        yield tmp
