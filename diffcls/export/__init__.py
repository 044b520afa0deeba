"""Export: torch -> ONNX per component; ONNX -> TensorRT engines; the manifest and invalidation.

    from diffcls.export import ExportConfig, export_model
    export_model(ExportConfig(out="engines/", model="models/sd21", backend="onnxruntime"))
"""

from diffcls.engines.manifest import read_manifest, verify_engine_dir
from diffcls.export.pipeline import ExportConfig, ExportResult, SpinnerReporter, StepEvent, export_model

__all__ = ["ExportConfig", "ExportResult", "SpinnerReporter", "StepEvent", "export_model", "read_manifest", "verify_engine_dir"]
