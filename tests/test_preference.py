"""Preference training: chosen/rejected records validated line by line, DPO (reference = the base with the
adapter switched off) and ORPO on the tiny model, through MCP and the whole chain."""

import json
from pathlib import Path

import pytest
from mcp import Client

from forge.data import load_dataset
from forge.errors import Codes, ForgeError
from forge.tokens import render_pair
from forge.train import TrainConfig, train
from helpers import call, call_ok, stop_runner, wait_job
from mcp_servers.forge.server import create_server

TOPICS = ["tea", "rain", "maps", "bread", "music", "rivers", "glass", "paper", "clocks", "boats", "stone", "wool"]


def preference_records(n: int = 36) -> list[dict]:
    """Pairs where the chosen answer is helpful and the rejected one curt: a preference that holds for prompts
    the model never saw, so the held-out pairs show whether it was learned."""
    records = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        prompt = f"Tell me one thing about {topic} (question {i})."
        if i % 3 == 0:  # the conversational form too
            records.append({"prompt": [{"role": "user", "content": prompt}],
                            "chosen": [{"role": "assistant", "content": f"Gladly: {topic} is useful to people."}],
                            "rejected": [{"role": "assistant", "content": "No. Ask someone else."}]})
        else:
            records.append({"prompt": prompt, "chosen": f"Gladly: {topic} is useful to people.",
                            "rejected": "No. Ask someone else."})
    return records


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def test_every_bad_preference_line_is_reported_with_its_number(tmp_path):
    good = {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}
    lines = [
        good,
        {"prompt": "Hi", "chosen": "Same.", "rejected": " Same. "},  # 2: no preference
        {"prompt": "Hi", "chosen": "", "rejected": "x"},  # 3: empty answer
        {"prompt": "Hi", "chosen": "x"},  # 4: rejected missing
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
         "chosen": "a", "rejected": "b"},  # 5: prompt ends with the assistant
        {"prompt": "   ", "chosen": "a", "rejected": "b"},  # 6: empty prompt
        {"prompt": "Hi", "chosen": 3, "rejected": "b"},  # 7: not a string
        good,
    ]
    with pytest.raises(ForgeError) as info:
        load_dataset(write_jsonl(tmp_path / "p.jsonl", lines))
    details = info.value.details
    assert info.value.code == Codes.DATASET_INVALID and [d.split(":")[0] for d in details] == [
        "line 2", "line 3", "line 4", "line 5", "line 6", "line 7"]
    assert "same answer" in details[0] and "'chosen' is empty" in details[1]
    assert "missing field 'rejected'" in details[2] and "must end with a user message" in details[3]


def test_pairs_are_rendered_through_the_chat_template_with_the_end_of_turn_token(assets, tmp_path):
    from forge.tokens import load_tokenizer

    ds = load_dataset(write_jsonl(tmp_path / "p.jsonl", preference_records(3)), system_prompt="Be kind.")
    assert ds.format == "preference" and len(ds.rejected) == 3
    pair = ds.preference_pairs()[0]
    assert pair["prompt"][0] == {"role": "system", "content": "Be kind."}
    text = render_pair(load_tokenizer(assets["model_dir"]), pair)
    assert text["prompt"].endswith("<|im_start|>assistant\n")
    assert text["chosen"] == "Gladly: tea is useful to people.<|im_end|>"  # the end of turn is in the loss
    with pytest.raises(ForgeError) as info:
        load_dataset(assets["dataset"]).preference_pairs()
    assert info.value.code == Codes.DATASET_INVALID and "chosen" in info.value.hint


