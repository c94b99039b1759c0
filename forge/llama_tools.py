"""llama.cpp's own command-line tools, for what its Python binding cannot reach.

An importance matrix reaches ``llama_model_quantize`` only as a C++ map, so quantizing with one (and
computing one) takes llama.cpp's ``llama-imatrix`` and ``llama-quantize``. Forge builds the two once, from
the llama-cpp-python sdist of the installed version (the one its converter comes from), with cmake and the
system's C++ compiler, and keeps them under ``FORGE_HOME/cache``. It looks first in ``FORGE_LLAMA_TOOLS``
(a dir holding both, e.g. a llama.cpp ``build/bin``), then in ``<venv>/forge-llama-tools`` (``make install``
links a per-machine build there), then in the cache.

Run ``python -m forge.llama_tools install --cache DIR --link PATH`` to build into a shared cache and link it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from forge.converter import fetch_sdist, llama_cpp_version
from forge.errors import Codes, ForgeError
from forge.paths import open_output

TOOLS = ("llama-quantize", "llama-imatrix")
MANIFEST = "forge-tools.json"
ENV_DIR = "FORGE_LLAMA_TOOLS"
VENV_LINK = "forge-llama-tools"
# Static binaries, only what the two tools need. Not -march=native, like the Makefile's wheel: a VM that
# advertises AMX without granting it kills a native build at its first Q4_K matmul. CMAKE_ARGS of the user's
# (say -DGGML_CUDA=on) still apply, after these.
BASE_CMAKE_ARGS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DBUILD_SHARED_LIBS=OFF",
                   "-DGGML_OPENMP=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                   "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF")


def cmake_args() -> list[str]:
    return [*BASE_CMAKE_ARGS, *shlex.split(os.environ.get("CMAKE_ARGS", ""))]


def build_name() -> str:
    """The folder a build is kept in: the llama.cpp version and a digest of the cmake arguments."""
    digest = hashlib.md5(" ".join(cmake_args()).encode()).hexdigest()[:8]
    return f"llama.cpp-tools-{llama_cpp_version()}-{digest}"


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() and os.access(folder / name, os.X_OK) for name in TOOLS)


def _same_version(folder: Path) -> bool:
    """A build Forge made is used only with the llama-cpp-python it was built from."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return manifest.get("llama_cpp_python") == llama_cpp_version()


def find_tools() -> Path | None:
    """The dir holding llama-quantize and llama-imatrix, if one is ready; never builds."""
    from forge.workspace import cache_dir

    env_dir = os.environ.get(ENV_DIR)
    if env_dir:
        return Path(env_dir) if _complete(Path(env_dir)) else None
    for folder in (Path(sys.prefix) / VENV_LINK, cache_dir() / build_name()):
        if _complete(folder) and _same_version(folder):
            return folder
    return None


def ensure_tools(log_path: Path | None = None) -> Path:
    """The tools' dir, built into the cache on first use (a few minutes: llama.cpp compiles)."""
    from forge.workspace import cache_dir

    env_dir = os.environ.get(ENV_DIR)
    if env_dir and not _complete(Path(env_dir)):
        raise ForgeError(Codes.LLAMA_TOOLS_MISSING, f"{ENV_DIR}={env_dir} lacks {' or '.join(TOOLS)}",
                         f"point {ENV_DIR} at a llama.cpp build/bin holding both, or unset it to let Forge build them")
    return find_tools() or build_tools(cache_dir() / build_name(), log_path)


def _compilers() -> list[str]:
    missing = [tool for tool in ("cmake",) if shutil.which(tool) is None]
    if not any(shutil.which(c) for c in (os.environ.get("CXX") or "c++", "g++", "clang++")):
        missing.append("a C++ compiler")
    return missing


def _extract_sources(sdist: Path, into: Path) -> Path:
    """llama.cpp's sources from the sdist (vendor/llama.cpp), with tar's data filter."""
    with tarfile.open(sdist) as tar:
        members = tar.getmembers()
        prefix = next((m.name[: -len("CMakeLists.txt")] for m in members
                       if m.name.endswith("/vendor/llama.cpp/CMakeLists.txt")), None)
        if prefix is None:
            raise ForgeError(Codes.LLAMA_TOOLS_MISSING, f"{sdist.name} holds no vendor/llama.cpp",
                             f"set {ENV_DIR} to a llama.cpp build/bin holding {' and '.join(TOOLS)}")
        wanted = [m for m in members if m.name.startswith(prefix) and len(m.name) > len(prefix)]
        for member in wanted:
            member.name = member.name[len(prefix):]
        tar.extractall(into, members=wanted, filter="data")
    return into


