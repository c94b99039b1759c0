import json
from pathlib import Path

import pytest

from fake_hub import FakeHub
from forge.errors import ForgeError
from forge.publish import PublishConfig, publish

TOKEN = "hf_test_token_0123456789"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    server = FakeHub(TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no stored login leaks in
    import huggingface_hub.constants

    # the suite runs offline for model loading; the publish tests talk to the local stand-in only
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    yield server
    server.close()


@pytest.fixture(scope="module")
def sealed(quantized, trained):
    from forge.seal import SealConfig, seal

    return seal(SealConfig(run_dirs=[trained["run_dir"]]))


def test_gguf_publish_uploads_files_and_a_card_from_the_seal_in_one_commit(hub, quantized, sealed):
    gguf_dir = Path(quantized["gguf_dir"])
    result = publish(PublishConfig(source=gguf_dir, repo_id="someone/tiny-demo", kind="gguf"))
    assert result["status"] == "succeeded" and result["commit_oid"] == f"{1:040x}"
    assert hub.repos["someone/tiny-demo"]["private"] is True
    [commit] = hub.commits
    names = set(commit["files"])
    models = [p for p in gguf_dir.glob("*.gguf") if not p.name.endswith(".imatrix.gguf")]
    assert {p.name for p in models} | {"README.md"} <= names and len(models) == 2
    for path in models:
        assert commit["files"][path.name] == path.read_bytes()
    # the importance matrix is statistics of the training data, not a model: it stays home
    assert list(gguf_dir.glob("*.imatrix.gguf")) and not any(n.endswith(".imatrix.gguf") for n in names)
    card = commit["files"]["README.md"].decode()
    assert card.startswith("---\n") and "library_name: gguf" in card and "license: other" in card
    assert sealed["seal_id"] in card and "| Eval loss |" in card and "ollama create tiny-demo" in card
    assert commit["summary"].startswith("Upload gguf")
    assert all(auth == f"Bearer {TOKEN}" for _, _, auth in hub.requests)  # the real client sent the token
    assert TOKEN not in json.dumps(result)


def test_adapter_publish_names_peft_and_skips_peft_readme(hub, trained):
    publish(PublishConfig(source=trained["adapter_dir"], repo_id="someone/tiny-adapter", kind="adapter",
                          private=False))
    files = hub.commits[-1]["files"]
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    assert "library_name: peft" in files["README.md"].decode()
    assert hub.repos["someone/tiny-adapter"]["private"] is False


def test_dry_run_returns_the_exact_plan_and_contacts_nothing(hub, quantized):
    result = publish(PublishConfig(source=quantized["gguf_dir"], repo_id="someone/plan", kind="gguf", dry_run=True))
    plan = result["plan"]
    assert result["dry_run"] and hub.requests == []
    sizes = {f["path_in_repo"]: f["bytes"] for f in plan["files"]}
    for path in Path(quantized["gguf_dir"]).glob("*.gguf"):
        assert sizes.get(path.name) == (None if path.name.endswith(".imatrix.gguf") else path.stat().st_size)
    assert sizes["README.md"] == len(plan["model_card"].encode()) and plan["total_bytes"] == sum(sizes.values())


def test_missing_token_is_hub_auth_missing_with_the_fix(hub, quantized, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(ForgeError) as info:
        publish(PublishConfig(source=quantized["gguf_dir"], repo_id="someone/x", kind="gguf"))
    assert info.value.code == "hub_auth_missing" and "HF_TOKEN" in info.value.hint
    assert hub.requests == []


def test_a_wrong_token_is_refused_without_echoing_it(hub, quantized, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_secret_value")
    with pytest.raises(ForgeError) as info:
        publish(PublishConfig(source=quantized["gguf_dir"], repo_id="someone/x", kind="gguf"))
    assert info.value.code == "hub_auth_missing"
    assert "hf_wrong_secret_value" not in info.value.message


def test_bad_repo_id_is_a_config_error():
    with pytest.raises(ForgeError) as info:
        PublishConfig.build(source=".", repo_id="no-owner")
    assert "owner/name" in info.value.message


def test_publish_cli_dry_run_json(hub, quantized, capsys):
    from forge.cli import main

    code = main(["publish", "--source", quantized["gguf_dir"], "--repo-id", "someone/cli", "--kind", "gguf",
                 "--dry-run", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["dry_run"] and out["plan"]["repo_id"] == "someone/cli" and hub.requests == []


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_a_client_that_can_ask_the_person_publishes_after_accept_and_nothing_after_decline(
        hub, quantized, mode, monkeypatch, home):
    """Old connections ask with elicitation/create inside the call; 2026-07-28 with an InputRequiredResult the
    client answers on its retry: the same question, the same outcome."""
    from mcp import Client
    from mcp_types import ElicitResult

    from helpers import call, stop_runner, wait_job
    from mcp_servers.forge.server import create_server

    asked: list[str] = []
    answers = iter([ElicitResult(action="decline"), ElicitResult(action="accept", content={"publish": False}),
                    ElicitResult(action="accept", content={"publish": True})])

    async def person(context, params):
        asked.append(params.message)
        return next(answers)

    monkeypatch.setenv("FORGE_ALLOWED_ROOTS", str(Path(quantized["gguf_dir"]).parent.parent))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the publish job runs in a worker process: it reads the environment
    args = {"source": quantized["gguf_dir"], "repo_id": "someone/asked", "kind": "gguf"}
    server = create_server()
    try:
        async with Client(server, mode=mode, elicitation_callback=person) as client:
            declined = await call(client, "forge_publish", args)
            not_ticked = await call(client, "forge_publish", args)
            listed = await call(client, "forge_job_list", {"kind": "publish"})
            commits_before = len(hub.commits)
            accepted = await call(client, "forge_publish", args)
            done = await wait_job(client, accepted["job_id"])
            planned = await call(client, "forge_publish", {**args, "dry_run": True})  # a dry run asks nothing
    finally:
        stop_runner(server.runner)
    for refused in (declined, not_ticked):
        error = refused["error"]
        assert error["code"] == "publish_declined" and "nothing was uploaded" in error["message"]
    assert listed["jobs"] == [] and commits_before == 0  # a refusal queued nothing and uploaded nothing
    assert done["status"] == "succeeded", done
    assert len(hub.commits) == 1 and "README.md" in hub.commits[0]["files"]
    assert len(asked) == 3 and planned["job_id"]
    question = asked[0]
    assert "someone/asked (private)" in question and "Q4_K_M.gguf" in question and "README.md" in question
    assert ".imatrix.gguf" not in question  # what is shown is what is uploaded
