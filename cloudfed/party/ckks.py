"""The CKKS key party: makes the round's keys and decrypts only the sum the coordinator formed.

The secret context never leaves the key party's storage; it decrypts one summed ciphertext per
round, for a sum over enough parties of this run, and puts the plaintext back onto the
party-level DP grid.
"""

from __future__ import annotations

import time

import numpy as np

from cloudfed.aggregation.ranks import band_shortfall
from cloudfed.artifacts import CkksKeyRef, FederationPlan, StageRef
from cloudfed.errors import ProtectionError
from cloudfed.exchange import ckks_plain_sum_key, ckks_public_key, ckks_sum_key, federation_exchange
from cloudfed.federation import FederationConfig, PartyConfig
from cloudfed.locations import AnyPath, party_root
from cloudfed.party.admission import consent
from cloudfed.party.stages import stage_ref, write_owner_only
from cloudfed.party_policy import ConsentError, required_survivors
from cloudfed.privacy.party_level import ckks_grid
from cloudfed.protection import open_sealed_with_metadata, seal
from cloudfed.protection.envelope import sign_public
from cloudfed.protection.messages import (
    CKKS_CONTEXT,
    CKKS_PLAIN,
    CKKS_SUM,
    COORDINATOR,
    coordinator_bundle,
    sha256,
    stage_context,
)


def _ckks_secret_path(party: PartyConfig, run_id: str, round: int) -> AnyPath:
    return party_root(party) / "ckks" / run_id / f"r{round:04d}.secret-context"


def ckks_keygen(
    cfg: FederationConfig, party: PartyConfig, plan: FederationPlan, round: int
) -> CkksKeyRef:
    """The key party makes this round's CKKS keys; only the public context leaves its storage."""
    from cloudfed.protection import ckks

    exchange = federation_exchange(cfg)
    keys, _ = consent(cfg, party, plan)
    c = cfg.protection.ckks
    secret, public = ckks.generate_keys(
        ckks.CkksParams(
            poly_modulus_degree=c.poly_modulus_degree,
            coeff_mod_bit_sizes=tuple(c.coeff_mod_bit_sizes),
            global_scale_bits=c.global_scale_bits,
            workers=c.workers,
        )
    )
    write_owner_only(_ckks_secret_path(party, plan.run_id, round), secret)
    context = stage_context(cfg, round, party.name, CKKS_CONTEXT, run_id=plan.run_id)
    blob = sign_public(public, context=context, sender=keys)
    exchange.put_bytes(ckks_public_key(plan.run_id, round), blob)
    return CkksKeyRef(
        party=party.name,
        round=round,
        key=ckks_public_key(plan.run_id, round),
        sha256=sha256(blob),
        fingerprint=keys.public_bundle().fingerprint,
        bytes=len(blob),
    )


def ckks_decrypt_sum(
    cfg: FederationConfig, party: PartyConfig, round: int, plan: FederationPlan, length: int
) -> StageRef:
    """Key party: decrypt the coordinator's summed ciphertext, once, and nothing else, for it.

    Refuses a sum that declares fewer contributors than this party's own minimum, or members it
    did not pin. Under distributed DP every contribution lay on the noise grid, so the decrypted
    sum is rounded back onto it: CKKS's approximation error (which depends on the plaintexts) is
    not released. The round's secret context is deleted once used; a retry with the same sum gets
    the same answer, another sum gets none.
    """
    from cloudfed.protection import ckks

    start = time.perf_counter()
    exchange = federation_exchange(cfg)
    keys, loaded = consent(cfg, party, plan)
    coordinator = coordinator_bundle(exchange, plan)
    incoming = exchange.get_bytes(ckks_sum_key(plan.run_id, round))
    answered = _ckks_secret_path(party, plan.run_id, round).with_suffix(".answered")
    answer = _ckks_secret_path(party, plan.run_id, round).with_suffix(".answer")
    key = ckks_plain_sum_key(plan.run_id, round)
    if answered.exists():
        if answered.read_bytes() != sha256(incoming).encode() or not answer.exists():
            raise ProtectionError(
                f"{party.name} already decrypted a CKKS sum for round {round}; it decrypts one "
                "sum per round and key"
            )
        blob = answer.read_bytes()
        exchange.put_bytes(key, blob)
        return stage_ref(party.name, round, "ckks-decrypt", key, blob, keys, start)
    context = stage_context(cfg, round, COORDINATOR, CKKS_SUM)
    opened = open_sealed_with_metadata(
        incoming, context=context, recipient=keys, sender=coordinator
    )
    if opened.metadata.get("run_id") != plan.run_id:
        raise ProtectionError("ckks sum rejected: it belongs to another run (replay)")
    summed = opened.metadata.get("parties")
    need = required_survivors(cfg, loaded)
    if not isinstance(summed, list) or len(set(summed)) < need:
        raise ConsentError(
            f"{party.name} refuses to decrypt a CKKS sum of {summed!r}: fewer than {need} "
            "contributions (its own minimum) would expose too little noise or a single update"
        )
    for name in summed:
        if name not in loaded.policy.pins.parties:
            raise ConsentError(f"{party.name} refuses a CKKS sum that names unpinned {name!r}")
    if (thin := band_shortfall(cfg, summed, need)) is not None:
        raise ConsentError(f"{party.name} refuses to decrypt a CKKS sum: {thin}")
    secret_path = _ckks_secret_path(party, plan.run_id, round)
    if not secret_path.exists():
        raise ProtectionError(f"{party.name} holds no CKKS secret key for round {round}")
    values = ckks.decrypt_vector(
        secret_path.read_bytes(), ckks.unpack_blocks(opened.payload), length
    )
    write_owner_only(answered, sha256(incoming).encode())
    secret_path.unlink()  # one decryption per round's key
    if cfg.privacy.mode == "distributed":
        values = back_onto_grid(values, ckks_grid(cfg), round)
    out = stage_context(cfg, round, party.name, CKKS_PLAIN, run_id=plan.run_id, parties=summed)
    # float32 is all the adapter keeps; fewer released bits of the decryption, too.
    blob = seal(values.astype("<f4").tobytes(), context=out, sender=keys, recipient=coordinator)
    write_owner_only(answer, blob)
    exchange.put_bytes(key, blob)
    return stage_ref(party.name, round, "ckks-decrypt", key, blob, keys, start)


def back_onto_grid(values: np.ndarray, grid: float, round: int) -> np.ndarray:
    """Exact multiples of the noise grid, or nothing if CKKS's error came near half a step."""
    scaled = values / grid
    ticks = np.rint(scaled)
    worst = float(np.max(np.abs(scaled - ticks))) if scaled.size else 0.0
    if worst > 0.25:
        raise ProtectionError(
            f"round {round}: the CKKS decryption error reached {worst:.2f} noise-grid steps; the "
            "sum is not released (raise protection.ckks.global_scale_bits)"
        )
    return ticks * grid
