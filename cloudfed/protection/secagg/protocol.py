"""The secure-aggregation protocol of Bonawitz et al. (CCS 2017) with SecAgg+ neighbourhoods.

Pure functions over in-memory values: `cloudfed.party_secagg` and `cloudfed.coordinator_secagg`
move the messages over the exchange as sealed or signed envelopes, one ZenML step per stage.

Stages of one round (U1 >= U2 >= U3 >= U4 are the parties still present at each stage):

1. advertise   each party publishes a fresh X25519 mask key and a commitment to a fresh self-mask
               seed; U1 = who advertised.
2. share keys  each party splits its seed and its mask private key t-of-m among its neighbourhood
               (itself and its k graph neighbours in U1), one sealed share per holder; U2 = who
               shared.
3. masked input each party in U2 uploads q + PRG(seed) + sum_{v<->u in U2} +/-PRG(k_uv) mod 2^32;
               U3 = whose upload verified.
4. unmask      each survivor reveals, per owner it holds shares of, the seed share if the owner is
               in U3 or the mask-key share if the owner dropped after sharing; never both.

The coordinator rebuilds each surviving owner's seed (removing its self mask) and each dropped
owner's mask key (removing the pairwise masks its neighbours applied), and is left with the sum of
U3's words. A party answers stage 4 only if the survivors' graph has no component smaller than
`min_survivors`: what the coordinator can unmask is exactly one sum per component.
"""

from __future__ import annotations

import base64
import hashlib
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, field_validator

from cloudfed.errors import AggregationError, ProtectionError
from cloudfed.protection.hazmat import masks, shamir
from cloudfed.protection.hazmat.quantize import WORD
from cloudfed.protection.secagg import graph as graphs

_COMMIT = b"cloudfed/secagg/v1/seed-commitment"


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str, size: int) -> bytes:
    raw = base64.b64decode(text, validate=True)
    if len(raw) != size:
        raise ValueError("wrong field size")
    return raw


def commit(seed: bytes) -> str:
    return hashlib.sha256(_COMMIT + seed).hexdigest()


def min_threshold(holders: int) -> int:
    """Least safe t: a strict majority of the owner's holders.

    Two disjoint groups of holders could otherwise be asked for both halves (seed and key) of one
    owner and unmask its single input (Bonawitz et al. 2017, sec. 4).
    """
    return holders // 2 + 1


@dataclass(frozen=True)
class RoundSetup:
    """Public parameters every participant derives identically from the roster."""

    federation_id: str
    run_id: str
    round: int
    parties: tuple[str, ...]
    neighbours: int
    threshold: int
    min_survivors: int = 2

    def __post_init__(self) -> None:
        if tuple(sorted(set(self.parties))) != self.parties:
            raise ValueError("parties must be sorted and unique")
        graphs.check_neighbours(self.neighbours, len(self.parties))
        holders = self.neighbours + 1
        low = min_threshold(holders)
        if not low <= self.threshold <= holders:
            raise ValueError(
                f"threshold t={self.threshold} is outside [{low}, {holders}] for neighbourhoods "
                f"of {holders} (k={self.neighbours} neighbours + the owner): t must be a strict "
                "majority so no coalition of holders learns both a seed and a mask key, and at "
                "most the number of holders so a round can complete"
            )
        if self.min_survivors < 2:
            raise ValueError("min_survivors must be at least 2: one party's sum is its update")

    def binding(self) -> dict[str, Any]:
        return {
            "federation_id": self.federation_id,
            "run_id": self.run_id,
            "round": self.round,
            "parties": list(self.parties),
            "neighbours": self.neighbours,
            "threshold": self.threshold,
        }

    @cached_property
    def graph(self) -> dict[str, tuple[str, ...]]:
        seed = hashlib.sha256(b"cloudfed/secagg/v1/graph" + repr(self.binding()).encode()).digest()
        return graphs.build(self.parties, self.neighbours, seed)

    def holders(self, owner: str) -> tuple[str, ...]:
        """Who holds shares of `owner`'s secrets, in index order (index = position + 1)."""
        return tuple(sorted({owner, *self.graph[owner]}))


def setup_for(
    federation_id: str,
    run_id: str,
    round: int,
    parties: Collection[str],
    *,
    neighbours: int | None,
    threshold: int | None,
    complete_up_to: int,
    min_survivors: int,
) -> RoundSetup:
    """Fill in config defaults for this round's actual party count, then check the bounds."""
    names = tuple(sorted(set(parties)))
    if len(names) < 2:
        raise AggregationError(
            f"round {round}: secure aggregation needs at least 2 parties, {len(names)} advertised"
        )
    k = (
        neighbours
        if neighbours is not None
        else graphs.default_neighbours(len(names), complete_up_to)
    )
    k = min(k, len(names) - 1)
    t = (
        threshold
        if threshold is not None
        else max(min_threshold(k + 1), math.ceil(2 * (k + 1) / 3))
    )
    t = min(t, k + 1)
    return RoundSetup(federation_id, run_id, round, names, k, t, min_survivors)


