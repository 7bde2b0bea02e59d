"""Deployment: the quantized model out of the research framework (ONNX QDQ for ONNX Runtime / TensorRT)."""
from .onnx_export import QDQExportError, export_onnx, graph_counts, ort_session

__all__ = ["QDQExportError", "export_onnx", "graph_counts", "ort_session"]
