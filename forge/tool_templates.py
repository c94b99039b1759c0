"""Chat-template families that call tools: each a Jinja template (what training, query and evaluation
render) and an Ollama Go TEMPLATE that renders the same prompt byte for byte, tools, calls and results
included.

- ``qwen2.5``: ChatML; the tools in a system block (the conversation's own system message first), each
  call as ``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`` after the turn's text, the results
  of a turn's calls together in one user turn, each inside ``<tool_response>``.
- ``llama3.1``: Llama 3 headers; the tools in a system turn, a calling turn holding only its calls, one
  ``{"name": ..., "parameters": ...}`` per line, each result a turn of role ``ipython``.
- ``mistral-tools``: Mistral v0.3; ``[AVAILABLE_TOOLS][...][/AVAILABLE_TOOLS]`` just before the last user
  turn, a calling turn ``[TOOL_CALLS][...]`` then ``</s>``, each result ``[TOOL_RESULTS]...[/TOOL_RESULTS]``.

Without tools, calls and results each renders exactly what its plain family (chatml, llama3, mistral)
renders. The Jinja prints a tool's ``function`` and a call's ``arguments`` as they are when they are
strings (``forge.tool_json.render_form`` makes them Ollama's JSON) and ``| tojson`` when they are objects
(llama.cpp, OpenAI-style callers). The Go TEMPLATE names ``.Tools`` and ``.ToolCalls`` and answers
``eq .Role "tool"``: Ollama then grants the model the tools capability and keeps this TEMPLATE rather than
the GGUF's Jinja; the first text inside its ``if .ToolCalls`` is what Ollama's parser looks for in a reply.

A family is recognised by its Jinja text exactly (``tool_family_of``): a published model's own tools template
(Qwen2.5's, Llama 3.1's) differs from these in wording, so only these get these Go templates.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ToolFamily:
    """A tools-capable family; the fields ``forge.templates.TemplateFamily`` has, plus its Go TEMPLATE."""

    name: str
    plain: str  # the family it renders exactly like when no tools appear
    markers: tuple[str, ...]
    stops: tuple[str, ...]  # end-of-turn tokens
    jinja: str
    special_tokens: tuple[str, ...]  # added to a base model's vocabulary (tool markers stay plain text)
    eos: str
    go: str  # the Ollama TEMPLATE
    bos: str | None = None


def _lit(text: str) -> str:
    """``text`` as a Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


# Jinja: a tool's function and a call's name/arguments, given wrapped or bare, as strings or as objects
_FUNCTION = ("{%- set fn = tool['function'] if tool['function'] is defined else tool %}"
             "{%- set fn = fn if fn is string else fn | tojson %}")
_CALL = ("{%- set call = tool_call['function'] if tool_call['function'] is defined else tool_call %}"
         "{%- set arguments = call['arguments'] if call['arguments'] is string else call['arguments'] | tojson %}")
_TOOL_JSON = "'{\"type\": \"function\", \"function\": ' + fn + '}'"
_FIRST_SYSTEM = ("{%- if messages and messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}"
                 "{%- endif %}")
# Go: the first message's text and a blank line when it is a system message (it goes with the tools)
_GO_FIRST_SYSTEM = ('{{ range $i, $m := .Messages }}{{ if and (eq $i 0) (eq $m.Role "system") }}{{ $m.Content }}'
                    "\n\n{{ end }}{{ end }}")
_GO_TOOL_JSON = '{"type": "function", "function": {{ json .Function }}}'
_GO_SKIPPED_SYSTEM = '(and $.Tools (eq $i 0) (eq .Role "system"))'  # already written with the tools


# ---- qwen2.5 ----

QWEN_TOOLS_HEAD = (
    "# Tools\n\nYou may call the functions below to help with the request. Their signatures, one JSON object "
    "per line, are inside <tools></tools>:\n<tools>")
