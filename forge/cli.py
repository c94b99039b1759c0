"""The ``forge`` command line. Each stage's flags come from its pydantic config, so the CLI and
the config files can never disagree; ``--config FILE`` loads YAML, flags override it."""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from forge.errors import Codes, ForgeError
from forge.progress import quiet_libraries
from forge.runs import Outcome
from forge.term import ProgressBar


def _add_config_flags(parser: argparse.ArgumentParser, model: type[BaseModel], positional: str | None = None,
                      exclude: tuple[str, ...] = ()):
    for name, field in model.model_fields.items():
        if name in exclude:
            continue
        flag = "--" + name.replace("_", "-")
        ann = field.annotation
        origin, args = typing.get_origin(ann), typing.get_args(ann)
        if origin in (typing.Union, types.UnionType):
            ann = next(a for a in args if a is not type(None))
            origin, args = typing.get_origin(ann), typing.get_args(ann)
        help_text = (field.description or "").replace("%", "%%")  # argparse formats help with %
        if name == positional:
            parser.add_argument(name, nargs="?", default=None, help=help_text)
            continue
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": help_text}
        if ann is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif origin is Literal:
            parser.add_argument(flag, choices=list(args), **kwargs)
        elif origin is list or (origin is typing.Union and list in args):
            parser.add_argument(flag, nargs="+", **kwargs)
        elif origin is dict:
            parser.add_argument(flag, type=json.loads, **{**kwargs, "help": help_text + " (JSON)"})
        elif ann in (int, float):
            parser.add_argument(flag, type=ann, **kwargs)
        else:
            parser.add_argument(flag, **kwargs)


def _stage(sub, name: str, model: type[BaseModel], help_text: str, positional: str | None = None,
           yaml: bool = False, exclude: tuple[str, ...] = ()):
    parser = sub.add_parser(name, help=help_text, description=help_text)
    _add_config_flags(parser, model, positional, exclude)
    if yaml:
        parser.add_argument("--config", dest="_config", help="YAML config file; flags override its fields")
    parser.add_argument("--json", dest="_json", action="store_true", help="print the result as JSON")
    parser.set_defaults(_model=model)
    return parser


