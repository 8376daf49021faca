"""Protected rounds, stage by stage: weighted means, dropouts, tampering, policies and privacy.

Every round runs in-process through `tests.protected_support.Federation`, which calls the party and
coordinator stages in the order the ZenML pipeline wires them. Tampering happens on the exchange
between stages (the driver's `hook`), or right after a roster is written (a wrapped roster step),
exactly where an attacker controlling the untrusted exchange could act.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloudfed import coordinator as coordinator_role
from cloudfed import party as party_role
from cloudfed.artifacts import AggregateReport, GlobalAdapterRef, SecAggRoster
from cloudfed.coordinator import uploads
from cloudfed.errors import AggregationError, ConfigError, ProtectionError
from cloudfed.exchange import (
    ckks_public_key,
    global_adapter_key,
    secagg_advert_key,
    secagg_reveal_key,
    secagg_share_key,
    update_key,
)
from cloudfed.protection import messages, secure_sum
from cloudfed.protection.messages import load_global
from tests.protected_support import Federation, federation_dict

A, B, C = NAMES = ("alpha-aws", "beta-gcp", "gamma-azure")
STAGES = ("advertise", "share_keys", "upload", "unmask")
# Constant updates and example counts: weights 0.1, 0.1, 0.2 (weight_cap 1000), mean 0.0275.
VALUES = {A: 0.01, B: 0.02, C: 0.04}
EXAMPLES = {A: 100, B: 100, C: 200}
SIG = 64  # Ed25519 signature at the end of every sealed or signed message

HYBRID = {
    "rules": [
        {"pattern": "*lora_A*", "mode": "ckks"},
        {"pattern": "*v_proj.lora_B*", "mode": "plaintext"},
    ],
    "public_tensors": ["*v_proj.lora_B*"],
    "ckks": {"workers": 1},
}


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model cache per module, so the tiny model is built once here."""
    return tmp_path_factory.mktemp("models")


def make_fed(tmp_path: Path, model_cache: Path, **overrides: Any) -> Federation:
    return Federation(federation_dict(tmp_path, model_cache, NAMES, **overrides))


def const_updates(fed: Federation, names: Iterable[str] = NAMES):
    return {p: (fed.const(VALUES[p]), EXAMPLES[p]) for p in names}


def random_updates(fed: Federation, names: Iterable[str] = NAMES, *, salt: int = 0):
    """Distinct, random-looking updates (normal(0, 0.01)) per party and tensor."""
    out = {}
    for k, p in enumerate(names):
        rng = np.random.default_rng(100 * salt + k)
        state = {
            name: rng.normal(0.0, 0.01, fed.initial[name].shape).astype(np.float32)
            for name in sorted(fed.initial)
        }
        out[p] = (state, EXAMPLES[p])
    return out


def weight(examples: int, cap: int = 1000) -> float:
    return min(examples, cap) / cap


def const_mean(counted: Iterable[str]) -> float:
    counted = list(counted)
    total = sum(weight(EXAMPLES[p]) for p in counted)
    return sum(weight(EXAMPLES[p]) * VALUES[p] for p in counted) / total


def exact_mean(updates, counted: Iterable[str]) -> dict[str, np.ndarray]:
    counted = list(counted)
    total = sum(weight(updates[p][1]) for p in counted)
    names = updates[counted[0]][0]
    return {
        n: sum(weight(updates[p][1]) * updates[p][0][n].astype(np.float64) for p in counted) / total
        for n in names
    }


def max_error(fed: Federation, ref: GlobalAdapterRef, base: dict, expected) -> float:
    """Largest |new - base - expected| over every tensor; `expected` is a float or per tensor."""
    got = load_global(fed.exchange, ref)
    assert sorted(got) == sorted(base)
    errs = []
    for name, value in got.items():
        want = expected if isinstance(expected, float) else expected[name]
        errs.append(np.max(np.abs(value.astype(np.float64) - base[name] - want)))
    return float(max(errs))


def flip(fed: Federation, key: str, pos: int) -> None:
    """Flip one bit of the byte at `pos` (negative counts from the end) of an exchange object."""
    blob = bytearray(fed.exchange.get_bytes(key))
    blob[pos] ^= 0x01
    fed.exchange.put_bytes(key, bytes(blob))


def published(fed: Federation, round: int) -> bool:
    return fed.exchange.exists(global_adapter_key(fed.plan.run_id, round))


def reason_of(report: AggregateReport, party: str) -> str | None:
    return next((r.reason for r in report.rejected if r.party == party), None)


