"""Secure aggregation (Bonawitz et al. 2017 / SecAgg+) as pure functions, simulated in memory.

Every round here runs all four stages (advertise, share keys, masked input, unmask) with parties
dropping at chosen points, and checks the decoded sum against the plaintext sum of exactly the
parties whose masked inputs reached the coordinator. Secrets and test vectors come from seeded
generators so every run sees the same bytes; the code under test never draws from them itself
except where it takes an explicit `rng`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from cloudfed.errors import AggregationError, ProtectionError
from cloudfed.protection.hazmat import masks, shamir
from cloudfed.protection.hazmat.quantize import (
    WORD,
    QuantSpec,
    dequantize_sum,
    headroom_bits,
    quantize,
)
from cloudfed.protection.secagg import graph as graphs
from cloudfed.protection.secagg.protocol import (
    Advertisement,
    PartySecrets,
    Reveal,
    RoundSetup,
    Share,
    check_share,
    check_survivors,
    commit,
    make_shares,
    masked_input,
    min_threshold,
    reveal,
    setup_for,
    unmask,
)

CLIP = 0.5
D = 1000
FED, RUN = "fed-1", "run-1"


# --- helpers ----------------------------------------------------------------------------------


def names(n: int) -> list[str]:
    return [f"p{i:02d}" for i in range(n)]


def make_setup(
    n: int,
    threshold: int | None = None,
    neighbours: int | None = None,
    *,
    complete_up_to: int = 10,
    round: int = 1,
) -> RoundSetup:
    return setup_for(
        FED,
        RUN,
        round,
        names(n),
        neighbours=neighbours,
        threshold=threshold,
        complete_up_to=complete_up_to,
        min_survivors=2,
    )


def seeded_secrets(rng: np.random.Generator) -> PartySecrets:
    """Deterministic per-round secrets (test vectors only; production uses os.urandom)."""
    return PartySecrets(X25519PrivateKey.from_private_bytes(rng.bytes(32)), rng.bytes(32))


@dataclass
class Round:
    """Everything one simulated round produced, stage by stage."""

    setup: RoundSetup
    spec: QuantSpec
    secrets: dict[str, PartySecrets]
    adverts: dict[str, Advertisement]
    inbox: dict[str, dict[str, Share]]  # holder -> owner -> share
    shared: list[str]
    values: dict[str, np.ndarray]
    words: dict[str, np.ndarray]
    inputs: dict[str, np.ndarray]  # what the coordinator received (U3)
    revealers: list[str]
    responses: dict[str, dict[str, Reveal]]

    @property
    def uploaded(self) -> list[str]:
        return sorted(self.inputs)


def advertise_and_share(
    setup: RoundSetup,
    *,
    d: int = D,
    seed: int = 0,
    drop_before_sharing: Collection[str] = (),
    drop_after_sharing: Collection[str] = (),
    spec: QuantSpec | None = None,
) -> Round:
    """Stages 1-3: adverts, sealed shares into each holder's inbox, masked inputs of U3."""
    rng = np.random.default_rng(seed)
    parties = list(setup.parties)
    spec = spec or QuantSpec.for_parties(CLIP, len(parties))
    secrets = {p: seeded_secrets(rng) for p in parties}
    adverts = {p: s.advertisement() for p, s in secrets.items()}
    shared = sorted(set(parties) - set(drop_before_sharing))
    inbox: dict[str, dict[str, Share]] = {p: {} for p in parties}
    for owner in shared:
        out = make_shares(setup, owner, secrets[owner])
        assert sorted(out) == list(setup.holders(owner))
        for holder, share in out.items():
            check_share(setup, share, owner=owner, holder=holder)
            inbox[holder][owner] = share
    uploaded = sorted(set(shared) - set(drop_after_sharing))
    values, words, inputs = {}, {}, {}
    for p in uploaded:
        values[p] = rng.uniform(-CLIP, CLIP, d)
        words[p], clipped = quantize(values[p], spec, rng)
        assert clipped == 0
        inputs[p] = masked_input(setup, p, secrets[p], words[p], adverts, shared)
    return Round(setup, spec, secrets, adverts, inbox, shared, values, words, inputs, [], {})


def reveal_from(r: Round, revealers: Iterable[str]) -> Round:
    """Stage 4 answers of the given survivors (each must have uploaded)."""
    r.revealers = sorted(revealers)
    r.responses = {h: reveal(r.setup, h, r.inbox[h], r.shared, r.uploaded) for h in r.revealers}
    return r


def finish(r: Round) -> tuple[np.ndarray, np.ndarray]:
    """Coordinator: the unmasked word sum and the decoded real sum."""
    total = unmask(r.setup, r.adverts, r.shared, r.inputs, r.responses)
    return total, dequantize_sum(total, r.spec, len(r.inputs))


