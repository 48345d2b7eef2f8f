"""onnx-tucker: one-shot Tucker-2 / SVD compression of ONNX CNNs (Kim et al., ICLR 2016).

    import onnx_tucker as ot
    result = ot.compress("model.onnx", ot.CompressionConfig(), output="model.tucker.onnx")
    print(result.totals.macs_ratio, result.validation.outputs[0].cosine)
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .api import bench, compress, mobile_report, plan, validate
    from .config import (
        BenchConfig,
        CalibrationConfig,
        CompressionConfig,
        InputOptions,
        LatencyConfig,
        PlanIO,
        RankOptions,
        RankPolicy,
        ValidationConfig,
    )
    from .errors import (
        ModelLoadError,
        ModelSaveError,
        OnnxTuckerError,
        PlanError,
        RewriteError,
        UsageError,
        ValidationError,
    )
    from .graph.source import SourceModel
    from .mobile.results import MobileReport, RuntimeResult
    from .numerics.evbmf import EVBMFEstimate, select_rank_evbmf
    from .numerics.tucker import truncated_svd, tucker1, tucker2
    from .planning.planner import CompressionPlan, LayerPlan, SkipCause
    from .results import CompressionResult, ModelTotals
    from .runtime.bench import LatencyReport
    from .runtime.validate import OutputComparison, ValidationReport
    from .training import EpochStats, FinetuneConfig, FinetuneResult, finetune, finetune_model

# Names are loaded on first use (PEP 562): `import onnx_tucker.numerics` must not pull in onnx,
# onnxruntime or scipy.optimize, and `onnx-tucker --help` should not pay for them either.
_EXPORTS = {
    "bench": "api", "compress": "api", "plan": "api", "validate": "api", "mobile_report": "api",
    "MobileReport": "mobile.results", "RuntimeResult": "mobile.results",
    "BenchConfig": "config", "CompressionConfig": "config", "RankPolicy": "config",
    # the option groups CompressionConfig is made of (issue 17 item 4)
    "RankOptions": "config", "PlanIO": "config", "InputOptions": "config", "ValidationConfig": "config",
    "CalibrationConfig": "config", "LatencyConfig": "config",
    "ModelLoadError": "errors", "ModelSaveError": "errors", "OnnxTuckerError": "errors", "PlanError": "errors",
    "RewriteError": "errors", "UsageError": "errors", "ValidationError": "errors",
    "EVBMFEstimate": "numerics.evbmf", "select_rank_evbmf": "numerics.evbmf",
    "truncated_svd": "numerics.tucker", "tucker1": "numerics.tucker", "tucker2": "numerics.tucker",
    "CompressionPlan": "planning.planner", "LayerPlan": "planning.planner", "SkipCause": "planning.planner",
    "SourceModel": "graph.source",
    "CompressionResult": "results", "ModelTotals": "results",
    "LatencyReport": "runtime.bench",
    # torch is imported only when `finetune` runs (training/ loads its code on first use).
    "EpochStats": "training", "FinetuneConfig": "training", "FinetuneResult": "training", "finetune": "training",
    "finetune_model": "training",
    "OutputComparison": "runtime.validate", "ValidationReport": "runtime.validate",
}


def __getattr__(name: str) -> Any:
    where = _EXPORTS.get(name)
    if where is None:
        try:  # sub-modules and sub-packages: onnx_tucker.api, onnx_tucker.graph, ...
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError:
            raise AttributeError(f"module 'onnx_tucker' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{where}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__version__ = "0.1.0"

__all__ = [
    "EpochStats",
    "FinetuneConfig",
    "FinetuneResult",
    "finetune",
    "finetune_model",
    "SkipCause",
    "SourceModel",
    "BenchConfig",
    "LatencyReport",
    "MobileReport",
    "RuntimeResult",
    "bench",
    "mobile_report",
    "CalibrationConfig",
    "CompressionConfig",
    "CompressionPlan",
    "InputOptions",
    "LatencyConfig",
    "PlanIO",
    "RankOptions",
    "ValidationConfig",
    "CompressionResult",
    "EVBMFEstimate",
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
    "plan",
    "select_rank_evbmf",
    "truncated_svd",
    "tucker1",
    "tucker2",
    "validate",
]
