"""Runners: one small interface over every backend (in the spirit of Polygraphy's runners).

A runner loads one engine file and maps named numpy inputs to named numpy outputs::

    runner = OnnxRuntimeRunner("engines/brick0.onnx")
    outputs = runner.infer({"tiles": tiles, "cond": cond})
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lego_export.errors import LegoError


class OnnxRuntimeRunner:
    """ONNX Runtime session over one .onnx file; CPU provider unless told otherwise."""

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError:
            raise LegoError("the onnxruntime backend needs the onnxruntime package (pip install onnxruntime)") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        # Bricks run one after another, each in its own session: a session whose threads keep
        # spinning after a call steals the cores from the next brick's session.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types for unreadable graphs
            raise LegoError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0]}") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, {k: feeds[k] for k in self.input_names})
        return dict(zip(self.output_names, outputs, strict=True))
