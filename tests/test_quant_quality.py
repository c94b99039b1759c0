"""What each quant loses, measured the way llama.cpp measures it (KL divergence from the f16 GGUF, same top
token), an importance matrix llama.cpp computes from the run's own training data, and `auto`, which keeps the
smallest quant within a budget: on the tiny demo run (the real model's figures are in test_real_tools)."""

import json
import os
import shutil
from pathlib import Path

import anyio
import pytest

from forge import llama_tools, quant_plan
from forge.converter import gguf_fields
from forge.errors import Codes, ForgeError
from forge.measure_set import run_measure_set
from forge.quant_quality import measure
from forge.quantize import QuantizeConfig, quantize
from forge.runs import find_run_dir

CANDIDATES = ["Q8_0", "Q5_K_M", "Q4_K_M", "Q2_K"]


def _scored(merged):
    from transformers import AutoTokenizer  # here, not at collection: HF_HUB_OFFLINE is set by then

    run_dir = find_run_dir(Path(merged["merged_dir"]))
    return run_measure_set(run_dir, AutoTokenizer.from_pretrained(merged["merged_dir"]))[0]


def _auto(merged, tmp_path, name, **options) -> dict:
    return quantize(QuantizeConfig(model_dir=merged["merged_dir"], output_dir=tmp_path, gguf_name=name,
                                   quantizations=["auto"], candidates=CANDIDATES, verify=False, **options))


def test_the_f16_against_itself_loses_nothing_and_q8_0_loses_less_than_q4_k_m(merged, quantized, tmp_path):
    f16 = Path(quantized["outputs"][0]["path"])
    scored = _scored(merged)
    q8 = tmp_path / "q8.gguf"
    from forge.quantize import quantize_file

    quantize_file(f16, q8, "Q8_0")
    same, q8_0, q4 = measure(f16, [f16, q8, Path(quantized["outputs"][-1]["path"])], scored)
    assert same["kld_mean"] < 1e-6 and same["kld_max"] < 1e-5 and same["same_top_pct"] == 100.0
    assert abs(same["delta_ppl"]) < 1e-6 and same["positions"] > scored.tokens > 0
    assert 0 < q8_0["kld_mean"] < q4["kld_mean"] and q8_0["same_top_pct"] >= q4["same_top_pct"]
    assert q8_0["bpw"] == pytest.approx(8.5, abs=0.3) and q4["bpw"] < q8_0["bpw"] < same["bpw"]
    assert same["measured_on"].startswith(f"KLD and same top token over {same['positions']} positions of ")


def test_an_importance_matrix_from_the_training_data_is_what_llama_cpp_quantized_with(quantized):
    matrix = quantized["imatrix"]
    assert matrix["used"] and matrix["setting"] == "auto" and matrix["used_for"] == ["Q4_K_M"]
    assert matrix["source"].startswith("training split of ") and matrix["tokens"] >= 64 and matrix["chunks"] >= 2
    fields, _ = gguf_fields(Path(matrix["path"]), ("general.type", "imatrix.chunk_count"))
    assert fields["general.type"] == "imatrix" and fields["imatrix.chunk_count"] == matrix["chunks"]
    # llama-quantize loaded it: the Q4_K_M's header records the matrix's entries and its calibration file
    header, _ = gguf_fields(Path(quantized["outputs"][-1]["path"]),
                            ("quantize.imatrix.entries_count", "quantize.imatrix.dataset"))
    assert header["quantize.imatrix.entries_count"] > 0 and header["quantize.imatrix.dataset"] == "calibration.txt"
    assert not (Path(matrix["path"]).parent / "calibration.txt").exists()  # the copy of the data is gone
    assert any(a["kind"] == "imatrix" and a["path"] == matrix["path"] for a in quantized["artifacts"])
    comparison = matrix["comparison"]
    # here the matrix measured better, so the Q4_K_M made with it keeps the name and the other goes
    assert comparison["quant"] == "Q4_K_M" and comparison["kept"] == "with"
    assert comparison["with"]["kld_mean"] < comparison["without"]["kld_mean"]
    assert comparison["with"] == {k: quantized["outputs"][-1]["quality"][k] for k in comparison["with"]}
    assert comparison["without"]["kld_mean"] > 0 and comparison["without"]["bytes"] > 0
    assert not list(Path(quantized["gguf_dir"]).glob("*-no-imatrix.gguf"))


