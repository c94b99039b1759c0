"""Device facts the stages share: which accelerator, which dtype, peak memory."""

from __future__ import annotations

import resource
import sys


def device_kind() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def train_dtype():
    """bf16 where the GPU supports it, fp16 on older GPUs, fp32 on CPU (fast CPU matmuls are fp32)."""
    import torch

    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def peak_rss_bytes() -> int:
    """This process's peak resident memory. On Linux VmHWM, not ru_maxrss: ru_maxrss survives exec,
    so a worker started by a big parent would report the parent's peak."""
    try:
        with open("/proc/self/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage if sys.platform == "darwin" else usage * 1024


def peak_memory_bytes() -> dict:
    """Peak CUDA allocation on GPU, peak resident set on CPU."""
    import torch

    if torch.cuda.is_available():
        return {"kind": "cuda_max_allocated", "bytes": int(torch.cuda.max_memory_allocated())}
    return {"kind": "cpu_peak_rss", "bytes": peak_rss_bytes()}


def hardware_summary() -> dict:
    import platform

    import torch

    out = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": _cpus(),
           "device": device_kind()}
    if torch.cuda.is_available():
        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return out


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
