"""Progress events drawn for a person at a terminal: on a TTY one bar redrawn in place (stage, step/total,
loss, tokens/s, ETA), with stage changes and warnings as lines above it; piped, the plain lines that
scripts and logs have always read. The events are the ones forge.progress writes and the job store keeps.

Text inside an event may come from a model or a dataset (a warning quotes a chat template, a stage names a
file), so it passes through ``printable`` first: a terminal must never receive an escape sequence it did
not get from Forge itself."""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
import unicodedata
from typing import TextIO

# An escape sequence whole: CSI (ESC [ … final byte), OSC/DCS/PM/APC/SOS strings (ended by BEL or ST, or
# unterminated), any other two-byte ESC sequence, and their 8-bit C1 forms.
ESCAPE = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]?"
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
    r"|\x1b[ -~]?"
)
# Characters that reorder or hide the text around them (the "Trojan Source" bidi controls)
BIDI_CONTROLS = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
CLEAR_LINE = "\r\x1b[K"  # back to the line's start, erase to its end
REDRAW_INTERVAL_S = 0.1  # at most ten redraws a second: a fast loop must not spend its time drawing


def printable(text: object, limit: int = 500) -> str:
    """``text`` safe to write to a terminal on one line: escape sequences removed, line breaks and tabs as
    spaces, other control characters (and lone surrogates) as '?', at most ``limit`` characters."""
    text = ESCAPE.sub("", str(text))
    out = []
    for ch in text:
        category = unicodedata.category(ch)
        if ch in "\t\n\r\v\f":
            out.append(" ")
        elif category in ("Cc", "Cs"):
            out.append("?")
        elif ch not in BIDI_CONTROLS:
            out.append(ch)
    text = "".join(out)
    return text if len(text) <= limit else text[: limit - 1] + "…"


NUMBERS = ("step", "total_steps", "percent", "epoch", "loss", "tokens_per_s", "eta_s")


def numeric(event: dict) -> dict:
    """The event with each of its number fields a finite number or None: a job store's progress is read back
    from a file, and a field that is not a number must neither reach the terminal nor stop the drawing."""
    out = dict(event)
    for key in NUMBERS:
        value = out.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or value != value or value in (float("inf"), float("-inf"))):
            out[key] = None
    return out


def plain_line(event: dict) -> str | None:
    """The line a stage, progress or warning event prints when the output is not a terminal; None for the
    other events. The format is the one `forge train` has always printed: scripts may parse it."""
    event = numeric(event)
    stage = event.get("pipeline_stage", "")
    prefix = f"[{printable(stage)}] " if stage else ""
    kind = event.get("event")
    if kind == "stage":
        return f"  {prefix}stage: {printable(event.get('stage'))}"
    if kind == "progress":  # a field a stage does not report (a merge has no epoch) is left out
        parts = ["progress"]  # a stage without steps (forge watch of a pipeline between its stages)
        if event.get("total_steps") is not None:
            parts = [f"step {event.get('step')}/{event['total_steps']}"]
        if event.get("percent") is not None:
            parts.append(f"({event['percent']:.0f}%)")
        if event.get("epoch") is not None:
            parts.append(f"epoch {event['epoch']:.2f}")
        if "loss" in event:
            parts.append(f"loss {'None' if event['loss'] is None else format(event['loss'], '.4f')}")
        if event.get("tokens_per_s") is not None:
            parts.append(f"{event['tokens_per_s']:.0f} tok/s")
        if event.get("eta_s") is not None:
            parts.append(f"eta {event['eta_s']:.0f}s")
        return f"  {prefix}" + " ".join(parts)
    if kind == "warning":
        return f"  {prefix}warning: {printable(event.get('message'))}"
    return None


def clock(seconds: float) -> str:
    """0:42, 12:05, 1:02:09."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def is_terminal(stream: TextIO) -> bool:
    """A terminal that understands the erase-line sequence (TERM=dumb does not)."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
    return tty and os.environ.get("TERM", "") != "dumb"


