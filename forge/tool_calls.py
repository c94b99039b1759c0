"""Tool calling in records: the tools a record declares, the calls its assistant turns make, and the tool
turns that answer them — every problem found (each naming where it is), then Forge's canonical form.

Canonical form: a tool is ``{"type": "function", "function": {"name", "description", "parameters": {"type":
"object", "properties", "required", ...}}}``; a call is ``{"type": "function", "function": {"name", "arguments":
dict}}``; a tool turn is ``{"role": "tool", "content", "name"}`` with the name of the call it answers. The k-th
tool turn after an assistant turn answers its k-th call, or the call whose ``id`` its ``tool_call_id`` names.

Input is what the file had: each tool as that object or as a bare function, each call as that object or as a
bare ``{"name", "arguments"}``, arguments as an object or as a JSON string. Formats (``forge.records``,
``forge.sharegpt``) check the shape of each turn first; this module assumes roles and texts are already right.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable

FUNCTION = "function"
SHOWN_NAMES = 8  # declared tools an error lists before "… and N more"
MAX_DEPTH = 64  # nesting of JSON held in a string, as forge.data limits a record's


def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def json_kind(value) -> str:
    """A value named as JSON names it: an object, an array, a string, a number, true/false, null."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return "null" if value is None else type(value).__name__


def _deeper_than(value, limit: int) -> bool:
    """Whether a parsed JSON value nests more than ``limit`` levels, counted without recursion."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def has_surrogate(value) -> bool:
    """Whether a JSON value holds a lone surrogate (a JSON escape such as \\ud800 that no UTF-8 text can hold)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    except (TypeError, ValueError, RecursionError):
        return False
    return False


NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")  # printed raw inside JSON by every template, and by Ollama's


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def number_problem(value) -> str | None:
    """A number Go cannot print (NaN, infinity, beyond float64) anywhere in a JSON value, or None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, float) and not math.isfinite(item):
            return f"holds {item!r}, which is no JSON number"
        elif isinstance(item, int) and not isinstance(item, bool) and abs(item) > 2**1023:
            return "holds an integer beyond a 64-bit float's range"
    return None


def loads(text: str) -> tuple[object, str | None]:
    """JSON held in a string (a call's arguments, a ShareGPT value or tool list): (value, None) or (None, why
    not, as "is not JSON (...)"). Nesting is limited as a record's is: a string can hide any depth."""
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        return None, f"is not JSON ({exc.msg} at column {exc.colno})"
    except RecursionError:
        return None, f"is not JSON that can be read (nested past {MAX_DEPTH} levels)"
    except ValueError as exc:  # NaN or Infinity, or an integer of thousands of digits
        return None, f"is not JSON that can be read ({str(exc)[:80]})"
    if _deeper_than(value, MAX_DEPTH):
        return None, f"is JSON nested deeper than {MAX_DEPTH} levels"
    return value, None


# ---------------------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------------------

def _function_of(tool: dict) -> tuple[dict, str]:
    """A tool's function and the suffix naming it: the wrapped ``function`` object, or the tool itself."""
    return (tool["function"], ".function") if "function" in tool else (tool, "")


def _schema_problems(parameters, where: str) -> list[str]:
    if not isinstance(parameters, dict):
        return [f"{where} must be a JSON schema object, got {json_kind(parameters)}"]
    problems = []
    if parameters.get("type", "object") != "object":
        problems.append(f"{where}.type is {_short(parameters['type'])}; a tool's parameters are an 'object' schema")
    properties = parameters.get("properties", {})
    if not isinstance(properties, dict):
        problems.append(f"{where}.properties must be an object of parameter schemas, got {json_kind(properties)}")
    else:
        problems.extend(f"{where}.properties[{_short(k)}] must be a schema object like {{\"type\": \"string\"}}, got "
                        f"{json_kind(v)}" for k, v in properties.items() if not isinstance(v, dict))
    required = parameters.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        problems.append(f"{where}.required must be a list of parameter names")
    return problems


