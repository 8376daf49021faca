"""Every privacy claim, played by its adversary (issue 11's items, in order).

1. Real-valued noise is sound: the grid distinguisher is at chance on the fixed mechanisms and
   far above it on the old one.
2. Distributed shares are sized so that the noise excluding any colluding co-contributors still
   carries the charged standard deviation, for every survivor count.
3. No side channels: clear headers hold routing only; what a party releases under DP holds no
   count, no per-party metric and no plain hash of its data; weights are uniform; metrics leave
   only as a secure sum that cannot be differenced.
4. Parties gate their own reveals and decryptions; uploads and decryptions happen once.
5. A launcher cannot weaken a party's protection: policies, pins, and a ledger that cannot roll
   back.
6. Hard stops: finite record-level caps, the stricter of run config and policy, one ledger per
   party across federations.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from cloudfed import party as party_mod
from cloudfed.coordinator import coordinator_keys, round_eval
from cloudfed.data.ref import DatasetRef, ValidationSummary
from cloudfed.errors import (
    AggregationError,
    ConfigError,
    DataError,
    ProtectionError,
)
from cloudfed.exchange import ckks_sum_key, secagg_reveal_key
from cloudfed.federation import parse_federation
from cloudfed.party import back_onto_grid
from cloudfed.party import training as party_training
from cloudfed.party_policy import ConsentError, dp_sgd_cap, enforce, load_policy, policy_path
from cloudfed.privacy import party_ledger
from cloudfed.privacy.accountant import GaussianEvent, epsilon
from cloudfed.privacy.budget import reserve_round
from cloudfed.privacy.ledger import LEDGER_KEY, LedgerStore, verified_for_party
from cloudfed.privacy.noise import (
    CENTRAL_GRID_BITS,
    Calibration,
    central_noise,
    noisy_on_grid,
    power_of_two_grid,
    seeded_sampler,
)
from cloudfed.privacy.party_level import ckks_grid
from cloudfed.privacy.settings import DEFAULT_DP_SGD_MAX_EPSILON, DpSgdSettings
from cloudfed.protection import SealContext, messages, seal
from cloudfed.protection.envelope import sign_public
from cloudfed.protection.headers import ALLOWED
from cloudfed.protection.keys import load_or_create_keys
from tests.attacks import (
    grid_distinguisher,
    headers_on_exchange,
    legacy_real_noise,
    peer_weight,
)
from tests.protected_support import Federation, federation_dict

A, B, C = NAMES = ("alpha-aws", "beta-gcp", "gamma-azure")
D = "delta-onprem"
CLIP = 0.05
DELTA = 1e-5
TRIALS = 3000  # 3 sigma of a fair coin over 3000 trials: 0.027
THREE_SIGMA = 3 * math.sqrt(0.25 / TRIALS)


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


def dp(mode: str, z: float = 1.0, **extra: Any) -> dict[str, Any]:
    return {"mode": mode, "clip": CLIP, "noise_multiplier": z, "max_epsilon": 1e6, **extra}


DP_SGD = {n: {"noise_multiplier": 1.0, "max_epsilon": 50.0} for n in NAMES}


def make_fed(tmp_path: Path, model_cache: Path, names=NAMES, **overrides: Any) -> Federation:
    return Federation(federation_dict(tmp_path, model_cache, names, **overrides))


def updates_of(fed: Federation, examples: dict[str, int] | None = None, norm: float = CLIP / 2):
    out = {}
    for i, p in enumerate(fed.cfg.active_parties):
        rng = np.random.default_rng(i)
        state = {k: rng.normal(size=v.shape) for k, v in sorted(fed.initial.items())}
        f = norm / math.sqrt(sum(float(np.sum(v**2)) for v in state.values()))
        out[p.name] = (
            {k: (v * f).astype(np.float32) for k, v in state.items()},
            (examples or {}).get(p.name, 50),
        )
    return out


def reserve(fed: Federation, round: int, parties=NAMES) -> None:
    keys = coordinator_keys(fed.cfg, fed.exchange)
    assert reserve_round(fed.cfg, fed.exchange, keys, fed.plan, round, list(parties)).granted


# --- 1. real-valued noise is sound -------------------------------------------------------------


def _central(std: float):
    def release(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return central_noise(values, std, seeded_sampler(int(rng.integers(2**31))))[0]

    return release


def _ckks_shares(std: float, grid: float, others_share: bool = True):
    """Two parties' CKKS inputs on the shared grid, a CKKS-sized error, the key party's rounding.

    P's noise share is in the sum in both worlds (replace-one: its data, or zeros), so only its
    data differs between the hypotheses.
    """

    def release(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        sampler = seeded_sampler(int(rng.integers(2**31)))
        # `values` holds others (+ mine): split it so each party rounds its own part.
        total = noisy_on_grid(values, std, grid, sampler) + noisy_on_grid(
            np.zeros_like(values), std, grid, sampler
        )
        decrypted = total + rng.uniform(-4e-8, 4e-8, values.shape[0])  # CKKS at scale 2^40
        return back_onto_grid(decrypted, grid, 1)

    return release


def _legacy_ckks(std: float):
    legacy = legacy_real_noise(std)

    def release(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return legacy(values, rng) + rng.uniform(-4e-8, 4e-8, values.shape[0])

    return release


def _grids(std: float) -> list[float]:
    """Every grid an adversary might try: the old one and the power-of-two grids near it."""
    return [std / (1 << 20), *(power_of_two_grid(std, b) for b in (16, 20, 21, 30))]


@pytest.mark.parametrize("mechanism", ["central", "ckks"])
def test_grid_distinguisher_beats_the_old_real_noise(mechanism: str) -> None:
    std = 1.0
    release = legacy_real_noise(std) if mechanism == "central" else _legacy_ckks(std)
    acc = grid_distinguisher(
        release,
        std=std,
        grids=_grids(std),
        trials=TRIALS,
        dims=32,
        contribution_norm=0.01 * std,
        seed=1,
    )
    assert acc > 0.9  # the residual below the grid gives participation away


@pytest.mark.parametrize("mechanism", ["central", "ckks"])
def test_grid_distinguisher_is_at_chance_on_the_fixed_noise(mechanism: str) -> None:
    std = 1.0
    grid = power_of_two_grid(std, CENTRAL_GRID_BITS) if mechanism == "central" else 2.0**-21
    release = _central(std) if mechanism == "central" else _ckks_shares(std, grid)
    acc = grid_distinguisher(
        release,
        std=std,
        grids=[*_grids(std), grid],
        trials=TRIALS,
        dims=32,
        # ||contribution|| / std = 0.01: the Gaussian itself allows an advantage below 0.005.
        contribution_norm=0.01 * std,
        seed=1,
    )
    assert abs(acc - 0.5) < THREE_SIGMA + 0.005


def test_fixed_noise_releases_only_exact_grid_multiples() -> None:
    values = np.random.default_rng(0).uniform(-1, 1, 10_000) * 1e-3
    out, grid = central_noise(values, 0.07, seeded_sampler(1))
    np.testing.assert_array_equal(out / grid, np.rint(out / grid))
    shares = noisy_on_grid(values, 0.07, 2.0**-21, seeded_sampler(2))
    np.testing.assert_array_equal(shares / 2.0**-21, np.rint(shares / 2.0**-21))


def test_key_party_rounds_a_real_ckks_sum_back_onto_the_grid() -> None:
    """Through TenSEAL: the noisy shares' exact grid sum comes back bit for bit."""
    ckks = pytest.importorskip("cloudfed.protection.ckks")
    secret, public = ckks.generate_keys(ckks.CkksParams(workers=1))
    grid, std, n = 2.0**-21, 0.05, 3000
    rng = np.random.default_rng(5)
    shares = [
        noisy_on_grid(rng.uniform(-0.05, 0.05, n), std, grid, seeded_sampler(k)) for k in range(3)
    ]
    summed = ckks.add_encrypted(public, [ckks.encrypt_vector(public, s) for s in shares])
    decrypted = ckks.decrypt_vector(secret, summed, n)
    assert np.max(np.abs(decrypted - sum(shares))) > 0  # CKKS is approximate...
    np.testing.assert_array_equal(back_onto_grid(decrypted, grid, 1), sum(shares))  # ...not this
    with pytest.raises(ProtectionError, match="decryption error"):
        back_onto_grid(sum(shares) + 0.3 * grid, grid, 1)