def test_auto_keeps_the_smallest_candidate_within_its_budget_and_says_why(merged, tmp_path):
    loose = _auto(merged, tmp_path / "loose", "loose", max_kld=10.0)
    measured = {c["quant"]: c for c in loose["auto"]["candidates"]}
    assert list(measured) == CANDIDATES and all(c["kld_mean"] is not None for c in measured.values())
    # a budget between two measured candidates: the smallest one inside it is kept, the rest deleted
    by_size = sorted(measured.values(), key=lambda c: c["bytes"])
    inside, outside = sorted((by_size[0]["kld_mean"], by_size[-1]["kld_mean"]))[::-1]
    budget = (inside + outside) / 2 if inside > outside else inside * 1.01
    picked = _auto(merged, tmp_path / "mid", "mid", max_kld=budget)
    auto = picked["auto"]
    fitting = [c for c in auto["candidates"] if c["kld_mean"] <= budget]
    assert auto["within_budget"] and auto["chosen"] == min(fitting, key=lambda c: c["bytes"])["quant"]
    chosen = picked["outputs"][-1]
    assert chosen["quant"] == auto["chosen"] and chosen["path"] == auto["path"] and Path(chosen["path"]).is_file()
    assert [o["quant"] for o in picked["outputs"]] == ["f16", auto["chosen"]]
    assert sorted(p.name for p in (tmp_path / "mid").glob("*.gguf")) == sorted(
        ["mid-f16.gguf", f"mid-{auto['chosen']}.gguf", "mid.imatrix.gguf"])  # the others are deleted
    assert auto["why"].startswith(f"{auto['chosen']} (") and f"mean KLD ≤ {budget:g}" in auto["why"]
    assert "measured on KLD and same top token over" in auto["why"]
    assert picked["imatrix"]["comparison"] is None or picked["imatrix"]["comparison"]["quant"] == auto["chosen"]


def test_auto_with_no_candidate_inside_the_budget_keeps_the_closest_and_warns(merged, tmp_path):
    out = _auto(merged, tmp_path, "tight", max_kld=1e-9, compare_imatrix=False, keep_candidates=True)
    auto = out["auto"]
    closest = min(auto["candidates"], key=lambda c: c["kld_mean"])
    assert not auto["within_budget"] and auto["chosen"] == closest["quant"] == out["outputs"][-1]["quant"]
    assert any(w.startswith("no candidate is within the budget") for w in out["warnings"])
    assert len(out["outputs"]) == 1 + len(CANDIDATES)  # keep_candidates: every file stays, the choice last


def test_a_same_top_token_floor_is_part_of_the_budget(merged, tmp_path):
    first = _auto(merged, tmp_path / "all", "all", max_kld=10.0, compare_imatrix=False, keep_candidates=True)
    tops = sorted({c["same_top_pct"] for c in first["auto"]["candidates"]})
    assert len(tops) >= 2, tops  # the candidates differ in how often they keep the f16's top token
    floor = (tops[0] + tops[1]) / 2  # excludes the worst, keeps the rest
    out = _auto(merged, tmp_path / "floor", "floor", max_kld=10.0, min_same_top=floor, compare_imatrix=False)
    auto = out["auto"]
    fitting = [c for c in auto["candidates"] if c["same_top_pct"] >= floor]
    assert auto["within_budget"] and auto["chosen"] == min(fitting, key=lambda c: c["bytes"])["quant"]
    assert f"same top token ≥ {floor:g} %" in auto["budget"]["text"] and f"≥ {floor:g} %" in auto["why"]


def _candidate(quant: str, size: int, kld: float | None, top: float | None = 90.0) -> dict:
    return {"quant": quant, "bytes": size, "quality": {"kld_mean": kld, "same_top_pct": top,
                                                       "measured_on": "KLD over 10 positions"}}


def test_choose_takes_the_smallest_file_within_the_budget_whatever_the_type_names_say():
    measured = [_candidate("Q8_0", 800, 0.001), _candidate("Q5_K_M", 500, 0.2),  # bigger yet worse
                _candidate("Q4_K_M", 450, 0.04), _candidate("Q2_K", 300, 0.3), _candidate("X", 100, None)]
    chosen, why, fits = quant_plan.choose(measured, 0.05, None)
    assert fits and chosen["quant"] == "Q4_K_M" and why.startswith("Q4_K_M (0.0 MB, mean KLD 0.04")
    assert "smaller ones exceed it: Q2_K" in why and "X" not in why  # the unmeasured one is left out
    chosen, why, fits = quant_plan.choose(measured, 0.0001, None)
    assert not fits and chosen["quant"] == "Q8_0" and why.startswith("no candidate is within the budget")
    chosen, _, fits = quant_plan.choose([_candidate("A", 200, 0.01), _candidate("B", 200, 0.01)], 0.05, None)
    assert fits and chosen["quant"] == "A"  # a tie keeps the first (the larger type in the candidate order)
    with pytest.raises(ForgeError) as info:
        quant_plan.choose([_candidate("X", 100, None)], 0.05, None)
    assert info.value.code == Codes.DATASET_INVALID and info.value.hint