def build_tools(target: Path, log_path: Path | None = None) -> Path:
    """Compile the tools from the sdist into ``target`` (staged, then renamed: never half-built)."""
    missing = _compilers()
    if missing:
        raise ForgeError(Codes.LLAMA_TOOLS_MISSING,
                         f"building llama.cpp's {' and '.join(TOOLS)} needs {' and '.join(missing)}",
                         f"install them (apt-get install cmake g++), or set {ENV_DIR} to a llama.cpp build/bin")
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep(target.parent)
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=".build-"))
    log = log_path or target.parent / f"{target.name}.log"
    try:
        staging = _compile(work, log)
        try:
            staging.rename(target)
        except OSError:  # another process finished the same build first: keep its copy
            if not _complete(target):
                raise
        return target
    except (OSError, tarfile.TarError) as exc:
        raise ForgeError(Codes.LLAMA_TOOLS_MISSING, f"building llama.cpp's tools failed: {exc}",
                         f"see {log}; or set {ENV_DIR} to a llama.cpp build/bin") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _compile(work: Path, log: Path) -> Path:
    """Sources from the sdist, cmake, the two binaries and a manifest in ``work/tools``."""
    try:
        source = _extract_sources(fetch_sdist(work), work / "src")
    except ForgeError as exc:  # no sdist (offline, say): the tools are what is missing
        raise ForgeError(Codes.LLAMA_TOOLS_MISSING, f"llama.cpp's sources for its tools: {exc.message}",
                         f"{exc.hint}; or set {ENV_DIR} to a llama.cpp build/bin") from None
    jobs = str(max(1, os.cpu_count() or 1))
    steps = [["cmake", "-S", str(source), "-B", str(work / "build"), *cmake_args()],
             ["cmake", "--build", str(work / "build"), "--parallel", jobs, "--target", *TOOLS]]
    with open_output(log, "build log", append=True) as out:
        for cmd in steps:
            out.write(("$ " + shlex.join(cmd) + "\n").encode())
            out.flush()
            if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                raise ForgeError(Codes.LLAMA_TOOLS_MISSING, f"building llama.cpp's tools failed at: {cmd[1]} "
                                 f"{cmd[2]}", f"see {log}; or set {ENV_DIR} to a llama.cpp build/bin")
    staging = work / "tools"
    staging.mkdir()
    for name in TOOLS:
        shutil.copy2(work / "build" / "bin" / name, staging / name)
    (staging / MANIFEST).write_text(json.dumps({"llama_cpp_python": llama_cpp_version(),
                                                "cmake_args": cmake_args()}, indent=1), encoding="utf-8")
    return staging


def _sweep(folder: Path, older_than_s: float = 6 * 3600) -> None:
    """Remove what builds killed outright (SIGKILL) left behind."""
    import time

    for stale in folder.glob(".build-*"):
        try:
            if time.time() - stale.stat().st_mtime > older_than_s:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass


def run_tool(name: str, args: list[str], log_path: Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run one tool with its output appended to ``log_path``; its stderr tail is returned for errors."""
    cmd = [str(ensure_tools(log_path) / name), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd=cwd)
    except OSError as exc:  # not executable here (another architecture, say)
        raise ForgeError(Codes.LLAMA_TOOLS_MISSING, f"{cmd[0]} could not run: {exc}",
                         f"rebuild it (make install), or point {ENV_DIR} at a llama.cpp build/bin for this machine"
                         ) from None
    with open_output(log_path, "log", append=True) as log:
        log.write(("$ " + shlex.join(cmd) + "\n" + proc.stdout + proc.stderr).encode("utf-8", "replace"))
    return proc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m forge.llama_tools",
                                     description="Build llama.cpp's llama-quantize and llama-imatrix once.")
    sub = parser.add_subparsers(dest="command", required=True)
    install = sub.add_parser("install", help="build into a cache dir (once per version and cmake arguments), "
                             "and link it where Forge looks")
    install.add_argument("--cache", type=Path, required=True, help="dir to keep builds in, e.g. ~/.cache/forge/tools")
    install.add_argument("--link", type=Path, help=f"symlink to make, e.g. .venv/{VENV_LINK}")
    args = parser.parse_args(argv)
    target = args.cache.expanduser() / build_name()
    if not (_complete(target) and _same_version(target)):
        print(f"building {' and '.join(TOOLS)} from llama-cpp-python {llama_cpp_version()}'s sdist into {target} "
              "(once per machine: a few minutes)", flush=True)
        try:
            build_tools(target, args.cache.expanduser() / f"{build_name()}.log")
        except ForgeError as exc:
            print(f"error: {exc.message}\n{exc.hint}", file=sys.stderr)
            return 1
    if args.link:
        tmp = args.link.with_name(f".{args.link.name}.tmp")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target.resolve())
        tmp.replace(args.link)
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
