#!/usr/bin/env bash
# Run HERE (a machine with PyPI) before bench/gpu_check.sh: downloads the wheels the GPU machine lacks
# (see ../shared/GPU.md: it has torch, transformers, peft, accelerate; not trl, datasets,
# bitsandbytes, liger-kernel) into .whl/, which the device call carries. Python 3.12, x86-64.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
PIP=(python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl
     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
     --platform any)
"${PIP[@]}" trl==1.16.0 datasets==5.2.0 bitsandbytes==0.50.2 liger-kernel==0.8.5 \
    dill multiprocess xxhash pydantic==2.14.3 pydantic-core==2.50.4 annotated-types typing-inspection
du -sh .whl
ls .whl
