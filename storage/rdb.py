"""Optuna RDB storage on PostgreSQL or SQLite with heartbeats, retries and a schema lock."""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import sqlalchemy.exc
import sqlalchemy.pool
from sqlalchemy.dialects import postgresql as sqlalchemy_postgresql
from sqlalchemy.dialects import sqlite as sqlalchemy_sqlite
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

from storage.locks import schema_lock, sqlite_database_path
from storage.pipeline import metadata as jethpo_metadata
from storage.urls import STORAGE_ENV_VAR, StorageError, StorageNotFoundError, describe_database_error, mask_password
from storage.urls import parse_storage_url

try:
    from optuna.storages import RetryHeartbeatStaleTrialCallback as _RetryCallback

    _STALE_CALLBACK_ARGUMENT = "heartbeat_stale_trial_callback"
except ImportError:
    # Optuna before 4.9 names the same callback and argument after "failed trials"
    from optuna.storages import RetryFailedTrialCallback as _RetryCallback

    _STALE_CALLBACK_ARGUMENT = "failed_trial_callback"

__all__ = [
    "missing_sqlite_file",
    "open_storage",
    "read_study_user_attrs",
    "record_heartbeats",
    "schema_head",
    "set_trial_user_attrs",
]

logger = logging.getLogger(__name__)

_UPSERT_DIALECTS = {"postgresql": sqlalchemy_postgresql.insert, "sqlite": sqlalchemy_sqlite.insert}
"""INSERT constructs with ON CONFLICT, for the databases that jethpo supports."""

_ALEMBIC_VERSION_TABLE = "alembic_version"
"""Table that Optuna stamps last when it creates its schema."""

_head_revisions: dict[str, str] = {}
"""Alembic head revision of Optuna's storage schema by Optuna version, once this process read it."""