def tools_problems(tools) -> list[str]:
    """Every problem of a tool list: not a list, a tool that is not a function, a name missing, empty or
    declared twice, a description or parameter schema of the wrong type."""
    if not isinstance(tools, list):
        return [f"'tools' must be a list of function tools, got {json_kind(tools)}"]
    problems: list[str] = []
    first: dict[str, int] = {}
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            problems.append(f"{where} must be a function tool object, got {json_kind(tool)}")
            continue
        if tool.get("type", FUNCTION) != FUNCTION:
            problems.append(f"{where}.type is {_short(tool['type'])}; only 'function' tools can be called")
        function, suffix = _function_of(tool)
        where += suffix
        if not isinstance(function, dict):
            problems.append(f"{where} must be an object with a name, got {json_kind(function)}")
            continue
        name = function.get("name")
        if not isinstance(name, str) or not name.strip():
            problems.append(f"{where}.name is {_short(name)}; each tool needs a non-empty name" if "name" in function
                            else f"{where} has no 'name'; each tool needs a non-empty name")
        elif not NAME.match(name):
            problems.append(f"{where}.name {_short(name)} must be 1-64 letters, digits, '_', '.', ':' or '-' "
                            "(templates write it inside JSON as it is)")
        elif name in first:
            problems.append(f"{where}.name {_short(name)} is already the name of tools[{first[name]}]; "
                            "tool names must be unique")
        else:
            first[name] = i
        if function.get("description") is not None and not isinstance(function["description"], str):
            problems.append(f"{where}.description must be a string, got {json_kind(function['description'])}")
        if function.get("parameters") is not None:  # null or absent: no parameters
            problems.extend(_schema_problems(function["parameters"], f"{where}.parameters"))
        if (problem := number_problem(tool)) is not None:
            problems.append(f"{where} {problem}; use finite numbers")
        if has_surrogate(tool):
            problems.append(f"tools[{i}] holds an unpaired surrogate (a \\ud800-style escape); save it as plain UTF-8")
    return problems


def canonical_tools(tools: list) -> list[dict]:
    """A valid tool list (see ``tools_problems``) in canonical form: each tool wrapped, with a description and
    an object schema that has properties and required (other schema keys kept as given)."""
    out = []
    for tool in tools:
        function, _ = _function_of(tool)
        given = function.get("parameters") or {}
        parameters = {"type": "object", "properties": given.get("properties", {}),
                      "required": list(given.get("required", [])),
                      **{k: v for k, v in given.items() if k not in ("type", "properties", "required")}}
        out.append({"type": FUNCTION, "function": {"name": function["name"],
                                                   "description": function.get("description") or "",
                                                   "parameters": parameters}})
    return out


def _declared(tools: list | None) -> dict[str, dict]:
    return {t["function"]["name"]: t["function"] for t in canonical_tools(tools)} if tools else {}


# ---------------------------------------------------------------------------------------------------------
# Calls
# ---------------------------------------------------------------------------------------------------------

def parse_arguments(value) -> tuple[dict | None, str | None]:
    """A call's arguments as a dict, from an object or a JSON string: (arguments, None) or (None, why not)."""
    if isinstance(value, str):
        value, why = loads(value)
        if why:
            return None, "are" + why.removeprefix("is")
        if not isinstance(value, dict):
            return None, f"are a JSON string holding {json_kind(value)}, not an object"
    elif not isinstance(value, dict):
        return None, f"are {json_kind(value)}, not a JSON object"
    if (problem := number_problem(value)) is not None:
        return None, problem.replace("holds", "hold", 1) + "; use finite numbers"
    return value, None


def _call_parts(call: dict) -> tuple[object, object]:
    """(name, arguments) of a call given wrapped or bare; arguments missing means none."""
    function = call["function"] if isinstance(call.get("function"), dict) else call
    return function.get("name"), function.get("arguments", {})


def _names(declared: dict[str, dict]) -> str:
    names = [_short(n) for n in declared]
    more = len(names) - SHOWN_NAMES
    return ", ".join(names[:SHOWN_NAMES]) + (f", … and {more} more" if more > 0 else "")


def _call_problems(call, label: str, declared: dict[str, dict] | None) -> list[str]:
    """A call's problems; ``declared`` None when the tool list itself is wrong (names are then not checked)."""
    if not isinstance(call, dict):
        return [f"{label} is {json_kind(call)}; a call is {{\"type\": \"function\", \"function\": "
                "{\"name\", \"arguments\"}}"]
    if "function" in call and not isinstance(call["function"], dict):
        return [f"{label}.function must be an object with 'name' and 'arguments', got {json_kind(call['function'])}"]
    problems = []
    if call.get("type", FUNCTION) != FUNCTION:
        problems.append(f"{label}.type is {_short(call['type'])}; only 'function' calls are known")
    if "id" in call and not isinstance(call["id"], str):
        problems.append(f"{label}.id must be a string, got {json_kind(call['id'])}")
    name, arguments = _call_parts(call)
    if not isinstance(name, str) or not name.strip():
        return [*problems, f"{label} has no function name; each call names one of the record's tools"]
    if declared is not None and name not in declared:
        problems.append(f"{label} calls {_short(name)}, which the record does not declare (declared: "
                        f"{_names(declared)}); add it to 'tools' or fix the name" if declared else
                        f"{label} calls {_short(name)} but the record declares no tools; list it in 'tools'")
    arguments, why = parse_arguments(arguments)
    if why:
        return [*problems, f"{label}: the arguments of {_short(name)} {why}"]
    if has_surrogate(arguments):
        problems.append(f"{label}: the arguments of {_short(name)} hold an unpaired surrogate (a \\ud800-style "
                        "escape); save them as plain UTF-8")
    required = ((declared or {}).get(name) or {}).get("parameters", {}).get("required", [])
    missing = [r for r in required if r not in arguments]
    if missing:
        problems.append(f"{label} calls {_short(name)} without its required parameter(s) "
                        f"{', '.join(_short(m) for m in missing)}")
    return problems


