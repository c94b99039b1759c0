"""Shared bench helpers: locally built models and data (nothing downloaded), peak memory, tables."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

# Model shapes built from config with random weights (no download).
SHAPES = {
    "cpu-small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=2),
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2),
    "qwen2-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4),
}


def peak_memory() -> dict:
    try:
        import torch

        if torch.cuda.is_available():
            return {"kind": "cuda_max_allocated", "bytes": int(torch.cuda.max_memory_allocated())}
    except ImportError:
        pass
    from forge.hardware import peak_rss_bytes

    return {"kind": "cpu_peak_rss", "bytes": peak_rss_bytes()}


def build_model(out_dir: Path, shape: str, tokenizer_dir: Path, dtype: str = "bfloat16", vocab_size: int | None = None,
                max_shard_size: str = "5GB", device: str = "cpu") -> Path:
    """A Qwen2-architecture model of the given shape with random weights, saved like a checkpoint."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(vocab_size=vocab_size or len(tokenizer), max_position_embeddings=4096,
                         tie_word_embeddings=shape != "qwen2-7b", eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out_dir)
    del model
    return out_dir


def chat_records(n: int, max_tokens: int, seed: int = 0, words_per_token: float = 0.75) -> list[dict]:
    """Variable-length chat records: lengths log-normal (median ~max/4), clipped to [30, max] tokens."""
    rng = random.Random(seed)
    vocab = ("model data train loss merge adapter token batch layer weight learn rate epoch eval quant gguf stop "
             "turn chat answer question short long value check seal run job step").split()
    out = []
    for _ in range(n):
        tokens = int(min(max(rng.lognormvariate(math.log(max_tokens / 4), 0.8), 30), max_tokens))
        words = max(4, int(tokens * words_per_token))
        prompt_words = max(2, words // 3)
        text = [rng.choice(vocab) for _ in range(words)]
        out.append({"prompt": " ".join(text[:prompt_words]), "completion": " ".join(text[prompt_words:]) + "."})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def table(rows: list[tuple], headers: tuple) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=True)]
    line = lambda r: "| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def emit(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)
    sys.stdout.flush()
