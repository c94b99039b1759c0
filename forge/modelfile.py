"""Ollama Modelfiles: TEMPLATE in Ollama's Go-template syntax for the model's chat template, SYSTEM
(the template's own default system message, or the one asked for), a stop for every end-of-turn and
EOS token, sampling parameters — and a parser/validator.

The template is planned from the GGUF's own Jinja chat template (forge.templates), so Ollama renders
exactly the prompt the model was trained on: tests render TEMPLATE with Go's text/template and compare it
byte for byte with the Jinja template. The BOS token is left out: llama.cpp adds it when it tokenizes.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import Field

from forge import templates
from forge.config import StageConfig
from forge.errors import Codes, ForgeError
from forge.paths import check_output, read_text
from forge.runs import Outcome, record_stage_near
from forge.workspace import artifact, atomic_write_text, refuse_existing

# Ollama model names: [namespace/]name[:tag]; nothing a shell would read as syntax.
OLLAMA_NAME_PATTERN = (r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(/[A-Za-z0-9][A-Za-z0-9._-]{0,127})?"
                       r"(:[A-Za-z0-9][A-Za-z0-9._-]{0,127})?$")


class ModelfileConfig(StageConfig):
    gguf: Path = Field(description="The GGUF file the Modelfile runs (with adapter: the base model's GGUF).")
    adapter: Path | None = Field(None, description="A LoRA GGUF applied on top of gguf (an ADAPTER line).")
    output: Path | None = Field(None, description="Modelfile path; default 'Modelfile' beside the GGUF.")
    model_name: str | None = Field(None, max_length=200, pattern=OLLAMA_NAME_PATTERN, description=(
        "Name for `ollama create` ([namespace/]name[:tag], letters, digits, '.', '_', '-'); default the GGUF's "
        "stem."))
    system_prompt: str | None = Field(None, description="SYSTEM message.")
    template: str | None = Field(None, description="Override the TEMPLATE (Ollama Go template).")
    temperature: float | None = Field(None, ge=0, description="Sampling temperature.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int | None = Field(None, gt=0, description="Top-k sampling.")
    repeat_penalty: float | None = Field(None, gt=0, description="Repetition penalty.")
    num_ctx: int | None = Field(None, gt=0, description="Context window in tokens.")
    num_predict: int | None = Field(None, description="Max tokens to generate (-1: unlimited).")
    force: bool = Field(False, description="Replace an existing Modelfile.")
    keep_existing: bool = Field(False, description=(
        "Never change an existing Modelfile (a seal may list it): one with the same content is reused, other "
        "content goes to Modelfile-2, Modelfile-3, ..."))


SAMPLING = ("temperature", "top_p", "top_k", "repeat_penalty", "num_ctx", "num_predict")


def _quote(text: str) -> str:
    if '"""' in text:
        raise ForgeError(Codes.MODELFILE_INVALID, 'the text contains """, which a Modelfile cannot quote',
                         'remove the triple quotes from the system prompt or template')
    return f'"""{text}"""'


def gguf_tokens(gguf_path: Path) -> dict:
    """Chat template, BOS and EOS/EOT token strings from a GGUF's header."""
    from forge.converter import gguf_fields, gguf_module

    tok = gguf_module().Keys.Tokenizer
    fields, _ = gguf_fields(gguf_path, (tok.CHAT_TEMPLATE, tok.LIST, tok.BOS_ID, tok.EOS_ID, tok.EOT_ID))
    tokens = fields[tok.LIST] or []

    def name(key: str) -> str | None:
        index = fields[key]
        return tokens[index] if index is not None and index < len(tokens) else None

    return {"chat_template": fields[tok.CHAT_TEMPLATE], "bos": name(tok.BOS_ID),
            "eos_tokens": [t for t in (name(tok.EOS_ID), name(tok.EOT_ID)) if t]}


def _relative(path: Path, out: Path) -> str:
    """A path as a Modelfile names it: relative to the Modelfile when beside or below it, else absolute."""
    try:
        return f"./{Path(path.resolve()).relative_to(out.resolve().parent).as_posix()}"
    except ValueError:
        return str(path.resolve())


