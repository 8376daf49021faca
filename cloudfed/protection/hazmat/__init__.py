"""Low-level primitives behind `cloudfed.protection`.

.. danger::
   Hazardous materials: do not use directly; use ``cloudfed.protection``. These functions assume
   the caller already guarantees fresh keys, unique nonces and authenticated associated data;
   misuse silently breaks confidentiality or integrity. Steps and pipelines never import this.
"""
