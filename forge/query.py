"""Ask a model something through its chat template: llama-cpp-python on a GGUF, or a running Ollama
when OLLAMA_HOST is set and Ollama has the model.

With tools, the GGUF's own Jinja template renders the prompt with the tool list exactly as training rendered
it (transformers' renderer, Forge's Ollama-shaped JSON), llama.cpp completes it, and the reply's calls are
parsed with the syntax of the template's family: the reply comes back as text and as calls (name + arguments).
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field

from forge.config import StageConfig
from forge.errors import Codes, ForgeError
from forge.modelfile import check_gguf


class QueryConfig(StageConfig):
    model: Path = Field(description="A .gguf file, or a run dir (its last GGUF: the most quantized).")
    prompt: str = Field("Hello", description="The user message.")
    system: str | None = Field(None, description="A system message before it.")
    max_tokens: int = Field(64, gt=0, le=8192, description="Tokens to generate at most.")
    temperature: float = Field(0.0, ge=0, le=10, description="Sampling temperature; 0 = greedy.")
    tools: Path | None = Field(None, description=(
        "A JSON file holding the tool list (OpenAI-style function tools) the model may call; the reply then "
        "carries the parsed calls."))


def gguf_of(model: Path) -> Path:
    """A GGUF itself, or the last GGUF a run's quantize stage wrote."""
    from forge.runs import find_run_dir, load_stages

    model = Path(model)
    if model.is_dir():
        run_dir = find_run_dir(model)
        outputs = (load_stages(run_dir).get("quantize") or {}).get("outputs") if run_dir else None
        if not outputs:
            raise ForgeError(Codes.GGUF_NOT_FOUND, f"{model} is not a run dir with GGUFs",
                             "pass a .gguf, or a run dir after forge quantize")
        return Path(outputs[-1]["path"])
    return model


def run_query(config: QueryConfig) -> dict:
    """``forge query``: one question to a GGUF through its chat template, as forge_query_model asks it."""
    messages = ([{"role": "system", "content": config.system}] if config.system else []) + [
        {"role": "user", "content": config.prompt}]
    gguf = gguf_of(config.model)
    tools = None
    if config.tools is not None:
        import json

        from forge.paths import read_text

        try:
            tools = json.loads(read_text(config.tools, "tool list"))
        except json.JSONDecodeError as exc:
            raise ForgeError(Codes.INVALID_ARGUMENT, f"{config.tools} is not JSON ({exc.msg} at line {exc.lineno})",
                             "pass a file holding a JSON list of tools") from None
    return {"model": str(gguf), **query(gguf, messages, config.max_tokens, config.temperature, tools=tools)}


def query(gguf: Path | None, messages: list[dict], max_tokens: int = 64, temperature: float = 0.0,
          ollama_model: str | None = None, tools: list | None = None, llm=None) -> dict:
    """One chat turn; ``llm``: a loaded GGUF (``load_llama``) to reuse across many questions."""
    host = os.environ.get("OLLAMA_HOST")
    if tools is not None:
        tools = checked_tools(tools)
    if host and ollama_model and ollama_has(host, ollama_model):
        return _ollama_chat(host, ollama_model, messages, max_tokens, temperature, tools)
    if gguf is None:
        raise ForgeError(Codes.MODEL_NOT_FOUND,
                         f"{ollama_model!r} is neither a GGUF path, a job id, nor a model Ollama has"
                         + ("" if host else " (OLLAMA_HOST is not set)"),
                         "pass a .gguf path or a quantize/pipeline job id, or `ollama create` the model first")
    if llm is None:
        llm = loaded(gguf, 4096 if tools else 2048)
    if tools is not None:
        return query_with_tools(llm, gguf, messages, tools, max_tokens, temperature)
    try:
        out = llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=temperature)
    except RuntimeError as exc:
        if "llama_decode" not in str(exc):
            raise
        # llama-cpp-python counts max_tokens in pieces of whole UTF-8 text: a model emitting byte tokens that never
        # complete a character generates until the context is full. That answer never stopped.
        used = llm.n_tokens
        llm.reset()  # the next question starts from an empty context
        return {"reply": "", "finish_reason": "length", "prompt_tokens": 0, "completion_tokens": used,
                "backend": "llama-cpp-python"}
    choice = out["choices"][0]
    return {"reply": choice["message"]["content"], "finish_reason": choice["finish_reason"],
            "prompt_tokens": out["usage"]["prompt_tokens"], "completion_tokens": out["usage"]["completion_tokens"],
            "backend": "llama-cpp-python"}


def loaded(gguf: Path, n_ctx: int = 2048):
    """A GGUF loaded in llama.cpp, checked first; one that will not load is gguf_invalid."""
    check_gguf(gguf)
    from forge.quantize import load_llama

    try:
        return load_llama(gguf, n_ctx=n_ctx)
    except ValueError as exc:  # llama-cpp-python's "Failed to load model from file"
        raise ForgeError(Codes.GGUF_INVALID, f"llama.cpp cannot load {gguf}: {str(exc)[:200]}",
                         "pass a .gguf written by forge quantize (or llama.cpp), whole and unmodified") from None


