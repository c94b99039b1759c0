import json
import subprocess
from pathlib import Path

import pytest

from fixtures.chat_templates import FAMILY_TEMPLATES
from forge.errors import Codes, ForgeError
from forge.modelfile import ModelfileConfig, parse_modelfile, write_modelfile
from forge.templates import detect_family, plan

SYSTEMLESS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "user", "content": "One"}, {"role": "assistant", "content": "Two"}, {"role": "user", "content": "Three"}],
]
WITH_SYSTEM = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."}],
]


def family_tokenizer(assets, name):
    from transformers import AutoTokenizer

    template, _, specials, added, _ = FAMILY_TEMPLATES[name]
    tok = AutoTokenizer.from_pretrained(assets["model_dir"])
    tok.add_special_tokens({"additional_special_tokens": added})
    tok.eos_token = specials["eos_token"]
    if specials["bos_token"]:
        tok.bos_token = specials["bos_token"]
    tok.chat_template = template
    return tok


def render_with_go(render: Path, template: str, messages: list[dict], system: str | None = None) -> str:
    """The prompt Ollama builds: TEMPLATE over the messages, the Modelfile's SYSTEM first when the
    conversation has no system message."""
    proc = subprocess.run([str(render)], input=json.dumps({"template": template, "system": system or "",
                                                           "messages": messages}),
                          capture_output=True, text=True, check=True)
    return proc.stdout


def assert_same_prompts(go_render, chat_template: str, bos: str | None, eos: str, conversations, apply) -> None:
    """Ollama's prompt (Forge's TEMPLATE and SYSTEM) equals the model's own Jinja prompt, byte for byte."""
    planned = plan(chat_template, bos, eos)
    for messages in conversations:
        expected = apply(messages)
        if bos and expected.startswith(bos):  # llama.cpp prepends BOS itself when it tokenizes the prompt
            expected = expected[len(bos):]
        assert render_with_go(go_render, planned.template, messages, planned.default_system) == expected, messages


@pytest.mark.parametrize("name", sorted(FAMILY_TEMPLATES))
def test_ollama_renders_exactly_what_the_jinja_template_renders(assets, go_render, name):
    template, family, specials, _, takes_system = FAMILY_TEMPLATES[name]
    tok = family_tokenizer(assets, name)
    assert detect_family(tok.chat_template).name == family
    conversations = SYSTEMLESS + (WITH_SYSTEM if takes_system else [])
    assert_same_prompts(go_render, template, specials["bos_token"], specials["eos_token"], conversations,
                        lambda m: tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True))


def test_a_default_system_message_goes_into_the_modelfile_and_a_dated_header_into_the_template():
    qwen = plan(FAMILY_TEMPLATES["qwen2.5"][0], None, "<|im_end|>")
    assert qwen.default_system == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    llama31 = plan(FAMILY_TEMPLATES["llama3.1"][0], "<|begin_of_text|>", "<|eot_id|>")
    assert llama31.default_system is None and "Today Date: 26 Jul 2024" in llama31.template
    assert plan(FAMILY_TEMPLATES["chatml"][0], None, "<|im_end|>").default_system is None


def test_smollm2_template_read_from_its_gguf_renders_the_same_in_ollama(go_render, smollm2_gguf):
    from forge.converter import gguf_fields, gguf_module
    from forge.templates import render

    keys = gguf_module().Keys.Tokenizer
    fields, _ = gguf_fields(smollm2_gguf, (keys.CHAT_TEMPLATE,))
    template = fields[keys.CHAT_TEMPLATE]
    planned = plan(template, None, "<|im_end|>")
    assert planned.family.name == "chatml" and planned.default_system.startswith("You are a helpful AI assistant")
    assert_same_prompts(go_render, template, None, "<|im_end|>", SYSTEMLESS + WITH_SYSTEM,
                        lambda m: render(template, m, None, "<|im_end|>"))


def test_unknown_template_family_is_a_clear_error():
    with pytest.raises(ForgeError) as info:
        detect_family("{% for m in messages %}<<{{ m.role }}>>{{ m.content }}{% endfor %}")
    assert info.value.code == Codes.UNSUPPORTED_TEMPLATE
    assert "chatml" in info.value.message and "template=" in info.value.hint


def test_modelfile_for_the_demo_gguf(quantized, tmp_path):
    gguf = Path(next(o["path"] for o in quantized["outputs"] if o["quant"] == "Q4_K_M"))
    out = tmp_path / "Modelfile"
    result = write_modelfile(ModelfileConfig(gguf=gguf, output=out, system_prompt="Be brief.", temperature=0.2,
                                             top_p=0.9, top_k=40, repeat_penalty=1.1, num_ctx=2048, num_predict=128))
    text = out.read_text(encoding="utf-8")
    assert result["template_family"] == "chatml"
    assert 'PARAMETER stop "<|im_end|>"' in text
    for line in ("PARAMETER temperature 0.2", "PARAMETER top_p 0.9", "PARAMETER top_k 40",
                 "PARAMETER repeat_penalty 1.1", "PARAMETER num_ctx 2048", "PARAMETER num_predict 128",
                 'SYSTEM """Be brief."""'):
        assert line in text
    mf = parse_modelfile(text, base_dir=out.parent)
    assert Path(mf.from_).resolve() == gguf.resolve()
    assert mf.template == plan(FAMILY_TEMPLATES["chatml"][0], None, "<|im_end|>").template
    assert result["ollama_create"].startswith("ollama create ")


def test_modelfile_beside_the_gguf_uses_a_relative_from(quantized):
    gguf = Path(quantized["outputs"][-1]["path"])
    result = write_modelfile(ModelfileConfig(gguf=gguf, force=True))
    assert f"FROM ./{gguf.name}" in result["content"]
    with pytest.raises(ForgeError) as info:
        write_modelfile(ModelfileConfig(gguf=gguf))
    assert info.value.code == Codes.OUTPUT_EXISTS


def test_parser_reports_every_problem(tmp_path):
    (tmp_path / "fake.gguf").write_bytes(b"NOTGGUF")
    text = "\n".join([
        "FROM ./fake.gguf", "FROM ./other.gguf", "PARAMETER temperature warm", "PARAMETER colour red",
        "SHOUT hello", 'TEMPLATE """{{ .Prompt }}',
    ])
    with pytest.raises(ForgeError) as info:
        parse_modelfile(text, base_dir=tmp_path)
    details = "\n".join(info.value.details)
    assert "line 3: parameter temperature expects float" in details
    assert "line 4: unknown parameter 'colour'" in details
    assert "line 5: unknown instruction 'SHOUT'" in details
    assert 'line 6: TEMPLATE opens """ but never closes it' in details
    assert "expected exactly one FROM, found 2" in details


def test_parser_checks_the_from_file_is_a_gguf(tmp_path):
    (tmp_path / "fake.gguf").write_bytes(b"NOTGGUF")
    with pytest.raises(ForgeError) as info:
        parse_modelfile("FROM ./fake.gguf\n", base_dir=tmp_path)
    assert "is not a GGUF file" in info.value.message
    with pytest.raises(ForgeError) as info:
        parse_modelfile("FROM ./missing.gguf\n", base_dir=tmp_path)
    assert "no such file" in info.value.message
