"""The one place an onnxruntime `InferenceSession` is constructed (CPU provider, our options).

Below every stage: it imports nothing of the package but `errors`, so the graph layer (its
onnxruntime fallbacks: does a model onnx.checker rejects load? a constant subgraph the reference
evaluator cannot run) and `runtime/` (`runtime.session.ort_session`, the model-aware factory the
stages use: IRModel, models over 2 GB) build sessions the same way without importing each other.
onnxruntime itself is imported only when a session is made.
"""

from __future__ import annotations

from typing import Any

from .errors import ValidationError, first_line


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


def inference_session(source: bytes | str, options: Any) -> Any:
    """A CPU session on serialised model bytes or a path; onnxruntime's own exception on failure (for
    callers with their own message)."""
    import onnxruntime as ort

    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def new_session(source: bytes | str, what: str = "", *, options: Any = None, threads: int | None = None,
                optimize: bool = True, quiet: bool = True, hint: str = "") -> Any:
    """`inference_session` with our options (or `options`); a failure becomes one `ValidationError` line
    naming the `what` model, with `hint` (what the user can do) after it."""
    import onnxruntime  # noqa: F401 - a missing onnxruntime stays an ImportError, not "does not load"

    opts = options if options is not None else session_options(threads, optimize, quiet)
    try:
        return inference_session(source, opts)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises several unrelated exception types
        raise ValidationError(
            f"the {what} model does not load in onnxruntime ({first_line(e)})" + (f"; {hint}" if hint else "")
        ) from None
