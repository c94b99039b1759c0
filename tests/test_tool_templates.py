"""Tools-capable chat templates: the prompt Ollama builds from a Forge TEMPLATE (Go's text/template over the
OpenAI-shaped request it receives) equals, byte for byte, the prompt the model's Jinja template renders from
the conversation as Forge trains it; Forge's JSON equals Go's; replies parse back into the calls."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forge.records import Conversation
from forge.templates import BY_NAME, choose, detect_family, go_template, plan
from forge.tool_json import arguments_json, function_json, go_json, render_form
from forge.tool_templates import TOOL_FAMILIES, TOOLS_BY_NAME, parse_calls, tool_family_of

FAMILY_NAMES = [f.name for f in TOOL_FAMILIES]

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather <now> & later, in °C",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": ["string", "null"], "enum": ["c", "f"], "default": "c"},
        "where": {"type": "object", "properties": {"lon": {"type": "number"}, "lat": {"type": "number"}},
                  "required": ["lat"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": {
    "type": "object", "properties": {"b": {"type": "number"}, "a": {"type": "number"}}, "required": ["a", "b"]}}}
NOW = {"type": "function", "function": {"name": "now", "description": "",
                                        "parameters": {"type": "object", "properties": {}, "required": []}}}
TOOLS = [WEATHER, ADD, NOW]


def call(name: str, **arguments) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


USER = {"role": "user", "content": "Weather in Paris, and 1+2?"}
ONE_CALL = {"role": "assistant", "content": "",
            "tool_calls": [call("get_weather", unit="c", city="Paris", where={"lon": 2.35, "lat": 48.86})]}
TWO_CALLS = {"role": "assistant", "content": "", "tool_calls": [call("get_weather", city="Paris <FR> & co"),
                                                                 call("add", b=2.0, a=1, big=1e21, tiny=1e-7)]}
TALKING_CALL = {"role": "assistant", "content": "Let me look that up.", "tool_calls": [call("now")]}
WEATHER_RESULT = {"role": "tool", "content": '{"temp": 18, "sky": "clear"}', "name": "get_weather"}
ADD_RESULT = {"role": "tool", "content": "3", "name": "add"}
ANSWER = {"role": "assistant", "content": "It is 18 °C and clear; 1+2 is 3."}

CONVERSATIONS = {
    "tools declared": [USER],
    "one call": [USER, ONE_CALL],
    "two calls in one turn": [USER, TWO_CALLS],
    "text and a call": [USER, TALKING_CALL],
    "tool result, prompt for the answer": [USER, ONE_CALL, WEATHER_RESULT],
    "tool results then the answer": [USER, TWO_CALLS, WEATHER_RESULT, ADD_RESULT, ANSWER],
    "several turns": [USER, ONE_CALL, WEATHER_RESULT, ANSWER, {"role": "user", "content": "And now 1+2?"},
                      {"role": "assistant", "content": "", "tool_calls": [call("add", a=1, b=2)]}, ADD_RESULT,
                      {"role": "assistant", "content": "3."}],
}
PLAIN = {
    "one turn": [{"role": "user", "content": "Hi there"}],
    "three turns": [{"role": "user", "content": "One"}, {"role": "assistant", "content": "Two"},
                    {"role": "user", "content": "Three"}],
    "answered": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
}
SYSTEM = "Be brief. <b>Really</b>."
SYSTEMS = ["no system", "system message", "Modelfile SYSTEM"]


def render_jinja_template(**kwargs):
    # imported when first used: importing transformers at collection would read HF_HUB_OFFLINE before the
    # session fixture sets it, and huggingface_hub would then start its telemetry thread
    from transformers.utils.chat_template_utils import render_jinja_template as render

    return render(**kwargs)


def jinja_prompt(jinja: str, family, messages: list[dict], tools: list[dict] | None) -> str:
    """The model's prompt as Forge renders it (training, query): the tools and arguments as Ollama's JSON
    strings, a generation prompt unless the conversation ends with the assistant's turn, BOS left out."""
    shown, shown_tools = render_form(Conversation(messages, tools))
    rendered, _ = render_jinja_template(conversations=[shown], tools=shown_tools, chat_template=jinja,
                                        add_generation_prompt=messages[-1]["role"] != "assistant",
                                        bos_token=family.bos or "", eos_token=family.eos)
    text = rendered[0]
    return text[len(family.bos):] if family.bos and text.startswith(family.bos) else text


def ollama_request(messages: list[dict]) -> list[dict]:
    """The messages as an Ollama/OpenAI client sends them: arguments as objects, results named by tool_name."""
    out = []
    for m in messages:
        sent = {"role": m["role"], "content": m["content"]}
        if m.get("tool_calls"):
            sent["tool_calls"] = m["tool_calls"]
        if m["role"] == "tool":
            sent["tool_name"] = m["name"]
        out.append(sent)
    return out


