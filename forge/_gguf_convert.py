"""Runs llama.cpp's ``convert_hf_to_gguf.py`` in a subprocess, with an explicit pre-tokenizer fallback.

Usage: python -m forge._gguf_convert CONVERTER_DIR FALLBACK -- converter args...
FALLBACK is a llama.cpp pre-tokenizer name, or '-' for none. The fallback is used only when the
converter does not recognise the tokenizer's hash, and is announced on stderr with a marker line
that ``forge.quantize`` reads back and records.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

FALLBACK_MARKER = "FORGE_PRE_TOKENIZER_FALLBACK"


def main(argv: list[str]) -> int:
    converter_dir, fallback, sep, *converter_args = argv
    if sep != "--":
        raise SystemExit("usage: python -m forge._gguf_convert CONVERTER_DIR FALLBACK -- args...")
    converter_dir = Path(converter_dir)
    sys.path[:0] = [str(converter_dir), str(converter_dir / "gguf-py")]
    import conversion.base as base  # the converter's own package, from converter_dir

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer):
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            if fallback == "-":
                raise
            print(f"{FALLBACK_MARKER} {fallback}", file=sys.stderr, flush=True)
            return fallback

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = [str(converter_dir / "convert_hf_to_gguf.py"), *converter_args]
    runpy.run_path(str(converter_dir / "convert_hf_to_gguf.py"), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
