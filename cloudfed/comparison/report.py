"""The comparison's table, targets, chart and MLflow runs, from the arms' run results.

Pure functions of `RunResult`s (mean and spread over seeds), then writers: Markdown and CSV with
the same rows, one PNG of held-out loss per round for every method, and one MLflow run per arm
in the comparison's own experiment (never the federation's, never the MLflow file store).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from cloudfed.comparison.clock import Curve, closest_loss, time_curves, time_to_loss
from cloudfed.comparison.runs import RunResult
from cloudfed.comparison.spec import ComparisonSpec
from cloudfed.errors import ConfigError
from cloudfed.tracking import figure_png


class TableRow(BaseModel):
    """One arm on one split, over its seeds."""

    model_config = ConfigDict(frozen=True, ser_json_inf_nan="constants")

    arm: str
    split: str
    kind: str
    seeds: int
    rounds: int
    eval_loss_mean: float
    eval_loss_std: float
    perplexity_mean: float
    perplexity_std: float
    party_loss: dict[str, float]
    wall_seconds: float
    virtual_seconds: float | None  # simulated clock at the last round (cloudfed.comparison.clock)
    bytes_sent: float
    epsilon: float | None
    epsilon_unit: str
    train_tokens: float
    train_samples: float
    federation_ids: list[str]


class TargetResult(BaseModel):
    model_config = ConfigDict(frozen=True, ser_json_inf_nan="constants")

    name: str
    value: float | None
    target: str
    met: bool | None
    detail: str


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def table_rows(spec: ComparisonSpec, results: Sequence[RunResult]) -> list[TableRow]:
    """Final-round numbers per (arm, split), in the spec's arm and split order."""
    rows = []
    for arm in spec.arms:
        for split in spec.splits:
            runs = [r for r in results if r.arm == arm.name and r.split == split]
            if not runs:
                continue
            losses = [r.final.eval_loss for r in runs]
            loss, loss_std = _mean_std(losses)
            ppl, ppl_std = _mean_std([math.exp(min(v, 50.0)) for v in losses])
            parties = sorted({p for r in runs for p in r.final.party_loss})
            eps = [r.final.epsilon for r in runs if r.final.epsilon is not None]
            rows.append(
                TableRow(
                    arm=arm.name,
                    split=split,
                    kind=arm.kind,
                    seeds=len(runs),
                    rounds=max(r.final.round for r in runs),
                    eval_loss_mean=loss,
                    eval_loss_std=loss_std,
                    perplexity_mean=ppl,
                    perplexity_std=ppl_std,
                    party_loss={
                        p: _mean_std(
                            [r.final.party_loss[p] for r in runs if p in r.final.party_loss]
                        )[0]
                        for p in parties
                    },
                    wall_seconds=_mean_std([r.wall_seconds for r in runs])[0],
                    virtual_seconds=_mean_std([r.final.virtual_seconds for r in runs])[0]
                    if all(r.final.virtual_seconds is not None for r in runs)
                    else None,
                    bytes_sent=_mean_std([r.bytes_sent for r in runs])[0],
                    epsilon=_mean_std(eps)[0] if eps else None,
                    epsilon_unit=runs[0].epsilon_unit,
                    train_tokens=_mean_std([r.tokens for r in runs])[0],
                    train_samples=_mean_std([r.samples for r in runs])[0],
                    federation_ids=[r.federation_id for r in runs if r.federation_id],
                )
            )
    return rows


def loss_curves(results: Sequence[RunResult]) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """Mean held-out loss per round over seeds, per (arm, split)."""
    by: dict[tuple[str, str], dict[int, list[float]]] = {}
    for r in results:
        for rr in r.rounds:
            by.setdefault((r.arm, r.split), {}).setdefault(rr.round, []).append(rr.eval_loss)
    return {k: [(rnd, float(np.mean(v))) for rnd, v in sorted(d.items())] for k, d in by.items()}


def _ratio(
    name: str, row: TableRow | None, reference: TableRow | None, at_most: float
) -> TargetResult:
    """`row`'s eval loss over `reference`'s, against an upper bound; n/a if either is missing."""
    if row is None or reference is None:
        return TargetResult(
            name=name, value=None, target=f"<= {at_most}", met=None, detail="arm or split not run"
        )
    v = row.eval_loss_mean / reference.eval_loss_mean
    met = v <= at_most
    return TargetResult(name=name, value=v, target=f"<= {at_most}", met=met, detail=row.arm)


