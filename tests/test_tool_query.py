"""Asking a GGUF with tools, where it cannot work: each answer is one JSON error with a code and a fix."""

import json

from forge.cli import main

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}}, "required": ["city"]}}}]


def run_json(capsys, *argv) -> tuple[int, dict]:
    code = main([*argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_a_gguf_whose_template_has_no_tools_syntax_is_refused_with_the_families_that_have_one(capsys, quantized,
                                                                                                 tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS), encoding="utf-8")
    gguf = quantized["outputs"][-1]["path"]
    code, out = run_json(capsys, "query", gguf, "--prompt", "Weather in Oslo?", "--tools", str(tools))
    assert code == 2 and out["error"]["code"] == "unsupported_template", out
    assert "qwen2.5" in out["error"]["hint"] and "llama3.1" in out["error"]["hint"]


def test_a_tool_list_that_is_not_json_or_not_tools_is_refused(capsys, quantized, tmp_path):
    gguf = quantized["outputs"][-1]["path"]
    broken = tmp_path / "broken.json"
    broken.write_text("[{", encoding="utf-8")
    code, out = run_json(capsys, "query", gguf, "--tools", str(broken))
    assert code == 2 and out["error"]["code"] == "invalid_argument" and "not JSON" in out["error"]["message"]
    nameless = tmp_path / "nameless.json"
    nameless.write_text(json.dumps([{"type": "function", "function": {"description": "no name"}}]), encoding="utf-8")
    code, out = run_json(capsys, "query", gguf, "--tools", str(nameless))
    assert code == 2 and out["error"]["code"] == "invalid_argument" and "name" in out["error"]["message"], out
