"""Artifact names, one enum, so steps, pipeline and tests agree on them."""

from enum import StrEnum


class Artifacts(StrEnum):
    FEDERATION_CONFIG = "federation_config"
    FEDERATION_PLAN = "federation_plan"
    DATASET_REF = "dataset_ref"
    LOCAL_UPDATE_REF = "local_update_ref"
    SECAGG_ADVERTS = "secagg_adverts"
    SEALED_UPDATE_REF = "sealed_update_ref"
    GLOBAL_ADAPTER_REF = "global_adapter_ref"
    AGGREGATE_REPORT = "aggregate_report"
    PARTY_EVAL = "party_eval"
    ROUND_ROW = "round_row"
    RUN_SUMMARY = "run_summary"
    COMPARISON_DATA = "comparison_data"
    ARM_RESULTS = "arm_results"
    COMPARISON_TABLE = "comparison_table"
