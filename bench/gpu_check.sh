#!/usr/bin/env bash
# The whole GPU comparison in one device call (at most 8 minutes): stock TRL vs Forge on a
# Qwen2-7B-shaped model with random bf16 weights built on the GPU, LoRA then QLoRA, seq 2048.
# Before: bash bench/fetch_gpu_wheels.sh (here). Then, through the device tool:
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)
# Prints a short table last; details go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/forge-gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export FORGE_HOME=/tmp/forge-home
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, transformers, trl, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__)" | tee -a "$OUT/device.txt"
WORK=/tmp/forge-gpu-bench
timeout 270 python3 bench/train_throughput.py --mode gpu --method lora --records 64 --seq 2048 --work "$WORK" \
  --json "$OUT/lora.json" 2>&1 | tee "$OUT/lora.log" | tail -8
timeout 210 python3 bench/train_throughput.py --mode gpu --method qlora --records 48 --seq 2048 --work "$WORK-q" \
  --json "$OUT/qlora.json" 2>&1 | tee "$OUT/qlora.log" | tail -8
python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print("\n| method | tokens/s ratio | peak memory ratio | eval loss diff |\n|---|---|---|---|")
for name in ("lora", "qlora"):
    path = out / f"{name}.json"
    if path.is_file():
        r = json.loads(path.read_text())
        print(f"| {name} | {r['speedup']:.2f}x | {r['memory_ratio']:.2f}x | {r['eval_loss_diff']:+.2%} |")
    else:
        print(f"| {name} | did not finish | | |")
PY