def open_storage(
    url: str,
    *,
    heartbeat_interval: int | None = 60,
    grace_period: int | None = None,
    failed_trial_max_retry: int | None = 3,
    pool_size: int = 2,
    max_overflow: int = 2,
    connect_timeout: int = 10,
    sqlite_busy_timeout: float = 60.0,
    must_exist: bool = False,
    known_head: tuple[str, str] | None = None,
) -> optuna.storages.RDBStorage:
    """Open the Optuna storage at ``url``, creating Optuna's and jethpo's tables if missing.

    Each process gets a small connection pool. On PostgreSQL it is an
    :class:`IdlePingPool`, which tests a connection that rested for a second before using
    it, so connections that the server dropped, say in a restart, are replaced. On SQLite
    ``pool_pre_ping`` tests every one. When the schema is incomplete, a
    lock shared by all jethpo processes (``storage.locks.schema_lock``) serialises its
    creation, so many workers can start at once on an empty database. A complete schema
    is opened without the lock.

    A trial whose heartbeat is older than ``grace_period`` is marked FAIL by
    ``optuna.storages.fail_stale_trials``, and the retry callback then adds a WAITING
    copy with the same parameters. ``Study.optimize`` records heartbeats and calls
    ``fail_stale_trials`` before each trial. Code that uses ``ask`` and ``tell`` has to
    call ``fail_stale_trials`` before ``ask`` and wrap each trial in
    :func:`record_heartbeats`.

    On SQLite the database is switched to WAL journal mode, which lets readers such as
    optuna-dashboard run alongside one writer, and every connection waits up to
    ``sqlite_busy_timeout`` seconds for the write lock instead of failing with
    "database is locked". WAL mode is stored in the database file, and the busy timeout
    is a connect argument, so both survive pickling the storage to another process.

    Args:
        url: SQLAlchemy URL, ``postgresql://...`` or ``sqlite:///...``.
        heartbeat_interval: Seconds between heartbeats of a running trial, or ``None``
            to turn heartbeats off.
        grace_period: Seconds without a heartbeat after which a running trial is stale.
            ``None`` means twice ``heartbeat_interval`` (Optuna's default).
        failed_trial_max_retry: How many times a stale trial is re-queued, or ``None``
            for no limit. Unused when heartbeats are off.
        pool_size: Connections kept open per process.
        max_overflow: Extra connections a process may open at peak load.
        connect_timeout: PostgreSQL connection timeout in seconds.
        sqlite_busy_timeout: SQLite wait for a lock in seconds.
        must_exist: Raise StorageNotFoundError for a SQLite file that does not exist, or a
            database without Optuna's schema, instead of creating the storage, for commands
            that only read what a run stored. A mistyped path or database name then gets an
            error, not new tables.
        known_head: Optuna version and head revision of its schema, from
            :func:`schema_head` in another process. When the version is this process's,
            the database's revision is compared with that head, and Optuna's migration
            scripts are not read.

    Returns:
        The storage. Its ``engine`` attribute is the SQLAlchemy engine for
        ``storage.pipeline``.

    Raises:
        StorageError: The URL is invalid, the database cannot be reached or opened, or
            its schema was written by an incompatible Optuna version.
    """
    parsed = parse_storage_url(url)
    masked = mask_password(url)
    url = parsed.render_as_string(hide_password=False)
    engine_kwargs = _engine_kwargs(
        parsed,
        pool_size=pool_size,
        max_overflow=max_overflow,
        connect_timeout=connect_timeout,
        sqlite_busy_timeout=sqlite_busy_timeout,
    )
    if parsed.get_backend_name() == "sqlite":
        _check_sqlite_folder(parsed, masked, must_exist)

    storage_kwargs: dict[str, Any] = {
        "engine_kwargs": engine_kwargs,
        "heartbeat_interval": heartbeat_interval,
        "grace_period": grace_period,
    }
    if heartbeat_interval is not None:
        storage_kwargs[_STALE_CALLBACK_ARGUMENT] = _retry_callback(failed_trial_max_retry)

    probe: sqlalchemy.Engine | None = None
    try:
        # NullPool: the probe and lock connections close at once instead of idling in a pool
        probe = sqlalchemy.create_engine(
            url, poolclass=NullPool, connect_args=engine_kwargs["connect_args"]
        )
        if must_exist and not _has_optuna_schema(probe):
            raise StorageNotFoundError(
                f"Failed to open storage {masked!r}: no jethpo storage found in the database. Check the "
                f"database name in --storage or {STORAGE_ENV_VAR}, or start a search with 'jethpo run', "
                f"which creates the storage."
            )
        storage: optuna.storages.RDBStorage | None = None
        if not _schema_is_ready(probe):
            with schema_lock(probe):
                # another process may have finished the schema while this one waited
                if not _schema_is_ready(probe):
                    if probe.dialect.name == "sqlite":
                        _enable_wal(probe)
                    storage = _create_rdb_storage(
                        url, skip_table_creation=False, **storage_kwargs
                    )
                    jethpo_metadata.create_all(storage.engine, checkfirst=True)
                    logger.info("Created the storage schema in %s", masked)
        if storage is None:
            storage = _create_rdb_storage(url, skip_table_creation=True, **storage_kwargs)
        _check_schema_version(storage, masked, known_head)
    except (sqlalchemy.exc.DBAPIError, optuna.exceptions.StorageInternalError) as error:
        # Optuna wraps SQLAlchemy errors in StorageInternalError, whose cause has the driver's text
        reason = describe_database_error(error.__cause__ or error, parsed.password)
        if parsed.get_backend_name() == "sqlite":
            action = "Check that the file is a SQLite database and that its folder is writable"
        else:
            action = (
                "Check that PostgreSQL is running and reachable, that the database exists "
                "and that the user name and password are right"
            )
        raise StorageError(
            f"Failed to open storage {masked!r}: {reason}. {action}, or pass another URL "
            f"with --storage or {STORAGE_ENV_VAR}."
        ) from None
    except ImportError as error:
        raise StorageError(
            f"Failed to open storage {masked!r}: the database driver is not installed "
            f"({error}). Leave the driver out of the URL to use psycopg2 for PostgreSQL."
        ) from None
    finally:
        if probe is not None:
            probe.dispose()

    if heartbeat_interval is None:
        logger.info("Opened storage %s with heartbeats off", masked)
    else:
        logger.info(
            "Opened storage %s (heartbeat interval %d s, grace period %d s, max retry %s)",
            masked,
            heartbeat_interval,
            grace_period if grace_period is not None else 2 * heartbeat_interval,
            failed_trial_max_retry,
        )
    return storage


def _create_rdb_storage(url: str, **kwargs: Any) -> optuna.storages.RDBStorage:
    # RDBStorage runs str.format on the URL to fill {SCHEMA_VERSION}, so doubled braces
    # keep a password that contains "{" or "}" intact
    template = url.replace("{", "{{").replace("}", "}}")
    with warnings.catch_warnings():
        # Optuna marks heartbeats experimental, and jethpo relies on them anyway
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(template, skip_compatibility_check=True, **kwargs)


