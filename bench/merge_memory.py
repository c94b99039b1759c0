"""Peak memory and time: PEFT's merge_and_unload vs Forge's streaming merge, in one run.

    python bench/merge_memory.py [--shape qwen2-0.5b] [--shard-size 200MB]

Builds a model of the given shape with random bf16 weights (no download), saved in shards, and a
LoRA adapter (r 16, all linear layers, non-zero B). Each merge runs in its own process, so its peak
resident memory (VmHWM) is its own; "over baseline" subtracts the process's RSS after imports.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_model, emit, table  # noqa: E402


def rss_now() -> int:
    with open("/proc/self/status", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def run_one(strategy: str, work: Path) -> dict:
    import torch  # noqa: F401  (imports count in the baseline, not in the merge)
    import transformers  # noqa: F401
    from peft import PeftModel  # noqa: F401

    from forge.merge import MergeConfig, merge

    baseline = rss_now()
    started = time.time()
    merge(MergeConfig(adapter_dir=work / "adapter", base_model=str(work / "base"), output_dir=work / f"out-{strategy}",
                      strategy=strategy, parity_check=False, force=True))
    seconds = time.time() - started
    from forge.hardware import peak_rss_bytes

    peak = peak_rss_bytes()
    return {"strategy": strategy, "seconds": seconds, "peak_rss": peak, "baseline_rss": baseline}


def prepare(work: Path, shape: str, shard_size: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from forge.demo import DemoAssetsConfig, write_demo_assets

    assets = write_demo_assets(DemoAssetsConfig(dir=work / "assets"))
    build_model(work / "base", shape, Path(assets["model_dir"]), dtype="bfloat16", vocab_size=151936,
                max_shard_size=shard_size)
    model = AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch.bfloat16)
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.01)
    peft_model.save_pretrained(work / "adapter")
    shards = sorted((work / "base").glob("*.safetensors"))
    return {"shards": len(shards), "largest_shard": max(p.stat().st_size for p in shards),
            "total": sum(p.stat().st_size for p in shards)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen2-0.5b")
    parser.add_argument("--shard-size", default="200MB")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--run", choices=["peft", "streaming"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        emit(run_one(args.run, args.work))
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="forge-merge-bench-"))
    info = prepare(work, args.shape, args.shard_size)
    results = {}
    for strategy in ("peft", "streaming"):
        proc = subprocess.run([sys.executable, __file__, "--run", strategy, "--work", str(work)],
                              capture_output=True, text=True)
        line = next((out for out in proc.stdout.splitlines() if out.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(proc.stdout[-2000:], proc.stderr[-3000:], file=sys.stderr)
            return 1
        results[strategy] = json.loads(line[7:])
    gib = lambda n: f"{n / 1024**3:.2f} GiB"  # noqa: E731
    rows = [(name, f"{r['seconds']:.1f}", gib(r["peak_rss"]), gib(r["peak_rss"] - r["baseline_rss"]))
            for name, r in (("PEFT merge_and_unload", results["peft"]), ("Forge streaming", results["streaming"]))]
    print(f"\nshape {args.shape}: {info['shards']} shards, {gib(info['total'])} in all, "
          f"largest {gib(info['largest_shard'])}\n")
    print(table(rows, ("merge", "seconds", "peak RSS", "peak over baseline")))
    s, p = results["streaming"], results["peft"]
    over = s["peak_rss"] - s["baseline_rss"]
    print(f"\nratios (streaming / PEFT): peak RSS {s['peak_rss'] / p['peak_rss']:.2f}x, "
          f"over baseline {over / (p['peak_rss'] - p['baseline_rss']):.2f}x, time {s['seconds'] / p['seconds']:.2f}x; "
          f"streaming peak over baseline = {over / info['largest_shard']:.2f}x the largest shard")
    return 0


if __name__ == "__main__":
    sys.exit(main())