def on(stage: str, action: Callable[[Federation], None]):
    """A hook that runs `action` once, after the party stage `stage`."""

    def hook(at: str, fed: Federation) -> None:
        if at == stage:
            action(fed)

    return hook


@pytest.fixture
def rosters(monkeypatch: pytest.MonkeyPatch) -> dict[str, SecAggRoster]:
    """Every roster the coordinator writes during the test, by stage."""
    seen: dict[str, SecAggRoster] = {}
    for stage in ("keys", "shares", "inputs"):
        original = getattr(coordinator_role, f"{stage}_roster")

        def spy(*args, _original=original, _stage=stage, **kwargs):
            ref = _original(*args, **kwargs)
            seen[_stage] = ref
            return ref

        monkeypatch.setattr(coordinator_role, f"{stage}_roster", spy)
    return seen


# --- 1. weighted mean under secure aggregation ---------------------------------------------------


def test_weighted_mean_under_secagg(tmp_path: Path, model_cache: Path) -> None:
    fed = make_fed(tmp_path, model_cache)
    assert fed.plan.protection["tensors"] == {"secagg": len(fed.initial)}
    ref, report, sealed = fed.round(1, const_updates(fed))

    bound = report.secagg["quantisation_error_bound"]
    assert 0 < bound < 1e-6
    assert max_error(fed, ref, fed.initial, 0.0275) < 1e-6
    assert report.protection_mode == "secagg"
    assert report.policy_sha256 == fed.plan.protection["policy_sha256"]
    assert report.weights == {}  # per-party weights stay hidden
    assert report.weight_sum == pytest.approx(0.4, abs=1e-6)
    assert report.accepted == sorted(NAMES)
    assert report.rejected == []
    assert report.secagg["uploaded"] == 3 and report.secagg["revealed"] == 3
    assert {s.party for s in sealed} == set(NAMES)
    assert ref.key == global_adapter_key(fed.plan.run_id, 1) and published(fed, 1)


