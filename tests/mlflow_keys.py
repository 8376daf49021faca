"""How MLflow's UI groups a run's charts, and the README's table of every MLflow key."""

from __future__ import annotations

import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def chart_sections(metric_keys: list[str]) -> list[str]:
    """MLflow 3.x's run and compare charts: one section per text before the last `/`, sorted,
    then the keys without `/` ("Model metrics")."""
    named = sorted({k.rsplit("/", 1)[0] for k in metric_keys if "/" in k})
    return named + (["Model metrics"] if any("/" not in k for k in metric_keys) else [])


def readme_key_patterns() -> list[re.Pattern[str]]:
    """The keys in the README's table of MLflow keys, placeholders turned into patterns."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("#### Every MLflow key") :]
    section = section[: section.index("\n## ")]
    patterns = []
    for line in section.splitlines():
        cells = line.split("|")
        if len(cells) < 3 or not cells[1].strip().startswith("`"):
            continue
        for key in re.findall(r"`([^`]+)`", cells[1]):
            pattern = re.escape(key)
            for holder, value in (
                ("<party>", r"[a-z0-9][a-z0-9-]*"),
                ("<n>", r"\d{4}"),
                ("<name>", r"[a-z0-9_.]+"),
            ):
                pattern = pattern.replace(re.escape(holder), value)
            patterns.append(re.compile(pattern + "$"))
    assert len(patterns) > 40, "the README's key table was not found"
    return patterns


def unlisted(keys: list[str]) -> list[str]:
    patterns = readme_key_patterns()
    return [k for k in keys if not any(p.match(k) for p in patterns)]
