"""`make demo`: Forge as an agent meets it. Starts `forge-mcp` over stdio with the SDK's client and takes
a real model, SmolLM2-135M-Instruct (its GGUF from PyPI), through the tools — train on five made-up facts →
merge → quantize → Modelfile → seal — printing each call, what came back and live progress; then asks the
base GGUF and the fine-tuned Q4_K_M the same questions, side by side."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import anyio
from mcp import Client, StdioServerParameters

from forge.demo import DEMO_QUESTION, DEMO_QUESTIONS, DEMO_TRAIN


def show_call(name: str, args: dict) -> None:
    print(f"\n→ {name}({', '.join(f'{k}={json.dumps(v)}' for k, v in args.items())})", flush=True)


async def call(client: Client, name: str, args: dict | None = None, quiet: bool = False) -> dict:
    args = args or {}
    if not quiet:
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


HYPERPARAMETERS = DEMO_TRAIN["smollm2"]
ASKED = DEMO_QUESTIONS


async def ask(client: Client, model: str, question: str) -> str:
    reply = await call(client, "forge_query_model", {"model": model, "prompt": question, "max_tokens": 32},
                       quiet=True)
    return reply["reply"].strip()


async def run(home: Path) -> int:
    params = StdioServerParameters(command=sys.executable, args=["-m", "mcp_servers.forge.server"],
                                   env={**os.environ, "FORGE_HOME": str(home)})
    print(f"Starting forge-mcp over stdio (FORGE_HOME={home})")
    async with Client(params, read_timeout_seconds=120) as client:
        tools = (await client.list_tools()).tools
        print(f"tools/list: {len(tools)} tools: {', '.join(t.name for t in tools)}")
        assets = await call(client, "forge_demo_assets", {"model": "smollm2"})
        base = assets["base_model"]
        print(f"  ← base model {base}\n    dataset {assets['dataset']} (five made-up facts, four phrasings each)")
        before = {q: await ask(client, base, q) for q in ASKED}
        print(f"  ← before: {before[DEMO_QUESTION]!r}")
        report = await call(client, "forge_validate_dataset", {"path": assets["dataset"], "base_model": base})
        print(f"  ← {report['records']} {report['format']} records, loss on "
              f"{report['tokens']['loss_token_share']:.0%} of tokens, p95 length {report['tokens']['tokens_p95']}")
        train = await follow(client, await call(client, "forge_train", {
            "base_model": base, "dataset": assets["dataset"], "hyperparameters": HYPERPARAMETERS}))
        merge = await follow(client, await call(client, "forge_merge", {"adapter": train["job_id"]}))
        quant = await follow(client, await call(client, "forge_quantize", {"model": merge["job_id"],
                                                                          "quantizations": ["Q4_K_M"]}))
        quality = quant.get("quality") or {}
        for row in quality.get("rows", []):
            print(f"    {row['model']}: mean KL divergence from the f16 {row['kld_mean']:.4g}, same top token "
                  f"{row['same_top_pct']:.1f} %, {row['bpw']} bits per weight")
        if quality:
            print(f"    measured on {quality['measured_on']}\n    importance matrix: {quality.get('imatrix', 'none')}")
        modelfile = await call(client, "forge_modelfile", {"gguf": quant["job_id"],
                                                            "parameters": {"temperature": 0.2, "num_ctx": 2048}})
        print(f"  ← {modelfile['path']} ({modelfile['template_family']}, stops {modelfile['stop_tokens']})\n"
              f"    {modelfile['ollama_create']}")
        after = {q: await ask(client, quant["job_id"], q) for q in ASKED}
        sealed = await call(client, "forge_seal_snapshot", {"note": "make demo: SmolLM2-135M taught five facts"})
        print(f"  ← {sealed['seal_id']}\n    {sealed['retrospective_path']}")
    print("\nThe same questions to the base GGUF and to the fine-tuned Q4_K_M, through llama.cpp:\n")
    for question in ASKED:
        print(f"  Q: {question}\n     before: {before[question]}\n     after:  {after[question]}\n")
    retro = Path(sealed["retrospective_path"]).read_text(encoding="utf-8")
    table = retro.split("## Results", 1)[1].split("\n\n", 2)[1]
    print(f"Run dir: {train['run_dir']}\n\n{table}")
    print(f"Check the seal any time:  FORGE_HOME={home} .venv/bin/forge seal verify")
    return 0 if "Quillport" in after[DEMO_QUESTION] else 1


def main(argv: list[str] | None = None) -> int:
    from forge.paths import forge_home

    home = Path(argv[0]).resolve() if argv else forge_home()
    return anyio.run(run, home)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