def test_a_type_llama_cpp_makes_only_with_a_matrix_is_made_and_not_compared_without_one(merged, tmp_path):
    out = quantize(QuantizeConfig(model_dir=merged["merged_dir"], output_dir=tmp_path, gguf_name="iq",
                                  quantizations=["IQ2_XXS"], verify=False))
    made = out["outputs"][-1]
    assert made["quant"] == "IQ2_XXS" and made["imatrix"] and made["quality"]["kld_mean"] > 0
    assert out["imatrix"]["comparison"] is None and not list(tmp_path.glob("*no-imatrix*"))


def test_when_the_matrix_measures_worse_the_file_made_without_it_keeps_the_name(tmp_path):
    """A matrix from too little text can cost more than it saves: the better-measured file is kept."""
    made, plain = tmp_path / "r-Q4_K_M.gguf", tmp_path / "r-Q4_K_M-no-imatrix.gguf"
    made.write_bytes(b"with the matrix")
    plain.write_bytes(b"without it")

    def quality(kld: float) -> dict:
        return {"kld_mean": kld, "kld_p99": kld * 5, "same_top_pct": 90.0, "ppl": 2.0, "delta_ppl": 0.1,
                "bytes": 15, "bpw": 5.0, "measured_on": "KLD over 10 positions"}

    plan = quant_plan.Kept([{"quant": "f16", "path": tmp_path / "r-f16.gguf", "imatrix": False},
                            {"quant": "Q4_K_M", "path": made, "imatrix": True, "quality": quality(0.2)}])
    plan.twin = {"quant": "Q4_K_M-no-imatrix", "path": plain, "imatrix": False, "of": plan.files[1],
                 "quality": quality(0.1)}
    plan.settle_twin(keep=False)
    assert made.read_bytes() == b"without it" and not plain.exists()
    assert plan.kept[-1]["imatrix"] is False and plan.kept[-1]["quality"]["kld_mean"] == 0.1
    assert plan.comparison["kept"] == "without" and plan.comparison["kld_change_pct"] == 100.0
    assert plan.warnings[0].startswith("the importance matrix made Q4_K_M worse on the measure set")
    record = plan.imatrix_record({"path": "m.gguf", "source": "training split of d.jsonl"}, "auto")
    assert record["used_for"] == [] and record["comparison"]["kept"] == "without"


def test_evaluate_reuses_only_measurements_of_files_that_did_not_change(quantized, tmp_path):
    from forge import evaluate

    def _measured_by_quantize(stage: dict, outputs: list, basis: dict) -> list:
        return evaluate._measured_by_quantize(stage, outputs, evaluate._same_basis(stage, basis))

    stage = json.loads(json.dumps(quantized, default=str))
    outputs = stage["outputs"]
    basis = stage["measured_on"]
    reused = _measured_by_quantize(stage, outputs, basis)
    assert [q is not None for q in reused] == [True, True]
    changed = [dict(outputs[0]), {**outputs[1], "sha256": "0" * 64}]  # the Q4_K_M is not the file measured
    assert [q is not None for q in _measured_by_quantize(stage, changed, basis)] == [True, False]
    other_tokens = {**basis, "tokens": basis["tokens"] + 1}
    assert _measured_by_quantize(stage, outputs, other_tokens) == [None, None]
    other_reference = {**stage, "outputs": [{**outputs[0], "sha256": "0" * 64}, outputs[1]]}
    assert _measured_by_quantize(other_reference, outputs, basis) == [None, None]


@pytest.mark.parametrize(("options", "code", "words"), [
    ({"quantizations": ["auto", "Q4_K_M"]}, Codes.CONFIG_INVALID, "alone"),
    ({"quantizations": ["IQ2_XXS"], "imatrix": "off"}, Codes.CONFIG_INVALID, "without an importance matrix"),
    ({"candidates": ["Q4_K_XL"]}, Codes.INVALID_ARGUMENT, "not a llama.cpp quantization type"),
])
def test_bad_quantize_options_are_named_with_the_fix(merged, tmp_path, options, code, words):
    with pytest.raises(ForgeError) as info:
        quantize(QuantizeConfig.build(model_dir=merged["merged_dir"], output_dir=tmp_path, **options))
    assert info.value.code == code and words in info.value.message and info.value.hint


def test_an_imatrix_path_that_is_missing_or_outside_the_roots_is_refused_before_any_work(merged, forge_home,
                                                                                         tmp_path):
    for path, code in ((forge_home / "no.gguf", Codes.FILE_NOT_FOUND), ("/etc/passwd", Codes.PATH_NOT_ALLOWED)):
        with pytest.raises(ForgeError) as info:
            quantize(QuantizeConfig(model_dir=merged["merged_dir"], output_dir=tmp_path, imatrix=str(path)))
        assert info.value.code == code and info.value.hint and not list(tmp_path.glob("*.gguf"))


