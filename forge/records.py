"""Record formats: which format a JSONL record is in, what is wrong with it, and the chat messages it
becomes.

Five formats: alpaca (instruction/input/output), messages (a list of {role, content}, with optional tool
calls and a ``tools`` list), prompt/completion, preference (``{"prompt"|"messages", "chosen", "rejected"}``: a
prompt conversation and two answers; SFT on such a file trains on the chosen answers), and sharegpt
(``{"conversations": [{"from", "value"}], "system"?, "tools"?}``, as LLaMA-Factory writes it; read by
``forge.sharegpt``). Every format becomes a ``Conversation``; tool calls and tool turns are checked and put in
canonical form by ``forge.tool_calls``. Reading files, limits and reports stay in ``forge.data``.
"""

from __future__ import annotations

from typing import Literal

from forge.sharegpt import as_messages, sharegpt_problems
from forge.tool_calls import canonical_tools, canonical_turns, tools_problems, turn_problems


class Conversation(list):
    """A record as chat messages in canonical form, with the tools it declares (canonical; None: none)."""

    tools: list[dict] | None = None
    group: str | None = None  # records sharing a group (one fact, one task) go to the same side of the split

    def __init__(self, messages=(), tools: list[dict] | None = None, group: str | None = None):
        super().__init__(messages)
        self.tools = tools
        self.group = group


class Formats:
    AUTO = "auto"
    ALPACA = "alpaca"
    MESSAGES = "messages"
    PROMPT_COMPLETION = "prompt_completion"
    PREFERENCE = "preference"
    SHAREGPT = "sharegpt"


FormatName = Literal["auto", "alpaca", "messages", "prompt_completion", "preference", "sharegpt"]
ROLES = ("system", "user", "assistant")
TOOL_ROLES = (*ROLES, "tool")  # the messages format; a preference prompt keeps to ROLES


# A tie between formats goes to the first in this order, whatever the hash seed.
FORMAT_ORDER = (Formats.PREFERENCE, Formats.MESSAGES, Formats.SHAREGPT, Formats.ALPACA, Formats.PROMPT_COMPLETION)


def detect(record: dict) -> str | None:
    if "chosen" in record or "rejected" in record:
        return Formats.PREFERENCE
    if "messages" in record:
        return Formats.MESSAGES
    if "conversations" in record:
        return Formats.SHAREGPT
    if "instruction" in record or "output" in record:
        return Formats.ALPACA
    if "prompt" in record or "completion" in record:
        return Formats.PROMPT_COMPLETION
    return None


def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _string_problem(value, where: str, required: bool) -> str | None:
    if not isinstance(value, str):
        return f"{where} must be a string, got {type(value).__name__}"
    if required and not value.strip():
        return f"{where} is empty"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # JSON may spell a lone surrogate (\\ud800) that no UTF-8 text holds
        return f"{where} holds an unpaired surrogate ({_short(value[exc.start])}) at character {exc.start}"
    return None


def _text_problem(record: dict, key: str, required: bool = True) -> str | None:
    if key not in record:
        return f"missing field '{key}'" if required else None
    return _string_problem(record[key], f"field '{key}'", required)


FIX = {
    Formats.ALPACA: "each alpaca record needs non-empty 'instruction' and 'output' strings ('input' optional)",
    Formats.PROMPT_COMPLETION: "each record needs non-empty 'prompt' and 'completion' strings",
    Formats.MESSAGES: ("'messages' must be a list of {role, content} with roles system/user/assistant/tool and at "
                       "least one non-empty assistant message or tool call; calls name tools listed in 'tools'"),
    Formats.PREFERENCE: ("each preference record needs a 'prompt' string or a 'messages' list ending with a user "
                         "message, and two different non-empty answers, 'chosen' and 'rejected'"),
    Formats.SHAREGPT: ("'conversations' must be a list of {from, value} with from human/gpt/system/function_call/"
                       "observation and at least one non-empty gpt turn or call; calls name tools listed in 'tools'"),
}


def answer_text(value) -> str | None:
    """A preference answer: a string, or TRL's conversational form (one assistant message, alone or in a list)."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict) and value.get("role") == "assistant":
        value = value.get("content")
    return value


NOTHING_TRAINED = "every assistant turn is empty (no text, no tool call), so nothing would be trained"


def _messages_problems(messages, final_role: str | None = None, roles: tuple[str, ...] = ROLES, key: str = "messages",
                       labels: list[str] | None = None, text: str = "content") -> list[str]:
    """The shape of each turn: an object, a known role, a text (optional in a turn that calls tools, possibly
    empty in a tool result). ``labels`` name each turn as the file does; ``text`` is its text's key there."""
    if not isinstance(messages, list) or not messages:
        return [f"field '{key}' must be a non-empty list"]
    labels = labels or [f"{key}[{i}]" for i in range(len(messages))]
    problems, empty = [], []
    for msg, label in zip(messages, labels, strict=True):
        if not isinstance(msg, dict):
            problems.append(f"{label} must be an object")
            continue
        role = msg.get("role")
        if not isinstance(role, str) or role not in roles:
            problems.append(f"{label}.role is {_short(role)}, expected one of {', '.join(roles)}")
        calls = role == "assistant" and bool(msg.get("tool_calls")) and "tool" in roles
        if calls and msg.get("content") is None:
            continue  # a turn that only calls tools needs no text
        problem = _string_problem(msg.get("content"), f"{label}.{text}", required=not calls and role != "tool")
        if problem and role == "assistant" and problem.endswith(" is empty"):
            empty.append(problem)
        if problem:
            problems.append(problem)
    answers = sum(isinstance(m, dict) and m.get("role") == "assistant" for m in messages)
    if empty and len(empty) == answers and "tool" in roles and len(empty) > 1:  # one problem, not one per turn
        problems = [p for p in problems if p not in empty] + [NOTHING_TRAINED]
    if final_role and isinstance(messages[-1], dict) and messages[-1].get("role") != final_role:
        problems.append(f"the last message is {_short(messages[-1].get('role'))}'s; the prompt must end with a "
                        f"{final_role} message")
    return problems