def schema_head() -> tuple[str, str] | None:
    """Return the Optuna version and the head revision of its schema, once this process read them.

    :func:`open_storage` checks that a database's Alembic revision is the head revision of
    the installed Optuna, which Alembic finds by importing each of Optuna's migration
    scripts. A process that starts workers hands them this pair
    (``hpo.workers.WorkerSettings.schema_head``), so that each new worker process checks
    its database against it without importing the scripts. ``None`` before this process
    opened a storage.
    """
    version = optuna.__version__
    head = _head_revisions.get(version)
    return None if head is None else (version, head)


def _check_schema_version(
    storage: optuna.storages.RDBStorage, masked: str, known_head: tuple[str, str] | None
) -> None:
    # the same check as RDBStorage's own, with a one-line message that masks the password
    current = storage.get_current_version()
    version = optuna.__version__
    if known_head is not None and known_head[0] == version:
        head = known_head[1]
    else:
        head = _head_revisions.get(version) or storage.get_head_version()
        _head_revisions[version] = head
    if current == head:
        return

    if current in storage.get_all_versions():
        action = "Upgrade the schema with 'optuna storage upgrade --storage URL'"
    else:
        action = "Upgrade Optuna, because the schema was written by a newer version"
    storage.engine.dispose()
    raise StorageError(
        f"Failed to open storage {masked!r}: its Optuna schema revision is {current!r} but "
        f"Optuna {optuna.__version__} expects {head!r}. {action}, then retry."
    )


def _retry_callback(max_retry: int | None) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _RetryCallback(max_retry=max_retry)


PING_AFTER_IDLE_S = 1.0
"""Seconds a pooled PostgreSQL connection may rest before its next checkout pings the server."""


class IdlePingPool(sqlalchemy.pool.QueuePool):
    """Connection pool that tests a connection at checkout only after it rested a while.

    SQLAlchemy's ``pool_pre_ping`` sends ``SELECT 1`` at every checkout, and a worker checks
    out a connection 15 times per trial (``bench.orchestration``), mostly milliseconds apart. This pool
    pings only connections that rested at least :data:`PING_AFTER_IDLE_S`, which still
    finds the connections that a PostgreSQL restart broke while a trial trained. A failed
    ping raises ``DisconnectionError``, on which SQLAlchemy discards the connection and
    checks out a new one. The listeners belong to the class, so an engine rebuilt from
    ``engine_kwargs`` after pickling (``RDBStorage.__setstate__``) keeps them.
    """

    # SQLAlchemy names a pool's logger after its module, which would log this one at INFO
    # under "storage". Under "sqlalchemy" it stays at WARNING, as QueuePool's logger does.
    _sqla_logger_namespace = "sqlalchemy.pool.impl.IdlePingPool"


@sqlalchemy.event.listens_for(IdlePingPool, "checkin")
def _note_checkin(dbapi_connection: Any, record: Any) -> None:
    record.info["jethpo_checked_in"] = time.monotonic()


