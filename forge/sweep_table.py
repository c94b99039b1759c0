"""A sweep's trials as a Markdown table, the winner marked: for the CLI, the retrospective and the README."""

from __future__ import annotations

COLUMNS = (("trial", "trial"), ("learning_rate", "lr"), ("num_train_epochs", "epochs"), ("lora_r", "r"),
           ("status", "status"), ("learned", "held-out right"), ("final_loss", "final loss"),
           ("kept_pct", "general kept %"), ("prose_ppl_change_pct", "prose ppl Δ%"), ("stopped", "stopped"),
           ("within_budget", "within budget"))


def table_text(rows: list[dict], winner: str | None = None) -> str:
    """The trials as a Markdown table, the winner marked."""
    def cell(row: dict, key: str) -> str:
        value = row.get(key)
        if key == "learned" and value is not None:
            return f"{value}/{row.get('of')}"
        if key == "within_budget" and value is not None:
            return "yes" if value else "no"
        if isinstance(value, float):
            return f"{value:.4g}"
        return "—" if value is None else str(value)

    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [cell(row, k) for k, _ in COLUMNS]
        if row.get("trial") == winner:
            cells[0] = f"**{cells[0]}** (winner)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
