"""Disk space: what each stage is about to write, checked against what is free before it starts, and
a full disk met mid-stage reported as ``disk_full`` (path, free, needed) instead of whatever the
library that hit it said.

Estimates err on the high side: a refused start costs the user a minute; a stage killed by a full
disk halfway costs them the stage and leaves them guessing.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

from forge.errors import Codes, ForgeError
from forge.paths import fresh_temp

MIB = 1024 * 1024
SLACK_ENV = "FORGE_DISK_SLACK_MIB"
DEFAULT_SLACK_MIB = 64  # logs, configs, tokenizer files, and room for the job store to record the outcome
# Below this much free space, an I/O failure is taken for a full disk.
LOW_WATER = 32 * MIB
# Bytes per parameter of each GGUF type (llama.cpp's block sizes, rounded up).
GGUF_BYTES_PER_PARAM = {"F32": 4.0, "F16": 2.0, "BF16": 2.0, "Q8_0": 1.07, "Q6_K": 0.83, "Q5_K_M": 0.72,
                        "Q5_K_S": 0.69, "Q5_0": 0.69, "Q5_1": 0.75, "Q4_K_M": 0.61, "Q4_K_S": 0.57, "Q4_0": 0.57,
                        "Q4_1": 0.63, "Q3_K_M": 0.49, "Q3_K_S": 0.44, "Q3_K_L": 0.53, "Q2_K": 0.41}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem holding ``path`` (or its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _mib(n: float) -> str:
    return f"{n / MIB:,.1f} MiB"


def disk_full(path: Path, needed: int | None = None, what: str = "this stage") -> ForgeError:
    free = free_bytes(path)
    needed_text = _mib(needed) if needed is not None else "more than was left"
    return ForgeError(Codes.DISK_FULL,
                      f"{what} needs {needed_text} at {path}, and only {_mib(free)} is free",
                      "free space on that disk (old runs under $FORGE_HOME/runs, checkpoints, caches) or point "
                      "FORGE_HOME at a bigger disk, then start the job again (a train job resumes from its last "
                      "checkpoint)", retryable=True,
                      details=[f"path: {path}", f"free_bytes: {free}", f"needed_bytes: {needed}"])


def slack() -> int:
    """Bytes kept free beyond a stage's estimate: FORGE_DISK_SLACK_MIB (default 64)."""
    try:
        return max(0, int(float(os.environ.get(SLACK_ENV) or DEFAULT_SLACK_MIB) * MIB))
    except ValueError:
        return DEFAULT_SLACK_MIB * MIB


def ensure_space(path: Path, needed: int, what: str) -> None:
    """Refuse to start a stage that would not fit: ``needed`` bytes plus the slack must be free at ``path``."""
    if free_bytes(path) < needed + slack():
        raise disk_full(Path(path), needed + slack(), what)


def is_disk_full(exc: BaseException, path: Path | None = None) -> bool:
    """An exception that is (or most likely comes from) a full disk."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left on device" in str(exc):
        return True
    return path is not None and free_bytes(path) < LOW_WATER


# ---- estimates: what each stage writes ----

def weights_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors")) or \
        sum(p.stat().st_size for p in Path(model_dir).glob("*.bin"))


def _config(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def parameter_count(model_dir: Path) -> int:
    """Parameters of a local model, from its weights' size and dtype (2 bytes each when unknown)."""
    dtype = str(_config(model_dir).get("dtype") or _config(model_dir).get("torch_dtype") or "bfloat16")
    return weights_bytes(model_dir) // DTYPE_BYTES.get(dtype.replace("torch.", ""), 2)


def train_bytes(model_dir: Path | None, lora_r: int, save_total_limit: int) -> int:
    """An adapter (fp32) and the checkpoints kept (each the adapter plus AdamW's two moments)."""
    cfg = _config(model_dir) if model_dir else {}
    h, i, layers = cfg.get("hidden_size"), cfg.get("intermediate_size"), cfg.get("num_hidden_layers")
    if h and i and layers:
        heads, kv_heads = cfg.get("num_attention_heads") or 1, cfg.get("num_key_value_heads") or 1
        kv = h * kv_heads // heads
        adapter = 4 * lora_r * layers * (9 * h + 2 * kv + 3 * i)  # A and B of q, k, v, o, gate, up, down
    else:  # a hub model or an unknown shape: 2% of the weights, or 200 MiB
        adapter = max(weights_bytes(model_dir) // 50 if model_dir else 0, 200 * MIB)
    return int(adapter * (1 + 3.2 * (save_total_limit + 1)))


def merge_bytes(base_dir: Path, dtype: str | None) -> int:
    size = weights_bytes(base_dir)
    base_dtype = str(_config(base_dir).get("dtype") or "bfloat16").replace("torch.", "")
    if dtype and dtype in DTYPE_BYTES and base_dtype in DTYPE_BYTES:
        size = size * DTYPE_BYTES[dtype] // DTYPE_BYTES[base_dtype]
    return size


def quantize_bytes(model_dir: Path, outtype: str, quantizations: list[str]) -> int:
    params = parameter_count(model_dir)
    types = [outtype.upper(), *(q.upper() for q in quantizations)]
    return int(sum(params * GGUF_BYTES_PER_PARAM.get(t, 2.0) for t in types))


# ---- the reserve: room kept aside so a job can still record that the disk filled up ----

RESERVE_NAME = ".disk-reserve"
RESERVE_BYTES = 4 * MIB


def ensure_reserve(home: Path) -> bool:
    """Keep a few MiB in a file under FORGE_HOME, to be freed when the disk fills so that the job store
    can still record the outcome. Returns whether the reserve is in place."""
    path = Path(home) / RESERVE_NAME
    if path.is_file() and path.stat().st_size == RESERVE_BYTES:
        return True
    if free_bytes(home) < RESERVE_BYTES + slack():
        return False
    try:
        fh, tmp = fresh_temp(home, f"{RESERVE_NAME}.")
    except OSError:
        return False
    try:
        with fh:
            fh.write(b"\0" * RESERVE_BYTES)
        tmp.replace(path)
    except OSError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


def release_reserve(home: Path) -> bool:
    """Free the reserve (the disk is full and something must still be written); True if there was one."""
    path = Path(home) / RESERVE_NAME
    if path.is_file():
        path.unlink()
        return True
    return False
