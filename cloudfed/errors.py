"""User-facing error types.

Every error a user can fix by editing a file derives from `CloudfedError` and carries a message
that names the file, the field and the fix, so entry points can print it without a traceback.
"""

from __future__ import annotations


class CloudfedError(Exception):
    """An error whose message is meant for the person running the federation."""


class ConfigError(CloudfedError):
    """A run configuration or federation setting is invalid."""


class DataError(CloudfedError):
    """A party's raw data or its mapping cannot be harmonised."""


class ProtectionError(CloudfedError):
    """A sealed message failed verification or decryption.

    Deliberately opaque: the reason (bad tag, wrong key, wrong round) is not revealed to the caller
    beyond a short label, so the error cannot be used as an oracle.
    """


class StorageIntegrityError(ProtectionError):
    """Stored bytes do not match the sha256 written with them (truncated, altered, or foreign).

    A ProtectionError because readers already treat a rejected message that way (an upload that
    fails is a party that dropped), but not opaque: a digest mismatch is no decryption oracle, and
    the message names the object so that an operator can find it.
    """


class AggregationError(CloudfedError):
    """A round cannot be aggregated, e.g. fewer valid updates than `min_parties`."""


class SimulatedDropout(CloudfedError):
    """A party left the round on purpose (config `simulate_dropouts`), to rehearse recovery."""
