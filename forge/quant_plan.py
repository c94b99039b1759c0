"""Which quants to make, with which importance matrix, and which one to keep.

``quantizations: ["auto"]`` makes the candidates from large to small, measures each against the f16 GGUF
(``forge.quant_quality``), keeps the smallest file within the budget (``max_kld`` on the mean KL divergence,
and ``min_same_top`` on the same-top-token share when given) and deletes the rest; why it chose what it
chose is written into the result in words.
"""

from __future__ import annotations

from pathlib import Path

from forge import imatrix as imx
from forge.errors import Codes, ForgeError
from forge.paths import check_path, fresh_temp
from forge.runs import TRAIN_CONFIG_FILE

# Large to small; K-quants and IQ4_XS, which run on every llama.cpp backend at a good speed.
AUTO_CANDIDATES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_XS", "Q3_K_M", "Q2_K")
AUTO = "AUTO"


def quantize_with_tools(src: Path, dst: Path, quant: str, imatrix_path: Path | None, log_path: Path) -> None:
    """llama-quantize (the only way an importance matrix reaches llama.cpp's quantizer); temp name, then rename."""
    import os

    from forge import disk
    from forge.llama_tools import run_tool

    fh, tmp = fresh_temp(dst.parent, f".{dst.name}.")
    fh.close()
    args = (["--imatrix", str(imatrix_path)] if imatrix_path else []) + [str(src), str(tmp), quant,
                                                                         str(os.cpu_count() or 1)]
    try:
        proc = run_tool("llama-quantize", args, log_path)
        if proc.returncode != 0 or not tmp.is_file() or tmp.stat().st_size == 0:
            if disk.free_bytes(dst.parent) < disk.LOW_WATER:
                raise disk.disk_full(dst.parent, None, f"quantizing to {quant}")
            tail = " ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])[-300:]
            raise ForgeError(Codes.QUANTIZATION_FAILED, f"llama-quantize to {quant} failed (exit {proc.returncode}): "
                             f"{tail}", f"see {log_path}")
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)


def plain_path(path: Path) -> Path:
    """Where the same type without the importance matrix goes, to show what the matrix bought."""
    return path.with_name(path.name.removesuffix(".gguf") + "-no-imatrix.gguf")


def imatrix_file(setting: str) -> str:
    """``setting`` when it reads as a file (a separator or a suffix); a bare word other than auto and off
    is a mistyped setting, answered with the accepted ones rather than looked up as a file."""
    if setting.strip().lower() in ("auto", "off") or any(c in setting for c in ("/", "\\", ".")):
        return setting
    raise ForgeError(Codes.INVALID_ARGUMENT, f"imatrix {setting[:40]!r} is neither auto, off nor a file",
                     "use 'auto' (computed from the training data), 'off', or the path of a matrix "
                     "llama-imatrix wrote (e.g. ./run.imatrix.gguf)")


def imatrix_plan(config, quants: list[str]) -> str:
    """'off', 'auto' or a checked path; an error when a type needs a matrix and none will be made."""
    setting = (config.imatrix or "auto").strip()
    wanted = [q for q in quants if imx.uses_imatrix(q)]
    needs = [q for q in quants if q in imx.NEEDS_IMATRIX]
    if setting.lower() == "off":
        if needs:
            raise ForgeError(Codes.CONFIG_INVALID, f"{', '.join(needs)} cannot be made without an importance matrix",
                             "use imatrix='auto' (computed from the training data) or imatrix=PATH")
        return "off"
    if not wanted:
        return "off"
    if setting.lower() == "auto":
        return "auto"
    path = check_path(imatrix_file(setting), "imatrix")
    if not path.is_file():
        raise ForgeError(Codes.FILE_NOT_FOUND, f"imatrix file {setting} does not exist",
                         "pass a matrix llama-imatrix wrote (.gguf or .dat), 'auto' or 'off'")
    return str(path)