def build_parser() -> argparse.ArgumentParser:
    from forge.data import DataConfig
    from forge.demo import DemoAssetsConfig
    from forge.env import EnvConfig
    from forge.evaluate import EvaluateConfig
    from forge.lora_gguf import LoraGgufConfig
    from forge.merge import MergeConfig
    from forge.modelfile import ModelfileConfig
    from forge.pipeline import PipelineConfig
    from forge.publish import PublishConfig
    from forge.quantize import QuantizeConfig
    from forge.query import QueryConfig
    from forge.seal import SealConfig
    from forge.snapshot import SnapshotConfig
    from forge.store_file import StoreConfig
    from forge.sweep import SweepConfig
    from forge.train import TrainConfig

    parser = argparse.ArgumentParser(prog="forge", description="Fine-tune an open model end to end.")
    sub = parser.add_subparsers(dest="command", required=True)
    _stage(sub, "env", EnvConfig, "Report Python, torch, GPUs, disk, versions and the GGUF converter.")
    data = sub.add_parser("data", help="Validate a dataset or show its token statistics.")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    _stage(data_sub, "validate", DataConfig, "Check every line of a JSONL dataset.", positional="path")
    _stage(data_sub, "stats", DataConfig, "Token statistics with the model's tokenizer and chat template.",
           positional="path")
    _stage(sub, "train", TrainConfig, "Train a LoRA/QLoRA adapter (TRL SFT, DPO or ORPO + PEFT).", yaml=True)
    _stage(sub, "sweep", SweepConfig, "Try a few hyperparameter sets; keep the best within a forgetting budget.")
    _stage(sub, "merge", MergeConfig, "Merge an adapter into its base model, with a parity check.")
    _stage(sub, "quantize", QuantizeConfig, "Convert a merged model to GGUF and quantize it (llama.cpp).")
    _stage(sub, "lora-gguf", LoraGgufConfig, "A LoRA adapter alone as a GGUF, with a FROM base + ADAPTER Modelfile.")
    _stage(sub, "eval", EvaluateConfig, "Perplexity of base, fine-tuned and each GGUF; sample answers side by side.")
    mf = _stage(sub, "modelfile", ModelfileConfig, "Write an Ollama Modelfile for a GGUF.")
    _stage(sub, "query", QueryConfig, "Ask a GGUF (or a run's last GGUF) something through its chat template.",
           positional="model")
    mf.add_argument("--check", dest="_check", metavar="MODELFILE", help="validate an existing Modelfile instead")
    seal = sub.add_parser("seal", help="Seal runs (hash-verified record + retrospective), or verify a seal.")
    seal_sub = seal.add_subparsers(dest="seal_command", required=True)
    _stage(seal_sub, "create", SealConfig, "Seal run dirs: canonical-JSON record, retrospective, loss curve.",
           exclude=("jobs",))
    verify = seal_sub.add_parser(
        "verify", help="Re-hash a seal (default: the newest) and its artifacts; walk the chain.")
    verify.add_argument("seal_ref", nargs="?", default=None, help="seal id (sha256:…) or a prefix of it")
    verify.add_argument("--json", dest="_json", action="store_true", help="print the result as JSON")
    store = sub.add_parser("store", help="Check the job store (forge.db), or recover what can be read of it.")
    store_sub = store.add_subparsers(dest="store_command", required=True)
    _stage(store_sub, "check", StoreConfig, "SQLite's integrity check of the job store, read-only.",
           exclude=("output",))
    _stage(store_sub, "recover", StoreConfig, "Copy what SQLite can read of a damaged store to a new file.")
    _stage(sub, "snapshot", SnapshotConfig, "Seal the newest run, or bundle a manifest's files for an agent (audit).")
    _stage(sub, "publish", PublishConfig, "Publish an adapter, merged model or GGUFs to the Hugging Face Hub.")
    _stage(sub, "pipeline", PipelineConfig, "Run train → merge → quantize → eval → modelfile → seal.", yaml=True)
    _stage(sub, "demo-assets", DemoAssetsConfig, "Write the tiny demo model and sample dataset.", positional="dir")
    demo = sub.add_parser("demo", help="Build the demo assets and run every stage on them.")
    demo.add_argument("--dir", default=None, help="Where to put the assets and run (default $FORGE_HOME/demo)")
    demo.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"],
                      help="smollm2: a real 135M model learns five facts (about 2 minutes on 2 cores); tiny: random "
                           "weights, seconds")
    demo.add_argument("--json", dest="_json", action="store_true")
    _add_plugins(sub)
    return parser


def _add_plugins(sub) -> None:
    """Subcommands other packages add through the ``forge.cli`` entry-point group (``forge jobs`` and ``forge
    watch`` come from the MCP layer's job store this way, which forge/ itself never imports). Each entry point
    is ``register(subparsers)``: it adds its parsers and sets ``_handler``, which takes the parsed args,
    prints what a person reads and returns the result dict (printed as JSON under ``--json``). A plugin that
    fails to load is reported and left out; the other commands still work."""
    from importlib.metadata import entry_points

    for entry in entry_points(group="forge.cli"):
        try:
            entry.load()(sub)
        except Exception as exc:  # another package's code: whatever it raises must not take the CLI down
            print(f"warning: the forge.cli plugin {entry.name!r} ({entry.value}) failed to load: "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr)


def _config_from_args(args: argparse.Namespace):
    model = args._model
    fields = {k: v for k, v in vars(args).items() if not k.startswith("_") and k in model.model_fields}
    if args.command == "data" and fields.get("path") is None:
        raise ForgeError(Codes.CONFIG_INVALID, "missing the dataset path", "forge data validate PATH")
    return model.build(getattr(args, "_config", None), **fields)