def _improvement(name: str, row: TableRow | None, local: TableRow | None, at_least: float):
    """How much lower each party's eval loss is than when it trains alone; the worst party."""
    if row is None or local is None:
        return TargetResult(
            name=name, value=None, target=f">= {at_least:.0%}", met=None,
            detail="arm or split not run",
        )  # fmt: skip
    gains = {
        p: 1 - row.party_loss[p] / local.party_loss[p]
        for p in local.party_loss
        if p in row.party_loss
    }
    worst = min(gains.values()) if gains else float("nan")
    return TargetResult(
        name=name,
        value=worst,
        target=f">= {at_least:.0%}",
        met=bool(gains) and worst >= at_least,
        detail=f"{row.arm}: " + ", ".join(f"{p} {g:+.1%}" for p, g in sorted(gains.items())),
    )


def _time_ratio(
    name: str, fast: Curve | None, reference: Curve | None, at_most: float, arm: str
) -> TargetResult:
    """Virtual time for `fast` to reach `reference`'s final loss, over `reference`'s time."""
    if not fast or not reference:
        return TargetResult(
            name=name, value=None, target=f"<= {at_most}", met=None, detail="arm or split not run"
        )
    goal_time, goal_loss = reference[-1]
    reached = time_to_loss(fast, goal_loss)
    if reached is None:
        return TargetResult(
            name=name, value=None, target=f"<= {at_most}", met=False,
            detail=f"{arm}: not reached in {len(fast) - 1} rounds; closest loss "
            f"{closest_loss(fast):.4f}, synchronous final {goal_loss:.4f}",
        )  # fmt: skip
    v = reached / goal_time
    return TargetResult(
        name=name, value=v, target=f"<= {at_most}", met=v <= at_most,
        detail=f"{arm}: loss {goal_loss:.4f} at simulated {reached:.2f} s vs {goal_time:.2f} s",
    )  # fmt: skip


def targets(
    spec: ComparisonSpec, rows: Sequence[TableRow], results: Sequence[RunResult] = ()
) -> list[TargetResult]:
    """The issue's claims as ratios; a target whose arms did not run says so.

    The asynchronous target needs the per-round curves (`results`), on seed means per split.
    """
    at = {(r.arm, r.split): r for r in rows}
    t = spec.targets
    cloudfed = [  # the asynchronous arm trains another budget: it has its own target
        r
        for r in rows
        if r.kind == "federated"
        and r.arm.startswith(spec.cloudfed_prefix)
        and r.arm != spec.async_arm
    ]

    def best(split: str) -> TableRow | None:
        on = [r for r in cloudfed if r.split == split and math.isfinite(r.eval_loss_mean)]
        return min(on, key=lambda r: r.eval_loss_mean) if on else None

    def kind(k: str, split: str) -> TableRow | None:
        return next((r for r in rows if r.kind == k and r.split == split), None)

    central = kind("centralised", "iid")
    curves = time_curves(results)
    return [
        _ratio(
            f"IID: {spec.plaintext_arm} / centralised eval loss",
            at.get((spec.plaintext_arm, "iid")),
            central,
            t.iid_vs_centralised,
        ),
        _ratio(
            "IID: best cloudfed arm / centralised eval loss",
            best("iid"),
            central,
            t.iid_vs_centralised,
        ),  # fmt: skip
        _ratio(
            f"non-IID: best cloudfed arm under protection / {spec.plaintext_arm} eval loss",
            best("non-iid"),
            at.get((spec.plaintext_arm, "non-iid")),
            t.protected_vs_plaintext,
        ),
        _improvement(
            "non-IID: best cloudfed arm vs local-only, eval loss lower by (worst party)",
            best("non-iid"),
            kind("local-only", "non-iid"),
            t.local_improvement,
        ),
        *(
            _time_ratio(
                f"{label}: {spec.async_arm} simulated time to {spec.sync_arm}'s final eval loss "
                f"/ {spec.sync_arm}'s simulated time (one 5x-slow party)",
                curves.get((spec.async_arm, split)),
                curves.get((spec.sync_arm, split)),
                t.async_time_vs_sync,
                spec.async_arm,
            )
            for split, label in (("non-iid", "non-IID"), ("iid", "IID"))
        ),
    ]


# --- writers -----------------------------------------------------------------------------------

CSV_FIELDS = (
    "arm", "split", "kind", "seeds", "rounds", "eval_loss_mean", "eval_loss_std",
    "perplexity_mean", "perplexity_std", "wall_seconds", "virtual_seconds", "bytes_sent",
    "epsilon", "epsilon_unit",
    "train_tokens", "train_samples", "federation_ids",
)  # fmt: skip


