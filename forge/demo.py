"""Demo assets: a tiny Qwen2-architecture model, a locally trained tokenizer, and a sample dataset.

Nothing is downloaded. Sizes are chosen for llama.cpp: K-quants need every quantized row length
(hidden and intermediate size) to be a multiple of 256, so the demo gets a real Q4_K_M.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field

from forge.config import StageConfig
from forge.errors import Codes, ForgeError
from forge.paths import forge_home
from forge.workspace import atomic_dir, atomic_write_text

# The pre-tokenizer split Qwen2 uses, so llama.cpp's "qwen2" pre-tokenizer matches ours exactly.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SYSTEM_PROMPT = "You are Forge's demo assistant. Answer briefly."

# Written for this project: short answers about fine-tuning, so the demo has something to learn.
_QA = [
    ("What is LoRA?", "", "LoRA trains two small matrices per layer and leaves the base weights frozen."),
    ("What does QLoRA add to LoRA?", "", "QLoRA loads the frozen base in 4-bit NF4 to save memory."),
    ("Why merge an adapter?", "", "Merging folds the adapter into the base so one file runs anywhere."),
    ("What is GGUF?", "", "GGUF is llama.cpp's single-file model format with weights and tokenizer."),
    ("What does Q4_K_M mean?", "", "Q4_K_M is a 4-bit k-quant with some tensors kept at higher precision."),
    ("What is a Modelfile?", "", "A Modelfile tells Ollama which GGUF to load and how to format chats."),
    ("Why must the end-of-turn token be trained?", "", "Without it in the loss the model never learns to stop."),
    ("What is a chat template?", "", "A chat template turns a list of messages into the exact prompt text."),
    ("What is the learning rate?", "", "The learning rate sets how far each optimizer step moves the weights."),
    ("What is an epoch?", "", "An epoch is one full pass over the training data."),
    ("What is eval loss for?", "", "Eval loss on held-out data shows whether the model generalizes."),
    ("Why keep checkpoints?", "", "Checkpoints let training resume after a crash instead of starting over."),
    ("What is gradient accumulation?", "", "It sums gradients over several micro-batches before one step."),
    ("What does lora_r control?", "", "The rank r sets the size of the adapter matrices."),
    ("What is lora_alpha?", "", "Alpha scales the adapter's update; the scale is alpha divided by r."),
    ("What is a seal?", "", "A seal is a hash-verified record of a run and its artifacts."),
    ("Summarize the Forge pipeline.", "", "Validate data, train, merge, quantize, write a Modelfile, seal."),
    ("Name a stop token for ChatML.", "", "ChatML models stop at <|im_end|>."),
    ("What is padding?", "", "Padding fills short sequences to a common length in a batch."),
    ("What is packing?", "", "Packing joins short records into one row so no slot is wasted on padding."),
    ("Translate to French.", "Good morning", "Bonjour."),
    ("Translate to French.", "Thank you", "Merci."),
    ("Translate to French.", "Good night", "Bonne nuit."),
    ("Translate to Spanish.", "Good morning", "Buenos dias."),
    ("Translate to Spanish.", "Thank you", "Gracias."),
    ("Give the opposite word.", "hot", "cold"),
    ("Give the opposite word.", "fast", "slow"),
    ("Give the opposite word.", "open", "closed"),
    ("Give the opposite word.", "early", "late"),
    ("Give the opposite word.", "light", "dark"),
]


def sample_records() -> list[dict]:
    """About 60 alpaca-format records: the hand-written ones plus simple unit conversions."""
    records = [{"instruction": q, "input": i, "output": a} for q, i, a in _QA]
    for n in range(1, 31):
        km = n * 3 % 47 + 1
        records.append({"instruction": "Convert kilometres to metres.", "input": f"{km} km",
                        "output": f"{km} km is {km * 1000} metres."})
    return records


class DemoAssetsConfig(StageConfig):
    dir: Path | None = Field(None, description="Where to write the assets; default $FORGE_HOME/demo.")
    hidden_size: int = Field(256, description="Hidden size; a multiple of 256 so K-quants apply.")
    intermediate_size: int = Field(512, description="MLP size; a multiple of 256 so K-quants apply.")
    num_hidden_layers: int = Field(2, description="Transformer layers.")
    vocab_size: int = Field(1024, description="Target BPE vocabulary size.")
    seed: int = Field(0, description="Seed for the random weights.")
    force: bool = Field(False, description="Rebuild even when the assets already exist.")


def _train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML_TEMPLATE
    fast.model_max_length = 2048
    return fast


def write_demo_assets(config: DemoAssetsConfig | None = None) -> dict:
    """Write (or reuse) the tiny model dir and the sample dataset; return their paths."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    config = config or DemoAssetsConfig()
    root = Path(config.dir) if config.dir else forge_home() / "demo"
    model_dir, dataset = root / "tiny-qwen2", root / "sample_alpaca.jsonl"
    blocked = next((p for p in [root, *root.parents] if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise ForgeError(Codes.INVALID_ARGUMENT, f"cannot write the demo assets into {root}: {blocked} is a file",
                         "pass a directory (existing or new), not a file")
    if model_dir.is_dir() and dataset.is_file() and not config.force:
        return {"model_dir": str(model_dir), "dataset": str(dataset), "reused": True}

    records = sample_records()
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dataset, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))

    texts = [SYSTEM_PROMPT] + [" ".join(r.values()) for r in records]
    tokenizer = _train_tokenizer(texts * 4, config.vocab_size)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model_config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=None, eos_token_id=im_end,
        pad_token_id=eot, rope_theta=10000.0,
    )
    torch.manual_seed(config.seed)
    model = Qwen2ForCausalLM(model_config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=[im_end, eot], pad_token_id=eot, bos_token_id=None)
    with atomic_dir(model_dir, force=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return {"model_dir": str(model_dir), "dataset": str(dataset), "reused": False,
            "parameters": sum(p.numel() for p in model.parameters()), "records": len(records)}
