"""Packed rows train exactly like their records one by one: same loss, same gradients (fp32, CPU)."""

import random

import pytest
import torch

from forge.packing import IGNORE_INDEX, PackedCollator, pack, truncate_records


def tiny_model(attn: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from forge.packing import register_varlen_attention

    register_varlen_attention()
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         use_cache=False, attn_implementation=attn)
    return Qwen2ForCausalLM(config).float()


def records(n=7, seed=1):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(3, 40)
        ids = [rng.randrange(1, 97) for _ in range(length)]
        start = rng.randint(1, length - 1)
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * start + ids[start:]})
    return out


def loss_sum_and_count(model, batch):
    """Token-summed loss, so that one-by-one and packed runs are compared on the same normalisation."""
    logits = model(**batch).logits
    shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)),
                                             shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((shift_labels != IGNORE_INDEX).sum())


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attn,flatten", [("sdpa", False), ("eager", False), ("sdpa", True), ("forge_varlen", True)])
def test_packed_rows_give_the_same_loss_and_gradients_as_records_one_by_one(attn, flatten):
    recs = records()
    # one by one
    model = tiny_model(attn)
    total, count = 0.0, 0
    for rec in recs:
        batch = {"input_ids": torch.tensor([rec["input_ids"]]), "labels": torch.tensor([rec["labels"]])}
        loss, n = loss_sum_and_count(model, batch)
        loss.backward()
        total, count = total + loss.item(), count + n
    ref_grads = grads(model)
    # packed: rows of 64 tokens, several records per row, padding at row ends
    rows = pack(recs, row_length=64)
    assert len(rows) < len(recs)
    batch = PackedCollator(pad_token_id=0, flatten=flatten)(rows)  # flatten: one padding-free row
    assert batch["input_ids"].shape[0] == (1 if flatten else len(rows))
    batch.pop("forge_row_lengths")
    model = tiny_model(attn)
    loss, n = loss_sum_and_count(model, batch)
    loss.backward()
    assert n == count
    assert loss.item() == pytest.approx(total, rel=1e-5)
    for name, g in grads(model).items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_without_position_ids_records_would_leak_into_each_other():
    """The control: drop position_ids and the same packed batch no longer matches (the check has teeth)."""
    recs = records()
    model = tiny_model("sdpa")
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([recs[1]["input_ids"]])).logits[0]
        rows = pack(recs, row_length=64)
        row = next(r for r in rows if recs[1]["input_ids"] in [r["input_ids"][s:s + len(recs[1]["input_ids"])]
                                                            for s in range(len(r["input_ids"]))])
        start = next(s for s in range(len(row["input_ids"]))
                     if row["input_ids"][s:s + len(recs[1]["input_ids"])] == recs[1]["input_ids"]
                     and row["position_ids"][s] == 0)
        span = slice(start, start + len(recs[1]["input_ids"]))
        packed = model(input_ids=torch.tensor([row["input_ids"]]),
                       position_ids=torch.tensor([row["position_ids"]])).logits[0, span]
        leaky = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, span]
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-5)
    if start > 0:
        assert not torch.allclose(leaky, alone, atol=1e-3)


def test_pack_fills_rows_best_fit_and_keeps_every_token():
    recs = records(n=50, seed=3)
    rows = pack(recs, row_length=64)
    assert sorted(len(r["input_ids"]) for r in recs) == sorted(n for row in rows for n in row["seq_lengths"])
    assert all(len(r["input_ids"]) <= 64 for r in rows)
    fill = sum(len(r["input_ids"]) for r in rows) / (64 * len(rows))
    assert fill > 0.9
    for row in rows:
        assert row["position_ids"].count(0) == len(row["seq_lengths"])


def test_truncation_drops_records_left_without_trained_tokens():
    recs = [{"input_ids": [1, 2, 3, 4], "labels": [-100, -100, -100, 4]}, {"input_ids": [5, 6], "labels": [5, 6]}]
    assert truncate_records(recs, 3) == [{"input_ids": [5, 6], "labels": [5, 6]}]
