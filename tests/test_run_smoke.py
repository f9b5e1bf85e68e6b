"""`jethpo run --profile smoke` from an empty PostgreSQL database to the final table and plots.

The commands run as a user runs them, in subprocesses with a local Ray instance, on the
Pythia 8 jets of the session fixture. The module takes a few minutes.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import h5py
import optuna
import pytest
from optuna.artifacts import get_all_artifact_meta

from models.data import read_jets
from storage import get_stages, open_storage

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

MODELS = ("convae", "convae-nf", "nf")


JETHPO = str(Path(sys.executable).with_name("jethpo"))


def jethpo(*args: str, env: dict[str, str], timeout: float = 1500) -> subprocess.CompletedProcess:
    return subprocess.run(
        [JETHPO, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def smoke_run(module_postgres_url, pythia_jets, tmp_path_factory):
    """Run the smoke pipeline once into its own database and artifact directory."""
    url = module_postgres_url
    folder = tmp_path_factory.mktemp("smoke")
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "JETHPO_STORAGE")}
    env.update({"JETHPO_STORAGE": url, "JETHPO_ARTIFACTS": str(folder / "artifacts"), "JETHPO_DATA_DIR": str(folder)})
    command = (
        "run",
        "--profile",
        "smoke",
        "--data",
        str(pythia_jets.path),
        "--workers",
        "2",
        "--no-progress",
        "--heartbeat-interval",
        "5",
        "--grace-period",
        "30",
    )
    first = jethpo(*command, env=env)
    return {"url": url, "env": env, "folder": folder, "command": command, "first": first}


def test_smoke_run_finishes_every_stage(smoke_run):
    first = smoke_run["first"]
    assert first.returncode == 0, first.stderr[-4000:]

    storage = open_storage(smoke_run["url"])
    stages = {stage.stage: stage for stage in get_stages(storage.engine, "smoke")}
    assert {stage.state.value for stage in stages.values()} == {"done"}
    assert {"retrain:convae-gen", "retrain:convae-rec", "latents:convae-rec", "retrain:latent-nf", "retrain:nf"} <= set(stages)
    assert {"evaluate:convae-gen", "evaluate:latent-nf", "evaluate:nf", "results:smoke"} <= set(stages)
    # the table is printed at the end
    assert "Truth" in first.stdout
    assert "ConVAE+NF" in first.stdout


def test_results_table_has_models_truth_and_published_rows(smoke_run):
    shown = jethpo("results", "--json", env=smoke_run["env"])
    assert shown.returncode == 0, shown.stderr
    document = json.loads(shown.stdout)
    rows = document["rows"]

    models = {row["model"]: row for row in rows if not row.get("published") and row.get("model") in MODELS}
    assert set(models) == set(MODELS)
    for row in models.values():
        for key in ("w1m", "w1p", "w1efp", "fpnd", "cov", "mmd", "emd_sum"):
            assert isinstance(row[key], float) and math.isfinite(row[key]), (row["model"], key)
        assert row["time_us_per_jet"] > 0
        assert row["batch_size"] >= 1
        assert "CPU" in row["device"]
    truth = [row for row in rows if "truth" in str(row.get("label", "")).lower()]
    assert len(truth) == 1
    assert truth[0]["w1m"] >= 0
    published = [row for row in rows if row.get("published")]
    assert {row["w1m"] for row in published} == {4.5e-3, 0.7e-3}

    markdown = jethpo("results", env=smoke_run["env"])
    assert markdown.returncode == 0
    assert "published" in markdown.stdout.lower()


def test_results_files_linked_from_studies(smoke_run):
    folder = Path(smoke_run["env"]["JETHPO_ARTIFACTS"]) / "results" / "smoke"
    assert json.loads((folder / "results.json").read_text())["rows"]
    assert "W1M" in (folder / "results.md").read_text()
    plots = {path.name for path in (folder / "plots").glob("*.png")}
    for family in ("convae-gen", "convae-rec", "latent-nf", "nf"):
        assert f"emd-sum-{family}.png" in plots
    for family in ("convae-gen", "latent-nf", "nf"):
        assert {f"jets-{family}.png", f"efps-{family}.png"} <= plots
    assert {"jets-all-models.png", "efps-all-models.png"} <= plots
    for path in (folder / "plots").glob("*.png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # every plot is linked from a study, so optuna-dashboard shows it
    storage = open_storage(smoke_run["url"])
    linked = set()
    for summary in optuna.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        linked |= {meta.filename for meta in get_all_artifact_meta(study, storage=storage)}
    assert plots <= linked
    assert {"results.json", "results.md", "convae-gen-retrained.pt", "latent-nf-retrained.pt"} <= linked


def test_second_run_changes_nothing(smoke_run):
    storage = open_storage(smoke_run["url"])
    before = {stage.stage: stage.updated_at for stage in get_stages(storage.engine, "smoke")}
    trials = {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(storage)}

    again = jethpo(*smoke_run["command"], env=smoke_run["env"], timeout=300)

    assert again.returncode == 0, again.stderr[-3000:]
    assert "already finished" in again.stderr
    assert "Truth" in again.stdout
    assert {stage.stage: stage.updated_at for stage in get_stages(storage.engine, "smoke")} == before
    assert {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(storage)} == trials


@pytest.mark.parametrize(
    ("model", "kind", "space"),
    [("convae", "convae", "convae-gen"), ("convae-nf", "convae-nf", "latent-nf"), ("nf", "nf", "nf"), ("latent-nf", "convae-nf", "latent-nf")],
)
def test_generate_writes_jets_in_jetnet_layout(smoke_run, model, kind, space, tmp_path):
    out = tmp_path / f"{model}.hdf5"

    made = jethpo("generate", "--model", model, "--jets", "120", "--out", str(out), "--batch-size", "50", env=smoke_run["env"])

    assert made.returncode == 0, made.stderr[-3000:]
    with h5py.File(out, "r") as written:
        assert written["particle_features"].shape == (120, 30, 4)
        assert written["jet_features"].shape == (120, 4)
        assert written["constituents"].shape == (120, 30, 3)
        assert written.attrs["model"] == kind
        assert written.attrs["search_space"] == space
        assert written.attrs["jethpo_version"] == importlib.metadata.version("jethpo")
    jets = read_jets(out)
    assert len(jets) == 120


def test_generate_overwrite(smoke_run, tmp_path):
    out = tmp_path / "jets.hdf5"
    out.write_bytes(b"earlier jets")
    command = ("generate", "--model", "nf", "--jets", "20", "--out", str(out))

    rejected = jethpo(*command, env=smoke_run["env"], timeout=300)

    assert rejected.returncode == 2
    assert f"{out} exists. Pass --overwrite to replace it" in rejected.stderr
    assert out.read_bytes() == b"earlier jets"

    replaced = jethpo(*command, "--overwrite", env=smoke_run["env"], timeout=300)

    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert len(read_jets(out)) == 20


@pytest.mark.parametrize(
    ("model", "expected"),
    [("convae-rec", "generates no jets of its own"), ("nf-typo", "the name of a search space: convae-gen, latent-nf, nf")],
)
def test_generate_rejects_model(smoke_run, model, expected, tmp_path):
    out = tmp_path / "jets.hdf5"

    rejected = jethpo("generate", "--model", model, "--jets", "10", "--out", str(out), env=smoke_run["env"], timeout=300)

    assert rejected.returncode == 2
    assert expected in rejected.stderr
    assert "Traceback" not in rejected.stderr
    assert not out.exists()


def test_retrain_of_a_done_step_asks_for_force(smoke_run):
    shown = jethpo("retrain", "convae-gen.arch", env=smoke_run["env"], timeout=300)

    assert shown.returncode == 1
    assert "--force" in shown.stderr
    assert "Traceback" not in shown.stderr


def test_forced_retrain_reruns_evaluation(smoke_run):
    # runs last: it changes the pipeline that the tests above read
    storage = open_storage(smoke_run["url"])
    before = {stage.stage: stage.checkpoint for stage in get_stages(storage.engine, "smoke")}

    forced = jethpo("retrain", "nf.search", "--force", env=smoke_run["env"], timeout=600)

    assert forced.returncode == 0, forced.stderr[-3000:]
    assert forced.stdout.startswith("Retrained trial")
    stages = {stage.stage: stage for stage in get_stages(storage.engine, "smoke")}
    assert stages["retrain:nf"].state.value == "done"
    assert stages["retrain:nf"].checkpoint != before["retrain:nf"]
    # the steps that used the old model wait for the next run; the others keep their state
    assert stages["evaluate:nf"].state.value == "pending"
    assert stages["results:smoke"].state.value == "pending"
    assert stages["evaluate:convae-gen"].state.value == "done"

    stale = jethpo("results", env=smoke_run["env"], timeout=120)

    assert stale.returncode == 0, stale.stderr[-3000:]
    assert "results step of pipeline smoke is pending" in stale.stderr
    assert "| Model |" in stale.stdout

    again = jethpo(*smoke_run["command"], env=smoke_run["env"], timeout=900)

    assert again.returncode == 0, again.stderr[-3000:]
    stages = {stage.stage: stage for stage in get_stages(storage.engine, "smoke")}
    assert {stage.state.value for stage in stages.values()} == {"done"}
    assert stages["evaluate:nf"].checkpoint != before["evaluate:nf"]
