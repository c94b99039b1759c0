from pathlib import Path

import numpy as np
import pytest

from forge.errors import Codes, ForgeError
from forge.quantize import LOGIT_IDS, QuantizeConfig, gguf_logits, hf_logits, quantize, read_header


def _by_quant(quantized, quant):
    return next(o for o in quantized["outputs"] if o["quant"] == quant)


def test_f16_gguf_logits_match_the_hf_model(merged, quantized):
    f16 = Path(_by_quant(quantized, "f16")["path"])
    ref = hf_logits(Path(merged["merged_dir"]), LOGIT_IDS)
    got = gguf_logits(f16, LOGIT_IDS)
    assert got.shape == ref.shape
    assert float(np.abs(ref - got).max()) < 1e-3
    check = _by_quant(quantized, "f16")["verification"]["logits_vs_hf"]  # the stage's own check, with its bound
    assert check["passed"] and check["max_abs_diff"] <= check["bound"] and check["outtype"] == "f16"


def test_q4_k_m_holds_real_k_quant_tensors(quantized):
    header = read_header(Path(_by_quant(quantized, "Q4_K_M")["path"]))
    assert header["file_type"] == "MOSTLY_Q4_K_M"
    assert header["tensor_types"].get("Q4_K", 0) >= 10
    assert header["architecture"] == "qwen2"
    assert "<|im_start|>" in header["chat_template"]


def test_every_output_is_verified_with_llama_cpp_generation(quantized):
    for out in quantized["outputs"]:
        ver = out["verification"]
        assert ver["completion_tokens"] >= 1
        assert ver["header"]["chat_template_chars"] > 0
        assert len(out["sha256"]) == 64 and out["bytes"] == Path(out["path"]).stat().st_size


def test_unknown_pre_tokenizer_fallback_is_explicit_and_recorded(quantized):
    assert quantized["pre_tokenizer_fallback"] == "qwen2"
    assert any("pre-tokenizer" in w for w in quantized["warnings"])
    assert read_header(Path(quantized["outputs"][0]["path"]))["pre_tokenizer"] == "qwen2"


def test_without_fallback_an_unknown_tokenizer_is_a_clear_error(merged, tmp_path):
    with pytest.raises(ForgeError) as info:
        quantize(QuantizeConfig(model_dir=merged["merged_dir"], output_dir=tmp_path, pre_tokenizer="none",
                                quantizations=[]))
    assert info.value.code == Codes.UNKNOWN_PRE_TOKENIZER and "--pre-tokenizer" in info.value.hint
    assert not list(tmp_path.glob("*.gguf"))  # nothing half-written


def test_existing_gguf_is_refused_without_force(merged, quantized):
    with pytest.raises(ForgeError) as info:
        quantize(QuantizeConfig(model_dir=merged["merged_dir"]))
    assert info.value.code == Codes.OUTPUT_EXISTS


def test_unknown_quant_type_names_the_known_ones():
    with pytest.raises(ForgeError) as info:
        QuantizeConfig.build(model_dir="x", quantizations=["Q4_K_XL"])
    assert "Q4_K_XL" in info.value.message


def test_converter_is_taken_from_the_matching_sdist(quantized):
    from forge.converter import find_converter, llama_cpp_version

    conv = find_converter()
    assert conv is not None and conv.name == f"llama.cpp-{llama_cpp_version()}"
    assert (conv / "convert_hf_to_gguf.py").is_file() and (conv / "gguf-py" / "gguf").is_dir()