QWEN_TOOLS_TAIL = (
    "\n</tools>\n\nTo call a function, answer with a JSON object holding its name and arguments inside "
    "<tool_call></tool_call> tags, one block per call:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <arguments-object>}\n</tool_call>')

QWEN25_JINJA = (
    "{%- set ns = namespace(results=false) %}"
    "{%- if tools %}{{- '<|im_start|>system\\n' }}" + _FIRST_SYSTEM + "{{- " + _lit(QWEN_TOOLS_HEAD) + " }}"
    "{%- for tool in tools %}" + _FUNCTION + "{{- '\\n' + " + _TOOL_JSON + " }}{%- endfor %}"
    "{{- " + _lit(QWEN_TOOLS_TAIL + "<|im_end|>\n") + " }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'tool' %}"
    "{%- if not ns.results %}{{- '<|im_start|>user' }}{%- set ns.results = true %}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- else %}"
    "{%- if ns.results %}{{- '<|im_end|>\\n' }}{%- set ns.results = false %}{%- endif %}"
    "{%- if not (tools and loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') }}"
    "{%- if message['role'] == 'assistant' and message['tool_calls'] %}"
    "{%- for tool_call in message['tool_calls'] %}" + _CALL +
    "{{- ('\\n' if message['content'] or not loop.first else '') + '<tool_call>\\n{\"name\": \"' + call['name']"
    " + '\", \"arguments\": ' + arguments + '}\\n</tool_call>' }}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if ns.results %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

QWEN25_GO = (
    "{{ if .Tools }}<|im_start|>system\n" + _GO_FIRST_SYSTEM + QWEN_TOOLS_HEAD
    + "{{ range .Tools }}\n" + _GO_TOOL_JSON + "{{ end }}" + QWEN_TOOLS_TAIL + "<|im_end|>\n{{ end }}"
    '{{ $results := false }}{{ $lastRole := "" }}'
    "{{ range $i, $m := .Messages }}"
    '{{ if eq .Role "tool" }}'
    "{{ if not $results }}<|im_start|>user{{ $results = true }}{{ end }}"
    "\n<tool_response>\n{{ .Content }}\n</tool_response>"
    "{{ else }}"
    "{{ if $results }}<|im_end|>\n{{ $results = false }}{{ end }}"
    "{{ if not " + _GO_SKIPPED_SYSTEM + " }}<|im_start|>{{ .Role }}\n{{ .Content }}"
    # the first text inside `if .ToolCalls` is the tag Ollama's parser looks for: <tool_call>
    "{{ if .ToolCalls }}{{ range $j, $c := .ToolCalls }}"
    "{{ if or $j $m.Content }}\n<tool_call>{{ else }}<tool_call>{{ end }}"
    '\n{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}\n</tool_call>'
    "{{ end }}{{ end }}<|im_end|>\n{{ end }}"
    "{{ end }}"
    "{{ $lastRole = .Role }}"
    "{{ end }}"
    "{{ if $results }}<|im_end|>\n{{ end }}"
    '{{ if ne $lastRole "assistant" }}<|im_start|>assistant\n{{ end }}'
)


# ---- llama3.1 ----

LLAMA_TOOLS_HEAD = (
    "You may call the functions below to help with the request. To call one, answer with nothing but a JSON "
    'object {"name": <function-name>, "parameters": <arguments-object>}; to call several, write one object per '
    "line. The functions, one JSON object per line:")

LLAMA31_JINJA = (
    "{{- bos_token }}"
    "{%- if tools %}{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}" + _FIRST_SYSTEM
    + "{{- " + _lit(LLAMA_TOOLS_HEAD) + " }}"
    "{%- for tool in tools %}" + _FUNCTION + "{{- '\\n' + " + _TOOL_JSON + " }}{%- endfor %}"
    "{{- '<|eot_id|>' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (tools and loop.first and message['role'] == 'system') %}"
    "{%- if message['role'] == 'tool' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' and message['tool_calls'] %}"
    "{%- for tool_call in message['tool_calls'] %}" + _CALL +
    "{{- ('\\n' if not loop.first else '') + '{\"name\": \"' + call['name'] + '\", \"parameters\": ' + arguments"
    " + '}' }}"
    "{%- endfor %}"
    "{%- else %}{{- message['content'] or '' }}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endif %}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

LLAMA31_GO = (
    "{{ if .Tools }}<|start_header_id|>system<|end_header_id|>\n\n" + _GO_FIRST_SYSTEM + LLAMA_TOOLS_HEAD
    + "{{ range .Tools }}\n" + _GO_TOOL_JSON + "{{ end }}<|eot_id|>{{ end }}"
    '{{ $lastRole := "" }}'
    "{{ range $i, $m := .Messages }}"
    "{{ if not " + _GO_SKIPPED_SYSTEM + " }}"
    '{{ if eq .Role "tool" }}<|start_header_id|>ipython<|end_header_id|>\n\n{{ .Content }}<|eot_id|>'
    "{{ else }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
    # a calling turn holds only its calls: Ollama's parser reads a reply that starts with "{" as calls
    "{{ if .ToolCalls }}{{ range $j, $c := .ToolCalls }}{{ if $j }}\n{{ end }}"
    '{"name": "{{ .Function.Name }}", "parameters": {{ .Function.Arguments }}}{{ end }}'
    "{{ else }}{{ .Content }}{{ end }}<|eot_id|>"
    "{{ end }}{{ end }}"
    "{{ $lastRole = .Role }}"
    "{{ end }}"
    '{{ if ne $lastRole "assistant" }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ end }}'
)


# ---- mistral-tools ----

MISTRAL_TOOLS_JINJA = (
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- set turns = messages[1:] %}{%- else %}{%- set system = '' %}{%- set turns = messages %}{%- endif %}"
    "{%- set ns = namespace(last=-1) %}{%- for m in turns %}{%- if m['role'] == 'user' %}"
    "{%- set ns.last = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in turns %}"
    "{%- if m['role'] == 'user' %}"
    "{%- if tools and loop.index0 == ns.last %}{{- '[AVAILABLE_TOOLS][' }}"
    "{%- for tool in tools %}" + _FUNCTION + "{{- (', ' if not loop.first else '') + " + _TOOL_JSON + " }}"
    "{%- endfor %}{{- '][/AVAILABLE_TOOLS]' }}{%- endif %}"
    "{{- '[INST] ' + (system + '\\n\\n' if system and loop.index0 == ns.last else '') + m['content'] + '[/INST]' }}"
    "{%- elif m['role'] == 'assistant' %}"
    "{%- if m['tool_calls'] %}{{- '[TOOL_CALLS][' }}"
    "{%- for tool_call in m['tool_calls'] %}" + _CALL +
    "{{- (', ' if not loop.first else '') + '{\"name\": \"' + call['name'] + '\", \"arguments\": ' + arguments"
    " + '}' }}"
    "{%- endfor %}{{- ']' }}"
    "{%- else %}{{- m['content'] or '' }}{%- endif %}{{- eos_token }}"
    "{%- elif m['role'] == 'tool' %}{{- '[TOOL_RESULTS]' + m['content'] + '[/TOOL_RESULTS]' }}"
    "{%- endif %}"
    "{%- endfor %}"
)

MISTRAL_TOOLS_GO = (
    '{{ $system := "" }}{{ range .Messages }}{{ if eq .Role "system" }}{{ $system = .Content }}{{ end }}{{ end }}'
    '{{ $lastUser := -1 }}{{ range $i, $m := .Messages }}{{ if eq $m.Role "user" }}{{ $lastUser = $i }}{{ end }}'
    "{{ end }}"
    "{{ range $i, $m := .Messages }}"
    '{{ if eq .Role "user" }}'
    "{{ if and $.Tools (eq $i $lastUser) }}[AVAILABLE_TOOLS]["
    "{{ range $j, $t := $.Tools }}{{ if $j }}, {{ end }}" + _GO_TOOL_JSON + "{{ end }}][/AVAILABLE_TOOLS]{{ end }}"
    "[INST] {{ if and $system (eq $i $lastUser) }}{{ $system }}\n\n{{ end }}{{ .Content }}[/INST]"
    '{{ else if eq .Role "assistant" }}'
    "{{ if .ToolCalls }}[TOOL_CALLS][{{ range $j, $c := .ToolCalls }}{{ if $j }}, {{ end }}"
    '{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}{{ end }}]'
    "{{ else }}{{ .Content }}{{ end }}</s>"
    '{{ else if eq .Role "tool" }}[TOOL_RESULTS]{{ .Content }}[/TOOL_RESULTS]'
    "{{ end }}"
    "{{ end }}"
)


TOOL_FAMILIES: tuple[ToolFamily, ...] = (
    ToolFamily(name="qwen2.5", plain="chatml", markers=("<|im_start|>", "<|im_end|>", "<tool_call>"),
               stops=("<|im_end|>",), jinja=QWEN25_JINJA, special_tokens=("<|im_start|>", "<|im_end|>"),
               eos="<|im_end|>", go=QWEN25_GO),
    ToolFamily(name="llama3.1", plain="llama3", markers=("<|start_header_id|>", "<|eot_id|>", "ipython"),
               stops=("<|eot_id|>", "<|eom_id|>"), jinja=LLAMA31_JINJA,
               special_tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
               eos="<|eot_id|>", go=LLAMA31_GO, bos="<|begin_of_text|>"),
    ToolFamily(name="mistral-tools", plain="mistral", markers=("[INST]", "[/INST]", "[TOOL_CALLS]"),
               stops=("[INST]", "</s>"), jinja=MISTRAL_TOOLS_JINJA,
               special_tokens=("<s>", "</s>", "[INST]", "[/INST]"), eos="</s>", go=MISTRAL_TOOLS_GO, bos="<s>"),
)
TOOLS_BY_NAME = {f.name: f for f in TOOL_FAMILIES}


def tool_family_of(chat_template: str | None) -> ToolFamily | None:
    """The tools family whose Jinja ``chat_template`` is (as Forge wrote it), or None."""
    if not chat_template:
        return None
    text = chat_template.strip()
    return next((f for f in TOOL_FAMILIES if f.jinja.strip() == text), None)


# ---- reading the calls back out of a reply ----

def _call(obj, arguments_key: str) -> dict | None:
    """``{"name", "arguments": dict}`` from a decoded call object, or None when it is not one. Arguments may
    come as an object or as a JSON string of one (some models write them so); none at all means {}."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    arguments = obj.get(arguments_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    return {"name": obj["name"], "arguments": arguments} if isinstance(arguments, dict) else None


def _qwen_calls(text: str) -> tuple[str, list[dict], int]:
    calls, unparsed = [], 0
    for body in _QWEN_BLOCK.findall(text):
        try:
            call = _call(json.loads(body), "arguments")
        except ValueError:
            call = None
        if call is None:
            unparsed += 1
        else:
            calls.append(call)
    return _QWEN_BLOCK.sub("", text).strip(), calls, unparsed


def _llama_calls(text: str) -> tuple[str, list[dict], int]:
    """Calls are the JSON objects a reply starts with, one after another; what follows them is text."""
    calls, unparsed, at = [], 0, 0
    decoder = json.JSONDecoder()
    text = text.strip()
    while True:
        while at < len(text) and text[at] in " \t\r\n;":
            at += 1
        if at >= len(text) or text[at] != "{":
            break
        try:
            obj, end = decoder.raw_decode(text, at)
        except ValueError:
            unparsed += 1
            break
        call = _call(obj, "parameters")
        if call is None:
            unparsed += 1
            break
        calls.append(call)
        at = end
    return text[at:].strip(), calls, unparsed


def _mistral_calls(text: str) -> tuple[str, list[dict], int]:
    """Each ``[TOOL_CALLS]`` is followed by a JSON array of calls; the text around them is the content."""
    calls, unparsed, content = [], 0, []
    decoder = json.JSONDecoder()
    while (at := text.find(MISTRAL_CALLS)) >= 0:
        content.append(text[:at])
        rest = text[at + len(MISTRAL_CALLS):].lstrip()
        try:
            listed, end = decoder.raw_decode(rest)
        except ValueError:
            unparsed += 1
            text = ""
            break
        for obj in listed if isinstance(listed, list) else [listed]:
            call = _call(obj, "arguments")
            if call is None:
                unparsed += 1
            else:
                calls.append(call)
        text = rest[end:]
    content.append(text)
    return "".join(content).strip(), calls, unparsed


_QWEN_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.S)  # the last one may be cut off
MISTRAL_CALLS = "[TOOL_CALLS]"
_PARSERS = {"qwen2.5": _qwen_calls, "llama3.1": _llama_calls, "mistral-tools": _mistral_calls}


def parse_calls(family_name: str, text: str) -> tuple[str, list[dict], int]:
    """A reply in a tools family's syntax as (content, calls, unparsed): the text outside the calls
    (stripped), each call ``{"name", "arguments": dict}``, and how many call blocks did not read as a call
    (JSON that does not parse, or an object without a name or with arguments that are not an object).
    A family without tools syntax has no calls: its reply is all content."""
    parser = _PARSERS.get(family_name)
    return parser(text) if parser else (text.strip(), [], 0)
