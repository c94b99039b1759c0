"""An importance matrix from the run's own training data, computed and used by llama.cpp's tools.

llama.cpp's ``llama-imatrix`` runs the f16 GGUF over calibration text and records, for each weight matrix,
how strongly each of its inputs is driven; ``llama-quantize --imatrix`` then spends the rounding error where
it matters least. Generic corpora are the usual calibration text; Forge has the user's task in hand: the
run's training records (its eval split left out, so the measurements on that split stay honest), rendered
through the model's chat template exactly as training saw them, up to a token budget.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from forge.errors import Codes, ForgeError
from forge.paths import check_output, open_output

# Types llama.cpp quantizes without looking at an importance matrix
IGNORES_IMATRIX = {"F32", "F16", "BF16", "Q8_0"}
# Types llama.cpp refuses to make without one (their main tensor type needs it: llama-quant.cpp)
NEEDS_IMATRIX = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "Q2_K_S"}
MIN_TOKENS = 64  # llama-imatrix needs two chunks; below this there is nothing worth calibrating on
CALIBRATION_FILE = "calibration.txt"  # the name llama.cpp records in the matrix and in each GGUF it quantizes


def uses_imatrix(quant: str) -> bool:
    return quant.upper() not in IGNORES_IMATRIX


def calibration_text(tokenizer, conversations: list, budget: int) -> tuple[str, int, int]:
    """Whole records rendered as training renders them, until ``budget`` tokens: (text, tokens, records)."""
    from forge.tokens import _render
    from forge.tool_json import render_form

    parts, tokens = [], 0
    for conversation in conversations:
        messages, tools = render_form(conversation)
        text = _render(tokenizer, messages, False, tools)
        count = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if parts and tokens + count > budget:
            break
        parts.append(text)
        tokens += count
    return "\n".join(parts), tokens, len(parts)


def _context(tokens: int) -> int:
    """llama-imatrix's chunk size: 512 (its default) when the text has room for two, else a power of two
    that leaves two chunks."""
    size = 512
    while size > 16 and 2 * size > tokens:
        size //= 2
    return size


def compute(f16_path: Path, text: str, tokens: int, records: int, out_path: Path, log_path: Path,
            source: str) -> dict:
    """Write the importance matrix of ``f16_path`` over ``text`` to ``out_path`` (a llama.cpp imatrix GGUF)."""
    from forge.llama_tools import run_tool
    from forge.workspace import sha256_file

    if tokens < MIN_TOKENS:
        raise ForgeError(Codes.IMATRIX_FAILED,
                         f"the training data renders to {tokens} tokens, too few to calibrate on "
                         f"(at least {MIN_TOKENS})",
                         "quantize with imatrix='off', or pass imatrix=PATH to a matrix computed on more text")
    # a private dir of this call's own: the calibration text (a copy of training data) and the matrix being
    # written; llama.cpp records the calibration file's name as given, so it runs in there
    out_path = out_path.resolve()
    work = Path(tempfile.mkdtemp(dir=check_output(out_path).parent, prefix=f".{out_path.name}."))
    n_ctx = _context(tokens)
    try:
        with open_output(work / CALIBRATION_FILE, "calibration text", exclusive=True) as fh:
            fh.write(text.encode("utf-8"))
        tmp_gguf = work / "imatrix.gguf"  # llama-imatrix picks its format from the suffix
        args = ["-m", str(Path(f16_path).resolve()), "-f", CALIBRATION_FILE, "-o", str(tmp_gguf), "--parse-special",
                "--no-ppl", "-c", str(n_ctx), "-b", str(n_ctx), "-t", str(os.cpu_count() or 1)]
        proc = run_tool("llama-imatrix", args, log_path, cwd=work)
        if proc.returncode != 0 or not tmp_gguf.is_file() or tmp_gguf.stat().st_size == 0:
            tail = " ".join(proc.stderr.strip().splitlines()[-3:])[-300:]
            raise ForgeError(Codes.IMATRIX_FAILED, f"llama-imatrix failed (exit {proc.returncode}): {tail}",
                             f"see {log_path}; or quantize with imatrix='off'")
        tmp_gguf.replace(out_path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"path": str(out_path), "sha256": sha256_file(out_path), "bytes": out_path.stat().st_size,
            "source": source, "tokens": tokens, "records": records, "chunk_tokens": n_ctx,
            "chunks": tokens // n_ctx}

