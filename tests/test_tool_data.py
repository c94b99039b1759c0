"""Tool-calling records: the messages format with tools and tool_calls, and ShareGPT as LLaMA-Factory writes it,
read into Forge's canonical conversations; every malformed line reported at once, by its line number."""

import json

import pytest

from forge.cli import main
from forge.data import load_dataset
from forge.errors import Codes, ForgeError

WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
WEATHER_TOOL = {"type": "function", "function": WEATHER}
CANONICAL_WEATHER = {"type": "function", "function": WEATHER}
CLOCK = {"name": "get_time", "description": "Local time in a time zone",
         "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}
CANONICAL_CLOCK = {"type": "function", "function": CLOCK}
ASK = {"role": "user", "content": "Weather in Paris?"}


def call(name="get_weather", arguments='{"city": "Paris"}', **extra) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}, **extra}


def calling(*calls, content=None) -> dict:
    return {"role": "assistant", "content": content, "tool_calls": list(calls)}


def canonical_call(arguments: dict, name="get_weather") -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def problems_of(path, fmt="auto") -> list[str]:
    with pytest.raises(ForgeError) as info:
        load_dataset(path, fmt)
    assert info.value.code == Codes.DATASET_INVALID
    return info.value.details


GOOD_MESSAGES = {"messages": [ASK, calling(call()), {"role": "tool", "content": "20 C"},
                              {"role": "assistant", "content": "It is 20 C in Paris."}], "tools": [WEATHER_TOOL]}

BAD_MESSAGES = [  # (record, what the user is told about its line)
    (GOOD_MESSAGES, None),
    ({**GOOD_MESSAGES, "messages": [ASK, calling(call("get_time", "{}"))]},
     "messages[1] calls 'get_time', which the record does not declare (declared: 'get_weather')"),
    ({**GOOD_MESSAGES, "messages": [ASK, calling(call(arguments="{city: Paris}"))]},
     "messages[1]: the arguments of 'get_weather' are not JSON (Expecting property name enclosed in double quotes "
     "at column 2)"),
    ({**GOOD_MESSAGES, "messages": [ASK, calling(call(arguments=["Paris"]))]},
     "messages[1]: the arguments of 'get_weather' are an array, not a JSON object"),
    ({**GOOD_MESSAGES, "messages": [ASK, calling(call(arguments="42"))]},
     "messages[1]: the arguments of 'get_weather' are a JSON string holding a number, not an object"),
    ({**GOOD_MESSAGES, "messages": [ASK, calling(call(arguments={"unit": "C"}))]},
     "messages[1] calls 'get_weather' without its required parameter(s) 'city'"),
    ({**GOOD_MESSAGES, "messages": [ASK, {"role": "tool", "content": "20 C"}, {"role": "assistant", "content": "Hm."}]},
     "messages[1] is a tool result, but the turn before it makes no tool call"),
    ({**GOOD_MESSAGES, "messages": [ASK, calling(call(id="call_1")),
                                    {"role": "tool", "tool_call_id": "call_9", "content": "20 C"}]},
     "messages[2].tool_call_id 'call_9' matches no call of the assistant turn before it (its call ids: 'call_1')"),
    ({"messages": [], "tools": [WEATHER_TOOL]}, "field 'messages' must be a non-empty list"),
    ({**GOOD_MESSAGES, "tools": WEATHER_TOOL}, "'tools' must be a list of function tools, got an object"),
    ({**GOOD_MESSAGES, "tools": [{"description": "no name"}]},
     "tools[0] has no 'name'; each tool needs a non-empty name"),
    ({**GOOD_MESSAGES, "tools": [WEATHER_TOOL, WEATHER_TOOL]},
     "tools[1].function.name 'get_weather' is already the name of tools[0]; tool names must be unique"),
    ({"messages": [ASK, {"role": "assistant", "content": ""}, ASK, {"role": "assistant", "content": " "}],
      "tools": [WEATHER_TOOL]},
     "every assistant turn is empty (no text, no tool call), so nothing would be trained"),
    ({**GOOD_MESSAGES, "messages": [ASK, calling(call()), {"role": "tool", "content": "20 C"},
                                    {"role": "tool", "content": "21 C"}]},
     "messages[3] is tool result 2 after an assistant turn that makes 1 call(s); each call gets at most one result"),
    ({**GOOD_MESSAGES, "messages": [ASK, calling(call()), {"role": "tool", "name": "get_time", "content": "9:00"}]},
     "messages[2] is named 'get_time' but answers the call to 'get_weather'"),
    ({**GOOD_MESSAGES, "messages": [ASK, calling(call(arguments='{"city": ' + "[" * 70 + "]" * 70 + "}"))]},
     "messages[1]: the arguments of 'get_weather' are JSON nested deeper than 64 levels"),
    ({**GOOD_MESSAGES, "messages": [ASK, calling(call(arguments={"city": "Par\ud800is"}))]},
     "messages[1]: the arguments of 'get_weather' hold an unpaired surrogate"),
]


