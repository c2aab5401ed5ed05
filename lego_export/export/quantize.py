"""int8 brick graphs for CPUs: ONNX Runtime static quantization (QDQ), calibrated on real chain inputs.

The weight matrix products of attention (qkv, proj) and of the MLP run in int8: weights int8,
symmetric, one scale per output channel; activations uint8, asymmetric, one range per tensor,
taken from the model's own chain inputs (export/verify.py records them). Their outputs stay fp32
(the quantizer would round them to uint8 again before the bias add: 20-45% more rms
error, no speed gained). Everything else stays fp32, for the reasons in KEEP_FP32. A QDQ graph is
plain ONNX: ONNX Runtime and OpenVINO both run its int8 matrix products as integer arithmetic.

Before quantizing, each brick is *smoothed* (SmoothQuant, Xiao et al. 2023): the inputs of qkv and
of the MLP's first layer are adaLN-modulated tokens whose few outlier channels would set the range
of the whole tensor. Dividing channel j by s_j and multiplying the weights it meets by s_j leaves
the function unchanged; the division folds into the adaLN rows that make that channel's shift and
scale, so no node is added and the speed is that of the unsmoothed graph.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
from pathlib import Path
from typing import cast

import numpy as np
import onnx
import torch
from torch import nn

from lego_export import contract
from lego_export.export import onnx as onnx_export
from lego_export.model import Brick, DiTBlock

# Operators quantized; every other operator (LayerNorm, softmax, GELU, residual adds and gates, the
# patch-embedding convolution over 3-4 input channels) stays fp32.
QUANTIZED_OPS = ("MatMul", "Gemm")

# Matrix products that stay fp32 even so, matched against the exported graph's node names.
KEEP_FP32 = (
    # scores q k^T and the softmax-weighted sum of values: both operands are activations whose
    # range changes with every tile, and the softmax amplifies score errors exponentially
    ("attention products", r"/attn/MatMul"),
    # adaLN: shift, scale and gate of every token come from this layer; an error here multiplies
    # every activation after it (and it is cheap: one row per tile, not per token)
    ("adaLN modulation", r"/ada_ln/"),
    # the output projection: its error is the brick's output error, no later layer absorbs it
    ("final projection", r"/final/linear/"),
)

# Activations outside the build's verification set: seed 1 where verification records seed 0, so
# the int8 graphs are verified on inputs they were not calibrated on.
CALIBRATION_IMAGES = 32
CALIBRATION_SEED = 1
# Share of an outlier moved from the activation into the weights (0: none, 1: all). 0.7 measured
# best on the shipped model's bricks (0.5-0.85 within noise of each other, all better than none).
SMOOTHING = 0.7


def build_record() -> dict:
    """How an int8 file was made, for its manifest entry's build field."""
    import onnxruntime

    return {
        "quantizer": f"onnxruntime {onnxruntime.__version__} quantize_static, QDQ, 7-bit weights",
        "weights": "int8, symmetric, per output channel",
        "activations": "uint8, asymmetric, per tensor, MinMax calibration",
        "calibration_images": CALIBRATION_IMAGES,
        "calibration_seed": CALIBRATION_SEED,
        "smoothing_alpha": SMOOTHING,
        "kept_fp32": [name for name, _ in KEEP_FP32],
    }


def fp32_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the quantizable nodes that KEEP_FP32 keeps in fp32."""
    pattern = re.compile("|".join(rule for _, rule in KEEP_FP32))
    return [n.name for n in model.graph.node if n.op_type in QUANTIZED_OPS and pattern.search(n.name)]


def _calibration_reader(rows: dict[str, np.ndarray], chunk: int = 256):
    """quantize_static's data reader over one brick's recorded input rows, chunk rows at a time."""
    from onnxruntime.quantization import CalibrationDataReader

    class RecordedInputs(CalibrationDataReader):
        def __init__(self):
            n = next(iter(rows.values())).shape[0]
            self.starts = iter(range(0, n, chunk))

        def get_next(self):
            i = next(self.starts, None)
            if i is None:
                return None
            return {k: np.ascontiguousarray(v[i : i + chunk], np.float32) for k, v in rows.items()}

    return RecordedInputs()


@contextlib.contextmanager
def _quiet():
    """quantize_static advises pre-processing on the root logger at every call: not needed here (the
    graphs are constant-folded and shape-inferred already)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with onnx_export.quiet_exporter():
            yield
    finally:
        root.setLevel(level)