class Advertisement(BaseModel):
    """Stage 1 payload: public, signed by the party's long-term key on the exchange."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    mask_pk: str
    seed_commitment: str = Field(pattern=r"^[0-9a-f]{64}$")
    # The key the party intends to rotate to, signed with its current key under this round's
    # context: the only rotation statement the coordinator approves, and its peers follow, in
    # this round. A replayed statement of a rotation the party abandoned names another key.
    rotate_to: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")

    @field_validator("mask_pk")
    @classmethod
    def _is_x25519_key(cls, value: str) -> str:
        _unb64(value, 32)
        return value

    def public_key(self) -> X25519PublicKey:
        return X25519PublicKey.from_public_bytes(_unb64(self.mask_pk, 32))


def _agree(key: X25519PrivateKey, peer: str, advert: Advertisement) -> bytes:
    """X25519 with a peer's advertised key; a low-order key is a protocol failure, not a crash."""
    try:
        return key.exchange(advert.public_key())
    except ValueError as exc:
        raise ProtectionError(
            f"secagg advertisement of {peer} carries an invalid mask key"
        ) from exc


class Share(BaseModel):
    """Stage 2 payload: sealed from owner to one holder; the coordinator never opens one."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    owner: str
    holder: str
    index: int = Field(ge=1, le=255)
    seed: str
    key: str


class Reveal(BaseModel):
    """Stage 4 payload entry: one share of one owner's seed or mask key."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    kind: Literal["seed", "key"]
    index: int = Field(ge=1, le=255)
    share: str


@dataclass
class PartySecrets:
    """A party's per-round secrets; kept in its own storage between stages, never published."""

    mask_key: X25519PrivateKey = field(repr=False)
    seed: bytes = field(repr=False)

    @classmethod
    def generate(cls) -> PartySecrets:
        import os

        return cls(X25519PrivateKey.generate(), os.urandom(masks.SEED_SIZE))

    def to_bytes(self) -> bytes:
        raw = self.mask_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return raw + self.seed

    @classmethod
    def from_bytes(cls, data: bytes) -> PartySecrets:
        if len(data) != 64:
            raise ValueError("party secrets must be 64 bytes")
        return cls(X25519PrivateKey.from_private_bytes(data[:32]), data[32:])

    def advertisement(self, rotate_to: str | None = None) -> Advertisement:
        pk = self.mask_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return Advertisement(
            mask_pk=_b64(pk), seed_commitment=commit(self.seed), rotate_to=rotate_to
        )


def make_shares(setup: RoundSetup, me: str, secrets: PartySecrets) -> dict[str, Share]:
    """One share of seed and mask key per holder of `me` (itself included)."""
    holders = setup.holders(me)
    key_raw = secrets.to_bytes()[:32]
    seed_shares = shamir.split(secrets.seed, setup.threshold, len(holders))
    key_shares = shamir.split(key_raw, setup.threshold, len(holders))
    return {
        h: Share(owner=me, holder=h, index=i, seed=_b64(s), key=_b64(k))
        for h, (i, s), (j, k) in zip(holders, seed_shares, key_shares, strict=True)
        if i == j
    }


def check_share(setup: RoundSetup, share: Share, *, owner: str, holder: str) -> None:
    """A share must be addressed as the sealed envelope says and sit at the holder's index."""
    holders = setup.holders(owner)
    if share.owner != owner or share.holder != holder or holder not in holders:
        raise ProtectionError("secagg share rejected: addressed to another owner or holder")
    if share.index != holders.index(holder) + 1:
        raise ProtectionError("secagg share rejected: wrong holder index")


def masked_input(
    setup: RoundSetup,
    me: str,
    secrets: PartySecrets,
    words: np.ndarray,
    adverts: Mapping[str, Advertisement],
    shared: Collection[str],
) -> np.ndarray:
    """The party's words under its self mask and one pairwise mask per neighbour in U2."""
    if me not in shared:
        raise ProtectionError(f"{me} is not among the parties that shared keys this round")
    y = np.array(words, dtype=WORD, copy=True)
    binding = setup.binding()
    masks.apply_mask(y, masks.self_key(secrets.seed, binding, me))
    for v in setup.graph[me]:
        if v not in shared:
            continue
        secret = _agree(secrets.mask_key, v, adverts[v])
        masks.apply_mask(y, masks.pair_key(secret, binding, me, v), subtract=me > v)
    return y


