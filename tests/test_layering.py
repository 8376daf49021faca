"""The core's layering, read from the source: what may import what (function-level included)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CORE = REPO_ROOT / "cloudfed"


def _module(path: Path) -> str:
    rel = path.relative_to(REPO_ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports break loops only on paper)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def graph() -> dict[str, set[str]]:
    return {_module(p): imports_of(p) for p in CORE.rglob("*.py")}


def test_the_core_never_imports_zenml() -> None:
    offenders = {m for m, deps in graph().items() if any(d.split(".")[0] == "zenml" for d in deps)}
    assert not offenders, f"cloudfed must stay framework-free: {sorted(offenders)}"


def test_privacy_accounting_does_not_import_tracking() -> None:
    """MLflow logging sits above the ledger: the step logs what the ledger returns."""
    offenders = {
        m
        for m, deps in graph().items()
        if m.startswith("cloudfed.privacy") and any(d.startswith("cloudfed.tracking") for d in deps)
    }
    assert not offenders, sorted(offenders)


def test_aggregation_strategies_are_pure() -> None:
    """Strategies run on both roles and in tests: no I/O layers, no roles, no protection."""
    forbidden = (
        "cloudfed.exchange",
        "cloudfed.party",
        "cloudfed.coordinator",
        "cloudfed.protection",
        "cloudfed.tracking",
        "mlflow",
    )
    offenders = {
        (m, d)
        for m, deps in graph().items()
        if m.startswith("cloudfed.aggregation")
        for d in deps
        if d.startswith(forbidden)
    }
    assert not offenders, sorted(offenders)


def test_protection_imports_neither_role() -> None:
    """What both roles share about messages sits below them, so neither role imports the other."""
    roles = ("cloudfed.party", "cloudfed.coordinator")
    offenders = {
        (m, d)
        for m, deps in graph().items()
        if m.startswith("cloudfed.protection")
        for d in deps
        if any(d == r or d.startswith(f"{r}.") for r in roles)
    }
    assert not offenders, sorted(offenders)


def test_the_roles_do_not_import_each_other() -> None:
    def inside(name: str, role: str) -> bool:
        return name == role or name.startswith(f"{role}.")

    pairs = (("cloudfed.party", "cloudfed.coordinator"), ("cloudfed.coordinator", "cloudfed.party"))
    offenders = {
        (m, d)
        for m, deps in graph().items()
        for role, other in pairs
        if inside(m, role)
        for d in deps
        if inside(d, other)
    }
    assert not offenders, sorted(offenders)
