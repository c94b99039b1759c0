"""The parts an agent does not have to guess, on their own: answers scored against references, splits that keep
whole groups out of training and say what the eval records test, hyperparameters chosen from the data's and the
model's size (with why), and the forgetting verdict in words."""

from __future__ import annotations

import json

import pytest

from forge import answer_score, forgetting, general_set
from forge.data import load_dataset, split
from forge.measure_set import held_out_kind
from forge.train import TrainConfig, train, with_defaults
from forge.train.defaults import choose, model_parameters


@pytest.mark.parametrize(("answer", "refs", "found"), [
    ("Paris", "Paris", "exact"),
    ("paris!", "Paris", "normalised"),
    ("The answer is Paris.", ["Lyon", "Paris"], "contains"),
    ("It is Pärís", "paris", "contains"),  # accents set aside
    ("There are 100 of them", ["0", "zero"], None),  # words, not characters: 100 does not hold 0
    ("Lena", "Lena Marsh", None),  # the whole reference, in order
    ("Marsh, Lena", "Lena Marsh", None),
    ("", "Paris", None),
    ("(A)", "A", "normalised"),  # a multiple-choice letter: articles count when the reference is one
    ("It is a cat", "A", None),  # ...and only the whole answer matches it
])
def test_an_answer_is_matched_exactly_normalised_or_by_containing_the_reference(answer, refs, found):
    assert answer_score.match(answer, refs) == found


def test_a_tally_counts_each_level_with_the_better_ones():
    assert answer_score.tally(["exact", "contains", None, "normalised"]) == {
        "exact": 1, "normalised": 2, "contains": 3, "matched": 3, "of": 4}


def test_grouped_records_are_split_by_whole_groups_and_the_eval_set_says_so(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Q{i} about fact {i % 6}?", "output": f"Fact {i % 6}.",
                                        "group": f"fact-{i % 6}"}) + "\n" for i in range(24)), encoding="utf-8")
    convs = load_dataset(path).conversations
    train_set, evals = split(convs, 0.2, 42)
    assert len(evals) >= 4 and {c.group for c in evals}.isdisjoint({c.group for c in train_set})
    assert split(convs, 0.2, 42) == (train_set, evals)  # the same split every time
    kind = held_out_kind(evals, train_set)
    assert "belong to groups no training record has" in kind["text"] and kind["paraphrases"] == 0


def test_without_groups_forge_says_the_eval_records_are_paraphrases_of_training_records(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Ask {i} about fact {i % 3}", "output": f"Fact {i % 3}."})
                            + "\n" for i in range(12)), encoding="utf-8")
    train_set, evals = split(load_dataset(path).conversations, 0.25, 1)
    kind = held_out_kind(evals, train_set)
    assert kind["paraphrases"] == len(evals) == 3 and "paraphrases of training records" in kind["text"]
    assert "mark groups" in kind["text"]
    new = held_out_kind([[{"role": "user", "content": "x"}, {"role": "assistant", "content": "Something new."}]],
                        train_set)
    assert new["paraphrases"] == 0 and "none of the 1 eval records" in new["text"]


@pytest.mark.parametrize(("records", "parameters", "epochs", "rate", "rank"), [
    (24, 135e6, 12, 3e-4, 16),
    (80, 7e9, 8, 2e-4, 16),
    (400, 0.5e9, 4, 3e-4, 16),
    (5_000, 70e9, 2, 1e-4, 16),
    (50_000, None, 1, 2e-4, 32),
])
def test_defaults_follow_the_size_of_the_data_and_the_model(records, parameters, epochs, rate, rank):
    chosen = choose(records, parameters and int(parameters), "lora", "config.json")
    assert (chosen["num_train_epochs"]["value"], chosen["learning_rate"]["value"], chosen["lora_r"]["value"]) == \
        (epochs, rate, rank)
    assert all(v["why"] for v in chosen.values()) and f"{records} training records" in chosen["num_train_epochs"]["why"]
    assert ("unknown" in chosen["learning_rate"]["why"]) == (parameters is None)


def test_the_model_size_is_read_from_its_config_or_its_name(assets):
    counted, where = model_parameters(assets["model_dir"])
    assert where == "config.json" and counted == pytest.approx(assets["parameters"], rel=0.05)
    assert model_parameters("Qwen/Qwen2.5-7B-Instruct") == (7_000_000_000, "the model's name")
    assert model_parameters("HuggingFaceTB/SmolLM2-135M-Instruct") == (135_000_000, "the model's name")
    assert model_parameters("owner/name") == (None, "unknown")


def test_a_train_without_hyperparameters_records_what_was_chosen_and_keeps_what_was_given(assets, tmp_path):
    config = TrainConfig(base_model=assets["model_dir"], dataset=assets["dataset"], output_dir=tmp_path / "run",
                         lora_r=8, max_steps=2, save_steps=100)
    resolved, chosen = with_defaults(config)
    assert set(chosen) == {"num_train_epochs", "learning_rate"} and resolved.lora_r == 8 and resolved.lora_alpha == 16
    result = train(config)
    assert result["defaults"] == chosen  # said in the result, and so in the status line and the seal
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text(encoding="utf-8"))
    assert saved["learning_rate"] == chosen["learning_rate"]["value"] and saved["lora_r"] == 8
    preference = choose(100, 7_000_000_000, "dpo")
    assert preference["learning_rate"]["value"] == 5e-5 and "dpo" in preference["learning_rate"]["why"]


def _measured(texts: list[str], stopped: int, nll: float) -> dict:
    return {"answers": [{"text": t, "stopped": i < stopped, "tokens": 3} for i, t in enumerate(texts)],
            "prose_nll": nll, "prose_tokens": 100}


def test_forgetting_is_flagged_in_words_past_the_budget_and_quiet_within_it():
    refs = [refs[0] for _, refs in general_set.QUESTIONS]
    base = _measured(refs, 24, 300.0)  # every question answered, perplexity e^3
    kept = forgetting.compare(base, _measured(refs, 24, 320.0))
    assert kept["within_budget"] and kept["kept_pct"] == 100.0 and forgetting.verdict(kept) is None
    lost = forgetting.compare(base, _measured(["I do not know"] * 12 + refs[12:], 10, 400.0))
    assert not lost["within_budget"] and lost["kept_pct"] == 50.0 and lost["prose_ppl_change_pct"] > 50
    text = forgetting.verdict(lost)
    assert text.startswith("forgetting: the fine-tuned model answers 12 of the 24 general questions")
    assert "prose perplexity" in text and "end on their own" in text and "forge_sweep" in text