def _base(host: str) -> str:
    return host.rstrip("/") if host.startswith("http") else f"http://{host.rstrip('/')}"


def ollama_has(host: str, model: str) -> bool:
    import requests

    try:
        return requests.post(f"{_base(host)}/api/show", json={"model": model}, timeout=10).status_code == 200
    except requests.RequestException:
        return False


def _ollama_chat(host: str, model: str, messages: list[dict], max_tokens: int, temperature: float,
                 tools: list | None = None) -> dict:
    import requests

    resp = requests.post(f"{_base(host)}/api/chat", timeout=300, json={
        "model": model, "messages": messages, "stream": False, **({"tools": tools} if tools is not None else {}),
        "options": {"num_predict": max_tokens, "temperature": temperature}})
    if resp.status_code == 400 and tools is not None and "tools" in resp.text:
        raise ForgeError(Codes.UNSUPPORTED_TEMPLATE, f"Ollama at {host} answered: {resp.text[:200]}",
                         "create the model from a Modelfile Forge wrote for a tools family (its TEMPLATE has .Tools)")
    if resp.status_code != 200:
        raise ForgeError(Codes.MODEL_NOT_FOUND, f"Ollama at {host} answered {resp.status_code}: {resp.text[:200]}",
                         "check the model name with `ollama list`")
    data = resp.json()
    calls = [{"name": c["function"]["name"], "arguments": c["function"].get("arguments") or {}}
             for c in data["message"].get("tool_calls") or []]
    return {"reply": data["message"]["content"], "finish_reason": data.get("done_reason"),
            "prompt_tokens": data.get("prompt_eval_count", 0), "completion_tokens": data.get("eval_count", 0),
            "backend": "ollama", **({"tool_calls": calls, "unparsed_calls": 0} if tools is not None else {})}


def checked_tools(tools) -> list[dict]:
    """A caller's tool list, checked as a dataset's would be and put in canonical form."""
    from forge.tool_calls import canonical_tools, tools_problems

    problems = tools_problems(tools)
    if problems:
        raise ForgeError(Codes.INVALID_ARGUMENT, "the tool list is not valid: " + "; ".join(problems[:5]),
                         'pass a list of {"type": "function", "function": {"name", "description", "parameters"}}')
    return canonical_tools(tools)


def query_with_tools(llm, gguf: Path, messages: list[dict], tools: list[dict], max_tokens: int,
                     temperature: float, chat_template: str | None = None) -> dict:
    """The prompt rendered by the GGUF's Jinja template (or ``chat_template``: a base model asked the way its
    fine-tune is) with the tools, completed raw, and the calls parsed."""
    from forge.modelfile import gguf_tokens
    from forge.tool_templates import tool_family_of

    jinja = chat_template or gguf_tokens(gguf)["chat_template"]
    family = tool_family_of(jinja)
    if family is None:
        raise ForgeError(Codes.UNSUPPORTED_TEMPLATE, f"{gguf.name}'s chat template has no tools syntax Forge knows",
                         "train with chat_template= a tools-capable family (qwen2.5, llama3.1, mistral-tools)")
    prompt = render_with_tools(jinja, messages, tools, family.eos)
    try:
        out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=temperature, stop=list(family.stops))
    except ValueError as exc:  # llama-cpp-python: the prompt and max_tokens exceed the context window
        raise ForgeError(Codes.INVALID_ARGUMENT, f"the prompt does not fit the model's context: {str(exc)[:200]}",
                         "declare fewer or shorter tools, send fewer messages, or lower max_tokens") from None
    choice = out["choices"][0]
    return {"reply": choice["text"], "finish_reason": choice["finish_reason"], **parsed_reply(family, choice["text"]),
            "prompt_tokens": out["usage"]["prompt_tokens"], "completion_tokens": out["usage"]["completion_tokens"],
            "backend": "llama-cpp-python"}


def render_with_tools(jinja: str, messages: list[dict], tools: list[dict], eos: str) -> str:
    """The generation prompt as training rendered it (BOS left to llama.cpp, which adds it; the family's EOS
    after earlier turns, as training wrote it)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from forge.records import Conversation
    from forge.tool_json import render_form

    shown, shown_tools = render_form(Conversation(messages, tools))
    rendered, _ = render_jinja_template(conversations=[shown], tools=shown_tools, chat_template=jinja,
                                        add_generation_prompt=True, bos_token="", eos_token=eos)
    return rendered[0]


def parsed_reply(family, text: str) -> dict:
    from forge.tool_templates import parse_calls

    content, calls, unparsed = parse_calls(family.name, text)
    return {"reply": content, "tool_calls": calls, "unparsed_calls": unparsed}
