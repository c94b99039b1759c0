"""Chat conversations as tokens: the model's own chat template renders them, an assistant mask marks
what is trained, and length statistics say what max_length will cut.

The loss mask is computed from the chat template itself: each assistant turn's span is the text
the template adds for that turn, which includes its end-of-turn token. EOS stays in the loss:
without it the model never learns to stop.
"""

from __future__ import annotations

import hashlib
import statistics
from dataclasses import dataclass

from forge.errors import Codes, ForgeError
from forge.tool_json import render_form


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None = None) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja raises plain exceptions for roles a template refuses
        raise ForgeError(Codes.UNSUPPORTED_TEMPLATE, f"the chat template could not render a conversation: {exc}",
                         "check the roles your records use against the model's chat template "
                         "(some templates refuse 'system' or require alternating user/assistant)") from exc


def render_pair(tokenizer, pair: dict) -> dict:
    """A preference pair as text: the prompt with the generation prompt, and each answer as the template
    writes it after that prompt, ending at its end-of-turn token (no whitespace after it, so a trainer that
    appends EOS finds it there)."""
    prompt = _render(tokenizer, pair["prompt"], add_generation_prompt=True)
    out = {"prompt": prompt}
    for key in ("chosen", "rejected"):
        full = _render(tokenizer, pair["prompt"] + pair[key], add_generation_prompt=False)
        if not full.startswith(prompt):
            raise ForgeError(Codes.UNSUPPORTED_TEMPLATE,
                             "the chat template renders the prompt differently once an answer follows",
                             "use a chat template whose prompt rendering is a prefix of the whole conversation")
        answer = full[len(prompt):]
        eos = tokenizer.eos_token
        out[key] = answer.rstrip() if eos and answer.rstrip().endswith(eos) else answer
    return out


