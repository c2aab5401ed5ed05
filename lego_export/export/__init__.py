"""Exporter: one ONNX (and TensorRT) engine per brick plus the conditioning embedder, and the manifest."""
