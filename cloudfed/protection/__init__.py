"""Safe recipes for everything that leaves an owner's cloud.

Steps import from here only; `cloudfed.protection.hazmat` holds the primitives these recipes are
built from, and every cryptographic failure surfaces as `cloudfed.errors.ProtectionError`.
"""

from cloudfed.errors import ProtectionError
from cloudfed.protection.envelope import (
    SealContext,
    open_sealed,
    open_sealed_into,
    open_sealed_with_metadata,
    read_public_header,
    seal,
    sealed_length,
)
from cloudfed.protection.keys import KeyPairs, PublicKeyBundle, load_or_create_keys

__all__ = [
    "KeyPairs",
    "ProtectionError",
    "PublicKeyBundle",
    "SealContext",
    "load_or_create_keys",
    "open_sealed",
    "open_sealed_into",
    "open_sealed_with_metadata",
    "read_public_header",
    "seal",
    "sealed_length",
]
