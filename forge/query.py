"""Ask a model something through its chat template: llama-cpp-python on a GGUF, or a running Ollama
when OLLAMA_HOST is set and Ollama has the model."""

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
    return {"model": str(gguf), **query(gguf, messages, config.max_tokens, config.temperature)}


def query(gguf: Path | None, messages: list[dict], max_tokens: int = 64, temperature: float = 0.0,
          ollama_model: str | None = None) -> dict:
    host = os.environ.get("OLLAMA_HOST")
    if host and ollama_model and ollama_has(host, ollama_model):
        return _ollama_chat(host, ollama_model, messages, max_tokens, temperature)
    if gguf is None:
        raise ForgeError(Codes.MODEL_NOT_FOUND,
                         f"{ollama_model!r} is neither a GGUF path, a job id, nor a model Ollama has"
                         + ("" if host else " (OLLAMA_HOST is not set)"),
                         "pass a .gguf path or a quantize/pipeline job id, or `ollama create` the model first")
    check_gguf(gguf)
    from forge.quantize import load_llama

    try:
        llm = load_llama(gguf, n_ctx=2048)
    except ValueError as exc:  # llama-cpp-python's "Failed to load model from file"
        raise ForgeError(Codes.GGUF_INVALID, f"llama.cpp cannot load {gguf}: {str(exc)[:200]}",
                         "pass a .gguf written by forge quantize (or llama.cpp), whole and unmodified") from None
    out = llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=temperature)
    choice = out["choices"][0]
    return {"reply": choice["message"]["content"], "finish_reason": choice["finish_reason"],
            "prompt_tokens": out["usage"]["prompt_tokens"], "completion_tokens": out["usage"]["completion_tokens"],
            "backend": "llama-cpp-python"}


def _base(host: str) -> str:
    return host.rstrip("/") if host.startswith("http") else f"http://{host.rstrip('/')}"


def ollama_has(host: str, model: str) -> bool:
    import requests

    try:
        return requests.post(f"{_base(host)}/api/show", json={"model": model}, timeout=10).status_code == 200
    except requests.RequestException:
        return False


def _ollama_chat(host: str, model: str, messages: list[dict], max_tokens: int, temperature: float) -> dict:
    import requests

    resp = requests.post(f"{_base(host)}/api/chat", timeout=300, json={
        "model": model, "messages": messages, "stream": False,
        "options": {"num_predict": max_tokens, "temperature": temperature}})
    if resp.status_code != 200:
        raise ForgeError(Codes.MODEL_NOT_FOUND, f"Ollama at {host} answered {resp.status_code}: {resp.text[:200]}",
                         "check the model name with `ollama list`")
    data = resp.json()
    return {"reply": data["message"]["content"], "finish_reason": data.get("done_reason"),
            "prompt_tokens": data.get("prompt_eval_count", 0), "completion_tokens": data.get("eval_count", 0),
            "backend": "ollama"}