def go_prompt(render: Path, template: str, messages: list[dict], tools: list[dict] | None = None,
              system: str | None = None, want: str = "prompt") -> str:
    request = {"template": template, "system": system or "", "messages": ollama_request(messages), "want": want}
    if tools is not None:
        request["tools"] = tools
    proc = subprocess.run([str(render)], input=json.dumps(request), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def with_system(case: str, messages: list[dict]) -> tuple[list[dict], str | None]:
    """(what the Jinja template sees, the Modelfile SYSTEM Ollama is given) for one way of saying SYSTEM."""
    system_message = [{"role": "system", "content": SYSTEM}]
    if case == "system message":
        return system_message + messages, None
    if case == "Modelfile SYSTEM":  # Ollama puts it first as a system message: the Jinja sees it so
        return system_message + messages, SYSTEM
    return messages, None


# ---- Ollama renders what the Jinja renders ----

@pytest.mark.parametrize("system_case", SYSTEMS)
@pytest.mark.parametrize("case", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_ollama_renders_tools_calls_and_results_exactly_as_the_jinja_template(go_render, name, case, system_case):
    family = TOOLS_BY_NAME[name]
    jinja_messages, modelfile_system = with_system(system_case, CONVERSATIONS[case])
    go_messages = CONVERSATIONS[case] if modelfile_system else jinja_messages
    expected = jinja_prompt(family.jinja, family, jinja_messages, TOOLS)
    assert go_prompt(go_render, family.go, go_messages, TOOLS, modelfile_system) == expected
    assert '"name":"get_weather"' in expected and "minimum" not in expected  # Ollama's view of the tools


@pytest.mark.parametrize("system_case", SYSTEMS)
@pytest.mark.parametrize("case", sorted(PLAIN))
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_without_tools_a_tools_family_renders_exactly_its_plain_family(go_render, name, case, system_case):
    family = TOOLS_BY_NAME[name]
    plain = BY_NAME[family.plain]
    jinja_messages, modelfile_system = with_system(system_case, PLAIN[case])
    go_messages = PLAIN[case] if modelfile_system else jinja_messages
    expected = jinja_prompt(plain.jinja, plain, jinja_messages, None)
    assert jinja_prompt(family.jinja, family, jinja_messages, None) == expected
    assert go_prompt(go_render, family.go, go_messages, None, modelfile_system) == expected
    assert go_prompt(go_render, go_template(plain), go_messages, None, modelfile_system) == expected


def test_the_jinja_takes_tools_and_arguments_as_objects_too():
    """llama.cpp and OpenAI-style callers pass objects, not Forge's JSON strings: same template, same layout."""
    messages = [USER, TWO_CALLS, WEATHER_RESULT]
    for family in TOOL_FAMILIES:
        rendered, _ = render_jinja_template(conversations=[messages], tools=TOOLS, chat_template=family.jinja,
                                            add_generation_prompt=True, bos_token="", eos_token=family.eos)
        text = rendered[0]
        assert '"name": "get_weather", "description": "Weather <now> & later, in °C"' in text
        assert '"city": "Paris <FR> & co"' in text and "18" in text


# ---- Ollama treats the model as a tools model and finds its calls ----

@pytest.mark.parametrize(("name", "tag"), [("qwen2.5", "<tool_call>"), ("llama3.1", "{"),
                                           ("mistral-tools", "[TOOL_CALLS][")])
def test_ollama_grants_tools_and_looks_for_the_familys_call_tag(go_render, name, tag):
    go = TOOLS_BY_NAME[name].go
    # Ollama grants "tools" to a TEMPLATE naming .Tools, and keeps it over the GGUF's Jinja when it also
    # names .ToolCalls and answers tool results (`eq .Role "tool"`)
    assert ".Tools" in go and ".ToolCalls" in go and 'eq .Role "tool"' in go
    assert go_prompt(go_render, go, [], want="tool_tag") == tag


# ---- Forge knows its tools templates ----

@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_a_model_with_a_tools_template_gets_the_tools_go_template(name, tmp_path):
    family = TOOLS_BY_NAME[name]
    assert detect_family(family.jinja) is family and tool_family_of(family.jinja + "\n") is family
    planned = plan(family.jinja, family.bos, family.eos)
    assert planned.family is family and planned.template == family.go and planned.default_system is None
    assert choose(name).jinja == family.jinja and choose(name).family is family
    path = tmp_path / "tools.jinja"
    path.write_text(family.jinja, encoding="utf-8")
    assert choose(str(path)).family is family


def tiny_gguf(path: Path, family) -> Path:
    """A GGUF holding only a tokenizer header with the family's template (no weights): what the Modelfile reads."""
    from forge.converter import gguf_module

    gguf = gguf_module()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([family.eos, "a", *([family.bos] if family.bos else [])])
    writer.add_eos_token_id(0)
    if family.bos:
        writer.add_bos_token_id(2)
    writer.add_chat_template(family.jinja)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_the_modelfile_of_a_tools_model_renders_its_tool_conversations_as_trained(go_render, tmp_path, name):
    from forge.modelfile import ModelfileConfig, parse_modelfile, write_modelfile

    family = TOOLS_BY_NAME[name]
    result = write_modelfile(ModelfileConfig(gguf=tiny_gguf(tmp_path / "model.gguf", family),
                                             output=tmp_path / "Modelfile", system_prompt=SYSTEM))
    assert result["template_family"] == name and result["stop_tokens"] == list(family.stops)
    written = parse_modelfile((tmp_path / "Modelfile").read_text(encoding="utf-8"), base_dir=tmp_path)
    messages = CONVERSATIONS["tool results then the answer"]
    expected = jinja_prompt(family.jinja, family, [{"role": "system", "content": SYSTEM}, *messages], TOOLS)
    assert go_prompt(go_render, written.template, messages, TOOLS, written.system) == expected


def test_a_template_that_only_resembles_a_tools_family_keeps_its_plain_family():
    chatml = BY_NAME["chatml"].jinja
    assert tool_family_of(chatml) is None and detect_family(chatml).name == "chatml"
    lookalike = TOOLS_BY_NAME["qwen2.5"].jinja.replace("You may call", "You can call")
    assert tool_family_of(lookalike) is None and detect_family(lookalike).name == "chatml"


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_each_assistant_turn_renders_after_the_prompt_before_it(name):
    """Training masks each assistant turn as what the conversation through it adds to the prompt before it."""
    family = TOOLS_BY_NAME[name]
    messages = CONVERSATIONS["several turns"]
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            before = jinja_prompt(family.jinja, family, messages[:i], TOOLS)
            through = jinja_prompt(family.jinja, family, messages[: i + 1], TOOLS)
            assert through.startswith(before) and through[len(before):].rstrip().endswith(family.eos)


# ---- Forge's JSON is Go's ----

def test_go_json_writes_numbers_and_strings_as_go_does():
    assert go_json([5.0, 2.5, 1e-7, 1.5e-7, 1e21, 1e20, -0.0, 2**63, 0.000001], sort_keys=True) == (
        "[5,2.5,1e-7,1.5e-7,1e+21,100000000000000000000,-0,9223372036854776000,0.000001]")
    assert go_json({"b": "<a> & \u2028é\b\f\x01", "a": None}, sort_keys=True) == (
        '{"a":null,"b":"\\u003ca\\u003e \\u0026 \\u2028é\\b\\f\\u0001"}')  # \b and \f as Go >= 1.22 writes them
    assert go_json({"b": 1, "a": 2}, sort_keys=False) == '{"b":1,"a":2}'
    with pytest.raises(ValueError):
        go_json(float("nan"), sort_keys=True)


def test_a_tool_is_shown_as_ollama_keeps_it():
    shown = json.loads(function_json(WEATHER["function"]))
    assert list(shown) == ["name", "description", "parameters"]
    assert list(shown["parameters"]) == ["type", "required", "properties"]  # additionalProperties dropped
    assert list(shown["parameters"]["properties"]) == ["city", "days", "unit", "where"]  # a Go map: sorted
    assert list(shown["parameters"]["properties"]["where"]["properties"]) == ["lon", "lat"]  # ordered map
    assert shown["parameters"]["properties"]["unit"] == {"type": ["string", "null"], "enum": ["c", "f"]}
    assert json.loads(function_json({"name": "bare"})) == {"name": "bare", "description": "",
                                                           "parameters": {"type": "", "properties": None}}


SAFE_TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\b\f"), max_size=12)
TEXT = SAFE_TEXT | st.sampled_from(["<a href>&amp;", "\u2028\u2029", "日本語 é ü", "\x00\x1f\x7f", 'q"b\\s'])
NUMBERS = (st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
           | st.sampled_from([1.0, 2.5, 1e-7, 1e21, 1e20, -0.0, 1e-6, 5e-324, 123456789.0, 0.1]))
SCALARS = st.none() | st.booleans() | NUMBERS | TEXT
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                      max_leaves=8)
TYPES = st.sampled_from(["string", "number", "integer", "boolean", "array", "object", "null"])
PROPERTY = st.recursive(
    st.fixed_dictionaries({}, optional={"type": TYPES | st.lists(TYPES, max_size=3), "description": TEXT,
                                        "enum": st.lists(SCALARS, max_size=3), "items": VALUES,
                                        "default": VALUES, "minimum": NUMBERS}),
    lambda inner: st.fixed_dictionaries({}, optional={
        "type": TYPES, "properties": st.dictionaries(TEXT, inner, max_size=3),
        "required": st.lists(TEXT, max_size=2), "anyOf": st.lists(inner, max_size=2), "description": TEXT}),
    max_leaves=6)
FUNCTION = st.fixed_dictionaries(
    {"name": TEXT, "description": TEXT,
     "parameters": st.fixed_dictionaries({"type": st.just("object"), "properties": st.dictionaries(TEXT, PROPERTY,
                                                                                                   max_size=4)},
                                         optional={"required": st.lists(TEXT, max_size=3), "$defs": VALUES,
                                                   "additionalProperties": st.booleans()})})
JSON_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@JSON_SETTINGS
@given(function=FUNCTION)
def test_function_json_is_what_ollamas_json_function_prints(go_render, function):
    template = "{{ range .Tools }}{{ json .Function }}{{ end }}"
    assert go_prompt(go_render, template, [], [{"type": "function", "function": function}]) == function_json(function)


@JSON_SETTINGS
@given(arguments=st.dictionaries(TEXT, VALUES, max_size=5))
def test_arguments_json_is_what_ollamas_arguments_print(go_render, arguments):
    template = "{{ range .Messages }}{{ range .ToolCalls }}{{ .Function.Arguments }}{{ end }}{{ end }}"
    messages = [{"role": "assistant", "content": "", "tool_calls": [call("f", **{})]}]
    messages[0]["tool_calls"][0]["function"]["arguments"] = arguments
    assert go_prompt(go_render, template, messages) == arguments_json(arguments)


# ---- replies parse back into calls ----

def reply_of(family, messages: list[dict]) -> str:
    """What the model writes for the last (assistant) turn: the conversation less the prompt before it, less
    the end-of-turn token that stops generation."""
    through = jinja_prompt(family.jinja, family, messages, TOOLS)
    reply = through[len(jinja_prompt(family.jinja, family, messages[:-1], TOOLS)):]
    return reply.rstrip("\n").removesuffix(family.eos)


def expected_calls(turn: dict) -> list[dict]:
    return [{"name": c["function"]["name"], "arguments": json.loads(arguments_json(c["function"]["arguments"]))}
            for c in turn["tool_calls"]]


@pytest.mark.parametrize("turn", [ONE_CALL, TWO_CALLS, TALKING_CALL], ids=["one", "two", "with text"])
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_parse_calls_reads_back_the_calls_a_family_renders(name, turn):
    family = TOOLS_BY_NAME[name]
    content, calls, unparsed = parse_calls(name, reply_of(family, [USER, turn]))
    assert calls == expected_calls(turn) and unparsed == 0
    assert content == (turn["content"] if name == "qwen2.5" else "")  # the others write a calling turn's calls only


NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(FAMILY_NAMES),
       calls=st.lists(st.tuples(NAMES, st.dictionaries(TEXT, VALUES, max_size=4)), min_size=1, max_size=3))
