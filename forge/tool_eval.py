"""Tool-call accuracy: for records that declare tools, each assistant turn is asked of a model (the conversation
before it, with the tool list) and its reply parsed with the syntax of the template's family. A turn that calls
tools is right when the calls match the data's — the same names, the same arguments as JSON values, in any
order; a turn that calls none is right when the model calls none. The share of call blocks that parse says
whether a quantization broke the model's JSON before the names or arguments went wrong.
"""

from __future__ import annotations

import json
from pathlib import Path

from forge.records import Conversation


def tool_cases(conversations: list, limit: int, chat_template: str | None) -> tuple[list[dict], list[str]]:
    """Up to ``limit`` turns to ask: the conversation before each assistant turn of a record with tools; none,
    with a warning, when the model's template has no tools syntax Forge can parse."""
    from forge.tool_templates import tool_family_of

    if not any(getattr(c, "tools", None) for c in conversations) or limit == 0:
        return [], []
    if tool_family_of(chat_template) is None:
        return [], ["the records declare tools but the model's chat template is not a Forge tools family: "
                    "tool-call accuracy is not measured"]
    cases = []
    for conversation in conversations:
        tools = getattr(conversation, "tools", None)
        if not tools:
            continue
        for i, message in enumerate(conversation):
            if message["role"] != "assistant":
                continue
            prompt = Conversation(conversation[:i], tools)
            expected = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                        for c in message.get("tool_calls") or []]
            cases.append({"messages": prompt, "expected": expected})
            if len(cases) >= limit:
                return cases, []
    return cases, []


def _plain(value):
    """A JSON value compared as JSON: 250 and 250.0 are the same number."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _key(call: dict) -> str:
    return json.dumps(_plain([call.get("name"), call.get("arguments")]), sort_keys=True)


def right(expected: list[dict], answer: dict) -> bool:
    """The data's calls exactly (none where it has none), and no call block left unparsed."""
    return not answer["unparsed_calls"] and sorted(map(_key, expected)) == sorted(map(_key, answer["tool_calls"]))


def score(cases: list[dict], answers: list[dict]) -> dict:
    """Accuracy over the turns asked, split into turns that call tools and turns that answer in words."""
    calling = [(c, a) for c, a in zip(cases, answers, strict=True) if c["expected"]]
    plain = [(c, a) for c, a in zip(cases, answers, strict=True) if not c["expected"]]
    parsed = sum(len(a["tool_calls"]) for a in answers)
    unparsed = sum(a["unparsed_calls"] for a in answers)
    out = {"turns": len(cases), "right": sum(right(c["expected"], a) for c, a in zip(cases, answers, strict=True))}
    out["accuracy"] = round(out["right"] / len(cases), 4) if cases else None
    out["calls_right"] = f"{sum(right(c['expected'], a) for c, a in calling)}/{len(calling)}"
    out["no_call_right"] = f"{sum(right([], a) for _, a in plain)}/{len(plain)}"
    out["parsed_share"] = round(parsed / (parsed + unparsed), 4) if parsed + unparsed else None
    return out


def hf_answers(model, tokenizer, cases: list[dict], max_new: int, stops: list[int]) -> list[dict]:
    """Greedy replies of a transformers model, through the tokenizer's template with the tools, parsed."""
    import torch

    from forge.query import parsed_reply
    from forge.tool_json import render_form
    from forge.tool_templates import tool_family_of

    family = tool_family_of(tokenizer.chat_template)
    device = next(model.parameters()).device
    out = []
    for case in cases:
        messages, tools = render_form(case["messages"])  # rendered and tokenized exactly as in training
        text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
        with torch.no_grad():
            generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                       do_sample=False, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
        new = [t for t in generated[0, ids.shape[1]:].tolist() if t not in stops]
        out.append(parsed_reply(family, tokenizer.decode(new, skip_special_tokens=False)))
    return out


def gguf_answers(path: Path, cases: list[dict], max_new: int) -> list[dict]:
    """Greedy replies of a GGUF through llama.cpp, rendered and parsed as forge query does it."""
    from forge.quantize import load_llama
    from forge.query import query_with_tools

    llm = load_llama(path, n_ctx=4096)
    return [query_with_tools(llm, path, list(c["messages"]), c["messages"].tools, max_new, 0.0) for c in cases]