def simulate_round(
    setup: RoundSetup,
    *,
    drop_before_sharing: Collection[str] = (),
    drop_after_sharing: Collection[str] = (),
    drop_after_upload: Collection[str] = (),
    d: int = D,
    seed: int = 0,
) -> tuple[Round, np.ndarray]:
    """A full round; returns the round and the decoded sum after checking it."""
    r = advertise_and_share(
        setup,
        d=d,
        seed=seed,
        drop_before_sharing=drop_before_sharing,
        drop_after_sharing=drop_after_sharing,
    )
    reveal_from(r, sorted(set(r.uploaded) - set(drop_after_upload)))
    total, decoded = finish(r)
    assert_round_correct(r, total, decoded)
    return r, decoded


def assert_round_correct(r: Round, total: np.ndarray, decoded: np.ndarray) -> None:
    uploaded = r.uploaded
    assert total.dtype == WORD
    # Integer-exact: the masks cancel to the plain word sum, which cannot have wrapped.
    exact = np.sum([r.words[p].astype(np.uint64) for p in uploaded], axis=0)
    assert int(exact.max()) < 2**32
    np.testing.assert_array_equal(total, exact.astype(WORD))
    # Real-valued: within the documented bound of the plaintext sum of exactly U3.
    truth = np.sum([r.values[p] for p in uploaded], axis=0)
    bound = r.spec.sum_error_bound(len(uploaded))
    assert bound < 1e-6
    assert np.max(np.abs(decoded - truth)) <= bound


def pick(parties: Iterable[str], count: int, seed: int) -> list[str]:
    pool = sorted(parties)
    return sorted(np.random.default_rng(seed).choice(pool, size=count, replace=False).tolist())


# --- full rounds under every tolerated dropout count -----------------------------------------

EXPLICIT_THRESHOLD = {2: 2, 3: 3, 10: 6}


def _dropout_cases() -> list[tuple[int, int | None, int]]:
    cases = []
    for n in (2, 3, 10):
        for thr in (None, EXPLICIT_THRESHOLD[n]):
            t = make_setup(n, thr).threshold
            cases += [(n, thr, drops) for drops in range(0, n - t + 1)]
    return cases


DROPOUT_CASES = _dropout_cases()


def test_dropout_cases_cover_what_the_brief_needs() -> None:
    # Default thresholds: n=2 -> 2, n=3 -> 2, n=10 -> 7 (k = n - 1, t = max(majority, 2/3)).
    assert [make_setup(n).threshold for n in (2, 3, 10)] == [2, 2, 7]
    assert (10, None, 3) in DROPOUT_CASES and (10, None, 4) not in DROPOUT_CASES
    assert (10, 6, 4) in DROPOUT_CASES and (3, None, 1) in DROPOUT_CASES


@pytest.mark.parametrize(("n", "threshold", "drops"), DROPOUT_CASES)
def test_dropouts_after_upload_do_not_change_the_sum(
    n: int, threshold: int | None, drops: int
) -> None:
    """Parties that uploaded but never reveal: their inputs are in the sum, t others unmask it."""
    setup = make_setup(n, threshold)
    gone = pick(setup.parties, drops, seed=n * 100 + drops)
    r, decoded = simulate_round(setup, drop_after_upload=gone, seed=drops)
    assert r.uploaded == list(setup.parties)
    assert len(r.revealers) == n - drops >= setup.threshold
    assert decoded.shape == (D,)


@pytest.mark.parametrize(("n", "threshold", "drops"), DROPOUT_CASES)
def test_dropouts_after_sharing_are_left_out_of_the_sum(
    n: int, threshold: int | None, drops: int
) -> None:
    """Parties that shared keys but never uploaded: their pairwise masks are rebuilt and removed."""
    setup = make_setup(n, threshold)
    gone = pick(setup.parties, drops, seed=n * 100 + drops + 1)
    r, _ = simulate_round(setup, drop_after_sharing=gone, seed=drops + 50)
    assert r.uploaded == sorted(set(setup.parties) - set(gone))
    assert len(r.uploaded) >= setup.threshold


def test_mixed_dropouts_at_every_stage() -> None:
    """One never shares, two stop after sharing, one uploads but does not reveal (n=10, t=6)."""
    setup = make_setup(10, 6)
    r, _ = simulate_round(
        setup,
        drop_before_sharing=["p03"],
        drop_after_sharing=["p01", "p07"],
        drop_after_upload=["p09"],
    )
    assert r.uploaded == ["p00", "p02", "p04", "p05", "p06", "p08", "p09"]
    assert len(r.revealers) == 6


def test_decoded_sum_matches_plaintext_not_just_itself() -> None:
    """A guard on the checker: swapping one party's input for another's breaks the equality."""
    setup = make_setup(3)
    r = reveal_from(advertise_and_share(setup, seed=7), setup.parties)
    total, decoded = finish(r)
    assert_round_correct(r, total, decoded)
    r.values["p00"] = r.values["p01"]
    with pytest.raises(AssertionError):
        assert_round_correct(r, total, decoded)


