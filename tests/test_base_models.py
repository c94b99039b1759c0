"""A base model (no chat template, no chat tokens) becomes a chat model: chat_template names a family, its
tokens are added and trained, and the merge, the GGUF and the Modelfile all carry them; the Q4_K_M then
stops at <|im_end|> by itself."""

import json
from pathlib import Path

import pytest

from forge.demo import DemoAssetsConfig, write_demo_assets
from forge.errors import Codes, ForgeError
from forge.merge import MergeConfig, merge
from forge.modelfile import ModelfileConfig, write_modelfile
from forge.quantize import QuantizeConfig, quantize, read_header
from forge.query import query
from forge.seal import SealConfig, seal
from forge.train import TrainConfig, train


@pytest.fixture(scope="module")
def base_assets(tmp_path_factory):
    return write_demo_assets(DemoAssetsConfig(dir=tmp_path_factory.mktemp("base"), model="tiny-base"))


def test_a_base_model_without_a_template_is_refused_with_the_fix(base_assets, tmp_path):
    with pytest.raises(ForgeError) as info:
        train(TrainConfig(base_model=base_assets["model_dir"], dataset=base_assets["dataset"],
                          output_dir=tmp_path / "r", max_steps=1))
    assert info.value.code == Codes.UNSUPPORTED_TEMPLATE and "chat_template=" in info.value.hint


def test_chatml_on_a_base_model_is_trained_merged_quantized_and_stops_at_im_end(base_assets, tmp_path):
    run = tmp_path / "run"
    trained = train(TrainConfig(base_model=base_assets["model_dir"], dataset=base_assets["dataset"],
                                output_dir=run, chat_template="chatml", num_train_epochs=8, learning_rate=3e-3,
                                per_device_train_batch_size=1, max_length=128, save_steps=1000))
    template = trained["chat_template"]
    assert template["source"] == "family:chatml" and template["added_tokens"] == ["<|im_start|>", "<|im_end|>"]
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter["trainable_token_indices"]  # the new tokens' embeddings were trained

    merged = merge(MergeConfig(adapter_dir=trained["adapter_dir"]))
    assert merged["strategy"] == "peft" and merged["parity"]["passed"]
    config = json.loads((run / "merged" / "config.json").read_text())
    tokenizer = json.loads((run / "merged" / "tokenizer_config.json").read_text())
    assert config["vocab_size"] == base_vocab(base_assets) + 2 and tokenizer["eos_token"] == "<|im_end|>"

    quantized = quantize(QuantizeConfig(model_dir=merged["merged_dir"], quantizations=["Q4_K_M"]))
    gguf = Path(quantized["outputs"][-1]["path"])
    header = read_header(gguf)
    assert "<|im_start|>" in header["chat_template"]
    reply = query(gguf, [{"role": "user", "content": "What is an epoch?"}], max_tokens=48)
    assert reply["finish_reason"] == "stop" and reply["completion_tokens"] < 48  # it ends its turn itself

    modelfile = write_modelfile(ModelfileConfig(gguf=gguf))
    assert modelfile["template_family"] == "chatml" and "<|im_end|>" in modelfile["stop_tokens"]
    record = json.loads(Path(seal(SealConfig(run_dirs=[run]))["seal_path"]).read_text())
    assert record["runs"][0]["chat_template"]["source"] == "family:chatml"


def base_vocab(base_assets) -> int:
    return json.loads((Path(base_assets["model_dir"]) / "config.json").read_text())["vocab_size"]
