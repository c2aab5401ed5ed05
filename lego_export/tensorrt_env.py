"""Is TensorRT usable here, and may this plan run here: the checks both the exporter and the runtime
backend need, below both (the runtime never imports the exporter)."""

from __future__ import annotations

from typing import Any

from lego_export.errors import LegoError
from lego_export.manifest import EngineFile


def tensorrt_environment() -> tuple[Any, str]:
    """(tensorrt module, compute capability 'major.minor'); LegoError naming what is missing."""
    try:
        import tensorrt as trt
    except ImportError:
        raise LegoError("TensorRT is not installed (pip install 'lego-export[gpu]' on an NVIDIA GPU machine)") from None
    capability = gpu_compute_capability()
    if capability is None:
        raise LegoError("TensorRT is installed but no NVIDIA GPU is visible to build plans on")
    return trt, capability


def gpu_compute_capability() -> str | None:
    """'9.0' for an H100, or None without a CUDA GPU. Uses torch if present, else cuda-python."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return f"{major}.{minor}"
        return None
    except ImportError:
        pass
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return None
    err, props = cudart.cudaGetDeviceProperties(0)
    return f"{props.major}.{props.minor}" if int(err) == 0 else None


def check_plan_compatible(file: EngineFile) -> None:
    """Refuse a plan built for another GPU architecture or TensorRT version, saying how to rebuild."""
    trt, capability = tensorrt_environment()
    built = file.build
    rebuild = "rebuild on this machine with: lego-export build --from-onnx ENGINES --target tensorrt"
    if built.get("tensorrt") != trt.__version__ and not built.get("version_compatible"):
        raise LegoError(
            f"{file.path} was built with TensorRT {built.get('tensorrt')}, this is {trt.__version__}; {rebuild}"
        )
    if built.get("compute_capability") != capability and not built.get("hardware_compatible"):
        raise LegoError(
            f"{file.path} was built for GPU compute capability {built.get('compute_capability')}, "
            f"this GPU is {capability}; {rebuild}"
        )
