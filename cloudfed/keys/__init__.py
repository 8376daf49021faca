"""A party's private keys: where they live (its choice of source) and how they rotate."""

from cloudfed.keys.rotation import follow_rotations, rotate
from cloudfed.keys.sources import (
    EnvKeySource,
    KeySet,
    KeySource,
    SecretManager,
    SecretManagerKeySource,
    StorageKeySource,
    env_var_for,
    load_party_keys,
    load_secret_manager,
    party_key_source,
)

__all__ = [
    "EnvKeySource",
    "KeySet",
    "KeySource",
    "SecretManager",
    "SecretManagerKeySource",
    "StorageKeySource",
    "env_var_for",
    "follow_rotations",
    "load_party_keys",
    "load_secret_manager",
    "party_key_source",
    "rotate",
]