# --- below the threshold ---------------------------------------------------------------------


def test_too_few_uploads_abort_in_reveal_and_unmask() -> None:
    setup = make_setup(10)  # t = 7
    assert setup.threshold == 7
    r = advertise_and_share(setup, drop_after_sharing=["p00", "p03", "p05", "p08"])
    assert len(r.uploaded) == 6
    for h in r.uploaded:
        with pytest.raises(AggregationError, match=r"threshold t=7") as exc:
            reveal(setup, h, r.inbox[h], r.shared, r.uploaded)
        assert "no model is published" in str(exc.value)
    with pytest.raises(AggregationError, match=r"threshold t=7"):
        unmask(setup, r.adverts, r.shared, r.inputs, {})


def test_single_upload_is_never_unmasked() -> None:
    setup = make_setup(3)  # t = 2
    r = advertise_and_share(setup, drop_after_sharing=["p01", "p02"])
    with pytest.raises(AggregationError, match=r"threshold t=2"):
        reveal(setup, "p00", r.inbox["p00"], r.shared, r.uploaded)


@pytest.mark.parametrize(("after_sharing", "after_upload"), [(0, 4), (2, 2), (3, 1)])
def test_too_few_reveals_abort_in_unmask(after_sharing: int, after_upload: int) -> None:
    setup = make_setup(10)  # t = 7; 10 - after_sharing >= 7 upload, only 6 reveal
    parties = list(setup.parties)
    gone_sharing = parties[:after_sharing]
    r = advertise_and_share(setup, drop_after_sharing=gone_sharing, seed=after_sharing)
    revealers = r.uploaded[after_upload:]
    assert len(r.uploaded) >= 7 and len(revealers) == 6
    reveal_from(r, revealers)
    with pytest.raises(AggregationError, match=r"7 are needed \(threshold t\)"):
        unmask(setup, r.adverts, r.shared, r.inputs, r.responses)


def test_missing_reveal_for_one_owner_aborts() -> None:
    """Enough revealers overall, but one owner's shares were withheld by too many of them."""
    setup = make_setup(10)
    r = reveal_from(advertise_and_share(setup), setup.parties)
    for h in list(r.responses)[:4]:  # 6 of 10 shares of p05's seed remain, 7 needed
        r.responses[h] = {o: x for o, x in r.responses[h].items() if o != "p05"}
    with pytest.raises(AggregationError, match=r"p05's seed.*threshold t"):
        unmask(setup, r.adverts, r.shared, r.inputs, r.responses)


# --- SecAgg+ graph ----------------------------------------------------------------------------


def test_secagg_plus_graph_for_fifty_parties() -> None:
    n = 50
    k = graphs.default_neighbours(n, 10)
    assert k <= 2 * math.ceil(math.log2(n)) + 1
    assert k < n - 1
    assert k % 2 == 0
    setup = make_setup(n)
    assert setup.neighbours == k
    g = setup.graph
    assert sorted(g) == list(setup.parties)
    for p, nbrs in g.items():
        assert len(nbrs) == len(set(nbrs)) == k
        assert p not in nbrs
        for q in nbrs:
            assert p in g[q], f"{p} -> {q} but not back"
    assert graphs.components(g, setup.parties) == [list(setup.parties)]
    # Same binding, same graph; another round relabels it.
    assert make_setup(n).graph == g
    assert make_setup(n, round=2).graph != g


def test_secagg_plus_round_of_fifty_with_five_dropouts() -> None:
    setup = make_setup(50)
    gone = pick(setup.parties, 5, seed=11)
    survivors = set(setup.parties) - set(gone)
    # Precondition of this scenario: every neighbourhood keeps >= t survivors to reveal.
    assert min(len(survivors & set(setup.holders(p))) for p in setup.parties) >= setup.threshold
    r, _ = simulate_round(setup, drop_after_sharing=gone, d=2000, seed=3)
    assert len(r.uploaded) == 45
    # Pairwise masks only with neighbours: each party reveals for its own neighbourhood only.
    for h, resp in r.responses.items():
        assert set(resp) == set(setup.holders(h)) & set(r.shared)
        assert len(resp) == setup.neighbours + 1


def test_check_neighbours_bounds() -> None:
    n = 50  # low bound ceil(log2 50) = 6
    graphs.check_neighbours(6, n)
    graphs.check_neighbours(48, n)
    graphs.check_neighbours(49, n)  # odd is fine for the complete graph
    for bad in (0, 4, 5, 50, 51):
        with pytest.raises(ValueError, match="outside"):
            graphs.check_neighbours(bad, n)
    for odd in (7, 13, 47):
        with pytest.raises(ValueError, match="must be even"):
            graphs.check_neighbours(odd, n)
    with pytest.raises(ValueError, match="at least 2 parties"):
        graphs.check_neighbours(0, 1)
    with pytest.raises(ValueError, match="must be even"):
        make_setup(50, neighbours=13)