def test_ckks_grid_is_far_coarser_than_ckks_error_and_charged(
    tmp_path: Path, model_cache: Path
) -> None:
    fed = make_fed(
        tmp_path,
        model_cache,
        privacy=dp("distributed", 1.0),
        protection={"default": "ckks", "ckks": {"workers": 1}},
    )
    grid = ckks_grid(fed.cfg)
    assert grid >= 2.0**-21 and math.log2(grid) == int(math.log2(grid))
    from cloudfed.privacy.party_level import charged_multiplier

    values = fed.plan.protection["values"]
    charged = charged_multiplier(fed.cfg, 3, values)
    assert charged == pytest.approx(CLIP / (CLIP + math.sqrt(values["ckks"]) * grid), rel=1e-12)


# --- 2. distributed shares against colluding co-contributors -----------------------------------


@pytest.mark.parametrize("m", [2, 3, 5, 10])
def test_noise_excluding_any_colluders_carries_the_charged_std(m: int) -> None:
    z = 1.3
    for c in range(1, m):
        cal = Calibration(
            "distributed", noise_multiplier=z, clip=CLIP, min_contributors=m, colluding=c
        )
        for s in range(m, m + 8):
            left = cal.noise_std_excluding(s, c)
            assert left**2 >= (z * CLIP) ** 2 * (1 - 1e-12), (m, c, s)
            assert cal.effective_multiplier(s) >= z * (1 - 1e-12)
    # The old sizing (std z*C/sqrt(m) per party) fails the same check as soon as s == m.
    old = z * CLIP / math.sqrt(m)
    assert (m - 1) * old**2 < (z * CLIP) ** 2


def test_colluding_must_leave_an_honest_share() -> None:
    raw = federation_dict(
        Path("/tmp/x"), Path("/tmp/m"), NAMES, privacy=dp("distributed", colluding=2)
    )
    with pytest.raises(ConfigError, match="privacy.colluding=2 must be below min_contributors=2"):
        parse_federation(raw)
    ok = parse_federation({**raw, "privacy": dp("distributed", colluding=2, min_contributors=3)})
    assert ok.privacy.colluding == 2


# --- 3. no side channels -----------------------------------------------------------------------


def test_a_data_dependent_header_field_is_refused_where_envelopes_are_made(
    tmp_path: Path,
) -> None:
    keys = load_or_create_keys("party", "alpha-aws", tmp_path / "k")
    coord = load_or_create_keys("coordinator", "coordinator", tmp_path / "c").public_bundle()
    run = "ab" * 16
    for meta in ({"clipped": 3}, {"dp_clipped": True}, {"dp_party_std": 0.1}, {"loss": 1.0}):
        ctx = SealContext(
            federation_id="f",
            round=1,
            party="alpha-aws",
            kind="update",
            metadata={"run_id": run, **meta},
        )
        with pytest.raises(ValueError, match="not routing or binding"):
            seal(b"x", context=ctx, sender=keys, recipient=coord)
    bad_value = SealContext(
        federation_id="f",
        round=1,
        party="alpha-aws",
        kind="secagg-share",
        metadata={"holder": 0.31},
    )
    with pytest.raises(ValueError, match="routing value"):
        seal(b"x", context=bad_value, sender=keys, recipient=coord)
    unknown = SealContext(federation_id="f", round=1, party="alpha-aws", kind="gossip")
    with pytest.raises(ValueError, match="no header allow-list"):
        sign_public(b"x", context=unknown, sender=keys)