class ProgressBar:
    """A progress callback for a terminal. Call it with each event; ``close()`` (or leaving the ``with``
    block) ends the bar's line. ``label`` names what runs (``train``); a pipeline's events name their own
    stage, and each stage's bar stays on screen when the next one begins."""

    def __init__(self, stream: TextIO | None = None, label: str = "", tty: bool | None = None,
                 interval_s: float = REDRAW_INTERVAL_S):
        self.stream = stream if stream is not None else sys.stdout
        self.tty = is_terminal(self.stream) if tty is None else tty
        self.label = label
        self.interval_s = interval_s
        self.glyphs = self._glyphs()
        self.state: dict = {}
        self.group: str | None = None  # the pipeline stage the numbers belong to
        self.shown = False  # a bar is on the current line
        self.pending = False  # the state changed since the last draw
        self.last_draw = 0.0

    def _glyphs(self) -> tuple[str, str]:
        try:
            "█░…".encode(getattr(self.stream, "encoding", None) or "utf-8")
        except (UnicodeEncodeError, LookupError):
            return "#", "-"
        return "█", "░"

    # ---- events ----

    def __call__(self, event: dict) -> None:
        event = numeric(event)
        kind = event.get("event")
        if not self.tty:
            line = plain_line(event)
            if line is not None:
                self._write(line + "\n")
            return
        if kind not in ("stage", "progress", "warning", "train_begin"):
            return
        self._enter(event.get("pipeline_stage"))
        if kind == "stage":
            self.state["stage"] = event.get("stage")
            if event.get("total_steps"):  # stages without a step loop (merge, quantize) count sub-stages
                self.state.update(step=event.get("step"), total_steps=event["total_steps"], loss=None,
                                  tokens_per_s=None, eta_s=None,
                                  percent=100.0 * (event.get("step") or 0) / event["total_steps"])
        elif kind == "progress":
            self.state.update({k: event.get(k) for k in ("step", "total_steps", "loss", "tokens_per_s", "eta_s",
                                                          "percent")})
        elif kind == "train_begin":
            self.state.update(step=event.get("step"), total_steps=event.get("total_steps"))
        if kind in ("stage", "warning"):
            self.note(plain_line(event) or "")
            return
        self.pending = True
        total = self.state.get("total_steps")
        if time.monotonic() - self.last_draw >= self.interval_s or (total and self.state.get("step") == total):
            self._draw()

    def note(self, text: str) -> None:
        """Print ``text`` (each line made printable) above the bar, which is then drawn again."""
        lines = "".join(printable(line, 2000) + "\n" for line in str(text).split("\n"))
        if not self.tty:
            self._write(lines)
            return
        self._write((CLEAR_LINE if self.shown else "") + lines)
        self.shown = False
        self._draw()

    def complete(self) -> None:
        """The stage ended well: its bar is drawn whole (as the job store's progress is when a job succeeds),
        since stages without a step loop (merge, quantize) report no step after their last sub-stage."""
        counted = self.state.get("total_steps") or self.state.get("percent") is not None
        if not self.tty or not counted:
            return
        if self.state.get("total_steps"):
            self.state["step"] = self.state["total_steps"]
        self.state["percent"] = 100.0
        if self.state.get("eta_s") is not None:
            self.state["eta_s"] = 0
        self.pending = True

    def close(self) -> None:
        """End the bar: with numbers, its last state stays on a line of its own; a bare stage name is erased.
        What is printed next starts on a fresh line, and the next event starts a new bar."""
        if self.tty and self.pending:
            self._draw()
        if self.shown:
            counted = self.state.get("total_steps") or self.state.get("percent") is not None
            self._write("\n" if counted else CLEAR_LINE)
        self.shown, self.pending, self.state = False, False, {}

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- drawing ----

    def _enter(self, group: str | None) -> None:
        """A pipeline moving to its next stage: the last stage's bar stays, with its final numbers."""
        if group == self.group:
            return
        self.close()
        self.group = group

    def _draw(self) -> None:
        if not self.state:
            return
        self._write(CLEAR_LINE + self.line(shutil.get_terminal_size((80, 24)).columns))
        self.shown, self.pending, self.last_draw = True, False, time.monotonic()

    def line(self, columns: int) -> str:
        """The bar as one line fitted to ``columns``: ``train ████░░░░ 12/40 30% loss 1.2345 812 tok/s ETA 0:42``."""
        s = self.state
        head = " ".join(printable(p, 40) for p in (self.group or self.label, s.get("stage")) if p)
        total = s.get("total_steps")
        tail = []
        if total:
            tail.append(f"{s.get('step') or 0}/{total}")
        if s.get("percent") is not None:
            tail.append(f"{s['percent']:.0f}%")
        if s.get("loss") is not None:
            tail.append(f"loss {s['loss']:.4f}")
        if s.get("tokens_per_s") is not None:
            tail.append(f"{s['tokens_per_s']:.0f} tok/s")
        if s.get("eta_s") is not None:
            tail.append(f"ETA {clock(s['eta_s'])}")
        room = columns - 1  # the last column left empty: writing there wraps some terminals
        text = " ".join(filter(None, [head, " ".join(tail)]))
        width = min(40, room - len(text) - 1)
        share = (s.get("step") or 0) / total if total else None
        if s.get("percent") is not None:  # the job's own figure: a pipeline's spans all its stages
            share = s["percent"] / 100.0
        if share is not None and width >= 10:
            done = round(width * min(max(share, 0.0), 1.0))
            full, empty = self.glyphs
            text = " ".join(filter(None, [head, full * done + empty * (width - done), " ".join(tail)]))
        return text if len(text) <= room else text[: max(room - 1, 0)] + "…"

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
        except UnicodeEncodeError:  # a terminal that cannot show some character: '?' in its place
            encoding = getattr(self.stream, "encoding", None) or "ascii"
            self.stream.write(text.encode(encoding, "replace").decode(encoding))
        self.stream.flush()