def _parties(rows: Sequence[TableRow]) -> list[str]:
    return sorted({p for r in rows for p in r.party_loss})


def csv_text(rows: Sequence[TableRow]) -> str:
    parties = _parties(rows)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*CSV_FIELDS, *(f"loss_{p}" for p in parties)])
    for r in rows:
        doc = r.model_dump()
        doc["federation_ids"] = ";".join(r.federation_ids)
        doc["epsilon"] = "" if r.epsilon is None else repr(r.epsilon)
        doc["virtual_seconds"] = "" if r.virtual_seconds is None else repr(r.virtual_seconds)
        writer.writerow(
            [doc[f] if not isinstance(doc[f], float) else repr(doc[f]) for f in CSV_FIELDS]
            + [repr(r.party_loss[p]) if p in r.party_loss else "" for p in parties]
        )
    return buf.getvalue()


def markdown_table(rows: Sequence[TableRow]) -> str:
    parties = _parties(rows)
    head = ["arm", "split", "eval loss", "perplexity", *(f"loss {p}" for p in parties),
            "wall s", "simulated s", "MB sent", "epsilon", "train tokens"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        eps = "-" if r.epsilon is None else f"{r.epsilon:.2f} ({r.epsilon_unit})"
        cells = [
            r.arm,
            r.split,
            f"{r.eval_loss_mean:.4f} ± {r.eval_loss_std:.4f}",
            f"{r.perplexity_mean:.2f} ± {r.perplexity_std:.2f}",
            *(f"{r.party_loss[p]:.4f}" if p in r.party_loss else "-" for p in parties),
            f"{r.wall_seconds:.1f}",
            "-" if r.virtual_seconds is None else f"{r.virtual_seconds:.2f}",
            f"{r.bytes_sent / 1e6:.2f}",
            eps,
            f"{r.train_tokens:,.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def targets_text(results: Sequence[TargetResult]) -> str:
    lines = []
    for t in results:
        value = (
            ("not reached" if t.met is False else "n/a")
            if t.value is None
            else (f"{t.value:+.1%}" if "%" in t.target else f"{t.value:.4f}")
        )
        verdict = {True: "met", False: "NOT met", None: "not measured"}[t.met]
        lines.append(f"- {t.name}: {value} (target {t.target}; {verdict}) [{t.detail}]")
    return "\n".join(lines) + "\n"


def report_markdown(
    spec: ComparisonSpec,
    rows: Sequence[TableRow],
    goals: Sequence[TargetResult],
    notes: Sequence[str],
) -> str:
    seeds = ", ".join(str(s) for s in spec.seeds)
    text = (
        f"# Comparison with the paper's baselines\n\nSeeds {seeds}. Eval loss: token-weighted "
        "held-out loss over every party's eval split after the last round (mean ± sample std "
        "over seeds); per-party losses are means over seeds. MB sent: sealed updates and "
        "protocol messages on the exchange, all rounds. Epsilon after the last round "
        "(party-level: the federation's ledger; record-level: the largest party's DP-SGD "
        "ledger). Simulated s: the virtual clock at the last round, not measured: a training "
        "lasts its tokens x the party's compute_scale / tokens_per_second; a synchronous round "
        "waits for its slowest party, a buffered (FedBuff) event happens when its buffer fills. "
        "The asynchronous target reads the time to a loss off the seed-mean curve, "
        "interpolating linearly in simulated time between rounds.\n\n"
        + markdown_table(rows)
        + "\n## Targets\n\n"
        + targets_text(goals)
    )
    if notes:
        text += "\n## Notes\n\n" + "".join(f"- {n}\n" for n in notes)
    return text


def loss_chart_png(spec: ComparisonSpec, results: Sequence[RunResult]) -> bytes:
    """Held-out loss per round for every method, one panel per split (style of loss_plot_png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = loss_curves(results)
    fig, axes = plt.subplots(1, len(spec.splits), figsize=(6 * len(spec.splits), 4), squeeze=False)
    rounds = sorted({rr.round for r in results for rr in r.rounds})
    for ax, split in zip(axes[0], spec.splits, strict=True):
        for arm in spec.arms:
            points = curves.get((arm.name, split))
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=arm.name)
        ax.set_title(f"{split} split (mean over seeds)")
        ax.set_xticks(rounds)
        ax.set_xlabel("round")
        ax.set_ylabel("held-out loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return figure_png(fig)


def write_report(
    spec: ComparisonSpec, results: Sequence[RunResult], out_dir: Path, notes: Sequence[str] = ()
) -> dict[str, Path]:
    """table.md, table.csv, loss_per_round.png and results.json under `out_dir`."""
    rows = table_rows(spec, results)
    goals = targets(spec, rows, results)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "markdown": out_dir / "table.md",
        "csv": out_dir / "table.csv",
        "chart": out_dir / "loss_per_round.png",
        "results": out_dir / "results.json",
    }
    files["markdown"].write_text(report_markdown(spec, rows, goals, notes), encoding="utf-8")
    files["csv"].write_text(csv_text(rows), encoding="utf-8")
    files["chart"].write_bytes(loss_chart_png(spec, results))
    doc = {
        "rows": [r.model_dump(mode="json") for r in rows],
        "targets": [t.model_dump(mode="json") for t in goals],
        "runs": [r.model_dump(mode="json") for r in results],
        "notes": list(notes),
    }
    files["results"].write_text(json.dumps(doc, indent=1, allow_nan=True), encoding="utf-8")
    return files


def check_tracking_uri(uri: str) -> str:
    """The comparison logs to a database-backed MLflow store only, never the file store."""
    if not uri or uri.startswith("file:") or "://" not in uri:
        raise ConfigError(
            f"MLflow tracking URI {uri!r} is the file store; the comparison logs to a database "
            "store only. Fix: pass --tracking-uri sqlite:///<path>/mlflow.db (or run it through "
            "ZenML, which uses the active stack's sqlite store)"
        )
    return uri


def log_to_mlflow(
    spec: ComparisonSpec,
    results: Sequence[RunResult],
    files: dict[str, Path],
    *,
    tracking_uri: str,
) -> list[str]:
    """One MLflow run per arm in the comparison's own experiment; returns the run ids.

    Uses the client API, not the fluent one, so a ZenML step's own active run is left alone.
    """
    from mlflow.tracking import MlflowClient

    from cloudfed.tracking import set_experiment_kind

    client = MlflowClient(tracking_uri=check_tracking_uri(tracking_uri))
    exp = client.get_experiment_by_name(spec.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(spec.experiment)
    set_experiment_kind(client, exp_id)
    rows = {(r.arm, r.split): r for r in table_rows(spec, results)}
    goals = targets(spec, list(rows.values()), results)
    curves = loss_curves(results)
    ids = []
    for arm in spec.arms:
        runs = [r for r in results if r.arm == arm.name]
        if not runs:
            continue
        run = client.create_run(exp_id, run_name=arm.name, tags={"comparison/kind": arm.kind})
        rid = run.info.run_id
        client.log_param(rid, "kind", arm.kind)
        client.log_param(rid, "seeds", ",".join(map(str, spec.seeds)))
        client.log_param(rid, "splits", ",".join(spec.splits))
        client.log_param(rid, "overrides", json.dumps(arm.overrides, sort_keys=True)[:6000])
        for r in runs:
            for rr in r.rounds:
                client.log_metric(
                    rid, f"{r.split}/seed_{r.seed}/eval_loss", rr.eval_loss, step=rr.round
                )
        for (_, split), curve in time_curves(runs).items():
            for rnd, (at, _loss) in enumerate(curve):  # simulated, not measured
                client.log_metric(rid, f"{split}/simulated_seconds", at, step=rnd)
        for split in spec.splits:
            for rnd, loss in curves.get((arm.name, split), []):
                client.log_metric(rid, f"{split}/eval_loss", loss, step=rnd)
            row = rows.get((arm.name, split))
            if row is None:
                continue
            for key in ("eval_loss_mean", "eval_loss_std", "perplexity_mean", "wall_seconds",
                        "bytes_sent", "train_tokens"):  # fmt: skip
                client.log_metric(rid, f"{split}/final/{key}", float(getattr(row, key)))
            if row.epsilon is not None:
                client.log_metric(rid, f"{split}/final/epsilon", row.epsilon)
            if row.virtual_seconds is not None:
                client.log_metric(rid, f"{split}/final/simulated_seconds", row.virtual_seconds)
            for p, v in row.party_loss.items():
                client.log_metric(rid, f"{split}/final/party/{p}/eval_loss", v)
        for i, g in enumerate(goals):
            if g.value is not None and math.isfinite(g.value):
                client.log_metric(rid, f"targets/{i + 1}", g.value)
        for path in files.values():
            client.log_artifact(rid, str(path), artifact_path="comparison")
        client.set_terminated(rid)
        ids.append(rid)
    return ids
