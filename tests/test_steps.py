"""Pipeline steps on real PostgreSQL: claiming, retraining, resuming after a crash, artifacts."""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.artifacts import get_all_artifact_meta
from optuna.trial import TrialState

from hpo.pipeline import advance_pipeline, load_stage_records, plan_pipeline, register_pipeline
from hpo.spaces import parse_profile, parse_space
from hpo.steps import claimable_steps, step_is_stale
from hpo.workers import WorkerSettings, _run_info, run_step
from models.checkpoint import CheckpointError, load_checkpoint
from storage import StageState, get_stages, open_storage, save_space
from storage.artifacts import ArtifactError, download_file, open_artifact_store
from storage.pipeline import finish_stage, get_outputs, reclaim_stage, set_output, touch_stage

pytestmark = [
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
    pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used"),
]

SPACE = """
name: flat
model: realnvp-flat
objective: generation
sampler: {type: random, seed: 0}
pruner: {type: none}
stages:
  - name: search
    params:
      lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    fixed: {n_flows: 2, n_mlp_layers: 1, nodes_1: 16}
"""

PROFILE = """
name: steps
n_jets: 600
models:
  convae: &budget
    search: {{n_trials: 2, epochs: 1, batch_size: 100, eval_every: 1, resources: {{cpus: 1, gpus: 0}}}}
    retrain: {{epochs: {epochs}, batch_size: 100, eval_every: 1, resources: {{cpus: 1, gpus: 0}}}}
  realnvp-latent: *budget
  realnvp-flat: *budget
families: {{}}
"""

PARAMS = {"lr": 1e-3, "n_flows": 2, "n_mlp_layers": 1, "nodes_1": 16}


def searched_pipeline(url: str, jets_path: str, artifact_dir: Path, epochs: int = 3):
    """Register the one-space pipeline and finish its search stage with two COMPLETE trials."""
    storage = open_storage(url, heartbeat_interval=1, grace_period=2)
    save_space(storage.engine, "flat", SPACE)
    space = parse_space(SPACE, "test space")
    plan = plan_pipeline({"flat": space}, parse_profile(PROFILE.format(epochs=epochs), "test profile"))
    register_pipeline(storage, plan, _run_info(Path(jets_path), plan.profile, artifact_dir))
    records = lambda: load_stage_records(storage, "steps")  # noqa: E731
    advance_pipeline(storage, records(), "controller")
    study = optuna.load_study(study_name="flat.search", storage=storage)
    for number, (lr, value) in enumerate([(1e-3, 2.0), (3e-3, 5.0)]):
        study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.COMPLETE,
                value=value,
                params={"lr": lr},
                distributions={"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)},
                user_attrs={"params": {**PARAMS, "lr": lr}, "seed": 100 + number},
            )
        )
    advance_pipeline(storage, records(), "controller")
    return storage, records


@pytest.fixture
def settings(fresh_postgres_url):
    return WorkerSettings(fresh_postgres_url, heartbeat_interval=1, grace_period=2, poll_interval_s=0.2)


@pytest.fixture
def jets_path(pythia_jets):
    return str(pythia_jets.path)


# claims in the storage


def test_steps_wait_for_their_inputs(settings, jets_path, tmp_path):
    storage = open_storage(settings.storage_url, heartbeat_interval=1, grace_period=2)
    save_space(storage.engine, "flat", SPACE)
    plan = plan_pipeline({"flat": parse_space(SPACE, "test space")}, parse_profile(PROFILE.format(epochs=1), "p"))
    register_pipeline(storage, plan, _run_info(Path(jets_path), plan.profile, tmp_path))

    # the search has not run: no step may start
    assert claimable_steps(load_stage_records(storage, "steps"), grace_period_s=2) == []

    storage, records = searched_pipeline(settings.storage_url, jets_path, tmp_path)
    names = [record.name for record in claimable_steps(records(), grace_period_s=2)]
    # the evaluation waits for the retraining
    assert names == ["retrain:flat"]


def test_only_one_of_many_claimers_gets_a_step(settings, jets_path, tmp_path):
    from hpo.steps import StepRunner

    storage, records = searched_pipeline(settings.storage_url, jets_path, tmp_path)
    record = next(item for item in records() if item.name == "retrain:flat")
    runners = [
        StepRunner(open_storage(settings.storage_url), f"claimer-{index}", 1, 2, data_loader=lambda _: None)
        for index in range(4)
    ]
    barrier = threading.Barrier(len(runners))
    won = []

    def claim(runner):
        barrier.wait()
        if runner.claim(record):
            won.append(runner.owner)

    threads = [threading.Thread(target=claim, args=(runner,)) for runner in runners]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(won) == 1
    stored = {stage.stage: stage for stage in get_stages(storage.engine, "steps")}
    assert stored["retrain:flat"].claimed_by == won[0]


