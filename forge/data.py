"""Datasets: validate JSONL in four formats, convert to chat messages, split, tokenize, preflight stats.

Preference records (``{"prompt"|"messages", "chosen", "rejected"}``) become a prompt conversation and two
answers; SFT on such a file trains on the chosen answers.

The loss mask is computed from the chat template itself: each assistant turn's span is the text
the template adds for that turn, which includes its end-of-turn token. EOS stays in the loss:
without it the model never learns to stop.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from forge.config import StageConfig
from forge.errors import Codes, ForgeError
from forge.paths import forge_home, fresh_temp, open_input


class Formats:
    AUTO = "auto"
    ALPACA = "alpaca"
    MESSAGES = "messages"
    PROMPT_COMPLETION = "prompt_completion"
    PREFERENCE = "preference"


FormatName = Literal["auto", "alpaca", "messages", "prompt_completion", "preference"]
ROLES = ("system", "user", "assistant")


class DataConfig(StageConfig):
    path: Path = Field(description="JSONL dataset, one record per line.")
    format: FormatName = Field("auto", description="Record format; 'auto' detects it from the keys.")
    system_prompt: str | None = Field(None, description="System message prepended to records without one.")
    base_model: str | None = Field(None, description="Model dir or hub id whose tokenizer computes the stats.")
    chat_template: str | None = Field(None, description=(
        "For a base model without one: a family (chatml, llama3, gemma, phi3, phi4, mistral) or a Jinja file."))
    max_length: int = Field(1024, gt=0, description="Tokens per record (TRL's max_length); longer ones are truncated.")
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share of records held out for eval loss.")
    seed: int = Field(42, description="Seed of the deterministic train/eval split.")


@dataclass
class Dataset:
    """A validated dataset as chat conversations (for preference data: prompt + chosen answer)."""

    path: Path
    format: str
    conversations: list[list[dict]]
    sha256: str
    rejected: list[str] | None = None  # preference data: the rejected answer of each conversation

    def preference_pairs(self) -> list[dict]:
        """Preference records as TRL takes them: prompt messages, then the chosen and rejected answers."""
        if self.rejected is None:
            raise ForgeError(Codes.DATASET_INVALID, f"{self.path} holds {self.format} records, not preference pairs",
                             'method=dpo/orpo needs {"prompt" or "messages", "chosen", "rejected"} records')
        return [{"prompt": c[:-1], "chosen": [c[-1]], "rejected": [{"role": "assistant", "content": r}]}
                for c, r in zip(self.conversations, self.rejected, strict=True)]


def _detect(record: dict) -> str | None:
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


_FIX = {
    Formats.ALPACA: "each alpaca record needs non-empty 'instruction' and 'output' strings ('input' optional)",
    Formats.PROMPT_COMPLETION: "each record needs non-empty 'prompt' and 'completion' strings",
    Formats.MESSAGES: ("'messages' must be a list of {role, content} with roles system/user/assistant "
                       "and at least one non-empty assistant message"),
    Formats.PREFERENCE: ("each preference record needs a 'prompt' string or a 'messages' list ending with a user "
                         "message, and two different non-empty answers, 'chosen' and 'rejected'"),
}


def _answer(value) -> str | None:
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
        problem = _string_problem(_answer(record[key]), f"field '{key}'", required=True)
        if problem:
            problems.append(problem)
        else:
            answers[key] = _answer(record[key]).strip()
    if len(answers) == 2 and answers["chosen"] == answers["rejected"]:
        problems.append("'chosen' and 'rejected' are the same answer, so there is no preference to learn")
    return problems


def _record_problems(record: dict, fmt: str) -> list[str]:
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


def _to_messages(record: dict, fmt: str, system_prompt: str | None) -> list[dict]:
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
        messages = [*prompt, {"role": "assistant", "content": _answer(record["chosen"])}]
    else:
        messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


# Limits per line: a chat record never needs more, and past them a line costs memory and time for nothing.
MAX_LINE_BYTES = 16 * 1024 * 1024
MAX_DEPTH = 64
MAX_REPORTED = 1000  # problems listed one by one; past that, a count
SHOWN_CHARS = 300  # how much of a record a report or an error echoes
BOM = b"\xef\xbb\xbf"
# A tie between formats goes to the first in this order, whatever the hash seed.
FORMAT_ORDER = (Formats.PREFERENCE, Formats.MESSAGES, Formats.ALPACA, Formats.PROMPT_COMPLETION)


def _depth(value, limit: int) -> int:
    """Nesting depth of a parsed JSON value, counted without recursion (stops past ``limit``)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _parse_line(raw: bytes, lineno: int) -> tuple[dict | None, str | None]:
    """One JSONL line → (record, None) or (None, the problem with its line number and fix)."""
    if len(raw) > MAX_LINE_BYTES:
        return None, (f"line {lineno}: {len(raw):,} bytes, over the {MAX_LINE_BYTES:,}-byte limit per record; "
                      "split or shorten the record")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, (f"line {lineno}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1}); "
                      "save the file as UTF-8")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, (f"line {lineno}: not valid JSON ({exc.msg} at column {exc.colno}); "
                      "each line must be one JSON object")
    except RecursionError:
        return None, f"line {lineno}: JSON nested deeper than {MAX_DEPTH} levels; a record is a flat object"
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        return None, f"line {lineno}: a value cannot be read ({str(exc)[:120]}); use ordinary numbers and strings"
    if not isinstance(record, dict):
        return None, f"line {lineno}: expected a JSON object, got {type(record).__name__}"
    if _depth(record, MAX_DEPTH) > MAX_DEPTH:
        return None, f"line {lineno}: JSON nested deeper than {MAX_DEPTH} levels; a record is a flat object"
    return record, None