def test_coordinator_sums_masked_words_as_it_opens(
    tmp_path: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Streaming: each opened upload's masked words go into the running sum and are dropped, so
    neither the inputs roster nor the aggregate holds n updates; the mean is still exact."""
    import importlib

    round_module = importlib.import_module("cloudfed.coordinator.round")
    rosters_module = importlib.import_module("cloudfed.coordinator.rosters")
    real, held = uploads.verified_uploads, []

    def spy(*args: Any, **kwargs: Any) -> Any:
        out, bad = real(*args, **kwargs)
        held.append({p: set(u.sections) for p, u in out.items()})
        return out, bad

    monkeypatch.setattr(round_module, "verified_uploads", spy)
    monkeypatch.setattr(rosters_module, "verified_uploads", spy)
    fed = make_fed(tmp_path, model_cache)
    ref, report, _ = fed.round(1, const_updates(fed))
    assert max_error(fed, ref, fed.initial, 0.0275) < 1e-6
    assert report.accepted == sorted(NAMES)
    assert len(held) == 2 and all(set(call) == set(NAMES) for call in held)  # roster, aggregate
    assert all(sections == set() for call in held for sections in call.values())


# --- 2. dropouts through the stages --------------------------------------------------------------


@pytest.mark.parametrize("via", ["driver", "simulate_dropouts"])
@pytest.mark.parametrize("party", NAMES)
@pytest.mark.parametrize("stage", STAGES)
def test_one_dropout_at_each_stage(
    tmp_path: Path, model_cache: Path, stage: str, party: str, via: str
) -> None:
    overrides = {"simulate_dropouts": {party: stage}} if via == "simulate_dropouts" else {}
    fed = make_fed(tmp_path, model_cache, **overrides)
    drop = {party: stage} if via == "driver" else None
    ref, report, _ = fed.round(1, const_updates(fed), drop=drop)

    # A party that drops while unmasking has already uploaded: its input is counted.
    counted = [p for p in NAMES if p != party or stage == "unmask"]
    assert report.accepted == sorted(counted)
    assert max_error(fed, ref, fed.initial, const_mean(counted)) < 1e-6
    reason = reason_of(report, party)
    assert reason is not None and f"dropped at {stage}" in reason
    if via == "simulate_dropouts":
        assert "simulate_dropouts" in reason
    assert report.secagg["advertised"] == (2 if stage == "advertise" else 3)
    assert report.secagg["shared"] == (3 if stage in ("upload", "unmask") else 2)
    assert report.secagg["uploaded"] == len(counted)
    assert report.secagg["revealed"] == 2


@pytest.mark.parametrize(
    "stage, message",
    [
        ("advertise", r"1 party\(ies\) advertised .*fewer than min_parties=2"),
        ("share_keys", r"below the threshold t=2 / min_parties=2"),
        ("upload", r"below the threshold t=2 \(and min_parties=2\)"),
        ("unmask", r"only 1 share\(s\) of .* 2 are needed \(threshold t\)"),
    ],
)
def test_two_of_three_dropping_aborts_without_publishing(
    tmp_path: Path, model_cache: Path, stage: str, message: str
) -> None:
    fed = make_fed(tmp_path, model_cache)
    with pytest.raises(AggregationError, match=message) as info:
        fed.round(1, const_updates(fed), drop={A: stage, C: stage})
    assert "no model" in str(info.value).lower()
    assert not published(fed, 1)


# --- 3. tampering on the exchange ----------------------------------------------------------------


@pytest.mark.parametrize(
    "pos", [40, "middle", -SIG - 1, -1], ids=["header", "middle", "ciphertext", "signature"]
)
def test_flipped_byte_in_upload_rejects_that_party(
    tmp_path: Path, model_cache: Path, rosters: dict, pos
) -> None:
    fed = make_fed(tmp_path, model_cache)
    key = update_key(fed.plan.run_id, 1, C)

    def tamper(f: Federation) -> None:
        at = len(f.exchange.get_bytes(key)) // 2 if pos == "middle" else pos
        flip(f, key, at)

    ref, report, _ = fed.round(1, const_updates(fed), hook=on("upload", tamper))
    reason = reason_of(report, C)
    assert reason is not None and reason.startswith("sealed update rejected:")
    assert rosters["inputs"].uploaded == [A, B]
    assert [r.party for r in rosters["inputs"].rejected] == [C]
    assert report.accepted == [A, B]
    # C shared its keys, so its pairwise masks sit in A's and B's inputs: only C's key shares
    # remove them, and only then is the mean right.
    assert report.secagg["shared"] == 3 and report.secagg["uploaded"] == 2
    assert max_error(fed, ref, fed.initial, const_mean([A, B])) < 1e-6


@pytest.mark.parametrize("keep", [10, "half", -1], ids=["prefix", "half", "minus-one-byte"])
def test_truncated_upload_rejects_that_party(
    tmp_path: Path, model_cache: Path, rosters: dict, keep
) -> None:
    fed = make_fed(tmp_path, model_cache)
    key = update_key(fed.plan.run_id, 1, B)

    def truncate(f: Federation) -> None:
        blob = f.exchange.get_bytes(key)
        f.exchange.put_bytes(key, blob[: len(blob) // 2 if keep == "half" else keep])

    ref, report, _ = fed.round(1, const_updates(fed), hook=on("upload", truncate))
    assert reason_of(report, B) == "sealed update rejected: malformed"
    assert rosters["inputs"].uploaded == [A, C]
    assert report.accepted == [A, C]
    assert max_error(fed, ref, fed.initial, const_mean([A, C])) < 1e-6


def test_upload_tampered_after_inputs_roster_is_never_read(
    tmp_path: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The coordinator opens each upload once per round (at the inputs roster) and aggregates
    what it verified then: bytes an exchange writer puts there afterwards are never read."""
    fed = make_fed(tmp_path, model_cache)
    opened: list[str] = []
    real = uploads.open_upload

    def counting(*args, **kwargs):
        upload = real(*args, **kwargs)
        opened.append(upload.party)
        return upload

    monkeypatch.setattr(uploads, "open_upload", counting)
    hook = on("unmask", lambda f: flip(f, update_key(f.plan.run_id, 1, A), -1))
    ref, report, _ = fed.round(1, const_updates(fed), hook=hook)
    assert sorted(opened) == [A, B, C]  # once each, though two stages needed every upload
    assert report.accepted == [A, B, C]
    assert max_error(fed, ref, fed.initial, const_mean([A, B, C])) < 1e-6
    kept = uploads.opened_dir(fed.cfg, fed.plan.run_id, 1)
    assert not kept.exists()  # the round's opened copies are gone once it is published


def test_replayed_upload_from_previous_round_is_rejected(tmp_path: Path, model_cache: Path) -> None:
    fed = make_fed(tmp_path, model_cache)
    ref1, _, _ = fed.round(1, const_updates(fed))
    old = fed.exchange.get_bytes(update_key(fed.plan.run_id, 1, B))
    base = load_global(fed.exchange, ref1)

    hook = on("upload", lambda f: f.exchange.put_bytes(update_key(f.plan.run_id, 2, B), old))
    ref2, report, _ = fed.round(2, const_updates(fed), hook=hook)
    assert reason_of(report, B) == "sealed update rejected: context mismatch"
    assert report.accepted == [A, C]
    assert max_error(fed, ref2, base, const_mean([A, C])) < 1e-6


def test_replayed_upload_from_previous_run_is_rejected(tmp_path: Path, model_cache: Path) -> None:
    """Same federation, keys, round and base adapter; only the run differs."""
    raw = federation_dict(tmp_path, model_cache, NAMES)
    first = Federation(raw)
    # The first run is killed before anyone unmasks: had they, they would unmask this round only
    # for the same survivors again (test_privacy_claims: one survivor set per retried round).
    with pytest.raises(AggregationError):
        first.round(1, const_updates(first), drop={p: "unmask" for p in NAMES})
    old = first.exchange.get_bytes(update_key(first.plan.run_id, 1, B))

    second = Federation(raw)
    assert second.plan.run_id != first.plan.run_id
    assert second.current.sha256 == first.plan.initial_adapter.sha256
    hook = on("upload", lambda f: f.exchange.put_bytes(update_key(f.plan.run_id, 1, B), old))
    ref, report, _ = second.round(1, const_updates(second), hook=hook)
    assert reason_of(report, B) == "update belongs to another run of this federation (replay)"
    assert report.accepted == [A, C]
    assert max_error(second, ref, second.initial, const_mean([A, C])) < 1e-6


def test_upload_copied_to_another_partys_key_is_rejected(tmp_path: Path, model_cache: Path) -> None:
    fed = make_fed(tmp_path, model_cache)

    def copy(f: Federation) -> None:
        f.exchange.put_bytes(
            update_key(f.plan.run_id, 1, B), f.exchange.get_bytes(update_key(f.plan.run_id, 1, A))
        )

    ref, report, _ = fed.round(1, const_updates(fed), hook=on("upload", copy))
    assert reason_of(report, B) == "sealed update rejected: signature invalid"
    assert reason_of(report, A) is None
    assert report.accepted == [A, C]
    assert max_error(fed, ref, fed.initial, const_mean([A, C])) < 1e-6


def test_swapped_uploads_reject_both_and_abort(tmp_path: Path, model_cache: Path) -> None:
    fed = make_fed(tmp_path, model_cache)

    def swap(f: Federation) -> None:
        a, b = (
            f.exchange.get_bytes(update_key(f.plan.run_id, 1, A)),
            f.exchange.get_bytes(update_key(f.plan.run_id, 1, B)),
        )
        f.exchange.put_bytes(update_key(f.plan.run_id, 1, A), b)
        f.exchange.put_bytes(update_key(f.plan.run_id, 1, B), a)

    with pytest.raises(AggregationError, match=r"1 masked input\(s\) from \['gamma-azure'\]"):
        fed.round(1, const_updates(fed), hook=on("upload", swap))
    assert not published(fed, 1)


@pytest.mark.parametrize("how", ["flip", "copy-of-other"])
def test_tampered_advertisement_excludes_party_at_keys_roster(
    tmp_path: Path, model_cache: Path, rosters: dict, how: str
) -> None:
    fed = make_fed(tmp_path, model_cache)
    key = secagg_advert_key(fed.plan.run_id, 1, C)

    def tamper(f: Federation) -> None:
        if how == "flip":
            flip(f, key, len(f.exchange.get_bytes(key)) // 2)
        else:
            f.exchange.put_bytes(key, f.exchange.get_bytes(secagg_advert_key(f.plan.run_id, 1, A)))

    ref, report, _ = fed.round(1, const_updates(fed), hook=on("advertise", tamper))
    keys = rosters["keys"]
    assert keys.parties == [A, B]
    assert [r.party for r in keys.rejected] == [C]
    assert keys.rejected[0].reason.startswith("advertisement rejected: sealed secagg-advert")
    assert report.accepted == [A, B]
    assert report.secagg["advertised"] == 2
    assert max_error(fed, ref, fed.initial, const_mean([A, B])) < 1e-6


@pytest.mark.parametrize("roster", ["keys", "shares"])
def test_party_excluded_at_early_roster_is_named_in_report(
    tmp_path: Path, model_cache: Path, roster: str
) -> None:
    fed = make_fed(tmp_path, model_cache)
    if roster == "keys":
        hook = on("advertise", lambda f: flip(f, secagg_advert_key(f.plan.run_id, 1, C), -1))
    else:
        key = secagg_share_key(fed.plan.run_id, 1, A, C)
        hook = on("share_keys", lambda f: f.exchange.put_bytes(key, b"junk"))
    _, report, _ = fed.round(1, const_updates(fed), hook=hook)
    assert report.accepted == [A, B]
    assert reason_of(report, C) is not None


def test_advertisement_tampered_after_keys_roster_aborts(
    tmp_path: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The roster pins each advertisement's hash: neighbours refuse to mask against a new one."""
    fed = make_fed(tmp_path, model_cache)
    errors: dict[str, Exception] = {}
    original = party_role.upload

    def recording(cfg, party, *args, **kwargs):
        try:
            return original(cfg, party, *args, **kwargs)
        except ProtectionError as exc:
            errors[party.name] = exc
            raise

    monkeypatch.setattr(party_role, "upload", recording)
    hook = on("share_keys", lambda f: flip(f, secagg_advert_key(f.plan.run_id, 1, A), -1))
    with pytest.raises(AggregationError, match=r"1 masked input\(s\) from \['alpha-aws'\]"):
        fed.round(1, const_updates(fed), hook=hook)
    assert sorted(errors) == [B, C]
    assert all("advertisement of alpha-aws differs" in str(e) for e in errors.values())
    assert not published(fed, 1)


def test_tampered_share_fails_its_holder_and_round_completes(
    tmp_path: Path, model_cache: Path, rosters: dict
) -> None:
    """Holder B cannot open A's share: B refuses to reveal; A and C's reveals reach t=2."""
    fed = make_fed(tmp_path, model_cache)
    hook = on("share_keys", lambda f: flip(f, secagg_share_key(f.plan.run_id, 1, B, A), -SIG - 1))
    ref, report, _ = fed.round(1, const_updates(fed), hook=hook)
    assert rosters["shares"].shared == sorted(NAMES)  # the header still reads as a share
    reason = reason_of(report, B)
    assert reason == "dropped at unmask: sealed secagg-share rejected: signature invalid"
    assert report.accepted == sorted(NAMES)  # B's input was uploaded and is counted
    assert report.secagg["revealed"] == 2
    assert max_error(fed, ref, fed.initial, const_mean(NAMES)) < 1e-6


def test_unreadable_share_excludes_its_owner_at_shares_roster(
    tmp_path: Path, model_cache: Path, rosters: dict
) -> None:
    fed = make_fed(tmp_path, model_cache)
    key = secagg_share_key(fed.plan.run_id, 1, B, A)
    hook = on("share_keys", lambda f: f.exchange.put_bytes(key, f.exchange.get_bytes(key)[:10]))
    ref, report, _ = fed.round(1, const_updates(fed), hook=hook)
    assert rosters["shares"].shared == [B, C]
    assert [(r.party, r.reason) for r in rosters["shares"].rejected] == [
        (A, "shares missing for ['beta-gcp']")
    ]
    assert report.accepted == [B, C]
    assert max_error(fed, ref, fed.initial, const_mean([B, C])) < 1e-6


def test_tampered_shares_at_two_holders_abort(tmp_path: Path, model_cache: Path) -> None:
    fed = make_fed(tmp_path, model_cache)

    def tamper(f: Federation) -> None:
        flip(f, secagg_share_key(fed.plan.run_id, 1, B, A), -SIG - 1)
        flip(f, secagg_share_key(fed.plan.run_id, 1, C, A), -SIG - 1)

    with pytest.raises(AggregationError, match=r"only 1 share\(s\)"):
        fed.round(1, const_updates(fed), hook=on("share_keys", tamper))
    assert not published(fed, 1)


def test_tampered_reveal_is_rejected_and_sum_still_right(tmp_path: Path, model_cache: Path) -> None:
    fed = make_fed(tmp_path, model_cache)
    hook = on("unmask", lambda f: flip(f, secagg_reveal_key(f.plan.run_id, 1, C), -SIG - 1))
    ref, report, _ = fed.round(1, const_updates(fed), hook=hook)
    reason = reason_of(report, C)
    assert reason == "unmask response rejected: sealed secagg-reveal rejected: signature invalid"
    assert report.accepted == sorted(NAMES)  # C's input is in; only its reveal was refused
    assert report.secagg["revealed"] == 2
    assert max_error(fed, ref, fed.initial, const_mean(NAMES)) < 1e-6


def test_two_tampered_reveals_abort(tmp_path: Path, model_cache: Path) -> None:
    fed = make_fed(tmp_path, model_cache)

    def tamper(f: Federation) -> None:
        flip(f, secagg_reveal_key(fed.plan.run_id, 1, A), -1)
        flip(f, secagg_reveal_key(fed.plan.run_id, 1, C), -1)

    with pytest.raises(AggregationError, match=r"only 1 share\(s\)"):
        fed.round(1, const_updates(fed), hook=on("unmask", tamper))
    assert not published(fed, 1)


@pytest.mark.parametrize("rehash", [False, True], ids=["artifact-hash", "signature"])
@pytest.mark.parametrize(
    "stage, next_stage", [("keys", "share_keys"), ("shares", "upload"), ("inputs", "reveal_shares")]
)
def test_tampered_roster_is_refused_by_every_party(
    tmp_path: Path,
    model_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    stage: str,
    next_stage: str,
    rehash: bool,
) -> None:
    """A byte flipped in the signed roster right after the coordinator wrote it.

    `rehash` also swaps the roster artifact's hash for the tampered file's, as if the attacker
    controlled the orchestrator's artifact too: the coordinator's signature must still catch it.
    """
    fed = make_fed(tmp_path, model_cache)
    write = getattr(coordinator_role, f"{stage}_roster")

    def tampering(*args, **kwargs) -> SecAggRoster:
        ref = write(*args, **kwargs)
        flip(fed, ref.key, len(fed.exchange.get_bytes(ref.key)) // 2)
        if rehash:
            digest = hashlib.sha256(fed.exchange.get_bytes(ref.key)).hexdigest()
            ref = ref.model_copy(update={"sha256": digest})
        return ref

    errors: dict[str, Exception] = {}
    party_stage = getattr(party_role, next_stage)

    def recording(cfg, party, *args, **kwargs):
        try:
            return party_stage(cfg, party, *args, **kwargs)
        except Exception as exc:
            errors[party.name] = exc
            raise

    monkeypatch.setattr(coordinator_role, f"{stage}_roster", tampering)
    monkeypatch.setattr(party_role, next_stage, recording)
    with pytest.raises(ProtectionError, match=r"secagg.roster rejected"):
        fed.round(1, const_updates(fed))
    assert sorted(errors) == sorted(NAMES)
    for exc in errors.values():
        assert isinstance(exc, ProtectionError)
        expected = "sealed secagg-roster rejected" if rehash else "secagg roster rejected: not the"
        assert expected in str(exc)
    assert not published(fed, 1)


# --- 4. hybrid policy ----------------------------------------------------------------------------


def expected_route(name: str) -> str:
    if "lora_A" in name:
        return "ckks"
    if "v_proj.lora_B" in name:
        return "plaintext"
    return "secagg"


def test_hybrid_policy_routes_each_tensor(tmp_path: Path, model_cache: Path) -> None:
    fed = make_fed(tmp_path, model_cache, protection=HYBRID)
    assert fed.plan.protection["tensors"] == {"secagg": 2, "ckks": 4, "plaintext": 2}
    assert fed.plan.protection["mode"] == "hybrid(secagg=2,ckks=4,plaintext=2)"
    layout = messages.layout_for(fed.cfg, fed.exchange, fed.plan)
    routes = layout.routes()
    assert sorted(routes) == sorted(fed.initial)
    assert routes == {name: expected_route(name) for name in fed.initial}
    assert layout.policy_sha256 == fed.plan.protection["policy_sha256"]


def test_hybrid_secagg_and_plaintext_round(tmp_path: Path, model_cache: Path) -> None:
    """The two modes that need no CKKS: every tensor gets the right weighted mean."""
    protection = {
        "rules": [{"pattern": "*v_proj.lora_B*", "mode": "plaintext"}],
        "public_tensors": ["*v_proj.lora_B*"],
    }
    fed = make_fed(tmp_path, model_cache, protection=protection)
    assert fed.plan.protection["tensors"] == {"secagg": 6, "plaintext": 2}
    updates = random_updates(fed)
    ref, report, _ = fed.round(1, updates)
    assert report.protection_mode == "hybrid(secagg=6,plaintext=2)"
    assert report.weights == {}
    assert report.weight_sum == pytest.approx(0.4, abs=1e-6)
    assert max_error(fed, ref, fed.initial, exact_mean(updates, NAMES)) < 1e-6


def test_hybrid_three_mode_round(tmp_path: Path, model_cache: Path) -> None:
    pytest.importorskip("tenseal")
    fed = make_fed(tmp_path, model_cache, protection=HYBRID)
    updates = random_updates(fed)
    ref, report, _ = fed.round(1, updates)
    routes = messages.layout_for(fed.cfg, fed.exchange, fed.plan).routes()
    expected = exact_mean(updates, NAMES)
    got = load_global(fed.exchange, ref)
    for name, mode in routes.items():
        err = np.max(np.abs(got[name].astype(np.float64) - fed.initial[name] - expected[name]))
        assert err < (1e-4 if mode == "ckks" else 1e-6), (name, mode, err)
    assert report.protection_mode == "hybrid(secagg=2,ckks=4,plaintext=2)"
    assert report.accepted == sorted(NAMES)


@pytest.mark.parametrize(
    "protection",
    [
        {"rules": [{"pattern": "*v_proj.lora_B*", "mode": "plaintext"}]},
        {"default": "plaintext", "public_tensors": ["*lora_A*"]},
    ],
    ids=["rule", "default"],
)
def test_plaintext_for_unlisted_tensor_fails_at_prepare(
    tmp_path: Path, model_cache: Path, protection: dict
) -> None:
    with pytest.raises(ConfigError, match=r"protection\.public_tensors"):
        make_fed(tmp_path, model_cache, protection=protection)
    assert not (tmp_path / "exchange" / "test-fed" / "runs").exists()


def test_rule_matching_nothing_fails_at_prepare(tmp_path: Path, model_cache: Path) -> None:
    protection = {
        "rules": [
            {"pattern": "*lora_A*", "mode": "secagg"},
            {"pattern": "*k_proj*", "mode": "ckks"},  # k_proj is not a LoRA target here
        ]
    }
    with pytest.raises(ConfigError, match=r"protection\.rules\[1\]\.pattern '\*k_proj\*'"):
        make_fed(tmp_path, model_cache, protection=protection)


# --- 5. CKKS only --------------------------------------------------------------------------------


SECRET = "*secret-context*"  # the key party's CKKS secret context, whatever its round prefix


def files_named(root: Path, pattern: str) -> list[Path]:
    return sorted(p for p in root.rglob(pattern) if p.is_file()) if root.exists() else []


def test_ckks_secret_context_stays_with_key_party(tmp_path: Path, model_cache: Path) -> None:
    ts = pytest.importorskip("tenseal")
    fed = make_fed(tmp_path, model_cache, protection={"default": "ckks", "ckks": {"workers": 1}})
    cfg = fed.cfg
    assert cfg.ckks_key_party == A
    ref = party_role.ckks_keygen(cfg, cfg.party(A), fed.plan, 1)
    assert ref.key == ckks_public_key(fed.plan.run_id, 1)
    key_party = Path(cfg.party(A).storage)
    secrets = files_named(key_party, SECRET)
    assert len(secrets) == 1 and secrets[0].parent == key_party / "ckks" / fed.plan.run_id
    assert ts.context_from(secrets[0].read_bytes()).is_private()
    for other in (B, C):
        assert files_named(Path(cfg.party(other).storage), SECRET) == []
    assert files_named(tmp_path / "coordinator", SECRET) == []
    assert files_named(tmp_path / "exchange", SECRET) == []
    public = messages.ckks_public_context(cfg, fed.exchange, fed.plan, ref)
    assert not ts.context_from(public).is_private()


def test_ckks_only_rounds(tmp_path: Path, model_cache: Path) -> None:
    pytest.importorskip("tenseal")
    fed = make_fed(tmp_path, model_cache, protection={"default": "ckks", "ckks": {"workers": 1}})
    assert fed.plan.protection["tensors"] == {"ckks": len(fed.initial)}
    ref1, report, _ = fed.round(1, const_updates(fed))
    assert report.protection_mode == "ckks"
    assert report.policy_sha256 == fed.plan.protection["policy_sha256"]
    assert report.weights == {}
    assert report.accepted == sorted(NAMES)
    assert report.weight_sum == pytest.approx(0.4, abs=1e-4)
    assert max_error(fed, ref1, fed.initial, 0.0275) < 1e-4

    base = load_global(fed.exchange, ref1)
    ref2, report, _ = fed.round(2, const_updates(fed, [B, C]))
    assert report.accepted == [B, C]
    assert max_error(fed, ref2, base, const_mean([B, C])) < 1e-4

    assert files_named(tmp_path / "coordinator", SECRET) == []
    assert files_named(tmp_path / "exchange", SECRET) == []
    # Fresh keys every round, each secret context deleted once it decrypted its one sum.
    assert files_named(Path(fed.cfg.party(A).storage), SECRET) == []
    public = [fed.exchange.get_bytes(ckks_public_key(fed.plan.run_id, r)) for r in (1, 2)]
    assert public[0] != public[1]


# --- 6. config bounds ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "secagg, message",
    [
        ({"threshold": 1}, r"threshold t=1 is outside \[2, 3\].*strict majority"),
        ({"neighbours": 1}, r"neighbours k=1 is outside \[2, 2\] for 3 parties"),
    ],
    ids=["threshold-below-majority", "neighbours-too-few"],
)
def test_secagg_bounds_abort_at_keys_roster(
    tmp_path: Path, model_cache: Path, secagg: dict, message: str
) -> None:
    fed = make_fed(tmp_path, model_cache, protection={"secagg": secagg})
    with pytest.raises(AggregationError, match=r"protection\.secagg settings do not fit 3") as e:
        fed.round(1, const_updates(fed))
    assert e.match(message)
    exchange = tmp_path / "exchange" / "test-fed" / "runs" / fed.plan.run_id / "r0001" / "secagg"
    assert sorted(p.name for p in (exchange / "advertise").iterdir()) == [
        f"{p}.signed" for p in NAMES
    ]
    assert not (exchange / "shares").exists()  # nobody got as far as sharing keys
    assert not published(fed, 1)


@pytest.mark.parametrize("field", ["threshold", "neighbours"])
def test_secagg_zero_is_a_config_error(tmp_path: Path, model_cache: Path, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"protection\.secagg\.{field}"):
        make_fed(tmp_path, model_cache, protection={"secagg": {field: 0}})


# --- 7. privacy on the coordinator's side --------------------------------------------------------


def slices(data: bytes, size: int = 64) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data) - size + 1, size)]


