"""Storage URLs, Optuna RDB storage on PostgreSQL and SQLite, and the pipeline tables.

Every test runs against a real PostgreSQL database (from the fixtures in conftest.py) or
a real SQLite file under pytest's tmp_path.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import logging
import pickle
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
import warnings
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from storage import (
    SpaceConflictError,
    StageNotFoundError,
    StageState,
    StorageError,
    claim_stage,
    create_tables,
    finish_stage,
    get_stages,
    load_spaces,
    mask_password,
    open_storage,
    parse_storage_url,
    record_heartbeats,
    resolve_storage_url,
    save_space,
    schema_head,
    set_trial_user_attrs,
    upsert_stage,
)
from storage.rdb import PING_AFTER_IDLE_S, IdlePingPool, read_study_user_attrs
from storage.urls import STORAGE_ENV_VAR

DASHBOARD = Path(sys.executable).with_name("optuna-dashboard")

pytestmark = [
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
    # Study.ask warns when heartbeats are on, and these tests cover ask with record_heartbeats
    pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used"),
]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'jethpo.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def any_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jethpo.db'}"
    return request.getfixturevalue("postgres_url")


# storage URL resolution


def test_resolve_explicit_url_beats_env(monkeypatch, tmp_path):
    monkeypatch.setenv(STORAGE_ENV_VAR, "postgresql://env-host/jethpo")

    url = resolve_storage_url("postgresql://flag-host/jethpo", tmp_path)

    assert url == "postgresql://flag-host/jethpo"


def test_resolve_env_beats_default(monkeypatch, tmp_path):
    monkeypatch.setenv(STORAGE_ENV_VAR, "postgresql://env-host/jethpo")

    assert resolve_storage_url(None, tmp_path) == "postgresql://env-host/jethpo"
    assert resolve_storage_url("", tmp_path) == "postgresql://env-host/jethpo"


def test_resolve_default_is_sqlite_in_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(STORAGE_ENV_VAR, "")
    data_dir = tmp_path / "data" / "nested"

    url = resolve_storage_url(None, data_dir)

    assert url == f"sqlite:///{data_dir.resolve()}/jethpo.db"
    assert url.startswith("sqlite:////")
    assert data_dir.is_dir()


def test_resolve_relative_data_dir_becomes_absolute(monkeypatch, tmp_path):
    monkeypatch.delenv(STORAGE_ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)

    url = resolve_storage_url(None, Path("relative-data"))

    assert url == f"sqlite:///{tmp_path.resolve()}/relative-data/jethpo.db"


def test_parse_pins_psycopg2_driver():
    parsed = parse_storage_url("postgresql://user:secret@db:5432/jethpo")

    assert parsed.drivername == "postgresql+psycopg2"
    assert parsed.password == "secret"
    assert parse_storage_url("sqlite:////tmp/x.db").drivername == "sqlite"


# password masking


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://user:secret@127.0.0.1:1/db", "postgresql://user:***@127.0.0.1:1/db"),
        ("postgresql+psycopg2://u:secret@h/db", "postgresql+psycopg2://u:***@h/db"),
        ("postgresql://user:s%40cret@h/db", "postgresql://user:***@h/db"),
        ("postgresql://user:secret@with@h/db", "postgresql://user:***@h/db"),
        (
            "postgresql://h/db?password=secret&sslmode=require",
            "postgresql://h/db?password=***&sslmode=require",
        ),
        ("postgresql://user@h/db", "postgresql://user@h/db"),
        ("sqlite:////data/jethpo.db", "sqlite:////data/jethpo.db"),
        ("user:secret@h", "user:***@h"),
        ("://u:secret@h/db", "://u:***@h/db"),
        ("host=h password=secret", "host=h password=***"),
    ],
)
def test_mask_password(url, expected):
    masked = mask_password(url)

    assert masked == expected
    assert "secret" not in masked


def test_mask_password_of_parsed_url():
    parsed = parse_storage_url("postgresql://user:secret@h/db")

    assert mask_password(parsed) == "postgresql+psycopg2://user:***@h/db"


# errors: one line, password masked, no library traceback


def assert_clean_error(error: StorageError) -> str:
    message = str(error)
    assert "secret" not in message
    assert "\n" not in message
    assert "Traceback" not in message
    assert error.__cause__ is None
    # a printed traceback would show the library error that was translated
    assert error.__context__ is None or error.__suppress_context__
    return message


def test_refused_connection_is_storage_error():
    with pytest.raises(StorageError) as caught:
        open_storage("postgresql://user:secret@127.0.0.1:1/db", connect_timeout=3)

    message = assert_clean_error(caught.value)
    assert "postgresql://user:***@127.0.0.1:1/db" in message
    assert "Connection refused" in message
    assert "--storage" in message


def test_unknown_database_is_storage_error(postgres_url):
    missing = sqlalchemy.make_url(postgres_url).set(database="jethpo_no_such_database")

    with pytest.raises(StorageError) as caught:
        open_storage(missing.render_as_string(hide_password=False))

    message = assert_clean_error(caught.value)
    assert 'database "jethpo_no_such_database" does not exist' in message


def test_unknown_role_is_storage_error(postgres_url):
    wrong_user = sqlalchemy.make_url(postgres_url).set(
        username="jethpo_no_such_role", password="secret"
    )

    with pytest.raises(StorageError) as caught:
        open_storage(wrong_user.render_as_string(hide_password=False))

    message = assert_clean_error(caught.value)
    assert "jethpo_no_such_role:***@" in message
    assert 'role "jethpo_no_such_role" does not exist' in message


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("not a url", "Invalid storage URL"),
        ("mysql://u:secret@h/db", "dialect 'mysql' is not one of postgresql, sqlite"),
        ("postgresql+nosuchdriver://u:secret@h/db", "no driver 'nosuchdriver'"),
        ("postgresql+pg8000://u:secret@h/db", "driver is not installed"),
        ("postgresql://u:secret@127.0.0.1:5432", "it names no database. Add the database name after the port"),
        ("postgresql://u:secret@127.0.0.1:5432/", "it names no database"),
    ],
)
def test_bad_url_is_storage_error(url, expected):
    with pytest.raises(StorageError) as caught:
        open_storage(url)

    message = assert_clean_error(caught.value)
    assert expected in message


def test_missing_sqlite_folder_is_storage_error(tmp_path):
    url = f"sqlite:///{tmp_path / 'absent' / 'jethpo.db'}"

    with pytest.raises(StorageError) as caught:
        open_storage(url)

    message = assert_clean_error(caught.value)
    assert "does not exist" in message
    assert not (tmp_path / "absent").exists()


def test_outdated_schema_is_storage_error(sqlite_url):
    storage = open_storage(sqlite_url)
    old_revision = storage.get_all_versions()[1]
    with storage.engine.begin() as connection:
        connection.execute(
            sqlalchemy.text("UPDATE alembic_version SET version_num = :old"), {"old": old_revision}
        )
    storage.engine.dispose()

    with pytest.raises(StorageError) as caught:
        open_storage(sqlite_url)

    message = assert_clean_error(caught.value)
    assert old_revision in message
    assert "optuna storage upgrade" in message


def test_schema_head_after_open(sqlite_url):
    storage = open_storage(sqlite_url)

    assert schema_head() == (optuna.__version__, storage.get_head_version())
    storage.engine.dispose()


def test_known_head_replaces_scripts(sqlite_url):
    storage = open_storage(sqlite_url)
    old_revision = storage.get_all_versions()[1]
    storage.engine.dispose()

    # a head from the same Optuna version is trusted, so a wrong one fails the check
    with pytest.raises(StorageError) as caught:
        open_storage(sqlite_url, known_head=(optuna.__version__, old_revision))
    assert f"expects {old_revision!r}" in assert_clean_error(caught.value)

    # a head from another Optuna version is ignored
    other = open_storage(sqlite_url, known_head=("0.0.0", old_revision))
    other.engine.dispose()


# connection pool and SQLite settings


def _kill_jethpo_connections(postgres_url: str, postgres_admin_url: str) -> int:
    database = sqlalchemy.make_url(postgres_url).database
    admin = sqlalchemy.create_engine(postgres_admin_url, poolclass=sqlalchemy.pool.NullPool)
    with admin.begin() as connection:
        killed = connection.execute(
            sqlalchemy.text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = :name AND application_name = 'jethpo'"
            ),
            {"name": database},
        ).scalar_one()
    admin.dispose()
    return killed


def test_pool_pings_rested_connections(postgres_url, postgres_admin_url):
    storage = open_storage(postgres_url, pool_size=3, max_overflow=1)
    engine = storage.engine
    assert isinstance(engine.pool, IdlePingPool)
    assert engine.pool.size() == 3
    assert engine.pool._max_overflow == 1

    # the server drops every pooled connection, and once they rested, the ping replaces them
    storage.get_all_studies()
    assert _kill_jethpo_connections(postgres_url, postgres_admin_url) >= 1
    time.sleep(PING_AFTER_IDLE_S + 0.2)

    assert isinstance(storage.get_all_studies(), list)
    engine.dispose()


def test_pool_logs_nothing_at_info(postgres_url, caplog):
    # the CLI logs at INFO, and a pool's disposal is no news to the user
    caplog.set_level(logging.INFO)
    storage = open_storage(postgres_url)
    storage.get_all_studies()
    storage.engine.dispose()

    assert not [record for record in caplog.records if "Pool" in record.getMessage()]


def test_recently_broken_connection_fails_once(postgres_url, postgres_admin_url, monkeypatch):
    # a connection dropped moments after its last use is not pinged, so it fails one
    # request, and then the pool replaces all of its connections
    monkeypatch.setattr("storage.rdb.PING_AFTER_IDLE_S", 60.0)
    storage = pickle.loads(pickle.dumps(open_storage(postgres_url)))
    assert isinstance(storage.engine.pool, IdlePingPool)
    storage.get_all_studies()
    assert _kill_jethpo_connections(postgres_url, postgres_admin_url) >= 1

    with pytest.raises(optuna.exceptions.StorageInternalError):
        storage.get_all_studies()
    assert isinstance(storage.get_all_studies(), list)
    storage.engine.dispose()


def test_sqlite_uses_wal_and_busy_timeout(sqlite_url):
    storage = open_storage(sqlite_url, sqlite_busy_timeout=12.5)

    with storage.engine.connect() as connection:
        journal_mode = connection.exec_driver_sql("PRAGMA journal_mode").scalar_one()
        busy_timeout_ms = connection.exec_driver_sql("PRAGMA busy_timeout").scalar_one()

    assert journal_mode == "wal"
    assert busy_timeout_ms == 12500
    assert storage.engine.pool._pre_ping is True


def test_storage_survives_pickling(sqlite_url):
    """Ray sends the storage to workers by pickling it, which rebuilds the engine."""
    storage = open_storage(sqlite_url, sqlite_busy_timeout=7, heartbeat_interval=5)

    copy = pickle.loads(pickle.dumps(storage))

    assert copy.get_heartbeat_interval() == 5
    assert copy.get_heartbeat_stale_trial_callback() is not None
    with copy.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar_one() == 7000
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar_one() == "wal"


def test_open_storage_twice_is_idempotent(any_url):
    first = open_storage(any_url)
    optuna.create_study(storage=first, study_name=unique("reopen"))
    second = open_storage(any_url)

    with second.engine.connect() as connection:
        revisions = connection.execute(sqlalchemy.text("SELECT COUNT(*) FROM alembic_version"))
        assert revisions.scalar_one() == 1
    assert len(second.get_all_studies()) >= 1


# heartbeats and retry of stale trials

DEAD_WORKER = """
import json, os, sys, warnings
import optuna
from storage import open_storage, record_heartbeats

