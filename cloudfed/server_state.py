"""The server optimiser's state between rounds, stored signed beside the global adapter.

It lives on the exchange next to the adapter it belongs to, so a continued run (another run id)
finds it from the round record's adapter alone. The coordinator signs it and only accepts its own
signature: the exchange is untrusted, and forged moments would steer the next global adapter.
The state is a function of released aggregates only, so it holds nothing new about any party.
"""

from __future__ import annotations

import hashlib
import json

from cloudfed.aggregation.strategy import ServerState
from cloudfed.artifacts import GlobalAdapterRef
from cloudfed.errors import AggregationError, ProtectionError
from cloudfed.exchange import Exchange
from cloudfed.protection.keys import KeyPairs
from cloudfed.training.adapter_io import state_from_bytes, state_to_bytes

KIND = "server-state"


def state_key(adapter: GlobalAdapterRef) -> str:
    """Beside the adapter: `.../global/adapter.safetensors` -> `.../global/server_state.signed`."""
    return adapter.key.rsplit("/", 1)[0] + "/server_state.signed"


def _context(federation_id: str, adapter: GlobalAdapterRef):
    from cloudfed.protection.envelope import SealContext

    return SealContext(
        federation_id=federation_id,
        round=adapter.round,
        party="coordinator",
        kind=KIND,
        metadata={"adapter_sha256": adapter.sha256},
    )


def store(
    exchange: Exchange,
    keys: KeyPairs,
    federation_id: str,
    adapter: GlobalAdapterRef,
    state: ServerState,
) -> dict[str, object]:
    """Sign and write the state; what the round record's AggregationState.state keeps."""
    from cloudfed.protection.envelope import sign_public

    meta = {
        "strategy": state.strategy,
        "version": str(state.version),
        "step": str(state.step),
        "scalars": json.dumps(dict(state.scalars), sort_keys=True),
    }
    body = state_to_bytes(dict(state.tensors), metadata=meta)
    blob = sign_public(body, context=_context(federation_id, adapter), sender=keys)
    key = state_key(adapter)
    exchange.put_bytes(key, blob)
    return {"key": key, "sha256": hashlib.sha256(blob).hexdigest(), "step": state.step}


def load(
    exchange: Exchange, keys: KeyPairs, federation_id: str, adapter: GlobalAdapterRef
) -> ServerState | None:
    """The state stored beside `adapter`, or None if none was (the base model, old rounds)."""
    from cloudfed.protection.envelope import open_public

    key = state_key(adapter)
    if not exchange.exists(key):
        return None
    try:
        opened = open_public(
            exchange.get_bytes(key),
            context=_context(federation_id, adapter),
            sender=keys.public_bundle(),
        )
    except (ProtectionError, ValueError):
        raise ProtectionError(
            f"{exchange.url(key)}: the server state is not signed by this coordinator for this "
            "adapter (tampered or replayed); it is not used"
        ) from None
    meta = _metadata(opened.payload)
    return ServerState(
        strategy=meta["strategy"],
        version=int(meta["version"]),
        step=int(meta["step"]),
        tensors=state_from_bytes(opened.payload),
        scalars=json.loads(meta["scalars"]),
    )


def _metadata(data: bytes) -> dict[str, str]:
    """Safetensors' header metadata (the `__metadata__` entry of its JSON header)."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    meta = header.get("__metadata__") or {}
    if not {"strategy", "version", "step", "scalars"} <= set(meta):
        raise AggregationError("server state without its strategy metadata")
    return meta
