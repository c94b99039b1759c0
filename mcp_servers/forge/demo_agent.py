"""`make demo`: Forge as an agent meets it. Starts `forge-mcp` over stdio with the SDK's client and
takes the demo assets through the tools — train → merge → quantize → modelfile → query → seal —
printing each call, the status it got, and live progress."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import anyio
from mcp import Client, StdioServerParameters


def show_call(name: str, args: dict) -> None:
    print(f"\n→ {name}({', '.join(f'{k}={json.dumps(v)}' for k, v in args.items())})", flush=True)


async def call(client: Client, name: str, args: dict | None = None) -> dict:
    args = args or {}
    show_call(name, args)
    result = await client.call_tool(name, args)
    if result.is_error:
        raise SystemExit(f"  ✗ {result.content[0].text}")
    return result.structured_content


async def follow(client: Client, handle: dict) -> dict:
    """forge_job_wait, call after call (each returns within its timeout, well under a client's 60 s),
    until the job ends; progress notifications are printed as they come."""
    queued = f" (queue position {handle['queue_position']})" if handle["queue_position"] else ""
    print(f"  ← job {handle['job_id']} {handle['status']}{queued}", flush=True)

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        print(f"    … {progress:5.1f}% {message or ''}", flush=True)

    while True:
        show_call("forge_job_wait", {"job_id": handle["job_id"]})
        result = await client.call_tool("forge_job_wait", {"job_id": handle["job_id"]}, progress_callback=on_progress)
        status = result.structured_content
        if status["status"] in ("succeeded", "failed", "cancelled"):
            break
        print(f"  ← still {status['status']} ({status['stage']}): waiting again", flush=True)
    metrics = {k: status["metrics"][k] for k in ("train_loss", "eval_loss", "tokens_per_s") if k in status["metrics"]}
    print(f"  ← {status['status']} | stage {status['stage']} | {len(status['artifacts'])} artifacts"
          + (f" | {metrics}" if metrics else "") + (f" | error {status['error']}" if status["error"] else ""))
    if status["status"] != "succeeded":
        raise SystemExit(1)
    print(f"    next: {status['next_actions']}")
    return status


async def run(home: Path) -> int:
    params = StdioServerParameters(command=sys.executable, args=["-m", "mcp_servers.forge.server"],
                                   env={**os.environ, "FORGE_HOME": str(home)})
    print(f"Starting forge-mcp over stdio (FORGE_HOME={home})")
    async with Client(params, read_timeout_seconds=900) as client:
        tools = (await client.list_tools()).tools
        print(f"tools/list: {len(tools)} tools: {', '.join(t.name for t in tools)}")
        assets = await call(client, "forge_demo_assets")
        print(f"  ← model {assets['model_dir']}\n    dataset {assets['dataset']}")
        report = await call(client, "forge_validate_dataset",
                            {"path": assets["dataset"], "base_model": assets["model_dir"]})
        print(f"  ← {report['records']} {report['format']} records, loss on "
              f"{report['tokens']['loss_token_share']:.0%} of tokens, p95 length {report['tokens']['tokens_p95']}")
        train = await follow(client, await call(client, "forge_train", {
            "base_model": assets["model_dir"], "dataset": assets["dataset"],
            "hyperparameters": {"num_train_epochs": 8, "learning_rate": 0.003, "save_steps": 20, "max_length": 128,
                                "per_device_train_batch_size": 1}}))
        merge = await follow(client, await call(client, "forge_merge", {"adapter": train["job_id"]}))
        quant = await follow(client, await call(client, "forge_quantize", {"model": merge["job_id"],
                                                                          "quantizations": ["Q4_K_M"]}))
        modelfile = await call(client, "forge_modelfile", {"gguf": quant["job_id"], "system_prompt": "Answer briefly.",
                                                            "parameters": {"temperature": 0.2, "num_ctx": 2048}})
        print(f"  ← {modelfile['path']} ({modelfile['template_family']}, stops {modelfile['stop_tokens']})\n"
              f"    {modelfile['ollama_create']}")
        reply = await call(client, "forge_query_model", {"model": quant["job_id"], "prompt": "What is LoRA?",
                                                         "max_tokens": 24})
        print(f"  ← {reply['reply']!r} ({reply['completion_tokens']} tokens, {reply['finish_reason']})")
        sealed = await call(client, "forge_seal_snapshot", {"job_ids": [train["job_id"]],
                                                            "note": "make demo, driven through MCP"})
        print(f"  ← {sealed['seal_id']}\n    {sealed['retrospective_path']}")
    retro = Path(sealed["retrospective_path"]).read_text(encoding="utf-8")
    table = retro.split("## Results", 1)[1].split("\n\n", 2)[1]
    print(f"\nRun dir: {train['run_dir']}\n\n{table}")
    print(f"Check the seal any time:  FORGE_HOME={home} .venv/bin/forge seal verify")
    return 0


def main(argv: list[str] | None = None) -> int:
    from forge.paths import forge_home

    home = Path(argv[0]).resolve() if argv else forge_home()
    return anyio.run(run, home)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