# 7-bit weights: CPUs without VNNI (AVX2, AVX-512F) multiply u8 x s8 pairs into int16 with
# saturation, which full-range weights overflow (measured on an AVX2 machine: 0.35 of the output scale
# on a test brick, against 0.011 with 7 bits); a file runs on any CPU, so it is built for all of them.
REDUCE_RANGE = True


def quantize_brick(src: str | Path, dst: str | Path, recorded_inputs: dict[str, np.ndarray]) -> None:
    """Write dst: the fp32 brick graph src with QDQ int8 matrix products, ranges from recorded_inputs
    (input name -> rows, as recorded by export/verify.py)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with _quiet():
        quantize_static(
            str(src),
            str(dst),
            _calibration_reader(recorded_inputs),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS),
            nodes_to_exclude=fp32_nodes(onnx.load(str(src))),
            per_channel=True,
            reduce_range=REDUCE_RANGE,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={
                "ActivationSymmetric": False,
                "WeightSymmetric": True,
                "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS),
            },
        )


@torch.no_grad()
def smoothed(brick: Brick, recorded_inputs: dict[str, np.ndarray], alpha: float = SMOOTHING) -> Brick:
    """A copy of brick that computes the same function with its outlier activation channels moved
    into the weights of qkv and of the MLP's first layer (see the module's docstring).

    Their input is modulate(LN(x)) = LN(x) (1 + scale) + shift, with shift and scale affine in the
    conditioning; for x / s: shift' = shift / s and scale' = (1 + scale) / s - 1, i.e. the adaLN
    rows of channel j divided by s_j and (1 / s_j - 1) added to the scale bias.
    """
    brick = copy.deepcopy(brick).float().eval()
    blocks = [cast(DiTBlock, b) for b in brick.blocks]
    # (linear, its adaLN layer, index of its shift chunk, index of its scale chunk), as in DiTBlock
    targets = [(b.attn.qkv, cast(nn.Linear, b.ada_ln[-1]), 0, 1) for b in blocks]
    targets += [(cast(nn.Linear, b.mlp[0]), cast(nn.Linear, b.ada_ln[-1]), 3, 4) for b in blocks]
    peak = {lin: torch.zeros(lin.in_features) for lin, *_ in targets}

    def observe(module, inputs, _output):
        x = inputs[0].abs().reshape(-1, inputs[0].shape[-1]).amax(0)
        peak[module] = torch.maximum(peak[module], x)

    hooks = [lin.register_forward_hook(observe) for lin, *_ in targets]
    try:
        tiles, cond = (torch.from_numpy(recorded_inputs[k]) for k in ("tiles", "cond"))
        for i in range(0, tiles.shape[0], 256):
            brick(tiles[i : i + 256], cond[i : i + 256])
    finally:
        for h in hooks:
            h.remove()

    for lin, ada, shift_chunk, scale_chunk in targets:
        w = lin.in_features
        weight_peak = lin.weight.abs().amax(0)
        s = peak[lin].pow(alpha) / weight_peak.pow(1 - alpha)
        s = torch.where((peak[lin] > 1e-6) & (weight_peak > 1e-6), s, torch.ones_like(s)).clamp(1e-3, 1e3)
        lin.weight.mul_(s)  # (out, in): column j times s_j
        shift, scale = slice(shift_chunk * w, (shift_chunk + 1) * w), slice(scale_chunk * w, (scale_chunk + 1) * w)
        ada.weight[shift] /= s[:, None]
        ada.bias[shift] /= s
        ada.weight[scale] /= s[:, None]
        ada.bias[scale] = (ada.bias[scale] + 1) / s - 1
    return brick


def export_int8(
    brick: Brick, example: tuple[torch.Tensor, ...], recorded_inputs: dict[str, np.ndarray], dst: Path, opset: int
) -> None:
    """brick -> dst, an int8 QDQ graph: smoothed, exported and cleaned like the fp32 graph, quantized."""
    fp32 = dst.with_name(dst.name + ".smoothed.onnx")  # beside dst, in the build's staging folder
    try:
        onnx_export.export_module(
            smoothed(brick, recorded_inputs), example, [contract.TILES, contract.COND], [contract.OUT], fp32, opset
        )
        onnx_export.clean_graph(fp32)
        quantize_brick(fp32, dst, recorded_inputs)
    finally:
        fp32.unlink(missing_ok=True)