def tokenize_conversation(tokenizer, conversation: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids and an assistant mask (1 = in the loss) for one conversation.

    Each assistant turn spans from the end of the prompt that precedes it (with the generation
    prompt) to the end of the conversation rendered through that turn, so the turn's end-of-turn
    token is inside its span. Its tool calls are part of the turn, so they are trained; the tool list
    (in the prompt) and tool results (their own turns) are not.
    """
    messages, tools = render_form(conversation)
    text = _render(tokenizer, messages, False, tools)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True, tools)
        through = _render(tokenizer, messages[: i + 1], False, tools)
        if not (text.startswith(through) and through.startswith(before)):
            raise ForgeError(
                Codes.UNSUPPORTED_TEMPLATE,
                "the chat template renders earlier turns differently once later turns follow, so the "
                "assistant tokens cannot be located",
                "train on single-turn records, or use a chat template whose output for a prefix of the "
                "conversation is a prefix of the whole",
            )
        spans.append((len(before), len(through)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(a <= start < b for a, b in spans)) for start, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


@dataclass
class TokenizedSet:
    input_ids: list[list[int]]
    assistant_masks: list[list[int]]

    def as_records(self) -> list[dict]:
        pairs = zip(self.input_ids, self.assistant_masks, strict=True)
        return [{"input_ids": i, "assistant_masks": m} for i, m in pairs]


def tokenize_all(tokenizer, conversations: list[list[dict]]) -> TokenizedSet:
    encoded = [tokenize_conversation(tokenizer, c) for c in conversations]
    return TokenizedSet([ids for ids, _ in encoded], [mask for _, mask in encoded])


def _percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def tool_list_tokens(tokenizer, conversations: list[list[dict]]) -> int:
    """The most tokens any record's tool list adds to its prompt (the list repeats in every record that
    declares it), measured as the template renders it. Records with tools need a template Forge wrote for
    tools: it prints tools and calls exactly as Ollama's TEMPLATE does, so what is trained is what Ollama and
    llama.cpp ask. Any other template (none at all, or a model's own) is refused, before a model learns to call
    tools in a format its Modelfile cannot render."""
    from forge.records import Conversation
    from forge.tool_templates import tool_family_of

    with_tools = [c for c in conversations if getattr(c, "tools", None)]
    if not with_tools:
        return 0
    if tool_family_of(tokenizer.chat_template) is None:
        raise ForgeError(Codes.UNSUPPORTED_TEMPLATE,
                         "records declare tools, but the chat template is not one of Forge's tools-capable "
                         "families, so the tools would be trained in a format the Modelfile cannot render",
                         "train with chat_template= qwen2.5, llama3.1 or mistral-tools (it replaces an instruct "
                         "model's own template, with a warning)")
    seen, most = set(), 0
    probe = [{"role": "user", "content": "?"}]
    plain = len(tokenizer(_render(tokenizer, probe, True), add_special_tokens=False)["input_ids"])
    for conversation in with_tools:
        if (key := repr(conversation.tools)) in seen:
            continue
        seen.add(key)
        _, shown = render_form(Conversation(probe, conversation.tools))
        rendered = _render(tokenizer, probe, True, shown)
        most = max(most, len(tokenizer(rendered, add_special_tokens=False)["input_ids"]) - plain)
    return most


def tool_warnings(stats: dict, max_length: int) -> list[str]:
    """A tool list that takes most of max_length leaves little room for the conversation itself."""
    share = stats.get("tool_list_tokens", 0) / max_length
    if share < 0.5:
        return []
    return [f"the tool list takes {stats['tool_list_tokens']} tokens of every record that declares it, "
            f"{share:.0%} of max_length={max_length}: raise max_length or declare fewer or shorter tools"]


def token_stats(tokens: TokenizedSet, max_length: int) -> dict:
    """Length spread, truncation and loss share — refusing when no token would be trained."""
    lengths = [len(i) for i in tokens.input_ids]
    kept = [m[:max_length] for m in tokens.assistant_masks]
    trained = sum(sum(m) for m in kept)
    total = sum(min(n, max_length) for n in lengths)
    if trained == 0:
        raise ForgeError(
            Codes.EMPTY_LOSS_MASK,
            "no token would be trained: every assistant mask is empty after truncation "
            f"at max_length={max_length}",
            "check that records have assistant answers and that max_length leaves room for them",
        )
    return {
        "records": len(lengths),
        "tokens_min": min(lengths),
        "tokens_median": int(statistics.median(lengths)),
        "tokens_p95": _percentile(lengths, 0.95),
        "tokens_max": max(lengths),
        "tokens_total": total,
        "truncated_share": round(sum(n > max_length for n in lengths) / len(lengths), 4),
        "records_without_trained_tokens": sum(1 for m in kept if not any(m)),
        "loss_token_share": round(trained / total, 4),
        "loss_tokens": trained,
    }


def prepare_tokenizer(base_model: str, chat_template: str | None = None) -> tuple[object, dict]:
    """The model's tokenizer with the chat template training will use, and where that template came from.

    A base model has no template: ``chat_template`` names a family or a Jinja file, and the family's
    special tokens that the vocabulary lacks are added (training then learns their embeddings)."""
    from transformers import AutoTokenizer

    from forge import templates
    from forge.model_ref import resolve_base

    tokenizer = AutoTokenizer.from_pretrained(resolve_base(base_model)[0])
    info: dict = {"source": "model", "added_tokens": []}
    if chat_template:
        chosen = templates.choose(chat_template)
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, str) and own and own != chosen.jinja:  # an instruct model's own template, replaced
            info["replaced"] = {"sha256": hashlib.sha256(own.encode("utf-8")).hexdigest()}
            info["warning"] = (f"the model's own chat template (sha256 {info['replaced']['sha256'][:12]}…) is "
                               f"replaced by {chosen.source}: the fine-tune answers in the new format, and the "
                               "GGUF and Modelfile carry the new template")
        tokenizer.chat_template = chosen.jinja
        info["source"] = chosen.source
        if chosen.family is not None:
            vocab = tokenizer.get_vocab()
            missing = [t for t in chosen.family.special_tokens if t not in vocab]
            if missing:
                tokenizer.add_special_tokens({"additional_special_tokens": missing},
                                            replace_extra_special_tokens=False)
            tokenizer.eos_token = chosen.family.eos  # generation stops at the family's end of turn
            if chosen.family.bos and tokenizer.bos_token is None:
                tokenizer.bos_token = chosen.family.bos
            info["added_tokens"] = missing
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        raise ForgeError(Codes.UNSUPPORTED_TEMPLATE, f"{base_model} has no chat template",
                         "pass chat_template= a family (chatml, llama3, gemma, phi3, phi4, mistral, qwen2.5, "
                         "llama3.1, mistral-tools) or a .jinja "
                         "file; its special tokens are added and trained")
    if not tokenizer.is_fast:
        raise ForgeError(Codes.UNSUPPORTED_TEMPLATE, f"{base_model} has only a slow tokenizer",
                         "Forge needs a fast (tokenizer.json) tokenizer to locate assistant tokens")
    info["sha256"] = hashlib.sha256(tokenizer.chat_template.encode("utf-8")).hexdigest()
    return tokenizer, info


def load_tokenizer(base_model: str, chat_template: str | None = None):
    return prepare_tokenizer(base_model, chat_template)[0]
