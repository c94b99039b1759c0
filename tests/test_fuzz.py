"""Property-based fuzzing of the two doors untrusted input comes through: dataset files (forge.data)
and MCP tool calls (the in-process server). Seeds are fixed (derandomize), so a run is reproducible.

The default run generates at least 500 datasets and 800 tool calls; FORGE_FUZZ_SCALE multiplies
every count (``make fuzz`` runs it with FORGE_FUZZ_SCALE=10).

Each dataset is generated together with what the loader must say about it: which lines are bad
(their numbers must all appear in the error's details), which format auto-detection picks (the most
common format among the parsed records, a tie broken by the fixed order messages > alpaca >
prompt_completion), and how many records a clean file holds.

Each tool call goes through one in-process client per test (jobs it manages to submit stay queued:
FORGE_MAX_CONCURRENT_JOBS=0) and must end in a success matching the tool's output schema or in one
JSON error object; unexpected exceptions (internal_error) and files left for the garbage collector
to close are collected over the whole run and reported together, with the shortest call that hit each.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import jsonschema
import pytest
from anyio.from_thread import start_blocking_portal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcp import Client

from forge.data import BOM, MAX_DEPTH, MAX_LINE_BYTES, MAX_REPORTED, DataConfig, load_dataset, validate
from forge.errors import ForgeError
from helpers import stop_runner
from mcp_servers.forge.schemas import JobHandle
from mcp_servers.forge.server import create_server
from mcp_servers.forge.tools_jobs import HANDLE_TOOLS

SCALE = float(os.environ.get("FORGE_FUZZ_SCALE") or 1)
assert SCALE > 0, "FORGE_FUZZ_SCALE must be a positive number"
N_DATASETS = max(1, round(500 * SCALE))
N_HUGE_RECORDS = max(1, round(40 * SCALE))
N_CALLS = max(1, round(800 * SCALE))
CALL_LIMIT_S = 60.0
ECHO_LIMIT = 2048  # characters of JSON a report's "example" may hold: "~1 KB" of text plus its framing


def fuzz_settings(max_examples: int) -> settings:
    return settings(max_examples=max_examples, derandomize=True, database=None, deadline=None,
                    print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large, HealthCheck.large_base_example])


# ---------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------

FORMATS = ("messages", "alpaca", "prompt_completion")  # the tie-break order
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Line:
    """One generated line (without its ending) and what the loader must make of it.

    parsed: the line decodes, parses, is an object and is within the depth limit;
    detect: the format its keys name, when parsed (None: no format key);
    bad: the record is wrong whatever the file's format (a parsed line whose format differs
    from the file's is bad as well, which the expectation adds once the format is known);
    unbom: for a line starting with a BOM, the line the loader sees when it is the file's first."""

    raw: bytes
    kind: str
    bad: bool = False
    parsed: bool = True
    detect: str | None = None
    unbom: Line | None = None

    def __repr__(self) -> str:
        raw = self.raw if len(self.raw) <= 120 else self.raw[:120] + b"...(%d bytes)" % len(self.raw)
        return f"Line({self.kind}, {raw!r})"


BLANK = "blank"


def keys_format(record) -> str | None:
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "messages"
    if "instruction" in record or "output" in record:
        return "alpaca"
    if "prompt" in record or "completion" in record:
        return "prompt_completion"
    return None


# Text: any characters but lone surrogates (hypothesis' default alphabet), and "non-blank" text that
# str.strip() cannot empty.
core_char = st.characters(exclude_categories=("Cs", "Cc", "Zs", "Zl", "Zp"))
any_text = st.text(max_size=12)
nonblank = st.builds(lambda a, c, b: a + c + b, st.text(max_size=8), core_char, st.text(max_size=8))
blank_text = st.sampled_from(["", " ", "   ", "\t", "\n", "\r\n", "\u3000", "\u00a0", " \u2028 ", "\x1f"])
small_json = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | any_text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(any_text, children, max_size=3),
    max_leaves=5)
extras = {"id": small_json, "meta": small_json, "source": any_text}
message = st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": nonblank}, optional={"name": any_text})
assistant = st.fixed_dictionaries({"role": st.just("assistant"), "content": nonblank})


@st.composite
def messages_list(draw) -> list[dict]:
    msgs = draw(st.lists(message, max_size=3))
    msgs.insert(draw(st.integers(0, len(msgs))), draw(assistant))
    return msgs


VALID_RECORDS = {
    "alpaca": st.fixed_dictionaries({"instruction": nonblank, "output": nonblank}, optional={"input": any_text,
                                                                                             **extras}),
    "messages": st.fixed_dictionaries({"messages": messages_list()}, optional=extras),
    "prompt_completion": st.fixed_dictionaries({"prompt": nonblank, "completion": nonblank}, optional=extras),
}
# Fields the loader checks, by format: required ones, and ones checked only when present.
REQUIRED = {"alpaca": ("instruction", "output"), "prompt_completion": ("prompt", "completion")}
CHECKED = {"alpaca": ("instruction", "input", "output"), "prompt_completion": ("prompt", "completion")}
WRONG_TYPED = [None, 0, 7, 1.5, True, False, [], ["x"], {}, {"text": "x"}, float("nan"), float("inf"), -float("inf")]
WRONG_ROLES = ["robot", "User", "ASSISTANT", "tool", "function", "", " user", "user ", None, 3, ["user"],
               {"role": "user"}]
LONE_SURROGATES = ["\ud800", "\udbff", "\udc00", "\udfff", "\ude00\ud83d"]
INVALID_UTF8 = [b"\xff", b"\xfe", b"\xc0\xaf", b"\xed\xa0\x80", b"\x80", b"\xc3", b"\xf4\x90\x80\x80", b"\xe2\x82"]
NOT_OBJECTS = ["[]", "[1, 2]", '"text"', "42", "-0", "true", "false", "null", "3.5", "NaN", "-Infinity",
               '[{"instruction": "x", "output": "y"}]', '"{\\"instruction\\": \\"x\\"}"']
NOT_JSON = ["{", "}", "{not json", "{'instruction': 'x', 'output': 'y'}", '{"instruction": "x", "output": "y",}',
            '{"a": 1}{"b": 2}', '{"a": 1} x', "\\", "]", "{\"instruction\": \"x\\q\"}", "{\"a\": 01}",
            "{\"a\": \"tab\there\"}", "\x00", "undefined", "{\"a\" 1}", "//", "#"]


@st.composite
def dumped(draw, record, *, ascii_only: bool = False) -> bytes:
    """A record as one line: any valid spelling of the JSON (escapes, separators, outer spaces)."""
    ensure_ascii = True if ascii_only else draw(st.booleans())
    separators = draw(st.sampled_from([(", ", ": "), (",", ":"), (" ,  ", " :\t")]))
    text = json.dumps(record, ensure_ascii=ensure_ascii, separators=separators)
    pad = st.sampled_from(["", "", " ", "\t", "  "])
    return (draw(pad) + text + draw(pad)).encode("utf-8")


