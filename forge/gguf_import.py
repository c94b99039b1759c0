"""A GGUF as a base model: turned once into a Hugging Face model dir under ``$FORGE_HOME/cache``, cached
by the file's sha256, so training, merging and converting back all work on ordinary safetensors.

transformers dequantizes the GGUF's weights (``GgufConfig(dequantize=True)``); the result carries the
quantization's rounding (Q4_1's, say), not the original full-precision weights, and Forge says so. The
conversion runs in a subprocess: transformers reads GGUFs with PyPI's ``gguf``, while the HF→GGUF
converter needs llama.cpp's own copy, and one process should hold only one of them.

Run: ``python -m forge.gguf_import GGUF OUT_DIR`` (what ``import_gguf`` does).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from forge.errors import Codes, ForgeError
from forge.workspace import atomic_dir, cache_dir, sha256_file

ORIGIN_FILE = "forge_gguf_origin.json"


def is_gguf(path: Path) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        return fh.read(4) == b"GGUF"


def origin(model_dir: Path) -> dict | None:
    """Where a model dir came from, when it was made from a GGUF: path, sha256, file type, pre-tokenizer."""
    path = Path(model_dir) / ORIGIN_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def import_gguf(gguf: Path) -> tuple[Path, bool]:
    """The model dir made from ``gguf`` (made now, or found in the cache); True when it was made now."""
    gguf = Path(gguf)
    digest = sha256_file(gguf)
    target = cache_dir() / "gguf-models" / digest
    if (target / "config.json").is_file() and (target / ORIGIN_FILE).is_file():
        return target, False
    with atomic_dir(target, force=True) as tmp:
        proc = subprocess.run([sys.executable, "-m", "forge.gguf_import", str(gguf), str(tmp)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-4:])
            raise ForgeError(Codes.MODEL_NOT_FOUND, f"transformers could not read the GGUF {gguf}: {tail}",
                             "pass a GGUF of an architecture transformers supports (Llama, Qwen2, Mistral, Gemma, "
                             "Phi-3, ...), or the model's Hugging Face dir")
        info = json.loads((tmp / ORIGIN_FILE).read_text(encoding="utf-8"))
        info.update(source=str(gguf.resolve()), sha256=digest)
        (tmp / ORIGIN_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return target, True


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from gguf import GGUFReader, LlamaFileType
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    reader = GGUFReader(str(gguf))

    def field(key: str):
        found = reader.fields.get(key)
        return found.contents() if found is not None else None

    quant = GgufConfig(dequantize=True)  # plain tensors: a model that trains, merges and saves like any other
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, quantization_config=quant,
                                                 dtype=torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    file_type = field("general.file_type")
    (out / ORIGIN_FILE).write_text(json.dumps({
        "architecture": field("general.architecture"),
        "file_type": LlamaFileType(file_type).name if file_type is not None else None,
        "pre_tokenizer": field("tokenizer.ggml.pre"), "name": field("general.name"),
    }, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    gguf, out = (argv if argv is not None else sys.argv[1:])[:2]
    _convert(Path(gguf), Path(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
