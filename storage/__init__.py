"""Storage URLs, Optuna RDB storage settings and the pipeline tables."""

from storage.pipeline import (
    SpaceConflictError,
    Stage,
    StageNotFoundError,
    StageState,
    claim_stage,
    create_tables,
    finish_stage,
    get_stages,
    load_spaces,
    save_space,
    upsert_stage,
)
from storage.rdb import open_storage, record_heartbeats, schema_head, set_trial_user_attrs
from storage.urls import StorageError, StorageNotFoundError, mask_password, parse_storage_url, resolve_storage_url

__all__ = [
    "SpaceConflictError",
    "Stage",
    "StageNotFoundError",
    "StageState",
    "StorageError",
    "StorageNotFoundError",
    "claim_stage",
    "create_tables",
    "finish_stage",
    "get_stages",
    "load_spaces",
    "mask_password",
    "open_storage",
    "parse_storage_url",
    "record_heartbeats",
    "resolve_storage_url",
    "schema_head",
    "save_space",
    "set_trial_user_attrs",
    "upsert_stage",
]
