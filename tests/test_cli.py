"""The study commands of the ``jethpo`` command line, on real PostgreSQL databases and SQLite files.

Most tests call the Typer app in-process with ``CliRunner``, whose result keeps stdout and
stderr apart. Tests of what a user sees on a terminal (one error line, no traceback, a
second process, the dashboard) run the installed ``jethpo`` executable.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState
from typer.testing import CliRunner

from hpo.cli import app
from hpo.spaces import builtin_spaces, load_profile, parse_space
from hpo.studies import add_space, open_study
from storage import open_storage
from storage import pipeline

JETHPO = Path(sys.executable).with_name("jethpo")

pytestmark = [
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
    pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used"),
]

#: A valid two-stage ConVAE space, with its name left open. Each bad file below changes one line.
SPACE_TEMPLATE = """\
name: {name}
model: convae
objective: generation
stages:
  - name: loss
    params:
      lr: {{type: float, low: 1.0e-4, high: 1.0e-2, log: true}}
      alpha: {{type: float, low: 0.1, high: 1.0}}
      beta: {{type: float, low: 0.9, high: 1.0, log: true}}
      gamma: {{type: float, low: 0.1, high: 1.0, step: 0.1}}
      gamma_pt: {{type: float, low: 0.8, high: 1.2}}
      gamma_m: {{type: float, from_data: pt_over_mass, spread: 0.2}}
    fixed: {{latent_dim: 10, n_filters: 5, kernel_size: 3, linear_nodes: 50, n_conv_layers: 1, activation: ReLU}}
  - name: arch
    inherits: loss
    params:
      latent_dim: {{type: int, low: 5, high: 20, step: 5}}
      n_filters: {{type: int, low: 5, high: 10, step: 5}}
      kernel_size: {{type: int, low: 1, high: 3}}
      linear_nodes: {{type: int, low: 50, high: 100, step: 50}}
      n_conv_layers: {{type: int, low: 1, high: 2}}
      activation: {{type: categorical, choices: [ReLU, GELU]}}
"""

#: Line to replace, its replacement, and the texts the error must contain: key path and value.
BAD_SPACES = [
    pytest.param(
        "      alpha: {{type: float, low: 0.1, high: 1.0}}",
        "      alpha: {{type: float, low: 0.1, high: 1.0, colour: red}}",
        ["stages[0].params.alpha.colour = 'red'", "unknown key 'colour'"],
        id="unknown key",
    ),
    pytest.param(
        "      alpha: {{type: float, low: 0.1, high: 1.0}}",
        "      alpha: {{type: float, low: 2.0, high: 1.0}}",
        ["stages[0].params.alpha.low = 2.0", "low is above high"],
        id="low above high",
    ),
    pytest.param(
        "      lr: {{type: float, low: 1.0e-4, high: 1.0e-2, log: true}}",
        "      lr: {{type: float, low: 0.0, high: 1.0e-2, log: true}}",
        ["stages[0].params.lr.low = 0.0", "a log scale needs low > 0"],
        id="log with low 0",
    ),
    pytest.param(
        "      gamma: {{type: float, low: 0.1, high: 1.0, step: 0.1}}",
        "      gamma: {{type: float, low: 0.1, high: 1.0, step: 0.4}}",
        ["stages[0].params.gamma.step = 0.4", "does not divide"],
        id="step not dividing range",
    ),
    pytest.param(
        "      gamma_pt: {{type: float, low: 0.8, high: 1.2}}",
        "      gamma_pt: {{type: float, low: 0.8, high: 1.2}}\n      alpha: {{type: float, low: 0.2, high: 0.9}}",
        ["stages[0].params.alpha", "duplicate key 'alpha', first defined on line 8"],
        id="duplicate parameter",
    ),
    pytest.param(
        "model: convae",
        "model: transformer",
        ["model = 'transformer'", "unknown model kind"],
        id="unknown model kind",
    ),
    pytest.param(
        "      n_conv_layers: {{type: int, low: 1, high: 2}}",
        "      n_conv_layers: {{type: int, low: 1, high: 2",
        ["line 22, column", "YAML syntax error"],
        id="YAML syntax error",
    ),
]


@pytest.fixture(autouse=True)
def no_storage_env(monkeypatch):
    """Keep a JETHPO_STORAGE or JETHPO_DATA_DIR of the calling shell out of the tests."""
    monkeypatch.delenv("JETHPO_STORAGE", raising=False)
    monkeypatch.delenv("JETHPO_DATA_DIR", raising=False)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def write_space(folder: Path, name: str, template: str = SPACE_TEMPLATE) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(template.format(name=name), encoding="utf-8")
    return path


def copy_of_nf(folder: Path) -> Path:
    """Write the shipped nf search space under the name nf-mine to ``folder/space.yaml``."""
    path = folder / "space.yaml"
    path.write_text(builtin_spaces()["nf"].to_yaml().replace("name: nf\n", "name: nf-mine\n", 1))
    return path


def add_stored_space(url: str, path: Path) -> None:
    storage = open_storage(url)
    add_space(storage, path)
    storage.engine.dispose()


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def run_jethpo(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("JETHPO_")}
    return subprocess.run(
        [str(JETHPO), *args], capture_output=True, text=True, timeout=timeout, env=environment
    )


def stderr_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """URL of a SQLite file with the storage schema and nothing else."""
    url = f"sqlite:///{tmp_path / 'jethpo.db'}"
    open_storage(url).engine.dispose()
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """URL of a database without studies or stored search spaces."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("fresh_postgres_url")


def add_loss_trials(url: str, space_name: str = "convae-gen") -> optuna.Study:
    """Write a finished loss study as run_trial would: two COMPLETE, one PRUNED, one FAIL trial."""
    space = builtin_spaces()[space_name]
    loss = space.stage("loss")
    study = open_study(open_storage(url), space, loss, profile=load_profile("smoke"))
    distributions = loss.distributions({"pt_over_mass": 12.0})
    for number, (state, value, reason) in enumerate(
        [
            (TrialState.COMPLETE, 0.25, None),
            (TrialState.COMPLETE, 0.125, None),
            (TrialState.PRUNED, 0.5, None),
            (TrialState.FAIL, None, "nan_loss"),
        ]
    ):
        tuned = {"lr": 1e-3 * (number + 1), "alpha": 0.5, "beta": 0.95, "gamma": 0.5, "gamma_pt": 1.0, "gamma_m": 12.0}
        user_attrs = {"params": {**loss.fixed, **tuned}, "seed": 100 + number, "device": "cpu"}
        if reason:
            user_attrs.update(fail_reason=reason, fail_message="training loss is nan in epoch 1")
        study.add_trial(
            optuna.trial.create_trial(
                params=tuned, distributions=distributions, value=value, state=state, user_attrs=user_attrs
            )
        )
    return study


# spaces list and show


def test_spaces_list_shows_builtin_families(sqlite_url):
    result = invoke("spaces", "list", "--storage", sqlite_url)

    assert result.exit_code == 0, result.output
    for name in ("convae-gen", "convae-rec", "latent-nf", "nf"):
        assert name in result.stdout


def test_spaces_list_json(sqlite_url):
    result = invoke("spaces", "list", "--json", "--storage", sqlite_url)

    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    names = [space["name"] for space in document["spaces"]]
    assert names == ["convae-gen", "convae-rec", "latent-nf", "nf"]
    assert document["spaces"][0]["studies"] == ["convae-gen.loss", "convae-gen.arch"]
    assert {space["origin"] for space in document["spaces"]} == {"shipped"}


def test_spaces_list_default_storage_in_data_dir(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    add_stored_space(f"sqlite:///{data_dir / 'jethpo.db'}", copy_of_nf(tmp_path))

    result = invoke("spaces", "list", "--json", "--data-dir", str(data_dir))

    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["storage"] == f"sqlite:///{data_dir / 'jethpo.db'}"
    assert "nf-mine" in [space["name"] for space in document["spaces"]]


def test_spaces_list_data_dir_from_env(tmp_path):
    data_dir = tmp_path / "from-env"

    result = CliRunner().invoke(app, ["spaces", "list", "--json"], env={"JETHPO_DATA_DIR": str(data_dir)})

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["storage"] == f"sqlite:///{data_dir / 'jethpo.db'}"
    assert not data_dir.exists()


def test_studies_leaves_no_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("JETHPO_STORAGE", raising=False)
    data_dir = tmp_path / "jethpo-data"

    result = invoke("studies", "--data-dir", str(data_dir))

    assert result.exit_code == 1, result.output
    assert "database file not found" in result.stderr
    assert not data_dir.exists()


def test_spaces_list_storage_from_env(tmp_path):
    url = f"sqlite:///{tmp_path / 'env.db'}"
    add_stored_space(url, copy_of_nf(tmp_path))

    result = CliRunner().invoke(app, ["spaces", "list", "--json"], env={"JETHPO_STORAGE": url})

    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["storage"] == url
    assert "nf-mine" in [space["name"] for space in document["spaces"]]


def test_spaces_show_prints_yaml(sqlite_url):
    result = invoke("spaces", "show", "convae-gen", "--storage", sqlite_url)

    assert result.exit_code == 0, result.output
    assert result.stdout == builtin_spaces()["convae-gen"].text
    assert parse_space(result.stdout, "output").fingerprint == builtin_spaces()["convae-gen"].fingerprint


def test_spaces_show_unknown_name(sqlite_url):
    result = invoke("spaces", "show", "convae", "--storage", sqlite_url)

    assert result.exit_code == 1
    assert "search space 'convae' not found" in result.stderr
    assert "convae-gen, convae-rec, latent-nf, nf" in result.stderr
    assert result.stdout == ""


# spaces validate


def test_spaces_validate_valid_file(tmp_path):
    path = write_space(tmp_path, "my-space")

    result = invoke("spaces", "validate", str(path))

    assert result.exit_code == 0, result.output
    assert "valid search space 'my-space'" in result.stdout
    assert "my-space.loss, my-space.arch" in result.stdout


@pytest.mark.parametrize("line, replacement, expected", BAD_SPACES)
def test_spaces_validate_bad_file(tmp_path, line, replacement, expected):
    assert line in SPACE_TEMPLATE
    path = write_space(tmp_path, "bad-space", SPACE_TEMPLATE.replace(line, replacement))

    result = invoke("spaces", "validate", str(path))

    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: {path}")
    for text in expected:
        assert text in result.stderr
    assert len(stderr_lines(result.stderr)) == 1
    assert result.stdout == ""


def test_spaces_validate_empty_file(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")

    result = invoke("spaces", "validate", str(path))

    assert result.exit_code == 1
    assert f"Error: {path}: the search space is empty" in result.stderr


def test_spaces_validate_missing_file(tmp_path):
    path = tmp_path / "missing.yaml"

    result = invoke("spaces", "validate", str(path))

    assert result.exit_code == 1
    assert f"Error: {path}: file not found" in result.stderr


def test_spaces_validate_builtin_name_conflict(tmp_path):
    path = write_space(tmp_path, "nf")

    result = invoke("spaces", "validate", str(path))

    assert result.exit_code == 1
    assert "name = 'nf'" in result.stderr
    assert "Rename the family" in result.stderr


def test_spaces_validate_checks_stored_spaces(tmp_path, sqlite_url):
    name = unique("stored")
    assert invoke("spaces", "add", str(write_space(tmp_path, name)), "--storage", sqlite_url).exit_code == 0
    other = tmp_path / "other"
    other.mkdir()
    changed = write_space(other, name, SPACE_TEMPLATE.replace("high: 1.2}}", "high: 1.5}}"))

    offline = invoke("spaces", "validate", str(changed))
    against_storage = invoke("spaces", "validate", str(changed), "--storage", sqlite_url)

    assert offline.exit_code == 0, offline.output
    assert against_storage.exit_code == 1
    assert "a stored search space" in against_storage.stderr


# spaces add


def test_spaces_add_seen_by_second_process(tmp_path, postgres_url):
    name = unique("added")
    path = write_space(tmp_path, name)

    added = invoke("spaces", "add", str(path), "--storage", postgres_url)
    listed = run_jethpo("spaces", "list", "--json", "--storage", postgres_url)

    assert added.exit_code == 0, added.output
    assert f"Added search space '{name}'" in added.stdout
    assert listed.returncode == 0, listed.stderr
    spaces = {space["name"]: space for space in json.loads(listed.stdout)["spaces"]}
    assert spaces[name]["origin"] == "stored"
    assert spaces[name]["studies"] == [f"{name}.loss", f"{name}.arch"]


def test_spaces_add_then_show(tmp_path, sqlite_url):
    name = unique("added")
    path = write_space(tmp_path, name)
    invoke("spaces", "add", str(path), "--storage", sqlite_url)

    result = invoke("spaces", "show", name, "--storage", sqlite_url)

    assert result.exit_code == 0, result.output
    assert result.stdout == path.read_text(encoding="utf-8")


def test_spaces_add_same_file_twice(tmp_path, sqlite_url):
    path = write_space(tmp_path, unique("added"))
    invoke("spaces", "add", str(path), "--storage", sqlite_url)

    result = invoke("spaces", "add", str(path), "--storage", sqlite_url)

    assert result.exit_code == 0, result.output
    assert "already known with the same content" in result.stdout


def test_spaces_add_conflict_writes_nothing(tmp_path, postgres_url):
    name = unique("added")
    invoke("spaces", "add", str(write_space(tmp_path, name)), "--storage", postgres_url)
    before = pipeline.load_spaces(open_storage(postgres_url).engine)[name]
    other = tmp_path / "other"
    other.mkdir()
    changed = write_space(other, name, SPACE_TEMPLATE.replace("high: 1.2}}", "high: 1.5}}"))

    result = invoke("spaces", "add", str(changed), "--storage", postgres_url)

    assert result.exit_code == 1
    assert f"Error: {changed}" in result.stderr
    assert f"name = '{name}'" in result.stderr
    assert "a stored search space already has this name with different content" in result.stderr
    assert pipeline.load_spaces(open_storage(postgres_url).engine)[name] == before


def test_spaces_add_invalid_file_writes_nothing(tmp_path, sqlite_url):
    name = unique("bad")
    path = write_space(tmp_path, name, SPACE_TEMPLATE.replace("model: convae", "model: transformer"))

    result = invoke("spaces", "add", str(path), "--storage", sqlite_url)

    assert result.exit_code == 1
    assert "model = 'transformer'" in result.stderr
    assert pipeline.load_spaces(open_storage(sqlite_url).engine) == {}


# studies and best


def test_studies_json(empty_url):
    add_loss_trials(empty_url)
    open_study(open_storage(empty_url), builtin_spaces()["nf"], "search")

    result = invoke("studies", "--json", "--storage", empty_url)

    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    studies = {summary["study"]: summary for summary in document["studies"]}
    assert list(studies) == ["convae-gen.loss", "nf.search"]
    loss = studies["convae-gen.loss"]
    assert loss["states"] == {"COMPLETE": 2, "PRUNED": 1, "FAIL": 1, "RUNNING": 0, "WAITING": 0}
    assert loss["best_value"] == 0.125
    assert loss["best_trial"] == 1
    assert loss["fail_reasons"] == {"nan_loss": 1}
    assert loss["budget"]["n_trials"] == 2
    assert studies["nf.search"]["n_trials"] == 0
    assert studies["nf.search"]["best_value"] is None


def test_studies_table(empty_url):
    add_loss_trials(empty_url)

    result = invoke("studies", "--storage", empty_url)

    assert result.exit_code == 0, result.output
    assert "convae-gen.loss" in result.stdout
    assert "0.125" in result.stdout
    assert "convae-gen.loss: nan_loss 1" in result.stdout


def test_studies_empty_storage(sqlite_url):
    result = invoke("studies", "--storage", sqlite_url)

    assert result.exit_code == 0, result.output
    assert "No jethpo studies" in result.stdout


READ_ONLY_COMMANDS = [
    ["studies"],
    ["best", "nf.search"],
    ["results"],
    ["retrain", "nf"],
    ["generate", "--model", "nf", "--jets", "10", "--out", "sampled.h5"],
    ["spaces", "validate", "space.yaml"],
]
"""Commands that read what a run stored, and must not create a storage."""


def _command_id(command: list[str]) -> str:
    return command[0] if command[0] != "spaces" else "spaces-validate"


@pytest.mark.parametrize("command", [*READ_ONLY_COMMANDS, ["dashboard"]], ids=_command_id)
def test_mistyped_sqlite_path_creates_nothing(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    copy_of_nf(tmp_path)
    missing = tmp_path / "jethpo.bd"

    result = invoke(*command, "--storage", f"sqlite:///{missing}")

    assert result.exit_code == 1, result.output
    assert f"Failed to open storage 'sqlite:///{missing}': database file not found" in result.output
    assert "'jethpo run', which creates it" in result.output
    assert sorted(path.name for path in tmp_path.iterdir()) == ["space.yaml"]


def _table_names(url: str) -> list[str]:
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as connection:
        names = sqlalchemy.inspect(connection).get_table_names()
    engine.dispose()
    return names


@pytest.mark.parametrize("command", READ_ONLY_COMMANDS, ids=_command_id)
def test_empty_database_gets_no_tables(tmp_path, monkeypatch, fresh_postgres_url, command):
    monkeypatch.chdir(tmp_path)
    copy_of_nf(tmp_path)

    result = invoke(*command, "--storage", fresh_postgres_url)

    assert result.exit_code == 1, result.output
    assert "no jethpo storage found in the database. Check the database name" in result.output
    assert "Traceback" not in result.output
    assert _table_names(fresh_postgres_url) == []


def test_spaces_list_on_empty_database(fresh_postgres_url):
    result = invoke("spaces", "list", "--storage", fresh_postgres_url)

    assert result.exit_code == 0, result.output
    for name in builtin_spaces():
        assert name in result.stdout
    assert _table_names(fresh_postgres_url) == []


@pytest.mark.parametrize(
    ("device", "expected"),
    [("bogus", "invalid device 'bogus'"), ("cuda", "PyTorch finds no CUDA GPU. Use cpu.")],
)
def test_generate_rejects_device(sqlite_url, tmp_path, device, expected):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    result = invoke("generate", "--model", "nf", "--jets", "10", "--out", str(tmp_path / "jets.hdf5"),
                    "--device", device, "--storage", sqlite_url)  # fmt: skip

    assert result.exit_code == 1, result.output
    assert expected in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("pipeline", "expected"),
    [
        ([], ["Error: no pipeline has retrained a nf model yet. Run 'jethpo run' to the end first."]),
        (["--pipeline", "quick"], ["Error: pipeline 'quick' not found in sqlite:///", "Registered pipelines: none. Check --pipeline."]),
    ],
    ids=["any", "named"],
)
def test_generate_before_retraining(sqlite_url, tmp_path, pipeline, expected):
    out = tmp_path / "jets.hdf5"

    result = invoke("generate", "--model", "nf", "--jets", "10", "--out", str(out), "--storage", sqlite_url, *pipeline)

    assert result.exit_code == 1, result.output
    for text in expected:
        assert text in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("command", [["spaces", "list"], ["spaces", "show", "nf"]], ids=["list", "show"])
def test_spaces_without_database_file(tmp_path, command):
    missing = tmp_path / "jethpo.db"

    result = invoke(*command, "--storage", f"sqlite:///{missing}")

    assert result.exit_code == 0, result.output
    assert "nf" in result.stdout
    assert not missing.exists()
    assert list(tmp_path.iterdir()) == []


def test_best_json(empty_url):
    add_loss_trials(empty_url)

    result = invoke("best", "convae-gen.loss", "--json", "--storage", empty_url)

    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["number"] == 1
    assert summary["value"] == 0.125
    assert summary["params"]["lr"] == pytest.approx(2e-3)
    assert summary["params"]["latent_dim"] == 30
    assert summary["fixed"]["linear_nodes"] == 1500
    assert summary["user_attrs"]["seed"] == 101


def test_best_table(empty_url):
    add_loss_trials(empty_url)

    result = invoke("best", "convae-gen.loss", "--storage", empty_url)

    assert result.exit_code == 0, result.output
    assert "best trial 1, EMD_sum 0.125" in result.stdout
    assert "latent_dim" in result.stdout
    assert "fixed" in result.stdout


def test_best_unknown_study_lists_known(sqlite_url):
    result = invoke("best", "convae-gen.retrain", "--storage", sqlite_url)

    assert result.exit_code == 1
    assert "Study 'convae-gen.retrain' not found" in result.stderr
    assert "convae-gen.loss, convae-gen.arch" in result.stderr
    assert result.stdout == ""


def test_best_study_not_started(sqlite_url):
    result = invoke("best", "nf.search", "--json", "--storage", sqlite_url)

    assert result.exit_code == 1
    assert "Study 'nf.search' not found in the storage" in result.stderr
    assert result.stdout == ""


def test_best_study_without_complete_trial(sqlite_url):
    open_study(open_storage(sqlite_url), builtin_spaces()["nf"], "search")

    result = invoke("best", "nf.search", "--storage", sqlite_url)

    assert result.exit_code == 1
    assert "no COMPLETE trial yet (no trials)" in result.stderr


# enqueue


def test_enqueue_creates_waiting_trial(empty_url):
    result = invoke("enqueue", "nf.search", "--params", '{"lr": 0.001, "n_flows": 20}', "--storage", empty_url)

    assert result.exit_code == 0, result.output
    assert "Enqueued a WAITING trial in study nf.search" in result.stdout
    study = optuna.load_study(study_name="nf.search", storage=open_storage(empty_url))
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 1
    assert waiting[0].system_attrs["fixed_params"] == {"lr": 0.001, "n_flows": 20}


def test_enqueue_into_finished_stage_rejected(sqlite_url):
    from storage.pipeline import claim_stage, finish_stage, upsert_stage

    engine = open_storage(sqlite_url).engine
    # the retraining step names the same study as the search stage
    for stage in ("nf.search", "retrain:nf"):
        upsert_stage(engine, "quick", stage, study_name="nf.search", family="nf")
        claim_stage(engine, "quick", stage, "test")
        finish_stage(engine, "quick", stage, "done")

    result = invoke("enqueue", "nf.search", "--params", '{"n_flows": 20}', "--storage", sqlite_url)

    assert result.exit_code == 1
    assert "finished stage of pipeline quick, and no worker" in result.stderr
    assert "Traceback" not in result.output


def test_enqueue_duplicate_reported(sqlite_url):
    arguments = ["enqueue", "nf.search", "--params", '{"n_flows": 20}', "--storage", sqlite_url]
    invoke(*arguments)

    result = invoke(*arguments)

    assert result.exit_code == 0, result.output
    assert "nothing was enqueued" in result.stdout


def test_enqueue_outside_space_rejected(sqlite_url):
    result = invoke("enqueue", "convae-gen.arch", "--params", '{"n_conv_layers": 7}', "--storage", sqlite_url)

    assert result.exit_code == 1
    assert "n_conv_layers = 7" in result.stderr
    assert "out of range [1, 4]" in result.stderr
    assert len(stderr_lines(result.stderr)) == 1
    assert "convae-gen.arch" not in optuna.get_all_study_names(open_storage(sqlite_url))


def test_enqueue_wrong_choice_rejected(sqlite_url):
    result = invoke("enqueue", "convae-gen.arch", "--params", '{"activation": "Tanh"}', "--storage", sqlite_url)

    assert result.exit_code == 1
    assert "activation = 'Tanh': not one of the choices" in result.stderr


@pytest.mark.parametrize(
    "params, expected",
    [
        ('{"lr": 0.001', "not valid JSON"),
        ("lr=0.001", "not valid JSON"),
        ('[0.001, 20]', "expected a JSON object"),
        ('{"latent_dim": 40, "latent_dim": 50}', "the key 'latent_dim' appears twice"),
    ],
)
def test_enqueue_malformed_params(sqlite_url, params, expected):
    result = invoke("enqueue", "nf.search", "--params", params, "--storage", sqlite_url)

    assert result.exit_code == 1
    assert f"Error: invalid --params {params!r}: {expected}" in result.stderr
    assert len(stderr_lines(result.stderr)) == 1


def test_enqueue_unknown_study(sqlite_url):
    result = invoke("enqueue", "nf.loss", "--params", "{}", "--storage", sqlite_url)

    assert result.exit_code == 1
    assert "Study 'nf.loss' not found" in result.stderr
    assert "nf.search" in result.stderr


# storage errors, in a separate process as a user runs them


def test_unreachable_database_one_line():
    result = run_jethpo("studies", "--json", "--storage", "postgresql://postgres:secret@127.0.0.1:1/x")

    assert result.returncode == 1
    lines = stderr_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: Failed to open storage 'postgresql://postgres:***@127.0.0.1:1/x'")
    assert "secret" not in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_bad_storage_url_one_line():
    result = run_jethpo("spaces", "list", "--storage", "nosuchdb://x")

    assert result.returncode == 1
    lines = stderr_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert "Unsupported storage URL 'nosuchdb://x'" in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["best", "nf.search"],
        ["enqueue", "nf.search", "--params", "{}"],
        ["spaces", "show", "nf"],
        ["spaces", "add", "space.yaml"],
        ["dashboard"],
    ],
    ids=["best", "enqueue", "show", "add", "dashboard"],
)
def test_unreachable_database_every_command(args):
    result = invoke(*args, "--storage", "postgresql://postgres:secret@127.0.0.1:1/x")

    assert result.exit_code == 1
    assert "Failed to open storage" in result.stderr
    assert "secret" not in result.output


