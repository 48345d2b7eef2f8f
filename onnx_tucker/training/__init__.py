"""Fine-tuning a compressed ONNX model: ONNX -> torch (onnx2torch) -> train -> ONNX (the paper's step 3).

    import onnx_tucker as ot
    r = ot.finetune("model.tucker.onnx", "model.ft.onnx", "train/", teacher="model.onnx",
                    config=ot.FinetuneConfig(epochs=3, optimizer="adam"))
    print(r.accuracy_before, r.accuracy_after)

torch and onnx2torch are imported only when `finetune` runs (the `finetune` extra); the function
itself (`training.run.finetune`, and `finetune_model` in memory) is loaded on first use, so building a `FinetuneConfig` or reading a
`FinetuneResult` loads neither onnx2torch nor the training code. `python -m onnx_tucker.training`
is `onnx-tucker finetune` (for torchrun).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import (
    EpochStats,
    FinetuneConfig,
    FinetuneInterrupted,
    FinetuneResult,
    FinetuneStep,
    TrainedSegment,
)

if TYPE_CHECKING:
    from .run import finetune, finetune_model


def __getattr__(name: str) -> Any:
    if name in ("finetune", "finetune_model"):  # PEP 562: the training code (onnx, the converters) on first use
        value = getattr(importlib.import_module(".run", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["EpochStats", "FinetuneConfig", "FinetuneInterrupted", "FinetuneResult", "FinetuneStep", "TrainedSegment", "finetune", "finetune_model"]
