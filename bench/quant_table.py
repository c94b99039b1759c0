"""What each llama.cpp quant type keeps of a fine-tune, with and without an importance matrix, on this CPU.

For a trained run (its merged model and its f16 GGUF, e.g. SmolLM2-135M fine-tuned by `forge pipeline`), each
type is made twice from the f16: plainly, and with the importance matrix llama.cpp computes from the run's
training split. Each file is measured against the f16 on the run's eval split (forge.quant_quality: mean and p99
KL divergence, same top token, ΔPPL of the answer tokens) and timed generating through llama.cpp (one token per
decode, as llama-bench's tg test does, after a warm-up).

    .venv/bin/python bench/quant_table.py --run-dir RUN [--types Q8_0 Q4_K_M ...] [--json out.json]

Writes the quants into RUN/bench-quants (deleted afterwards unless --keep) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

TYPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_XS", "Q4_0", "Q3_K_M", "IQ3_S", "Q2_K"]
GEN_TOKENS = 64


def gen_tokens_per_s(path: Path, threads: int) -> float:
    """Decode speed: GEN_TOKENS single-token decodes after a short prompt, median of three runs."""
    from forge.quantize import load_llama

    llm = load_llama(path, n_ctx=256, n_threads=threads)
    try:
        prompt = llm.tokenize(b"The quick brown fox jumps over the lazy dog.")
        speeds = []
        for _ in range(3):
            llm.reset()
            llm.eval(prompt)
            token = prompt[-1]
            start = time.perf_counter()
            for _ in range(GEN_TOKENS):
                llm.eval([token])
            speeds.append(GEN_TOKENS / (time.perf_counter() - start))
        return sorted(speeds)[1]
    finally:
        llm.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="a trained, merged and quantized run dir")
    parser.add_argument("--types", nargs="+", default=TYPES)
    parser.add_argument("--imatrix-tokens", type=int, default=32768)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--keep", action="store_true", help="keep the quantized files")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from forge import imatrix as imx
    from forge.measure_set import run_measure_set
    from forge.quant_plan import calibration, quantize_with_tools
    from forge.quant_quality import measure
    from forge.quantize import quantize_file

    run_dir = args.run_dir.resolve()
    f16 = next((run_dir / "gguf").glob("*-f16.gguf"), None)
    if f16 is None:
        print(f"{run_dir}/gguf holds no *-f16.gguf: quantize the run first (forge quantize)", file=sys.stderr)
        return 2
    work = run_dir / "bench-quants"
    work.mkdir(exist_ok=True)
    threads = os.cpu_count() or 1
    start = time.perf_counter()
    text, tokens, records, source = calibration(run_dir / "merged", run_dir, args.imatrix_tokens)
    matrix = imx.compute(f16, text, tokens, records, work / "bench.imatrix.gguf", work / "bench.log", source)
    imatrix_s = time.perf_counter() - start
    print(f"importance matrix: {tokens} tokens of {records} records ({source}) in {imatrix_s:.0f} s", flush=True)

    files, labels = [f16], [("f16", False)]
    for quant in args.types:
        for with_matrix in (False, True):
            if with_matrix and not imx.uses_imatrix(quant):
                continue
            if not with_matrix and quant in imx.NEEDS_IMATRIX:
                continue
            path = work / f"bench-{quant}{'-imatrix' if with_matrix else ''}.gguf"
            if with_matrix:
                quantize_with_tools(f16, path, quant, Path(matrix["path"]), work / "bench.log")
            else:
                quantize_file(f16, path, quant)
            files.append(path)
            labels.append((quant, with_matrix))
            print(f"made {path.name}", flush=True)
    scored, _ = run_measure_set(run_dir, AutoTokenizer.from_pretrained(run_dir / "merged"))
    qualities = measure(f16, files, scored)
    rows = []
    for (quant, with_matrix), path, quality in zip(labels, files, qualities, strict=True):
        rows.append({"type": quant, "imatrix": with_matrix, **{k: quality[k] for k in (
            "bytes", "bpw", "kld_mean", "kld_p99", "same_top_pct", "answers_kld_mean", "delta_ppl", "ppl")},
            "gen_tokens_per_s": round(gen_tokens_per_s(path, threads), 1)})
        print(f"measured {path.name}", flush=True)

    print(f"\nOn {scored.basis['text']}; reference {f16.name} (ppl {qualities[0]['ppl']:.4f}); "
          f"{threads} threads; importance matrix from {tokens} tokens of the {source}.\n")
    print("| type | imatrix | size MB | bpw | mean KLD | KLD p99 | same top % | answers mean KLD | ΔPPL | gen tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['type']} | {'yes' if r['imatrix'] else '—'} | {r['bytes'] / 1e6:.1f} | {r['bpw']:.2f} | "
              f"{r['kld_mean']:.4f} | {r['kld_p99']:.4f} | {r['same_top_pct']:.1f} | {r['answers_kld_mean']:.4f} | "
              f"{r['delta_ppl']:+.4f} | {r['gen_tokens_per_s']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"measured_on": scored.basis, "imatrix": matrix, "threads": threads,
                                         "rows": rows}, indent=1), encoding="utf-8")
    if not args.keep:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
