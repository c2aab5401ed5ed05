"""PyTorch -> ONNX for one brick or the conditioning embedder, graph clean-up, fusions, fp16.

Every graph has a dynamic batch dimension N and static spatial dimensions: a brick engine takes
(N, C_in, r, r) tiles and (N, D) conditioning and returns (N, C, r, r) tiles.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from unittest import mock

import onnx
import torch
from torch import Tensor, nn

from lego_export import contract
from lego_export.errors import LegoError
from lego_export.model import Attention, Brick, ConditionEmbedder

DEFAULT_OPSET = 17

# fp16 export: only the matrix products of attention, MLP, patch embedding and output projection run
# in half precision; LayerNorm, softmax, adaLN modulation, gates and residual adds stay fp32.
FP16_SCOPES = ("/attn/", "/mlp/", "/patch_embed/", "/final/linear/")
FP32_OPS = {"Softmax", "LayerNormalization", "ReduceMean", "Pow", "Sqrt", "Div", "Exp", "Sigmoid"}


class EmbedderGraph(nn.Module):
    """The conditioning embedder as an engine: c_noise (N,) [+ class one-hot (N, K)] -> cond (N, D)."""

    def __init__(self, embedder: ConditionEmbedder):
        super().__init__()
        self.embedder = embedder

    def forward(self, c_noise: Tensor, class_onehot: Tensor | None = None) -> Tensor:
        return self.embedder(c_noise, class_onehot)


def quiet_exporter():
    """Silence the exporters' and graph tools' chatter; errors still raise."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    try:
        from polygraphy.logger import G_LOGGER

        G_LOGGER.module_severity = G_LOGGER.ERROR
    except ImportError:
        pass
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    return stack


def export_module(
    module: nn.Module,
    example: tuple[Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    path: Path,
    opset: int = DEFAULT_OPSET,
) -> None:
    """Trace module to ONNX with the first dimension of every input and output dynamic ("N").

    The TorchScript-based exporter is used on purpose: it reproduced bricks to ~1e-7, where the
    dynamo exporter produced graphs ONNX Runtime rejected at other batch sizes.
    """
    dynamic = {name: {0: "N"} for name in input_names + output_names}
    with quiet_exporter(), torch.no_grad():
        torch.onnx.export(
            module.eval(),
            example,
            str(path),
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic,
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
        )


def clean_graph(path: Path) -> None:
    """Fold constants (shape arithmetic on the static dimensions included) and infer shapes, in place."""
    from polygraphy.backend.onnx import fold_constants, infer_shapes

    with quiet_exporter():
        model = onnx.load(str(path))
        model = fold_constants(model, fold_shapes=True, partitioning="recursive", error_ok=False)
        model = infer_shapes(model, error_ok=False)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


class _MultiHeadAttention(torch.autograd.Function):
    """Attention math in eager mode; ONNX Runtime's fused MultiHeadAttention contrib op when exported."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:  # noqa: ARG004
        n, t, w = q.shape
        q, k, v = (z.reshape(n, t, heads, w // heads).transpose(1, 2) for z in (q, k, v))
        x = ((q @ k.transpose(-2, -1)) * (w // heads) ** -0.5).softmax(dim=-1) @ v
        return x.transpose(1, 2).reshape(n, t, w)

    @staticmethod
    def symbolic(g, q, k, v, heads):
        out = g.op("com.microsoft::MultiHeadAttention", q, k, v, num_heads_i=heads)
        out.setType(q.type())
        return out


def _fused_attention_forward(self: Attention, x: Tensor) -> Tensor:
    q, k, v = self.qkv(x).chunk(3, dim=-1)
    return self.proj(_MultiHeadAttention.apply(q, k, v, self.heads))


def onnxruntime_attention() -> contextlib.AbstractContextManager:
    """While active, Attention modules export as com.microsoft::MultiHeadAttention."""
    return mock.patch.object(Attention, "forward", _fused_attention_forward)  # restores the method on exit


def export_onnxruntime_fused(brick: Brick, example: tuple[Tensor, ...], path: Path, opset: int) -> None:
    """A brick graph for ONNX Runtime only: fused attention, then ORT's transformer fusions
    (SkipLayerNormalization, FastGelu/BiasGelu). Runs on ORT's CPU and CUDA providers, not in TensorRT.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    with onnxruntime_attention():
        export_module(brick, example, [contract.TILES, contract.COND], [contract.OUT], path, opset)
    clean_graph(path)
    with quiet_exporter():
        # opt_level=0: pattern fusions only, no provider-specific graph rewrites, so the file stays
        # loadable by any ORT provider.
        optimized = optimize_model(
            str(path), model_type="vit", num_heads=brick.cfg.heads, hidden_size=brick.cfg.width, opt_level=0
        )
        optimized.save_model_to_file(str(path))


def convert_fp16(src: Path, dst: Path) -> None:
    """Half-precision matrix products, everything numerically delicate kept fp32; fp32 inputs/outputs."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnx.load(str(src))
    keep_fp32 = [
        node.name
        for node in model.graph.node
        if node.op_type in FP32_OPS or not any(scope in node.name for scope in FP16_SCOPES)
    ]
    with quiet_exporter():
        wrapper = OnnxModel(model)
        wrapper.convert_float_to_float16(keep_io_types=True, node_block_list=keep_fp32, op_block_list=list(FP32_OPS))
    onnx.save(wrapper.model, str(dst))


def check_opset(opset: int) -> None:
    if not 14 <= opset <= 20:
        raise LegoError(f"--opset {opset} is not supported; use 14 to 20 (default {DEFAULT_OPSET})")