def tensor_region(safetensors: bytes) -> bytes:
    (header,) = struct.unpack("<Q", safetensors[:8])
    return safetensors[8 + header :]


def found_in(root: Path, needles: list[bytes]) -> list[tuple[str, int]]:
    hits = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        hits += [(str(path), i) for i, n in enumerate(needles) if n in data]
    return hits


def test_coordinator_side_holds_no_update_and_no_quantised_words(
    tmp_path: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fed = make_fed(tmp_path, model_cache)
    words: dict[str, np.ndarray] = {}
    uploading: list[str] = []
    upload, encode = party_role.upload, secure_sum.encode_secagg

    def upload_spy(cfg, party, *args, **kwargs):
        uploading.append(party.name)
        return upload(cfg, party, *args, **kwargs)

    def encode_spy(*args, **kwargs):
        out = encode(*args, **kwargs)
        words[uploading[-1]] = out[0].copy()
        return out

    opened: list[bytes] = []  # every section the coordinator decrypted, in memory
    open_upload = uploads.open_upload

    def open_spy(*args, **kwargs):
        upload = open_upload(*args, **kwargs)
        opened.extend(upload.sections.values())
        return upload

    monkeypatch.setattr(party_role, "upload", upload_spy)
    monkeypatch.setattr(secure_sum, "encode_secagg", encode_spy)
    monkeypatch.setattr(uploads, "open_upload", open_spy)
    updates = random_updates(fed, salt=7)
    ref, report, _ = fed.round(1, updates)
    assert sorted(words) == sorted(NAMES)
    assert report.secagg["quantisation_error_bound"] < 1e-6
    assert max_error(fed, ref, fed.initial, exact_mean(updates, NAMES)) < 1e-6

    exchange, coordinator = tmp_path / "exchange", tmp_path / "coordinator"
    assert any(p.is_file() for p in coordinator.rglob("*"))
    for p in NAMES:
        update_file = Path(fed.cfg.party(p).storage) / "updates" / "r0001.safetensors"
        plain = slices(tensor_region(update_file.read_bytes()))
        quantised = slices(words[p].astype("<u4").tobytes())
        assert len(plain) > 50 and len(set(plain)) == len(plain)
        assert len(quantised) > 50 and len(set(quantised)) == len(quantised)
        # Control: the scan does find these slices where they are (the party's own storage).
        assert len(found_in(update_file.parent, plain)) == len(plain)
        for root in (exchange, coordinator):
            assert found_in(root, plain) == [], (p, root)
            assert found_in(root, quantised) == [], (p, root)
        # What the coordinator decrypts is masked: no run of a party's words or values in it.
        assert not any(n in section for section in opened for n in plain + quantised), p
    assert len(opened) == len(NAMES)  # each upload opened once, at the inputs roster
    # Control: the scan does reach into the exchange (the new global adapter is there).
    new_global = slices(tensor_region(fed.exchange.get_bytes(ref.key)))
    assert len(found_in(exchange, new_global)) == len(new_global)