def test_every_malformed_tool_record_is_reported_by_its_line_number(tmp_path):
    path = write_jsonl(tmp_path / "tools.jsonl", [record for record, _ in BAD_MESSAGES])
    with pytest.raises(ForgeError) as info:
        load_dataset(path)
    details = info.value.details
    expected = [(n, told) for n, (_, told) in enumerate(BAD_MESSAGES, start=1) if told]
    assert f"{len(expected)} problem(s) in messages dataset" in info.value.message
    assert len(details) == len(expected), details  # one problem per bad line, none for the good one
    for (lineno, told), detail in zip(expected, details, strict=True):
        assert detail.startswith(f"line {lineno}: {told}"), (lineno, detail)
        assert detail.endswith("calls name tools listed in 'tools'")  # and the format's fix


def test_a_line_with_several_tool_problems_lists_each(tmp_path):
    record = {"messages": [ASK, calling(call("get_time", "{}"), call(arguments=[1])), {"role": "tool", "content": "9"},
                           {"role": "tool", "content": "x"}, {"role": "tool", "content": "y"}], "tools": [WEATHER]}
    details = problems_of(write_jsonl(tmp_path / "t.jsonl", [GOOD_MESSAGES, record]))
    assert [d.split(";")[0] for d in details] == [
        "line 2: messages[1] (call 1 of 2) calls 'get_time', which the record does not declare (declared: "
        "'get_weather')",
        "line 2: messages[1] (call 2 of 2): the arguments of 'get_weather' are an array, not a JSON object",
        "line 2: messages[4] is tool result 3 after an assistant turn that makes 2 call(s)"]


