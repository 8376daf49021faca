"""Empirical privacy audits: does the final global model give away a party's training rows.

`canaries` is the secret-sharer test (Carlini et al. 2019): random secrets are planted in one
party's data, repeated 1..k times, and the final global model's preference for each planted
secret over random others is measured in bits of exposure, once without DP and once per DP-SGD
target epsilon. An audit that shows clear exposure without DP and chance-level exposure with it
is evidence that it can see memorisation and that DP-SGD removes it. Run it with
`python -m cloudfed.audit canaries -c configs/audit.yaml`.
"""

from cloudfed.audit.config import AuditConfig, load_audit_config

__all__ = ["AuditConfig", "load_audit_config"]