def test_round_setup_threshold_bounds() -> None:
    parties = tuple(names(10))
    RoundSetup(FED, RUN, 1, parties, 9, 6)
    RoundSetup(FED, RUN, 1, parties, 9, 10)
    with pytest.raises(ValueError, match="strict majority") as low:
        RoundSetup(FED, RUN, 1, parties, 9, 5)
    assert "outside [6, 10]" in str(low.value)
    with pytest.raises(ValueError, match="at most the number of holders") as high:
        RoundSetup(FED, RUN, 1, parties, 9, 11)
    assert "outside [6, 10]" in str(high.value)
    with pytest.raises(ValueError, match="sorted and unique"):
        RoundSetup(FED, RUN, 1, tuple(reversed(parties)), 9, 6)
    with pytest.raises(ValueError, match="min_survivors"):
        RoundSetup(FED, RUN, 1, parties, 9, 6, min_survivors=1)


@pytest.mark.parametrize("holders", range(2, 40))
def test_majority_threshold_forbids_two_disjoint_quorums(holders: int) -> None:
    """A coordinator asking two groups for seed and key of one owner cannot reach t in both."""
    t = min_threshold(holders)
    assert 2 * t > holders
    assert t <= holders


def test_isolated_survivor_aborts_reveal() -> None:
    setup = make_setup(20, neighbours=6)  # a ring-like k-graph, t = 5 of 7 holders
    assert setup.neighbours < len(setup.parties) - 1
    lonely = "p07"
    gone = list(setup.graph[lonely])
    r = advertise_and_share(setup, drop_after_sharing=gone)
    assert len(r.uploaded) == 14 >= setup.threshold
    assert [lonely] in graphs.components(setup.graph, r.uploaded)
    for h in (lonely, r.uploaded[-1]):
        with pytest.raises(AggregationError, match="on their own") as exc:
            reveal(setup, h, r.inbox[h], r.shared, r.uploaded)
        assert lonely in str(exc.value)
    with pytest.raises(AggregationError, match="on their own"):
        unmask(setup, r.adverts, r.shared, r.inputs, {})


# --- independence of what the coordinator sees -----------------------------------------------


def _centered(words: np.ndarray) -> np.ndarray:
    x = words.astype(np.float64)
    return x - x.mean()


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _chi2_top4(words: np.ndarray) -> float:
    counts = np.bincount((words >> 28).astype(np.int64), minlength=16)
    expected = words.size / 16
    return float(((counts - expected) ** 2 / expected).sum())


def test_masked_inputs_are_independent_of_updates_and_uniform() -> None:
    trials, n, d = 200, 3, 2048
    setup = make_setup(n)
    spec = QuantSpec.for_parties(CLIP, n)
    rng = np.random.default_rng(2024)
    # Strongly structured updates (a shared sinusoid plus small noise) so any leak shows.
    base = 0.4 * np.sin(np.linspace(0, 12 * np.pi, d))
    worst, pooled, raw = 0.0, [], []
    for _ in range(trials):
        secrets = {p: seeded_secrets(rng) for p in setup.parties}
        adverts = {p: s.advertisement() for p, s in secrets.items()}
        words = {p: quantize(base + rng.normal(0, 0.02, d), spec, rng)[0] for p in setup.parties}
        masked = {
            p: masked_input(setup, p, secrets[p], words[p], adverts, setup.parties)
            for p in setup.parties
        }
        for y in masked.values():
            for q in words.values():
                worst = max(worst, abs(_cos(_centered(y), _centered(q))))
        ys = [_centered(y) for y in masked.values()]
        for a, b in itertools.combinations(ys, 2):
            worst = max(worst, abs(_cos(a, b)))
        pooled += list(masked.values())
        raw += list(words.values())
    assert worst < 0.1
    # The updates themselves are highly correlated with each other: the check can fail.
    w = list(words.values())
    assert _cos(_centered(w[0]), _centered(w[1])) > 0.9
    all_masked = np.concatenate(pooled)
    # 15 degrees of freedom: P(chi2 > 50) ~ 1e-5 for uniform words.
    assert _chi2_top4(all_masked) < 50
    assert _chi2_top4(all_masked << 28) < 50  # low bits too
    assert _chi2_top4(np.concatenate(raw)) > 1e4  # quantised words are nowhere near uniform
    assert abs(all_masked.astype(np.float64).mean() / 2**32 - 0.5) < 0.002


