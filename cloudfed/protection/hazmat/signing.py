"""Ed25519 signatures.

.. danger::
   Hazardous materials: do not use directly; use ``cloudfed.protection``. A signature only means
   something when the signed message is unambiguous (domain-separated, length-prefixed); the
   envelope recipe builds such messages.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGNATURE_SIZE = 64


def sign(private: Ed25519PrivateKey, message: bytes) -> bytes:
    """Deterministic Ed25519 signature (RFC 8032), so no nonce can be reused by mistake."""
    return private.sign(message)


def verify(public: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    """Return a boolean rather than raise, so callers choose their own opaque error."""
    try:
        public.verify(signature, message)
    except InvalidSignature:
        return False
    return True