def _lora_base(config: ModelfileConfig) -> ModelfileConfig:
    """Given a LoRA GGUF as ``gguf``: the base GGUF it was verified on (from its run's record) as ``gguf``,
    the LoRA as ``adapter``."""
    from forge.converter import gguf_fields

    fields, _ = gguf_fields(Path(config.gguf), ("general.type",))
    if config.adapter is not None or fields["general.type"] != "adapter":
        return config
    from forge.runs import find_run_dir, load_stages

    run_dir = find_run_dir(Path(config.gguf).parent)
    record = (load_stages(run_dir).get("lora_gguf") or {}) if run_dir else {}
    if not record.get("base_gguf"):
        raise ForgeError(Codes.GGUF_INVALID, f"{config.gguf} is a LoRA adapter GGUF, not a model",
                         "pass the base model's GGUF as gguf and the LoRA GGUF as adapter")
    return config.model_copy(update={"gguf": Path(record["base_gguf"]["path"]), "adapter": Path(config.gguf),
                                     "output": config.output or Path(config.gguf).parent / "Modelfile.adapter"})


def write_modelfile(config: ModelfileConfig) -> dict:
    check_gguf(Path(config.gguf))
    config = _lora_base(config)
    gguf_path = Path(config.gguf)
    if config.adapter is not None:
        check_gguf(Path(config.adapter))
    out = check_output(Path(config.output) if config.output else gguf_path.parent / "Modelfile", "Modelfile")
    if not config.keep_existing:
        refuse_existing(out, config.force)
    info = gguf_tokens(gguf_path)
    planned = None
    if config.template is None:
        eos = info["eos_tokens"][0] if info["eos_tokens"] else None
        planned = templates.plan(info["chat_template"] or "", info["bos"], eos)
    family = planned.family if planned else None
    stops = list(dict.fromkeys([*(family.stops if family else ()), *info["eos_tokens"]]))
    system = config.system_prompt or (planned.default_system if planned else None)
    named = Path(config.adapter).name if config.adapter else gguf_path.name
    lines = [f"# Modelfile written by Forge for {named}", f"FROM {_relative(gguf_path, out)}"]
    if config.adapter:
        lines.append(f"ADAPTER {_relative(Path(config.adapter), out)}")
    lines.append("")
    lines += [f"TEMPLATE {_quote(config.template or planned.template)}", ""]
    if system:
        lines += [f"SYSTEM {_quote(system)}", ""]
    lines += [f"PARAMETER stop {json_string(s)}" for s in stops]
    params = {k: getattr(config, k) for k in SAMPLING if getattr(config, k) is not None}
    lines += [f"PARAMETER {k} {v}" for k, v in params.items()]
    content = "\n".join(lines) + "\n"
    parse_modelfile(content, base_dir=out.parent)  # never write a Modelfile we would reject
    if config.keep_existing:
        out = _unchanged_or_new(out, content)
    if not (out.is_file() and read_text(out, "Modelfile") == content):
        atomic_write_text(out, content)
    stem = Path(config.adapter or gguf_path).stem.lower()
    name = config.model_name or re.sub(r"[^a-z0-9._-]+", "-", stem).strip("-._") or "model"
    result = {"status": Outcome.SUCCEEDED, "path": str(out), "content": content,
              "template_family": family.name if family else "custom", "stop_tokens": stops, "parameters": params,
              "system": system, "default_system": planned.default_system if planned else None,
              "template_notes": planned.notes if planned else [],
              "ollama_create": f"ollama create {shlex.quote(name)} -f {shlex.quote(str(out))}", "model_name": name,
              "artifacts": [artifact(out, "modelfile")], "config": config.model_dump(mode="json")}
    if config.adapter is None:  # a LoRA's Modelfile is part of its lora_gguf record
        record_stage_near(out, "modelfile", result)
    return result


def _unchanged_or_new(out: Path, content: str) -> Path:
    """``out`` if it is free or already holds ``content``; else the first Modelfile-N that is."""
    candidates = [out, *(out.with_name(f"{out.name}-{n}") for n in range(2, 1000))]
    for candidate in candidates:
        if not candidate.exists() or (candidate.is_file() and read_text(candidate, "Modelfile") == content):
            return check_output(candidate, "Modelfile")
    raise ForgeError(Codes.OUTPUT_EXISTS, f"{out.parent} already holds {len(candidates)} Modelfiles",
                     "remove the ones no seal needs, or pass output= a new path")


def json_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ---- parsing and validation ----

