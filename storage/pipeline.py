"""Tables for user search spaces and pipeline stages, stored next to Optuna's tables.

The tables live in their own :data:`metadata` with a ``jethpo_`` prefix, so they never
collide with Optuna's schema or its Alembic migrations. Every function takes the
SQLAlchemy engine of the storage, e.g. ``open_storage(url).engine``.
"""

from __future__ import annotations

import enum
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import (
    JSON,
    CheckConstraint,
    Column,
    DateTime,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from storage.locks import schema_lock

__all__ = [
    "SpaceConflictError",
    "Stage",
    "StageNotFoundError",
    "StageState",
    "claim_stage",
    "create_tables",
    "finish_stage",
    "get_outputs",
    "get_stages",
    "load_spaces",
    "metadata",
    "outputs_table",
    "reclaim_stage",
    "release_stages",
    "reset_stages",
    "save_space",
    "set_output",
    "spaces_table",
    "stages_table",
    "touch_stage",
    "upsert_stage",
]

logger = logging.getLogger(__name__)


class StageState(enum.StrEnum):
    """Lifecycle of a pipeline stage: pending -> running -> done or failed."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


metadata = MetaData()
"""Metadata of the jethpo tables, separate from Optuna's."""

spaces_table = Table(
    "jethpo_spaces",
    metadata,
    Column("name", String(255), primary_key=True),
    Column("yaml", Text, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
"""Search spaces added by users: the YAML text as given and its SHA-256 hex digest."""

stages_table = Table(
    "jethpo_stages",
    metadata,
    Column("pipeline", String(255), nullable=False),
    Column("stage", String(255), nullable=False),
    # Optuna indexes study names up to 512 characters
    Column("study_name", String(512), nullable=False),
    Column("family", String(64), nullable=False),
    Column("depends_on", JSON, nullable=False),
    Column("state", String(16), nullable=False),
    Column("claimed_by", String(255), nullable=True),
    Column("claimed_at", DateTime(timezone=True), nullable=True),
    Column("checkpoint", Text, nullable=True),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("pipeline", "stage", name="jethpo_stages_pkey"),
    CheckConstraint(
        "state IN ({})".format(", ".join(f"'{state.value}'" for state in StageState)),
        name="jethpo_stages_state_check",
    ),
)
"""Pipeline stages, one row per (pipeline, stage), with the worker that claimed each."""

outputs_table = Table(
    "jethpo_outputs",
    metadata,
    Column("pipeline", String(255), nullable=False),
    Column("stage", String(255), nullable=False),
    Column("payload", JSON, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("pipeline", "stage", name="jethpo_outputs_pkey"),
)
"""Output of each finished pipeline step: artifact ids, metrics, or the reason it failed."""


class SpaceConflictError(ValueError):
    """Search space name that is already stored with different YAML text."""

    def __init__(self, name: str, stored_sha256: str, new_sha256: str) -> None:
        super().__init__(
            f"Search space {name!r} already exists in the storage with different content "
            f"(stored sha256 {stored_sha256[:12]}, new sha256 {new_sha256[:12]}). "
            f"Give the new search space another name."
        )
        self.name = name
        self.stored_sha256 = stored_sha256
        self.new_sha256 = new_sha256


class StageNotFoundError(LookupError):
    """Pipeline stage that has no row in ``jethpo_stages``."""

    def __init__(self, pipeline: str, stage: str) -> None:
        super().__init__(
            f"Stage {stage!r} of pipeline {pipeline!r} not found in the storage. "
            f"Register it with upsert_stage first."
        )
        self.pipeline = pipeline
        self.stage = stage


@dataclass(frozen=True)
class Stage:
    """One row of ``jethpo_stages``. Timestamps are timezone-aware UTC."""

    pipeline: str
    stage: str
    study_name: str
    family: str
    depends_on: tuple[str, ...]
    state: StageState
    claimed_by: str | None
    claimed_at: datetime | None
    checkpoint: str | None
    updated_at: datetime


def create_tables(engine: Engine) -> None:
    """Create the jethpo tables that are missing, under the schema lock.

    Safe to call from many processes at once: ``storage.locks.schema_lock`` serialises
    the ``CREATE TABLE`` statements, and existing tables are left as they are.
    """
    with schema_lock(engine):
        metadata.create_all(engine, checkfirst=True)


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _as_utc(value: datetime | None) -> datetime | None:
    # SQLite returns naive datetimes, and every value written here is UTC
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)


def save_space(engine: Engine, name: str, text: str) -> bool:
    """Insert a search space, keyed by name.

    Args:
        engine: Engine of the storage.
        name: Search space name.
        text: YAML text of the search space, stored byte for byte.

    Returns:
        ``True`` if the space was inserted, ``False`` if a space with this name and the
        identical text was already stored.

    Raises:
        SpaceConflictError: A space with this name is stored with different text.
    """
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    row = {"name": name, "yaml": text, "sha256": digest, "created_at": _utc_now()}
    try:
        with engine.begin() as connection:
            connection.execute(insert(spaces_table).values(**row))
    except IntegrityError:
        with engine.connect() as connection:
            stored = connection.execute(
                select(spaces_table.c.sha256).where(spaces_table.c.name == name)
            ).scalar_one_or_none()
        if stored is None:
            raise
        if stored == digest:
            return False
        raise SpaceConflictError(name, stored, digest) from None

    logger.info("Saved search space %r (sha256 %s)", name, digest[:12])
    return True


def load_spaces(engine: Engine) -> dict[str, str]:
    """Return every stored search space as ``{name: YAML text}``, sorted by name."""
    with engine.connect() as connection:
        rows = connection.execute(
            select(spaces_table.c.name, spaces_table.c.yaml).order_by(spaces_table.c.name)
        ).all()
    return {row.name: row.yaml for row in rows}


def _dialect_insert(engine: Engine):
    if engine.dialect.name == "postgresql":
        return postgresql.insert
    if engine.dialect.name == "sqlite":
        return sqlite.insert
    raise NotImplementedError(
        f"Upserting stages needs PostgreSQL or SQLite, not {engine.dialect.name!r}."
    )


def upsert_stage(
    engine: Engine,
    pipeline: str,
    stage: str,
    *,
    study_name: str,
    family: str,
    depends_on: Sequence[str] = (),
) -> None:
    """Insert a stage as pending, or update the definition of an existing one.

    An existing stage keeps its state, claim and checkpoint, so registering the same
    pipeline again does not rerun stages that are done.

    Args:
        engine: Engine of the storage.
        pipeline: Pipeline name.
        stage: Stage name, unique within the pipeline.
        study_name: Optuna study that the stage runs.
        family: Model family of the study, e.g. ``convae-gen``.
        depends_on: Names of the stages of the same pipeline that must be done first.
    """
    now = _utc_now()
    definition = {"study_name": study_name, "family": family, "depends_on": list(depends_on)}
    statement = _dialect_insert(engine)(stages_table).values(
        pipeline=pipeline,
        stage=stage,
        state=StageState.PENDING.value,
        updated_at=now,
        **definition,
    )
    statement = statement.on_conflict_do_update(
        index_elements=[stages_table.c.pipeline, stages_table.c.stage],
        set_={**definition, "updated_at": now},
    )
    with engine.begin() as connection:
        connection.execute(statement)


def get_stages(engine: Engine, pipeline: str) -> list[Stage]:
    """Return the stages of a pipeline sorted by stage name, or ``[]`` if it has none."""
    with engine.connect() as connection:
        rows = connection.execute(
            select(stages_table)
            .where(stages_table.c.pipeline == pipeline)
            .order_by(stages_table.c.stage)
        ).all()
    return [
        Stage(
            pipeline=row.pipeline,
            stage=row.stage,
            study_name=row.study_name,
            family=row.family,
            depends_on=tuple(row.depends_on),
            state=StageState(row.state),
            claimed_by=row.claimed_by,
            claimed_at=_as_utc(row.claimed_at),
            checkpoint=row.checkpoint,
            updated_at=_as_utc(row.updated_at),
        )
        for row in rows
    ]


def _stage_key(pipeline: str, stage: str):
    return (stages_table.c.pipeline == pipeline) & (stages_table.c.stage == stage)


def claim_stage(engine: Engine, pipeline: str, stage: str, owner: str) -> bool:
    """Move a pending stage to running on behalf of ``owner``.

    The claim is one ``UPDATE ... WHERE state = 'pending'``. On PostgreSQL a concurrent
    claimer waits for the first one's row lock and then finds the state changed, and
    SQLite runs one writer at a time, so exactly one of several concurrent claims
    succeeds.

    Args:
        engine: Engine of the storage.
        pipeline: Pipeline name.
        stage: Stage name.
        owner: Identifier of the claimer, e.g. host name and process id.

    Returns:
        ``True`` if this call claimed the stage, ``False`` if the stage is missing or
        was not pending.
    """
    now = _utc_now()
    statement = (
        update(stages_table)
        .where(_stage_key(pipeline, stage) & (stages_table.c.state == StageState.PENDING.value))
        .values(state=StageState.RUNNING.value, claimed_by=owner, claimed_at=now, updated_at=now)
    )
    with engine.begin() as connection:
        claimed = connection.execute(statement).rowcount == 1

    if claimed:
        logger.info("Stage %r of pipeline %r claimed by %s", stage, pipeline, owner)
    return claimed


def finish_stage(
    engine: Engine,
    pipeline: str,
    stage: str,
    state: StageState | str,
    checkpoint: str | None = None,
    *,
    owner: str | None = None,
) -> bool:
    """Set a stage to done or failed, and record its checkpoint if one is given.

    Args:
        engine: Engine of the storage.
        pipeline: Pipeline name.
        stage: Stage name.
        state: ``done`` or ``failed``.
        checkpoint: Artifact path or id of the stage's result. ``None`` keeps the
            stored checkpoint.
        owner: If given, the stage is finished only while ``owner`` has its claim, so a
            claimer whose stage was reclaimed after a stall cannot finish it.

    Returns:
        Whether the stage was finished. Only False when ``owner`` lost the claim.

    Raises:
        ValueError: ``state`` is not ``done`` or ``failed``.
        StageNotFoundError: The stage is not stored.
    """
    final_states = (StageState.DONE, StageState.FAILED)
    if state not in final_states:
        raise ValueError(
            f"Invalid final state {state!r} for stage {stage!r} of pipeline {pipeline!r}: "
            f"expected 'done' or 'failed'."
        )

    values: dict[str, object] = {"state": StageState(state).value, "updated_at": _utc_now()}
    if checkpoint is not None:
        values["checkpoint"] = checkpoint
    condition = _stage_key(pipeline, stage)
    if owner is not None:
        condition = condition & (stages_table.c.claimed_by == owner)
    with engine.begin() as connection:
        result = connection.execute(update(stages_table).where(condition).values(**values))
    if result.rowcount == 0:
        if owner is not None and any(row.stage == stage for row in get_stages(engine, pipeline)):
            logger.warning("Stage %r of pipeline %r was reclaimed from %s before it finished", stage, pipeline, owner)
            return False
        raise StageNotFoundError(pipeline, stage)

    logger.info("Stage %r of pipeline %r finished as %s", stage, pipeline, StageState(state).value)
    return True


def touch_stage(engine: Engine, pipeline: str, stage: str, owner: str) -> bool:
    """Record that the claimer of a running stage is alive, by setting ``updated_at`` to now.

    Returns:
        Whether ``owner`` still has the claim of the running stage.
    """
    statement = (
        update(stages_table)
        .where(
            _stage_key(pipeline, stage)
            & (stages_table.c.state == StageState.RUNNING.value)
            & (stages_table.c.claimed_by == owner)
        )
        .values(updated_at=_utc_now())
    )
    with engine.begin() as connection:
        return connection.execute(statement).rowcount == 1


def reclaim_stage(engine: Engine, pipeline: str, stage: str, owner: str, stale_before: datetime) -> bool:
    """Take over a running stage whose claimer stopped touching it before ``stale_before``.

    Like :func:`claim_stage`, this is one conditional UPDATE, so of several processes that
    find the same stale stage exactly one takes it over.

    Args:
        engine: Engine of the storage.
        pipeline: Pipeline name.
        stage: Stage name.
        owner: The new claimer.
        stale_before: Timezone-aware time; the stage's ``updated_at`` must be older.

    Returns:
        Whether this call took the stage over.
    """
    now = _utc_now()
    statement = (
        update(stages_table)
        .where(
            _stage_key(pipeline, stage)
            & (stages_table.c.state == StageState.RUNNING.value)
            & (stages_table.c.updated_at < stale_before)
        )
        .values(claimed_by=owner, claimed_at=now, updated_at=now)
    )
    with engine.begin() as connection:
        taken = connection.execute(statement).rowcount == 1
    if taken:
        logger.info("Stage %r of pipeline %r reclaimed by %s after its claimer stopped", stage, pipeline, owner)
    return taken


def release_stages(engine: Engine, pipeline: str, owners: Sequence[str]) -> list[tuple[str, str]]:
    """Set the running stages claimed by any of ``owners`` back to pending and drop the claims.

    Meant for claimers that stopped for good, such as the workers of an interrupted run. The
    next claimer then takes a released stage at once, instead of waiting for the grace
    period that :func:`reclaim_stage` needs. Each stage is released only while one of ``owners`` still
    has its claim, so a stage that another process reclaimed in the meantime keeps its claimer.

    Args:
        engine: Engine of the storage.
        pipeline: Pipeline name.
        owners: Claimers whose stages are released, as in :func:`claim_stage`.

    Returns:
        ``(stage, owner)`` for each stage released.
    """
    if not owners:
        return []
    running = (stages_table.c.pipeline == pipeline) & (stages_table.c.state == StageState.RUNNING.value)
    released = []
    with engine.begin() as connection:
        claimed = connection.execute(
            select(stages_table.c.stage, stages_table.c.claimed_by).where(
                running & stages_table.c.claimed_by.in_(list(owners))
            )
        ).all()
        for row in claimed:
            statement = (
                update(stages_table)
                .where(running & (stages_table.c.stage == row.stage) & (stages_table.c.claimed_by == row.claimed_by))
                .values(state=StageState.PENDING.value, claimed_by=None, claimed_at=None, updated_at=_utc_now())
            )
            if connection.execute(statement).rowcount == 1:
                released.append((row.stage, row.claimed_by))

    for stage, owner in released:
        logger.info("Stage %r of pipeline %r is pending again because its claimer %s stopped", stage, pipeline, owner)
    return released


def reset_stages(engine: Engine, pipeline: str, stages: Sequence[str]) -> int:
    """Set stages back to pending and drop their claims, so that they run again.

    Returns:
        The number of stages reset.
    """
    if not stages:
        return 0
    statement = (
        update(stages_table)
        .where((stages_table.c.pipeline == pipeline) & stages_table.c.stage.in_(list(stages)))
        .values(state=StageState.PENDING.value, claimed_by=None, claimed_at=None, updated_at=_utc_now())
    )
    with engine.begin() as connection:
        return connection.execute(statement).rowcount


def set_output(engine: Engine, pipeline: str, stage: str, payload: dict) -> None:
    """Store what a step produced, replacing an earlier output of the same step.

    Args:
        engine: Engine of the storage.
        pipeline: Pipeline name.
        stage: Step name, such as ``retrain:convae-gen``.
        payload: JSON-serialisable dict: artifact ids, metrics, or ``{"error": message}``.
    """
    now = _utc_now()
    statement = _dialect_insert(engine)(outputs_table).values(
        pipeline=pipeline, stage=stage, payload=payload, updated_at=now
    )
    statement = statement.on_conflict_do_update(
        index_elements=[outputs_table.c.pipeline, outputs_table.c.stage],
        set_={"payload": payload, "updated_at": now},
    )
    with engine.begin() as connection:
        connection.execute(statement)


def get_outputs(engine: Engine, pipeline: str) -> dict[str, dict]:
    """Return the stored outputs of a pipeline's steps as ``{step name: payload}``."""
    with engine.connect() as connection:
        rows = connection.execute(
            select(outputs_table.c.stage, outputs_table.c.payload).where(outputs_table.c.pipeline == pipeline)
        ).all()
    return {row.stage: dict(row.payload) for row in rows}
