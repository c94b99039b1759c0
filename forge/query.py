"""Ask a GGUF something through its chat template: llama-cpp-python, or a running Ollama when
OLLAMA_HOST is set and the model is there."""

from __future__ import annotations

import os
from pathlib import Path

from forge.modelfile import check_gguf


def query(gguf: Path, messages: list[dict], max_tokens: int = 64, temperature: float = 0.0,
          ollama_model: str | None = None) -> dict:
    host = os.environ.get("OLLAMA_HOST")
    if host and ollama_model:
        reply = _ollama(host, ollama_model, messages, max_tokens, temperature)
        if reply is not None:
            return reply
    check_gguf(gguf)
    from forge.quantize import load_llama

    llm = load_llama(gguf, n_ctx=2048)
    out = llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=temperature)
    choice = out["choices"][0]
    return {"reply": choice["message"]["content"], "finish_reason": choice["finish_reason"],
            "prompt_tokens": out["usage"]["prompt_tokens"], "completion_tokens": out["usage"]["completion_tokens"],
            "backend": "llama-cpp-python"}


def _ollama(host: str, model: str, messages: list[dict], max_tokens: int, temperature: float) -> dict | None:
    import requests

    base = host if host.startswith("http") else f"http://{host}"
    try:
        resp = requests.post(f"{base}/api/chat", timeout=120, json={
            "model": model, "messages": messages, "stream": False,
            "options": {"num_predict": max_tokens, "temperature": temperature}})
    except requests.RequestException:
        return None
    if resp.status_code != 200:
        return None
    data = resp.json()
    return {"reply": data["message"]["content"], "finish_reason": data.get("done_reason"),
            "prompt_tokens": data.get("prompt_eval_count", 0), "completion_tokens": data.get("eval_count", 0),
            "backend": "ollama"}