def test_messages_with_tools_become_canonical_conversations(tmp_path):
    rows = [
        {"messages": [ASK,  # arguments as a JSON string, content null, call ids matched out of order
                      calling(call(id="a"), call("get_time", {"zone": "Europe/Paris"}, id="b")),
                      {"role": "tool", "tool_call_id": "b", "content": "09:00"},
                      {"role": "tool", "tool_call_id": "a", "content": "20 C"},
                      {"role": "assistant", "content": "20 C at 09:00."}],
         "tools": [WEATHER, CLOCK]},  # bare functions
        {"messages": [ASK, {"role": "assistant",
                            "tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}],
         "tools": [WEATHER_TOOL, {"name": "ping"}]},  # content missing, a bare call; a tool with no schema
        {"messages": [ASK, {"role": "assistant", "content": "No tools here."}]},
    ]
    ds = load_dataset(write_jsonl(tmp_path / "m.jsonl", rows), system_prompt="Be brief.")
    assert ds.format == "messages" and len(ds.conversations) == 3
    first, second, third = ds.conversations
    system = {"role": "system", "content": "Be brief."}
    assert first == [system, ASK,
                     {"role": "assistant", "content": "", "tool_calls": [
                         canonical_call({"city": "Paris"}), canonical_call({"zone": "Europe/Paris"}, "get_time")]},
                     {"role": "tool", "content": "09:00", "name": "get_time"},  # answers call "b"
                     {"role": "tool", "content": "20 C", "name": "get_weather"},
                     {"role": "assistant", "content": "20 C at 09:00."}]
    assert first.tools == [CANONICAL_WEATHER, CANONICAL_CLOCK]
    assert second == [system, ASK, {"role": "assistant", "content": "",
                                    "tool_calls": [canonical_call({"city": "Oslo"})]}]
    assert second.tools == [CANONICAL_WEATHER, {"type": "function", "function": {
        "name": "ping", "description": "", "parameters": {"type": "object", "properties": {}, "required": []}}}]
    assert third == [system, ASK, {"role": "assistant", "content": "No tools here."}] and third.tools is None


LLAMA_FACTORY = {  # as LLaMA-Factory's glaive_toolcall demo writes a record: tools as a JSON string
    "conversations": [
        {"from": "human", "value": "Weather and time in Paris?"},
        {"from": "function_call", "value": json.dumps([{"name": "get_weather", "arguments": {"city": "Paris"}},
                                                       {"name": "get_time", "arguments": '{"zone": "Europe/Paris"}'}])},
        {"from": "observation", "value": '{"temp": 20}'},
        {"from": "observation", "value": '{"time": "09:00"}'},
        {"from": "gpt", "value": "20 C at 09:00."},
        {"from": "human", "value": "And Oslo?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}})},
        {"from": "observation", "value": '{"temp": 3}'},
        {"from": "gpt", "value": "3 C in Oslo."},
    ],
    "system": "You check the weather.",
    "tools": json.dumps([WEATHER, CLOCK]),
}


def test_sharegpt_records_from_llama_factory_become_canonical_conversations(tmp_path):
    plain = {"conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello."}]}
    ds = load_dataset(write_jsonl(tmp_path / "sg.jsonl", [LLAMA_FACTORY, plain]))
    assert ds.format == "sharegpt" and len(ds.conversations) == 2
    tools, chat = ds.conversations
    assert tools == [
        {"role": "system", "content": "You check the weather."},
        {"role": "user", "content": "Weather and time in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [canonical_call({"city": "Paris"}),
                                                             canonical_call({"zone": "Europe/Paris"}, "get_time")]},
        {"role": "tool", "content": '{"temp": 20}', "name": "get_weather"},
        {"role": "tool", "content": '{"time": "09:00"}', "name": "get_time"},
        {"role": "assistant", "content": "20 C at 09:00."},
        {"role": "user", "content": "And Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [canonical_call({"city": "Oslo"})]},
        {"role": "tool", "content": '{"temp": 3}', "name": "get_weather"},
        {"role": "assistant", "content": "3 C in Oslo."}]
    assert tools.tools == [CANONICAL_WEATHER, CANONICAL_CLOCK]
    assert chat == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert chat.tools is None


def test_sharegpt_tools_may_be_a_list_and_the_system_prompt_fills_in(tmp_path):
    record = {"conversations": [{"from": "human", "value": "Paris?"},
                                {"from": "function_call", "value": '{"name": "get_weather", "arguments": '
                                                                   '"{\\"city\\": \\"Paris\\"}"}'}],
              "tools": [WEATHER_TOOL]}
    ds = load_dataset(write_jsonl(tmp_path / "sg.jsonl", [record]), "sharegpt", system_prompt="Be brief.")
    assert ds.conversations[0] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Paris?"},
                                   {"role": "assistant", "content": "", "tool_calls": [
                                       canonical_call({"city": "Paris"})]}]
    assert ds.conversations[0].tools == [CANONICAL_WEATHER]


WEATHER_JSON = json.dumps([WEATHER])  # LLaMA-Factory's spelling of a tool list


def sharegpt(*turns, tools=WEATHER_JSON) -> dict:
    return {"conversations": [{"from": f, "value": v} for f, v in turns], "tools": tools}


