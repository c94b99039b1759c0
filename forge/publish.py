"""Publish an adapter, a merged model or GGUFs to the Hugging Face Hub, with a model card written
from the run's seal. The token comes only from HF_TOKEN or the huggingface_hub login, and never
appears in a result, a log or a seal."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from forge.config import StageConfig
from forge.errors import Codes, ForgeError
from forge.paths import check_input_dir, open_input, read_text
from forge.progress import ProgressCallback, ProgressWriter
from forge.runs import Outcome

LIBRARY = {"adapter": "peft", "merged": "transformers", "gguf": "gguf"}
SKIP = {"README.md", "progress.jsonl", "convert.log", "quantize.log"}


class PublishConfig(StageConfig):
    source: Path = Field(description="Adapter dir, merged model dir, or a GGUF file / gguf dir.")
    repo_id: str = Field(description="Hub repo, owner/name.")
    kind: Literal["adapter", "merged", "gguf"] = Field("adapter", description="What source holds.")
    private: bool = Field(True, description="Create the repo private.")
    dry_run: bool = Field(False, description="Return the exact plan without contacting the Hub.")
    license: str = Field("other", description="License id for the model card.")
    commit_message: str | None = Field(None, description="Commit message; default names the kind and run.")

    @field_validator("repo_id")
    @classmethod
    def _owner_name(cls, value: str) -> str:
        if value.count("/") != 1 or not all(value.split("/")):
            raise ValueError("repo_id must look like owner/name")
        return value


def _files(config: PublishConfig) -> list[Path]:
    source = Path(config.source)
    if not source.exists():
        raise ForgeError(Codes.MODEL_NOT_FOUND, f"{source} does not exist",
                         "pass the adapter dir, merged dir, or GGUF written by forge")
    if source.is_dir():
        check_input_dir(source, "source")  # confined: no link in it may lead outside the roots
    if config.kind == "gguf":
        # an importance matrix is statistics of the training data, not a model: it is not published
        files = [source] if source.is_file() else sorted(
            p for p in source.glob("*.gguf") if not p.name.endswith(".imatrix.gguf")) + sorted(source.glob("Modelfile"))
        if not any(f.suffix == ".gguf" for f in files):
            raise ForgeError(Codes.GGUF_NOT_FOUND, f"no .gguf file in {source}", "pass a .gguf or the gguf dir")
        return files
    marker = "adapter_config.json" if config.kind == "adapter" else "config.json"
    if not (source / marker).is_file():
        raise ForgeError(Codes.MODEL_NOT_FOUND, f"{source} has no {marker}, so it is not a {config.kind} dir",
                         "check kind and source")
    return sorted(p for p in source.rglob("*") if p.is_file() and p.name not in SKIP and not p.name.startswith("."))


def planned_files(config: PublishConfig) -> list[dict]:
    """What a publish uploads, each file's path in the repo and size, the model card (README.md) last: what a
    person is shown to confirm before anything leaves the machine."""
    source = Path(config.source)
    root = source if source.is_dir() else source.parent
    return [{"path_in_repo": f.relative_to(root).as_posix(), "bytes": f.stat().st_size} for f in _files(config)] \
        + [{"path_in_repo": "README.md", "bytes": None}]


def _seal_for(source: Path) -> dict | None:
    """The newest seal covering the run that source belongs to."""
    from forge.runs import find_run_dir
    from forge.seal import seal_dirs

    run_dir = find_run_dir(source if source.is_dir() else source.parent) or find_run_dir(source)
    if run_dir is None:
        return None
    for seal_dir in seal_dirs():
        record = json.loads(read_text(seal_dir / "seal.json", "seal record"))
        for run in record.get("runs", []):
            if run["run_dir"] == str(run_dir):
                return {"id": read_text(seal_dir / "seal.sha256", "seal id").strip(), "record": record,
                        "run": run}
    return None


def model_card(config: PublishConfig, files: list[Path]) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    from forge.retrospective import results_table

    sealed = _seal_for(Path(config.source))
    run = sealed["run"] if sealed else {}
    base = (run.get("base_model") or {}).get("ref")
    dataset = (run.get("dataset") or {}).get("path")
    data = ModelCardData(
        base_model=base if base and "/" in base and not Path(base).exists() else None,
        library_name=LIBRARY[config.kind], license=config.license,
        tags=["forge", "lora" if config.kind == "adapter" else config.kind, run.get("method") or "sft"],
        datasets=[dataset] if dataset and "/" in dataset and not Path(dataset).exists() else None,
    )
    name = config.repo_id.split("/")[1]
    gguf = next((f.name for f in files if f.suffix == ".gguf" and "Q4" in f.name),
                next((f.name for f in files if f.suffix == ".gguf"), None))
    body = [f"# {name}", "", f"Fine-tuned with Forge ({run.get('method') or 'LoRA'}) from `{base or 'unknown base'}`."]
    if sealed:
        body += ["", f"Sealed run record: `{sealed['id']}`.", "", "## Results", "",
                 results_table(run, sealed["record"].get("hardware", {}))]
    body += ["", "## How to run it", ""]
    if gguf:
        body += ["With Ollama (the Modelfile sets the chat template and stop tokens):", "", "```bash",
                 f"huggingface-cli download {config.repo_id} --local-dir {name}", f"cd {name}",
                 f"ollama create {name.lower()} -f Modelfile", f"ollama run {name.lower()}", "```", "",
                 "With llama.cpp:", "", "```bash", f"llama-cli -m {gguf} -cnv", "```"]
    elif config.kind == "adapter":
        body += ["```python", "from peft import AutoPeftModelForCausalLM",
                 f'model = AutoPeftModelForCausalLM.from_pretrained("{config.repo_id}")', "```"]
    else:
        body += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                 f'model = AutoModelForCausalLM.from_pretrained("{config.repo_id}")',
                 f'tokenizer = AutoTokenizer.from_pretrained("{config.repo_id}")', "```"]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n"))


def _hub_token() -> str:
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise ForgeError(Codes.HUB_AUTH_MISSING, "no Hugging Face token: HF_TOKEN is unset and no login is stored",
                         "export HF_TOKEN=hf_… (a token with write access), or run `hf auth login`")
    return token


def publish(config: PublishConfig, on_progress: ProgressCallback | None = None) -> dict:
    from huggingface_hub import CommitOperationAdd, HfApi

    files = _files(config)
    source = Path(config.source)
    root = source if source.is_dir() else source.parent
    card = model_card(config, files)
    plan_files = [{"path_in_repo": f.relative_to(root).as_posix(), "bytes": f.stat().st_size} for f in files]
    plan_files.append({"path_in_repo": "README.md", "bytes": len(card.encode("utf-8"))})
    message = config.commit_message or f"Upload {config.kind} from Forge run {root.parent.name}"
    plan = {"repo_id": config.repo_id, "private": config.private, "kind": config.kind, "files": plan_files,
            "total_bytes": sum(f["bytes"] for f in plan_files), "commit_message": message, "model_card": card}
    if config.dry_run:
        return {"status": Outcome.SUCCEEDED, "dry_run": True, "plan": plan}
    token = _hub_token()
    writer = ProgressWriter(None, on_progress)
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    try:
        writer.stage("creating_repo", step=0, total_steps=2)
        repo_url = api.create_repo(config.repo_id, private=config.private, exist_ok=True, repo_type="model")
        writer.stage("uploading", step=1, total_steps=2)
        with contextlib.ExitStack() as opened:
            # Each file is uploaded from the descriptor that was checked, never reopened by name.
            operations = [CommitOperationAdd(path_in_repo=f.relative_to(root).as_posix(),
                                             path_or_fileobj=opened.enter_context(open_input(f, "file to publish")))
                          for f in files]
            operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")))
            commit = api.create_commit(config.repo_id, operations=operations, commit_message=message,
                                       repo_type="model")
    except Exception as exc:  # huggingface_hub raises HTTP errors of several kinds
        text = str(exc).replace(token, "***")
        code = Codes.HUB_AUTH_MISSING if " 401" in text or "401 " in text else Codes.HUB_ERROR
        raise ForgeError(code, f"the Hub refused the upload to {config.repo_id}: {text[:300]}",
                         "check the token has write access to the repo's owner" if code == Codes.HUB_AUTH_MISSING
                         else "retry later; nothing is half-published: the upload is one commit",
                         retryable=code == Codes.HUB_ERROR) from None
    return {"status": Outcome.SUCCEEDED, "dry_run": False, "repo_url": str(repo_url), "commit_url": commit.commit_url,
            "commit_oid": commit.oid, "plan": {k: v for k, v in plan.items() if k != "model_card"}}
