"""Argument types tools share: every one bounded (an agent's input is untrusted) and described."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from forge.paths import MAX_NAME_CHARS, MAX_PATH_CHARS

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
HUB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$"
MAX_TEXT_CHARS = 100_000  # a system prompt or a message: long enough for any real one
MAX_ID_CHARS = 200


def path_arg(description: str):
    return Field(min_length=1, max_length=MAX_PATH_CHARS, description=description)


def name_arg(description: str):
    return Field(None, max_length=MAX_NAME_CHARS, pattern=NAME_PATTERN, description=description)


ModelRef = Annotated[str, Field(min_length=1, max_length=MAX_PATH_CHARS, description=(
    "The base model: a local model dir (config.json inside) under an allowed root, e.g. /data/models/Qwen2.5-0.5B, "
    "or a Hugging Face hub id owner/name, e.g. Qwen/Qwen2.5-0.5B-Instruct."))]
DatasetPath = Annotated[str, path_arg(
    "A JSONL dataset under an allowed root (alpaca, messages or prompt/completion records), e.g. "
    "/data/datasets/support.jsonl. It is copied and checked when the job is submitted.")]
RequestId = Annotated[str | None, Field(None, min_length=1, max_length=MAX_ID_CHARS, description=(
    "Retry key: the same key on the same tool returns the job it first started instead of a new one."))]
Text = Annotated[str | None, Field(None, max_length=MAX_TEXT_CHARS)]
QuantName = Annotated[str, Field(min_length=1, max_length=16, pattern=r"^[A-Za-z0-9_]+$")]
Quantizations = Annotated[list[QuantName] | None, Field(None, min_length=1, max_length=8, description=(
    "llama.cpp quant types to make from the f16 GGUF, e.g. [\"Q4_K_M\", \"Q8_0\"]; default [\"Q4_K_M\"]. "
    "Known: Q2_K, Q3_K_S/M/L, Q4_0, Q4_1, Q4_K_S, Q4_K_M, Q5_0, Q5_1, Q5_K_S, Q5_K_M, Q6_K, Q8_0."))]


class Message(BaseModel):
    """One chat message."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"] = Field(description="Who speaks: system, user or assistant.")
    content: str = Field(max_length=MAX_TEXT_CHARS, description="What they say.")


class Sampling(BaseModel):
    """Sampling parameters written into a Modelfile as PARAMETER lines; unset ones are left out."""

    model_config = ConfigDict(extra="forbid")
    temperature: float | None = Field(None, ge=0, le=10, description="Sampling temperature, e.g. 0.7; 0 = greedy.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass, e.g. 0.9.")
    top_k: int | None = Field(None, gt=0, le=100_000, description="Sample from the k likeliest tokens, e.g. 40.")
    repeat_penalty: float | None = Field(None, gt=0, le=10, description="Repetition penalty, e.g. 1.1.")
    num_ctx: int | None = Field(None, gt=0, le=1_048_576, description="Context window in tokens, e.g. 4096.")
    num_predict: int | None = Field(None, ge=-1, le=1_048_576, description="Tokens to generate at most; -1 = "
                                                                           "no limit.")
