"""Optic: a gRPC inference server for computer-vision models on onnxruntime."""

__version__ = "0.1.0"
