"""What a quantization loses, measured the way llama.cpp measures it (``llama-perplexity --kl-divergence``).

At every position of the measure set's records (each token after the first) each GGUF's next-token
distribution is compared, through llama.cpp, with the reference's — llama.cpp's tool scores the second half of
each fixed-size chunk of continuous text; a record here is a whole conversation, so each position is scored
with the context the record gives it — (the run's
own f16 GGUF: a fine-tune scores worse than its base on generic text, so the reference is the fine-tune, on
the fine-tune's data):

- KL divergence KL(reference ‖ quant): mean, median, 99th percentile and max over the positions;
- same top token: the share of positions where both pick the same most likely token;
- the same two over the answer positions alone (those training put in the loss: what the model generates
  at), a smaller and noisier sample that speaks for the fine-tune itself;
- perplexity of the answer tokens under each, and the difference (ΔPPL);
- file size and bits per weight (tensor bytes × 8 / weights), from the GGUF's tensor list.

The reference's log-probabilities are computed once and kept in memory when they fit ``CACHE_BYTES``;
otherwise the reference runs again beside each file (two models loaded at a time, never more).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from forge.measure_set import Scored

CACHE_BYTES = 768 << 20


def log_softmax(logits):
    import numpy as np

    logits = np.asarray(logits, dtype=np.float64)
    top = logits.max(axis=-1, keepdims=True)
    return logits - (top + np.log(np.exp(logits - top).sum(axis=-1, keepdims=True)))


def _answers(ids: list[int], mask: list[int]) -> tuple[list[int], list[int]]:
    """Rows (among all len(ids) - 1 predicting rows) whose logits predict an answer token, and those tokens."""
    picked = [t for t in range(1, len(ids)) if mask[t]]
    return [t - 1 for t in picked], [ids[t] for t in picked]


def file_stats(llm, path: Path) -> dict:
    """Size on disk, weights and bits per weight (tensor bytes × 8 / weights, as llama.cpp reports) of a
    loaded GGUF."""
    weights, tensor_bytes = int(llm._model.n_params()), int(llm._model.size())
    return {"bytes": Path(path).stat().st_size, "weights": weights,
            "bpw": round(8 * tensor_bytes / max(weights, 1), 3)}


def _load(path: Path, n_ctx: int):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False)


class _Reference:
    """The reference GGUF's log-probabilities at the scored positions, per record."""

    def __init__(self, path: Path, scored: Scored, n_ctx: int):
        self.path, self.scored, self.n_ctx = Path(path), scored, n_ctx
        self.llm = _load(path, n_ctx)
        vocab = self.llm.n_vocab()
        self.cache: dict[int, object] | None = {} if scored.positions * vocab * 4 <= CACHE_BYTES else None

    def log_probs(self, index: int):
        import numpy as np

        if self.cache is not None and index in self.cache:
            return np.asarray(self.cache[index], dtype=np.float64)
        ids = self.scored.ids[index]
        self.llm.reset()
        self.llm.eval(ids)
        found = log_softmax(self.llm.scores[: len(ids) - 1])
        if self.cache is not None:
            self.cache[index] = found.astype(np.float32)  # float32 log-probs: rounding far below any KLD shown
        return found

    def close(self) -> None:
        self.llm.close()


def _summary(klds, same: int, answer_klds, answer_same: int, nll: float, ref_nll: float, n: int,
             text: str) -> dict:
    import numpy as np

    klds, answer_klds = np.asarray(klds, dtype=np.float64), np.asarray(answer_klds, dtype=np.float64)
    ppl, ref_ppl = math.exp(min(nll / max(n, 1), 700)), math.exp(min(ref_nll / max(n, 1), 700))
    empty = klds.size == 0
    return {"kld_mean": None if empty else round(float(klds.mean()), 6),
            "kld_median": None if empty else round(float(np.median(klds)), 6),
            "kld_p99": None if empty else round(float(np.percentile(klds, 99)), 6),
            "kld_max": None if empty else round(float(klds.max()), 6),
            "same_top_pct": None if empty else round(100.0 * same / klds.size, 2),
            "answers_kld_mean": round(float(answer_klds.mean()), 6) if answer_klds.size else None,
            "answers_same_top_pct": round(100.0 * answer_same / answer_klds.size, 2) if answer_klds.size else None,
            "ppl": round(ppl, 4), "ref_ppl": round(ref_ppl, 4), "delta_ppl": round(ppl - ref_ppl, 4),
            "ppl_vs_ref_pct": round(100.0 * (ppl / ref_ppl - 1), 3), "nll": nll, "tokens": n,
            "positions": int(klds.size), "measured_on": text}


def measure(reference: Path, files: list[Path], scored: Scored,
            on_file: Callable[[int, Path], None] | None = None) -> list[dict]:
    """Each of ``files`` against ``reference`` on the scored positions (the reference itself may be one of
    them: it then scores KLD 0 and 100 % same top token, measured, not assumed)."""
    import numpy as np

    n_ctx = max((len(i) for i in scored.ids), default=1) + 8
    ref = _Reference(reference, scored, n_ctx)
    out = []
    try:
        for number, path in enumerate(files):
            if on_file:
                on_file(number, Path(path))
            llm = _load(path, n_ctx)
            try:
                klds, same, answer_klds, answer_same, nll, ref_nll, n = [], 0, [], 0, 0.0, 0.0, 0
                for index, (ids, mask) in enumerate(zip(scored.ids, scored.masks, strict=True)):
                    if len(ids) < 2:
                        continue
                    p = ref.log_probs(index)
                    llm.reset()
                    llm.eval(ids)
                    q = log_softmax(llm.scores[: len(ids) - 1])
                    kld = (np.exp(p) * (p - q)).sum(axis=-1).clip(min=0.0)
                    agree = p.argmax(axis=-1) == q.argmax(axis=-1)
                    rows, targets = _answers(ids, mask)
                    klds.extend(kld.tolist())
                    same += int(agree.sum())
                    answer_klds.extend(kld[rows].tolist())
                    answer_same += int(agree[rows].sum())
                    nll -= float(q[rows, targets].sum())
                    ref_nll -= float(p[rows, targets].sum())
                    n += len(rows)
                stats = file_stats(llm, Path(path))
            finally:
                llm.close()
            out.append({**_summary(klds, same, answer_klds, answer_same, nll, ref_nll, n,
                                   scored.basis.get("text", "")), **stats, "reference": Path(reference).name})
    finally:
        ref.close()
    return out


def compact(quality: dict | None) -> dict | None:
    """The numbers an agent reads, without the bookkeeping."""
    if not quality:
        return None
    keys = ("kld_mean", "kld_p99", "same_top_pct", "answers_kld_mean", "answers_same_top_pct", "ppl", "delta_ppl",
            "bytes", "bpw")
    return {k: quality.get(k) for k in keys}
