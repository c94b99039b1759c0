import json
from pathlib import Path

import pytest

from forge.errors import Codes, ForgeError
from forge.merge import MergeConfig, _strip_quantization, merge


def test_merge_writes_base_dtype_safetensors_and_parity_holds(merged):
    out = Path(merged["merged_dir"])
    assert merged["dtype"] == "bfloat16"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "model.safetensors").is_file()
    parity = merged["parity"]
    assert parity["passed"] and parity["max_abs_diff"] <= parity["bound"]
    # the adapter really changed the model, so parity is not trivially met by the base alone
    assert parity["adapter_effect"] > 10 * parity["max_abs_diff"]


def test_merged_model_keeps_tokenizer_chat_template_and_generation_config(merged):
    out = Path(merged["merged_dir"])
    assert "<|im_start|>" in (out / "chat_template.jinja").read_text(encoding="utf-8")
    gen = json.loads((out / "generation_config.json").read_text())
    assert len(gen["eos_token_id"]) == 2
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_quantization_keys_are_stripped_from_config(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "qwen2", "quantization_config": {"load_in_4bit": True}}))
    assert _strip_quantization(cfg) == ["quantization_config"]
    assert json.loads(cfg.read_text()) == {"model_type": "qwen2"}


def test_existing_output_is_refused_unless_forced_and_left_intact(merged, trained):
    out = Path(merged["merged_dir"])
    before = (out / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(ForgeError) as info:
        merge(MergeConfig(adapter_dir=trained["adapter_dir"]))
    assert info.value.code == Codes.OUTPUT_EXISTS and "--force" in info.value.hint
    assert (out / "model.safetensors").stat().st_mtime_ns == before


def test_force_replaces_the_output(trained, tmp_path):
    target = tmp_path / "m"
    merge(MergeConfig(adapter_dir=trained["adapter_dir"], output_dir=target, parity_check=False))
    (target / "stale.txt").write_text("old")
    merge(MergeConfig(adapter_dir=trained["adapter_dir"], output_dir=target, parity_check=False, force=True))
    assert not (target / "stale.txt").exists() and (target / "model.safetensors").is_file()


def test_parity_detects_a_merge_made_from_another_base(merged, trained, tmp_path):
    from forge.demo import DemoAssetsConfig, write_demo_assets
    from forge.merge import parity

    other = write_demo_assets(DemoAssetsConfig(dir=tmp_path / "other", seed=7))
    report = parity(Path(merged["merged_dir"]), Path(trained["adapter_dir"]), other["model_dir"], "bfloat16")
    assert not report["passed"] and report["max_abs_diff"] > report["bound"]


def test_a_failed_merge_leaves_no_output_dir(trained, tmp_path):
    import shutil

    broken = tmp_path / "adapter"
    shutil.copytree(trained["adapter_dir"], broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    target = tmp_path / "merged"
    with pytest.raises(ForgeError) as info:
        merge(MergeConfig(adapter_dir=broken, base_model=trained["base_model"], output_dir=target))
    assert info.value.code == Codes.ADAPTER_INVALID
    assert not target.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged.tmp")]


def test_missing_adapter_is_a_clear_error(tmp_path):
    with pytest.raises(ForgeError) as info:
        merge(MergeConfig(adapter_dir=tmp_path))
    assert info.value.code == Codes.ADAPTER_NOT_FOUND