def test_every_clear_header_on_the_exchange_is_routing_only(
    tmp_path: Path, model_cache: Path
) -> None:
    """Hybrid secagg + CKKS, distributed DP, a dropout: what a reader of the bucket sees."""
    pytest.importorskip("tenseal")
    fed = make_fed(
        tmp_path,
        model_cache,
        privacy=dp("distributed", 1.0),
        protection={"rules": [{"pattern": "*lora_A*", "mode": "ckks"}], "ckks": {"workers": 1}},
    )
    reserve(fed, 1)
    fed.round(1, updates_of(fed, norm=3 * CLIP), drop={C: "unmask"})  # clipped, and a dropout
    headers = headers_on_exchange(tmp_path / "exchange")
    kinds = {h["context"]["kind"] for _, h in headers}
    assert {"update", "secagg-share", "secagg-roster", "ckks-sum", "privacy-ledger"} <= kinds
    for path, header in headers:
        allowed = ALLOWED[header["context"]["kind"]]
        assert set(header["metadata"]) <= allowed, (path, header["metadata"])
    blob = b"".join(p.read_bytes() for p, _ in headers)
    for leak in (b"clipped", b"dp_party_std", b"dp_clip", b"examples", b"secagg_words"):
        assert leak not in blob


def _parquet(path: Path, rows: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "claim", "loan", "ward", "policy", "rate", "dose"]
    pd.DataFrame(
        {
            "instruction": [" ".join(rng.choice(words, 5)) for _ in range(rows)],
            "response": [" ".join(rng.choice(words, 7)) for _ in range(rows)],
        }
    ).to_parquet(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dataset(fed: Federation, name: str, rows: int = 12) -> DatasetRef:
    """A harmonised split in the party's storage, released as the harmonise step would."""
    storage = Path(fed.cfg.party(name).storage)
    storage.mkdir(parents=True, exist_ok=True)
    train = storage / "train.parquet"
    held = storage / "eval.parquet"
    ref = DatasetRef(
        party=name,
        train_uri=str(train),
        eval_uri=str(held),
        train_sha256=_parquet(train, rows, 1),
        eval_sha256=_parquet(held, rows // 2, 2 + (*NAMES, D).index(name)),
        rows_read=rows + rows // 2,
        rows_accepted=rows + rows // 2,
        rows_quarantined=0,
        rows_train=rows,
        rows_eval=rows // 2,
        quarantine_uri=str(storage / "q.parquet"),
        quarantine_reasons={"pii": 1},
        contract_sha256="0" * 64,
        validation=ValidationSummary(suite="s", success=True, evaluated=1, successful=1),
    )
    return party_mod.release_dataset(fed.cfg, fed.cfg.party(name), ref)


def test_under_dp_a_party_releases_no_count_no_metric_and_no_plain_hash(
    tmp_path: Path, model_cache: Path
) -> None:
    fed = make_fed(tmp_path, model_cache, privacy={"dp_sgd": DP_SGD})
    ref = dataset(fed, A)
    plain = hashlib.sha256(Path(ref.train_uri).read_bytes()).hexdigest()
    assert ref.redacted and ref.train_sha256 != plain  # keyed digest: no membership test
    assert (ref.rows_read, ref.rows_train, ref.quarantine_reasons, ref.profile) == (0, 0, {}, None)
    local = party_mod.train_round(fed.cfg, fed.cfg.party(A), 1, ref, fed.current, fed.plan)
    assert set(local.train) == {"dp_sgd_epsilon", "dp_sgd_delta"}
    assert "examples" not in local.model_dump()
    assert local.sha256 != hashlib.sha256(Path(local.uri).read_bytes()).hexdigest()
    # The party's own record keeps everything, in its own storage.
    keys = party_mod.party_keys(fed.cfg.party(A), fed.exchange)
    record, _ = party_mod.load_local_update(fed.cfg.party(A), local, keys)
    assert record.examples == 12 and "loss_mean" in record.train
    # Without DP the same party releases its metrics (the table a non-private run shows).
    open_fed = make_fed(tmp_path / "open", model_cache)
    open_ref = dataset(open_fed, A)
    assert not open_ref.redacted and open_ref.rows_train == 12
    open_local = party_mod.train_round(
        open_fed.cfg, open_fed.cfg.party(A), 1, open_ref, open_fed.current, open_fed.plan
    )
    assert "loss_mean" in open_local.train


@pytest.mark.parametrize("private", [False, True])
def test_a_co_contributor_reads_its_peers_weight_only_without_dp(
    tmp_path: Path, model_cache: Path, private: bool
) -> None:
    extra = {"privacy": {"dp_sgd": {n: DP_SGD[n] for n in (A, B)}}} if private else {}
    fed = make_fed(tmp_path, model_cache, names=(A, B), **extra)
    examples = {A: 10, B: 700}
    _, report, _ = fed.round(1, updates_of(fed, examples))
    own = 1.0 if private else min(examples[A], 1000) / 1000
    learned = peer_weight(report.weight_sum, own)
    if private:
        assert report.weight_sum == pytest.approx(2.0, abs=1e-6)  # uniform: nothing to learn
        assert learned == pytest.approx(1.0, abs=1e-6)
    else:
        assert learned * 1000 == pytest.approx(examples[B], abs=0.01)  # B's count, exactly


def _evaluate(fed: Federation, data: dict[str, DatasetRef], evaluators: list[str], who=None):
    return [
        party_mod.evaluate_round(
            fed.cfg, fed.cfg.party(p), data[p], fed.current, fed.plan, evaluators
        )
        for p in (who or evaluators)
    ]


def test_metrics_leave_only_as_a_sum_that_cannot_be_differenced(
    tmp_path: Path, model_cache: Path
) -> None:
    four = (*NAMES, D)
    fed = make_fed(tmp_path, model_cache, names=four, privacy={"dp_sgd": {**DP_SGD, D: DP_SGD[A]}})
    data = {p: dataset(fed, p) for p in four}
    releases = _evaluate(fed, data, list(NAMES))
    assert all(r.metrics is None and r.sealed_key for r in releases)
    ev = round_eval(fed.cfg, fed.plan, fed.current, releases)
    own = [
        json.loads(
            (Path(fed.cfg.party(p).storage) / "evals" / fed.plan.run_id / "r0000.json").read_text()
        )
        for p in NAMES
    ]
    tokens = sum(e["tokens"] for e in own)
    assert ev.released == "secure-sum" and ev.per_party == ()
    assert ev.loss == pytest.approx(sum(e["loss"] * e["tokens"] for e in own) / tokens, rel=1e-6)
    assert ev.tokens == pytest.approx(tokens, abs=1e-4)
    # One party's sealed share, opened by the coordinator, is masked: not its own loss.
    from cloudfed.protection import open_sealed_with_metadata

    r = releases[0]
    opened = open_sealed_with_metadata(
        fed.exchange.get_bytes(r.sealed_key),
        context=SealContext(
            federation_id=fed.cfg.federation_id,
            round=0,
            party=r.party,
            kind="metrics",
        ),
        recipient=coordinator_keys(fed.cfg, fed.exchange),
        sender=party_mod.party_keys(fed.cfg.party(r.party), fed.exchange).public_bundle(),
    )
    alone = np.frombuffer(opened.payload, dtype="<u8")[:2].view(np.int64) / 2**24
    assert abs(alone[1] - own[0]["tokens"]) > 1e3  # token count hidden by the masks
    # Without one evaluator the masks do not cancel: nothing is released.
    partial = round_eval(fed.cfg, fed.plan, fed.current, releases[:2])
    assert partial.released == "withheld" and math.isnan(partial.loss)
    # The differencing attacks: another list over the same eval split, for this model or for any
    # other (a later round, another run, a model that behaves the same): the party refuses.
    with pytest.raises(ConsentError, match="already released metrics on this eval split"):
        _evaluate(fed, data, [A, B, D], who=[A])
    from cloudfed.coordinator import publish_global

    later = publish_global(fed.exchange, 1, fed.const(0.0), fed.plan.run_id)  # a new model
    with pytest.raises(ConsentError, match="already released metrics on this eval split"):
        party_mod.evaluate_round(fed.cfg, fed.cfg.party(A), data[A], later, fed.plan, [A, B, D])
    # Too few to hide anyone: two parties (colluding 1 + 2 = 3 needed), or a padded list.
    with pytest.raises(ConsentError, match="at least 3 parties"):
        _evaluate(fed, data, [C, D], who=[D])
    with pytest.raises(ConsentError, match="repeated names"):
        _evaluate(fed, data, [D, D, C], who=[D])
    # The same list again (a retried step, or the next round) is fine.
    assert _evaluate(fed, data, list(NAMES), who=[A])[0].sealed_key


# --- 4. parties gate their own reveals and decryptions ------------------------------------------


def test_parties_refuse_to_reveal_a_sum_below_their_own_minimum(
    tmp_path: Path, model_cache: Path
) -> None:
    """The coordinator's roster asks for 2 of 3 (min_parties); the parties' minimum is 3."""
    fed = make_fed(tmp_path, model_cache, privacy=dp("distributed", 1.0, min_contributors=3))
    reserve(fed, 1)
    with pytest.raises(AggregationError):
        fed.round(1, updates_of(fed), drop={C: "upload"})
    for p in (A, B):  # no share was revealed: the coordinator cannot unmask the 2-party sum
        assert not fed.exchange.exists(secagg_reveal_key(fed.plan.run_id, 1, p))


def test_central_dp_with_ckks_is_refused() -> None:
    raw = federation_dict(
        Path("/tmp/x"), Path("/tmp/m"), NAMES, privacy=dp("central"), protection={"default": "ckks"}
    )
    with pytest.raises(ConfigError, match="central adds the noise after the coordinator"):
        parse_federation(raw)


def test_key_party_decrypts_once_and_never_too_few(tmp_path: Path, model_cache: Path) -> None:
    pytest.importorskip("tenseal")
    fed = make_fed(
        tmp_path,
        model_cache,
        privacy=dp("distributed", 1.0, min_contributors=3),
        protection={"default": "ckks", "ckks": {"workers": 1}},
    )
    cfg, plan = fed.cfg, fed.plan
    key_ref = party_mod.ckks_keygen(cfg, cfg.party(A), plan, 1)
    seg = messages.layout_for(cfg, fed.exchange, plan).segment("ckks")
    from cloudfed.protection import ckks

    public = messages.ckks_public_context(cfg, fed.exchange, plan, key_ref)
    blocks = ckks.encrypt_vector(public, np.zeros(seg.size + 1))
    keys = coordinator_keys(cfg, fed.exchange)

    def coordinator_asks(parties: list[str]) -> None:
        ctx = messages.stage_context(
            cfg, 1, "coordinator", "ckks-sum", run_id=plan.run_id, parties=parties
        )
        blob = seal(
            ckks.pack_blocks(blocks),
            context=ctx,
            sender=keys,
            recipient=party_mod.party_keys(cfg.party(A), fed.exchange).public_bundle(),
        )
        fed.exchange.put_bytes(ckks_sum_key(fed.plan.run_id, 1), blob)

    coordinator_asks([A, B])  # one ciphertext, declared as two: below the party's minimum 3
    with pytest.raises(ConsentError, match="fewer than 3 contributions"):
        party_mod.ckks_decrypt_sum(cfg, cfg.party(A), 1, plan, seg.size + 1)
    coordinator_asks([A, B, C])
    first = party_mod.ckks_decrypt_sum(cfg, cfg.party(A), 1, plan, seg.size + 1)
    assert not list(Path(cfg.party(A).storage).rglob("*.secret-context"))  # deleted once used
    again = party_mod.ckks_decrypt_sum(cfg, cfg.party(A), 1, plan, seg.size + 1)
    assert again.sha256 == first.sha256  # a retry gets the same answer...
    coordinator_asks([C, B, A])  # ...another sum gets none
    with pytest.raises(ProtectionError, match="already decrypted a CKKS sum"):
        party_mod.ckks_decrypt_sum(cfg, cfg.party(A), 1, plan, seg.size + 1)


def test_an_upload_happens_once_per_round(tmp_path: Path, model_cache: Path) -> None:
    """Two masked vectors under the same masks would difference to the noise and dither."""
    fed = make_fed(tmp_path, model_cache, privacy=dp("distributed", 1.0))
    reserve(fed, 1)
    _, _, sealed = fed.round(1, updates_of(fed))
    ref = sealed[0]
    blob = fed.exchange.get_bytes(ref.key)
    party, local = fed.cfg.party(ref.party), fed.last_local[ref.party]
    rosters = fed.last_upload_rosters
    # The same upload again (a retried step): the very same bytes, nothing new to difference.
    again = party_mod.upload(fed.cfg, party, local, fed.plan, rosters, [])
    assert fed.exchange.get_bytes(again.key) == blob
    # Asked again under another roster: refused, and the first upload stays as it was.
    other = rosters[0].model_copy(update={"sha256": "0" * 64})
    with pytest.raises(ProtectionError, match="already uploaded its update for round 1"):
        party_mod.upload(fed.cfg, party, local, fed.plan, [other], [])
    assert fed.exchange.get_bytes(ref.key) == blob


# --- 5. a launcher cannot weaken a party's protection --------------------------------------------


def _weaker(fed: Federation, **changes: Any):
    raw = copy.deepcopy(fed.cfg.model_dump(mode="json"))
    for path, value in changes.items():
        doc = raw
        *parents, leaf = path.split(".")
        for p in parents:
            doc = doc[p]
        doc[leaf] = value
    return parse_federation(raw)


@pytest.mark.parametrize(
    ("changes", "field", "policy_field"),
    [
        (
            {"privacy": {"dp_sgd": {A: DP_SGD[A]}}},  # party-level DP off
            "privacy.mode='off'",
            "privacy.mode='distributed'",
        ),
        ({"privacy.clip": 0.01}, "privacy.clip=0.01", "privacy.clip=0.05"),
        ({"privacy.noise_multiplier": 0.3}, "privacy noise multiplier=0.3", "min_noise_multiplier"),
        ({"privacy.delta": 0.001}, "privacy.delta=0.001", "privacy.max_delta"),
        ({"min_parties": 2}, "min_parties=2", "min_parties=3"),
        ({"privacy.min_contributors": 3}, None, None),  # stronger: accepted
        ({"protection.default": "ckks"}, "'ckks' is weaker", "min_protection='secagg'"),
        ({"privacy.dp_sgd": {}}, f"privacy.dp_sgd.{A}=None", "dp_sgd.required=True"),
        ({"federation_id": "other-fed"}, "federation_id='other-fed'", "federation_id='test-fed'"),
        # Every peer shrunk until one party's update is the whole aggregate (weights 1 vs 1e-12).
        ({"aggregation.weighting.min_weight": 1e-12}, "min_weight", "max_weight_ratio=1000"),
    ],
)
def test_a_weaker_run_config_is_refused_naming_the_field_and_policy(
    tmp_path: Path, model_cache: Path, changes: dict, field: str | None, policy_field: str | None
) -> None:
    fed = make_fed(
        tmp_path,
        model_cache,
        min_parties=3,
        privacy={**dp("distributed", 1.0), "dp_sgd": {A: DP_SGD[A]}},
    )
    weak = _weaker(fed, **changes)
    local = fed.local(A, 1, fed.const(0.0), 5)
    if field is None:
        party_mod.advertise(weak, weak.party(A), local, fed.plan)
        return
    with pytest.raises(ConsentError) as err:
        party_mod.advertise(weak, weak.party(A), local, fed.plan)
    msg = str(err.value)
    assert msg.startswith(f"{A} refuses this round") and field in msg and policy_field in msg
    assert str(policy_path(A)) in msg


def test_a_swapped_coordinator_key_or_redirected_storage_is_refused(
    tmp_path: Path, model_cache: Path
) -> None:
    fed = make_fed(tmp_path, model_cache, privacy=dp("distributed", 1.0))
    local = fed.local(A, 1, fed.const(0.0), 5)
    other = load_or_create_keys("coordinator", "coordinator", tmp_path / "evil")
    swapped = fed.plan.model_copy(
        update={"coordinator_fingerprint": other.public_bundle().fingerprint}
    )
    with pytest.raises(ConsentError, match=r"coordinator key of coordinator .*\(pins.coordinator="):
        party_mod.advertise(fed.cfg, fed.cfg.party(A), local, swapped)
    # Pointing the party's storage elsewhere (where the launcher could read its updates, and
    # where it would find no key): refused against the storage its policy records.
    raw = fed.cfg.model_dump(mode="json")
    raw["parties"][0]["storage"] = str(tmp_path / "elsewhere")
    moved = parse_federation(raw)
    with pytest.raises(ConsentError, match=rf"parties\[{A}\].storage=.* is not the party's own"):
        party_mod.advertise(moved, moved.party(A), local, fed.plan)
    assert not (tmp_path / "elsewhere").exists()


def test_no_policy_no_round(tmp_path: Path, model_cache: Path) -> None:
    fed = make_fed(tmp_path, model_cache)
    policy_path(A).unlink()
    with pytest.raises(ConsentError, match=rf"{A}: no party policy at .*{A}.yaml"):
        party_mod.advertise(fed.cfg, fed.cfg.party(A), fed.local(A, 1, fed.const(0.0), 5), fed.plan)
    # Where the policy lives comes from the party's environment, never the run config.
    assert str(policy_path(A)).startswith(str(tmp_path / "party-policies"))
    assert fed.cfg.party(A).storage not in str(policy_path(A))


def test_the_privacy_ledger_cannot_roll_back_or_fork(tmp_path: Path, model_cache: Path) -> None:
    fed = make_fed(tmp_path, model_cache, privacy=dp("distributed", 1.0))
    loaded = load_policy(A)
    head = loaded.state_dir / "ledger_head.json"
    coordinator = coordinator_keys(fed.cfg, fed.exchange)

    def seen() -> Any:
        return verified_for_party(
            fed.exchange,
            coordinator.public_bundle(),
            federation_id=fed.cfg.federation_id,
            head_file=head,
        )

    reserve(fed, 1)
    v1 = fed.exchange.get_bytes(LEDGER_KEY)
    assert seen().version == 1
    reserve(fed, 2)
    ledger = seen()
    assert ledger.version == 2 and len(ledger.chain) == 1
    fed.exchange.put_bytes(LEDGER_KEY, v1)  # the untrusted exchange serves the older copy
    with pytest.raises(ProtectionError, match="rolled back: version 1 is older than version 2"):
        seen()
    # A coordinator signing a different version 2 (say, without round 2): a fork.
    store = LedgerStore(
        fed.exchange,
        coordinator,
        federation_id=fed.cfg.federation_id,
        coordinator_storage=str(tmp_path / "forked-coordinator"),
    )
    fork = ledger.model_copy(deep=True)
    fork.entries = fork.entries[:1]
    fork.entries[0].parties = [A]
    blob = sign_public(
        fork.model_dump_json().encode(),
        context=store._context(2),
        sender=coordinator,
    )
    fed.exchange.put_bytes(LEDGER_KEY, blob)
    with pytest.raises(ProtectionError, match="forked"):
        seen()
    # And a party trains only for a round the ledger it accepts has reserved.
    fed.exchange.put_bytes(LEDGER_KEY, v1)
    head.unlink()
    with pytest.raises(ConsentError, match="holds no reservation"):
        party_training._check_party_level_budget(fed.cfg, loaded, fed.exchange, fed.plan, 2)


def test_a_party_trains_only_for_a_round_reserved_for_it(tmp_path: Path, model_cache: Path) -> None:
    """A launcher that also starts training for a party outside the round's reservation (a
    buffered round reserves its arrivals only) finds the party refusing: its cap check would not
    count a round the ledger charges to others."""
    fed = make_fed(tmp_path, model_cache, privacy=dp("distributed", 1.0))
    loaded = load_policy(A)
    reserve_round(
        fed.cfg, fed.exchange, coordinator_keys(fed.cfg, fed.exchange), fed.plan, 1, [B, C]
    )
    with pytest.raises(ConsentError, match=rf"no reservation of it for {A} \(only for"):
        party_training._check_party_level_budget(fed.cfg, loaded, fed.exchange, fed.plan, 1)
    party_training._check_party_level_budget(fed.cfg, load_policy(B), fed.exchange, fed.plan, 1)


# --- 6. hard stops -----------------------------------------------------------------------------


def test_dp_sgd_budgets_are_finite_and_the_stricter_cap_holds(
    tmp_path: Path, model_cache: Path
) -> None:
    assert DpSgdSettings(noise_multiplier=1.0).max_epsilon == DEFAULT_DP_SGD_MAX_EPSILON < math.inf
    fed = make_fed(tmp_path, model_cache, privacy={"dp_sgd": {A: {"noise_multiplier": 1.0}}})
    loaded = load_policy(A)
    assert dp_sgd_cap(fed.cfg, loaded) == DEFAULT_DP_SGD_MAX_EPSILON
    doc = yaml.safe_load(policy_path(A).read_text())
    doc["dp_sgd"]["max_epsilon"] = 0.05  # the party's own budget: tighter than the config's
    policy_path(A).write_text(yaml.safe_dump(doc))
    loaded = enforce(fed.cfg, A)
    assert dp_sgd_cap(fed.cfg, loaded) == 0.05
    data = dataset(fed, A)
    with pytest.raises(DataError, match=r"of 0.05 \(the stricter of privacy.dp_sgd.alpha-aws"):
        party_mod.train_round(fed.cfg, fed.cfg.party(A), 1, data, fed.current, fed.plan)
    assert not Path(fed.cfg.party(A).storage, "updates").exists()  # it did not train


def test_one_record_level_ledger_per_party_across_federations(tmp_path: Path) -> None:
    path = party_ledger.ledger_path(tmp_path / "state")
    event = GaussianEvent(1.0, 0.05, 30)
    for fed_id in ("fed-a", "fed-b"):
        _attempt(path, f"{fed_id}/run/r0001", event)
    ledger = party_ledger.load(path, party=A, delta=DELTA)
    assert [e.id for e in ledger.entries] == ["fed-a/run/r0001", "fed-b/run/r0001"]
    assert ledger.epsilon() == pytest.approx(epsilon([event, event], DELTA, "rdp"), rel=1e-9)


def _attempt(path: Path, base_id: str, event: GaussianEvent, kept: bool = False):
    return party_ledger.attempt(
        path,
        party=A,
        delta=DELTA,
        max_epsilon=100.0,
        base_id=base_id,
        run_id="run",
        round=1,
        event=event,
        kept=lambda entry: kept,
    )


def test_a_retried_dp_sgd_round_is_charged_unless_it_released_nothing_or_resends(
    tmp_path: Path,
) -> None:
    """Adversary: the launcher, who kills runs and continues them with other settings.

    A retry from the same global adapter reuses the earlier charge only when the earlier attempt
    released nothing (killed while training) or its update, already paid for, is handed back;
    a costlier retry (more steps) or one whose paid-for update is gone is charged anew.
    """
    path = party_ledger.ledger_path(tmp_path / "state")
    cheap, costly = GaussianEvent(1.0, 0.05, 1), GaussianEvent(1.0, 0.05, 20)
    ledger, first, hand_back = _attempt(path, "f/run/r0001", cheap)
    assert (first.id, hand_back) == ("f/run/r0001", False)
    # Killed during training: reserved, nothing released; the retry trains under that charge.
    _, again, hand_back = _attempt(path, "f/run/r0001", cheap)
    assert (again.id, hand_back) == (first.id, False)
    # The launcher retries with 20 steps: not the event that was charged, a new entry.
    _, dearer, _ = _attempt(path, "f/run/r0001", costly)
    assert dearer.id == "f/run/r0001/a2" and dearer.steps == 20
    party_ledger.mark_spent(path, party_ledger.load(path, party=A, delta=DELTA), dearer.id)
    # Spent, its update still kept: handed back, nothing charged.
    _, same, hand_back = _attempt(path, "f/run/r0001", costly, kept=True)
    assert (same.id, hand_back) == (dearer.id, True)
    # Spent, its update gone (overwritten, deleted): a retrain is a new release, charged.
    _, fresh, hand_back = _attempt(path, "f/run/r0001", costly, kept=False)
    assert (fresh.id, hand_back) == ("f/run/r0001/a3", False)
    ledger = party_ledger.load(path, party=A, delta=DELTA)
    assert ledger.epsilon() == pytest.approx(
        epsilon([cheap, costly, costly], DELTA, "rdp"), rel=1e-9
    )


def test_two_dp_sgd_trainings_of_one_party_cannot_run_at_once(tmp_path: Path) -> None:
    """Adversary: a launcher running two runs at once to share one reservation."""
    with party_ledger.training_lock(tmp_path, A):
        with pytest.raises(ConsentError, match="another DP-SGD training of this party"):
            with party_ledger.training_lock(tmp_path, A):
                pass
    with party_ledger.training_lock(tmp_path, A):  # released when the first ended
        pass


def test_the_dp_sgd_ledger_lives_with_the_party_not_in_configured_storage(
    tmp_path: Path, model_cache: Path
) -> None:
    fed = make_fed(tmp_path, model_cache, privacy={"dp_sgd": DP_SGD})
    party_mod.train_round(fed.cfg, fed.cfg.party(A), 1, dataset(fed, A), fed.current, fed.plan)
    assert party_ledger.ledger_path(load_policy(A).state_dir).exists()
    assert not list(Path(fed.cfg.party(A).storage).rglob("dp_sgd_ledger.json"))


def test_a_coarse_quantiser_cannot_push_the_charged_noise_below_the_floor(
    tmp_path: Path, model_cache: Path
) -> None:
    """8-bit secure aggregation: the nominal z is the policy's, the charged one is far lower."""
    fed = make_fed(
        tmp_path, model_cache, privacy=dp("distributed", 1.0), protection={"secagg": {"bits": 8}}
    )
    reserve(fed, 1)
    loaded = load_policy(A)
    with pytest.raises(ConsentError, match="below privacy.min_noise_multiplier=1"):
        party_training._check_party_level_budget(fed.cfg, loaded, fed.exchange, fed.plan, 1)


def test_one_run_cannot_spend_more_than_the_policy_allows_per_run(
    tmp_path: Path, model_cache: Path
) -> None:
    dp_sgd = {A: {"noise_multiplier": 1.0, "sample_rate": 0.5, "max_epsilon": 50.0}}
    fed = make_fed(tmp_path, model_cache, privacy={"dp_sgd": dp_sgd})  # 3 rounds accepted
    greedy = _weaker(fed, rounds=9)  # same noise, three times the steps
    with pytest.raises(
        ConsentError, match=r"would spend epsilon=.* above dp_sgd.max_epsilon_per_run"
    ):
        party_mod.train_round(greedy, greedy.party(A), 1, dataset(fed, A), fed.current, fed.plan)
    assert not Path(fed.cfg.party(A).storage, "updates").exists()


@pytest.mark.parametrize("public_rate", [True, False])
def test_a_public_sample_rate_keeps_the_record_count_out_of_epsilon(
    tmp_path: Path, model_cache: Path, public_rate: bool
) -> None:
    rate = {"sample_rate": 0.25} if public_rate else {}
    dp_sgd = {p: {"noise_multiplier": 1.0, "max_epsilon": 50.0, **rate} for p in (A, B)}
    fed = make_fed(tmp_path, model_cache, privacy={"dp_sgd": dp_sgd})
    released = {
        p: party_mod.train_round(
            fed.cfg, fed.cfg.party(p), 1, dataset(fed, p, rows=rows), fed.current, fed.plan
        ).train["dp_sgd_epsilon"]
        for p, rows in ((A, 12), (B, 20))
    }
    if public_rate:  # 12 and 20 records, one epsilon: it follows from public values only
        assert released[A] == released[B]
    else:  # q = batch_size / records: the epsilon tells the counts apart
        assert released[A] != released[B]


@pytest.mark.parametrize("target", [1.0, 4.0, 7.3])
def test_a_provisioned_policy_accepts_exactly_its_own_config(
    tmp_path: Path, model_cache: Path, target: float
) -> None:
    """Floors are written rounded down and caps rounded up, so a derived z never trips them."""
    privacy = {
        "mode": "distributed",
        "clip": CLIP,
        "target_epsilon": target,
        "max_epsilon": 10.0,
        "dp_sgd": {A: {"target_epsilon": target, "sample_rate": 0.3, "max_epsilon": 10.0}},
    }
    fed = make_fed(tmp_path, model_cache, privacy=privacy)
    for p in NAMES:
        enforce(fed.cfg, p)
    floor = load_policy(A).policy
    assert floor.privacy.min_noise_multiplier is not None
    assert floor.dp_sgd is not None and floor.dp_sgd.max_epsilon_per_run >= target


# --- 7. the default demo, and preflight's warning ------------------------------------------------


def test_preflight_warns_with_the_estimate_when_party_level_dp_drowns_the_signal() -> None:
    from cloudfed.preflight import privacy_warnings

    raw = federation_dict(Path("/tmp/x"), Path("/tmp/m"), NAMES, privacy=dp("distributed", 1.1))
    (warning,) = privacy_warnings(parse_federation(raw), adapter_values=55_296)
    assert "n/(z*sqrt(d)) = 0.0116" in warning and "3 parties" in warning
    assert "use record-level DP-SGD" in warning
    dp_sgd_only = parse_federation({**raw, "privacy": {"dp_sgd": {A: DP_SGD[A]}}})
    assert privacy_warnings(dp_sgd_only, adapter_values=55_296) == []
    # Thousands of parties leave signal: no warning.
    many = [f"p{i:04d}" for i in range(3000)]
    big = federation_dict(Path("/tmp/x"), Path("/tmp/m"), many, privacy=dp("distributed", 1.1))
    assert privacy_warnings(parse_federation(big), adapter_values=55_296) == []


def test_the_default_demo_is_secure_aggregation_plus_dp_sgd_in_every_party() -> None:
    from cloudfed.federation import load_run_config

    cfg = load_run_config(Path(__file__).resolve().parents[1] / "configs" / "local.yaml")
    assert cfg.privacy.mode == "off" and cfg.protection.default == "secagg"
    assert set(cfg.privacy.dp_sgd) == {p.name for p in cfg.parties}
    for dp_sgd in cfg.privacy.dp_sgd.values():  # finite, and epsilon independent of the count
        assert dp_sgd.max_epsilon < math.inf and dp_sgd.sample_rate is not None


def test_a_round_of_only_empty_poisson_batches_keeps_its_record_loadable(tmp_path: Path) -> None:
    """DP-SGD may draw only empty batches: its loss is NaN, and the record must still load."""
    record = party_mod.LocalUpdateRecord(
        party=A,
        round=1,
        run_id="ab" * 16,
        uri=str(tmp_path / "u.safetensors"),
        sha256="0" * 64,
        base_sha256="1" * 64,
        examples=12,
        train={"loss_mean": float("nan"), "dp_sgd_epsilon": 0.5},
    )
    again = party_mod.LocalUpdateRecord.model_validate_json(record.model_dump_json())
    assert math.isnan(float(again.train["loss_mean"])) and again.train["dp_sgd_epsilon"] == 0.5


def test_a_retried_round_is_unmasked_for_one_survivor_set_only(
    tmp_path: Path, model_cache: Path
) -> None:
    """Adversary: the coordinator, retrying a round from the same global adapter (a new run
    after a kill) without one party, to difference the two sums to that party's update."""
    raw = federation_dict(tmp_path, model_cache, NAMES)
    first = Federation(raw)
    updates = updates_of(first)
    first.round(1, updates)  # every party unmasked round 1 for {A, B, C}
    second = Federation(raw)  # the next run: no round published, same round-0 adapter
    assert second.current.sha256 == first.plan.initial_adapter.sha256
    with pytest.raises(AggregationError, match="share.* came back"):  # A and B refused
        second.round(1, {p: updates[p] for p in (A, B)})
    # The record is in the party's own state (its policy's state_dir), not parties[].storage.
    assert not list(Path(second.cfg.party(A).storage).rglob("revealed/test-fed/*.json"))
    revealed = list(Path(load_policy(A).state_dir).rglob("revealed/test-fed/*.json"))
    assert [json.loads(p.read_text()) for p in revealed] == [sorted(NAMES)]
    assert not second.exchange.list(f"runs/{second.plan.run_id}/r0001/global")
    third = Federation(raw)  # the same survivor set again: the same sum, so it may be opened
    third.round(1, updates)
    assert third.exchange.list(f"runs/{third.plan.run_id}/r0001/global")