def _conversation_problems(messages, tools, key: str, labels: list[str] | None = None, text: str = "content",
                           turns_readable: bool = True) -> list[str]:
    """A conversation that may call tools: its turns, its tool list, its calls and tool results, and whether it
    trains anything. Calls, and whether there is an answer, are checked once every turn and the tool list
    could be read."""
    problems = _messages_problems(messages, roles=TOOL_ROLES, key=key, labels=labels, text=text)
    if problems[:1] == [f"field '{key}' must be a non-empty list"]:
        return problems
    labels = labels or [f"{key}[{i}]" for i in range(len(messages))]
    problems.extend(tools_problems(tools) if tools is not None else [])
    if turns_readable and all(isinstance(m, dict) and m.get("role") in TOOL_ROLES for m in messages):
        problems.extend(turn_problems(messages, tools, lambda i: labels[i]))
    if turns_readable and not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        problems.append("no gpt or function_call turn, so nothing would be trained" if key == "conversations"
                        else "no assistant message, so nothing would be trained")
    return problems


def _declared_tools(record: dict):
    """A messages record's tool list as given; an empty list or null declares none."""
    tools = record.get("tools")
    return None if tools is None or tools == [] else tools


def _prompt_key(record: dict) -> str:
    """Where a preference record's prompt is: 'messages', or 'prompt' (text, or TRL's list of messages)."""
    return "messages" if "messages" in record else "prompt"


def _preference_problems(record: dict) -> list[str]:
    if _prompt_key(record) == "messages" or isinstance(record.get("prompt"), list):
        problems = _messages_problems(record[_prompt_key(record)], final_role="user", key=_prompt_key(record))
    else:
        problems = [p for p in [_text_problem(record, "prompt")] if p]
    answers = {}
    for key in ("chosen", "rejected"):
        if key not in record:
            problems.append(f"missing field '{key}'")
            continue
        problem = _string_problem(answer_text(record[key]), f"field '{key}'", required=True)
        if problem:
            problems.append(problem)
        else:
            answers[key] = answer_text(record[key]).strip()
    if len(answers) == 2 and answers["chosen"] == answers["rejected"]:
        problems.append("'chosen' and 'rejected' are the same answer, so there is no preference to learn")
    return problems


def record_problems(record: dict, fmt: str) -> list[str]:
    if fmt == Formats.ALPACA:
        keys = [("instruction", True), ("input", False), ("output", True)]
        return [p for k, req in keys if (p := _text_problem(record, k, req))]
    if fmt == Formats.PROMPT_COMPLETION:
        return [p for k in ("prompt", "completion") if (p := _text_problem(record, k))]
    if fmt == Formats.PREFERENCE:
        return _preference_problems(record)
    if fmt == Formats.SHAREGPT:
        problems = sharegpt_problems(record)
        if not isinstance(record.get("conversations"), list) or not record["conversations"]:
            return ["field 'conversations' must be a non-empty list", *problems]
        messages, labels, tools = as_messages(record)
        if not messages:  # every turn unreadable, each already reported
            return problems
        return problems + _conversation_problems(messages, tools, "conversations", labels, "value",
                                                 turns_readable=not problems)
    return _conversation_problems(record.get("messages"), _declared_tools(record), "messages")


def to_messages(record: dict, fmt: str, system_prompt: str | None) -> Conversation:
    """A valid record (see ``record_problems``) as a Conversation in canonical form."""
    tools = None
    if fmt == Formats.ALPACA:
        user = record["instruction"].strip()
        if record.get("input", "").strip():
            user = f"{user}\n\n{record['input'].strip()}"
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"].strip()}]
    elif fmt == Formats.PROMPT_COMPLETION:
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["completion"]}]
    elif fmt == Formats.PREFERENCE:
        given = record[_prompt_key(record)]
        prompt = ([{"role": m["role"], "content": m["content"]} for m in given] if isinstance(given, list)
                  else [{"role": "user", "content": given}])
        messages = [*prompt, {"role": "assistant", "content": answer_text(record["chosen"])}]
    elif fmt == Formats.SHAREGPT:
        given, _, tools = as_messages(record)
        messages = canonical_turns(given)
    else:
        messages, tools = canonical_turns(record["messages"]), _declared_tools(record)
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    group = record.get("group")
    return Conversation(messages, canonical_tools(tools) if tools else None,
                        str(group) if isinstance(group, str | int) and not isinstance(group, bool) else None)
