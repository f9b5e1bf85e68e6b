"""Lock that serialises first-time schema creation across worker processes."""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy.exc
from sqlalchemy import text
from sqlalchemy.engine import URL, Engine

__all__ = ["SCHEMA_LOCK_KEY", "schema_lock", "sqlite_database_path"]

logger = logging.getLogger(__name__)

SCHEMA_LOCK_KEY = int.from_bytes(b"jethpo", "big")
"""PostgreSQL advisory lock key, a fixed bigint that every jethpo process uses."""

SQLITE_LOCK_SUFFIX = ".schema-lock"
"""Suffix of the file, next to a SQLite database, that jethpo locks while creating tables."""


def sqlite_database_path(url: URL) -> Path | None:
    """Return the file of a SQLite URL, or ``None`` for an in-memory database."""
    database = url.database
    if not database or database == ":memory:" or url.query.get("mode") == "memory":
        return None
    if database.startswith("file:"):
        database = database.removeprefix("file:").split("?", 1)[0]
    return Path(database)


@contextmanager
def schema_lock(engine: Engine) -> Iterator[None]:
    """Hold a lock, shared by all jethpo processes on one database, while the block runs.

    On PostgreSQL the lock is the session-level advisory lock :data:`SCHEMA_LOCK_KEY`,
    taken on a connection of its own so that the block can create tables on other
    connections. PostgreSQL releases it when that connection closes, even if the process
    dies. On a SQLite file the lock is an exclusive ``flock`` on a file next to the
    database, which the kernel releases when the process exits. An in-memory SQLite
    database is private to one process and needs no lock.

    Args:
        engine: Engine of the storage database.
    """
    dialect = engine.dialect.name
    if dialect == "postgresql":
        with _advisory_lock(engine):
            yield
    elif dialect == "sqlite":
        with _file_lock(engine.url):
            yield
    else:
        # NOTE: only PostgreSQL and SQLite reach this module (see storage.urls), so other
        # dialects run unlocked.
        yield


@contextmanager
def _advisory_lock(engine: Engine) -> Iterator[None]:
    connection = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    try:
        logger.debug("Waiting for advisory lock %d on %s", SCHEMA_LOCK_KEY, engine.url)
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
        try:
            yield
        finally:
            _release_advisory_lock(connection)
    finally:
        connection.close()


def _release_advisory_lock(connection: sqlalchemy.Connection) -> None:
    try:
        connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": SCHEMA_LOCK_KEY})
    except sqlalchemy.exc.DBAPIError as error:
        # closing the database session releases the lock, so drop the connection
        # instead of returning it to the pool still locked
        logger.warning(
            "Failed to release advisory lock %d, closing its connection instead: %s",
            SCHEMA_LOCK_KEY,
            error.orig,
        )
        connection.invalidate()


@contextmanager
def _file_lock(url: URL) -> Iterator[None]:
    database = sqlite_database_path(url)
    if database is None:
        yield
        return

    lock_path = database.with_name(database.name + SQLITE_LOCK_SUFFIX)
    with open(lock_path, "a") as lock_file:
        logger.debug("Waiting for file lock %s", lock_path)
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
