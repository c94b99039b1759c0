"""Training on CPU cores another process also wants: OpenMP threads that spin before they sleep
(libgomp's own default, ``OMP_WAIT_POLICY`` unset) against Forge's default (``PASSIVE``), on a quiet
machine and with one busy loop per core. Each run is ``forge train`` on the tiny demo model in a
process of its own; each case runs ``--repeats`` times (contended timings scatter widely).

    python bench/contended_cpu.py [--steps 60] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FORGE = [sys.executable, "-m", "forge.cli"]


def train_seconds(home: Path, assets: dict, steps: int, policy: str) -> float:
    # An empty OMP_WAIT_POLICY is libgomp's default, and Forge leaves a set variable alone.
    env = {**os.environ, "FORGE_HOME": str(home), "OMP_WAIT_POLICY": policy}
    began = time.perf_counter()
    name = f"{policy.lower() or 'default'}-{time.time_ns()}"
    subprocess.run([*FORGE, "train", "--base-model", assets["model_dir"], "--dataset", assets["dataset"],
                    "--max-steps", str(steps), "--run-name", name, "--json"],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - began


def busy_loops(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from forge.demo import DemoAssetsConfig, write_demo_assets

    home = Path(tempfile.mkdtemp(prefix="forge-contended-"))
    assets = write_demo_assets(DemoAssetsConfig(dir=home / "assets"))
    rows = {}
    for load in ("quiet", "loaded"):
        loops = busy_loops(os.cpu_count() or 1) if load == "loaded" else []
        try:
            for _ in range(args.repeats):
                for policy in ("", "PASSIVE"):
                    rows.setdefault((load, policy), []).append(train_seconds(home, assets, args.steps, policy))
        finally:
            for loop in loops:
                loop.kill()
                loop.wait()
    print(f"{os.cpu_count()} cores, {args.steps} steps of the tiny model, {args.repeats} runs a case; "
          "loaded = one busy loop per core\n")
    print("| machine | libgomp default s (median; min–max) | PASSIVE, Forge's s (median; min–max) "
          "| default / passive |")
    print("|---|---|---|---|")
    for load in ("quiet", "loaded"):
        spin, passive = rows[load, ""], rows[load, "PASSIVE"]
        print(f"| {load} | {median(spin):.1f}; {min(spin):.1f}–{max(spin):.1f} | "
              f"{median(passive):.1f}; {min(passive):.1f}–{max(passive):.1f} | {median(spin) / median(passive):.2f}× |")


if __name__ == "__main__":
    main()