def test_auto_needs_records_to_measure_on(merged, tmp_path):
    import shutil

    loose = tmp_path / "loose-model"
    shutil.copytree(merged["merged_dir"], loose)  # the same model, outside any run
    with pytest.raises(ForgeError) as info:
        quantize(QuantizeConfig(model_dir=loose, output_dir=tmp_path / "out", quantizations=["auto"]))
    assert info.value.code == Codes.RUN_NOT_FOUND and "name the types" in info.value.hint


def test_without_llama_cpp_tools_auto_quantizes_plainly_and_says_so(merged, tmp_path, monkeypatch):
    monkeypatch.setenv(llama_tools.ENV_DIR, str(tmp_path / "nothing-here"))
    out = quantize(QuantizeConfig(model_dir=merged["merged_dir"], output_dir=tmp_path / "out", gguf_name="plain",
                                  measure=False, verify=False))
    assert not out["imatrix"]["used"] and not out["outputs"][-1]["imatrix"]
    assert any("without an importance matrix" in w and llama_tools.ENV_DIR in w for w in out["warnings"])
    with pytest.raises(ForgeError) as info:  # a type that cannot be made without one is an error, not a warning
        quantize(QuantizeConfig(model_dir=merged["merged_dir"], output_dir=tmp_path / "iq", quantizations=["IQ2_XXS"],
                                measure=False, verify=False))
    assert info.value.code == Codes.LLAMA_TOOLS_MISSING and llama_tools.ENV_DIR in info.value.hint


def test_the_tools_build_is_found_where_make_links_it():
    found = llama_tools.find_tools()
    assert found is not None, "llama.cpp's tools are missing: run `make test`, which builds them once"
    if not os.environ.get(llama_tools.ENV_DIR):  # a llama.cpp build of the user's own carries no manifest
        manifest = json.loads((found / llama_tools.MANIFEST).read_text(encoding="utf-8"))
        assert manifest["llama_cpp_python"] == llama_tools.llama_cpp_version()


SLOW_TOOL = """#!/bin/sh
echo $$ > "$FORGE_TEST_PIDFILE"
exec sleep 600
"""


@pytest.mark.anyio
async def test_cancelling_a_quantize_job_ends_the_llama_cpp_tool_and_leaves_no_copy_of_the_data(
        merged, assets, home, tmp_path, monkeypatch):
    """A stand-in for llama-imatrix that never ends (llama.cpp's own takes seconds here): the cancel must end
    it, and the private dir holding the calibration text (training data) must go with it."""
    from mcp import Client

    from helpers import call_ok, stop_runner, wait_job
    from mcp_servers.forge.server import create_server

    tools, pidfile = tmp_path / "tools", tmp_path / "imatrix.pid"
    tools.mkdir()
    for name in llama_tools.TOOLS:
        (tools / name).write_text(SLOW_TOOL, encoding="utf-8")
        (tools / name).chmod(0o755)
    monkeypatch.setenv(llama_tools.ENV_DIR, str(tools))
    monkeypatch.setenv("FORGE_TEST_PIDFILE", str(pidfile))
    monkeypatch.setenv("FORGE_ALLOWED_ROOTS", str(Path(assets["dataset"]).parent))  # the run's training data
    run = find_run_dir(Path(merged["merged_dir"]))
    copy = home / "runs" / "mine"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("gguf", "checkpoints"))
    for record in (copy / "stages").glob("*.json"):  # its records name its own files
        record.write_text(record.read_text(encoding="utf-8").replace(str(run), str(copy)), encoding="utf-8")
    server = create_server()
    try:
        async with Client(server) as client:
            job = await call_ok(client, "forge_quantize", {"model": str(copy / "merged")})
            with anyio.fail_after(600):
                while not pidfile.exists() or not pidfile.read_text().strip():
                    status = await call_ok(client, "forge_job_status", {"job_id": job["job_id"]})
                    assert status["status"] in ("queued", "running"), status.get("error")  # it must reach the tool
                    await anyio.sleep(0.2)
            pid = int(pidfile.read_text())
            await call_ok(client, "forge_job_cancel", {"job_id": job["job_id"]})
            done = await wait_job(client, job["job_id"])
    finally:
        stop_runner(server.runner)
    assert done["status"] == "cancelled", done
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the tool ended with the job
    assert not list((copy / "gguf").glob(".*imatrix*")) and not list(copy.rglob("calibration.txt"))