warnings.simplefilter("ignore")
storage = open_storage(sys.argv[1], heartbeat_interval=1, grace_period=2)
study = optuna.load_study(study_name=sys.argv[2], storage=storage)
trial = study.ask()
x = trial.suggest_float("x", -10.0, 10.0)
with record_heartbeats(storage, trial._trial_id):
    print(json.dumps({"number": trial.number, "x": x}), flush=True)
    # a crash: no tell, no cleanup, the heartbeat thread dies with the process
    os._exit(0)
"""


def wait_for_trial_state(study, number, state, timeout_s):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        optuna.storages.fail_stale_trials(study)
        if study.get_trials(deepcopy=False)[number].state == state:
            return True
        time.sleep(0.25)
    return False


def test_dead_worker_trial_fails_and_is_requeued(postgres_url):
    storage = open_storage(postgres_url, heartbeat_interval=1, grace_period=2)
    study_name = unique("heartbeat")
    study = optuna.create_study(storage=storage, study_name=study_name)

    finished = subprocess.run(
        [sys.executable, "-c", DEAD_WORKER, postgres_url, study_name],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert finished.returncode == 0, finished.stderr
    dead = json.loads(finished.stdout)

    # a live trial of this process keeps beating through the same wait
    alive = study.ask()
    with record_heartbeats(storage, alive._trial_id):
        assert study.get_trials(deepcopy=False)[dead["number"]].state == TrialState.RUNNING
        assert wait_for_trial_state(study, dead["number"], TrialState.FAIL, timeout_s=15)
        time.sleep(2.5)
        optuna.storages.fail_stale_trials(study)
        assert study.get_trials(deepcopy=False)[alive.number].state == TrialState.RUNNING
    study.tell(alive, 1.0)

    trials = study.get_trials(deepcopy=False)
    failed = trials[dead["number"]]
    retries = [t for t in trials if t.state == TrialState.WAITING]
    assert failed.params == {"x": dead["x"]}
    assert len(retries) == 1
    assert retries[0].params == {"x": dead["x"]}
    assert retries[0].distributions == failed.distributions
    assert retries[0].system_attrs["failed_trial"] == dead["number"]

    # the next ask picks up the re-queued parameters
    rerun = study.ask()
    assert rerun.params == {"x": dead["x"]}
    study.tell(rerun, dead["x"] ** 2)


def test_heartbeats_off_records_nothing(sqlite_url):
    storage = open_storage(sqlite_url, heartbeat_interval=None)
    study = optuna.create_study(storage=storage)
    trial = study.ask()

    with record_heartbeats(storage, trial._trial_id):
        pass

    assert storage.get_heartbeat_interval() is None
    with storage.engine.connect() as connection:
        beats = connection.execute(sqlalchemy.text("SELECT COUNT(*) FROM trial_heartbeats"))
        assert beats.scalar_one() == 0


def test_no_first_beat_records_nothing_before_interval(sqlite_url):
    storage = open_storage(sqlite_url, heartbeat_interval=60)
    study = optuna.create_study(storage=storage)
    trial = study.ask()

    with record_heartbeats(storage, trial._trial_id, beat_now=False):
        pass

    with storage.engine.connect() as connection:
        beats = connection.execute(sqlalchemy.text("SELECT COUNT(*) FROM trial_heartbeats"))
        assert beats.scalar_one() == 0


# attributes written in groups


def count_commits(engine: sqlalchemy.Engine) -> list[int]:
    commits = [0]

    def on_commit(connection) -> None:
        commits[0] += 1

    sqlalchemy.event.listen(engine, "commit", on_commit)
    return commits


def test_trial_user_attrs_written_in_one_commit(any_url):
    storage = open_storage(any_url)
    study = optuna.create_study(storage=storage, study_name=unique("attrs"))
    trial = study.ask()
    trial.set_user_attr("seed", 1)
    commits = count_commits(storage.engine)

    set_trial_user_attrs(study._storage, trial._trial_id, {"seed": 2, "params": {"lr": 0.1}, "host": "a"})

    assert commits[0] == 1
    assert storage.get_trial_user_attrs(trial._trial_id) == {"seed": 2, "params": {"lr": 0.1}, "host": "a"}


def test_trial_user_attrs_commit_asynchronously(postgres_url):
    storage = open_storage(postgres_url, pool_size=1, max_overflow=0)
    study = optuna.create_study(storage=storage, study_name=unique("attrs"))
    trial = study.ask()
    at_commit = []

    def on_commit(connection) -> None:
        at_commit.append(connection.exec_driver_sql("SHOW synchronous_commit").scalar())

    sqlalchemy.event.listen(storage.engine, "commit", on_commit)
    set_trial_user_attrs(study._storage, trial._trial_id, {"seed": 2})
    sqlalchemy.event.remove(storage.engine, "commit", on_commit)

    with storage.engine.connect() as connection:
        afterwards = connection.exec_driver_sql("SHOW synchronous_commit").scalar()
    storage.engine.dispose()
    assert at_commit == ["off"]
    # the setting ends with the transaction, on the same pooled connection
    assert afterwards == "on"


def test_no_trial_user_attrs_writes_nothing(any_url):
    storage = open_storage(any_url)
    study = optuna.create_study(storage=storage, study_name=unique("attrs"))
    trial = study.ask()
    commits = count_commits(storage.engine)

    set_trial_user_attrs(study._storage, trial._trial_id, {})

    assert commits[0] == 0
    assert storage.get_trial_user_attrs(trial._trial_id) == {}


def test_trial_user_attrs_of_finished_trial_rejected(any_url):
    storage = open_storage(any_url)
    study = optuna.create_study(storage=storage, study_name=unique("attrs"))
    trial = study.ask()
    study.tell(trial, 1.0)

    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        set_trial_user_attrs(storage, trial._trial_id, {"seed": 2})
    assert storage.get_trial_user_attrs(trial._trial_id) == {}


def test_trial_user_attrs_of_unknown_trial_rejected(any_url):
    storage = open_storage(any_url)
    study = optuna.create_study(storage=storage, study_name=unique("attrs"))
    trial = study.ask()

    with pytest.raises(KeyError, match=f"trial_id {trial._trial_id + 1000} "):
        set_trial_user_attrs(storage, trial._trial_id + 1000, {"seed": 2})


def test_trial_user_attrs_on_memory_storage():
    study = optuna.create_study()
    trial = study.ask()

    set_trial_user_attrs(study._storage, trial._trial_id, {"seed": 3, "host": "b"})

    assert study.trials[0].user_attrs == {"seed": 3, "host": "b"}


def test_study_user_attrs_read_by_name(any_url):
    storage = open_storage(any_url)
    with_attrs = optuna.create_study(storage=storage, study_name=unique("with"))
    with_attrs.set_user_attr("run", {"n_jets": 600})
    with_attrs.set_user_attr("budget", 4)
    without = optuna.create_study(storage=storage, study_name=unique("without"))
    missing = unique("missing")

    found = read_study_user_attrs(storage, [with_attrs.study_name, without.study_name, missing])

    assert found == {with_attrs.study_name: {"run": {"n_jets": 600}, "budget": 4}, without.study_name: {}}


# many workers at once

N_WORKERS = 8
TRIALS_PER_WORKER = 20


def open_storage_worker(url, barrier, results):
    warnings.simplefilter("ignore")
    barrier.wait(timeout=60)
    try:
        open_storage(url)
        results.put("ok")
    except Exception as error:  # reported to the parent, which asserts on it
        results.put(f"{type(error).__name__}: {error}")


def run_trials_worker(url, study_name, barrier, results):
    warnings.simplefilter("ignore")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    barrier.wait(timeout=60)
    try:
        storage = open_storage(url)
        # random sampling spends each worker's CPU time on storage access, not on TPE fits
        sampler = optuna.samplers.RandomSampler(seed=os.getpid())
        study = optuna.create_study(
            storage=storage, study_name=study_name, sampler=sampler, load_if_exists=True
        )
        for _ in range(TRIALS_PER_WORKER):
            trial = study.ask()
            x = trial.suggest_float("x", -1.0, 1.0)
            study.tell(trial, x * x)
        results.put("ok")
    except Exception as error:  # reported to the parent, which asserts on it
        results.put(f"{type(error).__name__}: {error}")


def run_workers(target, *args):
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(N_WORKERS)
    results = context.Queue()
    workers = [
        context.Process(target=target, args=(*args, barrier, results)) for _ in range(N_WORKERS)
    ]
    for worker in workers:
        worker.start()
    try:
        outcomes = [results.get(timeout=120) for _ in workers]
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()
    return outcomes


def test_concurrent_first_open_on_empty_postgres(fresh_postgres_url):
    outcomes = run_workers(open_storage_worker, fresh_postgres_url)

    assert outcomes == ["ok"] * N_WORKERS
    engine = sqlalchemy.create_engine(
        parse_storage_url(fresh_postgres_url), poolclass=sqlalchemy.pool.NullPool
    )
    with engine.connect() as connection:
        inspector = sqlalchemy.inspect(connection)
        assert inspector.has_table("jethpo_spaces")
        assert inspector.has_table("jethpo_stages")
        assert inspector.has_table("trial_heartbeats")
        stamps = connection.execute(sqlalchemy.text("SELECT COUNT(*) FROM alembic_version"))
        assert stamps.scalar_one() == 1
        versions = connection.execute(sqlalchemy.text("SELECT COUNT(*) FROM version_info"))
        assert versions.scalar_one() == 1
    engine.dispose()


@pytest.mark.slow
def test_concurrent_trials_on_fresh_sqlite(sqlite_url):
    study_name = "sqlite-concurrency"

    outcomes = run_workers(run_trials_worker, sqlite_url, study_name)

    assert outcomes == ["ok"] * N_WORKERS
    study = optuna.load_study(study_name=study_name, storage=open_storage(sqlite_url))
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == N_WORKERS * TRIALS_PER_WORKER
    assert all(trial.state == TrialState.COMPLETE for trial in trials)
    assert sorted(trial.number for trial in trials) == list(range(len(trials)))


# optuna-dashboard reads the storage


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fetch_study_names(port: int, timeout_s: float) -> list[str] | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            address = f"http://127.0.0.1:{port}/api/studies"
            with urllib.request.urlopen(address, timeout=2) as reply:
                body = json.load(reply)
            return [study["study_name"] for study in body["study_summaries"]]
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.25)
    return None


def test_dashboard_lists_study(any_url):
    storage = open_storage(any_url)
    study_name = unique("dashboard")
    study = optuna.create_study(storage=storage, study_name=study_name)
    study.optimize(lambda trial: trial.suggest_float("x", 0.0, 1.0), n_trials=2)
    # the dashboard opens the URL itself, so it needs the pinned driver
    dashboard_url = parse_storage_url(any_url).render_as_string(hide_password=False)
    port = free_port()

    dashboard = subprocess.Popen(
        [str(DASHBOARD), dashboard_url, "--port", str(port), "--host", "127.0.0.1", "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        names = fetch_study_names(port, timeout_s=30)
        assert dashboard.poll() is None, dashboard.stderr.read().decode()
    finally:
        dashboard.terminate()
        try:
            dashboard.wait(timeout=10)
        except subprocess.TimeoutExpired:
            dashboard.kill()
            dashboard.wait(timeout=10)

    assert names is not None, "optuna-dashboard did not answer /api/studies within 30 s"
    assert study_name in names


# search spaces


@pytest.fixture
def engine(any_url):
    storage = open_storage(any_url, pool_size=N_WORKERS)
    yield storage.engine
    storage.engine.dispose()


def test_save_space_inserts_then_reports_duplicate(engine):
    name = unique("convae-small")
    text = "family: convae\nparameters:\n  latent_dim: {low: 8, high: 32}\n"

    assert save_space(engine, name, text) is True
    assert save_space(engine, name, text) is False
    assert load_spaces(engine)[name] == text


def test_save_space_conflict_names_space(engine):
    name = unique("nf-wide")
    save_space(engine, name, "family: nf\n")

    with pytest.raises(SpaceConflictError) as caught:
        save_space(engine, name, "family: nf\nn_flows: 10\n")

    assert name in str(caught.value)
    assert caught.value.name == name
    assert load_spaces(engine)[name] == "family: nf\n"


def test_load_spaces_sorted_by_name(engine):
    prefix = unique("sorted")
    for suffix in ("b", "a", "c"):
        save_space(engine, f"{prefix}-{suffix}", f"name: {suffix}\n")

    names = [name for name in load_spaces(engine) if name.startswith(prefix)]

    assert names == [f"{prefix}-a", f"{prefix}-b", f"{prefix}-c"]


def test_create_tables_is_idempotent(engine):
    create_tables(engine)
    create_tables(engine)

    assert sqlalchemy.inspect(engine).has_table("jethpo_stages")


# pipeline stages


def test_claim_stage_has_one_winner(engine):
    pipeline = unique("pipeline")
    upsert_stage(engine, pipeline, "loss", study_name=f"{pipeline}-loss", family="convae-gen")
    barrier = threading.Barrier(N_WORKERS)
    wins: dict[str, bool] = {}

    def claim(owner: str) -> None:
        barrier.wait(timeout=30)
        wins[owner] = claim_stage(engine, pipeline, "loss", owner)

    threads = [threading.Thread(target=claim, args=(f"worker-{i}",)) for i in range(N_WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    winners = [owner for owner, won in wins.items() if won]
    assert len(wins) == N_WORKERS
    assert len(winners) == 1
    (stage,) = get_stages(engine, pipeline)
    assert stage.state == StageState.RUNNING
    assert stage.claimed_by == winners[0]
    assert stage.claimed_at is not None
    assert stage.claimed_at.tzinfo is not None


def test_claim_stage_missing_or_running(engine):
    pipeline = unique("pipeline")

    assert claim_stage(engine, pipeline, "absent", "worker-0") is False

    upsert_stage(engine, pipeline, "search", study_name="nf", family="nf")
    assert claim_stage(engine, pipeline, "search", "worker-0") is True
    assert claim_stage(engine, pipeline, "search", "worker-1") is False


def test_upsert_keeps_state_and_updates_definition(engine):
    pipeline = unique("pipeline")
    upsert_stage(engine, pipeline, "loss", study_name="rec-loss", family="convae-rec")
    upsert_stage(
        engine, pipeline, "arch", study_name="rec-arch", family="convae-rec", depends_on=["loss"]
    )
    claim_stage(engine, pipeline, "loss", "worker-0")
    finish_stage(engine, pipeline, "loss", "done", checkpoint="artifacts/rec-loss/best.pt")

    upsert_stage(engine, pipeline, "loss", study_name="rec-loss-v2", family="convae-rec")

    stages = {stage.stage: stage for stage in get_stages(engine, pipeline)}
    assert list(stages) == ["arch", "loss"]
    assert stages["loss"].state == StageState.DONE
    assert stages["loss"].study_name == "rec-loss-v2"
    assert stages["loss"].checkpoint == "artifacts/rec-loss/best.pt"
    assert stages["arch"].state == StageState.PENDING
    assert stages["arch"].depends_on == ("loss",)
    assert stages["arch"].claimed_by is None


def test_finish_stage_failed_keeps_checkpoint(engine):
    pipeline = unique("pipeline")
    upsert_stage(engine, pipeline, "retrain", study_name="nf", family="nf")
    finish_stage(engine, pipeline, "retrain", StageState.DONE, checkpoint="ckpt-1")

    finish_stage(engine, pipeline, "retrain", "failed")

    (stage,) = get_stages(engine, pipeline)
    assert stage.state == StageState.FAILED
    assert stage.checkpoint == "ckpt-1"


def test_finish_stage_rejects_bad_input(engine):
    pipeline = unique("pipeline")
    upsert_stage(engine, pipeline, "search", study_name="nf", family="nf")

    with pytest.raises(ValueError, match="expected 'done' or 'failed'"):
        finish_stage(engine, pipeline, "search", "running")
    with pytest.raises(StageNotFoundError, match="absent"):
        finish_stage(engine, pipeline, "absent", "done")


def test_get_stages_of_unknown_pipeline_is_empty(engine):
    assert get_stages(engine, unique("nothing")) == []


def test_postgres_url_names_throwaway_database(postgres_url):
    assert sqlalchemy.make_url(postgres_url).database.startswith("jethpo_test_")