@sqlalchemy.event.listens_for(IdlePingPool, "checkout")
def _ping_if_rested(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    checked_in = record.info.get("jethpo_checked_in")
    # a connection opened for this checkout has no checkin time and needs no ping
    if checked_in is None or time.monotonic() - checked_in < PING_AFTER_IDLE_S:
        return
    try:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("SELECT 1")
        finally:
            cursor.close()
    except Exception as error:
        raise sqlalchemy.exc.DisconnectionError(f"the pooled connection failed a ping: {error}") from error


def _engine_kwargs(
    url: URL,
    *,
    pool_size: int,
    max_overflow: int,
    connect_timeout: int,
    sqlite_busy_timeout: float,
) -> dict[str, Any]:
    if url.get_backend_name() == "postgresql":
        return {
            "poolclass": IdlePingPool,
            "pool_size": pool_size,
            "max_overflow": max_overflow,
            "connect_args": {"connect_timeout": connect_timeout, "application_name": "jethpo"},
        }

    # sqlite3's timeout sets the connection's busy timeout (PRAGMA busy_timeout)
    kwargs: dict[str, Any] = {
        "pool_pre_ping": True,
        "connect_args": {"timeout": sqlite_busy_timeout},
    }
    # an in-memory database uses SingletonThreadPool, which has no overflow
    if sqlite_database_path(url) is not None:
        kwargs["pool_size"] = pool_size
        kwargs["max_overflow"] = max_overflow
    return kwargs


def missing_sqlite_file(url: str | URL) -> Path | None:
    """Return the file of a SQLite URL when it does not exist, else None.

    PostgreSQL URLs, in-memory SQLite databases and existing files give None.
    """
    parsed = parse_storage_url(url) if isinstance(url, str) else url
    if parsed.get_backend_name() != "sqlite":
        return None
    path = sqlite_database_path(parsed)
    if path is None or path.exists():
        return None
    return path


def _check_sqlite_folder(url: URL, masked: str, must_exist: bool) -> None:
    path = sqlite_database_path(url)
    if path is None:
        return
    if must_exist and missing_sqlite_file(url) is not None:
        raise StorageNotFoundError(
            f"Failed to open storage {masked!r}: database file not found. Check the path in --storage "
            f"or {STORAGE_ENV_VAR}, or start a search with 'jethpo run', which creates it."
        )
    if not path.parent.is_dir():
        raise StorageError(
            f"Failed to open storage {masked!r}: folder {str(path.parent)!r} does not exist. "
            f"Create it, or pass another URL with --storage or {STORAGE_ENV_VAR}."
        )


def _has_optuna_schema(engine: sqlalchemy.Engine) -> bool:
    with engine.connect() as connection:
        return _optuna_schema_stamped(connection)


def _optuna_schema_stamped(connection: sqlalchemy.Connection) -> bool:
    if not sqlalchemy.inspect(connection).has_table(_ALEMBIC_VERSION_TABLE):
        return False
    stamped = connection.execute(sqlalchemy.text(f"SELECT COUNT(*) FROM {_ALEMBIC_VERSION_TABLE}")).scalar_one()
    return stamped > 0


def _schema_is_ready(engine: sqlalchemy.Engine) -> bool:
    with engine.connect() as connection:
        inspector = sqlalchemy.inspect(connection)
        if not all(inspector.has_table(name) for name in jethpo_metadata.tables):
            return False
        if not _optuna_schema_stamped(connection):
            return False

        if connection.dialect.name == "sqlite" and sqlite_database_path(engine.url) is not None:
            journal_mode = connection.exec_driver_sql("PRAGMA journal_mode").scalar_one()
            return str(journal_mode).lower() == "wal"
        return True


def _enable_wal(engine: sqlalchemy.Engine) -> None:
    if sqlite_database_path(engine.url) is None:
        return
    with engine.connect() as connection:
        mode = connection.exec_driver_sql("PRAGMA journal_mode=WAL").scalar_one()
    if str(mode).lower() != "wal":
        logger.warning(
            "SQLite storage %s stays in %s journal mode because WAL could not be enabled "
            "(WAL needs a local file system); concurrent workers may hit 'database is locked'",
            engine.url,
            mode,
        )


def read_study_user_attrs(storage: optuna.storages.RDBStorage, study_names: list[str]) -> dict[str, dict[str, Any]]:
    """Read the user attributes of several studies with one query.

    ``get_study_id_from_name`` plus ``get_study_user_attrs`` cost two transactions per study,
    and a worker reads every stage's attributes before each trial.

    Args:
        storage: Storage returned by :func:`open_storage`.
        study_names: Names of the studies.

    Returns:
        The attributes by study name. A study that does not exist is left out; a study
        without attributes maps to ``{}``.
    """
    if not study_names:
        return {}
    # NOTE: Optuna's table models are private, but their schema is versioned with Alembic
    # and checked by _check_schema_version when the storage opens
    from optuna.storages._rdb import models

    studies = models.StudyModel.__table__
    attrs = models.StudyUserAttributeModel.__table__
    query = (
        sqlalchemy.select(studies.c.study_name, attrs.c.key, attrs.c.value_json)
        .select_from(studies.outerjoin(attrs, attrs.c.study_id == studies.c.study_id))
        .where(studies.c.study_name.in_(sorted(set(study_names))))
    )
    found: dict[str, dict[str, Any]] = {}
    with storage.engine.connect() as connection:
        for name, key, value_json in connection.execute(query):
            study_attrs = found.setdefault(name, {})
            if key is not None:
                study_attrs[key] = json.loads(value_json)
    return found


def set_trial_user_attrs(storage: optuna.storages.BaseStorage, trial_id: int, attrs: dict[str, Any]) -> None:
    """Store several user attributes of a RUNNING trial in one transaction.

    ``Trial.set_user_attr`` commits each attribute on its own, and on PostgreSQL every
    commit waits for the write-ahead log to reach the disk. A worker stores ten attributes
    per trial, so one transaction per group saves most of those waits. On PostgreSQL the
    transaction also turns ``synchronous_commit`` off for itself, so its commit does not
    wait for the disk. A server crash can lose it until the trial's next ordinary commit
    (its next parameter, report or ``tell``), which writes it to disk too. PostgreSQL
    never keeps half of such a transaction. Storages other than ``RDBStorage`` (or the cache
    that wraps one inside a study) get one call per attribute.

    Args:
        storage: The study's storage.
        trial_id: Storage id of the trial, ``trial._trial_id``.
        attrs: Attribute names and JSON-serializable values.

    Raises:
        optuna.exceptions.UpdateFinishedTrialError: The trial is already finished.
    """
    if not attrs:
        return
    # Study wraps an RDBStorage in a _CachedStorage, whose attribute writes go straight through
    rdb = getattr(storage, "_backend", storage)
    batched = isinstance(rdb, optuna.storages.RDBStorage) and hasattr(rdb, "_set_trial_attr_without_commit")
    if not batched:
        for key, value in attrs.items():
            storage.set_trial_user_attr(trial_id, key, value)
        return

    # NOTE: _create_scoped_session, _set_trial_attr_without_commit and the table models are
    # private. RDBStorage.set_trial_user_attr runs the same for one attribute (Optuna 5.1).
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    if rdb.engine.name not in _UPSERT_DIALECTS:
        with _create_scoped_session(rdb.scoped_session, True) as session:
            for key, value in attrs.items():
                rdb._set_trial_attr_without_commit(session, models.TrialUserAttributeModel, trial_id, key, value)
        return

    # Core and one cached statement: an ORM session and a multi-row VALUES compiled per call
    # cost about 1 ms more (bench.orchestration.earlier_trial_path keeps that version)
    trials = models.TrialModel.__table__
    rows = [{"trial_id": trial_id, "key": key, "value_json": json.dumps(value)} for key, value in attrs.items()]
    lookup = sqlalchemy.select(trials.c.state).where(trials.c.trial_id == trial_id)
    if rdb.engine.name == "postgresql":
        # set_config(..., true) acts as SET LOCAL and saves a round trip
        lookup = lookup.add_columns(sqlalchemy.func.set_config("synchronous_commit", "off", True))
    with rdb.engine.begin() as connection:
        state = connection.execute(lookup).scalar()
        if state is None:
            # the message of Optuna's own lookup
            raise KeyError(f"No trial with trial_id {trial_id} exists.")
        rdb.check_trial_is_updatable(trial_id, state)
        connection.execute(_user_attr_upsert(rdb.engine.name), rows)


@functools.cache
def _user_attr_upsert(dialect: str) -> sqlalchemy.Insert:
    from optuna.storages._rdb import models

    table = models.TrialUserAttributeModel.__table__
    upsert = _UPSERT_DIALECTS[dialect](table)
    return upsert.on_conflict_do_update(
        index_elements=[table.c.trial_id, table.c.key],
        set_={"value_json": upsert.excluded.value_json},
    )


@contextmanager
def record_heartbeats(storage: optuna.storages.RDBStorage, trial_id: int, *, beat_now: bool = True) -> Iterator[None]:
    """Record a trial's heartbeat at once and then every heartbeat interval until the block ends.

    ``Study.optimize`` does this itself. Use this context manager around a trial created
    with ``Study.ask``, so that the trial is marked FAIL and retried if the process dies
    before ``Study.tell``. Does nothing when the storage has heartbeats turned off.

    Args:
        storage: Storage returned by :func:`open_storage`.
        trial_id: Storage id of the trial, ``trial._trial_id`` (not ``trial.number``).
        beat_now: Record the first heartbeat on entry. ``optuna.storages.fail_stale_trials``
            skips trials without a heartbeat (Optuna 5.1), so leave this on unless every process
            that checks the study uses ``hpo.pipeline.fail_stale_trials``, which also fails
            trials that never beat once they are older than the grace period.
    """
    interval = storage.get_heartbeat_interval()
    if interval is None:
        yield
        return

    if beat_now:
        storage.record_heartbeat(trial_id)
    stop = threading.Event()
    thread = threading.Thread(
        target=_beat,
        args=(storage, trial_id, interval, stop),
        name=f"jethpo-heartbeat-{trial_id}",
        daemon=True,
    )
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _beat(
    storage: optuna.storages.RDBStorage, trial_id: int, interval: int, stop: threading.Event
) -> None:
    failures = 0
    while not stop.wait(interval):
        try:
            storage.record_heartbeat(trial_id)
            failures = 0
        except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as error:
            # a missed beat is harmless until the grace period has passed, so only the
            # first failure in a row and every tenth one after it are logged
            failures += 1
            if failures % 10 == 1:
                logger.warning(
                    "Failed to record the heartbeat of trial id %d (%d failures in a row): %s",
                    trial_id,
                    failures,
                    describe_database_error(error.__cause__ or error),
                )