def test_masked_input_of_party_outside_shared_is_refused() -> None:
    setup = make_setup(3)
    rng = np.random.default_rng(0)
    secrets = {p: seeded_secrets(rng) for p in setup.parties}
    adverts = {p: s.advertisement() for p, s in secrets.items()}
    with pytest.raises(ProtectionError, match="not among the parties that shared"):
        masked_input(setup, "p00", secrets["p00"], np.zeros(10, WORD), adverts, ["p01", "p02"])


# --- quantisation ------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 10, 50, 1000, 65536, 65537])
def test_for_parties_picks_widest_non_wrapping_bits(n: int) -> None:
    spec = QuantSpec.for_parties(CLIP, n)
    expected = 32 - (math.ceil(math.log2(n)) if n > 1 else 0)
    assert spec.bits == expected
    assert headroom_bits(n) == 32 - expected
    assert n * spec.levels < 2**32
    # One more bit would wrap for some n (the bound is tight at powers of two).
    if n > 1 and n == 2 ** math.ceil(math.log2(n)):
        assert n * ((1 << (spec.bits + 1)) - 1) >= 2**32


def test_n_parties_at_max_words_do_not_wrap() -> None:
    for n in (2, 3, 10, 50):
        spec = QuantSpec.for_parties(CLIP, n)
        top, clipped = quantize(np.full(64, CLIP), spec, np.random.default_rng(n))
        assert clipped == 0
        assert np.all(top == spec.levels)
        total32 = np.zeros(64, WORD)
        for _ in range(n):
            np.add(total32, top, out=total32)
        assert np.array_equal(total32.astype(np.uint64), top.astype(np.uint64) * n)
        np.testing.assert_allclose(dequantize_sum(total32, spec, n), n * CLIP, atol=1e-6)
        bottom, _ = quantize(np.full(64, -CLIP), spec, np.random.default_rng(n))
        assert np.all(bottom == 0)
        np.testing.assert_allclose(
            dequantize_sum(bottom * np.uint32(n), spec, n), -n * CLIP, atol=1e-6
        )


def test_values_beyond_clip_are_counted_and_clamped() -> None:
    spec = QuantSpec.for_parties(CLIP, 4)
    x = np.array([-3.0, -0.5000001, -0.5, 0.0, 0.5, 0.5000001, 7.0, 0.25])
    words, clipped = quantize(x, spec, np.random.default_rng(0))
    assert clipped == 4
    assert words[0] == words[1] == 0
    assert words[5] == words[6] == spec.levels
    decoded = dequantize_sum(words, spec, 1)
    assert np.all(np.abs(decoded) <= CLIP + spec.step)
    np.testing.assert_allclose(decoded[[0, 6]], [-CLIP, CLIP], atol=spec.step)


def test_quantisation_is_unbiased() -> None:
    spec = QuantSpec(CLIP, 8, 2)  # coarse steps so rounding bias would be visible
    c = -CLIP + (40 + 0.3) * spec.step  # 30% of the way between two grid points
    trials = 200_000
    words, _ = quantize(np.full(trials, c), spec, np.random.default_rng(5))
    assert set(np.unique(words).tolist()) == {40, 41}
    decoded = dequantize_sum(words, spec, 1)
    p = 0.3
    se = spec.step * math.sqrt(p * (1 - p)) / math.sqrt(trials)
    assert abs(decoded.mean() - c) < 4 * se
    # Nearest rounding would be off by 0.3 steps, hundreds of standard errors: the test can fail.
    assert 0.3 * spec.step > 100 * se
    assert abs(np.mean(words == 41) - p) < 0.01


def test_quantisation_error_bound_per_value() -> None:
    spec = QuantSpec.for_parties(CLIP, 3)
    x = np.random.default_rng(9).uniform(-CLIP, CLIP, 5000)
    words, _ = quantize(x, spec, np.random.default_rng(10))
    assert np.max(np.abs(dequantize_sum(words, spec, 1) - x)) < spec.step
    assert spec.sum_error_bound(3) == pytest.approx(3 * 2 * CLIP / spec.levels)


@pytest.mark.parametrize(("bits", "parties"), [(33, 1), (32, 2), (31, 3), (27, 50), (1, 2)])
def test_too_many_or_too_few_bits_are_refused(bits: int, parties: int) -> None:
    with pytest.raises(ValueError, match="wrap"):
        QuantSpec(CLIP, bits, parties)
    with pytest.raises(ValueError, match="wrap"):
        QuantSpec.for_parties(CLIP, parties, bits=bits)


def test_quant_spec_and_inputs_are_validated() -> None:
    for clip in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="clip"):
            QuantSpec(clip, 8, 2)
    with pytest.raises(ValueError, match="parties"):
        QuantSpec(CLIP, 8, 0)
    spec = QuantSpec.for_parties(CLIP, 3)
    with pytest.raises(ValueError, match="non-finite"):
        quantize(np.array([0.0, np.nan]), spec)
    for summed in (0, 4):
        with pytest.raises(ValueError, match="summed"):
            dequantize_sum(np.zeros(3, WORD), spec, summed)


