"""Fine-tuning a compressed ONNX model: ONNX -> torch (onnx2torch) -> train -> ONNX (the paper's step 3).

    import onnx_tucker as ot
    r = ot.finetune("model.tucker.onnx", "model.ft.onnx", "train/", teacher="model.onnx",
                    config=ot.FinetuneConfig(epochs=3, optimizer="adam"))
    print(r.accuracy_before, r.accuracy_after)

torch and onnx2torch are imported only when `finetune` runs (the `finetune` extra).
`onnx_tucker.finetune` is both this package and the function: calling the module calls
`finetune()`, so `onnx_tucker.finetune(...)` and `onnx_tucker.finetune.FinetuneConfig` both work.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from .config import EpochStats, FinetuneConfig, FinetuneInterrupted, FinetuneResult, FinetuneStep


def finetune(*args: Any, **kwargs: Any) -> FinetuneResult:
    import warnings

    from .run import finetune as _run

    with warnings.catch_warnings():
        # onnx2torch's converted modules warn on every call (tensor indexing with a list); not actionable.
        warnings.filterwarnings("ignore", module=r"onnx2torch(\.|$)")
        return _run(*args, **kwargs)


finetune.__doc__ = """See onnx_tucker.finetune.run.finetune."""


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> FinetuneResult:
        return finetune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["EpochStats", "FinetuneConfig", "FinetuneInterrupted", "FinetuneResult", "FinetuneStep", "finetune"]
