"""Stock TRL vs Forge's train stage, same model, data and hyperparameters, in one run.

    python bench/train_throughput.py                 # CPU: a small Qwen2-shaped model
    python bench/train_throughput.py --mode gpu      # GPU: a Qwen2-7B-shaped model, random bf16 weights
    python bench/train_throughput.py --mode gpu --method qlora

(a) stock: TRL SFTTrainer with its defaults for this task — LoRA through peft_config, padded batches,
    no packing, default attention; (b) Forge's train stage. Each runs in its own process (so peak
    memory is its own), on the same variable-length chat records (log-normal lengths, fixed seed),
    with the same budget of token slots per step (batch x seq). Prints real (non-pad) tokens/s, peak
    memory (CUDA max allocated, or peak RSS on CPU), final train loss and eval loss — the eval loss
    computed the same way for both, on the same held-out records — then the ratios.
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
from common import build_model, chat_records, emit, peak_memory, table, write_jsonl  # noqa: E402

LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")


def eval_loss(model, tokenizer, records: list[dict]) -> float:
    """Mean loss over the assistant tokens (end-of-turn included) of each record, run one by one."""
    import torch

    from forge.tokens import tokenize_conversation

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for rec in records:
            messages = [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["completion"]}]
            ids, mask = tokenize_conversation(tokenizer, messages)
            inputs = torch.tensor([ids], device=model.device)
            logits = model(input_ids=inputs).logits[0, :-1].float()
            target = torch.tensor(ids[1:], device=model.device)
            keep = torch.tensor(mask[1:], device=model.device).bool()
            losses = torch.nn.functional.cross_entropy(logits, target, reduction="none")
            total += float(losses[keep].sum())
            count += int(keep.sum())
    return total / max(count, 1)


def run_stock(args, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    on_cuda = torch.cuda.is_available()
    rows = [json.loads(line) for line in (work / "train.jsonl").read_text().splitlines()]
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                             "completion": [{"role": "assistant", "content": r["completion"]}]} for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    kwargs = {"dtype": torch.bfloat16 if on_cuda else torch.float32}
    if args.method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(work / "model", **kwargs)
    config = SFTConfig(output_dir=str(work / "stock"), per_device_train_batch_size=args.batch, num_train_epochs=1,
                       learning_rate=args.lr, max_length=args.seq, report_to="none", save_strategy="no",
                       logging_steps=10, bf16=on_cuda, gradient_checkpointing=on_cuda, seed=42, disable_tqdm=True,
                       use_cpu=not on_cuda)
    trainer = SFTTrainer(model=model, args=config, train_dataset=ds, processing_class=tokenizer,
                         peft_config=LoraConfig(**LORA))
    real_tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    slots = 0
    for i in range(0, len(trainer.train_dataset), args.batch):  # padded to the longest of each batch
        lengths = [len(x) for x in trainer.train_dataset[i:i + args.batch]["input_ids"]]
        slots += max(lengths) * len(lengths)
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    result = trainer.train()
    evals = [json.loads(line) for line in (work / "eval.jsonl").read_text().splitlines()]
    return {"name": "stock TRL", "real_tokens": real_tokens, "slot_share": real_tokens / slots,
            "seconds": result.metrics["train_runtime"], "train_loss": result.training_loss,
            "eval_loss": eval_loss(trainer.model, tokenizer, evals), "steps": trainer.state.global_step,
            "peak": peak_memory()}


def run_forge(args, work: Path) -> dict:
    import torch
    from transformers import AutoTokenizer

    from forge.train import TrainConfig, train

    on_cuda = torch.cuda.is_available()
    config = TrainConfig(base_model=str(work / "model"), dataset=work / "train.jsonl", output_dir=work / "forge",
                         method=args.method, num_train_epochs=1, learning_rate=args.lr, lr_scheduler_type="linear",
                         warmup_steps=0, per_device_train_batch_size=args.batch, max_length=args.seq,
                         eval_fraction=0.0, save_steps=10**6, logging_steps=10, gradient_checkpointing=on_cuda, seed=42,
                         **LORA_FIELDS)
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    result = train(config)
    metrics = result["metrics"]
    from peft import AutoPeftModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    peak = peak_memory()
    model = AutoPeftModelForCausalLM.from_pretrained(result["adapter_dir"], dtype=torch.bfloat16 if on_cuda
                                                     else torch.float32).to("cuda" if on_cuda else "cpu")
    evals = [json.loads(line) for line in (work / "eval.jsonl").read_text().splitlines()]
    return {"name": "Forge", "real_tokens": metrics["real_tokens"], "slot_share": metrics["slot_share"],
            "seconds": metrics["duration_s"], "train_loss": metrics["train_loss"],
            "eval_loss": eval_loss(model, tokenizer, evals), "steps": metrics["global_step"], "peak": peak}


LORA_FIELDS = dict(lora_r=16, lora_alpha=32, lora_dropout=0.05, lora_target_modules="all-linear")


def prepare(args, work: Path) -> None:
    import torch

    from forge.demo import DemoAssetsConfig, write_demo_assets

    assets = write_demo_assets(DemoAssetsConfig(dir=work / "assets"))
    shape = "qwen2-7b" if args.mode == "gpu" else "cpu-small"
    build_model(work / "model", shape, Path(assets["model_dir"]), dtype="bfloat16",
                vocab_size=152064 if args.mode == "gpu" else None,  # the real vocab: logits cost memory
                device="cuda" if args.mode == "gpu" and torch.cuda.is_available() else "cpu")
    records = chat_records(args.records + args.eval_records, args.seq, seed=args.seed)
    write_jsonl(work / "train.jsonl", records[: args.records])
    write_jsonl(work / "eval.jsonl", records[args.records:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--method", choices=["lora", "qlora"], default="lora")
    parser.add_argument("--records", type=int, default=None)
    parser.add_argument("--eval-records", type=int, default=40)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--run", choices=["stock", "forge"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.seq = args.seq or (2048 if args.mode == "gpu" else 512)
    args.records = args.records or (256 if args.mode == "gpu" else 240)
    if args.run:
        emit((run_stock if args.run == "stock" else run_forge)(args, args.work))
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="forge-bench-"))
    prepare(args, work)
    results = []
    for which in ("stock", "forge"):
        cmd = [sys.executable, __file__, "--run", which, "--work", str(work), *(argv or sys.argv[1:])]
        started = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((out for out in proc.stdout.splitlines() if out.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            return 1
        result = json.loads(line[7:])
        result["wall_s"] = round(time.time() - started, 1)
        results.append(result)
    stock, forge = results
    rows = []
    for r in results:
        tps = r["real_tokens"] / r["seconds"]
        rows.append((r["name"], f"{tps:,.0f}", f"{r['peak']['bytes'] / 1024**3:.2f} GiB ({r['peak']['kind']})",
                     r["steps"], f"{r['train_loss']:.4f}", f"{r['eval_loss']:.4f}"))
    speed = (forge["real_tokens"] / forge["seconds"]) / (stock["real_tokens"] / stock["seconds"])
    memory = forge["peak"]["bytes"] / stock["peak"]["bytes"]
    eval_diff = (forge["eval_loss"] - stock["eval_loss"]) / stock["eval_loss"]
    print(f"\nmode {args.mode}, method {args.method}, seq {args.seq}, batch {args.batch} "
          f"({args.batch * args.seq} token slots a step), {args.records} train records, "
          f"{stock['real_tokens']} real tokens; stock slots {stock['slot_share']:.0%} real\n")
    print(table(rows, ("run", "real tokens/s", "peak memory", "steps", "train loss", "eval loss")))
    print(f"\nratios (Forge / stock): tokens/s {speed:.2f}x, peak memory {memory:.2f}x, "
          f"eval loss {eval_diff:+.2%}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results,
                                         "speedup": speed, "memory_ratio": memory, "eval_loss_diff": eval_diff},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