def test_step_claim_kept_while_touched(settings, jets_path, tmp_path):
    storage, records = searched_pipeline(settings.storage_url, jets_path, tmp_path)
    engine = storage.engine
    from storage.pipeline import claim_stage

    assert claim_stage(engine, "steps", "retrain:flat", "first")
    now = datetime.datetime.now(datetime.timezone.utc)

    # a step touched a moment ago is alive
    assert touch_stage(engine, "steps", "retrain:flat", "first")
    assert not reclaim_stage(engine, "steps", "retrain:flat", "second", now - datetime.timedelta(seconds=2))
    record = next(item for item in records() if item.name == "retrain:flat")
    assert not step_is_stale(record, grace_period_s=2)

    # three seconds later without a touch, it is stale and one process takes it over
    time.sleep(3)
    record = next(item for item in records() if item.name == "retrain:flat")
    assert step_is_stale(record, grace_period_s=2)
    assert record in claimable_steps(records(), grace_period_s=2)
    cutoff = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=2)
    assert reclaim_stage(engine, "steps", "retrain:flat", "second", cutoff)
    assert not reclaim_stage(engine, "steps", "retrain:flat", "third", cutoff)

    # the first claimer can neither touch nor finish it any more
    assert not touch_stage(engine, "steps", "retrain:flat", "first")
    assert not finish_stage(engine, "steps", "retrain:flat", StageState.DONE, owner="first")
    assert finish_stage(engine, "steps", "retrain:flat", StageState.DONE, owner="second")


def test_hand_back_releases_only_stopped_workers(settings, jets_path, tmp_path, caplog):
    from hpo.workers import _release_work
    from storage.pipeline import claim_stage

    storage, _ = searched_pipeline(settings.storage_url, jets_path, tmp_path)
    engine = storage.engine
    stopped = {"node_id": "node-a", "hostname": "host-a", "pid": 101, "worker": 0}
    # a worker of another controller with the same pid and index, on another host
    other = {"node_id": "node-b", "hostname": "host-b", "pid": 101, "worker": 0}
    assert claim_stage(engine, "steps", "retrain:flat", "host-a:101:worker-0")
    assert claim_stage(engine, "steps", "evaluate:flat", "host-b:101:worker-0")
    study = optuna.load_study(study_name="flat.search", storage=storage)
    numbers = {}
    for name, identity in (("stopped", stopped), ("other", other)):
        trial = study.ask()
        trial.suggest_float("lr", 1e-4, 1e-2, log=True)
        for key, value in identity.items():
            trial.set_user_attr(key, value)
        numbers[name] = trial.number

    with caplog.at_level("INFO", logger="hpo.workers"):
        _release_work(storage, ["steps"], [stopped])

    stages = {stage.stage: stage for stage in get_stages(engine, "steps")}
    assert stages["retrain:flat"].state == StageState.PENDING
    assert stages["retrain:flat"].claimed_by is None
    assert stages["evaluate:flat"].state == StageState.RUNNING
    assert stages["evaluate:flat"].claimed_by == "host-b:101:worker-0"
    trials = study.get_trials()
    assert trials[numbers["stopped"]].state == TrialState.FAIL
    assert trials[numbers["other"]].state == TrialState.RUNNING
    retries = [trial for trial in trials if trial.system_attrs.get("retry_history") == [numbers["stopped"]]]
    assert [trial.state for trial in retries] == [TrialState.WAITING]
    assert retries[0].params == trials[numbers["stopped"]].params
    assert "Handed back 1 step and 1 RUNNING trial of 1 stopped worker" in caplog.text


def test_outputs_are_replaced_not_duplicated(settings, jets_path, tmp_path):
    storage, _ = searched_pipeline(settings.storage_url, jets_path, tmp_path)

    set_output(storage.engine, "steps", "retrain:flat", {"error": "first try"})
    set_output(storage.engine, "steps", "retrain:flat", {"checkpoint": "abc", "emd_sum": 1.5})

    assert get_outputs(storage.engine, "steps") == {"retrain:flat": {"checkpoint": "abc", "emd_sum": 1.5}}


# retraining


