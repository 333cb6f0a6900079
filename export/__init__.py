"""Optic's export stage: synthetic data, torch models, training, ONNX export (needs the ``export`` extra)."""
