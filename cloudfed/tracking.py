"""What reviewers read in MLflow: per-round and per-party metrics, the round table and plots.

These functions log to whatever MLflow run is active (ZenML's experiment tracker opens one per
pipeline run for every tracked step) and take only aggregates, metrics and references.

One naming scheme for params, metrics and tags (the README lists every key): a key is a path with
`/` between levels. MLflow's UI groups charts by what comes before the last `/` and shows the
groups in alphabetical order, with keys that have no `/` last, so the headline values are under
`federation/` and every other group sorts after it: `party/<name>/...` for what one party
released, `privacy/...`, `protection/...` and `round/...` for the coordinator's values per round.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow

from cloudfed.artifacts import (
    AggregateReport,
    FederationPlan,
    GlobalAdapterRef,
    LocalUpdateRef,
    PartyEval,
    Rejection,
    SealedUpdateRef,
)
from cloudfed.coordinator import RoundEval
from cloudfed.data.ref import DatasetRef
from cloudfed.errors import ProtectionError
from cloudfed.federation import FederationConfig
from cloudfed.locations import on_disk

# MLflow's experiment tag for the kind of work an experiment holds; the UI of MLflow versions
# that read it opens a "custom model development" experiment on its runs and charts, not traces.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
# The run's name waits here until the report is published (see `name_run`).
RUN_NAME_TAG = "federation/run_name"


def party_key(party: str, name: str) -> str:
    """Everything one party released sits under one prefix (checked against the release rules)."""
    return f"party/{party}/{name}"


def set_experiment_kind(client: Any, experiment_id: str) -> None:
    """Mark the experiment as model training once; a kind someone chose in the UI is kept."""
    tags = client.get_experiment(experiment_id).tags
    if EXPERIMENT_KIND_TAG not in tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)


def run_name(cfg: FederationConfig, plan: FederationPlan) -> str:
    """So that runs tell apart: `demo-federation · secagg+dp-sgd · r1-4` (what and which rounds)."""
    tensors = plan.protection.get("tensors") or {}
    protection = (
        f"hybrid({','.join(tensors)})"
        if len(tensors) > 1
        else str(plan.protection.get("mode") or cfg.protection.mode)
    )
    privacy = "+dp-sgd" if cfg.privacy.dp_sgd else ""
    privacy += f"+{cfg.privacy.mode}" if cfg.privacy.enabled else ""
    rounds = (
        f"r{plan.start_round + 1}-{plan.rounds}"
        if plan.start_round < plan.rounds
        else f"no round left (at r{plan.start_round})"
    )
    return f"{cfg.federation_id} · {protection}{privacy} · {rounds}"


def name_run() -> None:
    """Give the active run the name `log_plan` chose.

    ZenML finds a pipeline run's MLflow run by the run's name and renames it to its own on every
    tracked step, so the name can only change in the last tracked step (publishing the report).
    """
    run = mlflow.active_run()
    name = mlflow.get_run(run.info.run_id).data.tags.get(RUN_NAME_TAG) if run else None
    if name:
        mlflow.set_tag("mlflow.runName", name)


def docs_link(uri: str) -> str:
    """A Data Docs link a reviewer can open: the storage's own URL, else an absolute file URI.

    A relative path is relative to the working directory the party ran in, which is the
    coordinator's too in the local demo; in a cloud a party's storage is an absolute path or a URL.
    """
    if not uri or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", uri):
        return uri
    return Path(uri).resolve().as_uri()


def aggregation_label(cfg: FederationConfig) -> str:
    """From the `aggregation:` block, as both roles build the strategy from it."""
    from cloudfed.aggregation.composed import strategy_for

    return strategy_for(cfg, {}).label(cfg.privacy.protects_records)


def log_plan(cfg: FederationConfig, plan: FederationPlan) -> None:
    """Params are named by their path in the run config (`training/batch_size`)."""
    active = mlflow.active_run()
    if active is not None:
        set_experiment_kind(mlflow.MlflowClient(), active.info.experiment_id)
    mlflow.set_tag(RUN_NAME_TAG, run_name(cfg, plan))
    mlflow.log_params(
        {
            "federation_id": cfg.federation_id,
            "base_model": cfg.base_model,
            "rounds": plan.rounds,
            "start_round": plan.start_round,
            "min_parties": cfg.min_parties,
            "parties": ",".join(plan.parties),
            "seed": cfg.seed,
            "training/local_steps": cfg.training.local_steps,
            "training/batch_size": cfg.training.batch_size,
            "training/learning_rate": cfg.training.learning_rate,
            "training/max_seq_len": cfg.training.max_seq_len,
            "lora/rank": cfg.lora.rank,
            "lora/alpha": cfg.lora.alpha,
            "lora/target_modules": ",".join(cfg.lora.target_modules),
            "config_fingerprint": plan.fingerprint,
            "adapter_parameters": plan.adapter_parameters,
            "aggregation": aggregation_label(cfg),
            "aggregation/strategy": cfg.aggregation.strategy,
            "aggregation/weighting": cfg.aggregation.weighting.preset,
            "aggregation/proximal_mu": cfg.aggregation.proximal_mu,
            "protection/mode": plan.protection.get("mode", ""),
            "protection/policy_sha256": plan.protection.get("policy_sha256", ""),
            "protection/weight_cap": cfg.protection.weight_cap,
            "protection/secagg/clip": cfg.protection.secagg.clip,
        }
    )
    mlflow.log_dict(
        {"layout": plan.protection, "settings": cfg.protection.model_dump(mode="json")},
        "protection/policy.json",
    )
    log_privacy_plan(cfg, plan)


def log_privacy_plan(cfg: FederationConfig, plan: FederationPlan) -> None:
    from cloudfed.privacy.budget import charged_for
    from cloudfed.privacy.party_level import calibration

    p = cfg.privacy
    params: dict[str, Any] = {
        "privacy/mode": p.mode,
        "privacy/dp_sgd_parties": ",".join(sorted(p.dp_sgd)),
    }
    if p.enabled:
        cal = calibration(cfg)
        params.update(
            {
                "privacy/clip": p.clip,
                "privacy/noise_multiplier": cal.noise_multiplier,
                "privacy/noise_multiplier_charged": charged_for(cfg, plan),
                "privacy/target_epsilon": p.target_epsilon,
                "privacy/max_epsilon": p.max_epsilon,
                "privacy/delta": p.delta,
                "privacy/accountant": p.accountant,
                "privacy/min_contributors": cfg.min_contributors,
                "privacy/colluding": p.colluding,
            }
        )
    mlflow.log_params(params)
    mlflow.log_dict(p.model_dump(mode="json"), "privacy/settings.json")


def log_ledger(ledger: Any, reservation: Any, round: int) -> None:
    """The whole ledger after each reservation: what every run of the federation has spent."""
    mlflow.log_dict(ledger.model_dump(mode="json"), "privacy/ledger.json")
    mlflow.log_metrics(
        {
            "privacy/epsilon_before_round": reservation.epsilon_before,
            "privacy/epsilon_if_round_runs": reservation.epsilon_after,
            "privacy/max_epsilon": reservation.max_epsilon,
        },
        step=round,
    )
    if not reservation.granted:
        mlflow.set_tag("privacy/budget_stop", reservation.message)


def overall_loss(evals: Sequence[PartyEval]) -> float:
    """Token-weighted across parties, i.e. the loss of the union of held-out sets."""
    tokens = sum(e.tokens for e in evals)
    return sum(e.loss * e.tokens for e in evals) / tokens if tokens else float("nan")


def log_exclusions(excluded: Sequence[Rejection]) -> None:
    """Parties left out of the whole run because their data failed its contract."""
    mlflow.log_metric("round/parties_excluded", len(excluded), step=0)
    if excluded:
        mlflow.log_dict([r.model_dump() for r in excluded], "rejections/round_0000.json")
        mlflow.set_tag("federation/excluded_parties", ",".join(r.party for r in excluded))


def log_harmonisation(datasets: Sequence[DatasetRef]) -> dict[str, float]:
    """Contract versions, Data Docs links and the cross-party report; returns the metrics.

    The contract hash is a param (which contract a run's data passed), the Data Docs location a
    tag (a link into the party's own storage: the page itself never leaves the party).
    """
    from cloudfed.data.report import harmonisation_report, report_markdown

    metrics: dict[str, float] = {}
    for d in datasets:
        mlflow.log_param(party_key(d.party, "contract_sha256"), d.contract_sha256)
        mlflow.log_param(party_key(d.party, "canonical_sha256"), d.canonical_sha256)
        mlflow.set_tag(party_key(d.party, "data_docs"), docs_link(d.docs_uri))
    if any(d.redacted for d in datasets):  # under DP: contract versions and links only
        mlflow.log_dict(
            {
                "redacted": "under DP a party releases no counts, profiles or expectation "
                "outcomes; its Data Docs and quarantine stay in its own storage",
                "parties": {d.party: d.contract_sha256 for d in datasets},
            },
            "harmonisation/report.json",
        )
        return metrics
    for d in datasets:
        metrics[party_key(d.party, "rows_read")] = d.rows_read
        metrics[party_key(d.party, "rows_accepted")] = d.rows_accepted
        metrics[party_key(d.party, "rows_quarantined")] = d.rows_quarantined
        metrics[party_key(d.party, "rows_repaired")] = d.rows_repaired
        for reason, n in d.quarantine_reasons.items():
            metrics[party_key(d.party, f"quarantined/{reason.lower()}")] = n
        for kind, n in d.pii_replaced.items():
            metrics[party_key(d.party, f"pii/{kind.lower()}")] = n
        metrics[party_key(d.party, "contract_warnings")] = len(d.warnings)
    report = harmonisation_report(datasets)
    report["data_docs"] = {d.party: docs_link(d.docs_uri) for d in datasets}  # as the tags
    mlflow.log_dict(report, "harmonisation/report.json")
    mlflow.log_text(report_markdown(report), "harmonisation/report.md")
    mlflow.log_table(
        {k: [r[k] for r in report["parties"]] for k in report["parties"][0]},
        "harmonisation/parties.json",
    )
    return metrics


def log_round_metrics(
    round: int,
    ev: RoundEval,
    report: AggregateReport | None,
    local_updates: Sequence[LocalUpdateRef],
    sealed: Sequence[SealedUpdateRef],
    datasets: Sequence[DatasetRef] = (),
) -> dict[str, Any]:
    """One round in MLflow; per-party values only as the release rules allow (README)."""
    loss = ev.loss
    metrics: dict[str, float] = {}
    if not math.isnan(loss):
        metrics.update(
            {"federation/eval_loss": loss, "federation/eval_perplexity": math.exp(min(loss, 50))}
        )
    metrics["round/parties_evaluated"] = len(ev.evaluators)
    for e in ev.per_party:  # without DP only
        metrics[party_key(e.party, "eval_loss")] = e.loss
        metrics[party_key(e.party, "eval_perplexity")] = e.perplexity
        metrics[party_key(e.party, "seconds_evaluate")] = e.seconds
    train_losses = []
    for u in local_updates:
        for key in ("dp_sgd_epsilon", "dp_sgd_noise_multiplier", "dp_sgd_sample_rate"):
            if key in u.train:
                metrics[party_key(u.party, key)] = float(u.train[key])
        if "loss_mean" in u.train:  # without DP only
            train_losses.append(float(u.train["loss_mean"]))
            metrics[party_key(u.party, "train_loss")] = float(u.train["loss_mean"])
            metrics[party_key(u.party, "train_tokens")] = float(u.train["tokens"])
            metrics[party_key(u.party, "tokens_per_s")] = float(u.train["tokens_per_s"])
            metrics[party_key(u.party, "seconds_train")] = float(u.train["seconds"])
    # Under DP no training loss is released (not even summed): DP-SGD's epsilon does not cover it.
    train_loss = sum(train_losses) / len(train_losses) if train_losses else float("nan")
    if ev.note:
        mlflow.set_tag(f"federation/metrics_withheld/round_{round:04d}", ev.note)
    for s in sealed:
        metrics[party_key(s.party, "bytes_sent")] = s.bytes_sent
        metrics[party_key(s.party, "seconds_protect")] = s.seal_seconds
        if s.plaintext_bytes:
            metrics[party_key(s.party, "bytes_over_fp32")] = s.bytes_sent / s.plaintext_bytes
    if sealed:
        metrics["federation/bytes_sent"] = sum(s.bytes_sent for s in sealed)
    if report is not None:
        metrics.update(
            {
                "round/parties_accepted": len(report.accepted),
                "round/parties_rejected": len(report.rejected),
                "round/bytes_received": report.bytes_received,
                "round/seconds_aggregate": report.seconds,
                "round/update_norm": report.update_norm,
                "round/weight_sum": report.weight_sum,
                "round/clipped_values": report.clipped_values,
            }
        )
        for party, w in report.weights.items():
            metrics[party_key(party, "weight")] = w
        # The server optimiser's diagnostics: functions of the released aggregate only.
        diagnostics = report.aggregation.get("diagnostics", {})
        metrics.update({f"round/server/{k}": float(v) for k, v in diagnostics.items()})
        metrics.update({f"protection/secagg/{k}": v for k, v in report.secagg.items()})
        metrics.update({f"protection/ckks/{k}": v for k, v in report.ckks.items()})
        metrics.update(privacy_metrics(report.privacy))
        # Per round, so a reviewer sees which protection every aggregate was computed under.
        mlflow.log_dict(
            {
                "round": round,
                "mode": report.protection_mode,
                "policy_sha256": report.policy_sha256,
                "accepted": report.accepted,
                "secagg": report.secagg,
                "ckks": report.ckks,
                "privacy": report.privacy,
            },
            f"protection/round_{round:04d}.json",
        )
        mlflow.set_tag("protection/mode", report.protection_mode)
        mlflow.set_tag("protection/policy_sha256", report.policy_sha256)
        if report.rejected:
            mlflow.log_dict(
                [r.model_dump() for r in report.rejected], f"rejections/round_{round:04d}.json"
            )
    if (headline := headline_epsilon(metrics)) is not None:
        metrics["federation/epsilon"] = headline
    if datasets:
        metrics.update(log_harmonisation(datasets))
    mlflow.set_tag("federation/metrics_release", ev.released)
    mlflow.log_metrics(metrics, step=round)
    dp_eps = [
        float(u.train["dp_sgd_epsilon"]) for u in local_updates if "dp_sgd_epsilon" in u.train
    ]
    return {
        "round": round,
        "eval_loss": loss,
        "eval_perplexity": metrics.get("federation/eval_perplexity", float("nan")),
        "train_loss": train_loss,
        "parties": len(report.accepted) if report else len(ev.evaluators),
        "rejected": len(report.rejected) if report else 0,
        "bytes_sent": int(metrics.get("federation/bytes_sent", 0)),
        "epsilon": report.privacy.get("epsilon", float("nan")) if report else float("nan"),
        "dp_sgd_epsilon_max": max(dp_eps) if dp_eps else float("nan"),
        **{f"{e.party}/eval_loss": e.loss for e in ev.per_party},
        **{
            f"{u.party}/dp_sgd_epsilon": float(u.train["dp_sgd_epsilon"])
            for u in local_updates
            if "dp_sgd_epsilon" in u.train
        },
    }


# What a round's privacy report holds and MLflow shows per round as `privacy/<key>`.
PRIVACY_ROUND_KEYS = (
    "epsilon",
    "delta",
    "noise_multiplier",
    "effective_noise_multiplier",
    "effective_noise_multiplier_vs_coordinator",
    "colluding",
    "contributors",
    "noise_std",
    "clip",
)


def privacy_metrics(privacy: dict[str, Any]) -> dict[str, float]:
    """Epsilon (federation and per party), delta, noise, clip and fraction clipped of a round."""
    if not privacy:
        return {}
    out = {f"privacy/{k}": float(privacy[k]) for k in PRIVACY_ROUND_KEYS}
    out.update({party_key(p, "epsilon"): float(e) for p, e in privacy["party_epsilon"].items()})
    return out


def headline_epsilon(metrics: dict[str, float]) -> float | None:
    """The federation's epsilon so far: party-level when that is on, else the largest DP-SGD one.

    A function of values already released (`privacy/epsilon`, `party/<name>/dp_sgd_epsilon`),
    so charting it releases nothing new.
    """
    if "privacy/epsilon" in metrics:
        return metrics["privacy/epsilon"]
    record_level = [v for k, v in metrics.items() if k.endswith("/dp_sgd_epsilon")]
    return max(record_level) if record_level else None


def figure_png(fig: Any) -> bytes:
    """A finished matplotlib figure as PNG bytes, closed: every chart of the project alike."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def loss_plot_png(rows: Sequence[dict[str, Any]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    rounds = [r["round"] for r in rows]
    ax.plot(rounds, [r["eval_loss"] for r in rows], marker="o", label="held-out loss (all parties)")
    trained = [r for r in rows if not math.isnan(r["train_loss"])]
    ax.plot(
        [r["round"] for r in trained],
        [r["train_loss"] for r in trained],
        marker="s",
        linestyle="--",
        label="local train loss (mean)",
    )
    ax.set_xlabel("round")
    ax.set_ylabel("loss (nats/token)")
    ax.set_xticks(rounds)
    ax.grid(alpha=0.3)
    ax.legend()
    return figure_png(fig)


def privacy_plot_png(rows: Sequence[dict[str, Any]]) -> bytes | None:
    """Epsilon against round, and held-out loss against epsilon (the privacy/utility curve)."""
    key = "epsilon"
    spent = [r for r in rows if not math.isnan(r.get(key, float("nan")))]
    if len(spent) < 2:  # no party-level DP: the largest party's DP-SGD epsilon instead
        key = "dp_sgd_epsilon_max"
        spent = [r for r in rows if not math.isnan(r.get(key, float("nan")))]
    if len(spent) < 2:
        return None
    curve = [r for r in spent if not math.isnan(r["eval_loss"])]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    label = (
        "epsilon spent (federation, all runs)"
        if key == "epsilon"
        else "DP-SGD epsilon, largest party (all runs)"
    )
    left.plot([r["round"] for r in spent], [r[key] for r in spent], marker="o")
    left.set_xlabel("round")
    left.set_ylabel(label)
    left.grid(alpha=0.3)
    right.plot([r[key] for r in curve], [r["eval_loss"] for r in curve], marker="o")
    for r in curve:
        right.annotate(f"r{r['round']}", (r[key], r["eval_loss"]), fontsize=8)
    if not curve:  # too few evaluators for a secure sum under DP
        right.text(0.5, 0.5, "held-out loss not released", ha="center", transform=right.transAxes)
    right.set_xlabel("epsilon")
    right.set_ylabel("held-out loss")
    right.grid(alpha=0.3)
    return figure_png(fig)


TABLE_PARTY_COLUMNS = 6  # more parties than this: the round table shows min and max


def _range(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Lowest and highest of the values a round has (None and NaN are absent values)."""
    known = [v for v in values if v is not None and not math.isnan(v)]
    return (min(known), max(known)) if known else (None, None)


def _fmt(value: Any, spec: str) -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else format(value, spec)
    )


def summary_text(rows: Sequence[dict[str, Any]], stop_reason: str) -> str:
    from rich.console import Console
    from rich.table import Table

    parties = sorted({k.split("/")[0] for r in rows for k in r if k.endswith("/eval_loss")})
    dp_parties = sorted({k.split("/")[0] for r in rows for k in r if k.endswith("/dp_sgd_epsilon")})
    party_level = any(not math.isnan(r.get("epsilon", float("nan"))) for r in rows)
    table = Table(title="cloudfed: federated LoRA fine-tuning, held-out loss per round")
    trained = any(not math.isnan(r["train_loss"]) for r in rows)  # not released under DP
    columns = ["round", "eval loss", "ppl", *(["train loss"] if trained else [])]
    columns += ["parties", "rejected", "bytes sent"]
    columns += ["epsilon"] if party_level else []
    # Beyond a handful of parties one column each no longer fits a terminal: show the range.
    wide = len(dp_parties) > TABLE_PARTY_COLUMNS or len(parties) > TABLE_PARTY_COLUMNS
    # Per metric: its label when wide, (column, party) pairs when not, its key and format.
    per_party = [
        group
        for group in (
            ("eps", [(f"eps {p}", p) for p in dp_parties], "dp_sgd_epsilon", ".3f"),
            ("party loss", [(p, p) for p in parties], "eval_loss", ".4f"),
        )
        if group[1]  # no party has the metric: no columns for it
    ]
    for label, cols, _, _ in per_party:
        columns += [f"{label} min", f"{label} max"] if wide else [c for c, _ in cols]
    for col in columns:
        table.add_column(col, justify="right")
    for r in rows:
        cells = [
            str(r["round"]),
            _fmt(r["eval_loss"], ".4f"),
            _fmt(r["eval_perplexity"], ".1f"),
            *([_fmt(r["train_loss"], ".4f")] if trained else []),
            str(r["parties"]),
            str(r["rejected"]),
            f"{r['bytes_sent']:,}",
        ]
        cells += [_fmt(r.get("epsilon", float("nan")), ".3f")] if party_level else []
        for _, cols, metric, spec in per_party:
            values = [r.get(f"{p}/{metric}") for _, p in cols]  # absent: shown as "-"
            cells += [_fmt(v, spec) for v in (_range(values) if wide else values)]
        table.add_row(*cells)
    console = Console(record=True, width=160, file=io.StringIO())
    console.print(table)
    first, last = rows[0], rows[-1]
    change = (
        f"{100 * (1 - last['eval_loss'] / first['eval_loss']):.1f}% lower"
        if not (math.isnan(first["eval_loss"]) or math.isnan(last["eval_loss"]))
        else "not released"
    )
    start = "round 0, base model" if first["round"] == 0 else f"round {first['round']}, continued"
    console.print(
        f"eval loss {_fmt(first['eval_loss'], '.4f')} ({start}) -> "
        f"{_fmt(last['eval_loss'], '.4f')} (round {last['round']}): {change}. "
        f"Stopped: {stop_reason}."
    )
    if dp_parties:
        console.print(
            (
                "eps min/max: the lowest and highest of the parties' record-level DP-SGD epsilons"
                if wide
                else "eps <party>: that party's record-level DP-SGD epsilon"
            )
            + " (delta in privacy.dp_sgd) over every run on its data so far. Under DP, losses are "
            "sums over every evaluating party (secure sum); no party's own loss leaves it."
        )
    if wide:
        console.print(
            f"{max(len(parties), len(dp_parties))} parties: each party's values are in MLflow "
            "(party/<name>/...)."
        )
    return console.export_text()


def publish_run_report(
    cfg: FederationConfig,
    plan: FederationPlan,
    rows: Sequence[dict[str, Any]],
    final: GlobalAdapterRef,
    stop_reason: str,
) -> str:
    """Round table, plots and final adapter to MLflow and the federation's `last_run` folder.

    A run that trained no round publishes nothing: `last_run` keeps the report of the run that
    trained the current model, and the message says where that model is.
    """
    import pandas as pd

    from cloudfed.exchange import federation_exchange

    rows = sorted(rows, key=lambda r: r["round"])
    text = summary_text(rows, stop_reason)
    out = cfg.coordinator_dir / "last_run"
    exchange = federation_exchange(cfg)
    if final.round <= plan.start_round:
        where = (
            f"No round was trained in this run, so nothing new was published. The federation's "
            f"model is still round {final.round}: {exchange.url(final.key)} (sha256 "
            f"{final.sha256}); its report and adapter: {out}/"
        )
        mlflow.set_tags(
            {"federation/stop_reason": stop_reason, "federation/final_round": str(final.round)}
        )
        text = f"{text}\n{where}\n"
        print(text)
        return text
    adapter = exchange.get_bytes(final.key)
    if hashlib.sha256(adapter).hexdigest() != final.sha256:
        raise ProtectionError("final adapter rejected: hash mismatch")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.iterdir():  # nothing of an earlier run may sit beside this one's report
        if stale.is_file():
            stale.unlink()
    table = pd.DataFrame(rows)
    with on_disk(out, download=False) as folder:  # MLflow logs files; a bucket gets them after
        table.to_csv(folder / "round_table.csv", index=False)
        (folder / "summary.txt").write_text(text, encoding="utf-8")
        (folder / "loss_per_round.png").write_bytes(loss_plot_png(rows))
        names = ["round_table.csv", "summary.txt", "loss_per_round.png"]
        if (privacy_png := privacy_plot_png(rows)) is not None:
            (folder / "privacy_per_round.png").write_bytes(privacy_png)
            names.append("privacy_per_round.png")
        (folder / "adapter.safetensors").write_bytes(adapter)
        for name in names:
            mlflow.log_artifact(str(folder / name), artifact_path="report")
        mlflow.log_artifact(str(folder / "adapter.safetensors"), artifact_path="final_adapter")
    mlflow.log_table(table, artifact_file="report/round_table.json")
    mlflow.set_tags(
        {
            "federation/stop_reason": stop_reason,
            "federation/final_round": str(final.round),
            "federation/final_adapter_sha256": final.sha256,
        }
    )
    print(text)
    return text


def log_virtual_clock(round: int, clock: dict[str, float]) -> dict[str, float]:
    """A buffered round's simulated time and staleness as `round/<name>` (virtual, not measured)."""
    metrics = {f"round/{k}": float(v) for k, v in clock.items()}
    mlflow.log_metrics(metrics, step=round)
    return metrics
