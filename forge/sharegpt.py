"""ShareGPT records, as LLaMA-Factory writes them: ``{"conversations": [{"from", "value"}], "system"?, "tools"?}``.

Speakers: human (or user), gpt (or assistant), system, function_call — its value the JSON of ``{"name",
"arguments"}``, or of a list of them for calls made in parallel — and observation (or tool): a tool's result,
answering the calls of the turn before in order, one observation per call. ``tools`` is the tool list as a
JSON string (LLaMA-Factory's way) or as a list; ``system`` a system prompt.

This module reads the speakers and the JSON inside values into the messages form, naming each turn as the
file does (``conversations[3]``); ``forge.records`` checks those messages as it checks the messages format,
and ``forge.tool_calls`` their calls and results.
"""

from __future__ import annotations

from forge.tool_calls import json_kind, loads

CALL = "function_call"
SPEAKERS = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
            CALL: "assistant", "observation": "tool", "tool": "tool"}
SHOWN_SPEAKERS = "human, gpt, system, function_call, observation"
SYSTEM_LABEL = "field 'system'"


def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def tools_of(record: dict) -> tuple[list | None, str | None]:
    """The record's tool list as given (a JSON string parsed; none for an absent, empty or null list) and the
    problem when the string is not JSON."""
    tools = record.get("tools")
    if isinstance(tools, str):
        if not tools.strip():
            return None, None
        tools, why = loads(tools)
        if why:
            return None, (f"field 'tools' {why}; write the tool list as JSON, e.g. "
                          '"[{\\"name\\": \\"get_weather\\", \\"parameters\\": {...}}]"')
    return (None if tools is None or tools == [] else tools), None


def calls_of(value) -> tuple[list | None, str | None]:
    """A function_call turn's calls (a JSON string parsed, or the object or list itself) and the problem
    when the value holds no call."""
    if isinstance(value, str):
        value, why = loads(value)
        if why:
            return None, why
    if isinstance(value, dict):
        return [value], None
    if isinstance(value, list) and value:
        return value, None
    return None, (f"holds {json_kind(value)}" if not isinstance(value, list) else "holds an empty list") + \
        '; a function_call\'s value is {"name", "arguments"} as JSON, or a list of them for parallel calls'


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate spelt as a JSON escape
        return False
    return True


def sharegpt_problems(record: dict) -> list[str]:
    """What the messages checks cannot see: speakers, the JSON in function_call values and in 'tools', and the
    'system' field. The turns' texts are checked once read (``as_messages``)."""
    problems = []
    conversations = record.get("conversations")
    for i, turn in enumerate(conversations if isinstance(conversations, list) else []):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            problems.append(f"{where} must be an object {{\"from\", \"value\"}}, got {json_kind(turn)}")
            continue
        speaker = turn.get("from")
        if not isinstance(speaker, str) or speaker not in SPEAKERS:
            problems.append(f"{where}.from is {_short(speaker)}, expected one of {SHOWN_SPEAKERS}")
        elif speaker == CALL:
            _, why = calls_of(turn.get("value"))
            if why:
                problems.append(f"{where}.value {why}")
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        problems.append(f"{SYSTEM_LABEL} must be a string, got {json_kind(system)}")
    elif isinstance(system, str) and not _encodes(system):
        problems.append(f"{SYSTEM_LABEL} holds an unpaired surrogate; save it as plain UTF-8 text")
    _, why = tools_of(record)
    if why:
        problems.append(why)
    return problems


def as_messages(record: dict) -> tuple[object, list[str], list | None]:
    """The record in the messages form (calls as given, arguments unparsed), each turn's name in the file, and
    its tool list. Turns ``sharegpt_problems`` reports are left out; ``conversations`` that is not a list is
    returned as it is, for the messages checks to report."""
    conversations = record.get("conversations")
    tools, _ = tools_of(record)
    if not isinstance(conversations, list):
        return conversations, [], tools
    messages, labels = [], []
    system = record.get("system")
    if isinstance(system, str) and system.strip() and _encodes(system):
        messages.append({"role": "system", "content": system})
        labels.append(SYSTEM_LABEL)
    for i, turn in enumerate(conversations):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        if not isinstance(speaker, str) or speaker not in SPEAKERS:
            continue
        if speaker == CALL:
            calls, why = calls_of(turn.get("value"))
            if why:
                continue
            messages.append({"role": "assistant", "content": None, "tool_calls": calls})
        else:
            messages.append({"role": SPEAKERS[speaker], "content": turn.get("value")})
        labels.append(f"conversations[{i}]")
    return messages, labels, tools