def check_survivors(setup: RoundSetup, shared: Collection[str], uploaded: Collection[str]) -> None:
    """Refuse to unmask when the coordinator could isolate a party, or cannot finish anyway."""
    survivors = sorted(set(uploaded))
    if not set(survivors) <= set(shared) <= set(setup.parties):
        raise ProtectionError("secagg roster rejected: survivors are not a subset of who shared")
    if len(survivors) < max(setup.threshold, setup.min_survivors):
        raise AggregationError(
            f"round {setup.round}: {len(survivors)} masked input(s) from {survivors}, below the "
            f"threshold t={setup.threshold} (and min_parties={setup.min_survivors}) that secure "
            "aggregation needs; the round is aborted and no model is published"
        )
    small = [c for c in graphs.components(setup.graph, survivors) if len(c) < setup.min_survivors]
    if small:
        raise AggregationError(
            f"round {setup.round}: after dropouts the masking graph leaves {small} on their own; "
            "unmasking would reveal their sum, so the round is aborted. Fix: raise "
            "protection.secagg.neighbours"
        )


def reveal(
    setup: RoundSetup,
    me: str,
    held: Mapping[str, Share],
    shared: Collection[str],
    uploaded: Collection[str],
) -> dict[str, Reveal]:
    """Per owner: the seed share if it uploaded, the key share if it dropped; never both."""
    check_survivors(setup, shared, uploaded)
    if me not in uploaded:
        raise ProtectionError(f"{me} did not upload a masked input and has nothing to unmask")
    out: dict[str, Reveal] = {}
    for owner, share in sorted(held.items()):
        if owner not in shared:
            continue
        if owner in uploaded:
            out[owner] = Reveal(kind="seed", index=share.index, share=share.seed)
        else:
            out[owner] = Reveal(kind="key", index=share.index, share=share.key)
    return out


def _rebuild(
    setup: RoundSetup, owner: str, kind: str, responses: Mapping[str, Mapping[str, Reveal]]
) -> bytes:
    shares = []
    for index, holder in enumerate(setup.holders(owner), start=1):  # k+1 holders, not all n
        r = responses.get(holder, {}).get(owner)
        if r is None:
            continue
        if r.kind != kind or r.index != index:
            raise ProtectionError(f"secagg reveal from {holder} for {owner} has the wrong kind")
        shares.append((r.index, _unb64(r.share, shamir.SHARE_SIZE)))
    if len({i for i, _ in shares}) < setup.threshold:
        raise AggregationError(
            f"round {setup.round}: only {len(shares)} share(s) of {owner}'s {kind} came back, "
            f"{setup.threshold} are needed (threshold t); too many parties dropped during "
            "unmasking. The round is aborted and no model is published"
        )
    return shamir.combine(shares, setup.threshold)


def unmask(
    setup: RoundSetup,
    adverts: Mapping[str, Advertisement],
    shared: Collection[str],
    inputs: Mapping[str, np.ndarray],
    responses: Mapping[str, Mapping[str, Reveal]],
) -> np.ndarray:
    """Sum of the survivors' words: remove self masks of U3, pairwise masks of dropped owners."""
    if not inputs:
        raise AggregationError("no masked inputs")
    size = {v.shape[0] for v in inputs.values()}
    if len(size) != 1:
        raise ProtectionError("secagg inputs rejected: vectors differ in length")
    total = np.zeros(size.pop(), dtype=WORD)
    for p in sorted(inputs):
        np.add(total, inputs[p], out=total)
    return remove_masks(setup, adverts, shared, sorted(inputs), total, responses)


def remove_masks(
    setup: RoundSetup,
    adverts: Mapping[str, Advertisement],
    shared: Collection[str],
    uploaded: Collection[str],
    total: np.ndarray,
    responses: Mapping[str, Mapping[str, Reveal]],
) -> np.ndarray:
    """Unmask a running sum in place, so a coordinator can add inputs as they arrive."""
    uploaded = sorted(uploaded)
    check_survivors(setup, shared, uploaded)
    binding, present = setup.binding(), set(uploaded)
    for owner in uploaded:
        seed = _rebuild(setup, owner, "seed", responses)
        if commit(seed) != adverts[owner].seed_commitment:
            raise ProtectionError(
                f"secagg unmask failed: {owner}'s seed shares do not match its commitment"
            )
        masks.apply_mask(total, masks.self_key(seed, binding, owner), subtract=True)
    for owner in sorted(set(shared) - set(uploaded)):
        raw = _rebuild(setup, owner, "key", responses)
        key = X25519PrivateKey.from_private_bytes(raw)
        if PartySecrets(key, bytes(32)).advertisement().mask_pk != adverts[owner].mask_pk:
            raise ProtectionError(
                f"secagg unmask failed: {owner}'s key shares do not match its advertised key"
            )
        for v in setup.graph[owner]:
            if v in present:
                secret = _agree(key, v, adverts[v])
                key_uv = masks.pair_key(secret, binding, owner, v)
                masks.apply_mask(total, key_uv, subtract=v < owner)
    return total
