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
    return [t if m else IGNORE_INDEX for t, m in zip(input_ids, mask)]


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

        return {
            "input_ids": padded("input_ids", self.pad_token_id),
            "labels": padded("labels", IGNORE_INDEX),
            "position_ids": padded("position_ids", 0),
            ROW_LENGTHS_KEY: torch.tensor([len(r["input_ids"]) for r in rows]),
        }
