"""The cross-party harmonisation report, built only from what each party released.

The coordinator never sees a party's rows; it sees `DatasetRef`s (counts, coarse token-length
histograms, domain and task counts, PII replacement counts, expectation verdicts and contract
hashes). This module lines them up so a reviewer can spot a party whose schema, contract version,
length distribution or quarantine rate is out of line with the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cloudfed.data.ref import DatasetRef


def _pct(n: int, d: int) -> float:
    return round(100.0 * n / d, 2) if d else 0.0


def party_rows(refs: Sequence[DatasetRef]) -> list[dict[str, Any]]:
    """One flat row per party: the table in MLflow and in the run summary."""
    rows = []
    for r in refs:
        p = r.profile
        rows.append(
            {
                "party": r.party,
                "rows_read": r.rows_read,
                "accepted": r.rows_accepted,
                "quarantined": r.rows_quarantined,
                "quarantined_pct": _pct(r.rows_quarantined, r.rows_read),
                "train": r.rows_train,
                "eval": r.rows_eval,
                "repaired": r.rows_repaired,
                "pii_replaced": sum(r.pii_replaced.values()),
                "instr_tokens_mean": round(p.instruction_tokens.mean, 1) if p else None,
                "instr_tokens_p95_le": p.instruction_tokens.quantile_bound(0.95) if p else None,
                "resp_tokens_mean": round(p.response_tokens.mean, 1) if p else None,
                "resp_tokens_p95_le": p.response_tokens.quantile_bound(0.95) if p else None,
                "domains": ",".join(sorted(p.domains)) if p else "",
                "warnings": len(r.warnings),
                "contract": r.contract_sha256[:12],
                "canonical": r.canonical_sha256[:12],
            }
        )
    return rows


def findings(refs: Sequence[DatasetRef]) -> list[str]:
    """Cross-party inconsistencies a reviewer should look at before trusting a run."""
    out: list[str] = []
    canon = {r.canonical_sha256 for r in refs}
    if len(canon) > 1:
        out.append(
            "parties validated against different canonical suites: "
            + ", ".join(f"{r.party}={r.canonical_sha256[:12]}" for r in refs)
        )
    schemas = {tuple(sorted((r.profile.columns if r.profile else {}).items())) for r in refs}
    if len(schemas) > 1:
        out.append("parties released different harmonised schemas")
    rates = [r.rows_quarantined / r.rows_read for r in refs if r.rows_read]
    if rates:
        median = sorted(rates)[len(rates) // 2]
        for r in refs:
            rate = r.rows_quarantined / r.rows_read if r.rows_read else 0.0
            if rate > max(2 * median, median + 0.05):
                out.append(
                    f"{r.party}: quarantined {_pct(r.rows_quarantined, r.rows_read)}% of rows, "
                    f"more than twice the federation's median ({round(100 * median, 2)}%)"
                )
    for r in refs:
        out.extend(f"{r.party}: {w}" for w in r.warnings)
    return out


def harmonisation_report(refs: Sequence[DatasetRef]) -> dict[str, Any]:
    """Everything the report holds, JSON-ready; aggregates only."""
    total_read = sum(r.rows_read for r in refs)
    domains: dict[str, int] = {}
    for r in refs:
        for k, v in (r.profile.domains if r.profile else {}).items():
            domains[k] = domains.get(k, 0) + v
    return {
        "parties": party_rows(refs),
        "totals": {
            "rows_read": total_read,
            "accepted": sum(r.rows_accepted for r in refs),
            "quarantined": sum(r.rows_quarantined for r in refs),
        },
        "domain_balance": {k: _pct(v, sum(domains.values())) for k, v in sorted(domains.items())},
        "quarantine_reasons": {r.party: r.quarantine_reasons for r in refs},
        "pii_replaced": {r.party: r.pii_replaced for r in refs},
        "length_histograms": {
            r.party: {
                "bins_le": r.profile.instruction_tokens.bins,
                "instruction": r.profile.instruction_tokens.counts,
                "response": r.profile.response_tokens.counts,
            }
            for r in refs
            if r.profile
        },
        "schema": refs[0].profile.columns if refs and refs[0].profile else {},
        "contracts": {r.party: r.contract_sha256 for r in refs},
        "expectations": {
            r.party: [o.model_dump() for o in r.expectations if not o.success] for r in refs
        },
        "data_docs": {r.party: r.docs_uri for r in refs},
        "findings": findings(refs),
    }


def report_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown page (MLflow renders .md artifacts as text)."""
    rows = report["parties"]
    lines = ["# Harmonisation report", ""]
    if rows:
        cols = list(rows[0])
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "---|" * len(cols))
        lines.extend("| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows)
    lines += ["", f"Domain balance (% of accepted rows): {report['domain_balance']}", ""]
    lines.append("## Findings")
    lines.extend(f"- {f}" for f in report["findings"] or ["none"])
    return "\n".join(lines) + "\n"
