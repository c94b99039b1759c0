"""Locating llama.cpp's HF→GGUF converter and its gguf-py.

The converter is not a PyPI package (PyPI's ``gguf`` is too old to run it). It ships inside the
llama-cpp-python sdist of the same version as the installed library; Forge fetches that sdist once
with pip (pip's cache makes it cheap) and extracts only ``convert_hf_to_gguf.py``,
``convert_lora_to_gguf.py``, ``conversion/`` and ``gguf-py/`` into the workspace cache. ``LLAMA_CPP_DIR``
points at a llama.cpp checkout instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

from forge.errors import Codes, ForgeError
from forge.workspace import cache_dir

CONVERTER_FILES = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion", "gguf-py")


def _complete(path: Path) -> bool:
    return all((path / name).exists() for name in CONVERTER_FILES)


def llama_cpp_version() -> str | None:
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        return None


def find_converter() -> Path | None:
    """The converter dir if it is already available (LLAMA_CPP_DIR or the cache); never downloads."""
    env_dir = os.environ.get("LLAMA_CPP_DIR")
    if env_dir:
        return Path(env_dir) if _complete(Path(env_dir)) else None
    version = llama_cpp_version()
    if version is None:
        return None
    cached = cache_dir() / f"llama.cpp-{version}"
    return cached if _complete(cached) else None


def ensure_converter() -> Path:
    """Return the converter dir, fetching it from the matching sdist on first use."""
    env_dir = os.environ.get("LLAMA_CPP_DIR")
    if env_dir and not _complete(Path(env_dir)):
        raise ForgeError(Codes.CONVERTER_MISSING,
                         f"LLAMA_CPP_DIR={env_dir} lacks one of {', '.join(CONVERTER_FILES)}",
                         "point LLAMA_CPP_DIR at a llama.cpp checkout, or unset it to use the bundled sdist")
    found = find_converter()
    if found:
        return found
    target = cache_dir() / f"llama.cpp-{llama_cpp_version()}"
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        extract_converter(fetch_sdist(Path(tmp)), target)
    return target


def fetch_sdist(into: Path) -> Path:
    """The llama-cpp-python sdist of the installed version, fetched with pip into ``into`` (pip's cache
    makes a second fetch cheap). It carries llama.cpp's sources, converters and tools."""
    version = llama_cpp_version()
    if version is None:
        raise ForgeError(Codes.CONVERTER_MISSING, "llama-cpp-python is not installed",
                         "install Forge with its dependencies (make demo does), or set LLAMA_CPP_DIR")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           f"llama-cpp-python=={version}", "-d", str(into), "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    sdists = list(Path(into).glob("*.tar.gz"))
    if proc.returncode != 0 or not sdists:
        raise ForgeError(Codes.CONVERTER_MISSING,
                         f"could not fetch the llama-cpp-python {version} sdist: {proc.stderr.strip()[-300:]}",
                         "connect to PyPI once, or set LLAMA_CPP_DIR to a llama.cpp checkout", retryable=True)
    return sdists[0]


def extract_converter(sdist: Path, target: Path) -> Path:
    """Extract only the converter files from a llama-cpp-python sdist into ``target``."""
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converter-"))
    try:
        with tarfile.open(sdist) as tar:
            prefix = None
            for member in tar.getmembers():
                if member.name.endswith("/vendor/llama.cpp/convert_hf_to_gguf.py"):
                    prefix = member.name[: -len("convert_hf_to_gguf.py")]
                    break
            if prefix is None:
                raise ForgeError(Codes.CONVERTER_MISSING, f"{sdist.name} holds no convert_hf_to_gguf.py",
                                 "set LLAMA_CPP_DIR to a llama.cpp checkout")
            wanted = [m for m in tar.getmembers()
                      if m.name.startswith(prefix) and m.name[len(prefix):].split("/")[0] in CONVERTER_FILES]
            for member in wanted:
                member.name = member.name[len(prefix):]
            tar.extractall(staging, members=wanted, filter="data")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def gguf_module(converter_dir: Path | None = None):
    """Import gguf-py from the converter dir (it matches the converter, unlike PyPI's gguf)."""
    converter_dir = converter_dir or ensure_converter()
    path = str(Path(converter_dir) / "gguf-py")
    if path not in sys.path:
        sys.path.insert(0, path)
    loaded = sys.modules.get("gguf")
    if loaded is not None and not str(getattr(loaded, "__file__", "")).startswith(path):
        # PyPI's older gguf (transformers reads GGUFs with it) was imported first: take the converter's
        for name in [m for m in sys.modules if m == "gguf" or m.startswith("gguf.")]:
            del sys.modules[name]
    import gguf

    return gguf


def gguf_fields(path: Path, keys: tuple[str, ...]) -> tuple[dict, list]:
    """Values of the header ``keys`` (None when absent) and the tensor list of a GGUF file."""
    gguf = gguf_module()
    try:
        reader = gguf.GGUFReader(str(path))
        values = {}
        for key in keys:
            field = reader.fields.get(key)
            values[key] = field.contents() if field is not None else None
        return values, list(reader.tensors)
    except (ValueError, OSError, IndexError, KeyError, UnicodeDecodeError) as exc:  # gguf-py's damaged-file errors
        raise ForgeError(Codes.GGUF_INVALID, f"{path} is not a readable GGUF: {str(exc)[:200]}",
                         "pass a .gguf written by forge quantize (or llama.cpp), whole and unmodified") from None
