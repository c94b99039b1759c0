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


ModelRef = Annotated[str | None, Field(None, min_length=1, max_length=MAX_PATH_CHARS, description=(
    "A model dir or .gguf under an allowed root, or a hub id, e.g. Qwen/Qwen2.5-0.5B."))]
ChatTemplate = Annotated[str | None, Field(None, max_length=MAX_PATH_CHARS, description=(
    "chatml, llama3, gemma, phi3, phi4, mistral, (tools:) qwen2.5, llama3.1, mistral-tools, or a .jinja file."))]
DatasetPath = Annotated[str | None, Field(None, min_length=1, max_length=MAX_PATH_CHARS, description=(
    "JSONL under an allowed root:\nalpaca {instruction, output}\nmessages {messages, tools?}\n"
    "prompt_completion {prompt, completion}\npreference {prompt, chosen, rejected}\nsharegpt {conversations, tools?}"))]
AS_TRAIN = "As forge_train's."  # an argument a tool shares with forge_train, described there once
RequestId = Annotated[str | None, Field(None, min_length=1, max_length=MAX_ID_CHARS, description=(
    "Retry key: same key, same job."))]
Text = Annotated[str | None, Field(None, max_length=MAX_TEXT_CHARS)]
QuantName = Annotated[str, Field(max_length=16)]  # the names themselves are checked against llama.cpp's
Quantizations = Annotated[list[QuantName] | None, Field(None, min_length=1, max_length=8, description=(
    "Besides f16; default [\"Q4_K_M\"]; e.g. Q8_0, Q3_K_M; [\"auto\"]: the smallest within max_kld."))]
MaxKld = Annotated[float | None, Field(None, gt=0, le=10, description=(
    "auto's budget: mean KL divergence from the f16; default 0.05."))]


def template_arg(chat_template: str | None) -> str | None:
    """A chat template family's name as it is; a Jinja file checked against the roots."""
    from forge.paths import check_path
    from forge.templates import BY_NAME, family_or_path

    if not chat_template:
        return chat_template
    chat_template = family_or_path(chat_template)  # an unknown family name is answered with the known ones
    return chat_template.strip() if chat_template.strip() in BY_NAME else str(check_path(chat_template))


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"] = Field(description="Who speaks.")
    content: str = Field(max_length=MAX_TEXT_CHARS, description="What they say.")


class Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: float | None = Field(None, ge=0, le=10, description="e.g. 0.7; 0 = greedy.")
    top_p: float | None = Field(None, gt=0, le=1, description="e.g. 0.9.")
    top_k: int | None = Field(None, gt=0, le=100_000, description="e.g. 40.")
    repeat_penalty: float | None = Field(None, gt=0, le=10, description="e.g. 1.1.")
    num_ctx: int | None = Field(None, gt=0, le=1_048_576, description="Context window in tokens, e.g. 4096.")
    num_predict: int | None = Field(None, ge=-1, le=1_048_576, description="Tokens to generate; -1 = no limit.")