def _read_records(fh, problems: list[str]) -> tuple[list[tuple[int, dict]], str]:
    """Every line of an open binary file parsed, and the sha256 of exactly the bytes read."""
    digest = hashlib.sha256()
    parsed = []
    for lineno, raw in enumerate(fh, start=1):
        digest.update(raw)
        if lineno == 1 and raw.startswith(BOM):
            raw = raw[len(BOM):]  # a UTF-8 byte-order mark, as some editors write
        if not raw.strip():
            continue
        record, problem = _parse_line(raw.rstrip(b"\r\n"), lineno)
        if problem:
            problems.append(problem)
        else:
            parsed.append((lineno, record))
    return parsed, digest.hexdigest()


def _detect_format(parsed: list[tuple[int, dict]], path: Path, problems: list[str]) -> str:
    counts = Counter(f for _, r in parsed if (f := _detect(r)))
    if not counts and not problems:
        raise ForgeError(Codes.DATASET_INVALID, f"{path}: no records found" if not parsed else
                         f"{path}: cannot tell the format from the keys of line {parsed[0][0]}",
                         "use alpaca (instruction/input/output), messages, prompt/completion, or preference "
                         "(prompt/chosen/rejected) records")
    if not counts:
        return Formats.ALPACA
    return max(FORMAT_ORDER, key=lambda f: (counts[f], -FORMAT_ORDER.index(f)))


def _line_number(problem: str) -> int:
    match = re.match(r"line (\d+):", problem)
    return int(match.group(1)) if match else 0


def _dataset_error(path: Path, fmt: str, problems: list[str]) -> ForgeError:
    problems = sorted(problems, key=_line_number)  # in file order, whichever check found them
    shown = problems[:MAX_REPORTED]
    if len(problems) > MAX_REPORTED:
        shown.append(f"… and {len(problems) - MAX_REPORTED} more problem(s) past the first {MAX_REPORTED}")
    return ForgeError(
        Codes.DATASET_INVALID,
        f"{path}: {len(problems)} problem(s) in {fmt} dataset: " + "; ".join(problems[:5])
        + (f"; … and {len(problems) - 5} more" if len(problems) > 5 else ""),
        "fix the lines listed (details has each one) and validate again", details=shown)