def _run(args: argparse.Namespace) -> dict:
    from forge import (
        data,
        demo,
        env,
        evaluate,
        lora_gguf,
        merge,
        modelfile,
        pipeline,
        publish,
        quantize,
        query,
        seal,
        snapshot,
        train,
    )

    if getattr(args, "_handler", None):
        return args._handler(args)
    if args.command == "seal" and args.seal_command == "verify":
        return seal.verify(args.seal_ref)
    if args.command == "demo":
        return run_demo(args.dir, echo=not args._json, model=args.model)
    if args.command == "modelfile" and args._check:
        return modelfile.validate_modelfile(Path(args._check))
    config = _config_from_args(args)
    if args.command == "store":
        from forge import store_file

        if args.store_command == "check":
            return store_file.check(config.path)
        return store_file.recover(config.path, config.output)
    if args.command == "data":
        if args.data_command == "stats" and not config.base_model:
            raise ForgeError(Codes.CONFIG_INVALID, "stats need the model's tokenizer",
                             "add --base-model MODEL_DIR_OR_HUB_ID")
        return data.validate(config)
    runners = {
        "env": env.environment, "train": train.train, "merge": merge.merge, "quantize": quantize.quantize,
        "modelfile": modelfile.write_modelfile, "seal": seal.seal, "pipeline": pipeline.run_pipeline,
        "snapshot": snapshot.snapshot, "publish": publish.publish, "query": query.run_query,
        "demo-assets": demo.write_demo_assets, "eval": evaluate.evaluate,
        "lora-gguf": lora_gguf.lora_gguf, "sweep": _sweep,
    }
    if args.command in ("train", "merge", "quantize", "pipeline") and not args._json:
        with ProgressBar(sys.stdout, label=args.command) as bar:  # plain lines when piped
            hooks = [lambda stage, result: _stage_done(bar, result)] if args.command == "pipeline" else []
            return _stage_done(bar, runners[args.command](config, bar, *hooks))
    return runners[args.command](config)


def _sweep(config) -> dict:
    """forge sweep: each trial's start and end as a line, then the table (on stderr with --json)."""
    from forge.sweep import PrintedHooks, run_sweep
    from forge.sweep_table import table_text

    result = run_sweep(config, PrintedHooks(lambda line: print(line, file=sys.stderr, flush=True)))
    print(table_text(result["trials"], result.get("winner")) + f"\n\n{result['status']}: "
          + (result.get("why") or "no winner"), file=sys.stderr)
    return result


def _stage_done(bar: ProgressBar, result: dict) -> dict:
    if result.get("status", Outcome.SUCCEEDED) == Outcome.SUCCEEDED:
        bar.complete()
    return result


def _summary(result: dict) -> str:
    if "mismatches" in result:  # seal verify
        lines = [f"seal {result['seal_id']}: {'OK' if result['ok'] else 'MISMATCH'} "
                 f"(chain of {result['chain_length']})"]
        lines += [f"  mismatch {m['file']}: expected {m['expected']}, found {m['found']}" for m in result["mismatches"]]
        lines += [f"  missing (not checked) {p}" for p in result["missing"]]
        return "\n".join(lines)
    keep = {k: v for k, v in result.items() if k not in ("artifacts", "content", "stages", "outputs", "example")}
    lines = [f"{k}: {json.dumps(v, default=str) if isinstance(v, (dict, list)) else v}" for k, v in keep.items()]
    for out in result.get("outputs", []):
        ver = out.get("verification", {})
        lines.append(f"gguf: {out['path']} ({out['quant']}, {out['bytes']} bytes, sha256 {out['sha256'][:16]}…)"
                     + (f" generated {ver.get('generated')!r}" if ver else ""))
    return "\n".join(lines)