HUMAN = ("human", "Weather in Paris?")
CALL = ("function_call", json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}}))
BAD_SHAREGPT = [
    (sharegpt(HUMAN, CALL, ("observation", "20 C"), ("gpt", "20 C.")), None),
    (sharegpt(HUMAN, ("function_call", '{"name": "get_weather", "arguments": }')),
     "conversations[1].value is not JSON (Expecting value at column 38)"),
    (sharegpt(HUMAN, CALL, tools='[{"name": "get_weather",'),
     "field 'tools' is not JSON (Expecting property name enclosed in double quotes at column 25)"),
    (sharegpt(HUMAN, ("function_call", json.dumps({"name": "get_time", "arguments": {}}))),
     "conversations[1] calls 'get_time', which the record does not declare (declared: 'get_weather')"),
    (sharegpt(HUMAN, ("observation", "20 C"), ("gpt", "Hm.")),
     "conversations[1] is a tool result, but the turn before it makes no tool call"),
    (sharegpt(), "field 'conversations' must be a non-empty list"),
    (sharegpt(("bot", "hi"), ("gpt", "Hello.")),
     "conversations[0].from is 'bot', expected one of human, gpt, system, function_call, observation"),
    (sharegpt(HUMAN, ("gpt", ""), HUMAN, ("gpt", "  ")),
     "every assistant turn is empty (no text, no tool call), so nothing would be trained"),
    (sharegpt(HUMAN, ("function_call", json.dumps([{"name": "get_weather", "arguments": {"city": "Rome"}},
                                                   {"name": "get_weather", "arguments": {}}]))),
     "conversations[1] (call 2 of 2) calls 'get_weather' without its required parameter(s) 'city'"),
    (sharegpt(HUMAN, ("function_call", "[]")),
     "conversations[1].value holds an empty list; a function_call's value is {\"name\", \"arguments\"} as JSON"),
    (sharegpt(HUMAN, ("function_call", json.dumps({"name": "get_weather", "arguments": "[1, 2]"}))),
     "conversations[1]: the arguments of 'get_weather' are a JSON string holding an array, not an object"),
    (sharegpt(HUMAN, ("gpt", "Sunny."), tools=json.dumps([{"name": " "}])),
     "tools[0].name is ' '; each tool needs a non-empty name"),
    (sharegpt(HUMAN), "no gpt or function_call turn, so nothing would be trained"),
    (sharegpt(HUMAN, ("gpt", "Sunny."),
              tools=[{"name": "get_weather", "parameters": {"properties": {"city": "string"}}}]),
     "tools[0].parameters.properties['city'] must be a schema object like {\"type\": \"string\"}, got a string"),
]


def test_every_malformed_sharegpt_record_is_reported_by_its_line_number(tmp_path):
    path = write_jsonl(tmp_path / "sg.jsonl", [record for record, _ in BAD_SHAREGPT])
    details = problems_of(path)
    expected = [(n, told) for n, (_, told) in enumerate(BAD_SHAREGPT, start=1) if told]
    assert len(details) == len(expected), details
    for (lineno, told), detail in zip(expected, details, strict=True):
        assert detail.startswith(f"line {lineno}: {told}"), (lineno, detail)
        assert "'conversations' must be a list of {from, value}" in detail


def test_a_sharegpt_line_in_a_messages_file_is_named_as_such(tmp_path):
    details = problems_of(write_jsonl(tmp_path / "mixed.jsonl", [GOOD_MESSAGES, GOOD_MESSAGES, BAD_SHAREGPT[0][0]]))
    assert details == ["line 3: looks like a 'sharegpt' record but the file is 'messages'; use one format per file"]


