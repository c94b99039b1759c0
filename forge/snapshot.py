"""``forge snapshot --type seal|audit``: the command line other tools call.

``seal`` seals run dirs (default: the newest run in FORGE_HOME). ``audit`` bundles the files a
manifest names into one Markdown file — a table of contents, each file fenced with its language,
and its sha256 — for handing context to the next agent session. Paths outside the allowed roots
are refused, all of them named at once, and nothing is written.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from forge import runs
from forge.config import StageConfig
from forge.errors import Codes, ForgeError
from forge.paths import check_path, forge_home, open_checked
from forge.runs import Outcome
from forge.workspace import atomic_write_text, sha256_file

LANGUAGES = {
    ".py": "python", ".md": "markdown", ".json": "json", ".jsonl": "json", ".yaml": "yaml", ".yml": "yaml",
    ".toml": "toml", ".sh": "bash", ".go": "go", ".js": "javascript", ".ts": "typescript", ".txt": "text",
    ".jinja": "jinja", ".cfg": "ini", ".ini": "ini", ".rs": "rust", ".c": "c", ".h": "c", ".cpp": "cpp",
    ".html": "html", ".css": "css", ".sql": "sql", "Makefile": "makefile", "Modelfile": "dockerfile",
}


class SnapshotConfig(StageConfig):
    type: Literal["seal", "audit"] = Field("seal", description="seal: seal run dirs; audit: bundle a manifest's files.")
    manifest: Path | None = Field(None, description="Audit: JSON list of paths, or of {path, note} objects.")
    note: str | None = Field(None, description="A note kept in the seal or the bundle.")
    run_dir: list[Path] | None = Field(None, description="Seal: run dirs to cover; default the newest run.")
    project_dir: Path | None = Field(None, description="Seal: a git repo whose commit and dirty state are kept.")
    output: Path | None = Field(None, description="Audit: bundle path; default $FORGE_HOME/audits/<time>-audit.md.")


def latest_run() -> Path:
    found = runs.latest_run()
    if found is None:
        raise ForgeError(Codes.SEAL_NOT_FOUND, f"no run to seal under {runs.runs_dir()}",
                         "pass --run-dir RUN, or train something first")
    return found


def _entries(manifest: Path) -> list[tuple[str, str | None]]:
    try:
        items = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ForgeError(Codes.CONFIG_INVALID, f"manifest {manifest} is not readable JSON: {exc}",
                         'write a JSON list: ["path", {"path": "other", "note": "why it matters"}]') from exc
    if not isinstance(items, list):
        raise ForgeError(Codes.CONFIG_INVALID, f"manifest {manifest} must be a JSON list",
                         'write a JSON list: ["path", {"path": "other", "note": "why it matters"}]')
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            out.append((item, None))
        elif isinstance(item, dict) and isinstance(item.get("path"), str):
            out.append((item["path"], item.get("note")))
        else:
            raise ForgeError(Codes.CONFIG_INVALID, f"manifest entry {i} is neither a path nor {{path, note}}",
                             'each entry is "path" or {"path": "…", "note": "…"}')
    return out


def _anchor(text: str) -> str:
    return re.sub(r"[^a-z0-9 -]", "", text.lower()).strip().replace(" ", "-")


def audit(manifest: Path, note: str | None = None, output: Path | None = None) -> dict:
    manifest = Path(manifest).resolve()
    files, refused, missing = [], [], []
    for raw, file_note in _entries(manifest):
        path = Path(raw) if Path(raw).is_absolute() else manifest.parent / raw
        try:
            resolved = check_path(path, "manifest path")
        except ForgeError:
            refused.append(raw)
            continue
        if not resolved.is_file():
            missing.append(raw)
            continue
        files.append((raw, resolved, file_note))
    if refused or missing:
        problems = [f"{p}: outside the allowed roots" for p in refused] + [f"{p}: no such file" for p in missing]
        raise ForgeError(Codes.PATH_NOT_ALLOWED if refused else Codes.CONFIG_INVALID,
                         f"audit manifest {manifest}: " + "; ".join(problems),
                         "list only files under FORGE_HOME or a root in FORGE_ALLOWED_ROOTS", details=problems)
    lines = [f"# Audit bundle — {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}", "",
             f"Manifest `{manifest}`, {len(files)} file(s)."]
    if note:
        lines += ["", f"> {note}"]
    lines += ["", "## Contents", ""]
    lines += [f"{i}. [{raw}](#{_anchor(f'{i} {raw}')})" for i, (raw, _, _) in enumerate(files, start=1)]
    listed = []
    for i, (raw, path, file_note) in enumerate(files, start=1):
        # Read once, through a descriptor checked after opening: a file flipped to a link in the
        # meantime is refused, and the text, size and hash are of the same bytes.
        with open_checked(path, "manifest path") as fh:
            data = fh.read()
        text, digest = data.decode("utf-8", errors="replace"), hashlib.sha256(data).hexdigest()
        listed.append({"path": str(path), "bytes": len(data), "sha256": digest, "note": file_note})
        fence = "`" * max(3, max((len(m) for m in re.findall(r"`+", text)), default=0) + 1)
        lang = LANGUAGES.get(path.suffix, LANGUAGES.get(path.name, ""))
        lines += ["", f"## {i} {raw}", "", f"`{path}` — {len(data)} bytes, sha256 `{digest}`"]
        if file_note:
            lines += ["", file_note]
        lines += ["", f"{fence}{lang}", text.rstrip("\n"), fence]
    bundle = Path(output) if output else forge_home() / "audits" / f"{time.strftime('%Y%m%d-%H%M%S')}-audit.md"
    atomic_write_text(bundle, "\n".join(lines) + "\n")
    return {"status": Outcome.SUCCEEDED, "type": "audit", "path": str(bundle), "sha256": sha256_file(bundle),
            "files": listed}


def snapshot(config: SnapshotConfig) -> dict:
    if config.type == "audit":
        if config.manifest is None:
            raise ForgeError(Codes.CONFIG_INVALID, "an audit snapshot needs a manifest",
                             "forge snapshot --type audit --manifest FILE.json")
        return audit(config.manifest, config.note, config.output)
    from forge.seal import SealConfig, seal

    runs = config.run_dir or [latest_run()]
    return {"type": "seal", **seal(SealConfig(run_dirs=runs, note=config.note, project_dir=config.project_dir))}
