"""onnx-tucker: one-shot Tucker-2 / SVD compression of ONNX CNNs (Kim et al., ICLR 2016).

    import onnx_tucker as ot
    result = ot.compress("model.onnx", ot.CompressionConfig(), output="model.tucker.onnx")
    print(result.totals.macs_ratio, result.validation.outputs[0].cosine)
"""

# Fine-tuning (issue 8): the sub-package is callable, ot.finetune(...); torch is imported only when it runs.
from . import finetune
from .api import CompressionResult, ModelTotals, compress, plan, validate
from .config import CompressionConfig, RankPolicy
from .errors import (
    ModelLoadError,
    ModelSaveError,
    OnnxTuckerError,
    PlanError,
    RewriteError,
    UsageError,
    ValidationError,
)
from .finetune import EpochStats, FinetuneConfig, FinetuneResult
from .numerics.evbmf import EVBMFEstimate, select_rank_evbmf
from .numerics.tucker import truncated_svd, tucker1, tucker2
from .plan.planner import CompressionPlan, LayerPlan
from .runtime.validate import OutputComparison, ValidationReport

__version__ = "0.1.0"

__all__ = [
    "CompressionConfig",
    "CompressionPlan",
    "CompressionResult",
    "EVBMFEstimate",
    "EpochStats",
    "FinetuneConfig",
    "FinetuneResult",
    "LayerPlan",
    "ModelLoadError",
    "ModelSaveError",
    "ModelTotals",
    "OnnxTuckerError",
    "OutputComparison",
    "PlanError",
    "RankPolicy",
    "RewriteError",
    "UsageError",
    "ValidationError",
    "ValidationReport",
    "compress",
    "finetune",
    "plan",
    "select_rank_evbmf",
    "truncated_svd",
    "tucker1",
    "tucker2",
    "validate",
]