# --- Shamir ------------------------------------------------------------------------------------


def test_any_t_of_m_shares_rebuild_the_secret() -> None:
    secret = np.random.default_rng(1).bytes(32)
    t, m = 3, 6
    shares = shamir.split(secret, t, m)
    assert [i for i, _ in shares] == list(range(1, m + 1))
    assert all(len(s) == shamir.SHARE_SIZE for _, s in shares)
    for subset in itertools.combinations(shares, t):
        assert shamir.combine(list(subset), t) == secret
    assert shamir.combine(shares, t) == secret  # extra shares are ignored


def test_fewer_than_t_shares_do_not_rebuild() -> None:
    secret = np.random.default_rng(2).bytes(32)
    t = 4
    shares = shamir.split(secret, t, 7)
    for subset in itertools.combinations(shares, t - 1):
        with pytest.raises(ValueError, match="needed"):
            shamir.combine(list(subset), t)
        # Interpolating t-1 points as if t-1 sufficed yields some other value.
        assert shamir.combine(list(subset), t - 1) != secret
    # Duplicates of one share do not count twice.
    with pytest.raises(ValueError, match="distinct"):
        shamir.combine([shares[0]] * t, t)


def test_every_subset_of_at_least_t_shares_rebuilds_the_same_secret() -> None:
    secret = np.random.default_rng(5).bytes(32)
    t, m = 4, 7
    shares = shamir.split(secret, t, m)
    for size in range(t, m + 1):
        for subset in itertools.combinations(shares, size):
            assert shamir.combine(list(subset), t) == secret
            assert shamir.combine(list(reversed(subset)), t) == secret  # order is irrelevant


def test_t_minus_one_shares_fit_every_secret_equally_well() -> None:
    """Information-theoretic hiding: for any t-1 shares and ANY candidate secret there is a
    degree t-1 polynomial through both, so a t-th share exists that rebuilds that candidate."""
    rng = np.random.default_rng(6)
    secret = rng.bytes(32)
    t, m = 4, 7
    shares = shamir.split(secret, t, m)
    for subset in itertools.combinations(shares, t - 1):
        missing = next(i for i in range(1, m + 1) if i not in {j for j, _ in subset})
        for candidate in (bytes(32), rng.bytes(32), secret):
            forged = b""
            for half in (slice(0, 16), slice(16, 32)):
                points = [(0, int.from_bytes(candidate[half], "big"))]
                points += [(i, int.from_bytes(s[half], "big")) for i, s in subset]
                forged += shamir.interpolate(points, missing).to_bytes(16, "big")
            assert shamir.combine([*subset, (missing, forged)], t) == candidate


def test_combine_agrees_with_pycryptodome_and_reuses_coefficients() -> None:
    """Our batched Lagrange combination is pycryptodome's field and result, half by half."""
    from Crypto.Protocol.SecretSharing import Shamir

    rng = np.random.default_rng(7)
    shamir._coefficient_tables.cache_clear()
    for t in (2, 5, 10):
        for _ in range(3):
            secret = rng.bytes(32)
            shares = shamir.split(secret, t, t + 3)[1 : t + 1]
            ours = shamir.combine(shares, t)
            theirs = b"".join(
                Shamir.combine([(i, s[h : h + 16]) for i, s in shares]) for h in (0, 16)
            )
            assert ours == theirs == secret
    info = shamir._coefficient_tables.cache_info()
    assert info.misses == 3 and info.hits == 6  # one coefficient set per index set
    for _ in range(20):
        a, b = (int.from_bytes(rng.bytes(16), "big") or 1 for _ in range(2))
        assert shamir.mul(a, shamir.inverse(a)) == 1
        assert shamir.mul(a, b) == shamir.mul(b, a)
    with pytest.raises(ValueError, match="zero"):
        shamir.inverse(0)


def test_threshold_one_and_bad_arguments() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, 1, 4)
    assert len(shares) == 4
    for share in shares:
        assert shamir.combine([share], 1) == secret
    with pytest.raises(ValueError, match="32-byte"):
        shamir.split(secret[:16], 2, 3)
    with pytest.raises(ValueError, match="threshold"):
        shamir.split(secret, 4, 3)
    with pytest.raises(ValueError, match="threshold"):
        shamir.split(secret, 0, 3)
    with pytest.raises(ValueError, match="255"):
        shamir.split(secret, 2, 256)
    with pytest.raises(ValueError, match="malformed"):
        shamir.combine([(1, b"x" * 31), (2, b"y" * 32)], 2)


def test_shares_of_the_same_secret_are_fresh() -> None:
    secret = bytes(32)
    a, b = shamir.split(secret, 2, 3), shamir.split(secret, 2, 3)
    assert a != b
    assert all(s != secret for _, s in a)


