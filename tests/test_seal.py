import hashlib
import json
from pathlib import Path

from forge.modelfile import ModelfileConfig, write_modelfile
from forge.seal import SealConfig, render_retrospective, seal


def test_seal_record_is_canonical_json_whose_hash_is_its_id(quantized, trained):
    write_modelfile(ModelfileConfig(gguf=quantized["outputs"][-1]["path"], force=True))
    result = seal(SealConfig(run_dir=trained["run_dir"], note="unit test"))
    data = Path(result["seal_path"]).read_bytes()
    assert result["seal_id"] == "sha256:" + hashlib.sha256(data).hexdigest()
    record = json.loads(data)
    assert data == json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert record["note"] == "unit test"
    assert set(record["stages"]) == {"train", "merge", "quantize", "modelfile"}
    assert record["dataset"]["sha256"] == hashlib.sha256(Path(record["dataset"]["path"]).read_bytes()).hexdigest()
    kinds = {a["kind"] for a in record["artifacts"]}
    assert kinds == {"adapter", "merged", "gguf", "modelfile"}
    for a in record["artifacts"]:
        assert a["sha256"] == hashlib.sha256(Path(a["path"]).read_bytes()).hexdigest()
    assert record["versions"]["trl"] and record["hardware"]["device"] == "cpu"
    assert record["chat_template_sha256"] and record["loss_curve"]


def test_retrospective_renders_from_the_record_alone(quantized, trained):
    result = seal(SealConfig(run_dir=trained["run_dir"]))
    record = json.loads(Path(result["seal_path"]).read_text(encoding="utf-8"))
    text = render_retrospective(record, result["seal_id"])
    assert text == Path(result["retrospective_path"]).read_text(encoding="utf-8")
    for row in ("| Final epoch | 2 |", "| Total duration |", "| Train loss |", "| Eval loss |", "| Output |",
                "| Samples/s |", "| Steps/s |", "| Tokens/s |", "| Peak memory |", "| Hardware | CPU"):
        assert row in text
    assert "## Artifacts" in text and "## Friction" in text and "pre-tokenizer" in text
    assert "ollama create" in text  # next steps name the exact command
