"""Shared fixtures: Pythia 8 jets made once per session, and throwaway PostgreSQL databases
on the local test server.

The admin URL is ``postgresql://postgres@127.0.0.1:5432/postgres`` unless the environment
variable ``JETHPO_TEST_POSTGRES`` names another one. When the server cannot be reached,
tests that need it are skipped, except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest
import sqlalchemy
import sqlalchemy.exc
from sqlalchemy.engine import URL, make_url

ADMIN_URL_ENV_VAR = "JETHPO_TEST_POSTGRES"
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def _admin_url() -> URL:
    url = make_url(os.environ.get(ADMIN_URL_ENV_VAR) or DEFAULT_ADMIN_URL)
    # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, which is not installed
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg2")
    return url


def _admin_engine(admin_url: URL) -> sqlalchemy.Engine:
    return sqlalchemy.create_engine(
        admin_url,
        isolation_level="AUTOCOMMIT",
        poolclass=sqlalchemy.pool.NullPool,
        connect_args={"connect_timeout": 5},
    )


def _skip_or_fail(admin_url: URL, error: sqlalchemy.exc.DBAPIError) -> None:
    reason = str(error.orig).strip().splitlines()[0] if error.orig else str(error)
    message = (
        f"PostgreSQL test server {admin_url.render_as_string(hide_password=True)} is "
        f"unreachable ({reason}). Start it, or set {ADMIN_URL_ENV_VAR} to an admin URL."
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_admin_url() -> URL:
    """Admin URL of the PostgreSQL test server; skips or fails the test if it is down."""
    admin_url = _admin_url()
    engine = _admin_engine(admin_url)
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT 1"))
    except sqlalchemy.exc.DBAPIError as error:
        _skip_or_fail(admin_url, error)
    finally:
        engine.dispose()
    return admin_url


def _throwaway_database(admin_url: URL) -> Iterator[str]:
    name = f"jethpo_test_{secrets.token_hex(6)}"
    engine = _admin_engine(admin_url)
    quoted = engine.dialect.identifier_preparer.quote(name)
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text(f"CREATE DATABASE {quoted}"))
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        # workers and pools of the test may still be connected, and DROP DATABASE
        # fails while any session uses the database
        with engine.connect() as connection:
            connection.execute(
                sqlalchemy.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": name},
            )
            connection.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {quoted}"))
        engine.dispose()


@pytest.fixture(scope="session")
def postgres_url(postgres_admin_url: URL) -> Iterator[str]:
    """URL of an empty database ``jethpo_test_<hex>`` shared by the whole test session.

    The URL names the psycopg2 driver and carries the admin password, if any. The
    database is dropped at the end of the session.
    """
    yield from _throwaway_database(postgres_admin_url)


@pytest.fixture(scope="module")
def module_postgres_url(postgres_admin_url: URL) -> Iterator[str]:
    """URL of an empty database of its own for one test module, dropped after the module."""
    yield from _throwaway_database(postgres_admin_url)


@pytest.fixture
def fresh_postgres_url(postgres_admin_url: URL) -> Iterator[str]:
    """URL of an empty database of its own for one test, dropped after the test."""
    yield from _throwaway_database(postgres_admin_url)


#: Jets made once per test session by ``pythia_jets``: enough for a 70/15/15 split with
#: a few hundred training jets, small enough to simulate in well under a minute.
PYTHIA_TEST_JETS = 600


@pytest.fixture(scope="session")
def pythia_jets(tmp_path_factory: pytest.TempPathFactory):
    """Real gluon jets from ``jethpo data generate``'s code, read back with ``read_jets``."""
    from models.data import read_jets
    from models.generate import generate_jets

    out_dir = tmp_path_factory.mktemp("pythia")
    path = generate_jets(PYTHIA_TEST_JETS, out_dir, seed=11, workers=2, chunk_size=300)
    return read_jets(path)