def load_dataset(path: Path | str, fmt: str = Formats.AUTO, system_prompt: str | None = None) -> Dataset:
    """Read and validate every line; raise one error listing every bad line, or return conversations.

    The file is opened once (checked against the roots when confined) and its sha256 is that of the
    bytes parsed, so the hash a seal records is the hash of what was trained on."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ForgeError(Codes.DATASET_NOT_FOUND, f"dataset {path} does not exist",
                         "pass the path of a JSONL file (one JSON object per line)")
    problems: list[str] = []
    with open_input(path, "dataset") as fh:
        parsed, sha256 = _read_records(fh, problems)
    if fmt == Formats.AUTO:
        fmt = _detect_format(parsed, path, problems)
    conversations, rejected = [], []
    for lineno, record in parsed:
        detected = _detect(record)
        if detected is not None and detected != fmt:
            problems.append(f"line {lineno}: looks like a '{detected}' record but the file is '{fmt}'; "
                            "use one format per file")
            continue
        record_problems = _record_problems(record, fmt)
        if record_problems:
            problems.extend(f"line {lineno}: {p}; {_FIX[fmt]}" for p in record_problems)
            continue
        conversations.append(_to_messages(record, fmt, system_prompt))
        if fmt == Formats.PREFERENCE:
            rejected.append(_answer(record["rejected"]))
    if problems:
        raise _dataset_error(path, fmt, problems)
    if not conversations:
        raise ForgeError(Codes.DATASET_INVALID, f"{path}: the file holds no records",
                         "add one JSON object per line")
    return Dataset(path=path, format=fmt, conversations=conversations, sha256=sha256,
                   rejected=rejected if fmt == Formats.PREFERENCE else None)


def snapshot(path: Path | str) -> tuple[Path, str]:
    """Copy a dataset, read once through a checked descriptor, to ``$FORGE_HOME/datasets/<sha256>.jsonl``.

    A job started from an untrusted path trains on this copy, so the bytes checked at submit are the
    bytes trained on, whatever happens to the original afterwards. Copies are shared by content."""
    target_dir = forge_home() / "datasets"
    target_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    src = open_input(path, "dataset")  # first: a path that cannot be read leaves nothing behind
    dst, tmp = fresh_temp(target_dir, ".snapshot-")
    try:
        with src, dst:
            while block := src.read(1 << 20):
                digest.update(block)
                dst.write(block)
        final = target_dir / f"{digest.hexdigest()}.jsonl"
        tmp.replace(final)
    finally:
        tmp.unlink(missing_ok=True)
    return final, digest.hexdigest()


SHOWN_MESSAGES = 4


def shown_record(messages: list[dict]) -> list[dict]:
    """A record as a report echoes it: its first few messages, each text cut to a few hundred characters."""
    shown = [{k: (v if len(v) <= SHOWN_CHARS else v[:SHOWN_CHARS] + f"… ({len(v)} characters)")
              for k, v in m.items()} for m in messages[:SHOWN_MESSAGES]]
    if len(messages) > SHOWN_MESSAGES:
        shown.append({"role": "note", "content": f"… and {len(messages) - SHOWN_MESSAGES} more messages"})
    return shown


def split(conversations: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic split: the same seed and records give the same eval set on every machine."""
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    n_eval = int(round(len(order) * eval_fraction))
    if eval_fraction > 0 and len(order) >= 2:
        n_eval = min(max(n_eval, 1), len(order) - 1)
    eval_idx = set(order[:n_eval])
    train = [c for i, c in enumerate(conversations) if i not in eval_idx]
    evals = [c for i, c in enumerate(conversations) if i in eval_idx]
    return train, evals


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
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


def tokenize_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids and an assistant mask (1 = in the loss) for one conversation.

    Each assistant turn spans from the end of the prompt that precedes it (with the generation
    prompt) to the end of the conversation rendered through that turn, so the turn's end-of-turn
    token is inside its span.
    """
    text = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
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
                         "pass chat_template= a family (chatml, llama3, gemma, phi3, phi4, mistral) or a .jinja "
                         "file; its special tokens are added and trained")
    if not tokenizer.is_fast:
        raise ForgeError(Codes.UNSUPPORTED_TEMPLATE, f"{base_model} has only a slow tokenizer",
                         "Forge needs a fast (tokenizer.json) tokenizer to locate assistant tokens")
    info["sha256"] = hashlib.sha256(tokenizer.chat_template.encode("utf-8")).hexdigest()
    return tokenizer, info


def load_tokenizer(base_model: str, chat_template: str | None = None):
    return prepare_tokenizer(base_model, chat_template)[0]


def validate(config: DataConfig) -> dict:
    """The dataset report: format, counts, split sizes, and token stats when a model is named."""
    ds = load_dataset(config.path, config.format, config.system_prompt)
    train, evals = split(ds.conversations, config.eval_fraction, config.seed)
    report = {
        "path": str(ds.path), "format": ds.format, "sha256": ds.sha256, "records": len(ds.conversations),
        "train_records": len(train), "eval_records": len(evals), "warnings": [],
        "example": shown_record(ds.conversations[0]),
    }
    if config.base_model:
        tokenizer = load_tokenizer(config.base_model, config.chat_template)
        stats = token_stats(tokenize_all(tokenizer, ds.conversations), config.max_length)
        stats["max_length"] = config.max_length
        report["tokens"] = stats
        if stats["truncated_share"] > 0:
            report["warnings"].append(f"{stats['truncated_share']:.0%} of records exceed max_length="
                                      f"{config.max_length} and will be truncated")
        if stats["records_without_trained_tokens"]:
            report["warnings"].append(f"{stats['records_without_trained_tokens']} record(s) keep no assistant "
                                      "token after truncation and will be dropped")
    return report
