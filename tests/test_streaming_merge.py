"""The streaming merge equals PEFT's merge_and_unload: exactly in fp32, and in bf16 too."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from forge.merge import MergeConfig, merge


def make_base_and_adapter(tmp_path: Path, dtype: torch.dtype, shards: bool, **lora) -> tuple[Path, Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from forge.demo import DemoAssetsConfig, write_demo_assets

    assets = write_demo_assets(DemoAssetsConfig(dir=tmp_path / "assets"))
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=834, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    model = Qwen2ForCausalLM(config).to(dtype)
    model.save_pretrained(base_dir, max_shard_size="100KB" if shards else "5GB")
    AutoTokenizer.from_pretrained(assets["model_dir"]).save_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", **lora))
    with torch.no_grad():  # non-zero B, so the merge really changes the weights
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    peft_model.save_pretrained(adapter_dir)
    return base_dir, adapter_dir


def weights(model_dir: Path) -> dict:
    out = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


@pytest.mark.parametrize("dtype,shards,lora", [
    (torch.float32, False, {}),
    (torch.float32, True, {"use_rslora": True}),
    (torch.bfloat16, True, {}),
])
def test_streaming_merge_equals_peft_merge(tmp_path, dtype, shards, lora):
    base, adapter = make_base_and_adapter(tmp_path, dtype, shards, **lora)
    streamed = merge(MergeConfig(adapter_dir=adapter, base_model=str(base), output_dir=tmp_path / "s",
                                 strategy="streaming", parity_check=False))
    reference = merge(MergeConfig(adapter_dir=adapter, base_model=str(base), output_dir=tmp_path / "p",
                                  strategy="peft", parity_check=False))
    assert streamed["strategy"] == "streaming" and reference["strategy"] == "peft"
    got, want = weights(tmp_path / "s"), weights(tmp_path / "p")
    base_weights = weights(base)
    assert set(got) >= set(want) - {"lm_head.weight"}
    changed = 0
    for name, tensor in want.items():
        if name == "lm_head.weight" and name not in got:
            continue  # tied to the embeddings; PEFT may save it explicitly
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), f"{name} differs from PEFT's merge"
        changed += not torch.equal(got[name], base_weights.get(name, got[name]))
    assert changed == 3 * 7  # every targeted linear layer changed
    if shards:
        assert len(list((tmp_path / "s").glob("*.safetensors"))) > 1
        assert (tmp_path / "s" / "model.safetensors.index.json").is_file()


def test_auto_falls_back_to_peft_for_dora_and_says_why(tmp_path):
    base, adapter = make_base_and_adapter(tmp_path, torch.float32, False, use_dora=True)
    result = merge(MergeConfig(adapter_dir=adapter, base_model=str(base), output_dir=tmp_path / "m"))
    assert result["strategy"] == "peft" and "DoRA" in result["fallback_reason"]
    progress = (tmp_path / "progress.jsonl").read_text(encoding="utf-8")  # beside the output: no run dir here
    assert "not streaming: DoRA" in progress


def test_asking_for_streaming_where_it_cannot_run_is_a_clear_error(tmp_path):
    from forge.errors import ForgeError

    base, adapter = make_base_and_adapter(tmp_path, torch.float32, False, use_dora=True)
    with pytest.raises(ForgeError) as info:
        merge(MergeConfig(adapter_dir=adapter, base_model=str(base), output_dir=tmp_path / "m", strategy="streaming"))
    assert "DoRA" in info.value.message and "strategy=auto" in info.value.hint


def test_streamed_merge_of_the_demo_run_passes_parity(merged):
    assert merged["strategy"] == "streaming" and merged["parity"]["passed"]
    config = json.loads((Path(merged["merged_dir"]) / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
