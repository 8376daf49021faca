"""The audit's report: JSON for machines, a markdown table for reviewers, a plot, a console table.

Every exposure is shown next to the two numbers that give it meaning: the chance level (what a
model that never saw the canary scores on average) and the maximum (the canary ranked first).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any


def _eps(arm: dict[str, Any]) -> str:
    return "∞ (no DP)" if arm["epsilon_spent"] is None else f"{arm['epsilon_spent']:.2f}"


def _level(arm: dict[str, Any], repeats: int) -> dict[str, Any]:
    return next(level for level in arm["exposure"] if level["repeats"] == repeats)


def markdown(report: dict[str, Any]) -> str:
    arms = report["arms"]
    head = "| repeats | " + " | ".join(f"{a['name']} mean (max) bits" for a in arms) + " |"
    lines = [
        "# Canary exposure audit",
        "",
        f"{report['canaries_per_level']} canaries per repeat level, inserted into "
        f"`{report['canary_party']}` only; each ranked among {report['references']} random "
        f"secrets from a space of {report['randomness_space']:,}. Maximum exposure "
        f"{report['max_exposure_bits']:.2f} bits (canary ranked first), chance "
        f"{report['chance_exposure_bits']:.2f} bits (canary never seen).",
        "",
        head,
        "|" + "---|" * (len(arms) + 1),
    ]
    for r in report["repeats"]:
        cells = []
        for a in arms:
            level = _level(a, r)
            cells.append(
                f"{level['mean']:.2f} ({level['max']:.2f}), "
                f"{level['extracted']}/{level['canaries']} ranked first"
            )
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    lines += [
        "| epsilon spent (canary party) | " + " | ".join(_eps(a) for a in arms) + " |",
        "| held-out loss | " + " | ".join(f"{a['eval_loss']:.4f}" for a in arms) + " |",
        "",
        f"Held-out loss of the base model: {report['base_eval_loss']:.4f}. "
        f"Delta {report['config']['dp']['delta']:g}, accountant "
        f"{report['config']['dp']['accountant']}. Run time {report['seconds']:.0f} s.",
        "",
        "Epsilon is record-level: it bounds a canary inserted once. A canary repeated r times is "
        "r records, covered only by group privacy (about r times epsilon), so low exposure at "
        "r > 1 under DP-SGD is an empirical finding of this audit, not a guarantee.",
        "",
    ]
    return "\n".join(lines)


def plot_png(report: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cloudfed.tracking import figure_png

    fig, ax = plt.subplots(figsize=(6, 3.8))
    repeats = report["repeats"]
    for arm in report["arms"]:
        means = [_level(arm, r)["mean"] for r in repeats]
        maxes = [_level(arm, r)["max"] for r in repeats]
        (line,) = ax.plot(repeats, means, marker="o", label=f"{arm['name']} (mean)")
        ax.plot(repeats, maxes, marker="^", linestyle=":", color=line.get_color(), alpha=0.7)
    ax.axhline(report["max_exposure_bits"], color="black", linestyle="--", linewidth=1)
    ax.axhline(report["chance_exposure_bits"], color="grey", linestyle="--", linewidth=1)
    ax.text(repeats[0], report["max_exposure_bits"], " maximum", va="bottom", fontsize=8)
    ax.text(repeats[0], report["chance_exposure_bits"], " chance", va="bottom", fontsize=8)
    if len(repeats) > 1 and repeats[0] > 0:
        ax.set_xscale("log", base=2)
    ax.set_xticks(repeats, [str(r) for r in repeats])
    ax.set_xlabel("canary repeats in the party's data")
    ax.set_ylabel("exposure (bits); dotted: max")
    ax.set_ylim(0, math.ceil(report["max_exposure_bits"]) + 0.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return figure_png(fig)


def summary_text(report: dict[str, Any]) -> str:
    from rich.console import Console
    from rich.table import Table

    arms = report["arms"]
    table = Table(title="Canary exposure, bits: mean (max)")
    table.add_column("repeats", justify="right")
    for a in arms:
        table.add_column(a["name"], justify="right")
    for r in report["repeats"]:
        table.add_row(
            str(r), *[f"{_level(a, r)['mean']:.2f} ({_level(a, r)['max']:.2f})" for a in arms]
        )
    table.add_row("epsilon", *[_eps(a) for a in arms])
    table.add_row("held-out loss", *[f"{a['eval_loss']:.4f}" for a in arms])
    console = Console(record=True, width=120, file=io.StringIO())
    console.print(table)
    console.print(
        f"{report['canaries_per_level']} canaries per level in {report['canary_party']}, ranked "
        f"among {report['references']} random secrets: maximum "
        f"{report['max_exposure_bits']:.2f} bits, chance {report['chance_exposure_bits']:.2f} bits."
    )
    return console.export_text()


def write_report(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "report.json": out_dir / "report.json",
        "report.md": out_dir / "report.md",
        "exposure.png": out_dir / "exposure.png",
    }
    files["report.json"].write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    files["report.md"].write_text(markdown(report), encoding="utf-8")
    files["exposure.png"].write_bytes(plot_png(report))
    return files
