"""A party's key rotation statement: "party X rotates from fingerprint A to B", signed by A.

The statement travels over the untrusted exchange and inside the coordinator's keys roster, so
what makes it believable is only its signatures: the OLD signing key (the one every peer pinned)
vouches for the new bundle, and the new signing key proves its holder has the new private key (no
one can claim another party's public key). A reader still checks the old fingerprint against its
own pin; a statement signed by any other key is worth nothing.
"""

from __future__ import annotations

import base64
import binascii
import json

from cryptography.exceptions import InvalidSignature
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cloudfed.errors import ProtectionError
from cloudfed.federation import PARTY_NAME_PATTERN
from cloudfed.protection.keys import KeyPairs, PublicKeyBundle

_DOMAIN = b"cloudfed/key-rotation/v1\n"


class RotationStatement(BaseModel):
    """Old and new public bundles of one party, signed by both signing keys."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    party: str = Field(pattern=PARTY_NAME_PATTERN)
    old: PublicKeyBundle
    new: PublicKeyBundle
    old_signature: str
    new_signature: str

    @model_validator(mode="after")
    def _same_owner(self) -> RotationStatement:
        for bundle in (self.old, self.new):
            if bundle.role != "party" or bundle.name != self.party:
                raise ValueError("rotation statement: a bundle is not this party's")
        if self.old.fingerprint == self.new.fingerprint:
            raise ValueError("rotation statement: the new key is the old key")
        return self

    def verify(self) -> RotationStatement:
        """Both signatures hold; raises ProtectionError otherwise. Pins are the reader's check."""
        body = _body(self.party, self.old, self.new)
        for bundle, sig in ((self.old, self.old_signature), (self.new, self.new_signature)):
            try:
                bundle.ed25519_key().verify(base64.b64decode(sig, validate=True), body)
            except (InvalidSignature, binascii.Error, ValueError):
                raise ProtectionError(
                    f"rotation statement of {self.party} rejected: not signed by the key of "
                    f"fingerprint {bundle.fingerprint[:16]}..."
                ) from None
        return self


def _body(party: str, old: PublicKeyBundle, new: PublicKeyBundle) -> bytes:
    doc = {"party": party, "old": old.model_dump(), "new": new.model_dump()}
    return _DOMAIN + json.dumps(doc, sort_keys=True).encode()


def sign_rotation(old: KeyPairs, new: KeyPairs) -> RotationStatement:
    if old.role != "party" or new.role != "party" or old.name != new.name:
        raise ValueError("a rotation statement is one party's, from its old keys to its new keys")
    old_b, new_b = old.public_bundle(), new.public_bundle()
    body = _body(old.name, old_b, new_b)
    return RotationStatement(
        party=old.name,
        old=old_b,
        new=new_b,
        old_signature=base64.b64encode(old.ed25519.sign(body)).decode("ascii"),
        new_signature=base64.b64encode(new.ed25519.sign(body)).decode("ascii"),
    )


def parse_rotation(data: bytes | str | dict) -> RotationStatement:
    """A verified statement from bytes or a roster's dict; ProtectionError if anything is off."""
    try:
        if isinstance(data, dict):
            statement = RotationStatement.model_validate(data)
        else:
            statement = RotationStatement.model_validate_json(data)
    except ValueError as exc:
        raise ProtectionError(f"rotation statement rejected: malformed ({exc})") from None
    return statement.verify()
