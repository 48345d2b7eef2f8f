"""ORT mobile readiness, from onnxruntime's own usability checker (its functions, not its log).

For each model: which nodes the NNAPI and CoreML execution providers would take and in how many
partitions, as the model is and as if its dynamic dims were fixed. The model is first optimised
at the BASIC level, as `check_onnx_model_mobile_usability` does (and as the ORT-format conversion
does before the EPs see it).
"""

from __future__ import annotations

import pathlib
import tempfile

from ..graph.protos import first_line
from .results import PartitionInfo

EPS = ("NNAPI", "CoreML NeuralNetwork", "CoreML MLProgram")


def partitions(model_path: str) -> tuple[PartitionInfo, ...]:
    """Partition info per EP, as is and with fixed shapes; raises on a model the checker cannot read."""
    from .adapters import import_ort_tool

    uc = import_ort_tool("mobile_helpers.usability_checker")
    utils = import_ort_tool("onnx_model_utils")
    ModelProtoWithShapeInfo, optimize_model = utils.ModelProtoWithShapeInfo, utils.optimize_model

    def coreml(config: str):  # type: ignore[no-untyped-def]
        return lambda m, fixed: uc.check_coreml_partitions(m, fixed, config)

    checks = {
        "NNAPI": uc.check_nnapi_partitions,
        "CoreML NeuralNetwork": coreml("coreml_supported_neuralnetwork_ops.md"),
        "CoreML MLProgram": coreml("coreml_supported_mlprogram_ops.md"),
    }
    found = []
    with tempfile.TemporaryDirectory(prefix="onnx-tucker-ortm-") as tmp:
        optimized = pathlib.Path(tmp) / "model.onnx"
        optimize_model(pathlib.Path(model_path), optimized, use_external_initializers=True)
        model = ModelProtoWithShapeInfo(optimized).model_with_shape_info
        for ep in EPS:
            # require_fixed_input_sizes=True: the model as it is (a dynamic dim stops the EP);
            # False: what the checker reports "if the dynamic shapes are fixed".
            for fixed in (False, True):
                info = checks[ep](model, not fixed)
                found.append(PartitionInfo(
                    ep=ep, fixed_shapes=fixed, nodes=info.num_nodes, supported_nodes=info.num_supported_nodes,
                    partitions=info.num_partitions, unsupported_ops=tuple(sorted(info.unsupported_ops)),
                    suitability=info.suitability().name,
                ))
    return tuple(found)


def safe_partitions(model_path: str) -> tuple[tuple[PartitionInfo, ...], str | None]:
    try:
        return partitions(model_path), None
    except Exception as e:  # noqa: BLE001 - the checker is best effort; its failure is a finding
        return (), f"usability checker failed ({first_line(e)})"
