"""Padding-free packing without cross-contamination.

Records are packed best-fit-decreasing into rows of ``row_length`` tokens. Each row carries
``position_ids`` that restart at 0 for every record and NO attention mask: with transformers 5,
sdpa and eager (and flex_attention) then build a block-diagonal causal mask from the position ids,
so a record never attends to its neighbours (tests check the loss and gradients equal those of the
records run one by one). Row padding gets position 0 and label -100, so each pad token is its own
one-token "record" and never touches the real ones. The model must run with ``use_cache=False``:
with a cache, transformers skips the packed-sequence detection.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

IGNORE_INDEX = -100
ROW_LENGTHS_KEY = "forge_row_lengths"  # popped before the forward pass; counts real tokens


def labels_from_mask(input_ids: list[int], mask: list[int]) -> list[int]:
    return [t if m else IGNORE_INDEX for t, m in zip(input_ids, mask, strict=True)]


def truncate_records(records: list[dict], max_length: int) -> list[dict]:
    """Keep the start of each record; drop records left with no trained token."""
    out = []
    for r in records:
        ids, labels = r["input_ids"][:max_length], r["labels"][:max_length]
        if any(label != IGNORE_INDEX for label in labels):
            out.append({"input_ids": ids, "labels": labels})
    return out


def pack(records: list[dict], row_length: int) -> list[dict]:
    """Best-fit-decreasing: each record (longest first) goes to the fullest row it still fits in."""
    order = sorted(range(len(records)), key=lambda i: -len(records[i]["input_ids"]))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row index), sorted
    for i in order:
        need = len(records[i]["input_ids"])
        if need > row_length:
            raise ValueError(f"record of {need} tokens exceeds row_length={row_length}; truncate first")
        at = bisect.bisect_left(free, (need, -1))
        if at < len(free):
            space, row = free.pop(at)
            rows[row].append(i)
            bisect.insort(free, (space - need, row))
        else:
            rows.append([i])
            bisect.insort(free, (row_length - need, len(rows) - 1))
    packed = []
    for members in rows:
        ids, labels, positions, lengths = [], [], [], []
        for i in members:
            rec = records[i]
            ids += rec["input_ids"]
            # A record's first token is never predicted inside its record; left as a label, the loss's
            # shift would make the previous record's last token predict it. -100 cuts that link.
            labels += [IGNORE_INDEX] + rec["labels"][1:]
            positions += list(range(len(rec["input_ids"])))
            lengths.append(len(rec["input_ids"]))
        packed.append({"input_ids": ids, "labels": labels, "position_ids": positions, "seq_lengths": lengths})
    return packed


def single_rows(records: list[dict]) -> list[dict]:
    """One record per row, in the row format (for padding-free batches of whole records)."""
    return [{"input_ids": r["input_ids"], "labels": [IGNORE_INDEX] + r["labels"][1:],
             "position_ids": list(range(len(r["input_ids"]))), "seq_lengths": [len(r["input_ids"])]}
            for r in records]


@dataclass
class PackedCollator:
    """Builds a batch without an attention mask: rows padded with pad id / label -100 / position 0,
    or, with ``flatten``, every row of the batch concatenated into one row and no padding at all."""

    pad_token_id: int
    flatten: bool = False

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        if self.flatten:
            rows = [{key: [x for r in rows for x in r[key]] for key in ("input_ids", "labels", "position_ids")}]
        width = max(len(r["input_ids"]) for r in rows)

        def padded(key: str, value: int):
            return torch.tensor([r[key] + [value] * (width - len(r[key])) for r in rows], dtype=torch.long)

        batch = {
            "input_ids": padded("input_ids", self.pad_token_id),
            "labels": padded("labels", IGNORE_INDEX),
            "position_ids": padded("position_ids", 0),
            ROW_LENGTHS_KEY: torch.tensor([len(r["input_ids"]) for r in rows]),
        }
        if self.flatten:
            # Record bounds for varlen kernels, computed here on the CPU rather than from position_ids
            # on the device (which would sync): forge_varlen and flash-attention read them.
            starts = (batch["position_ids"][0] == 0).nonzero().flatten()
            bounds = torch.cat([starts, torch.tensor([width])]).to(torch.int32)
            batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = bounds
            batch["max_length_q"] = batch["max_length_k"] = int(bounds.diff().max())
        return batch


# ---- exact per-record attention for padding-free rows on the CPU ----

VARLEN_ATTENTION = "forge_varlen"


def varlen_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                        is_causal=None, **kwargs):
    """Causal sdpa run record by record over a padding-free row, using the collator's cu_seq_lens.

    A dense block-diagonal mask over the whole row costs (sum of lengths)^2 attention; this costs
    the sum of each length^2, like padded batches, without the pads. Any other batch falls back to
    transformers' own sdpa (with its packed-sequence mask)."""
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None or query.shape[0] != 1 or attention_mask is not None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    edges = bounds.tolist()
    parts = [torch.nn.functional.scaled_dot_product_attention(
        query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], dropout_p=dropout, scale=scaling, is_causal=True)
        for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def register_varlen_attention() -> str:
    """Make ``attn_implementation="forge_varlen"`` available to transformers models."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(VARLEN_ATTENTION, varlen_sdpa_forward)
    # No dense mask: the attention above takes the record bounds from cu_seq_lens instead.
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_ATTENTION, _no_mask)
    return VARLEN_ATTENTION


def _no_mask(*args, **kwargs):
    return None