def _stage_report(stage: str, result: dict) -> list[str]:
    """What the CLI demo prints when a pipeline stage ends."""
    lines = [f"== {stage}: {result.get('status')}"]
    if stage == "train":
        m = result["metrics"]
        eval_loss = "—" if m["eval_loss"] is None else f"{m['eval_loss']:.4f}"
        lines.append(f"   adapter {result['adapter_dir']} | train loss {m['train_loss']:.4f} | eval loss {eval_loss} | "
                     f"{m['tokens_per_s']:.0f} tok/s | {m['duration_s']} s")
    elif stage == "merge":
        p = result["parity"]
        lines.append(f"   merged {result['merged_dir']} ({result['dtype']}) | parity max |Δlogit| "
                     f"{p['max_abs_diff']:.3g} ≤ {p['bound']:.3g}")
    elif stage == "quantize":
        lines += [_quant_line(o) for o in result["outputs"]]
        matrix = result.get("imatrix") or {}
        compared = matrix.get("comparison")
        if compared:
            lines.append(f"   importance matrix ({matrix.get('source')}, {matrix.get('tokens')} tokens): "
                         f"{compared['quant']} mean KLD {compared['with']['kld_mean']} with it, "
                         f"{compared['without']['kld_mean']} without")
        if result.get("auto"):
            lines.append(f"   auto: {result['auto']['why']}")
        lines += [f"   warning: {w}" for w in result["warnings"]]
    elif stage == "modelfile":
        lines.append(f"   {result['path']} | template {result['template_family']} | stops {result['stop_tokens']}"
                     f"\n   {result['ollama_create']}")
    elif stage == "seal":
        lines.append(f"   {result['seal_id']}\n   {result['retrospective_path']}\n\n{result['results_table']}")
    return lines


def _quant_line(out: dict) -> str:
    line = f"   {out['path']} {out['quant']} {out['bytes']} bytes sha256 {out['sha256'][:16]}…"
    quality = out.get("quality")
    if quality:
        line += (f" | {quality['bpw']} bpw, mean KLD {quality['kld_mean']} (p99 {quality['kld_p99']}), "
                 f"same top {quality['same_top_pct']} %, ΔPPL {quality['delta_ppl']}")
    if "verification" in out:
        line += f" | generated {out['verification']['generated']!r}"
    return line


def run_demo(directory: str | None = None, echo: bool = True, model: str = "smollm2") -> dict:
    """Build the demo assets, then run every stage on them, printing what each produced; with the real
    model, the same questions to the base and the fine-tuned GGUF before and after."""
    from forge import demo

    root = Path(directory) if directory else None
    if not echo:
        return demo.run(root, model, lambda *a, **k: None, None, lambda *a: None)

    def stage_done(stage: str, result: dict) -> None:
        _stage_done(bar, result)
        bar.close()  # the stage's bar stays, whole; the report goes below it
        bar.note("\n".join(_stage_report(stage, result)))

    with ProgressBar(sys.stdout, label="demo") as bar:  # what the demo says goes above the bar
        return demo.run(root, model, lambda *parts: bar.note(" ".join(map(str, parts))), bar, stage_done)


def main(argv: list[str] | None = None) -> int:
    os.umask(0o077)  # runs, seals and the cache are the user's alone
    quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    as_json = getattr(args, "_json", False)
    try:
        result = _run(args)
    except ForgeError as err:
        if as_json:
            print(json.dumps({"error": err.to_dict()}, indent=2))
        else:
            print(f"error [{err.code}]: {err.message}", file=sys.stderr)
            for detail in err.details[5:] if len(err.details) > 5 else []:
                print(f"  {detail}", file=sys.stderr)
            if err.hint:
                print(f"hint: {err.hint}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    elif args.command != "demo" and not getattr(args, "_handler", None):  # a plugin prints its own
        print(_summary(result))
    if result.get("ok") is False:  # seal verify found a mismatch
        return 1
    return 0 if result.get("status", Outcome.SUCCEEDED) == Outcome.SUCCEEDED else 1


if __name__ == "__main__":
    sys.exit(main())
