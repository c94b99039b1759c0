"""Record formats: which format a JSONL record is in, what is wrong with it, and the chat messages it
becomes.

Four formats: alpaca (instruction/input/output), messages (a list of {role, content}), prompt/completion,
and preference (``{"prompt"|"messages", "chosen", "rejected"}``: a prompt conversation and two answers;
SFT on such a file trains on the chosen answers). A new format is a new set of checks and one conversion
here; reading files, limits and reports stay in ``forge.data``.
"""

from __future__ import annotations

from typing import Literal


class Formats:
    AUTO = "auto"
    ALPACA = "alpaca"
    MESSAGES = "messages"
    PROMPT_COMPLETION = "prompt_completion"
    PREFERENCE = "preference"


FormatName = Literal["auto", "alpaca", "messages", "prompt_completion", "preference"]
ROLES = ("system", "user", "assistant")


# A tie between formats goes to the first in this order, whatever the hash seed.
FORMAT_ORDER = (Formats.PREFERENCE, Formats.MESSAGES, Formats.ALPACA, Formats.PROMPT_COMPLETION)


def detect(record: dict) -> str | None:
    if "chosen" in record or "rejected" in record:
        return Formats.PREFERENCE
    if "messages" in record:
        return Formats.MESSAGES
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
    Formats.MESSAGES: ("'messages' must be a list of {role, content} with roles system/user/assistant "
                       "and at least one non-empty assistant message"),
    Formats.PREFERENCE: ("each preference record needs a 'prompt' string or a 'messages' list ending with a user "
                         "message, and two different non-empty answers, 'chosen' and 'rejected'"),
}


def answer_text(value) -> str | None:
    """A preference answer: a string, or TRL's conversational form (one assistant message, alone or in a list)."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict) and value.get("role") == "assistant":
        value = value.get("content")
    return value


def _messages_problems(messages, final_role: str | None) -> list[str]:
    if not isinstance(messages, list) or not messages:
        return ["field 'messages' must be a non-empty list"]
    problems = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            problems.append(f"messages[{i}] must be an object")
            continue
        role = msg.get("role")
        if not isinstance(role, str) or role not in ROLES:
            problems.append(f"messages[{i}].role is {_short(role)}, expected one of {', '.join(ROLES)}")
        problem = _string_problem(msg.get("content"), f"messages[{i}].content", required=True)
        if problem:
            problems.append(problem)
    if final_role and isinstance(messages[-1], dict) and messages[-1].get("role") != final_role:
        problems.append(f"the last message is {_short(messages[-1].get('role'))}'s; the prompt must end with a "
                        f"{final_role} message")
    return problems


def _prompt_key(record: dict) -> str:
    """Where a preference record's prompt is: 'messages', or 'prompt' (text, or TRL's list of messages)."""
    return "messages" if "messages" in record else "prompt"


def _preference_problems(record: dict) -> list[str]:
    if _prompt_key(record) == "messages" or isinstance(record.get("prompt"), list):
        problems = [p.replace("field 'messages'", f"field '{_prompt_key(record)}'")
                    for p in _messages_problems(record[_prompt_key(record)], final_role="user")]
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
    messages = record.get("messages")
    problems = _messages_problems(messages, final_role=None)
    if problems[:1] == ["field 'messages' must be a non-empty list"]:
        return problems
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        problems.append("no assistant message, so nothing would be trained")
    return problems


def to_messages(record: dict, fmt: str, system_prompt: str | None) -> list[dict]:
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
    else:
        messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages
