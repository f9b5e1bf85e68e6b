"""Ray workers and the ``jethpo run`` controller against a real two-node Ray cluster and PostgreSQL.

One Ray cluster serves the whole module: a head node and a second node, each a ``ray start
--block`` process with 2 CPUs and its own temp dir, both on this machine. The tests run the
real ``jethpo run`` command against it, kill worker processes, the controller and the
PostgreSQL server on purpose, and read the outcome from the database. Orchestration tests
use a two-stage RealNVP search space whose trials take a few seconds, and the cluster test
uses the shipped smoke profile. All of them train on the session's Pythia jets.
"""

from __future__ import annotations

import contextlib
import datetime
import getpass
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import optuna
import psutil
import pytest
import sqlalchemy
from optuna.trial import TrialState
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

import hpo.studies
from hpo.objectives import prepare_data
from hpo.pipeline import advance_pipeline, count_trials, load_stage_records, plan_pipeline, register_pipeline, registered_run
from hpo.spaces import Resources, load_profile, parse_profile
from hpo.studies import add_space
from hpo.cli import app
from hpo.host_memory import worker_env_vars
from hpo.workers import RunError, Worker, WorkerSettings, connect_ray, default_worker_count, start_workers
from storage import StageState, StorageError, get_stages, open_storage

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
    pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used"),
]

RAY = Path(sys.executable).with_name("ray")
JETHPO = Path(sys.executable).with_name("jethpo")

# Trials of this space train a 2-coupling RealNVP with 16-node layers on 420 jets. With the
# profile below they took 3 to 7 s each on a 2-core machine running both Ray nodes, long
# enough to be killed or to meet a database restart mid-trial.
TINY_SPACE = """
name: tiny-nf
description: Two-stage RealNVP search for orchestration tests.
model: realnvp-flat
objective: generation
sampler: {type: random, seed: 0}
pruner: {type: none}
stages:
  - name: first
    params:
      lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    fixed: {n_flows: 2, n_mlp_layers: 1, nodes_1: 16}
  - name: second
    inherits: first
    params:
      n_flows: {type: int, low: 2, high: 3}
    fixed: {n_mlp_layers: 1, nodes_1: 16}
"""

TINY_PROFILE = """
name: tiny
n_jets: 600
models:
  convae: &budget
    search: {n_trials: 3, epochs: 150, batch_size: 100, eval_every: 10, resources: {cpus: 1, gpus: 0}}
    retrain: {epochs: 1, batch_size: 100, eval_every: 1, resources: {cpus: 1, gpus: 0}}
  realnvp-latent: *budget
  realnvp-flat: *budget
"""

HEARTBEAT = ["--heartbeat-interval", "1", "--grace-period", "4"]
RUN_TIMEOUT_S = 600


# Ray cluster


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Ray picks its own ports at random from the ephemeral range upwards (Node._get_unused_port
# in Ray 2.60's ray/_private/node.py), and so does free_port(). Worker port blocks come from
# below that range, so neither can land inside one, and no block is handed out twice in a
# test session.
WORKER_PORT_FLOOR = 10000
_worker_port_blocks: set[int] = set()


def ephemeral_port_floor() -> int:
    """Return the lowest port the kernel hands out for a bind to port 0."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("", port))
        except OSError:
            return False
    return True


def free_port_range(size: int = 100) -> tuple[int, int]:
    """Return a block of ports that were free a moment ago, for a Ray node's worker processes."""
    ceiling = ephemeral_port_floor()
    candidates = [
        low for low in range(WORKER_PORT_FLOOR, ceiling - size + 1, size) if low not in _worker_port_blocks
    ]
    random.shuffle(candidates)
    for low in candidates[:50]:
        if all(port_is_free(port) for port in range(low, low + size)):
            _worker_port_blocks.add(low)
            return low, low + size - 1
    raise RuntimeError(
        f"no free block of {size} ports for Ray workers between {WORKER_PORT_FLOOR} and {ceiling}, "
        "below the kernel's ephemeral port range (/proc/sys/net/ipv4/ip_local_port_range)"
    )


def stop_process_group(process: subprocess.Popen, timeout_s: float = 5.0) -> None:
    """Stop a process started with start_new_session=True and everything it started."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    process.wait(timeout=timeout_s)


def start_node(arguments: list[str], temp_dir: Path, log: Path, env: dict[str, str]) -> subprocess.Popen:
    low, high = free_port_range()
    command = [
        str(RAY),
        "start",
        "--block",
        *arguments,
        "--num-cpus",
        "2",
        "--num-gpus",
        "0",
        "--object-store-memory",
        str(200 * 1024**2),
        "--temp-dir",
        str(temp_dir),
        "--disable-usage-stats",
        "--dashboard-agent-listen-port",
        str(free_port()),
        "--min-worker-port",
        str(low),
        "--max-worker-port",
        str(high),
    ]
    with open(log, "w") as output:
        return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_for_nodes(address: str, count: int, timeout_s: float = 90.0) -> None:
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if not ray.is_initialized():
                ray.init(address=address, logging_level="WARNING", log_to_driver=False)
            if sum(node["Alive"] for node in ray.nodes()) >= count:
                return
        except (ConnectionError, RuntimeError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the Ray cluster at {address} did not reach {count} nodes in {timeout_s:g} s")


@pytest.fixture(scope="module")
def ray_env(tmp_path_factory):
    """Environment of every Ray process and ``jethpo`` command of the module.

    Token authentication is off. Ray reads RAY_AUTH_MODE once per process, so a test
    process that imported Ray before this fixture could not join a cluster that requires
    a token. The cluster listens on this machine only for the module's duration. The
    commands keep their data and artifacts in a temporary folder, not in the working
    directory.
    """
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",
        "JETHPO_DATA_DIR": str(tmp_path_factory.mktemp("jethpo-data")),
    }
    env.pop("RAY_ADDRESS", None)
    previous = {key: os.environ.get(key) for key in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.pop("RAY_ADDRESS", None)
    yield env
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def ray_cluster(ray_env, tmp_path_factory):
    """Address of a Ray cluster of two nodes with 2 CPUs each, and this process connected to it."""
    import ray

    folder = tmp_path_factory.mktemp("ray")
    port = free_port()
    address = f"127.0.0.1:{port}"
    head = start_node(
        [
            "--head",
            "--port",
            str(port),
            "--include-dashboard=false",
            "--ray-client-server-port",
            str(free_port()),
        ],
        folder / "head",
        folder / "head.log",
        ray_env,
    )
    nodes = [head]
    try:
        wait_for_nodes(address, 1)
        nodes.append(start_node(["--address", address], folder / "node", folder / "node.log", ray_env))
        wait_for_nodes(address, 2)
        yield address
    finally:
        ray.shutdown()
        for process in reversed(nodes):
            stop_process_group(process)


# storage helpers


@pytest.fixture(scope="module")
def jets_path(pythia_jets) -> str:
    return str(Path(pythia_jets.path).resolve())


@pytest.fixture
def tiny_files(tmp_path) -> tuple[Path, Path]:
    space = tmp_path / "tiny-nf.yaml"
    space.write_text(TINY_SPACE)
    profile = tmp_path / "tiny.yaml"
    profile.write_text(TINY_PROFILE)
    return space, profile


def admin_engine(url: str) -> sqlalchemy.Engine:
    return sqlalchemy.create_engine(
        url,
        poolclass=sqlalchemy.pool.NullPool,
        connect_args={"connect_timeout": 5, "application_name": "jethpo-test"},
    )


def reader(url: str):
    return open_storage(url, heartbeat_interval=None)


def query(engine: sqlalchemy.Engine, sql: str, **parameters):
    try:
        with engine.connect() as connection:
            return connection.execute(sqlalchemy.text(sql), parameters).all()
    except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.ProgrammingError):
        # the database may be restarting, or jethpo has not created its tables yet
        return []


def jethpo_connections(engine: sqlalchemy.Engine, database: str) -> int:
    rows = query(
        engine,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = :database AND application_name = 'jethpo'",
        database=database,
    )
    return rows[0][0] if rows else 0


def running_trials(engine: sqlalchemy.Engine, min_age_s: float):
    """Return (study, number, pid) of the RUNNING trials that started at least min_age_s ago.

    Optuna stores datetime_start from the worker's local clock, so the age is computed here
    on the same machine's clock.
    """
    rows = query(
        engine,
        """
        SELECT s.study_name, t.number, a.value_json, t.datetime_start
        FROM trials t
        JOIN studies s ON s.study_id = t.study_id
        JOIN trial_user_attributes a ON a.trial_id = t.trial_id AND a.key = 'pid'
        WHERE t.state = 'RUNNING'
        ORDER BY t.trial_id
        """,
    )
    cutoff = datetime.datetime.now() - datetime.timedelta(seconds=min_age_s)
    return [(study, number, int(pid)) for study, number, pid, started in rows if started is not None and started < cutoff]


def stage_trials(url: str) -> dict[str, list]:
    storage = reader(url)
    try:
        return {
            study.study_name: storage.get_all_trials(storage.get_study_id_from_name(study.study_name))
            for study in storage.get_all_studies()
        }
    finally:
        storage.engine.dispose()


class Command:
    """A ``jethpo`` process whose merged stdout and stderr is collected by a thread."""

    def __init__(self, arguments: list[str], env: dict[str, str], new_session: bool = False) -> None:
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [str(JETHPO), *arguments],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=new_session,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait(self, timeout_s: float) -> int:
        try:
            code = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"jethpo did not finish in {timeout_s:g} s. Output:\n{self.output}") from None
        self._reader.join(timeout=10)
        # pytest shows the captured output of a failed test in full
        print(self.output)
        return code

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self._reader.join(timeout=10)
        print(self.output)


def run_arguments(url: str, data: str, address: str, profile: str, *extra: str) -> list[str]:
    return ["run", "--profile", profile, "--storage", url, "--data", data, "--address", address, *HEARTBEAT, "--no-progress", *extra]


def assert_budgets_used_exactly(url: str, n_trials: dict[str, int]) -> dict[str, list]:
    trials = stage_trials(url)
    for study_name, budget in n_trials.items():
        counts = count_trials(trials[study_name])
        assert counts.used == budget, f"{study_name}: {counts}"
        assert counts.running == 0, f"{study_name}: {counts}"
        assert counts.waiting == 0, f"{study_name}: {counts}"
    return trials


# tests without Ray


@pytest.mark.parametrize(
    ("cluster", "trial", "expected"),
    [
        ({"CPU": 2.0}, Resources(cpus=1, gpus=0), 2),
        ({"CPU": 16.0}, Resources(cpus=1, gpus=0), 16),
        ({"CPU": 16.0}, Resources(cpus=2, gpus=0), 8),
        ({"CPU": 1.0}, Resources(cpus=1, gpus=0), 1),
        ({"CPU": 16.0, "GPU": 2.0}, Resources(cpus=1, gpus=0), 16),
        ({"CPU": 16.0, "GPU": 2.0}, Resources(cpus=2, gpus=1), 2),
        ({"CPU": 16.0, "GPU": 2.0}, Resources(cpus=2, gpus=0.5), 4),
        ({"CPU": 4.0, "GPU": 4.0}, Resources(cpus=2, gpus=1), 2),
    ],
)
def test_default_worker_count(cluster, trial, expected):
    assert default_worker_count(cluster, trial) == expected


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--data", "/no/such/jets.hdf5"], "not found"),
        (["--profile", "paper"], "needs --data"),
        (["--heartbeat-interval", "5", "--grace-period", "5"], "must be longer than the heartbeat interval"),
        (["--family", "no-such-family"], "no search space has this name"),
    ],
)
def test_run_rejects_invalid_input(tmp_path, arguments, message):
    storage = f"sqlite:///{tmp_path / 'jethpo.db'}"

    result = CliRunner().invoke(app, ["run", "--storage", storage, "--data-dir", str(tmp_path), *arguments])

    assert result.exit_code == 1, result.output
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def register_on_sqlite(tmp_path, profile: str, families=None, data_path=None, profile_file=None, artifact_dir=None) -> str:
    """Register a profile's pipeline in the SQLite storage of ``tmp_path`` under a fake data fingerprint, and return the URL."""
    from hpo.studies import load_spaces

    url = f"sqlite:///{tmp_path / 'jethpo.db'}"
    storage = open_storage(url)
    run_info = {
        "data_path": data_path or str(tmp_path / "jets.hdf5"),
        "n_jets": 600,
        "split_seed": 0,
        "data_fingerprint": "f" * 64,
    }
    if profile_file is not None:
        run_info["profile_file"] = profile_file
    if artifact_dir is not None:
        run_info["artifact_dir"] = artifact_dir
    register_pipeline(storage, plan_pipeline(load_spaces(storage), load_profile(profile), families), run_info)
    storage.engine.dispose()
    return url


@pytest.mark.parametrize(
    ("arguments", "message"),
    [(["--data", "/no/such/jets.hdf5"], "not found"), (["--profile", "smok"], "profile 'smok': not found")],
)
def test_run_rejects_input_before_storage(tmp_path, arguments, message):
    result = CliRunner().invoke(app, ["run", "--data-dir", str(tmp_path / "data"), *arguments], env={"JETHPO_STORAGE": ""})

    assert result.exit_code == 1, result.output
    assert message in result.stderr
    assert not (tmp_path / "data").exists()


def test_run_rejects_other_profile_studies(tmp_path):
    url = register_on_sqlite(tmp_path, "smoke")

    result = CliRunner().invoke(app, ["run", "--profile", "quick", "--storage", url, "--data-dir", str(tmp_path)])

    assert result.exit_code == 1, result.output
    assert "belongs to pipeline 'smoke'" in result.stderr
    assert "--profile smoke" in result.stderr
    assert "Traceback" not in result.stderr
    # rejected before the quick profile's jets were generated
    assert not (tmp_path / "pythia").exists()


def test_run_rejects_second_pipeline(tmp_path):
    url = register_on_sqlite(tmp_path, "smoke", families=["nf"])

    # no study of the convae-gen family belongs to the smoke pipeline
    result = CliRunner().invoke(
        app, ["run", "--profile", "quick", "--family", "convae-gen", "--storage", url, "--data-dir", str(tmp_path)]
    )

    assert result.exit_code == 1, result.output
    assert "contains the pipeline of profile 'smoke'" in result.stderr
    assert "--profile smoke" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "pythia").exists()


def test_run_resumes_stored_profile(tmp_path, jets_path):
    url = register_on_sqlite(tmp_path, "smoke", data_path=jets_path)

    # without --profile and --data it resumes the smoke pipeline on its registered jets, whose
    # fingerprint is not the stored one, so it stops before Ray starts
    result = CliRunner().invoke(app, ["run", "--storage", url, "--data-dir", str(tmp_path)])

    assert result.exit_code == 1, result.output
    assert "Pipeline smoke in" in result.stderr
    assert "when their data fingerprint was ffffffffffff" in result.stderr
    assert "the pipeline's trials would mix the two" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_resumes_stored_profile_file(tmp_path, jets_path, caplog):
    profile = tmp_path / "renamed.yaml"
    text = (Path(hpo.studies.__file__).parent / "profiles" / "smoke.yaml").read_text()
    profile.write_text(text.replace("name: smoke", "name: renamed"))
    url = register_on_sqlite(tmp_path, str(profile), data_path=jets_path, profile_file=str(profile))

    with caplog.at_level("INFO", logger="hpo.cli"):
        result = CliRunner().invoke(app, ["run", "--storage", url, "--data-dir", str(tmp_path)])

    # it resumes the file's pipeline, and stops at the fake fingerprint before Ray starts
    assert f"resuming pipeline renamed with its profile file {profile}" in caplog.text
    assert result.exit_code == 1, result.output
    assert "Pipeline renamed in" in result.stderr
    assert "when their data fingerprint was ffffffffffff" in result.stderr


def test_run_names_missing_profile_file(tmp_path):
    profile = tmp_path / "renamed.yaml"
    text = (Path(hpo.studies.__file__).parent / "profiles" / "smoke.yaml").read_text()
    profile.write_text(text.replace("name: smoke", "name: renamed"))
    url = register_on_sqlite(tmp_path, str(profile), profile_file=str(profile))
    profile.unlink()

    result = CliRunner().invoke(app, ["run", "--storage", url, "--data-dir", str(tmp_path)])

    assert result.exit_code == 1, result.output
    assert f"of the profile file {profile}, which no longer exists" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_rejects_other_jets(tmp_path, jets_path):
    url = register_on_sqlite(tmp_path, "smoke", data_path=str(tmp_path / "moved.hdf5"))

    result = CliRunner().invoke(app, ["run", "--storage", url, "--data", jets_path, "--data-dir", str(tmp_path)])

    assert result.exit_code == 1, result.output
    assert f"but this run would use {jets_path}" in result.stderr
    assert f"Resume with --data {tmp_path / 'moved.hdf5'}" in result.stderr
    assert "Traceback" not in result.stderr


def test_resume_keeps_registered_artifacts(tmp_path, jets_path):
    registered = tmp_path / "shared-artifacts"
    registered.mkdir()
    url = register_on_sqlite(tmp_path, "smoke", data_path=jets_path, artifact_dir=str(registered))

    result = CliRunner().invoke(app, ["run", "--storage", url, "--data-dir", str(tmp_path)], env={"JETHPO_ARTIFACTS": ""})

    # it stops at the fake fingerprint before Ray starts, without opening the default directory
    assert result.exit_code == 1, result.output
    assert "when their data fingerprint was ffffffffffff" in result.stderr
    assert not (tmp_path / "artifacts").exists()


def test_resume_rejects_other_artifacts(tmp_path, jets_path):
    registered = tmp_path / "shared-artifacts"
    registered.mkdir()
    other = tmp_path / "other-artifacts"
    url = register_on_sqlite(tmp_path, "smoke", data_path=jets_path, artifact_dir=str(registered))

    result = CliRunner().invoke(app, ["run", "--storage", url, "--data-dir", str(tmp_path), "--artifacts", str(other)])

    assert result.exit_code == 1, result.output
    assert f"keeps its checkpoints, plots and tables in the artifact directory {registered}, not {other}" in result.stderr
    assert f"Resume with --artifacts {registered}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not other.exists()


def test_resume_moves_missing_artifacts(tmp_path, caplog):
    from hpo.workers import _resumed_artifact_dir

    moved = tmp_path / "moved"
    registered = {"artifact_dir": str(tmp_path / "gone")}

    with caplog.at_level("WARNING", logger="hpo.workers"):
        chosen = _resumed_artifact_dir(moved, registered, tmp_path, "smoke")

    assert chosen == moved.resolve()
    assert f"registered with the artifact directory {tmp_path / 'gone'}, which does not exist here" in caplog.text


def finish_on_sqlite(url: str, pipeline: str) -> None:
    """Mark every stage of a registered pipeline done, as if it had run to the end."""
    from storage.pipeline import finish_stage, get_stages

    storage = open_storage(url)
    for stage in get_stages(storage.engine, pipeline):
        finish_stage(storage.engine, pipeline, stage.stage, "done")
    storage.engine.dispose()


def test_finished_run_rejects_other_jets(tmp_path, jets_path):
    url = register_on_sqlite(tmp_path, "smoke", data_path=str(tmp_path / "moved.hdf5"))
    finish_on_sqlite(url, "smoke")

    result = CliRunner().invoke(app, ["run", "--storage", url, "--data", jets_path, "--data-dir", str(tmp_path)])

    assert result.exit_code == 1, result.output
    assert f"but this run would use {jets_path}" in result.stderr
    assert "already finished" not in result.stderr
    assert "Traceback" not in result.stderr


def test_finished_run_warns_of_budget_changes(tmp_path, caplog):
    url = register_on_sqlite(tmp_path, "smoke")
    finish_on_sqlite(url, "smoke")
    profile = tmp_path / "smoke.yaml"
    text = (Path(hpo.studies.__file__).parent / "profiles" / "smoke.yaml").read_text()
    profile.write_text(text.replace("n_trials: 2", "n_trials: 3", 1))

    with caplog.at_level("INFO", logger="hpo.workers"):
        result = CliRunner().invoke(app, ["run", "--storage", url, "--profile", str(profile), "--data-dir", str(tmp_path)])

    assert result.exit_code == 0, result.output
    assert "these budget changes of profile smoke are not applied: convae-gen.loss: n_trials 2 to 3;" in caplog.text
    assert "already finished; nothing to run" in caplog.text


def test_finished_run_warns_of_missing_artifacts(tmp_path, caplog):
    missing_dir = tmp_path / "missing"
    url = register_on_sqlite(tmp_path, "smoke", artifact_dir=str(missing_dir))
    finish_on_sqlite(url, "smoke")

    with caplog.at_level("INFO", logger="hpo.workers"):
        result = CliRunner().invoke(app, ["run", "--storage", url, "--data-dir", str(tmp_path)], env={"JETHPO_ARTIFACTS": ""})

    assert result.exit_code == 0, result.output
    assert "already finished; nothing to run" in caplog.text
    assert f"Pipeline smoke is finished, but its artifact directory {missing_dir} does not exist here" in caplog.text


def test_finished_run_finds_moved_artifacts(tmp_path, caplog):
    moved = tmp_path / "moved"
    moved.mkdir()
    url = register_on_sqlite(tmp_path, "smoke", artifact_dir=str(tmp_path / "missing"))
    finish_on_sqlite(url, "smoke")

    with caplog.at_level("INFO", logger="hpo.workers"):
        result = CliRunner().invoke(app, ["run", "--storage", url, "--data-dir", str(tmp_path), "--artifacts", str(moved)])

    assert result.exit_code == 0, result.output
    assert "already finished; nothing to run" in caplog.text
    assert "does not exist here" not in caplog.text
    assert f"Pipeline smoke now keeps its artifacts in {moved.resolve()}" in caplog.text

    # the next run finds the moved folder without --artifacts
    caplog.clear()
    with caplog.at_level("INFO", logger="hpo.workers"):
        again = CliRunner().invoke(app, ["run", "--storage", url, "--data-dir", str(tmp_path)], env={"JETHPO_ARTIFACTS": ""})
    assert again.exit_code == 0, again.output
    assert "does not exist here" not in caplog.text
    storage = open_storage(url)
    assert registered_run(storage, "smoke")["artifact_dir"] == str(moved.resolve())
    storage.engine.dispose()


def test_retrain_needs_artifact_folder(tmp_path):
    missing_dir = tmp_path / "missing"
    url = register_on_sqlite(tmp_path, "smoke", families=["nf"], artifact_dir=str(missing_dir))

    result = CliRunner().invoke(app, ["retrain", "nf", "--storage", url, "--data-dir", str(tmp_path)], env={"JETHPO_ARTIFACTS": ""})

    assert result.exit_code == 1, result.output
    assert f"keeps its checkpoints in the artifact directory {missing_dir}, which does not exist here" in result.stderr
    assert "Pass its new path with --artifacts" in result.stderr
    assert "Traceback" not in result.stderr
    assert not missing_dir.exists()
    assert not (tmp_path / "artifacts").exists()


def test_changed_budgets_lists_resources(tmp_path):
    from hpo.pipeline import changed_budgets

    url = register_on_sqlite(tmp_path, "smoke", families=["nf"])
    text = (Path(hpo.studies.__file__).parent / "profiles" / "smoke.yaml").read_text()
    storage = open_storage(url)
    spaces = hpo.studies.load_spaces(storage)

    unchanged = changed_budgets(storage, plan_pipeline(spaces, parse_profile(text, "smoke.yaml"), ["nf"]))
    changed = changed_budgets(storage, plan_pipeline(spaces, parse_profile(text.replace("cpus: 1", "cpus: 2"), "smoke.yaml"), ["nf"]))

    assert unchanged == []
    assert changed == ["nf.search: cpus 1 to 2", "retraining of nf: cpus 1 to 2"]


def test_retrain_by_hand_logs_epochs(tmp_path, caplog):
    from hpo.workers import _log_step_epoch
    from storage.pipeline import set_output

    storage = open_storage(f"sqlite:///{tmp_path / 'jethpo.db'}")
    readings = [None, (10, 10), (12, 10), (14, 10), (16, 10), (40, 10)]
    last = None

    with caplog.at_level("INFO", logger="hpo.progress"):
        for reading in readings:
            if reading is not None:
                epoch, resumed_after = reading
                progress = {"epoch": epoch, "epochs": 40, "resumed_after": resumed_after}
                set_output(storage.engine, "smoke", "retrain:nf", {"progress": progress})
            last = _log_step_epoch(storage, "smoke", "retrain:nf", last)
    storage.engine.dispose()

    # 40 epochs log every 2, counted from the epoch at which the retraining resumed
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [f"Step retrain:nf of pipeline smoke trained {epoch} of 40 epochs" for epoch in (12, 14, 16, 40)]
    assert last == 40


def test_run_rejects_too_few_jets(tmp_path, jets_path):
    result = CliRunner().invoke(
        app, ["run", "--profile", "quick", "--data", jets_path, "--storage", f"sqlite:///{tmp_path / 'jethpo.db'}"]
    )

    assert result.exit_code == 1, result.output
    assert f"Jets file {jets_path} contains 600 jets, but profile 'quick' uses 3000." in result.stderr
    assert "Pass --data with at least 3000 jets" in result.stderr
    assert "n_jets=" not in result.stderr
    assert "Traceback" not in result.stderr


def test_resume_rejects_too_few_jets(tmp_path, jets_path):
    url = register_on_sqlite(tmp_path, "quick", data_path=str(tmp_path / "registered.hdf5"))

    result = CliRunner().invoke(app, ["run", "--data", jets_path, "--storage", url, "--data-dir", str(tmp_path)])

    assert result.exit_code == 1, result.output
    assert "contains 600 jets, but profile 'quick' uses 3000" in result.stderr
    assert f"resume with --data {tmp_path / 'registered.hdf5'}, or leave --data out" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_needs_profile_among_several(tmp_path):
    register_on_sqlite(tmp_path, "smoke", families=["nf"])
    url = register_on_sqlite(tmp_path, "quick", families=["convae-gen"])

    result = CliRunner().invoke(app, ["run", "--storage", url, "--data-dir", str(tmp_path)])

    assert result.exit_code == 1, result.output
    assert "contains the pipelines quick, smoke. Pass --profile" in result.stderr
    assert "Traceback" not in result.stderr


def test_generated_jets_never_rewritten(tmp_path):
    import h5py

    from hpo.workers import prepare_jets

    smaller = tmp_path / "pythia" / "jets.hdf5"
    smaller.parent.mkdir()
    with h5py.File(smaller, "w") as jets_file:
        jets_file.attrs["n_jets"] = 3
    before = smaller.read_bytes()

    path = prepare_jets(None, tmp_path, 8, "test")

    assert path == (tmp_path / "pythia" / "8-jets" / "jets.hdf5").resolve()
    assert smaller.read_bytes() == before
    assert prepare_jets(None, tmp_path, 8, "test") == path
    assert prepare_jets(None, tmp_path, 3, "test") == smaller.resolve()


def test_threaded_workers_share_budget_exactly(fresh_postgres_url, jets_path, tiny_files, tmp_path):
    space_path, _ = tiny_files
    storage = open_storage(fresh_postgres_url, heartbeat_interval=1, grace_period=4)
    space, _ = add_space(storage, space_path)
    profile = parse_profile(TINY_PROFILE.replace("epochs: 150", "epochs: 20"), "tiny profile")
    data = prepare_data(jets_path, n_jets=600)
    register_pipeline(
        storage,
        plan_pipeline({"tiny-nf": space}, profile),
        {
            "data_path": jets_path,
            "n_jets": 600,
            "split_seed": 0,
            "data_fingerprint": data.fingerprint,
            "artifact_dir": str(tmp_path / "artifacts"),
        },
    )
    settings = WorkerSettings(fresh_postgres_url, heartbeat_interval=1, grace_period=4, poll_interval_s=0.2)
    workers = [Worker(settings, ["tiny"], index) for index in range(3)]
    summaries: list[dict] = []
    threads = [threading.Thread(target=lambda worker=worker: summaries.append(worker.run())) for worker in workers]
    for thread in threads:
        thread.start()

    # the controller's part: move the search stages along; the workers run the steps
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        records = load_stage_records(storage, "tiny")
        if all(record.is_terminal for record in records):
            break
        advance_pipeline(storage, records, "test-controller")
        time.sleep(0.2)
    for thread in threads:
        thread.join(timeout=60)
    states = [stage.state for stage in get_stages(storage.engine, "tiny")]
    n_steps = sum(record.is_step for record in load_stage_records(storage, "tiny"))
    storage.engine.dispose()

    assert states == [StageState.DONE] * 5
    assert len(summaries) == 3
    assert sum(summary["trials"] for summary in summaries) == 6
    assert n_steps > 0
    assert sum(summary["steps"] for summary in summaries) == n_steps
    trials = assert_budgets_used_exactly(fresh_postgres_url, {"tiny-nf.first": 3, "tiny-nf.second": 3})
    assert len(trials["tiny-nf.first"]) == 3
    assert len(trials["tiny-nf.second"]) == 3
    second = trials["tiny-nf.second"][0]
    best_first = min(
        (trial for trial in trials["tiny-nf.first"] if trial.state == TrialState.COMPLETE), key=lambda trial: trial.value
    )
    assert second.user_attrs["params"]["lr"] == best_first.params["lr"]


def test_spaces_reread_for_unknown_family(fresh_postgres_url, tiny_files, tmp_path, monkeypatch):
    space_path, _ = tiny_files
    storage = open_storage(fresh_postgres_url, heartbeat_interval=1, grace_period=4)
    run = {"data_path": "jets.hdf5", "n_jets": 600, "split_seed": 0, "data_fingerprint": "0" * 64}

    def register(space_file: Path, profile_name: str) -> None:
        space, _ = add_space(storage, space_file)
        profile = parse_profile(TINY_PROFILE.replace("name: tiny", f"name: {profile_name}"), "tiny profile")
        register_pipeline(storage, plan_pipeline({space.name: space}, profile), run)

    register(space_path, "tiny")
    worker = Worker(WorkerSettings(fresh_postgres_url), ["tiny", "other"])
    worker._storage = storage
    reads = []
    load_spaces = hpo.studies.load_spaces
    monkeypatch.setattr(hpo.studies, "load_spaces", lambda rdb: reads.append(1) or load_spaces(rdb))

    worker._stage_records()
    worker._stage_records()
    assert len(reads) == 1

    other_space = tmp_path / "tiny-nf2.yaml"
    other_space.write_text(TINY_SPACE.replace("name: tiny-nf", "name: tiny-nf2"))
    register(other_space, "other")
    reads.clear()
    records = worker._stage_records()
    storage.engine.dispose()

    assert len(reads) == 1
    assert {record.study_name for record in records if record.pipeline == "other"} >= {"tiny-nf2.first", "tiny-nf2.second"}
    assert all(record.space is not None for record in records if record.kind != "results")


def test_ask_skips_read_without_waiting(fresh_postgres_url):
    from hpo.workers import _WorkerStudy

    storage = open_storage(fresh_postgres_url)
    optuna.create_study(study_name="asks", storage=storage)
    study = _WorkerStudy("asks", storage, optuna.samplers.RandomSampler(seed=0), optuna.pruners.NopPruner(), {})
    study.n_trials = 3
    study.enqueue_trial({"lr": 0.005})
    reads = []
    get_all_trials = study._storage.get_all_trials

    def counted_get_all_trials(*args, **kwargs):
        reads.append(1)
        return get_all_trials(*args, **kwargs)

    study._storage.get_all_trials = counted_get_all_trials

    enqueued = study.ask()
    read_for_enqueued = len(reads)
    reads.clear()
    fresh = study.ask()
    storage.engine.dispose()

    assert (enqueued.number, enqueued.suggest_float("lr", 1e-4, 1e-2, log=True)) == (0, 0.005)
    assert read_for_enqueued == 1
    assert fresh.number == 1
    assert reads == []


def test_trial_failed_by_storage_error_is_requeued(fresh_postgres_url, tiny_files, caplog):
    space_path, _ = tiny_files
    storage = open_storage(fresh_postgres_url, heartbeat_interval=1, grace_period=4)
    add_space(storage, space_path)
    study = optuna.create_study(study_name="tiny-nf.first", storage=storage)
    trial = study.ask()
    trial.suggest_float("lr", 1e-4, 1e-2, log=True)
    trial.set_user_attr("fail_reason", "error")
    trial.set_user_attr("fail_message", "StorageInternalError: An exception is raised during the commit.")
    frozen = study.tell(trial, state=TrialState.FAIL)
    worker = Worker(WorkerSettings(fresh_postgres_url, heartbeat_interval=1, grace_period=4), ["tiny"])
    worker._storage = storage

    # the private step that run_trial's FAIL result leads to
    worker._retry_after_storage_failure(study, frozen)

    retry = study.get_trials()[1]
    storage.engine.dispose()
    assert retry.state == TrialState.WAITING
    assert retry.params == frozen.params
    assert retry.system_attrs["retry_history"] == [0]
    assert "fail_reason" not in retry.user_attrs
    assert count_trials(study.get_trials()).used == 0
    assert "re-queued its parameters" in caplog.text


def test_settings_carry_schema_head(fresh_postgres_url):
    import dataclasses

    from hpo.workers import open_worker_storage

    storage = open_storage(fresh_postgres_url)
    head = storage.get_head_version()
    storage.engine.dispose()

    settings = WorkerSettings(fresh_postgres_url, poll_interval_s=0.5).with_schema_head()
    assert settings.schema_head == (optuna.__version__, head)
    assert settings.poll_interval_s == 0.5

    # the worker checks the database against the carried head
    wrong = dataclasses.replace(settings, schema_head=(optuna.__version__, "v0.0.0.x"))
    with pytest.raises(StorageError, match="expects 'v0.0.0.x'"):
        open_worker_storage(wrong)


def test_hand_back_owner_matches_step_claims(tmp_path):
    from hpo.workers import _step_owner

    worker = Worker(WorkerSettings(f"sqlite:///{tmp_path / 'jethpo.db'}"), ["tiny"], index=3)
    # the step runner only keeps the storage, so any object will do
    worker._storage = object()

    assert worker._steps().owner == _step_owner(worker.identity())


class _EndedPool:
    """Stand-in for a WorkerPool whose one worker reported its identity and ended."""

    workers = [(None, None)]

    def identities(self, timeout_s: float) -> dict[int, dict]:
        return {0: {"node_id": "node-a", "hostname": "host-a", "pid": 101, "worker": 0}}

    def stop(self, timeout_s: float) -> set[int]:
        return {0}


def test_hand_back_gives_up_after_time_bound(monkeypatch, caplog):
    import hpo.workers

    monkeypatch.setattr(hpo.workers, "_HAND_BACK_TIMEOUT_S", 0.5)
    # a server that accepts connections and never replies, as a hung database does
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        engine = sqlalchemy.create_engine(
            f"postgresql+psycopg2://jethpo@127.0.0.1:{silent.getsockname()[1]}/jethpo",
            poolclass=sqlalchemy.pool.NullPool,
            connect_args={"connect_timeout": 60},
        )
        started = time.monotonic()
        hpo.workers._hand_back_work(SimpleNamespace(engine=engine), ["tiny"], _EndedPool())
        elapsed_s = time.monotonic() - started
    # closing the socket makes the connection attempt fail, which ends the hand-back thread

    assert elapsed_s < 3
    assert "did not finish within 0.5 s" in caplog.text


# tests on the Ray cluster


_START_AT_ONCE = """
import json, sys
import ray
from hpo.spaces import Resources
from hpo.workers import WorkerSettings, start_workers
ray.init(address=sys.argv[2], logging_level="WARNING", log_to_driver=False)
settings = WorkerSettings(sys.argv[1], heartbeat_interval=1, grace_period=4, keep_freed_memory=sys.argv[3] == "keep")
pool = start_workers(4, Resources(cpus=0.5, gpus=0), settings, ["no-such-pipeline"])
try:
    summaries = ray.get([ref for _, ref in pool.workers], timeout=180)
    # the actors still live: read the environment that each process started with
    for summary in summaries:
        with open(f"/proc/{summary['pid']}/environ", "rb") as environ:
            pairs = [item.decode().partition("=") for item in environ.read().split(b"\\0") if item]
        summary["malloc_env"] = {key: value for key, _, value in pairs if key.startswith("MALLOC_")}
finally:
    pool.kill()
print(json.dumps(summaries))
"""


@pytest.mark.parametrize("keep_freed_memory", [True, False], ids=["keep", "glibc"])
def test_workers_start_at_once_on_empty_database(ray_cluster, ray_env, fresh_postgres_url, keep_freed_memory):
    # a driver of its own, as `jethpo run` is: the test process has run other tests' code
    keep = "keep" if keep_freed_memory else "no"
    finished = subprocess.run(
        [sys.executable, "-c", _START_AT_ONCE, fresh_postgres_url, ray_cluster, keep],
        capture_output=True,
        text=True,
        env=ray_env,
        timeout=300,
    )

    assert finished.returncode == 0, finished.stderr[-3000:]
    summaries = json.loads(finished.stdout.strip().splitlines()[-1])
    assert [summary["trials"] for summary in summaries] == [0, 0, 0, 0]
    assert len({summary["node_id"] for summary in summaries}) == 2
    # without the settings, workers inherit the MALLOC_ variables of their Ray node, if any
    inherited = {key: value for key, value in ray_env.items() if key.startswith("MALLOC_")}
    expected = worker_env_vars(True, ray_env) if keep_freed_memory else inherited
    assert [summary["malloc_env"] for summary in summaries] == [expected] * 4
    storage = open_storage(fresh_postgres_url)
    tables = set(sqlalchemy.inspect(storage.engine).get_table_names())
    storage.engine.dispose()
    assert {"studies", "trials", "trial_heartbeats", "jethpo_stages", "jethpo_spaces", "alembic_version"} <= tables


def test_smoke_profile_on_two_nodes_survives_killed_worker(ray_cluster, ray_env, fresh_postgres_url, jets_path):
    database = make_url(fresh_postgres_url).database
    admin = admin_engine(fresh_postgres_url)
    # two families keep the run short; the whole smoke profile runs in tests/test_run_smoke.py
    families = ("--family", "convae-gen", "--family", "nf")
    command = Command(run_arguments(fresh_postgres_url, jets_path, ray_cluster, "smoke", "--workers", "2", *families), ray_env)

    # kill the first worker seen more than a second into a trial, and count connections
    killed = None
    connections = []
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while command.process.poll() is None and time.monotonic() < deadline:
        connections.append(jethpo_connections(admin, database))
        if killed is None:
            for study_name, number, pid in running_trials(admin, min_age_s=1.0):
                os.kill(pid, signal.SIGKILL)
                killed = (study_name, number, pid)
                break
        time.sleep(0.2)
    code = command.wait(timeout_s=max(deadline - time.monotonic(), 1))
    admin.dispose()

    assert code == 0, command.output
    assert killed is not None, command.output
    smoke_stages = ["convae-gen.loss", "nf.search", "convae-gen.arch"]
    steps = ["retrain:convae-gen", "retrain:nf", "evaluate:convae-gen", "evaluate:nf", "results:smoke"]
    storage = reader(fresh_postgres_url)
    assert {stage.stage: stage.state for stage in get_stages(storage.engine, "smoke")} == {
        name: StageState.DONE for name in smoke_stages + steps
    }
    storage.engine.dispose()
    trials = assert_budgets_used_exactly(fresh_postgres_url, {name: 2 for name in smoke_stages})

    # the killed trial failed by its heartbeat, and another worker ran its parameters
    study_name, number, pid = killed
    dead = trials[study_name][number]
    assert dead.state == TrialState.FAIL
    assert "fail_reason" not in dead.user_attrs
    retries = [trial for trial in trials[study_name] if trial.system_attrs.get("retry_history", [None])[-1] == number]
    assert len(retries) == 1
    assert retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retries[0].params == dead.params
    assert retries[0].user_attrs["pid"] != pid
    assert f"Retrying trial {number} of study {study_name} as trial {retries[0].number}" in command.output
    assert "since Ray restarted it" in command.output

    # workers ran trials on both nodes, counting the killed one: with six trials, the other
    # worker may finish every remaining trial while Ray restarts the killed one
    finished = [trial for study in trials.values() for trial in study if trial.state != TrialState.FAIL]
    started = [trial for study in trials.values() for trial in study if "node_id" in trial.user_attrs]
    assert len({trial.user_attrs["node_id"] for trial in started}) == 2
    assert {trial.user_attrs["hostname"] for trial in finished} == {socket.gethostname()}

    # connections: 2 workers with two each (hpo.workers.open_worker_storage), the controller's
    # one, plus a small constant
    print(f"jethpo connections to the test database: max {max(connections)} in {len(connections)} samples")
    assert max(connections) <= 2 * 2 + 3, connections


def test_killed_controller_resumes_pipeline(ray_cluster, ray_env, fresh_postgres_url, jets_path, tiny_files):
    space_path, profile_path = tiny_files
    storage = reader(fresh_postgres_url)
    add_space(storage, space_path)
    storage.engine.dispose()
    admin = admin_engine(fresh_postgres_url)
    arguments = run_arguments(fresh_postgres_url, jets_path, ray_cluster, str(profile_path), "--family", "tiny-nf", "--workers", "2")

    # kill the controller once the second stage has started trials
    first = Command(arguments, ray_env)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline and first.process.poll() is None:
        if any(study == "tiny-nf.second" for study, _, _ in running_trials(admin, min_age_s=0.5)):
            break
        time.sleep(0.2)
    first.kill()
    before = {stage.stage: stage for stage in get_stages(admin, "tiny")}
    trials_before = stage_trials(fresh_postgres_url)

    second = Command(arguments, ray_env)
    code = second.wait(timeout_s=RUN_TIMEOUT_S)
    admin.dispose()

    assert code == 0, second.output
    assert before["tiny-nf.first"].state == StageState.DONE, first.output
    assert before["tiny-nf.second"].state == StageState.RUNNING, first.output
    assert "Stage tiny-nf.second of pipeline tiny started" in first.output
    assert "Resuming pipeline tiny" in second.output
    assert " started with a budget" not in second.output

    # no stage started twice, nothing that had finished ran again
    storage = reader(fresh_postgres_url)
    after = {stage.stage: stage for stage in get_stages(storage.engine, "tiny")}
    registered = registered_run(storage, "tiny")
    storage.engine.dispose()
    # a later 'jethpo run' without --profile resumes with this file
    assert registered["profile_file"] == str(Path(profile_path).resolve())
    for name in ("tiny-nf.first", "tiny-nf.second"):
        assert after[name].state == StageState.DONE
        assert after[name].claimed_at == before[name].claimed_at
        assert after[name].claimed_by == before[name].claimed_by
    trials = assert_budgets_used_exactly(fresh_postgres_url, {"tiny-nf.first": 3, "tiny-nf.second": 3})
    assert [trial.state for trial in trials["tiny-nf.first"]] == [trial.state for trial in trials_before["tiny-nf.first"]]
    for old in trials_before["tiny-nf.second"]:
        if old.state.is_finished():
            assert trials["tiny-nf.second"][old.number].state == old.state


# Two families of a small reconstruction-tuned ConVAE, which has no evaluation step, so the
# pipeline is two searches and two retrainings. quick-vae searches one trial of 2 epochs and
# then retrains for 300, and slow-vae searches one trial of 300 epochs. An epoch took about
# 0.05 s in this test on a 2-core VM under load, so a retraining and a trial run side by
# side for about 10 s after the first trial.
INTERRUPT_SPACE = """
name: NAME
description: Small reconstruction-tuned ConVAE for the interruption test.
model: convae
objective: reconstruction
sampler: {type: random, seed: 0}
pruner: {type: none}
stages:
  - name: search
    params:
      lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
    fixed:
      {alpha: 1.0, beta: 0.01, gamma: 0.5, gamma_pt: 1.0, gamma_m: 1.0, latent_dim: 4, n_filters: 4,
       kernel_size: 3, linear_nodes: 32, n_conv_layers: 1, activation: ReLU}
"""

INTERRUPT_PROFILE = """
name: interrupt
n_jets: 600
models:
  convae: &budget
    search: {n_trials: 1, epochs: 2, batch_size: 100, eval_every: 1, resources: {cpus: 1, gpus: 0}}
    retrain: {epochs: 2, batch_size: 100, eval_every: 1, resources: {cpus: 1, gpus: 0}}
  realnvp-latent: *budget
  realnvp-flat: *budget
families:
  quick-vae:
    retrain: {epochs: 300, eval_every: 10}
  slow-vae:
    search: {epochs: 300, eval_every: 10}
"""


@dataclass
class InterruptedRun:
    """A ``jethpo run`` of the interrupt profile, signalled while a retraining and a trial ran."""

    arguments: list[str]
    command: Command
    interrupted: bool
    exit_code: int
    exit_s: float
    state_path: Path


def interrupt_run(
    url: str, jets_path: str, tmp_path: Path, env: dict[str, str], signum: int, to: str = "controller"
) -> InterruptedRun:
    """Start the interrupt profile's run and send it ``signum`` once retrain:quick-vae saved its
    training state while the slow-vae trial runs, then wait for the run to exit.

    ``to`` says which processes get the signal: the ``controller`` alone, as ``docker stop``
    sends it, the controller and then its whole process group, as GNU ``timeout`` sends it,
    or every process of the run's ``session``, as a batch system may send it. The last two
    send it to the local Ray instance's processes too, and the last to the workers as well.
    ``repeated`` sends it to the controller every 0.3 s until it exits, as an impatient user
    presses Ctrl-C.
    """
    storage = reader(url)
    for name in ("quick-vae", "slow-vae"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(INTERRUPT_SPACE.replace("NAME", name))
        add_space(storage, path)
    storage.engine.dispose()
    profile_path = tmp_path / "interrupt.yaml"
    profile_path.write_text(INTERRUPT_PROFILE)
    artifacts = tmp_path / "artifacts"
    state_path = artifacts / "work" / "interrupt" / "retrain-quick-vae" / "training-state.pt"
    # a local Ray instance, as on a user's machine. The grace period is far longer than the
    # test, so nothing is taken over because it went stale. -v shows the workers' log lines.
    arguments = [
        "-v", "run", "--profile", str(profile_path), "--storage", url, "--data", jets_path,
        "--data-dir", str(tmp_path), "--artifacts", str(artifacts), "--family", "quick-vae", "--family", "slow-vae",
        "--workers", "2", "--heartbeat-interval", "1", "--grace-period", "600", "--no-progress",
    ]  # fmt: skip

    admin = admin_engine(url)
    command = Command(arguments, env, new_session=to != "controller")
    interrupted = False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and command.process.poll() is None:
        claimed = query(admin, "SELECT 1 FROM jethpo_stages WHERE stage = 'retrain:quick-vae' AND state = 'running'")
        trial_running = any(study == "slow-vae.search" for study, _, _ in running_trials(admin, min_age_s=0))
        if claimed and trial_running and state_path.exists():
            interrupted = True
            break
        time.sleep(0.2)
    admin.dispose()
    signalled = time.monotonic()
    if to == "session":
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if os.getsid(process.pid) == command.process.pid:
                    process.send_signal(signum)
    elif to == "repeated":
        while command.process.poll() is None:
            command.process.send_signal(signum)
            time.sleep(0.3)
    elif to == "timeout":
        # the second signal arrives while the controller hands the work back
        command.process.send_signal(signum)
        time.sleep(0.2)
        os.killpg(command.process.pid, signum)
    else:
        command.process.send_signal(signum)
    exit_code = command.wait(timeout_s=90)
    return InterruptedRun(arguments, command, interrupted, exit_code, time.monotonic() - signalled, state_path)


def test_interrupted_run_hands_back_its_work(ray_env, fresh_postgres_url, jets_path, tmp_path):
    run = interrupt_run(fresh_postgres_url, jets_path, tmp_path, ray_env, signal.SIGINT)
    first = run.command
    admin = admin_engine(fresh_postgres_url)
    stages = {stage.stage: stage for stage in get_stages(admin, "interrupt")}
    trials = stage_trials(fresh_postgres_url)

    assert run.interrupted, first.output
    assert run.exit_code == 130, first.output
    assert run.exit_s < 20, first.output
    assert stages["retrain:quick-vae"].state == StageState.PENDING
    assert stages["retrain:quick-vae"].claimed_by is None
    assert [trial.state for trial in trials["slow-vae.search"]] == [TrialState.FAIL, TrialState.WAITING]
    failed, retry = trials["slow-vae.search"]
    assert retry.params == failed.params
    assert retry.system_attrs["retry_history"] == [0]
    assert failed.user_attrs["fail_reason"] == "interrupted"
    assert "fail_reason" not in retry.user_attrs
    assert "Handed back 1 step and 1 RUNNING trial of 2 stopped workers" in first.output
    assert run.state_path.exists()

    # the second run takes both over at once, far within the grace period
    second = Command(run.arguments, ray_env)
    code = second.wait(timeout_s=180)
    stages = {stage.stage: stage for stage in get_stages(admin, "interrupt")}
    admin.dispose()

    assert code == 0, second.output
    assert {stage.state for stage in stages.values()} == {StageState.DONE}
    assert "Resuming the retraining of trial 0 of study quick-vae.search after epoch" in second.output
    # the controller logs the resume too, not only the worker
    assert "Step retrain:quick-vae of pipeline interrupt resumed from its saved training state after epoch" in second.output
    trials = assert_budgets_used_exactly(fresh_postgres_url, {"quick-vae.search": 1, "slow-vae.search": 1})
    assert [trial.state for trial in trials["slow-vae.search"]] == [TrialState.FAIL, TrialState.COMPLETE]


_LOCAL_SIGNAL_MASKS = """
import json, os, signal
import psutil
from hpo.workers import connect_ray
connect_ray(None)
import ray

def blocks_sigterm(pid):
    with open(f"/proc/{pid}/status") as status:
        mask = next(int(line.split()[1], 16) for line in status if line.startswith("SigBlk:"))
    return bool(mask >> (signal.SIGTERM - 1) & 1)

@ray.remote(num_cpus=0.5)
def worker_pid():
    return os.getpid()

summary = {child.name(): blocks_sigterm(child.pid) for child in psutil.Process().children()
           if child.name() in ("gcs_server", "raylet")}
summary["worker"] = blocks_sigterm(ray.get(worker_pid.remote(), timeout=120))
summary["controller"] = blocks_sigterm(os.getpid())
ray.shutdown()
print(json.dumps(summary))
"""


def test_local_ray_leaves_sigterm_to_controller(ray_env):
    finished = subprocess.run(
        [sys.executable, "-c", _LOCAL_SIGNAL_MASKS], capture_output=True, text=True, env=ray_env, timeout=300
    )

    assert finished.returncode == 0, finished.stderr[-3000:]
    summary = json.loads(finished.stdout.strip().splitlines()[-1])
    assert summary == {"gcs_server": True, "raylet": True, "worker": True, "controller": False}


@pytest.mark.parametrize("to", ["controller", "timeout", "session"])
def test_sigterm_hands_back_work(ray_env, fresh_postgres_url, jets_path, tmp_path, to):
    # SIGTERM must take the same path as Ctrl-C, whichever processes of the run it reaches
    run = interrupt_run(fresh_postgres_url, jets_path, tmp_path, ray_env, signal.SIGTERM, to=to)
    admin = admin_engine(fresh_postgres_url)
    stages = {stage.stage: stage for stage in get_stages(admin, "interrupt")}
    admin.dispose()
    trials = stage_trials(fresh_postgres_url)

    assert run.interrupted, run.command.output
    assert run.exit_code == 143, run.command.output
    assert run.exit_s < 20, run.command.output
    assert stages["retrain:quick-vae"].state == StageState.PENDING
    assert [trial.state for trial in trials["slow-vae.search"]] == [TrialState.FAIL, TrialState.WAITING]
    assert "Handed back 1 step and 1 RUNNING trial of 2 stopped workers" in run.command.output


def test_repeated_interrupt_stops_ray(ray_env, fresh_postgres_url, jets_path, tmp_path):
    # Ctrl-C pressed again and again may cut the hand-back short, but not the shutdown of
    # the local Ray instance, whose processes ignore SIGTERM
    run = interrupt_run(fresh_postgres_url, jets_path, tmp_path, ray_env, signal.SIGINT, to="repeated")
    session = run.command.process.pid
    deadline = time.monotonic() + 10
    left = ["?"]
    while left and time.monotonic() < deadline:
        left = []
        for process in psutil.process_iter(["name"]):
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if os.getsid(process.pid) == session:
                    left.append(process.info["name"])
        time.sleep(0.5)

    assert run.interrupted, run.command.output
    assert run.exit_code == 130, run.command.output
    assert "Stopping the local Ray instance" in run.command.output
    assert left == [], run.command.output


def _can_restart_postgres(url: str) -> str | None:
    """Return why this test cannot restart the PostgreSQL server, or None if it can."""
    if make_url(url).host not in ("127.0.0.1", "localhost", None):
        return "the test PostgreSQL server is not on this machine"
    if shutil.which("pg_ctlcluster") is None or not Path("/etc/postgresql").is_dir():
        return "pg_ctlcluster is not installed"
    if getpass.getuser() not in ("root", "postgres"):
        return "restarting PostgreSQL needs the root or postgres user"
    return None


def test_postgres_restart_during_trials(ray_cluster, ray_env, fresh_postgres_url, jets_path, tiny_files):
    reason = _can_restart_postgres(fresh_postgres_url)
    if reason is not None:
        pytest.skip(f"Cannot restart PostgreSQL: {reason}.")
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    space_path, profile_path = tiny_files
    storage = reader(fresh_postgres_url)
    add_space(storage, space_path)
    storage.engine.dispose()
    admin = admin_engine(fresh_postgres_url)
    arguments = run_arguments(fresh_postgres_url, jets_path, ray_cluster, str(profile_path), "--family", "tiny-nf", "--workers", "2")

    # restart while a trial reports an EMD_sum about every half second, so that the next
    # reports fall into the restart
    command = Command(arguments, ray_env)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline and command.process.poll() is None:
        reporting = query(
            admin,
            """
            SELECT t.trial_id FROM trials t
            JOIN trial_intermediate_values v ON v.trial_id = t.trial_id
            WHERE t.state = 'RUNNING' GROUP BY t.trial_id HAVING count(*) >= 2
            """,
        )
        if reporting:
            break
        time.sleep(0.1)
    restart = subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    code = command.wait(timeout_s=RUN_TIMEOUT_S)
    admin.dispose()

    assert restart.returncode == 0, restart.stderr
    assert code == 0, command.output
    assert "A worker stopped with an error" not in command.output
    assert "since Ray restarted it" not in command.output
    trials = assert_budgets_used_exactly(fresh_postgres_url, {"tiny-nf.first": 3, "tiny-nf.second": 3})
    retried = [trial for study in trials.values() for trial in study if trial.system_attrs.get("retry_history")]
    assert retried, command.output


def test_worker_command_joins_registered_pipeline(ray_cluster, ray_env, fresh_postgres_url, jets_path, tmp_path):
    space_path = tmp_path / "tiny-nf.yaml"
    space_path.write_text(TINY_SPACE)
    profile_path = tmp_path / "tiny.yaml"
    # enough trials that the joining worker, which starts a few seconds later, still finds some
    profile_path.write_text(TINY_PROFILE.replace("n_trials: 3, epochs: 150", "n_trials: 6, epochs: 60"))
    storage = reader(fresh_postgres_url)
    add_space(storage, space_path)
    storage.engine.dispose()

    # the worker command waits for a pipeline, then works on it next to the controller's worker
    worker = Command(["worker", "--storage", fresh_postgres_url, "--address", ray_cluster, "--workers", "1", *HEARTBEAT], ray_env)
    time.sleep(2)
    controller = Command(
        run_arguments(fresh_postgres_url, jets_path, ray_cluster, str(profile_path), "--family", "tiny-nf", "--workers", "1"),
        ray_env,
    )
    controller_code = controller.wait(timeout_s=RUN_TIMEOUT_S)
    worker_code = worker.wait(timeout_s=60)

    assert controller_code == 0, controller.output
    assert worker_code == 0, worker.output
    assert "Working on pipelines tiny" in worker.output
    trials = assert_budgets_used_exactly(fresh_postgres_url, {"tiny-nf.first": 6, "tiny-nf.second": 6})
    pids = {trial.user_attrs["pid"] for study in trials.values() for trial in study}
    assert len(pids) == 2


def test_join_token_cluster(tmp_path_factory):
    """``ray start`` turns token authentication on where it finds a token, and jethpo joins with no RAY_AUTH_MODE set."""
    # a short folder, because Ray's socket paths under it must stay under 108 bytes
    folder = tmp_path_factory.mktemp("tok")
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # the cluster's token, which `ray start` finds and the driver has to send
    env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    port = free_port()
    address = f"127.0.0.1:{port}"
    head = start_node(
        ["--head", "--port", str(port), "--include-dashboard=false", "--ray-client-server-port", str(free_port())],
        folder / "ray",
        folder / "head.log",
        env,
    )
    # Ray reads RAY_AUTH_MODE when it is imported, as in the jethpo commands, which import it in connect_ray
    script = (
        "import sys\nfrom hpo.workers import connect_ray\n"
        "connect_ray(sys.argv[1])\nimport ray\nprint(int(ray.cluster_resources()['CPU']))\n"
    )
    try:
        result = subprocess.run(
            [sys.executable, "-c", script, address],
            env={**env, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
            capture_output=True,
            text=True,
            timeout=180,
        )
    finally:
        stop_process_group(head)

    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == "2"


def test_join_refused_address_fails_fast():
    from ray.util import get_node_ip_address

    # a port free on the node address, which Ray and the probe use for 127.0.0.1
    with socket.socket() as probe:
        probe.bind((get_node_ip_address(), 0))
        port = probe.getsockname()[1]
    address = f"127.0.0.1:{port}"

    # Ray itself would retry such an address for minutes before it gives up
    with pytest.raises(RunError) as info:
        connect_ray(address)

    message = str(info.value)
    assert f"Failed to join the Ray cluster at {address}: no connection to " in message
    assert f":{port}, where Ray looks for it (Connection refused)" in message


def test_resources_read_as_counts():
    from hpo.workers import _describe_resources

    assert _describe_resources({"CPU": 1, "GPU": 0}) == "1 CPU, 0 GPUs"
    assert _describe_resources({"CPU": 2.5, "GPU": 0.5}) == "2.5 CPUs, 0.5 GPUs"
    assert _describe_resources({"CPU": 16, "GPU": 1}) == "16 CPUs, 1 GPU"


def test_run_checks_address_first(tmp_path):
    from ray.util import get_node_ip_address

    with socket.socket() as probe:
        probe.bind((get_node_ip_address(), 0))
        port = probe.getsockname()[1]
    url = f"sqlite:///{tmp_path / 'jethpo.db'}"

    result = CliRunner().invoke(
        app, ["run", "--profile", "smoke", "--storage", url, "--data-dir", str(tmp_path), "--address", f"127.0.0.1:{port}"]
    )

    assert result.exit_code == 1, result.output
    assert f"Failed to join the Ray cluster at 127.0.0.1:{port}: no connection to " in result.stderr
    # neither the storage nor the jets were made
    assert sorted(path.name for path in tmp_path.iterdir()) == []


def test_join_other_server_fails_fast():
    from ray.util import get_node_ip_address

    # a server that responds as Redis does, on the node address that Ray uses for 127.0.0.1
    server = socket.socket()
    server.bind((get_node_ip_address(), 0))
    server.listen(1)
    port = server.getsockname()[1]

    def answer() -> None:
        connection, _ = server.accept()
        with connection:
            connection.sendall(b"-ERR unknown command\r\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        with pytest.raises(RunError) as info:
            connect_ray(f"127.0.0.1:{port}")
    finally:
        thread.join(timeout=10)
        server.close()

    assert "did not respond with gRPC, as a Ray cluster's address does" in str(info.value)