@st.composite
def valid_line(draw, fmt: str) -> Line:
    return Line(draw(dumped(draw(VALID_RECORDS[fmt]))), f"valid-{fmt}", detect=fmt)


@st.composite
def spoiled_record(draw) -> tuple[dict, str, str]:
    """A valid record of some format with one checked string picked out: (record, format, path to it)."""
    fmt = draw(st.sampled_from(FORMATS))
    record = draw(VALID_RECORDS[fmt])
    if fmt == "messages":
        return record, fmt, f"messages.{draw(st.integers(0, len(record['messages']) - 1))}"
    if fmt == "alpaca":
        record.setdefault("input", "")
    return record, fmt, draw(st.sampled_from(CHECKED[fmt]))


def _set(record: dict, where: str, value) -> None:
    if where.startswith("messages."):
        record["messages"][int(where.split(".")[1])]["content"] = value
    else:
        record[where] = value


@st.composite
def surrogate_line(draw) -> Line:
    """A lone surrogate, written as a JSON escape (no UTF-8 text can hold one), in a checked string."""
    record, fmt, where = draw(spoiled_record())
    text = draw(any_text)
    at = draw(st.integers(0, len(text)))
    _set(record, where, text[:at] + draw(st.sampled_from(LONE_SURROGATES)) + text[at:])
    if draw(st.booleans()) and fmt == "messages":  # or the role itself
        record["messages"][0]["role"] = "user\ud800"
    return Line(draw(dumped(record, ascii_only=True)), "surrogate", bad=True, detect=fmt)


@st.composite
def empty_field_line(draw) -> Line:
    record, fmt, where = draw(spoiled_record())
    if where == "input":  # optional: blank is fine, so blank a required one
        where = draw(st.sampled_from(REQUIRED["alpaca"]))
    if fmt == "messages" and draw(st.integers(0, 3)) == 0:
        record["messages"] = []
    else:
        _set(record, where, draw(blank_text))
    return Line(draw(dumped(record)), "empty-field", bad=True, detect=fmt)


@st.composite
def wrong_type_line(draw) -> Line:
    record, fmt, where = draw(spoiled_record())
    value = draw(st.sampled_from(WRONG_TYPED))
    choice = draw(st.integers(0, 3))
    if fmt == "messages" and choice == 1:
        record["messages"] = draw(st.sampled_from([{"role": "user", "content": "x"}, "hi", 3, None, {}]))
    elif fmt == "messages" and choice == 2:
        record["messages"][draw(st.integers(0, len(record["messages"]) - 1))] = draw(
            st.sampled_from(["hi", 3, None, [], ["assistant", "x"]]))
    else:
        _set(record, where, value)
    return Line(draw(dumped(record)), "wrong-type", bad=True, detect=fmt)


@st.composite
def wrong_role_line(draw) -> Line:
    msgs = draw(messages_list())
    i = draw(st.integers(0, len(msgs) - 1))
    if draw(st.booleans()):
        msgs[i] = {"content": msgs[i]["content"]}  # no role at all
    else:
        msgs[i] = {**msgs[i], "role": draw(st.sampled_from(WRONG_ROLES))}
    return Line(draw(dumped({"messages": msgs})), "wrong-role", bad=True, detect="messages")


@st.composite
def missing_field_line(draw) -> Line:
    fmt = draw(st.sampled_from(FORMATS))
    record = draw(VALID_RECORDS[fmt])
    if fmt == "messages":
        record["messages"] = [m for m in record["messages"] if m["role"] != "assistant"] or [
            {"role": "user", "content": "only a question"}]  # no assistant message
    else:
        for key in draw(st.lists(st.sampled_from(REQUIRED[fmt]), min_size=1, max_size=2, unique=True)):
            del record[key]
    return Line(draw(dumped(record)), "missing-field", bad=True, detect=keys_format(record))


@st.composite
def unknown_keys_line(draw) -> Line:
    record = draw(st.sampled_from([{}, {"text": "hello"}, {"question": "q", "answer": "a"},
                                   {"Instruction": "x", "Output": "y"}, {"messages ": []}, {"input": "x"}]))
    return Line(draw(dumped(record)), "unknown-keys", bad=True, detect=None)


@st.composite
def invalid_utf8_line(draw) -> Line:
    if draw(st.integers(0, 4)) == 0:
        return Line(draw(st.sampled_from([b"caf\xe9", b'{"instruction": "caf\xe9", "output": "x"}'])),
                    "latin-1", bad=True, parsed=False)
    fmt = draw(st.sampled_from(FORMATS))
    raw = draw(dumped(draw(VALID_RECORDS[fmt])))
    at = draw(st.integers(0, len(raw)))  # any insertion of these bytes breaks UTF-8 wherever it lands
    return Line(raw[:at] + draw(st.sampled_from(INVALID_UTF8)) + raw[at:], "invalid-utf8", bad=True, parsed=False)


def _nested(depth: int, shape: str) -> str:
    if shape == "list":
        return "[" * depth + "]" * depth
    return '{"a": ' * depth + "1" + "}" * depth


@st.composite
def deep_line(draw) -> Line:
    """JSON nested 200-5000 levels (past Python's parser or past MAX_DEPTH)."""
    depth = draw(st.sampled_from([200, 999, 1000, 1001, 5000]) | st.integers(200, 5000))
    nested = _nested(depth, draw(st.sampled_from(["list", "object"])))
    where = draw(st.integers(0, 2))
    text = [nested, '{"instruction": ' + nested + ', "output": "x"}',
            '{"instruction": "x", "output": "y", "meta": ' + nested + "}"][where]
    return Line(text.encode(), "deep", bad=True, parsed=False)


@st.composite
def depth_edge_line(draw) -> Line:
    """A valid record carrying a nested value near MAX_DEPTH: fine up to the limit, bad past it."""
    extra = draw(st.integers(MAX_DEPTH - 3, MAX_DEPTH + 3))  # the record object itself is level 1
    nested = _nested(extra, draw(st.sampled_from(["list", "object"])))
    record = '{"instruction": "x", "output": "y", "meta": ' + nested + "}"
    if 1 + extra <= MAX_DEPTH:
        return Line(record.encode(), "depth-edge-ok", detect="alpaca")
    return Line(record.encode(), "depth-edge-bad", bad=True, parsed=False)


@st.composite
def big_int_line(draw) -> Line:
    digits = draw(st.sampled_from([4301, 5000, 5001, 20000]) | st.integers(5000, 6000))
    number = draw(st.sampled_from(["", "-"])) + "1" + "0" * (digits - 1)
    where = draw(st.integers(0, 3))
    text = [number, '{"instruction": ' + number + ', "output": "x"}',
            '{"instruction": "x", "output": "y", "n": ' + number + "}",
            '{"messages": [{"role": "assistant", "content": "x"}], "n": [' + number + "]}"][where]
    return Line(text.encode(), "big-int", bad=True, parsed=False)


def int_edge_line() -> st.SearchStrategy[Line]:
    """4300 digits is the most Python's int() reads: as an extra value the record stays valid."""
    return st.just(Line(('{"instruction": "x", "output": "y", "n": 1' + "0" * 4299 + "}").encode(), "int-4300",
                        detect="alpaca"))


