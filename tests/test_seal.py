import hashlib
import json
import shutil
from pathlib import Path

import pytest

from forge.cli import main
from forge.errors import ForgeError
from forge.modelfile import ModelfileConfig, write_modelfile
from forge.seal import SealConfig, render_retrospective, seal, verify


@pytest.fixture(scope="module")
def sealed_run(quantized, trained, tmp_path_factory):
    """A copy of the session's run (so byte flips here never touch other tests), with a Modelfile, sealed."""
    run = tmp_path_factory.mktemp("sealed") / "run"
    shutil.copytree(trained["run_dir"], run)
    for stage in (run / "stages").glob("*.json"):  # the copy's records point at the copy
        stage.write_text(stage.read_text(encoding="utf-8").replace(trained["run_dir"], str(run)), encoding="utf-8")
    gguf = next(run.glob("gguf/*-Q4_K_M.gguf"))
    write_modelfile(ModelfileConfig(gguf=gguf, force=True))
    return run


def test_record_is_canonical_json_whose_hash_is_its_id(sealed_run):
    result = seal(SealConfig(run_dirs=[sealed_run], note="unit test", project_dir=Path(__file__).parent))
    data = Path(result["seal_path"]).read_bytes()
    assert result["seal_id"] == "sha256:" + hashlib.sha256(data).hexdigest()
    record = json.loads(data)
    assert data == json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert record["note"] == "unit test"
    run = record["runs"][0]
    assert set(run["stages"]) == {"train", "merge", "quantize", "modelfile"}
    assert set(run["configs"]) == {"train", "merge", "quantize", "modelfile"}
    assert run["dataset"]["sha256"] == hashlib.sha256(Path(run["dataset"]["path"]).read_bytes()).hexdigest()
    assert run["dataset"]["tokens"]["records"] > 0
    assert {a["kind"] for a in run["artifacts"]} == {"adapter", "merged", "gguf", "imatrix", "modelfile"}
    assert [a["path"].endswith(".imatrix.gguf") for a in run["artifacts"] if a["kind"] == "imatrix"] == [True]
    for a in run["artifacts"]:
        assert a["sha256"] == hashlib.sha256(Path(a["path"]).read_bytes()).hexdigest()
    assert run["chat_template_sha256"] and run["loss_curve"] and run["metrics"]["eval_loss"] is not None
    assert record["versions"]["trl"] and record["hardware"]["device"] == "cpu"
    assert record["git"]["git"] is True and len(record["git"]["commit"]) == 40
    assert any("pre-tokenizer" in w for w in record["warnings"])
    seal_dir = Path(result["seal_dir"])
    assert seal_dir.parent.name == "seals" and seal_dir.name.endswith(result["seal_id"][7:19])


def test_seals_chain_and_never_overwrite(sealed_run):
    first = seal(SealConfig(run_dirs=[sealed_run]))
    second = seal(SealConfig(run_dirs=[sealed_run], note="again"))
    assert second["previous"] == first["seal_id"]
    assert Path(first["seal_path"]).is_file() and first["seal_dir"] != second["seal_dir"]
    report = verify(second["seal_id"])
    assert report["ok"] and report["chain"][:2] == [second["seal_id"], first["seal_id"]]


def test_verify_fails_precisely_after_one_gguf_byte_flips(sealed_run):
    result = seal(SealConfig(run_dirs=[sealed_run]))
    assert verify(result["seal_id"])["ok"]
    gguf = next(sealed_run.glob("gguf/*-Q4_K_M.gguf"))
    original = gguf.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x01
    gguf.write_bytes(bytes(flipped))
    try:
        report = verify(result["seal_id"])
        assert not report["ok"]
        assert [m["file"] for m in report["mismatches"]] == [str(gguf)]
        assert report["mismatches"][0]["expected"] == hashlib.sha256(original).hexdigest()
        assert report["mismatches"][0]["found"] == hashlib.sha256(bytes(flipped)).hexdigest()
        assert main(["seal", "verify", result["seal_id"]]) == 1
    finally:
        gguf.write_bytes(original)
    assert verify(result["seal_id"])["ok"]


def test_verify_fails_after_the_record_is_edited_and_walks_the_chain(sealed_run):
    older = seal(SealConfig(run_dirs=[sealed_run], note="older"))
    newer = seal(SealConfig(run_dirs=[sealed_run], note="newer"))
    path = Path(older["seal_path"])
    original = path.read_bytes()
    path.write_bytes(original.replace(b'"note":"older"', b'"note":"edited"'))
    try:
        report = verify(newer["seal_id"])  # the newer seal is intact, but its chain is not
        assert not report["ok"]
        assert report["mismatches"] == [{"file": str(path), "expected": older["seal_id"],
                                         "found": "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()}]
    finally:
        path.write_bytes(original)


def test_missing_artifacts_are_listed_not_failed(sealed_run, tmp_path):
    extra = sealed_run / "gguf" / "Modelfile"
    saved = extra.read_bytes()
    result = seal(SealConfig(run_dirs=[sealed_run]))
    extra.unlink()
    try:
        report = verify(result["seal_id"])
        assert report["ok"] and report["missing"] == [str(extra)]
    finally:
        extra.write_bytes(saved)


def test_retrospective_renders_from_the_record_alone_with_a_loss_curve_png(sealed_run):
    result = seal(SealConfig(run_dirs=[sealed_run]))
    seal_dir = Path(result["seal_dir"])
    record = json.loads((seal_dir / "seal.json").read_text(encoding="utf-8"))
    text = render_retrospective(record, result["seal_id"], plot="loss_curve.png")
    assert text == (seal_dir / "retrospective.md").read_text(encoding="utf-8")
    for row in ("| Final epoch | 2 |", "| Total duration |", "| Train loss |", "| Eval loss |", "| Output |",
                "| Samples/s |", "| Steps/s |", "| Tokens/s |", "| Peak memory |", "| Hardware | CPU"):
        assert row in text
    assert "### Artifacts" in text and "## Friction" in text and "pre-tokenizer" in text
    assert "![loss curve](loss_curve.png)" in text and "ollama create" in text and "forge publish" in text
    png = (seal_dir / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(seal_dir / "loss_curve.png") as image:
        assert image.size == (700, 400)


def test_unknown_seal_id_is_a_clear_error():
    with pytest.raises(ForgeError) as info:
        verify("sha256:" + "0" * 64)
    assert info.value.code == "seal_not_found"
