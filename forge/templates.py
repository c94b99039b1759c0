"""Chat templates: the families Forge knows, as the Jinja a model is trained with and as the Go template
Ollama renders, kept byte-for-byte equal.

A model's own Jinja template is the truth. Its family (ChatML, Llama 3, Gemma, Phi-3, Phi-4, Mistral) is
detected from its marker tokens, and the template is then *probed*: rendered with and without a system
message, to learn what it adds on its own. Two things published templates add:

- a default system message when the conversation has none (Qwen2.5: "You are Qwen, created by Alibaba
  Cloud…", SmolLM2: "You are a helpful AI assistant named SmolLM…"). The Modelfile carries it as its
  SYSTEM line: Ollama puts SYSTEM in as the first message exactly when a conversation has no system
  message of its own, which is what the Jinja template does. (Writing it into TEMPLATE instead would
  also work, but SYSTEM keeps it visible and lets `ollama run` users change it.)
- a system header that is always there, with fixed text in it (Llama 3.1: "Cutting Knowledge Date:
  December 2023\\nToday Date: 26 Jul 2024"). That text goes into the TEMPLATE, which then writes the
  header for every conversation, with or without a system message.

Base models carry no template: ``chat_template`` names a family here (its Jinja, special tokens and
end-of-turn token are added to the tokenizer) or a Jinja file. The families that call tools (qwen2.5,
llama3.1, mistral-tools) live in forge.tool_templates; a model whose Jinja is one of theirs gets their Go
TEMPLATE, which renders tools, calls and results too.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from forge.errors import Codes, ForgeError
from forge.tool_templates import TOOL_FAMILIES, ToolFamily, tool_family_of

LAST = "{{- $last := eq (len (slice $.Messages $i)) 1 -}}"
FIND_SYSTEM = ('{{- $system := "" }}{{- range .Messages }}{{ if eq .Role "system" }}{{ $system = .Content }}{{ end }}'
               "{{ end }}")


@dataclass(frozen=True)
class TemplateFamily:
    name: str
    markers: tuple[str, ...]  # all must appear in a Jinja template of the family
    stops: tuple[str, ...]  # end-of-turn tokens
    jinja: str  # the family's template, for base models that have none
    special_tokens: tuple[str, ...]  # tokens the template writes, added to a base model's vocabulary
    eos: str  # the end-of-turn token generation stops at
    bos: str | None = None  # BOS the Jinja template writes; llama.cpp adds it itself


def _loop(body: str, after: str = "") -> str:
    """Go: every message in turn, with $last true on the final one."""
    return "{{- range $i, $_ := .Messages }}\n" + LAST + "\n" + body + after + "{{- end }}"


FAMILIES: tuple[TemplateFamily, ...] = (
    TemplateFamily(
        name="phi4", markers=("<|im_start|>", "<|im_sep|>", "<|im_end|>"), stops=("<|im_end|>",),
        jinja=("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '<|im_sep|>' + m['content'] + '<|im_end|>' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"),
        special_tokens=("<|im_start|>", "<|im_sep|>", "<|im_end|>"), eos="<|im_end|>"),
    TemplateFamily(
        name="chatml", markers=("<|im_start|>", "<|im_end|>"), stops=("<|im_end|>",),
        jinja=("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
        special_tokens=("<|im_start|>", "<|im_end|>"), eos="<|im_end|>"),
    TemplateFamily(
        name="llama3", markers=("<|start_header_id|>", "<|eot_id|>"), stops=("<|eot_id|>", "<|eom_id|>"),
        jinja=("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
               " + m['content'] + '<|eot_id|>' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
        special_tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        eos="<|eot_id|>", bos="<|begin_of_text|>"),
    TemplateFamily(
        name="gemma", markers=("<start_of_turn>", "<end_of_turn>"), stops=("<end_of_turn>",),
        jinja=("{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
               "{% set first = messages[0]['content'] + '\\n\\n' %}{% set turns = messages[1:] %}"
               "{% else %}{% set first = '' %}{% set turns = messages %}{% endif %}"
               "{% for m in turns %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n'"
               " + (first if loop.first else '') + m['content'] + '<end_of_turn>\\n' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"),
        special_tokens=("<bos>", "<start_of_turn>", "<end_of_turn>"), eos="<end_of_turn>", bos="<bos>"),
    TemplateFamily(
        name="phi3", markers=("<|user|>", "<|end|>", "<|assistant|>"), stops=("<|end|>", "<|endoftext|>"),
        jinja=("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"),
        special_tokens=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), eos="<|end|>"),
    TemplateFamily(
        name="mistral", markers=("[INST]", "[/INST]"), stops=("[INST]", "</s>"),
        jinja=("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
               "{% set turns = messages[1:] %}{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
               "{% set ns = namespace(last=-1) %}{% for m in turns %}{% if m['role'] == 'user' %}"
               "{% set ns.last = loop.index0 %}{% endif %}{% endfor %}"
               "{% for m in turns %}{% if m['role'] == 'user' %}{{ '[INST] ' + (system + '\\n\\n' "
               "if system and loop.index0 == ns.last else '') + m['content'] + '[/INST]' }}"
               "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"),
        special_tokens=("<s>", "</s>", "[INST]", "[/INST]"), eos="</s>", bos="<s>"),
)
BY_NAME: dict[str, TemplateFamily | ToolFamily] = {f.name: f for f in (*FAMILIES, *TOOL_FAMILIES)}


def go_template(family: TemplateFamily | ToolFamily, system_header: str | None = None) -> str:
    """The Ollama TEMPLATE (Go text/template over .Messages) rendering what the family's Jinja renders
    with add_generation_prompt, BOS left out. ``system_header``: text the template always writes into
    a system header (Llama 3.1's dated one), which then opens every conversation."""
    if isinstance(family, ToolFamily):
        return family.go
    name = family.name
    if name == "phi4":
        return _loop("<|im_start|>{{ .Role }}<|im_sep|>{{ .Content }}<|im_end|>\n"
                     '{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant<|im_sep|>{{ end }}\n')
    if name == "chatml":
        return _loop("<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
                     '{{ if and $last (ne .Role "assistant") }}<|im_start|>assistant\n{{ end }}\n')
    if name == "llama3":
        prompt = ('{{- if and $last (ne .Role "assistant") }}'
                  "<|start_header_id|>assistant<|end_header_id|>\n\n{{ end }}\n")
        if system_header is None:
            return _loop("<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>\n" + prompt)
        header = (FIND_SYSTEM + "<|start_header_id|>system<|end_header_id|>\n\n" + _go_text(system_header)
                  + "{{ $system }}<|eot_id|>")
        return header + _loop(
            '{{- if ne .Role "system" }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>'
            "{{ end }}\n" + prompt)
    if name == "gemma":
        return (FIND_SYSTEM + "\n{{- $first := true }}\n" + _loop(
            '{{- if ne .Role "system" }}<start_of_turn>'
            '{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}{{ end }}\n'
            "{{ if $first }}{{ if $system }}{{ $system }}\n\n{{ end }}{{ $first = false }}{{ end }}"
            "{{ .Content }}<end_of_turn>\n{{ end }}\n"
            '{{- if and $last (ne .Role "assistant") }}<start_of_turn>model\n{{ end }}\n'))
    if name == "phi3":
        return _loop("<|{{ .Role }}|>\n{{ .Content }}<|end|>\n"
                     '{{ if and $last (ne .Role "assistant") }}<|assistant|>\n{{ end }}\n')
    if name == "mistral":  # the system message goes with the last user message, as Mistral v0.3 does
        return (FIND_SYSTEM + '\n{{- $lastUser := -1 }}{{- range $i, $m := .Messages }}{{ if eq $m.Role "user" }}'
                "{{ $lastUser = $i }}{{ end }}{{ end }}\n"
                '{{- range $i, $_ := .Messages }}\n{{- if eq .Role "user" }}[INST] '
                "{{ if and $system (eq $i $lastUser) }}{{ $system }}\n\n{{ end }}{{ .Content }}[/INST]\n"
                '{{- else if eq .Role "assistant" }}{{ .Content }}</s>\n{{- end }}\n{{- end }}')
    raise ValueError(f"no Go template for family {name}")


def _go_text(text: str) -> str:
    """Literal text inside a Go template: braces are the only thing it could mistake for actions."""
    return text.replace("{{", '{{ "{{" }}')


def detect_family(chat_template: str | None) -> TemplateFamily | ToolFamily:
    if not chat_template:
        raise ForgeError(Codes.UNSUPPORTED_TEMPLATE, "the model has no chat template",
                         f"train with chat_template= a family ({', '.join(BY_NAME)}) or a .jinja file, or start "
                         "from an instruct model")
    tools = tool_family_of(chat_template)  # before the markers: a tools template has its plain family's too
    if tools is not None:
        return tools
    for family in FAMILIES:
        if all(m in chat_template for m in family.markers):
            return family
    seen = sorted(set(re.findall(r"<[|a-z_]{2,}[|]?>|\[/?INST\]", chat_template)))[:8]
    raise ForgeError(
        Codes.UNSUPPORTED_TEMPLATE,
        f"unknown chat-template family: none of {', '.join(f.name for f in FAMILIES)} matches "
        f"(tokens seen in the template: {', '.join(seen) or 'none'})",
        "pass template= with an Ollama Go template you wrote for this model",
    )


# ---- probing a model's own template ----

PROBE_SYSTEM = "SYSTEM-PROBE-5e1f"
PROBE_USER = "USER-PROBE-9c2d"


@dataclass
class TemplatePlan:
    """How a model's Jinja template maps onto an Ollama Modelfile."""

    family: TemplateFamily | ToolFamily
    template: str  # the Go TEMPLATE
    default_system: str | None = None  # what the template says when the conversation has no system message
    system_header: str | None = None  # text it always writes in a system header
    notes: list[str] = field(default_factory=list)


def render(chat_template: str, messages: list[dict], bos: str | None = None, eos: str | None = None,
           generation_prompt: bool = True) -> str:
    """The Jinja template rendered as transformers renders it in training."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[messages], chat_template=chat_template,
                                        add_generation_prompt=generation_prompt, bos_token=bos or "",
                                        eos_token=eos or "")
    return rendered[0]


def plan(chat_template: str, bos: str | None = None, eos: str | None = None) -> TemplatePlan:
    """Detect the family and learn, by rendering, what the template adds on its own."""
    family = detect_family(chat_template)
    if isinstance(family, ToolFamily):  # Forge's own: nothing to learn by probing
        return TemplatePlan(family, family.go, notes=["the template calls tools: the TEMPLATE writes the tool "
                                                      "list, the calls and their results as the Jinja does"])
    try:
        with_system = render(chat_template, [{"role": "system", "content": PROBE_SYSTEM},
                                             {"role": "user", "content": PROBE_USER}], bos, eos)
        without = render(chat_template, [{"role": "user", "content": PROBE_USER}], bos, eos)
    except Exception:  # noqa: BLE001 - a template that refuses system messages (Gemma 2) adds nothing
        return TemplatePlan(family, go_template(family), notes=["the template takes no system message"])
    at = with_system.find(PROBE_SYSTEM)
    prefix, suffix = with_system[:at], with_system[at + len(PROBE_SYSTEM):]
    if at < 0 or not (without.startswith(prefix) and without.endswith(suffix)
                      and len(without) >= len(prefix) + len(suffix)):
        return TemplatePlan(family, go_template(family))  # a system block only when a system message is there
    default = without[len(prefix):len(without) - len(suffix)] or None
    header = None
    if family.name == "llama3":  # the system header is always there: keep its fixed text
        opening = "<|start_header_id|>system<|end_header_id|>\n\n"
        header = prefix[prefix.find(opening) + len(opening):] if opening in prefix else ""
    notes = []
    if default:
        notes.append("the template adds a default system message: the Modelfile's SYSTEM line carries it")
    if header is not None:
        notes.append("the template always writes a system header: the TEMPLATE writes it too")
    return TemplatePlan(family, go_template(family, header), default, header, notes)


# ---- base models: a template chosen by name or file ----

@dataclass
class ChosenTemplate:
    jinja: str
    source: str  # "model", "family:<name>" or "file:<path>"
    family: TemplateFamily | ToolFamily | None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.jinja.encode("utf-8")).hexdigest()


TEMPLATE_SUFFIXES = (".jinja", ".jinja2", ".j2", ".tmpl", ".txt")


def family_or_path(chat_template: str) -> str:
    """``chat_template`` as given when it names a family or reads as a path (a separator, a template
    suffix, a leading ``.`` or ``~``, or a file that exists); any other word is a family name Forge does
    not know, answered with the names it does rather than looked up as a file."""
    value = chat_template.strip()
    if value in BY_NAME:
        return value
    if any(sep in value for sep in ("/", "\\")) or value.lower().endswith(TEMPLATE_SUFFIXES) \
            or value.startswith((".", "~")) or Path(value).is_file():
        return chat_template
    close = [name for name in BY_NAME if name.lower() == value.lower()]
    raise ForgeError(Codes.INVALID_ARGUMENT, f"chat_template {value[:80]!r} is not a template family Forge knows",
                     (f"did you mean {close[0]!r}? " if close else "")
                     + f"use one of {', '.join(BY_NAME)}, or the path of a .jinja file (e.g. ./my_template.jinja)",
                     details=[f"families: {', '.join(BY_NAME)}"])


def choose(chat_template: str) -> ChosenTemplate:
    """``chat_template`` as a family name (chatml, llama3, gemma, phi3, phi4, mistral; qwen2.5, llama3.1,
    mistral-tools with tools) or a Jinja file."""
    chat_template = family_or_path(chat_template)
    if chat_template.strip() in BY_NAME:
        family = BY_NAME[chat_template.strip()]
        return ChosenTemplate(family.jinja, f"family:{family.name}", family)
    from forge.paths import read_text

    path = Path(chat_template).expanduser()
    if not path.is_file():
        raise ForgeError(Codes.INVALID_ARGUMENT, f"chat_template file {chat_template[:120]!r} does not exist",
                         f"pass an existing .jinja file, or one of the families: {', '.join(BY_NAME)}")
    jinja = read_text(path, "chat template")
    family = tool_family_of(jinja) or next((f for f in FAMILIES if all(m in jinja for m in f.markers)), None)
    return ChosenTemplate(jinja, f"file:{path.resolve()}", family)
