"""Datasets: read and validate a JSONL file (every bad line at once, with its number), keep a copy of
exactly the bytes checked, split it deterministically, and report what training will see.

What each record format means lives in ``forge.records``; tokenizing in ``forge.tokens``.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from forge.config import StageConfig
from forge.errors import Codes, ForgeError
from forge.paths import forge_home, fresh_temp, open_input
from forge.records import (
    FIX,
    FORMAT_ORDER,
    Conversation,
    FormatName,
    Formats,
    answer_text,
    detect,
    record_problems,
    to_messages,
)
from forge.tokens import prepare_tokenizer, token_stats, tokenize_all, tool_list_tokens, tool_warnings


class DataConfig(StageConfig):
    path: Path = Field(description="JSONL dataset, one record per line.")
    format: FormatName = Field("auto", description="Record format; 'auto' detects it from the keys.")
    system_prompt: str | None = Field(None, description="System message prepended to records without one.")
    base_model: str | None = Field(None, description="Model dir or hub id whose tokenizer computes the stats.")
    chat_template: str | None = Field(None, description=(
        "A family (chatml, llama3, gemma, phi3, phi4, mistral; with tools: qwen2.5, llama3.1, mistral-tools) or a "
        "Jinja file."))
    max_length: int = Field(1024, gt=0, description="Tokens per record (TRL's max_length); longer ones are truncated.")
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share of records held out for eval loss.")
    seed: int = Field(42, description="Seed of the deterministic train/eval split.")


@dataclass
class Dataset:
    """A validated dataset as chat conversations (for preference data: prompt + chosen answer); each carries the
    tools its record declares (``Conversation.tools``)."""

    path: Path
    format: str
    conversations: list[Conversation]
    sha256: str
    rejected: list[str] | None = None  # preference data: the rejected answer of each conversation

    def preference_pairs(self) -> list[dict]:
        """Preference records as TRL takes them: prompt messages, then the chosen and rejected answers."""
        if self.rejected is None:
            raise ForgeError(Codes.DATASET_INVALID, f"{self.path} holds {self.format} records, not preference pairs",
                             'method=dpo/orpo needs {"prompt" or "messages", "chosen", "rejected"} records')
        return [{"prompt": c[:-1], "chosen": [c[-1]], "rejected": [{"role": "assistant", "content": r}]}
                for c, r in zip(self.conversations, self.rejected, strict=True)]


# Limits per line: a chat record never needs more, and past them a line costs memory and time for nothing.
MAX_LINE_BYTES = 16 * 1024 * 1024
MAX_DEPTH = 64
MAX_REPORTED = 1000  # problems listed one by one; past that, a count
SHOWN_CHARS = 300  # how much of a record a report or an error echoes
BOM = b"\xef\xbb\xbf"


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
    counts = Counter(f for _, r in parsed if (f := detect(r)))
    if not counts and not problems:
        raise ForgeError(Codes.DATASET_INVALID, f"{path}: no records found" if not parsed else
                         f"{path}: cannot tell the format from the keys of line {parsed[0][0]}",
                         "use alpaca (instruction/input/output), messages, prompt/completion, preference "
                         "(prompt/chosen/rejected) or sharegpt (conversations) records")
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
        detected = detect(record)
        if detected is not None and detected != fmt:
            problems.append(f"line {lineno}: looks like a '{detected}' record but the file is '{fmt}'; "
                            "use one format per file")
            continue
        found = record_problems(record, fmt)
        if found:
            problems.extend(f"line {lineno}: {p}; {FIX[fmt]}" for p in found)
            continue
        conversations.append(to_messages(record, fmt, system_prompt))
        if fmt == Formats.PREFERENCE:
            rejected.append(answer_text(record["rejected"]))
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
SHOWN_NAMES = 20  # tool names a report lists


def _cut(value):
    """A value with each text in it cut to a few hundred characters (a tool call's arguments included)."""
    if isinstance(value, str):
        return value if len(value) <= SHOWN_CHARS else value[:SHOWN_CHARS] + f"… ({len(value)} characters)"
    if isinstance(value, dict):
        return {k: _cut(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_cut(v) for v in value]
    return value


def shown_record(messages: list[dict]) -> list[dict]:
    """A record as a report echoes it: its first few messages, each text cut to a few hundred characters."""
    shown = [_cut(m) for m in messages[:SHOWN_MESSAGES]]
    if len(messages) > SHOWN_MESSAGES:
        shown.append({"role": "note", "content": f"… and {len(messages) - SHOWN_MESSAGES} more messages"})
    return shown


def tool_summary(conversations: list[Conversation]) -> dict:
    """How much tool calling the records hold: records that declare tools, calls made, results given, and the
    tools declared (the first few names)."""
    declared = sorted({t["function"]["name"] for c in conversations for t in c.tools or []})
    turns = [m for c in conversations for m in c]
    return {"records": sum(bool(c.tools) for c in conversations),
            "calls": sum(len(m.get("tool_calls", [])) for m in turns),
            "results": sum(m["role"] == "tool" for m in turns),
            "declared": declared[:SHOWN_NAMES] + ([f"… and {len(declared) - SHOWN_NAMES} more"]
                                                   if len(declared) > SHOWN_NAMES else [])}


def split(conversations: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic split: the same seed and records give the same eval set on every machine. Records that
    carry a ``group`` (one fact in several phrasings, one task) are split by whole groups, so the eval set
    holds only groups training never saw."""
    groups = [getattr(c, "group", None) for c in conversations]
    if any(g is not None for g in groups):
        return _split_groups(conversations, groups, eval_fraction, seed)
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    n_eval = int(round(len(order) * eval_fraction))
    if eval_fraction > 0 and len(order) >= 2:
        n_eval = min(max(n_eval, 1), len(order) - 1)
    eval_idx = set(order[:n_eval])
    train = [c for i, c in enumerate(conversations) if i not in eval_idx]
    evals = [c for i, c in enumerate(conversations) if i in eval_idx]
    return train, evals


def _split_groups(conversations: list, groups: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """Whole groups to the eval set (a record without a group is a group of its own), in a seeded order, each
    taken only while the eval set stays within about ``eval_fraction`` of the records: at least one group (the
    smallest when none fits), never all."""
    from collections import Counter

    keys = [g if g is not None else ("\0", i) for i, g in enumerate(groups)]
    sizes = Counter(keys)
    names = sorted(sizes, key=str)
    random.Random(seed).shuffle(names)
    target, chosen, taken = len(keys) * eval_fraction, set(), 0
    for name in names if eval_fraction > 0 and len(names) > 1 else []:
        if taken + sizes[name] <= max(target, 1) and len(chosen) < len(names) - 1:
            chosen.add(name)
            taken += sizes[name]
    if not chosen and eval_fraction > 0 and len(names) > 1:
        chosen.add(min(names, key=lambda n: (sizes[n], str(n))))
    train = [c for c, k in zip(conversations, keys, strict=True) if k not in chosen]
    evals = [c for c, k in zip(conversations, keys, strict=True) if k in chosen]
    return train, evals


VALIDATE_STEPS = 3  # reading, the tokenizer, tokenizing; then done


def validate(config: DataConfig, on_step: Callable[[int, str], None] | None = None) -> dict:
    """The dataset report: format, counts, split sizes, and token stats when a model is named. ``on_step(i,
    what)`` hears where it is (0 to VALIDATE_STEPS), for a caller that reports progress."""
    step = on_step or (lambda i, what: None)
    step(0, "reading the records")
    ds = load_dataset(config.path, config.format, config.system_prompt)
    train, evals = split(ds.conversations, config.eval_fraction, config.seed)
    report = {
        "path": str(ds.path), "format": ds.format, "sha256": ds.sha256, "records": len(ds.conversations),
        "train_records": len(train), "eval_records": len(evals), "warnings": [],
        "example": shown_record(ds.conversations[0]),
    }
    if any(c.tools for c in ds.conversations):
        report["tools"] = tool_summary(ds.conversations)
    if config.base_model:
        gguf = str(config.base_model).lower().endswith(".gguf")
        step(1, "loading the tokenizer" + (" (converting the GGUF's: tens of seconds)" if gguf else ""))
        tokenizer, template = prepare_tokenizer(config.base_model, config.chat_template)
        step(2, f"tokenizing {len(ds.conversations)} records")
        tool_tokens = tool_list_tokens(tokenizer, ds.conversations)
        stats = token_stats(tokenize_all(tokenizer, ds.conversations), config.max_length)
        stats["max_length"] = config.max_length
        report["tokens"] = stats
        if template.get("warning"):
            report["warnings"].append(template["warning"])
        if tool_tokens:
            stats["tool_list_tokens"] = tool_tokens
            report["warnings"].extend(tool_warnings(stats, config.max_length))
        if stats["truncated_share"] > 0:
            report["warnings"].append(f"{stats['truncated_share']:.0%} of records exceed max_length="
                                      f"{config.max_length} and will be truncated")
        if stats["records_without_trained_tokens"]:
            report["warnings"].append(f"{stats['records_without_trained_tokens']} record(s) keep no assistant "
                                      "token after truncation and will be dropped")
    step(VALIDATE_STEPS, "done")
    return report
