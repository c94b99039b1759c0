"""The environment report: Python, torch, CUDA devices, disk, the stack's versions, the converter."""

from __future__ import annotations

import platform
import shutil
from importlib import metadata

from pydantic import Field

from forge.config import StageConfig
from forge.converter import find_converter, llama_cpp_version
from forge.paths import allowed_roots, forge_home

STACK = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "safetensors",
         "tokenizers", "llama-cpp-python", "huggingface-hub", "liger-kernel", "mcp", "pydantic")
LOW_DISK_BYTES = 20 * 1024**3


class EnvConfig(StageConfig):
    check_converter: bool = Field(True, description="Report whether llama.cpp's converter is available.")


def versions() -> dict[str, str | None]:
    out = {}
    for name in STACK:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def environment(config: EnvConfig | None = None) -> dict:
    import torch

    config = config or EnvConfig()
    warnings = []
    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            props = torch.cuda.get_device_properties(i)
            devices.append({"index": i, "name": props.name, "total_bytes": total, "free_bytes": free,
                            "bf16": torch.cuda.is_bf16_supported(), "capability": f"{props.major}.{props.minor}"})
    else:
        warnings.append("no CUDA device: training runs on the CPU, which suits only tiny models")
    home = forge_home()
    disk = shutil.disk_usage(home)
    if disk.free < LOW_DISK_BYTES:
        warnings.append(f"only {disk.free / 1024**3:.1f} GiB free at {home}; a 7B merge and its GGUFs need ~40 GiB")
    vers = versions()
    for name in ("trl", "peft", "llama-cpp-python"):
        if vers[name] is None:
            warnings.append(f"{name} is not installed")
    converter = find_converter() if config.check_converter else None
    if config.check_converter and converter is None:
        warnings.append("llama.cpp's converter is not cached yet; forge quantize fetches it on first use "
                        "(or set LLAMA_CPP_DIR)")
    return {
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda, "devices": devices,
        "forge_home": str(home),
        # every path a tool reads or writes lies under one of these (FORGE_HOME, then FORGE_ALLOWED_ROOTS)
        "allowed_roots": [str(root) for root in allowed_roots()],
        "disk_free_bytes": disk.free, "disk_total_bytes": disk.total,
        "versions": vers, "llama_cpp_version": llama_cpp_version(),
        "converter_available": converter is not None, "converter_dir": str(converter) if converter else None,
        "warnings": warnings,
    }
