import json

import pytest

from forge.data import DataConfig, load_dataset, split, validate
from forge.errors import Codes, ForgeError
from forge.tokens import token_stats, tokenize_all, tokenize_conversation


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("rows,fmt", [
    ([{"instruction": "Say hi", "input": "", "output": "Hi."}], "alpaca"),
    ([{"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi."}]}], "messages"),
    ([{"prompt": "Say hi", "completion": "Hi."}], "prompt_completion"),
])
def test_each_format_is_detected_and_becomes_chat_messages(tmp_path, rows, fmt):
    ds = load_dataset(write_jsonl(tmp_path / "d.jsonl", rows), system_prompt="Be brief.")
    assert ds.format == fmt
    assert ds.conversations[0] == [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "Say hi"},
                                   {"role": "assistant", "content": "Hi."}]


def test_alpaca_input_is_appended_to_the_instruction(tmp_path):
    ds = load_dataset(write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Translate.", "input": "Merci",
                                                          "output": "Thanks."}]))
    assert ds.conversations[0][0]["content"] == "Translate.\n\nMerci"


def test_every_bad_line_is_reported_at_once_with_its_line_number(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"instruction": "ok", "output": "fine"},            # 1 good
        "{not json",                                         # 2 bad JSON
        "[1, 2]",                                            # 3 not an object
        {"instruction": "no answer"},                        # 4 missing output
        {"instruction": "  ", "output": "x"},                # 5 empty instruction
        {"instruction": "x", "output": 7},                   # 6 wrong type
        {"messages": [{"role": "user", "content": "hi"}]},   # 7 other format
    ])
    with pytest.raises(ForgeError) as info:
        load_dataset(path)
    err = info.value
    assert err.code == Codes.DATASET_INVALID
    text = "\n".join(err.details)
    for needle in ["line 2: not valid JSON", "line 3: expected a JSON object", "line 4: missing field 'output'",
                   "line 5: field 'instruction' is empty", "line 6: field 'output' must be a string",
                   "line 7: looks like a 'messages' record"]:
        assert needle in text
    assert len(err.details) == 6
    assert "non-empty 'instruction' and 'output'" in err.details[2]  # each problem says how to fix it


def test_bad_messages_records_name_the_role_and_missing_assistant(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [
        {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "ok"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": []},
    ])
    with pytest.raises(ForgeError) as info:
        load_dataset(path, fmt="messages")
    text = "\n".join(info.value.details)
    assert "line 1: messages[0].role is 'robot'" in text
    assert "line 2: no assistant message" in text
    assert "line 3: field 'messages' must be a non-empty list" in text


def test_missing_and_empty_files_are_clear_errors(tmp_path):
    with pytest.raises(ForgeError) as info:
        load_dataset(tmp_path / "nope.jsonl")
    assert info.value.code == Codes.DATASET_NOT_FOUND
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(ForgeError) as info:
        load_dataset(tmp_path / "empty.jsonl")
    assert info.value.code == Codes.DATASET_INVALID and "no records" in info.value.message


def test_split_is_deterministic_by_seed():
    items = list(range(50))
    assert split(items, 0.2, seed=1) == split(items, 0.2, seed=1)
    train, evals = split(items, 0.2, seed=1)
    assert len(evals) == 10 and sorted(train + evals) == items
    assert split(items, 0.2, seed=2)[1] != evals


def test_assistant_mask_covers_the_answer_and_its_end_of_turn_token(assets):
    from forge.tokens import load_tokenizer

    tok = load_tokenizer(assets["model_dir"])
    convo = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "more"}, {"role": "assistant", "content": "Ok"}]
    ids, mask = tokenize_conversation(tok, convo)
    trained = [tok.convert_ids_to_tokens(i) for i, m in zip(ids, mask, strict=True) if m]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    # both turns' end-of-turn tokens are trained; the user's is not
    assert [i for i, m in zip(ids, mask, strict=True) if m].count(im_end) == 2
    assert ids.count(im_end) == 4
    trained_text = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert trained_text.replace("\n", "") == "Hello.<|im_end|>Ok<|im_end|>"
    assert "<|im_start|>" not in trained


def test_stats_report_lengths_truncation_and_loss_share(assets):
    report = validate(DataConfig(path=assets["dataset"], base_model=assets["model_dir"], max_length=30))
    stats = report["tokens"]
    assert stats["records"] == 60
    assert stats["tokens_min"] <= stats["tokens_median"] <= stats["tokens_p95"] <= stats["tokens_max"]
    assert 0 < stats["truncated_share"] < 1
    assert 0 < stats["loss_token_share"] < 1
    assert any("truncated" in w for w in report["warnings"])


def test_dataset_with_no_trainable_token_is_refused(assets, tmp_path):
    from forge.tokens import load_tokenizer

    tok = load_tokenizer(assets["model_dir"])
    path = write_jsonl(tmp_path / "long_prompts.jsonl",
                       [{"instruction": "word " * 200, "output": "short answer"}] * 3)
    ds = load_dataset(path)
    with pytest.raises(ForgeError) as info:
        token_stats(tokenize_all(tok, ds.conversations), max_length=64)
    assert info.value.code == Codes.EMPTY_LOSS_MASK
    assert "max_length=64" in info.value.message