def test_cli_validate_lists_each_bad_tool_line_and_summarises_a_good_file(capsys, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD_MESSAGES, BAD_MESSAGES[1][0], BAD_MESSAGES[5][0]])
    assert main(["data", "validate", str(bad), "--json"]) == 2
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["code"] == "dataset_invalid" and error["hint"]
    assert [d.split(";")[0] for d in error["details"]] == [
        "line 2: messages[1] calls 'get_time', which the record does not declare (declared: 'get_weather')",
        "line 3: messages[1] calls 'get_weather' without its required parameter(s) 'city'"]

    assert main(["data", "validate", str(bad)]) == 2  # a person reads the same on stderr
    err = capsys.readouterr().err
    assert err.startswith("error [dataset_invalid]") and "2 problem(s) in messages dataset" in err
    assert "line 3: messages[1] calls 'get_weather' without its required parameter(s) 'city'" in err

    long_city = "x" * 1000
    good = write_jsonl(tmp_path / "good.jsonl", [sharegpt(HUMAN, (
        "function_call", json.dumps({"name": "get_weather", "arguments": {"city": long_city}}))), LLAMA_FACTORY])
    assert main(["data", "validate", str(good), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "sharegpt" and report["records"] == 2
    assert report["tools"] == {"records": 2, "calls": 4, "results": 3, "declared": ["get_time", "get_weather"]}
    # the example echoes the call, its long argument cut as any long text is
    assert report["example"][1]["tool_calls"] == [canonical_call({"city": "x" * 300 + "… (1000 characters)"})]


def test_numbers_go_cannot_print_and_names_a_template_cannot_quote_are_line_problems(tmp_path):
    rows = [
        {**GOOD_MESSAGES, "messages": [ASK, calling(call(arguments='{"city": NaN}'))]},
        {**GOOD_MESSAGES, "messages": [ASK, calling(call(arguments='{"city": 1e400}'))]},
        {**GOOD_MESSAGES, "tools": [{"type": "function", "function": {**WEATHER, "parameters": {
            "type": "object", "properties": {"city": {"type": "number", "enum": [1e400]}}}}}]},
        {**GOOD_MESSAGES, "tools": [{"type": "function", "function": {**WEATHER, "name": 'get"weather'}}],
         "messages": [ASK, {"role": "assistant", "content": "No call."}]},
    ]
    path = tmp_path / "numbers.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows).replace("Infinity", "1e400"), encoding="utf-8")
    problems = problems_of(path)
    assert [p.split(":")[0] for p in problems] == ["line 1", "line 2", "line 3", "line 4"], problems
    assert "NaN" in problems[0] and "inf" in problems[1] and "finite numbers" in problems[2]
    assert "letters, digits" in problems[3]


def test_a_preference_prompt_whose_assistant_turn_only_calls_a_tool_is_a_problem_not_a_crash(tmp_path):
    path = write_jsonl(tmp_path / "pref.jsonl", [
        {"messages": [ASK, calling(call()), {"role": "user", "content": "And?"}], "chosen": "c", "rejected": "d"}])
    problems = problems_of(path)
    assert problems and problems[0].startswith("line 1: messages[1].content"), problems


def test_records_with_tools_need_a_forge_tools_template(tmp_path, assets):
    from forge.data import DataConfig, validate

    path = write_jsonl(tmp_path / "tools.jsonl", [GOOD_MESSAGES])
    with pytest.raises(ForgeError) as info:  # the tiny model's own ChatML template prints no tools
        validate(DataConfig(path=path, base_model=assets["model_dir"]))
    assert info.value.code == Codes.UNSUPPORTED_TEMPLATE and "qwen2.5" in info.value.hint
    report = validate(DataConfig(path=path, base_model=assets["model_dir"], chat_template="qwen2.5", max_length=600))
    assert report["tokens"]["tool_list_tokens"] > 32
    assert any("replaced by family:qwen2.5" in w for w in report["warnings"])
    assert any("of max_length=600" in w for w in report["warnings"]), (report["tokens"], report["warnings"])


def test_a_broken_call_block_is_never_a_right_answer():
    from forge.tool_eval import score

    cases = [{"expected": []}, {"expected": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}]
    answers = [{"tool_calls": [], "unparsed_calls": 1},
               {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}], "unparsed_calls": 0}]
    out = score(cases, answers)
    assert out["right"] == 1 and out["no_call_right"] == "0/1" and out["calls_right"] == "1/1"
    assert out["parsed_share"] == 0.5