def test_parse_calls_round_trips_any_arguments(name, calls):
    turn = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]}
    content, parsed, unparsed = parse_calls(name, reply_of(TOOLS_BY_NAME[name], [USER, turn]))
    assert (content, parsed, unparsed) == ("", expected_calls(turn), 0)


@pytest.mark.parametrize(("name", "reply", "expected"), [
    ("qwen2.5", 'Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 1}\n</tool_call>\n<tool_call>\n'
                '{"name": "now", "arguments": "{}"}\n</tool_call>', ("Sure.", [{"name": "now", "arguments": {}}], 1)),
    ("qwen2.5", '<tool_call>\n{"name": "now", "arguments": {}}', ("", [{"name": "now", "arguments": {}}], 0)),
    ("llama3.1", '{"name": "add", "parameters": {"a": 1', ('{"name": "add", "parameters": {"a": 1', [], 1)),
    ("llama3.1", '{"answer": 42}', ('{"answer": 42}', [], 1)),
    ("llama3.1", "It is 18 °C.", ("It is 18 °C.", [], 0)),
    ("mistral-tools", '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1}}, {"arguments": {}}]',
     ("", [{"name": "add", "arguments": {"a": 1}}], 1)),
    ("mistral-tools", "[TOOL_CALLS][{oops", ("", [], 1)),
    ("chatml", '<tool_call>{"name": "add"}</tool_call>', ('<tool_call>{"name": "add"}</tool_call>', [], 0)),
])
def test_parse_calls_counts_what_does_not_read_as_a_call(name, reply, expected):
    assert parse_calls(name, reply) == expected