@st.composite
def not_object_line(draw) -> Line:
    return Line(draw(st.sampled_from(NOT_OBJECTS)).encode(), "not-object", bad=True, parsed=False)


@st.composite
def not_json_line(draw) -> Line:
    if draw(st.booleans()):
        return Line(draw(st.sampled_from(NOT_JSON)).encode(), "not-json", bad=True, parsed=False)
    text = json.dumps(draw(VALID_RECORDS[draw(st.sampled_from(FORMATS))]), ensure_ascii=False)
    cut = draw(st.integers(1, len(text) - 1))  # a proper prefix of an object is never valid JSON
    return Line(text[:cut].encode(), "truncated", bad=True, parsed=False)


@st.composite
def bom_line(draw) -> Line:
    """A BOM at the start of a line: the loader strips it on line 1 only."""
    inner = draw(valid_line(draw(st.sampled_from(FORMATS))))
    return Line(BOM + inner.raw, "bom-line", bad=True, parsed=False, unbom=inner)


@st.composite
def huge_bad_line(draw) -> Line:
    size = draw(st.sampled_from([1, 2, 3])) * 1_000_000
    text = draw(st.sampled_from(["x" * size, '{"instruction": "' + "x" * size,
                                 '{"instruction": "x", "output": [' + "1, " * (size // 3) + "1]}"]))
    if text.startswith('{"instruction": "x"'):  # a flat list of a million numbers: a wrong-typed output
        return Line(text.encode(), "huge-wrong-type", bad=True, detect="alpaca")
    return Line(text.encode(), "huge-not-json", bad=True, parsed=False)


@st.composite
def huge_valid_line(draw) -> Line:
    size = draw(st.sampled_from([1, 2, 4])) * 1_000_000
    record = {"instruction": "Summarise.", "output": "y" * size}
    return Line(json.dumps(record).encode(), "huge-valid", detect="alpaca")


# Bad kinds, weighted by repetition; huge lines stay rare.
BAD_KINDS = ([surrogate_line()] * 3 + [empty_field_line()] * 3 + [wrong_type_line()] * 3
             + [wrong_role_line()] * 3 + [missing_field_line()] * 2 + [unknown_keys_line()] * 2
             + [invalid_utf8_line()] * 3 + [deep_line()] * 2 + [depth_edge_line()] * 2 + [big_int_line()] * 2
             + [int_edge_line()] + [not_object_line()] * 2 + [not_json_line()] * 3 + [bom_line()] * 2)


@st.composite
def any_bad_line(draw) -> Line:
    return draw(BAD_KINDS[draw(st.integers(0, len(BAD_KINDS) - 1))])


def rarely(draw, one_in: int) -> bool:
    """True about once in ``one_in`` draws (a middle value: hypothesis favours the ends of a range)."""
    return draw(st.integers(0, one_in - 1)) == one_in // 2


@st.composite
def blank_line(draw) -> Line:
    return Line(draw(st.sampled_from([b"", b" ", b"\t", b"  \t ", b"\r"])), BLANK, parsed=False)


@dataclass
class Spec:
    lines: list[Line]
    bom: bool
    endings: list[bytes]
    fmt: str  # the format passed to load_dataset ("auto" mostly)

    def content(self) -> bytes:
        body = b"".join(line.raw + end for line, end in zip(self.lines, self.endings, strict=True))
        return (BOM if self.bom else b"") + body

    def effective(self) -> list[Line]:
        """Each line as the loader sees it: line 1 loses one BOM."""
        lines = list(self.lines)
        if lines and not self.bom and lines[0].unbom is not None:
            lines[0] = lines[0].unbom
        return lines


@st.composite
def endings_for(draw, n: int) -> list[bytes]:
    style = draw(st.sampled_from(["lf", "crlf", "mixed"] if n <= 100 else ["lf", "crlf"]))
    if style == "mixed":
        ends = draw(st.lists(st.sampled_from([b"\n", b"\r\n"]), min_size=n, max_size=n))
    else:
        ends = [b"\n" if style == "lf" else b"\r\n"] * n
    if n and draw(st.booleans()):
        ends[-1] = b""  # no newline at the end of the file
    return ends


@st.composite
def with_blanks(draw, lines: list[Line]) -> list[Line]:
    out = []
    for line in lines:
        out += draw(st.lists(blank_line(), max_size=2 if draw(st.integers(0, 4)) == 0 else 0))
        out.append(line)
    return out + draw(st.lists(blank_line(), max_size=1))


@st.composite
def dataset_specs(draw) -> Spec:
    mode = draw(st.sampled_from(["mixed"] * 6 + ["valid"] * 3 + ["tie", "capped"]))
    if mode == "valid":
        fmt = draw(st.sampled_from(FORMATS))
        lines = draw(st.lists(valid_line(fmt), min_size=1, max_size=12))
        if rarely(draw, 30):  # at most one huge line a file, in a few files
            lines.insert(draw(st.integers(0, len(lines))), draw(huge_valid_line()))
        if fmt == "alpaca" and draw(st.integers(0, 5)) == 0:
            lines.insert(draw(st.integers(0, len(lines))), draw(int_edge_line()))
    elif mode == "tie":  # as many records of two or three formats: the tie-break decides
        fmts = draw(st.lists(st.sampled_from(FORMATS), min_size=2, max_size=3, unique=True))
        per = draw(st.integers(1, 3))
        lines = [draw(valid_line(f)) for f in fmts for _ in range(per)]
        lines = draw(st.permutations(lines))
    elif mode == "capped":  # past MAX_REPORTED problems the details end with a count
        bad = Line(b"not json", "not-json", bad=True, parsed=False)
        lines = [bad] * draw(st.integers(MAX_REPORTED - 2, MAX_REPORTED + 150))
        for good in draw(st.lists(valid_line("alpaca"), max_size=3)):
            lines.insert(draw(st.integers(0, len(lines))), good)
    else:
        main = draw(st.sampled_from(FORMATS))
        n = draw(st.integers(1, 25))
        lines = []
        for _ in range(n):
            pick = draw(st.integers(0, 9))
            if pick < 4:
                lines.append(draw(any_bad_line()))
            elif pick < 8:
                lines.append(draw(valid_line(main)))
            else:
                lines.append(draw(valid_line(draw(st.sampled_from(FORMATS)))))
        if rarely(draw, 40):
            lines.insert(draw(st.integers(0, len(lines))), draw(huge_bad_line()))
    lines = draw(with_blanks(lines)) if mode != "capped" else lines
    bom = draw(st.integers(0, 4)) == 0
    fmt = "auto" if draw(st.integers(0, 6)) else draw(st.sampled_from(FORMATS))
    return Spec(lines, bom, draw(endings_for(len(lines))), fmt)


@dataclass
class Expected:
    fmt: str | None  # None: the file cannot be given a format
    bad: set[int]
    good: int
    undecidable: bool = False  # auto with no format key anywhere and no unreadable line


def expected(spec: Spec) -> Expected:
    numbered = [(n, line) for n, line in enumerate(spec.effective(), start=1) if line.kind != BLANK]
    unreadable = {n for n, line in numbered if not line.parsed}
    if spec.fmt == "auto":
        counts = Counter(line.detect for _, line in numbered if line.parsed and line.detect)
        if not counts and not unreadable:
            return Expected(None, set(), 0, undecidable=True)
        fmt = max(FORMATS, key=lambda f: (counts[f], -FORMATS.index(f))) if counts else "alpaca"
    else:
        fmt = spec.fmt
    bad = unreadable | {n for n, line in numbered if line.bad or (line.detect and line.detect != fmt)}
    return Expected(fmt, bad, len(numbered) - len(bad))


LINE_NO = re.compile(r"line (\d+): ")
MORE = re.compile(r"… and (\d+) more problem\(s\) past the first (\d+)$")


def _load(path: Path, fmt: str):
    """load_dataset's result or its ForgeError; anything else it raises fails the property."""
    try:
        return load_dataset(path, fmt)
    except ForgeError as err:
        return err


def _outcome(result) -> tuple:
    if isinstance(result, ForgeError):
        return ("error", result.code, result.message, tuple(result.details))
    return ("ok", result.format, len(result.conversations), result.sha256)


def check_dataset(path: Path, spec: Spec) -> None:
    path.write_bytes(spec.content())
    want = expected(spec)
    result = _load(path, spec.fmt)
    assert _outcome(_load(path, spec.fmt)) == _outcome(result), "two loads of one file disagree"

    if want.bad or want.good == 0:
        assert isinstance(result, ForgeError), f"expected dataset_invalid, loaded {result.format} " \
                                               f"with {len(result.conversations)} record(s)"
        assert result.code == "dataset_invalid"
        err = result.to_dict()
        assert set(err) == {"code", "message", "hint", "retryable", "details"}
        json.dumps(err)  # an agent receives it as JSON
        assert err["message"] and err["hint"] and len(err["message"]) <= 4000
        assert all(isinstance(d, str) and len(d) <= 1000 for d in err["details"]), "a detail echoes too much"
        if not want.bad:  # nothing to list: no records, or no format key anywhere
            blank_only = all(line.kind == BLANK for line in spec.lines)
            expected_text = "cannot tell the format" if want.undecidable and not blank_only else "no records"
            assert expected_text in err["message"], err["message"]
            return
        listed = [int(m.group(1)) for d in err["details"] if (m := LINE_NO.match(d))]
        if len(err["details"]) > MAX_REPORTED:  # capped: 1000 problems, then a count of the rest
            assert len(err["details"]) == MAX_REPORTED + 1
            more = MORE.search(err["details"][-1])
            assert more, err["details"][-1]
            total = MAX_REPORTED + int(more.group(1))
            assert total >= len(want.bad) and f": {total} problem(s)" in err["message"]
            assert set(listed) <= want.bad, f"good lines listed: {sorted(set(listed) - want.bad)[:10]}"
        else:
            missing = want.bad - set(listed)
            assert not missing, f"bad line(s) {sorted(missing)} not in details: {err['details'][:20]}"
            assert set(listed) == want.bad, f"good lines listed: {sorted(set(listed) - want.bad)}"
            assert len(listed) == len(err["details"]), "a detail without its line number"
            assert f"in {want.fmt} dataset" in err["message"], (want.fmt, err["message"][:300])
        return
    assert not isinstance(result, ForgeError), f"a clean {want.fmt} file refused: {result.to_dict()}"
    assert result.format == want.fmt
    assert len(result.conversations) == want.good
    assert result.sha256 == hashlib.sha256(spec.content()).hexdigest()
    for conversation in result.conversations:
        assert any(m["role"] == "assistant" and m["content"].strip() for m in conversation)


def test_dataset_loader_reports_every_bad_line_and_nothing_else(tmp_path):
    """load_dataset raises only ForgeError; every bad line's number is in details; a clean file (BOM,
    CRLF, blank lines and all) loads every record; the detected format is the same on every call."""
    path = tmp_path / "fuzz.jsonl"
    seen = Counter()

    @fuzz_settings(N_DATASETS)
    @given(spec=dataset_specs())
    def run(spec: Spec) -> None:
        seen["datasets"] += 1
        seen["lines"] += len(spec.lines)
        check_dataset(path, spec)

    run()
    assert seen["datasets"] >= N_DATASETS, seen


@st.composite
def huge_first_records(draw) -> tuple[dict, str | None]:
    """A clean file's first record, huge in one text or in its number of messages."""
    shape = draw(st.sampled_from(["one-text", "many-messages", "long-messages", "alpaca-all", "pc"]))
    big = draw(st.sampled_from([1_000, 10_000, 300_000, 3_000_000]))
    if shape == "one-text":
        record = {"instruction": "Summarise.", "input": "", "output": "y" * big}
    elif shape == "alpaca-all":
        record = {"instruction": "i" * big, "input": "n" * big, "output": "o" * big}
    elif shape == "pc":
        record = {"prompt": "p" * big, "completion": "c" * big}
    else:
        count = draw(st.integers(2, 20_000 if shape == "many-messages" else 12))
        size = 20 if shape == "many-messages" else max(1, big // count)
        record = {"messages": [{"role": ("user", "assistant")[i % 2], "content": "m" * size} for i in range(count)]}
    system_prompt = draw(st.none() | st.sampled_from(["Be brief.", "s" * 50_000]))
    return record, system_prompt


def test_validate_example_never_echoes_a_huge_record(tmp_path):
    """forge.data.validate's "example" is a preview: a few hundred characters of each text, ~1 KB in all."""
    path = tmp_path / "huge.jsonl"

    @fuzz_settings(N_HUGE_RECORDS)
    @given(first=huge_first_records())
    def run(first: tuple[dict, str | None]) -> None:
        record, system_prompt = first
        path.write_text(json.dumps(record) + "\n" + json.dumps(record) + "\n", encoding="utf-8")
        report = validate(DataConfig(path=path, system_prompt=system_prompt))
        assert report["records"] == 2
        shown = json.dumps(report["example"], ensure_ascii=False)
        assert len(shown) <= ECHO_LIMIT, (f"the example echoes {len(shown):,} characters of a "
                                          f"{path.stat().st_size // 2:,}-byte record: {shown[:200]}…")

    run()


def test_a_line_past_the_byte_limit_is_refused_by_number(tmp_path):
    path = tmp_path / "over.jsonl"
    over = b'{"instruction": "x", "output": "' + b"y" * MAX_LINE_BYTES + b'"}'
    path.write_bytes(b'{"instruction": "a", "output": "b"}\n' + over + b"\n")
    with pytest.raises(ForgeError) as info:
        load_dataset(path)
    assert info.value.code == "dataset_invalid"
    assert len(info.value.details) == 1 and info.value.details[0].startswith("line 2: ")
    assert len(info.value.message) < 1000


def test_a_tie_between_formats_is_decided_the_same_whatever_the_hash_seed_or_order(tmp_path):
    """One record of each format, in each order, under three hash seeds: always the same format."""
    records = [{"prompt": "p", "completion": "c"}, {"instruction": "i", "output": "o"},
               {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}]
    paths = []
    for i in range(len(records)):
        path = tmp_path / f"tie{i}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records[i:] + records[:i]), encoding="utf-8")
        paths.append(str(path))
    script = ("import re, sys\n"
              "from forge.data import load_dataset\n"
              "for path in sys.argv[1:]:\n"
              "    try:\n"
              "        print(load_dataset(path).format)\n"
              "    except Exception as exc:\n"
              "        print(re.search(r' in (\\w+) dataset', exc.message).group(1))\n")
    answers = Counter()
    for seed in ("0", "1", "4242"):
        out = subprocess.run([sys.executable, "-c", script, *paths], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONHASHSEED": seed})
        assert out.returncode == 0, out.stderr[-2000:]
        answers.update(out.stdout.split())
    assert len(answers) == 1 and sum(answers.values()) == 9, answers


# ---------------------------------------------------------------------------------------------------
# Tool calls
# ---------------------------------------------------------------------------------------------------

PATH_ARGS = {"path", "dataset", "eval_dataset", "dir", "gguf", "model", "adapter", "source", "base_model", "run"}
JOB_ARGS = {"job_id", "resume_from_job"}
SNAKE = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)*")
ERROR_KEYS = {"code", "message", "hint", "retryable", "details"}
NUMBERS = [-1, 0, 1, 2, -2**63, 2**31, 2**63 - 1, 2**63, 2**64, 10**30, -10**30, 1e308, -1e308, 5e-324, 0.5, 1.0,
           -0.0, 1.5, 1e-9, 600.0001, 4096, 4097, 1_048_577, 2.0**53 + 1]
SPECIAL_STRINGS = ["", " ", "\x00", "a\x00b", "\n", "../../etc/passwd", "/", ".", "..", "~", "~root/x", "/etc/passwd",
                   "/proc/self/environ", "/dev/zero", "/dev/stdin", "file:///etc/passwd", "C:\\Windows\\win.ini",
                   "${HOME}", "$(id)", "`id`", "%s%n", "{0}", "\u202e", "😀", "null", "true", "0", "-1", "1e308",
                   "NaN", "Infinity", "owner/name", "Qwen/Qwen2.5-0.5B-Instruct", "a/b/c", "sha256:abcd", "Q4_K_M",
                   "train-20261126-101500-3f9a1c", "quantize-20261126-101500-3f9a1c", "q4_k_m"]
EXTRA_NAMES = ["epochs", "token", "hf_token", "Path", "path ", "jobId", "__proto__", "constructor", "", "x" * 300,
               "ctx", "context", "self", "kwargs", "output_dir", "force", "\x00", "é", "rm -rf"]
CURSORS = ["x", "", " ", "nan", "NaN", "inf", "-inf", "Infinity", "1e308", "1e309", "-1", "0", "1e-400", "1_000", "٣",
           "0x10", "1.5e9", "  1  ", "None", "[]", "9" * 40]


class JobRef:
    """A job the fuzzed server knows (resolved when the call is made, so new jobs get fuzzed too)."""

    def __init__(self, index: int):
        self.index = index

    def __repr__(self) -> str:
        return f"JobRef({self.index})"


def _brief(value, limit: int = 60) -> str:
    """A call's arguments, shown short enough to read in a report."""
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit // 2]!r}…{value[-limit // 2:]!r}({len(value)} chars)"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_brief(k, 40)}: {_brief(v, limit)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        shown = ", ".join(_brief(v, limit) for v in value[:5])
        return f"[{shown}{', …' if len(value) > 5 else ''}]" + (f"({len(value)} items)" if len(value) > 5 else "")
    return repr(value)


def long_strings() -> st.SearchStrategy[str]:
    sizes = st.sampled_from([256, 300, 4096, 4097, 40_000, 100_001] * 4 + [1_000_000])
    return st.builds(lambda c, n: c * n, st.sampled_from(["x", "é", "\x00", "/", "😀", "a/"]), sizes)


strings = st.one_of(st.text(max_size=40), st.sampled_from(SPECIAL_STRINGS), long_strings())
scalars = st.one_of(st.none(), st.booleans(), st.sampled_from(NUMBERS), st.integers(),
                    st.floats(allow_nan=False, allow_infinity=False), strings)
any_json = st.recursive(scalars, lambda children: st.lists(children, max_size=4)
                        | st.dictionaries(st.text(max_size=12) | st.sampled_from(EXTRA_NAMES), children, max_size=4),
                        max_leaves=8)


def path_strategy(anchors: list[str], home: str) -> st.SearchStrategy[str]:
    component = st.one_of(st.sampled_from(["a", "demo", "x.jsonl", "..", ".", "", "sub/dir", "ok.gguf", "data",
                                           "model", "adapter_config.json", "c" * 255, "c" * 256, "c" * 300,
                                           "é" * 128, "é" * 200]),
                          st.text(max_size=20))
    under = st.builds(lambda base, c: f"{base}/{c}", st.sampled_from([*anchors, home]), component)
    deep = st.builds(lambda c, n: home + ("/" + c) * n, st.sampled_from(["d", "c" * 300, ".."]),
                     st.integers(1, 40))
    return st.one_of(st.sampled_from(anchors), under, deep, strings, st.just(home))


def job_strategy(known: list[str]) -> st.SearchStrategy:
    fake = st.sampled_from(["train-20261126-101500-3f9a1c", "train-nope", "merge-00000000-000000-000000",
                            "pipeline-99999999-999999-ffffff", "TRAIN-20261126-101500-3F9A1C", "x" * 64, "x" * 65,
                            "train-20261126-101500-3f9a1c\x00", "../train", "%", "'; DROP TABLE jobs; --"])
    return st.one_of(st.integers(0, 50).map(JobRef), fake, strings)


class Schemas:
    """Hypothesis strategies from a tool's JSON input schema. ``valid=False``: values at and around
    every bound, of the wrong types too; ``valid=True``: values the schema accepts (real paths and
    jobs among them), so that calls get past argument validation into the tool bodies."""

    def __init__(self, defs: dict, paths, good_paths, jobs):
        self.defs, self.paths, self.good_paths, self.jobs = defs, paths, good_paths, jobs

    def of(self, schema: dict, name: str = "", valid: bool = False) -> st.SearchStrategy:
        nullable = "anyOf" in schema and {"type": "null"} in schema["anyOf"]
        if name in PATH_ARGS:
            paths = self.good_paths[name] if valid else self.paths
            return paths | st.none() if nullable and not valid else paths
        if name in JOB_ARGS:
            return st.integers(0, 50).map(JobRef) if valid else self.jobs
        if name == "job_ids":
            if valid:
                return st.lists(st.integers(0, 50).map(JobRef), min_size=1, max_size=3)
            return st.lists(self.jobs, max_size=3) | st.none() | st.lists(self.jobs, min_size=101, max_size=101)
        if "$ref" in schema:
            return self.of(self.defs[schema["$ref"].rsplit("/", 1)[-1]], valid=valid)
        if "anyOf" in schema:
            return st.one_of([self.of(s, name, valid) for s in schema["anyOf"]])
        if "enum" in schema:
            if valid:
                return st.sampled_from(schema["enum"])
            return st.sampled_from(schema["enum"]) | st.sampled_from([e.upper() for e in schema["enum"]
                                                                      if isinstance(e, str)] or [None])
        kind = schema.get("type")
        if kind == "string":
            if valid:
                if "pattern" in schema:
                    longest = schema.get("maxLength", 10**9)
                    return st.from_regex(schema["pattern"], fullmatch=True).filter(lambda v: len(v) <= longest)
                return st.text(min_size=schema.get("minLength", 0), max_size=min(schema.get("maxLength", 40), 40))
            options = [st.text(max_size=20)]
            if "pattern" in schema:
                options.append(st.from_regex(schema["pattern"], fullmatch=True))
            if "maxLength" in schema:
                options.append(st.sampled_from(["a" * schema["maxLength"], "a" * (schema["maxLength"] + 1)]))
            return st.one_of(options)
        if kind in ("integer", "number"):
            low, high = schema.get("minimum"), schema.get("maximum")
            low_x, high_x = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
            if kind == "integer":
                inside = st.integers(low if low is not None else (None if low_x is None else low_x + 1),
                                     high if high is not None else (None if high_x is None else high_x - 1))
            else:
                inside = st.floats(low if low is not None else low_x, high if high is not None else high_x,
                                   exclude_min=low is None and low_x is not None,
                                   exclude_max=high is None and high_x is not None,
                                   allow_nan=False, allow_infinity=False)
            if valid:
                return inside
            edges = [v + d for v in (low, high, low_x, high_x) if v is not None for d in (-1, 0, 1)]
            return st.one_of(inside, st.sampled_from(edges or [0]))
        if kind == "boolean":
            return st.booleans()
        if kind == "null":
            return st.none()
        if kind == "array":
            item = self.of(schema.get("items", {}), name, valid)
            if valid:
                return st.lists(item, min_size=schema.get("minItems", 0), max_size=min(schema.get("maxItems", 3), 3))
            options = [st.lists(item, max_size=4)]
            if "maxItems" in schema:
                options.append(item.map(lambda x, n=schema["maxItems"] + 1: [x] * n))
            return st.one_of(options)
        if kind == "object" and "properties" in schema:
            optional = {k: self.of(v, k, valid) for k, v in schema["properties"].items()}
            return st.fixed_dictionaries({}, optional=optional)
        return any_json


@dataclass
class Call:
    tool: str
    args: dict

    def __repr__(self) -> str:
        return f"Call({self.tool}, {_brief(self.args)})"


@st.composite
def special_args(draw, tool: str, args: dict, schemas: Schemas) -> dict:
    """Shapes one tool in particular must refuse cleanly."""
    if tool == "forge_modelfile":  # sampling parameters named like the tool's other arguments
        args["parameters"] = draw(st.fixed_dictionaries({}, optional={
            "gguf": schemas.paths, "system_prompt": strings, "model_name": strings, "force": st.booleans(),
            "path": schemas.paths, "parameters": any_json, "template": strings, "stop": st.lists(strings, max_size=2),
            "temperature": st.sampled_from([0.5, -1, 11, "hot"]), "num_ctx": st.sampled_from([4096, 0, 2**63])}))
    elif tool == "forge_query_model":  # messages without a role, or otherwise off
        bad_message = st.sampled_from([{"content": "Hi"}, {"role": "robot", "content": "Hi"}, {"role": "user"},
                                       {"role": "user", "content": 5}, {"role": "user", "content": "x" * 100_001},
                                       {"role": "user", "content": "Hi", "name": "x"}, "Hi", None, []])
        args["messages"] = draw(st.lists(bad_message, min_size=1, max_size=3) | st.just([]))
    elif tool == "forge_job_list":
        args["cursor"] = draw(st.sampled_from(CURSORS))
    elif tool == "forge_job_events":
        args["after"] = draw(st.sampled_from([2**63, 2**63 - 1, 2**64, -1, 0, 1.5, "1"]))
    elif tool in ("forge_train", "forge_pipeline"):
        args["hyperparameters"] = draw(st.fixed_dictionaries({}, optional={
            "epochs": st.integers(), "output_dir": schemas.paths, "dataset": schemas.paths, "num_train_epochs":
            st.sampled_from([1, 0, -1, 1e308, 1001, "2"]), "max_steps": st.sampled_from([2**63, -2, 3.5]),
            "learning_rate": st.sampled_from([0, 2, 1e-4])}))
    return args


@st.composite
def tool_calls(draw, name: str, schema: dict, schemas: Schemas) -> Call:
    """One call of ``name``: every argument valid (a third of the calls), or each one valid, fuzzed or
    left out, with shapes special to the tool and unknown extra arguments now and then."""
    required = set(schema.get("required", []))
    properties = schema.get("properties", {})
    if draw(st.integers(0, 2)) == 0:
        args = {k: draw(schemas.of(sub, k, valid=True)) for k, sub in properties.items()
                if k in required or draw(st.booleans())}
        return Call(name, args)
    args = {}
    for key, sub in properties.items():
        if draw(st.integers(0, 9)) != 0 if key in required else draw(st.booleans()):
            pick = draw(st.integers(0, 4))
            args[key] = draw(any_json if pick == 0 else schemas.of(sub, key, valid=pick == 1))
    if draw(st.integers(0, 3)) == 0:
        args = draw(special_args(name, args, schemas))
    if draw(st.integers(0, 5)) == 0:
        for extra in draw(st.lists(st.sampled_from(EXTRA_NAMES) | st.text(max_size=10), min_size=1, max_size=3,
                                   unique=True)):
            args[extra] = draw(scalars)
    return Call(name, args)


unknown_tools = st.builds(Call, st.sampled_from(["forge_nope", "", "FORGE_TRAIN", "forge_train ", "forge_train\x00",
                                                 "x" * 300]) | st.text(max_size=30),
                          st.dictionaries(st.text(max_size=8), scalars, max_size=2))


def _resolve(value, jobs: list[str]):
    if isinstance(value, JobRef):
        return jobs[value.index % len(jobs)]
    if isinstance(value, list):
        return [_resolve(v, jobs) for v in value]
    if isinstance(value, dict):
        return {k: _resolve(v, jobs) for k, v in value.items()}
    return value


@dataclass
class Fuzzed:
    portal: object
    client: Client
    home: Path
    tools: dict
    anchors: list[str]
    jobs: list[str]
    roles: dict = field(default_factory=dict)  # argument name → real paths that suit it
    runner: object = None

    def call(self, name: str, args: dict):
        async def timed():
            with anyio.fail_after(CALL_LIMIT_S + 5):
                return await self.client.call_tool(name, args)

        return self.portal.call(timed)


def _setup_calls(fz: Fuzzed) -> None:
    """Real things for the fuzzer to aim at: demo model and dataset, damaged files, queued jobs."""
    demo = fz.call("forge_demo_assets", {})
    assert not demo.is_error, demo.content[0].text
    assets = demo.structured_content
    home = fz.home
    (home / "bad.jsonl").write_bytes(b'{"instruction": "x"}\nnot json\n\xff\n')
    (home / "dir.jsonl").mkdir()
    # GGUFs with the right magic and a damaged rest: a bad version, an absurd key length, absurd counts
    (home / "junk.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 4)
    (home / "hdr.gguf").write_bytes(b"GGUF" + struct.pack("<IQQQ", 3, 1, 1, 2**40))
    (home / "counts.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**62, 2**62))
    (home / "text.gguf").write_text("not a gguf", encoding="utf-8")
    (home / "empty.gguf").write_bytes(b"")
    model, dataset = assets["model_dir"], assets["dataset"]
    adapter = home / "adapter"  # an adapter dir as a train job leaves one (its config names the base)
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": model, "peft_type": "LORA",
                                                             "r": 8, "lora_alpha": 16}), encoding="utf-8")
    ggufs = [str(home / f"{n}.gguf") for n in ("junk", "hdr", "counts", "text", "empty")]
    datasets = [dataset, str(home / "bad.jsonl"), str(home / "dir.jsonl")]
    fz.anchors += [model, dataset, *datasets[1:], *ggufs]
    fz.roles = {"base_model": [model, "owner/name"], "dataset": datasets, "eval_dataset": datasets, "path": datasets,
                "gguf": ggufs,
                "model": [*ggufs, model], "adapter": [str(adapter), model], "source": [model],
                "dir": [str(home / "demo")], "run": [str(home / "demo"), "train-20260101-000000-abcdef"]}
    for name, args in [("forge_train", {"base_model": model, "dataset": dataset}),
                       ("forge_pipeline", {"base_model": model, "dataset": dataset}),
                       ("forge_merge", {"adapter": str(adapter)}), ("forge_quantize", {"model": model}),
                       ("forge_publish", {"source": model, "repo_id": "me/tiny", "kind": "merged", "dry_run": True})]:
        result = fz.call(name, args)
        assert not result.is_error, result.content[0].text
        fz.jobs.append(result.structured_content["job_id"])


@pytest.fixture
def fuzzed(tmp_path, monkeypatch):
    """One in-process server and client for a whole test; jobs stay queued (no worker ever starts)."""
    home = tmp_path / "home"
    monkeypatch.setenv("FORGE_HOME", str(home))
    monkeypatch.setenv("FORGE_MAX_CONCURRENT_JOBS", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("FORGE_ALLOWED_ROOTS", "FORGE_CONFINED", "OLLAMA_HOST", "HF_TOKEN", "FORGE_MCP_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    server = create_server()
    try:
        with start_blocking_portal("asyncio") as portal, portal.wrap_async_context_manager(Client(server)) as client:
            tools = {t.name: t for t in portal.call(client.list_tools).tools}
            fz = Fuzzed(portal, client, home.resolve(), tools, [], [], runner=server.runner)
            _setup_calls(fz)
            yield fz
    finally:
        stop_runner(server.runner)


async def _flush_worker_threads() -> None:
    async with anyio.create_task_group() as tg:
        for _ in range(16):
            tg.start_soon(anyio.to_thread.run_sync, time.sleep, 0.01)


def _guard_wait(name: str, args: dict, jobs: list[str]) -> dict:
    """forge_job_wait on a real job blocks for timeout_s (default 60): keep such waits short."""
    if name == "forge_job_wait" and args.get("job_id") in jobs:
        timeout = args.get("timeout_s", 60)
        if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 1:
            args = {**args, "timeout_s": 0.2}
    return args


def check_result(call: Call, result, fz: Fuzzed, internal: list) -> None:
    texts = [c.text for c in result.content if getattr(c, "type", "") == "text"]
    for text in texts:
        assert "Traceback" not in text and "Error executing tool" not in text, text[:2000]
    tool = fz.tools.get(call.tool)
    schema = tool.input_schema if tool else {}
    extras = sorted(set(call.args) - set(schema.get("properties", {})))
    missing = sorted(set(schema.get("required", [])) - set(call.args))
    if not result.is_error:
        assert tool and not extras and not missing, f"accepted: {call}"
        content = result.structured_content
        assert isinstance(content, dict), f"no structured content: {texts[:1]}"
        if tool.output_schema is not None:
            jsonschema.validate(content, tool.output_schema)
        elif call.tool in HANDLE_TOOLS:  # the shared job handle, described once rather than in six schemas
            JobHandle.model_validate(content)
        if "job_id" in content and content["job_id"] not in fz.jobs:
            fz.jobs.append(content["job_id"])
        return
    assert len(result.content) == 1 and len(texts) == 1, f"error content is not one text item: {result.content}"
    error = json.loads(texts[0])
    assert isinstance(error, dict) and set(error) == ERROR_KEYS, texts[0][:2000]
    assert isinstance(error["code"], str) and SNAKE.fullmatch(error["code"]), error["code"]
    assert isinstance(error["message"], str) and error["message"].strip(), error
    assert isinstance(error["hint"], str) and isinstance(error["retryable"], bool)
    assert isinstance(error["details"], list) and all(isinstance(d, str) for d in error["details"]), error
    if tool and extras:
        assert error["code"] == "invalid_argument", error
        for extra in extras[:5]:  # the message names the first five; details has every one
            assert repr(extra[:80]) in error["message"] or (extra and extra[:80] in error["message"]), \
                f"the message does not name {extra!r}: {error['message']}"
    elif tool and missing:
        assert error["code"] == "invalid_argument", error
        named = error["message"] + " ".join(error["details"])
        assert all(m in named for m in missing), f"missing {missing} not named: {named[:500]}"
    if error["code"] == "internal_error":  # an exception the tool did not expect: collected, reported at the end
        internal.append((call, error["message"]))


def _internal_report(internal: list, home: str) -> str:
    """One line per distinct internal error (tool and message shape), with the shortest call that hit it."""
    groups: dict[tuple, tuple] = {}
    for call, message in internal:
        key = (call.tool, re.sub(r"'[^']*'|\"[^\"]*\"|\d+", "…", message)[:100])
        shown = _brief(call.args, 160).replace(home, "$FORGE_HOME")
        if key not in groups or len(shown) < len(groups[key][0]):
            groups[key] = (shown, message[:300].replace(home, "$FORGE_HOME"))
    return "\n".join(f"- {tool}({shown}) -> internal_error: {message}"
                     for (tool, _), (shown, message) in sorted(groups.items()))


def explicit_calls(fz: Fuzzed) -> list[Call]:
    """The shapes the fuzzer must always try, whatever it draws."""
    home, job = str(fz.home), JobRef(0)
    model, dataset = fz.roles["base_model"][0], fz.roles["dataset"][0]
    long_part = "c" * 300
    return [Call(name, args) for name, args in [
        ("forge_train", {"base_model": model, "dataset": dataset, "epochs": 100, "token": "x"}),
        ("forge_environment", {"token": "x"}),
        ("forge_job_status", {"job_id": job, "jobId": job}),
        ("forge_modelfile", {"gguf": f"{home}/junk.gguf", "parameters": {"gguf": "/etc/passwd", "system_prompt": "x",
                                                                          "model_name": "m", "force": False}}),
        ("forge_modelfile", {"gguf": f"{home}/x.gguf", "parameters": {"temperature": 0.5}, "temperature": 0.5}),
        ("forge_query_model", {"model": f"{home}/junk.gguf", "messages": [{"content": "Hi"}]}),
        ("forge_query_model", {"model": "some-model", "messages": [{"role": "user"}]}),
        ("forge_job_list", {"cursor": "x"}),
        ("forge_job_list", {"cursor": "nan"}),
        ("forge_job_list", {"cursor": "1e309"}),
        ("forge_job_events", {"job_id": job, "after": 2**63}),
        ("forge_job_events", {"job_id": job, "after": 2**63 - 1}),
        ("forge_job_wait", {"job_id": job, "timeout_s": 1e308}),
        ("forge_validate_dataset", {"path": "a\x00b"}),
        ("forge_validate_dataset", {"path": "x" * 40_000}),
        ("forge_validate_dataset", {"path": dataset, "max_length": 2**64}),
        ("forge_validate_dataset", {"path": f"{home}/{long_part}"}),
        ("forge_validate_dataset", {"path": f"{home}/{long_part}/d.jsonl"}),
        ("forge_demo_assets", {"dir": f"{home}/{long_part}"}),
        ("forge_demo_assets", {"dir": f"{home}/bad.jsonl/sub"}),
        ("forge_query_model", {"model": f"{home}/{long_part}.gguf"}),
        ("forge_query_model", {"model": "x" * 256}),
        ("forge_modelfile", {"gguf": f"{home}/hdr.gguf"}),
        ("forge_query_model", {"model": f"{home}/counts.gguf"}),
        ("forge_train", {"base_model": model, "dataset": dataset, "hyperparameters": {"num_train_epochs": 1e308}}),
        ("forge_train", {"base_model": model}),
        ("forge_train", {"base_model": model, "dataset": f"{home}/missing.jsonl"}),
        ("forge_pipeline", {"base_model": model, "dataset": f"{home}/dir.jsonl"}),
        ("forge_pipeline", {"base_model": model, "dataset": dataset, "system_prompt": "s" * 1_000_000}),
        ("forge_publish", {"source": model, "repo_id": "../x"}),
        ("forge_seal_verify", {"seal_id": "sha256:" + "0" * 64}),
        ("forge_seal_snapshot", {"job_ids": [job]}),
        ("forge_merge", {"adapter": model, "merged_name": ".."}),
        ("forge_quantize", {"model": model, "quantizations": ["Q4_K_M"] * 9}),
        ("forge_job_cancel", {"job_id": job, "force": "yes"}),
    ]]


def test_every_tool_call_ends_in_a_result_or_a_structured_error(fuzzed):
    """Random, boundary and malformed arguments for every tool: each call returns a success matching
    the tool's output schema or one JSON error object (code, message, hint, retryable, details),
    never a traceback, within 60 s; unknown and missing arguments are named; no tool fails with an
    unexpected exception (internal_error).

    Each tool gets its own share of the calls (and its own shrinking); a failure in one tool does not
    stop the others, and every tool's failures are reported together at the end."""
    fz = fuzzed
    home = str(fz.home)
    good_paths = {name: st.sampled_from([*fz.roles[name], f"{home}/new", *fz.anchors[:3]]) for name in PATH_ARGS}
    schemas = Schemas({}, path_strategy(fz.anchors, home), good_paths, job_strategy(fz.jobs))
    for tool in fz.tools.values():
        schemas.defs.update(tool.input_schema.get("$defs", {}))
    internal: list = []
    seen = Counter()
    per_tool = -(-N_CALLS // len(fz.tools))

    def one(call: Call) -> None:
        call = Call(call.tool, _guard_wait(call.tool, _resolve(call.args, fz.jobs), fz.jobs))
        started = time.monotonic()
        try:
            result = fz.call(call.tool, call.args)
        except TimeoutError:
            raise AssertionError(f"{call} took over {CALL_LIMIT_S:.0f} s") from None
        elapsed = time.monotonic() - started
        seen["calls"] += 1
        seen[call.tool] += 1
        seen["errors" if result.is_error else "successes"] += 1
        assert elapsed <= CALL_LIMIT_S, f"{call} took {elapsed:.1f} s"
        check_result(call, result, fz, internal)

    failures, leaks = [], {}
    with warnings.catch_warnings(record=True) as caught:
        # A file left for the garbage collector to close is a ResourceWarning: recorded here (not raised
        # at some later test's expense), collected after each tool's calls and reported with its name.
        warnings.simplefilter("always", ResourceWarning)

        def collect_leaks(label: str) -> None:
            fz.portal.call(_flush_worker_threads)  # idle workers hold on to their last call's locals
            gc.collect()
            found = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
            if found:
                leaks[label.replace(home, "$FORGE_HOME")] = sorted(set(found))
            caught.clear()

        for call in explicit_calls(fz):
            try:
                one(call)
            except Exception as exc:
                failures.append(f"{call}: {type(exc).__name__}: {exc}")
            collect_leaks(f"{call.tool}({_brief(call.args, 160)})")
        for name in sorted(fz.tools):
            @fuzz_settings(per_tool)
            @given(call=tool_calls(name, fz.tools[name].input_schema, schemas))
            def run(call: Call) -> None:
                one(call)

            try:
                run()
            except Exception as exc:  # keep fuzzing the other tools; report every failure below
                failures.append(f"{name}: {type(exc).__name__}: {exc}\n" + "\n".join(getattr(exc, "__notes__", [])))
            collect_leaks(f"{name} (fuzzed calls)")

        @fuzz_settings(max(10, per_tool // 4))
        @given(call=unknown_tools)
        def run_unknown(call: Call) -> None:
            one(call)

        run_unknown()
        collect_leaks("unknown tools")
    assert not failures, "\n\n".join(failures)
    assert seen["calls"] >= N_CALLS, seen
    assert all(seen[t] >= per_tool for t in fz.tools), seen
    assert seen["successes"] >= N_CALLS // 10, seen
    assert not fz.runner.procs, "a worker started although FORGE_MAX_CONCURRENT_JOBS=0"
    problems = []
    if internal:
        problems.append(f"{len(internal)} call(s) failed with internal_error (an exception the tool did not "
                        f"expect):\n{_internal_report(internal, home)}")
    if leaks:
        problems.append("files left open for the garbage collector to close (ResourceWarning):\n" + "\n".join(
            f"- after {label}: {', '.join(messages)}" for label, messages in leaks.items()))
    assert not problems, "\n".join(problems)