# --- masks -------------------------------------------------------------------------------------


def test_expand_is_deterministic_and_key_specific() -> None:
    k1, k2 = bytes(32), bytes([1]) + bytes(31)
    m1 = masks.expand(k1, 4000)
    assert m1.dtype == WORD and m1.shape == (4000,)
    assert np.array_equal(m1, masks.expand(k1, 4000))
    assert np.array_equal(m1[:100], masks.expand(k1, 100))
    m2 = masks.expand(k2, 4000)
    assert np.mean(m1 == m2) < 0.01
    assert len(np.unique(m1)) > 3990  # no short cycle


def test_apply_then_subtract_restores_across_chunks() -> None:
    key = np.random.default_rng(3).bytes(32)
    for n in (1, 1000, masks.CHUNK_WORDS + 7):
        original = np.random.default_rng(n).integers(0, 2**32, n, dtype=np.uint64).astype(WORD)
        acc = original.copy()
        masks.apply_mask(acc, key)
        assert not np.array_equal(acc, original)
        masks.apply_mask(acc, key, subtract=True)
        assert np.array_equal(acc, original)
    # Chunked application equals the one-shot stream (chunk boundary continues the keystream).
    big = masks.expand(key, masks.CHUNK_WORDS + 7)
    np.testing.assert_array_equal(big[: masks.CHUNK_WORDS], masks.expand(key, masks.CHUNK_WORDS))
    with pytest.raises(TypeError):
        masks.apply_mask(np.zeros(4, dtype=np.int64), key)
    with pytest.raises(TypeError):
        masks.apply_mask(np.zeros((2, 2), dtype=WORD), key)


def test_pair_and_self_keys_are_bound() -> None:
    secret = bytes(range(32))
    b1 = make_setup(3).binding()
    b2 = make_setup(3, round=2).binding()
    assert masks.pair_key(secret, b1, "p00", "p01") == masks.pair_key(secret, b1, "p01", "p00")
    assert masks.pair_key(secret, b1, "p00", "p01") != masks.pair_key(secret, b2, "p00", "p01")
    assert masks.pair_key(secret, b1, "p00", "p01") != masks.pair_key(secret, b1, "p00", "p02")
    assert masks.pair_key(secret, b1, "p00", "p01") != masks.pair_key(bytes(32), b1, "p00", "p01")
    assert masks.self_key(secret, b1, "p00") != masks.self_key(secret, b1, "p01")
    assert masks.self_key(secret, b1, "p00") != masks.self_key(secret, b2, "p00")
    assert masks.self_key(secret, b1, "p00") != masks.pair_key(secret, b1, "p00", "p00")
    with pytest.raises(ValueError, match="32 bytes"):
        masks.self_key(secret[:31], b1, "p00")


def test_pairwise_masks_cancel_between_two_parties() -> None:
    setup = make_setup(2)
    rng = np.random.default_rng(4)
    a, b = seeded_secrets(rng), seeded_secrets(rng)
    ka = masks.pair_key(a.mask_key.exchange(b.mask_key.public_key()), setup.binding(), "p00", "p01")
    kb = masks.pair_key(b.mask_key.exchange(a.mask_key.public_key()), setup.binding(), "p01", "p00")
    assert ka == kb


# --- tampered or inconsistent reveals --------------------------------------------------------


def _round_for_tampering(drop_after_sharing: Collection[str] = ()) -> Round:
    setup = make_setup(5)  # complete graph, t = 4
    r = advertise_and_share(setup, drop_after_sharing=drop_after_sharing, seed=21)
    return reveal_from(r, r.uploaded)


def _replace(r: Round, holder: str, owner: str, **changes: object) -> None:
    old = r.responses[holder][owner]
    r.responses[holder] = {**r.responses[holder], owner: old.model_copy(update=changes)}


def test_wrong_seed_share_fails_the_commitment() -> None:
    r = _round_for_tampering()
    # p00 holds index 1, so combine always uses its share; hand in p01's share instead.
    wrong = r.inbox["p00"]["p01"].seed
    assert wrong != r.responses["p00"]["p02"].share
    _replace(r, "p00", "p02", share=wrong)
    with pytest.raises(ProtectionError, match="p02's seed shares do not match its commitment"):
        finish(r)


def test_wrong_key_share_fails_the_advertised_key() -> None:
    r = _round_for_tampering(drop_after_sharing=["p03"])
    assert r.responses["p00"]["p03"].kind == "key"
    _replace(r, "p00", "p03", share=r.inbox["p00"]["p04"].key)
    with pytest.raises(ProtectionError, match="p03's key shares do not match its advertised key"):
        finish(r)


def test_untampered_reference_round_succeeds() -> None:
    for dropped in ((), ("p03",)):
        r = _round_for_tampering(dropped)
        assert_round_correct(r, *finish(r))