# dashboard


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fetch_study_names(port: int, timeout_s: float) -> list[str] | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as reply:
                body = json.load(reply)
            return [study["study_name"] for study in body["study_summaries"]]
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.25)
    return None


def test_dashboard_lists_studies(postgres_url, tmp_path):
    name = unique("dashboard")
    space = parse_space(SPACE_TEMPLATE.format(name=name), f"{name}.yaml")
    storage = open_storage(postgres_url)
    for stage in space.stages:
        open_study(storage, space, stage)
    port = free_port()

    environment = {key: value for key, value in os.environ.items() if not key.startswith("JETHPO_")}
    dashboard = subprocess.Popen(
        [str(JETHPO), "dashboard", "--storage", postgres_url, "--data-dir", str(tmp_path), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=environment,
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

    assert names is not None, "jethpo dashboard did not answer /api/studies within 30 s"
    assert f"{name}.loss" in names
    assert f"{name}.arch" in names


def test_dashboard_port_in_use(sqlite_url, tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        result = invoke("dashboard", "--storage", sqlite_url, "--data-dir", str(tmp_path), "--port", str(port))

    assert result.exit_code == 1
    assert f"failed to listen on 127.0.0.1:{port}" in result.stderr
    assert "Pass another --port" in result.stderr


# data generate keeps working next to the new commands


def test_help_reflows_docstring_paragraphs():
    result = CliRunner().invoke(app, ["retrain", "--help"], env={"COLUMNS": "200"}, terminal_width=200)

    assert result.exit_code == 0, result.output
    # the docstring breaks this sentence after "it runs"
    assert "and it runs as a Ray task" in result.stdout


@pytest.mark.parametrize("command", ["run", "worker", "retrain"])
def test_help_fits_80_columns(command):
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "80"}, terminal_width=80)

    assert result.exit_code == 0, result.output
    assert "--heartbeat-interval" in result.stdout
    assert "--no-keep-freed-memory" in result.stdout
    assert "…" not in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= 80


def test_command_list_fits_80_columns():
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "80"}, terminal_width=80)

    assert result.exit_code == 0, result.output
    commands = result.stdout.split("Commands:")[1].splitlines()
    assert [line for line in commands if line.strip()]
    assert not [line for line in commands if line.endswith("...")]


def test_data_generate_help():
    result = invoke("data", "generate", "--help")

    assert result.exit_code == 0, result.output
    assert "--jets" in result.stdout