def test_retrain_keeps_best_checkpoint(settings, jets_path, tmp_path):
    storage, records = searched_pipeline(settings.storage_url, jets_path, tmp_path, epochs=4)

    result = run_step(settings, "steps", "retrain:flat")

    assert result["state"] == "done"
    output = result["output"]
    # the best trial (EMD_sum 2.0) is retrained with its own parameters and seed
    assert output["trial"] == 0
    assert output["params"]["lr"] == pytest.approx(1e-3)
    assert output["seed"] == 100
    assert [epoch for epoch, _ in output["history"]] == [1, 2, 3, 4]
    best_epoch, best_value = min(output["history"], key=lambda item: item[1])
    assert output["best_epoch"] == best_epoch
    assert output["emd_sum"] == pytest.approx(best_value)

    # the checkpoint and the EMD_sum plot are artifacts of the study
    study = optuna.load_study(study_name="flat.search", storage=storage)
    linked = {meta.artifact_id: meta.filename for meta in get_all_artifact_meta(study, storage=storage)}
    assert linked[output["checkpoint"]] == "flat-retrained.pt"
    assert linked[output["plots"]["history"]] == "emd-sum-flat.png"
    assert study.user_attrs["retrained"]["checkpoint"] == output["checkpoint"]

    # the checkpoint loads with weights_only and refuses other data
    store = open_artifact_store(tmp_path)
    path = download_file(store, output["checkpoint"], tmp_path / "copy.pt")
    fingerprint = records()[0].run["data_fingerprint"]
    checkpoint = load_checkpoint(path, data_fingerprint=fingerprint)
    assert checkpoint["epoch"] == best_epoch
    assert checkpoint["jethpo_version"]
    with pytest.raises(CheckpointError, match=fingerprint[:12]):
        load_checkpoint(path, data_fingerprint="0" * 64)

    stored = {stage.stage: stage for stage in get_stages(storage.engine, "steps")}
    assert stored["retrain:flat"].state == StageState.DONE
    assert stored["retrain:flat"].checkpoint == output["checkpoint"]


_CRASHING_RUN = """
import sys
from hpo.workers import WorkerSettings, run_step
settings = WorkerSettings(sys.argv[1], heartbeat_interval=1, grace_period=2)
run_step(settings, "steps", "retrain:flat")
"""


def test_retrain_resumes_after_kill(settings, jets_path, tmp_path, caplog):
    storage, records = searched_pipeline(settings.storage_url, jets_path, tmp_path, epochs=40)
    state_path = tmp_path / "work" / "steps" / "retrain-flat" / "training-state.pt"

    # a process that claims the retraining dies once it saved a few epochs
    process = subprocess.Popen(
        [sys.executable, "-c", _CRASHING_RUN, settings.storage_url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not state_path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert state_path.exists(), "the retraining saved no training state within 2 minutes"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    record = next(item for item in records() if item.name == "retrain:flat")
    assert record.state == StageState.RUNNING
    # the retraining reports its epochs for the controller's progress view
    reported = get_outputs(storage.engine, "steps")["retrain:flat"]["progress"]
    assert reported["epochs"] == 40
    assert reported["resumed_after"] == 0

    # after the grace period, another process takes it over and resumes
    time.sleep(3)
    with caplog.at_level("INFO", logger="hpo.steps"):
        result = run_step(settings, "steps", "retrain:flat")

    resumed = [message for message in caplog.messages if message.startswith("Resuming the retraining")]
    assert resumed, "the second process started the retraining from scratch"
    resumed_after = int(resumed[0].rsplit(" ", 1)[1])
    assert 1 <= resumed_after < 40
    assert result["state"] == "done"
    # the history spans the epochs of both processes, each once
    assert [epoch for epoch, _ in result["output"]["history"]] == list(range(1, 41))
    # the work folder held only copies of artifacts and the training state
    assert not state_path.parent.exists()
    assert result["output"]["checkpoint"] in os.listdir(tmp_path)


@pytest.mark.parametrize("others", [0, 1], ids=["empty-folder", "other-artifacts"])
def test_missing_artifact_names_folder(tmp_path, others):
    store = open_artifact_store(tmp_path / "artifacts")
    for index in range(others):
        (tmp_path / "artifacts" / f"other-{index}").write_bytes(b"x")

    with pytest.raises(ArtifactError) as caught:
        download_file(store, "model-id", tmp_path / "inputs" / "model.pt")

    message = str(caught.value)
    assert f"Artifact model-id is not in the artifact directory '{tmp_path / 'artifacts'}'" in message
    assert ("which is empty" in message) == (others == 0)
    assert "Pass the folder that holds the pipeline's artifacts with --artifacts" in message
    assert not (tmp_path / "inputs" / "model.pt").exists()


def test_artifact_download_by_many_workers_at_once(tmp_path):
    # workers of a latent flow fetch the same retrained ConVAE into one folder
    store = open_artifact_store(tmp_path / "artifacts")
    source = tmp_path / "model.pt"
    source.write_bytes(bytes(range(256)) * 4096)
    with open(source, "rb") as stream:
        store.write("model-id", stream)
    errors = []

    def fetch():
        try:
            download_file(store, "model-id", tmp_path / "inputs" / "model.pt")
        except Exception as error:  # collected for the assert below
            errors.append(error)

    threads = [threading.Thread(target=fetch) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert (tmp_path / "inputs" / "model.pt").read_bytes() == source.read_bytes()
    assert [path.name for path in (tmp_path / "inputs").iterdir()] == ["model.pt"]