def _call_labels(turn: str, n: int) -> list[str]:
    return [turn] if n == 1 else [f"{turn} (call {k + 1} of {n})" for k in range(n)]


def _canonical_call(call: dict) -> dict:
    name, arguments = _call_parts(call)
    return {"type": FUNCTION, "function": {"name": name, "arguments": parse_arguments(arguments)[0]}}


# ---------------------------------------------------------------------------------------------------------
# Turns: which call each tool turn answers
# ---------------------------------------------------------------------------------------------------------

def _answered(messages: list[dict], turn: Callable[[int], str]) -> tuple[list[dict | None], list[str]]:
    """For each message, the call it answers (tool turns; None for others or when it answers none), and the
    problems of tool turns that answer nothing or name a call that is not there."""
    answers: list[dict | None] = []
    problems: list[str] = []
    calls: list[dict] = []  # the calls of the assistant turn the current run of tool turns follows
    given = 0  # tool turns since that assistant turn
    for i, message in enumerate(messages):
        role = message.get("role")
        answers.append(None)
        if role != "tool":
            listed = message.get("tool_calls") if role == "assistant" else None
            calls = [c for c in listed if isinstance(c, dict)] if isinstance(listed, list) else []
            given = 0
            continue
        given += 1
        call_id = message.get("tool_call_id")
        if not calls:
            problems.append(f"{turn(i)} is a tool result, but the turn before it makes no tool call; put each tool "
                            "result right after the assistant turn whose call it answers")
        elif call_id is not None:
            ids = [c["id"] for c in calls if isinstance(c.get("id"), str)]
            if not isinstance(call_id, str):
                problems.append(f"{turn(i)}.tool_call_id must be a string, got {json_kind(call_id)}")
            elif call_id not in ids:
                problems.append(f"{turn(i)}.tool_call_id {_short(call_id)} matches no call of the assistant turn "
                                "before it " + (f"(its call ids: {', '.join(_short(x) for x in ids[:SHOWN_NAMES])})"
                                                if ids else "(its calls carry no 'id')"))
            else:
                answers[i] = calls[ids.index(call_id)]
        elif given > len(calls):
            problems.append(f"{turn(i)} is tool result {given} after an assistant turn that makes {len(calls)} "
                            "call(s); each call gets at most one result")
        else:
            answers[i] = calls[given - 1]
    return answers, problems


def turn_problems(messages: list[dict], tools, turn: Callable[[int], str]) -> list[str]:
    """Every problem of the calls and tool turns of messages whose roles are valid: calls to undeclared tools,
    arguments that are not an object or lack a required parameter, tool turns that answer no call,
    ``tool_call_id``s and tool names that match no call. A tool list with problems of its own (``tools_problems``
    reports them) leaves call names unchecked. ``turn(i)`` names message i as the file does (``messages[3]``,
    ``conversations[3]``)."""
    declared = None if tools is not None and tools_problems(tools) else _declared(tools)
    problems: list[str] = []
    for i, message in enumerate(messages):
        calls = message.get("tool_calls")
        if calls is None:
            continue
        if message.get("role") != "assistant":
            problems.append(f"{turn(i)} has tool_calls but is a {_short(message.get('role'))} turn; only assistant "
                            "turns call tools")
        elif not isinstance(calls, list):
            problems.append(f"{turn(i)}.tool_calls must be a list of calls, got {json_kind(calls)}")
        else:
            for call, label in zip(calls, _call_labels(turn(i), len(calls)), strict=True):
                problems.extend(_call_problems(call, label, declared))
    answers, answer_problems = _answered(messages, turn)
    problems.extend(answer_problems)
    for i, (message, call) in enumerate(zip(messages, answers, strict=True)):
        name = message.get("name")
        if call is not None and name is not None and name != _call_parts(call)[0]:
            problems.append(f"{turn(i)} is named {_short(name)} but answers the call to {_short(_call_parts(call)[0])}")
    return problems


def canonical_turns(messages: list[dict]) -> list[dict]:
    """Messages that passed ``turn_problems`` in canonical form: assistant calls wrapped with dict arguments
    (content "" when the turn only calls), tool turns named after the call they answer, other keys dropped."""
    answers, _ = _answered(messages, lambda i: "")
    out = []
    for message, call in zip(messages, answers, strict=True):
        role = message["role"]
        turn = {"role": role, "content": message.get("content") or ""}
        if role == "assistant" and message.get("tool_calls"):
            turn["tool_calls"] = [_canonical_call(c) for c in message["tool_calls"]]
        if role == "tool":
            turn["name"] = _call_parts(call)[0]
        out.append(turn)
    return out