def calibration(model_dir: Path, run_dir: Path | None, budget: int) -> tuple[str, int, int, str]:
    """The run's training records as text, within ``budget`` tokens: (text, tokens, records, source)."""
    from transformers import AutoTokenizer

    from forge.measure_set import train_config, training_split

    if run_dir is None:
        raise ForgeError(Codes.RUN_NOT_FOUND, f"{model_dir} is not inside a run dir, so there is no training data "
                         "to calibrate on", "pass imatrix=PATH, or imatrix='off'")
    train_cfg = train_config(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text, tokens, records = imx.calibration_text(tokenizer, training_split(train_cfg), budget)
    return text, tokens, records, f"training split of {Path(train_cfg['dataset']).name}"


def measure_set_for(config, model_dir: Path, run_dir: Path | None):
    """What the quants are measured on (the run's eval split, or measure_dataset), or None and why not."""
    if not (config.measure or config.auto):
        return None, []
    scored, warnings = _run_set(config, model_dir, run_dir)
    if scored is not None and scored.positions == 0:
        if config.auto:
            raise ForgeError(Codes.DATASET_INVALID, "the measure set has no position to compare quants at",
                             "measure on records of at least two tokens (measure_dataset), or name the types")
        return None, [*warnings, "the measure set has no position to compare at: the GGUFs were not measured"]
    return scored, warnings


def _run_set(config, model_dir: Path, run_dir: Path | None):
    from transformers import AutoTokenizer

    from forge.measure_set import run_measure_set

    if run_dir is None or not (run_dir / TRAIN_CONFIG_FILE).is_file():
        if config.auto:
            raise ForgeError(Codes.RUN_NOT_FOUND, f"{model_dir} is not inside a trained run, so auto has no records "
                             "to measure the candidates on", "quantize the merged dir of a run, or name the types")
        return None, [f"{model_dir} is not inside a trained run: the GGUFs were not measured against the f16"]
    dataset = check_path(config.measure_dataset, "measure_dataset") if config.measure_dataset else None
    return run_measure_set(run_dir, AutoTokenizer.from_pretrained(model_dir), dataset)


def importance_matrix(config, setting: str, base_path: Path, model_dir: Path,
                       run_dir: Path | None, log_path: Path) -> tuple[dict | None, list[str]]:
    """The matrix the types that use one are quantized with: computed, given, or none (and why)."""
    from forge.workspace import sha256_file

    if setting == "off":
        return None, []
    if setting != "auto":
        return {"path": setting, "sha256": sha256_file(Path(setting)), "source": "given"}, []
    needed = [q for q in config.planned() if q in imx.NEEDS_IMATRIX]
    try:
        text, tokens, records, source = calibration(model_dir, run_dir, config.imatrix_tokens)
        return imx.compute(base_path, text, tokens, records, base_path.with_name(f"{config.stem()}.imatrix.gguf"),
                           log_path, source), []
    except ForgeError as exc:
        if needed or exc.code not in (Codes.LLAMA_TOOLS_MISSING, Codes.RUN_NOT_FOUND, Codes.IMATRIX_FAILED):
            raise
        return None, [f"quantized without an importance matrix: {exc.message} ({exc.hint})"]


def _fits(quality: dict, max_kld: float, min_same_top: float | None) -> bool:
    ok = quality.get("kld_mean") is not None and quality["kld_mean"] <= max_kld
    return ok and (min_same_top is None or (quality.get("same_top_pct") or 0) >= min_same_top)


def budget_text(max_kld: float, min_same_top: float | None) -> str:
    return f"mean KLD ≤ {max_kld:g}" + (f" and same top token ≥ {min_same_top:g} %" if min_same_top is not None else "")


def choose(measured: list[dict], max_kld: float, min_same_top: float | None) -> tuple[dict, str, bool]:
    """The smallest candidate within the budget (else the closest to the f16), why, and whether it fits.

    ``measured``: dicts with quant, bytes and quality."""
    budget = budget_text(max_kld, min_same_top)
    measured = [m for m in measured if m["quality"].get("kld_mean") is not None]
    if not measured:
        raise ForgeError(Codes.DATASET_INVALID, "auto had no positions to measure the candidates on",
                         "measure on records of at least two tokens (measure_dataset), or name the types")
    fitting = [m for m in measured if _fits(m["quality"], max_kld, min_same_top)]

    def said(m: dict) -> str:
        q = m["quality"]
        return (f"{m['quant']} ({m['bytes'] / 1e6:.1f} MB, mean KLD {q['kld_mean']:.4g}, "
                f"same top {q['same_top_pct']:.1f} %)")

    if fitting:
        chosen = min(fitting, key=lambda m: m["bytes"])
        smaller = sorted((m for m in measured if m["bytes"] < chosen["bytes"]), key=lambda m: -m["bytes"])
        why = f"{said(chosen)} is the smallest candidate within the budget ({budget})"
        if smaller:
            why += "; smaller ones exceed it: " + ", ".join(said(m) for m in smaller)
        return chosen, why + f"; measured on {chosen['quality']['measured_on']}", True
    chosen = min(measured, key=lambda m: (m["quality"]["kld_mean"], m["bytes"]))
    return chosen, (f"no candidate is within the budget ({budget}); kept the closest to the f16: {said(chosen)}; "
                    "raise max_kld, or quantize to a larger type (f16 itself is kept)"), False


class Kept:
    """The files one quantize run made, what each measured, and which of them stay on disk."""

    def __init__(self, files: list[dict]):
        self.files = files  # the float GGUF first, then each type made: quant, path, imatrix
        self.kept = list(files)
        self.warnings: list[str] = []
        self.comparison: dict | None = None
        self.auto: dict | None = None
        self.twin: dict | None = None

    def measure(self, reference: Path, scored) -> None:
        """Measure every file (and the no-imatrix twin) not measured yet, in one pass over the reference."""
        from forge.quant_quality import measure

        todo = [f for f in [*self.files, *([self.twin] if self.twin else [])] if "quality" not in f]
        for entry, quality in zip(todo, measure(reference, [f["path"] for f in todo], scored), strict=True):
            entry.update(quality=quality, bytes=quality["bytes"], bpw=quality["bpw"])

    def choose(self, max_kld: float, min_same_top: float | None, keep: bool) -> None:
        """auto: keep the smallest candidate within the budget, last (the file later stages take)."""
        from forge.quant_quality import compact

        candidates = self.files[1:]
        chosen, why, fits = choose(candidates, max_kld, min_same_top)
        if not fits:
            self.warnings.append(why)
        others = [c for c in candidates if c is not chosen]
        if not keep:
            for other in others:
                other["path"].unlink(missing_ok=True)
        self.kept = [self.files[0], *(others if keep else []), chosen]
        self.auto = {"chosen": chosen["quant"], "path": str(chosen["path"]), "why": why, "within_budget": fits,
                     "budget": {"max_kld": max_kld, "min_same_top": min_same_top,
                                "text": budget_text(max_kld, min_same_top)},
                     "candidates": [{"quant": c["quant"], "imatrix": c["imatrix"], "kept": keep or c is chosen,
                                     "chosen": c is chosen, **compact(c["quality"])} for c in candidates]}

    def compared(self) -> dict | None:
        """The type shown with and without the matrix: auto's choice when it used one, else the first that did."""
        def comparable(entry: dict) -> bool:  # llama.cpp makes some types only with a matrix
            return entry["imatrix"] and entry["quant"] not in imx.NEEDS_IMATRIX

        last = self.kept[-1]
        if self.auto:
            return last if comparable(last) else None
        return next((f for f in self.kept if comparable(f)), None)

    def add_twin(self, reference: Path, quantize_file, force: bool) -> None:
        """Make the compared type again without the matrix (measured with the next ``measure``)."""
        from forge.workspace import refuse_existing

        target = self.compared()
        if target is None:
            return
        twin = plain_path(target["path"])
        refuse_existing(twin, force)
        quantize_file(reference, twin, target["quant"])
        self.twin = {"quant": f"{target['quant']}-no-imatrix", "path": twin, "imatrix": False, "of": target}

    def settle_twin(self, keep: bool) -> None:
        """Record what the matrix bought. The better-measured of the two files keeps the type's name (a matrix
        from too little text can cost more than it saves: measured, not assumed); the other file goes unless
        asked to keep it."""
        from forge.quant_quality import compact

        twin = self.twin
        if twin is None or "quality" not in twin:
            return
        target, with_, without = twin["of"], twin["of"]["quality"], twin["quality"]
        worse = with_["kld_mean"] is not None and without["kld_mean"] is not None and \
            without["kld_mean"] < with_["kld_mean"]
        self.comparison = {
            "quant": target["quant"], "with": compact(with_), "without": compact(without),
            "kld_change_pct": (None if not without["kld_mean"] else
                               round(100 * (with_["kld_mean"] / without["kld_mean"] - 1), 2)),
            "measured_on": without["measured_on"], "kept": "both" if keep else "without" if worse else "with"}
        if keep:
            self.kept.insert(1, {k: v for k, v in twin.items() if k != "of"})
        elif worse:  # the plain file takes the type's name
            twin["path"].replace(target["path"])
            target.update(imatrix=False, quality=without, bytes=without["bytes"], bpw=without["bpw"])
            self.warnings.append(
                f"the importance matrix made {target['quant']} worse on the measure set (mean KLD "
                f"{with_['kld_mean']:.4g} with it, {without['kld_mean']:.4g} without): kept the file made without "
                "it; calibrate on more text (more training records, imatrix_tokens) or pass imatrix='off'")
            if self.auto and self.auto["chosen"] == target["quant"]:
                for row in self.auto["candidates"]:
                    if row["chosen"]:
                        row.update(compact(without), imatrix=False)
                self.auto["why"] += "; made without the importance matrix, which measured better"
        else:
            twin["path"].unlink(missing_ok=True)

    def imatrix_record(self, matrix: dict | None, setting: str) -> dict:
        if matrix is None:
            return {"setting": setting, "used": False}
        return {"setting": "given" if matrix.get("source") == "given" else setting, "used": True, **matrix,
                "used_for": [f["quant"] for f in self.files if f["imatrix"]], "comparison": self.comparison}

    def auto_record(self) -> dict:
        return {"auto": self.auto} if self.auto else {}