@pytest.mark.anyio
async def test_dpo_through_mcp_learns_the_preference_and_the_chain_follows(home):
    server = create_server()
    seen: list[dict] = []
    try:
        async with Client(server) as client:
            assets = await call_ok(client, "forge_demo_assets", {"model": "tiny"})
            dataset = write_jsonl(home / "pref.jsonl", preference_records())
            refused = await call(client, "forge_train", {"base_model": assets["model_dir"],
                                                         "dataset": assets["dataset"], "method": "dpo"})
            handle = await call_ok(client, "forge_pipeline", {
                "base_model": assets["model_dir"], "dataset": str(dataset), "method": "dpo",
                "hyperparameters": {"num_train_epochs": 3, "learning_rate": 5e-3, "eval_fraction": 0.25,
                                    "per_device_train_batch_size": 4, "save_steps": 100}})

            async def on_progress(progress, total, message):
                seen.append(await call(client, "forge_job_status", {"job_id": handle["job_id"]}))

            status = await wait_job(client, handle["job_id"], on_progress=on_progress)
            reply = await client.call_tool("forge_job_status", {"job_id": handle["job_id"]})
            detail = json.loads((await client.read_resource(f"forge://jobs/{handle['job_id']}")).contents[0].text)
    finally:
        stop_runner(server.runner)
    assert refused["error"]["code"] == Codes.DATASET_INVALID
    assert status["status"] == "succeeded", status.get("error")
    accuracies = [s["progress"]["reward_accuracy"] for s in seen if s["progress"].get("reward_accuracy") is not None]
    assert accuracies, "progress never showed the reward accuracy"
    # within 3 KB: the reward figures in a line, the full ones, the evaluation table and samples in the resource;
    # and up to 500 bytes more for the warnings and checks that matter, a short line each
    shown = reply.structured_content
    size = len(json.dumps(shown, separators=(",", ":"), ensure_ascii=False).encode())
    warned = len(json.dumps(shown["warnings"], separators=(",", ":"), ensure_ascii=False).encode())
    assert size - warned <= 3_000 and size <= 3_500, (size, warned)
    assert any(w.startswith("merge parity passed") for w in shown["warnings"]), shown["warnings"]
    assert "reward accuracy" in status["summary"] and "perplexity over" in status["summary"]
    assert status["more"].startswith(f"forge://jobs/{handle['job_id']} has all")
    assert detail["evaluation"]["table"] and detail["evaluation"]["samples"]
    preference = detail["metrics"]["preference"]
    assert preference["first"]["reward_accuracy"] <= 0.5  # the adapter starts at zero: no preference yet
    assert preference["eval"]["reward_accuracy"] > 0.5 and preference["eval"]["reward_margin"] > 0  # held out
    run_dir = Path(status["run_dir"])
    assert list(run_dir.glob("gguf/*-Q4_K_M.gguf")) and (run_dir / "gguf" / "Modelfile").is_file()
    seal = json.loads(Path(next(a["path"] for a in status["artifacts"] if a["kind"] == "seal")).read_text())
    assert seal["runs"][0]["method"] == "dpo"
    assert seal["runs"][0]["metrics"]["preference"]["eval"]["reward_accuracy"] > 0.5


def test_orpo_trains_on_pairs_without_a_reference_pass(assets, tmp_path):
    dataset = write_jsonl(tmp_path / "pref.jsonl", preference_records())
    out = train(TrainConfig(base_model=assets["model_dir"], dataset=dataset, output_dir=tmp_path / "orpo",
                            method="orpo", num_train_epochs=3, learning_rate=5e-3, eval_fraction=0.25,
                            save_steps=100))
    preference = out["metrics"]["preference"]
    assert out["method"] == "orpo" and preference["eval"]["reward_margin"] > preference["first"]["reward_margin"]
    assert (Path(out["adapter_dir"]) / "adapter_model.safetensors").is_file()


def test_a_preference_method_will_not_add_chat_tokens_to_a_base_model(tmp_path):
    from forge.demo import DemoAssetsConfig, write_demo_assets

    base = write_demo_assets(DemoAssetsConfig(dir=tmp_path / "base", model="tiny-base"))
    dataset = write_jsonl(tmp_path / "pref.jsonl", preference_records(6))
    with pytest.raises(ForgeError) as info:
        train(TrainConfig(base_model=base["model_dir"], dataset=dataset, output_dir=tmp_path / "r", method="dpo",
                          chat_template="chatml", max_steps=1))
    assert info.value.code == Codes.INVALID_ARGUMENT and "merged model" in info.value.hint
