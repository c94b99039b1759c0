"""What running jobs on Ray costs against the local executor, in one run: job-start latency (the tool
call to the worker at work: ``forge_train`` → its first stage in the status), the whole short job (→ ``succeeded``)
and status-poll latency (``forge_job_status`` while a job runs), through Forge's MCP tools.

Starts its own Ray clusters: one node (head only), then two (a head and a worker node the jobs are
placed on, through FORGE_RAY_RESOURCES); needs ``pip install 'forge-finetune[ray]'``.

    python bench/ray_overhead.py [--jobs 5] [--polls 100]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


async def measure(executor: str, jobs: int, polls: int, assets: dict) -> dict:
    import anyio
    from mcp import Client

    from mcp_servers.forge.server import create_server

    os.environ["FORGE_EXECUTOR"] = executor
    os.environ["FORGE_HOME"] = str(Path(tempfile.mkdtemp(prefix=f"forge-{executor}-bench-")))
    starts, totals, poll_s = [], [], []
    async with Client(create_server()) as client:
        for _ in range(jobs):
            began = time.perf_counter()
            handle = (await client.call_tool("forge_train", {
                "base_model": assets["model_dir"], "dataset": assets["dataset"],
                "hyperparameters": {"max_steps": 2}})).structured_content
            started = None
            while True:
                status = (await client.call_tool("forge_job_status", {"job_id": handle["job_id"]})).structured_content
                stage = status["stage"] or ""
                if started is None and status["status"] == "running" and stage not in ("", "starting"):
                    started = time.perf_counter() - began  # the worker is at work: its first stage is in
                if status["status"] in ("succeeded", "failed", "cancelled"):
                    break
                await anyio.sleep(0.05)
            assert status["status"] == "succeeded", status
            starts.append(started)
            totals.append(time.perf_counter() - began)
        handle = (await client.call_tool("forge_train", {
            "base_model": assets["model_dir"], "dataset": assets["dataset"],
            "hyperparameters": {"max_steps": 100000}})).structured_content
        while (await client.call_tool("forge_job_status", {"job_id": handle["job_id"]})).structured_content[
                "status"] != "running":
            await anyio.sleep(0.2)
        for _ in range(polls):
            t0 = time.perf_counter()
            await client.call_tool("forge_job_status", {"job_id": handle["job_id"]})
            poll_s.append(time.perf_counter() - t0)
        await client.call_tool("forge_job_cancel", {"job_id": handle["job_id"], "force": True})
        while (await client.call_tool("forge_job_status", {"job_id": handle["job_id"]})).structured_content[
                "status"] not in ("cancelled", "failed", "succeeded"):
            await anyio.sleep(0.2)
    return {"start_s": statistics.median(starts), "total_s": statistics.median(totals),
            "poll_ms": 1000 * statistics.median(poll_s)}


def main() -> int:
    import anyio

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5, help="short train jobs per executor (medians reported)")
    parser.add_argument("--polls", type=int, default=100, help="status calls timed per executor")
    args = parser.parse_args()
    assets_dir = Path(tempfile.mkdtemp(prefix="forge-bench-assets-"))
    os.environ.update(HF_HUB_OFFLINE="1", FORGE_MAX_CONCURRENT_JOBS="1", FORGE_ALLOWED_ROOTS=str(assets_dir))
    from forge.demo import DemoAssetsConfig, write_demo_assets
    from mcp_servers.lib.ray_local import local_cluster

    assets = write_demo_assets(DemoAssetsConfig(dir=assets_dir))
    local = anyio.run(measure, "local", args.jobs, args.polls, assets)
    with local_cluster(num_cpus=2) as cluster:
        os.environ["RAY_ADDRESS"] = cluster.address
        ray = anyio.run(measure, "ray", args.jobs, args.polls, assets)
    # two nodes: the head, and a worker node that alone has the resource every job asks for
    with local_cluster(num_cpus=1, workers={"worker": {"num_cpus": 2, "resources": {"forge_node": 1}}}) as cluster:
        os.environ.update(RAY_ADDRESS=cluster.address, FORGE_RAY_RESOURCES='{"forge_node": 1}')
        two = anyio.run(measure, "ray", args.jobs, args.polls, assets)
        del os.environ["FORGE_RAY_RESOURCES"]
    print(f"tiny-model train jobs (max_steps 2), medians of {args.jobs}; forge_job_status medians of {args.polls}")
    print("| executor | submit → first stage (s) | submit → succeeded (s) | forge_job_status (ms) |")
    print("|---|---|---|---|")
    rows = (("local", local), ("ray, one node", ray), ("ray, two nodes (job on the worker)", two))
    for name, row in rows:
        print(f"| {name} | {row['start_s']:.2f} | {row['total_s']:.2f} | {row['poll_ms']:.2f} |")
    for name, row in rows[1:]:
        print(f"ratios {name} / local: start {row['start_s'] / local['start_s']:.2f}x, whole job "
              f"{row['total_s'] / local['total_s']:.2f}x, status poll {row['poll_ms'] / local['poll_ms']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