INSTRUCTIONS = {"FROM", "TEMPLATE", "SYSTEM", "PARAMETER", "ADAPTER", "LICENSE", "MESSAGE", "REQUIRES"}
PARAMETER_TYPES = {
    "temperature": float, "top_p": float, "top_k": int, "min_p": float, "repeat_penalty": float,
    "repeat_last_n": int, "num_ctx": int, "num_predict": int, "seed": int, "stop": str, "num_gpu": int,
    "num_thread": int, "num_batch": int, "mirostat": int, "mirostat_eta": float, "mirostat_tau": float,
    "typical_p": float, "presence_penalty": float, "frequency_penalty": float, "num_keep": int,
}


@dataclass
class Modelfile:
    from_: str = ""
    template: str | None = None
    system: str | None = None
    parameters: list[tuple[str, object]] = field(default_factory=list)
    instructions: list[tuple[str, str]] = field(default_factory=list)

    @property
    def stops(self) -> list[str]:
        return [v for k, v in self.parameters if k == "stop"]


def _unquote(value: str) -> str:
    value = value.strip()
    if value.startswith('"') and value.endswith('"') and len(value) >= 2:
        inner = value[1:-1]
        return re.sub(r'\\(["\\])', r"\1", inner)
    return value


def parse_modelfile(text: str, base_dir: Path | None = None) -> Modelfile:
    """Parse and validate; raise one error listing every problem (with line numbers)."""
    problems: list[str] = []
    mf = Modelfile()
    froms = 0
    adapters = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        lineno, line = i + 1, lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword not in INSTRUCTIONS:
            problems.append(f"line {lineno}: unknown instruction {keyword!r}; known: {', '.join(sorted(INSTRUCTIONS))}")
            continue
        rest = rest.strip()
        if rest.startswith('"""'):
            body = rest[3:]
            while '"""' not in body and i < len(lines):
                body += "\n" + lines[i]
                i += 1
            if '"""' not in body:
                problems.append(f"line {lineno}: {keyword} opens \"\"\" but never closes it")
                break
            value = body[: body.index('"""')]
        else:
            value = rest
        mf.instructions.append((keyword, value))
        if keyword == "ADAPTER":
            adapters.append(value.strip())
        if keyword == "FROM":
            froms += 1
            mf.from_ = value.strip()
        elif keyword == "TEMPLATE":
            mf.template = value
        elif keyword == "SYSTEM":
            mf.system = value
        elif keyword == "PARAMETER":
            name, _, raw = value.partition(" ")
            expected = PARAMETER_TYPES.get(name)
            if expected is None:
                problems.append(f"line {lineno}: unknown parameter {name!r}")
                continue
            try:
                mf.parameters.append((name, _unquote(raw) if expected is str else expected(raw.strip())))
            except ValueError:
                problems.append(f"line {lineno}: parameter {name} expects {expected.__name__}, got {raw.strip()!r}")
    if froms != 1:
        problems.append(f"expected exactly one FROM, found {froms}")
    elif base_dir is not None:
        target = Path(mf.from_) if Path(mf.from_).is_absolute() else Path(base_dir) / mf.from_
        if not target.is_file():
            problems.append(f"FROM {mf.from_}: no such file (resolved to {target})")
        elif not _is_gguf(target):
            problems.append(f"FROM {mf.from_}: {target} is not a GGUF file")
    for adapter in adapters if base_dir is not None else []:
        target = Path(adapter) if Path(adapter).is_absolute() else Path(base_dir) / adapter
        if not target.is_file() or not _is_gguf(target):
            problems.append(f"ADAPTER {adapter}: no GGUF file there (resolved to {target})")
    if problems:
        raise ForgeError(Codes.MODELFILE_INVALID, "invalid Modelfile: " + "; ".join(problems),
                         "fix the lines listed; see https://github.com/ollama/ollama/blob/main/docs/modelfile.md",
                         details=problems)
    return mf


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"GGUF"


def check_gguf(path: Path) -> None:
    if not Path(path).is_file():
        raise ForgeError(Codes.GGUF_NOT_FOUND, f"GGUF {path} does not exist", "pass a .gguf written by forge quantize")
    if not _is_gguf(Path(path)):
        raise ForgeError(Codes.GGUF_NOT_FOUND, f"{path} is not a GGUF file (bad magic)",
                         "pass a .gguf written by forge quantize")


def validate_modelfile(path: Path) -> dict:
    path = Path(path)
    mf = parse_modelfile(path.read_text(encoding="utf-8"), base_dir=path.parent)
    return {"path": str(path), "from": mf.from_, "stops": mf.stops, "parameters": dict(mf.parameters),
            "has_template": mf.template is not None, "system": mf.system}
