import hashlib
import json
from pathlib import Path

import pytest

from forge.cli import main
from forge.errors import ForgeError
from forge.snapshot import SnapshotConfig, audit, snapshot


def test_audit_bundles_each_file_fenced_with_its_language_and_hash(home, tmp_path):
    notes = Path(home) / "notes"
    notes.mkdir(parents=True)
    (notes / "plan.md").write_text("# Plan\n\nTrain, then merge.\n", encoding="utf-8")
    (notes / "train.py").write_text("print('```tricky```')\n", encoding="utf-8")
    (notes / "cfg.yaml").write_text("lora_r: 16\n", encoding="utf-8")
    manifest = notes / "manifest.json"
    manifest.write_text(json.dumps(["plan.md", {"path": "train.py", "note": "the entry point"},
                                    str(notes / "cfg.yaml")]), encoding="utf-8")
    result = audit(manifest, note="hand-off to the next session")
    text = Path(result["path"]).read_text(encoding="utf-8")
    assert result["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert "## Contents" in text and "1. [plan.md](#1-planmd)" in text and "> hand-off to the next session" in text
    assert "```markdown\n# Plan" in text and "```yaml\nlora_r: 16\n```" in text
    assert "````python\nprint('```tricky```')\n````" in text  # a longer fence than any backtick run inside
    assert "the entry point" in text
    for entry in result["files"]:
        assert f"sha256 `{entry['sha256']}`" in text
        assert entry["sha256"] == hashlib.sha256(Path(entry["path"]).read_bytes()).hexdigest()


def test_audit_refuses_paths_outside_the_allowed_roots_and_writes_nothing(home, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("secret", encoding="utf-8")
    manifest = Path(home) / "manifest.json"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps([str(outside), "/etc/hostname"]), encoding="utf-8")
    output = Path(home) / "bundle.md"
    with pytest.raises(ForgeError) as info:
        audit(manifest, output=output)
    assert info.value.code == "path_not_allowed"
    assert info.value.details == [f"{outside}: outside the allowed roots", "/etc/hostname: outside the allowed roots"]
    assert not output.exists()


def test_snapshot_seal_seals_the_newest_run(home, trained, monkeypatch):
    import shutil

    run = Path(home) / "runs" / "copied"
    shutil.copytree(trained["run_dir"], run)
    result = snapshot(SnapshotConfig(type="seal", note="via snapshot"))
    assert result["type"] == "seal" and result["seal_id"].startswith("sha256:")
    record = json.loads(Path(result["seal_path"]).read_text(encoding="utf-8"))
    assert record["runs"][0]["run_dir"] == str(run.resolve()) and record["note"] == "via snapshot"


def test_snapshot_cli_audit_json(home, capsys):
    Path(home).mkdir(parents=True, exist_ok=True)
    (Path(home) / "a.txt").write_text("hello\n", encoding="utf-8")
    manifest = Path(home) / "m.json"
    manifest.write_text('["a.txt"]', encoding="utf-8")
    assert main(["snapshot", "--type", "audit", "--manifest", str(manifest), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["type"] == "audit" and Path(out["path"]).is_file() and len(out["files"]) == 1
    assert main(["snapshot", "--type", "audit", "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["error"]["code"] == "config_invalid"