@pytest.mark.parametrize(
    ("owner", "changes"),
    [
        ("p02", {"kind": "key"}),  # seed expected: p02 uploaded
        ("p03", {"kind": "seed"}),  # key expected: p03 dropped after sharing
        ("p02", {"index": 2}),  # p00 sits at index 1
        ("p03", {"index": 5}),
    ],
)
def test_reveal_with_wrong_kind_or_index_is_rejected(owner: str, changes: dict) -> None:
    r = _round_for_tampering(drop_after_sharing=["p03"])
    _replace(r, "p00", owner, **changes)
    with pytest.raises(ProtectionError, match="wrong kind"):
        finish(r)


def test_commitment_is_checked_against_the_advert() -> None:
    r = _round_for_tampering()
    other = seeded_secrets(np.random.default_rng(99)).advertisement()
    r.adverts["p01"] = Advertisement(
        mask_pk=r.adverts["p01"].mask_pk, seed_commitment=other.seed_commitment
    )
    with pytest.raises(ProtectionError, match="commitment"):
        finish(r)
    assert commit(r.secrets["p01"].seed) != other.seed_commitment


def test_reveal_never_gives_both_halves_of_one_owner() -> None:
    setup = make_setup(10, 6)
    r = advertise_and_share(
        setup, drop_before_sharing=["p09"], drop_after_sharing=["p02", "p05"], seed=8
    )
    reveal_from(r, r.uploaded)
    kinds: dict[str, set[str]] = {}
    for holder, resp in r.responses.items():
        for owner, rv in resp.items():
            assert rv.index == setup.holders(owner).index(holder) + 1
            kinds.setdefault(owner, set()).add(rv.kind)
    assert "p09" not in kinds  # never shared: nothing to reveal
    for owner, seen in kinds.items():
        assert seen == ({"seed"} if owner in r.uploaded else {"key"}), owner
    # The coordinator gets exactly what it needs and the sum still decodes.
    assert_round_correct(r, *finish(r))


def test_reveal_refuses_non_uploader_and_inconsistent_rosters() -> None:
    setup = make_setup(5)
    r = advertise_and_share(setup, drop_after_sharing=["p04"])
    with pytest.raises(ProtectionError, match="did not upload"):
        reveal(setup, "p04", r.inbox["p04"], r.shared, r.uploaded)
    with pytest.raises(ProtectionError, match="not a subset"):
        reveal(setup, "p00", r.inbox["p00"], ["p00", "p01", "p02"], r.uploaded)
    with pytest.raises(ProtectionError, match="not a subset"):
        check_survivors(setup, r.shared, [*r.uploaded, "p99"])


def test_check_share_rejects_misaddressed_shares() -> None:
    setup = make_setup(5)
    shares = make_shares(setup, "p00", seeded_secrets(np.random.default_rng(6)))
    check_share(setup, shares["p01"], owner="p00", holder="p01")
    with pytest.raises(ProtectionError, match="another owner or holder"):
        check_share(setup, shares["p01"], owner="p00", holder="p02")
    with pytest.raises(ProtectionError, match="another owner or holder"):
        check_share(setup, shares["p01"], owner="p03", holder="p01")
    with pytest.raises(ProtectionError, match="wrong holder index"):
        check_share(setup, shares["p01"].model_copy(update={"index": 3}), owner="p00", holder="p01")


def test_party_secrets_round_trip() -> None:
    s = seeded_secrets(np.random.default_rng(12))
    again = PartySecrets.from_bytes(s.to_bytes())
    assert again.advertisement() == s.advertisement()
    assert again.seed == s.seed
    assert s.seed.hex() not in repr(s) and "mask_key" not in repr(s)
    with pytest.raises(ValueError, match="64 bytes"):
        PartySecrets.from_bytes(b"x" * 63)
    fresh = PartySecrets.generate(), PartySecrets.generate()
    assert fresh[0].to_bytes() != fresh[1].to_bytes()


@pytest.mark.parametrize("bad_pk", [bytes(32), bytes(31)], ids=["low-order", "short"])
def test_bad_advertised_mask_key_is_a_protection_error(bad_pk: bytes) -> None:
    import base64

    from pydantic import ValidationError

    setup = make_setup(3)
    rng = np.random.default_rng(13)
    secrets = {p: seeded_secrets(rng) for p in setup.parties}
    adverts = {p: s.advertisement() for p, s in secrets.items()}
    try:
        adverts["p02"] = Advertisement(
            mask_pk=base64.b64encode(bad_pk).decode(),
            seed_commitment=adverts["p02"].seed_commitment,
        )
    except ValidationError:
        assert len(bad_pk) != 32  # a wrong size is refused when the advert is parsed
        return
    with pytest.raises(ProtectionError, match="invalid mask key"):
        masked_input(setup, "p00", secrets["p00"], np.zeros(8, WORD), adverts, setup.parties)
