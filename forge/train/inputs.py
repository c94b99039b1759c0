"""The training inputs: the dataset validated, split and tokenized through the chat template into rows (packed
as the config asks), or into preference pairs for dpo and orpo. Reading datasets itself: ``forge.data``."""

from __future__ import annotations

from dataclasses import dataclass

from forge.errors import Codes, ForgeError
from forge.packing import PackedCollator, labels_from_mask, pack, single_rows, truncate_records
from forge.progress import ProgressWriter
from forge.train.config import TrainConfig


@dataclass
class TrainData:
    tokenizer: object
    template: dict  # the chat template trained with: source, sha256, tokens added to the vocabulary
    dataset: object  # forge.data.Dataset
    train_records: int
    eval_records: int
    stats: dict
    train_set: object
    eval_set: object | None
    collator: object | None


def _rows(tokens, config: TrainConfig) -> list[dict]:
    pairs = zip(tokens.input_ids, tokens.assistant_masks, strict=True)
    records = truncate_records([{"input_ids": ids, "labels": labels_from_mask(ids, mask)} for ids, mask in pairs],
                               config.max_length)
    return pack(records, row_length=config.max_length) if config.packing == "bfd" else single_rows(records)


def prepare_data(config: TrainConfig, model_ref: str, writer: ProgressWriter) -> TrainData:
    """Validate, split and tokenize through the chat template; rows packed as the config asks."""
    import datasets
    from datasets import Dataset as HFDataset

    from forge import data, tokens

    datasets.disable_progress_bars()  # their bars are noise next to progress.jsonl
    writer.stage("preparing_data")
    tokenizer, template = tokens.prepare_tokenizer(model_ref, config.chat_template)
    if template.get("warning"):
        writer({"event": "warning", "message": template["warning"]})
    ds = data.load_dataset(config.dataset, config.dataset_format, config.system_prompt)
    if config.preference:
        if config.eval_dataset is not None:
            raise ForgeError(Codes.INVALID_ARGUMENT, f"eval_dataset is for lora and qlora, not {config.method}",
                             "leave eval_dataset out: preference pairs are held out by eval_fraction")
        return _preference_data(config, tokenizer, template, ds)
    train_convs, eval_convs = data.split(ds.conversations, config.eval_fraction, config.seed)
    if config.eval_dataset is not None:  # held out by the user: every record of dataset trains
        train_convs = ds.conversations
        eval_convs = data.load_dataset(config.eval_dataset, config.dataset_format, config.system_prompt).conversations
    tool_tokens = tokens.tool_list_tokens(tokenizer, ds.conversations)
    train_tokens = tokens.tokenize_all(tokenizer, train_convs)
    stats = tokens.token_stats(train_tokens, config.max_length)
    if tool_tokens:
        stats["tool_list_tokens"] = tool_tokens
        for warning in tokens.tool_warnings(stats, config.max_length):
            writer({"event": "warning", "message": warning})
    if not config.assistant_only_loss:
        train_tokens.assistant_masks = [[1] * len(m) for m in train_tokens.assistant_masks]
    eval_tokens = tokens.tokenize_all(tokenizer, eval_convs) if eval_convs else None
    collator = None
    if config.packing != "none":
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        train_set = HFDataset.from_list(_rows(train_tokens, config))
        eval_set = HFDataset.from_list(_rows(eval_tokens, config)) if eval_tokens else None
        collator = PackedCollator(pad_token_id=pad_id, flatten=config.packing == "padding_free")
    else:
        train_set = HFDataset.from_list(train_tokens.as_records())
        eval_set = HFDataset.from_list(eval_tokens.as_records()) if eval_tokens else None
    return TrainData(tokenizer, template, ds, len(train_convs), len(eval_convs), stats, train_set, eval_set, collator)


def _preference_data(config: TrainConfig, tokenizer, template: dict, ds) -> TrainData:
    """Preference pairs for TRL: conversational for DPO (TRL renders them through the chat template, the
    answer's end-of-turn token included); rendered here for ORPO, whose trainer takes text."""
    from datasets import Dataset as HFDataset

    from forge import data, tokens

    if template["added_tokens"]:
        raise ForgeError(Codes.INVALID_ARGUMENT,
                         f"method={config.method} cannot teach a base model new chat tokens "
                         f"({', '.join(template['added_tokens'])})",
                         "train with method=lora and chat_template first, merge, then run "
                         f"method={config.method} on the merged model")
    pairs = ds.preference_pairs()
    train_pairs, eval_pairs = data.split(pairs, config.eval_fraction, config.seed)
    train_convs, _ = data.split(ds.conversations, config.eval_fraction, config.seed)
    stats = tokens.token_stats(tokens.tokenize_all(tokenizer, train_convs), config.max_length)  # on the chosen answers
    if config.method == "orpo":
        train_pairs = [tokens.render_pair(tokenizer, p) for p in train_pairs]
        eval_pairs = [tokens.render_pair(tokenizer, p) for p in eval_pairs]
    return TrainData(tokenizer, template, ds, len(train_pairs), len(eval_pairs), stats,
                     HFDataset.from_list(train_pairs), HFDataset.from_list(eval_pairs) if eval_pairs else None, None)
