"""Progress of a pipeline's steps: how the table and the log show them, and the ETA they add.

Most tests build stage records and trials in memory. The storage tests register a pipeline
on a real SQLite file under tmp_path and on a throwaway PostgreSQL database from
conftest.py, and write finished trials as a worker would leave them.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import logging

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from hpo.pipeline import (
    EVALUATE,
    LATENTS,
    RETRAIN,
    SEARCH,
    StageCounts,
    StageRecord,
    load_stage_records,
    plan_pipeline,
    register_pipeline,
)
from hpo.progress import PipelineMonitor, PipelineProgress, StageProgress, read_progress, render_table
from hpo.spaces import Resources, RetrainBudget, SearchBudget, parse_profile, parse_space
from storage import StageState, open_storage, save_space
from storage.pipeline import finish_stage

pytestmark = [
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
    pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used"),
]

NOW = datetime.datetime(2024, 1, 1, 12, 0, 0, tzinfo=datetime.timezone.utc)
CPU = Resources(cpus=1.0, gpus=0.0)

SPACE = """
name: toy-nf
model: realnvp-flat
objective: generation
sampler: {type: random, seed: 0}
pruner: {type: none}
stages:
  - name: only
    params:
      lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    fixed: {n_flows: 2, n_mlp_layers: 1, nodes_1: 16}
"""

PROFILE = """
name: toy
n_jets: 600
models:
  convae: &budget
    search: {n_trials: 2, epochs: 4, batch_size: 100, eval_every: 2, resources: {cpus: 1, gpus: 0}}
    retrain: {epochs: 30, batch_size: 100, eval_every: 2, resources: {cpus: 1, gpus: 0}}
  realnvp-latent: *budget
  realnvp-flat: *budget
families: {}
"""

RUN_INFO = {"data_path": "/data/jets.hdf5", "n_jets": 600, "split_seed": 0, "data_fingerprint": "f" * 64}


@dataclasses.dataclass(frozen=True)
class ClaimedStageRecord(StageRecord):
    """A stage record that carries the claim time of its ``jethpo_stages`` row."""

    claimed_at: datetime.datetime | None = None


def trial(number: int, state: TrialState, seconds: float, *, value: float | None = None, last_epoch: int | None = None) -> FrozenTrial:
    start = NOW - datetime.timedelta(hours=1)
    return FrozenTrial(
        number=number,
        state=state,
        value=value,
        datetime_start=start,
        datetime_complete=start + datetime.timedelta(seconds=seconds),
        params={"lr": 1e-3},
        distributions={"lr": FloatDistribution(1e-4, 1e-2, log=True)},
        user_attrs={},
        system_attrs={},
        intermediate_values={epoch: 5.0 for epoch in range(1, (last_epoch or 0) + 1)},
        trial_id=number,
    )


def search_record(name: str, family: str, state: StageState, *, epochs: int = 4, n_trials: int = 2) -> StageRecord:
    return StageRecord(
        pipeline="toy",
        name=name,
        kind=SEARCH,
        state=state,
        depends_on=(),
        order=(0, 0, 0),
        study_name=name,
        budget=SearchBudget(n_trials=n_trials, epochs=epochs, batch_size=100, eval_every=2, resources=CPU),
        claimed_by="controller:1",
        family=family,
    )


def step_record(
    kind: str,
    family: str,
    state: StageState,
    depends_on: tuple[str, ...],
    *,
    retrain_epochs: int = 30,
    claimed_at: datetime.datetime | None = None,
) -> StageRecord:
    return ClaimedStageRecord(
        pipeline="toy",
        name=f"{kind}:{family}",
        kind=kind,
        state=state,
        depends_on=depends_on,
        order=(1, 0, 1),
        study_name=f"{family}.only",
        retrain=RetrainBudget(epochs=retrain_epochs, batch_size=100, eval_every=2, resources=CPU) if kind == RETRAIN else None,
        claimed_by="node-b:4242" if state != StageState.PENDING else None,
        family=family,
        claimed_at=claimed_at,
    )


def step_progress(name: str, state: StageState, *, estimate_s: float | None, running_s: float | None = None) -> StageProgress:
    return StageProgress(
        name=name,
        pipeline="toy",
        state=state,
        n_trials=0,
        counts=StageCounts(),
        best_value=None,
        best_trial=None,
        mean_trial_s=None,
        is_step=True,
        claimed_by="node-b:4242" if state == StageState.RUNNING else None,
        running_s=running_s,
        estimate_s=estimate_s,
    )


def rendered(progress: PipelineProgress) -> list[str]:
    from rich.console import Console

    console = Console(file=io.StringIO(), width=80, record=True)
    console.print(render_table(progress))
    return [line.rstrip() for line in console.export_text().splitlines()]


def title_of(lines: list[str]) -> str:
    """Return the table title, whose lines wrap at 80 columns, as one line."""
    header = next(index for index, line in enumerate(lines) if line.split()[:1] == ["Stage"])
    return " ".join(lines[:header])


def row_of(lines: list[str], name: str) -> list[str]:
    for line in lines:
        cells = line.split()
        if cells and cells[0] == name:
            return cells
    raise AssertionError(f"no table row for {name!r} in:\n" + "\n".join(lines))


# step estimates


def test_retrain_estimate_uses_best_trial():
    # best trial: 4 epochs in 80 s, so 20 s per epoch, for 30 retraining epochs
    search = search_record("toy-nf.only", "toy-nf", StageState.DONE)
    retrain = step_record(RETRAIN, "toy-nf", StageState.PENDING, ("toy-nf.only",))
    trials = {
        "toy-nf.only": [
            trial(0, TrialState.COMPLETE, 40.0, value=2.0),
            trial(1, TrialState.COMPLETE, 80.0, value=1.0),
        ]
    }

    progress = read_progress([search, retrain], trials, workers=2, now=NOW)

    assert progress.stages[1].estimate_s == pytest.approx(30 * 20.0)
    assert progress.eta_s() == pytest.approx(30 * 20.0)


def test_retrain_estimate_from_pruned_epochs():
    # no COMPLETE trial: 30 s for 2 epochs and 90 s for 4 epochs, 20 s per epoch together
    search = search_record("toy-nf.only", "toy-nf", StageState.RUNNING)
    retrain = step_record(RETRAIN, "toy-nf", StageState.PENDING, ("toy-nf.only",))
    trials = {
        "toy-nf.only": [
            trial(0, TrialState.PRUNED, 30.0, last_epoch=2),
            trial(1, TrialState.PRUNED, 90.0, last_epoch=4),
            trial(2, TrialState.FAIL, 500.0, last_epoch=1),
        ]
    }

    progress = read_progress([search, retrain], trials, workers=1, now=NOW)

    assert progress.stages[1].estimate_s == pytest.approx(30 * 20.0)


def test_retrain_estimate_from_other_family():
    # the family has no finished trial, so the other family's 10 s per epoch is used
    other = search_record("other.only", "other", StageState.DONE)
    search = search_record("toy-nf.only", "toy-nf", StageState.PENDING)
    retrain = step_record(RETRAIN, "toy-nf", StageState.PENDING, ("toy-nf.only",))
    trials = {"other.only": [trial(0, TrialState.COMPLETE, 40.0, value=1.0)]}

    progress = read_progress([other, search, retrain], trials, workers=1, now=NOW)

    assert progress.stages[2].estimate_s == pytest.approx(30 * 10.0)


def test_retrain_estimate_other_family_while_running():
    # the family's search runs, but none of its trials has finished yet
    other = search_record("other.only", "other", StageState.DONE)
    search = search_record("toy-nf.only", "toy-nf", StageState.RUNNING)
    retrain = step_record(RETRAIN, "toy-nf", StageState.PENDING, ("toy-nf.only",))
    trials = {
        "other.only": [trial(0, TrialState.COMPLETE, 40.0, value=1.0)],
        "toy-nf.only": [trial(0, TrialState.RUNNING, 0.0), trial(1, TrialState.FAIL, 5.0)],
    }

    progress = read_progress([other, search, retrain], trials, workers=1, now=NOW)

    assert progress.stages[2].estimate_s == pytest.approx(30 * 10.0)


def test_retrain_estimate_while_search_runs():
    # the best trial so far is a small model at 2 s per epoch, but the search can still pick
    # the 20 s per epoch one, so the estimate pools both: 88 s for 8 epochs
    search = search_record("toy-nf.only", "toy-nf", StageState.RUNNING, n_trials=6)
    retrain = step_record(RETRAIN, "toy-nf", StageState.PENDING, ("toy-nf.only",))
    trials = {
        "toy-nf.only": [
            trial(0, TrialState.COMPLETE, 8.0, value=1.0),
            trial(1, TrialState.COMPLETE, 80.0, value=2.0),
            trial(2, TrialState.RUNNING, 0.0),
        ]
    }

    progress = read_progress([search, retrain], trials, workers=1, now=NOW)

    assert progress.stages[1].estimate_s == pytest.approx(30 * 11.0)


def test_latents_estimate_is_one_epoch():
    search = search_record("toy-nf.only", "toy-nf", StageState.DONE)
    latents = step_record(LATENTS, "toy-nf", StageState.PENDING, ("retrain:toy-nf",))
    trials = {"toy-nf.only": [trial(0, TrialState.COMPLETE, 80.0, value=1.0)]}

    progress = read_progress([search, latents], trials, workers=1, now=NOW)

    assert progress.stages[1].estimate_s == pytest.approx(20.0)


def test_steps_before_any_trial_not_estimated():
    search = search_record("toy-nf.only", "toy-nf", StageState.RUNNING)
    retrain = step_record(RETRAIN, "toy-nf", StageState.PENDING, ("toy-nf.only",))

    progress = read_progress([search, retrain], {"toy-nf.only": []}, workers=1, now=NOW)

    assert progress.stages[1].estimate_s is None
    assert progress.eta_s() is None


def test_running_step_time_from_claim():
    search = search_record("toy-nf.only", "toy-nf", StageState.DONE)
    claimed_at = NOW - datetime.timedelta(seconds=250)
    retrain = step_record(RETRAIN, "toy-nf", StageState.RUNNING, ("toy-nf.only",), claimed_at=claimed_at)
    trials = {"toy-nf.only": [trial(0, TrialState.COMPLETE, 80.0, value=1.0)]}

    progress = read_progress([search, retrain], trials, workers=2, now=NOW)

    step = progress.stages[1]
    assert step.running_s == pytest.approx(250.0)
    assert step.claimed_by == "node-b:4242"
    assert progress.stage_eta_s(step) == pytest.approx(600.0 - 250.0)
    assert progress.eta_s() == pytest.approx(600.0 - 250.0)


def test_resumed_retraining_estimated_from_pace():
    # resumed after epoch 10 of 30, 200 s ago, and has trained 5 epochs since
    search = search_record("toy-nf.only", "toy-nf", StageState.DONE)
    claimed_at = NOW - datetime.timedelta(seconds=200)
    retrain = step_record(RETRAIN, "toy-nf", StageState.RUNNING, ("toy-nf.only",), claimed_at=claimed_at)
    trials = {"toy-nf.only": [trial(0, TrialState.COMPLETE, 80.0, value=1.0)]}
    outputs = {("toy", "retrain:toy-nf"): {"progress": {"epoch": 15, "epochs": 30, "resumed_after": 10, "claimed_by": "node-b:4242"}}}

    progress = read_progress([search, retrain], trials, workers=1, now=NOW, step_outputs=outputs)

    step = progress.stages[1]
    assert (step.epoch, step.epochs, step.resumed_after) == (15, 30, 10)
    assert progress.stage_eta_s(step) == pytest.approx(15 * 200.0 / 5)
    assert row_of(rendered(progress), "retrain:toy-nf")[2:4] == ["epoch", "15/30"]


def test_earlier_claim_progress_ignored():
    # the interrupted run reached epoch 4 of 10, and the new claim started 1 s ago
    search = search_record("toy-nf.only", "toy-nf", StageState.DONE)
    claimed_at = NOW - datetime.timedelta(seconds=1)
    retrain = step_record(RETRAIN, "toy-nf", StageState.RUNNING, ("toy-nf.only",), claimed_at=claimed_at)
    trials = {"toy-nf.only": [trial(0, TrialState.COMPLETE, 80.0, value=1.0)]}
    earlier = {"epoch": 4, "epochs": 10, "resumed_after": 0, "claimed_by": "node-a:1111"}
    outputs = {("toy", "retrain:toy-nf"): {"progress": earlier}}

    progress = read_progress([search, retrain], trials, workers=1, now=NOW, step_outputs=outputs)

    step = progress.stages[1]
    assert step.epoch is None
    assert step.resumed_after is None
    # the estimate from the search's pace, not 1 s over 4 epochs
    assert progress.stage_eta_s(step) > 60.0


def test_retraining_before_first_epoch_uses_search_pace():
    search = search_record("toy-nf.only", "toy-nf", StageState.DONE)
    claimed_at = NOW - datetime.timedelta(seconds=30)
    retrain = step_record(RETRAIN, "toy-nf", StageState.RUNNING, ("toy-nf.only",), claimed_at=claimed_at)
    trials = {"toy-nf.only": [trial(0, TrialState.COMPLETE, 80.0, value=1.0)]}
    outputs = {("toy", "retrain:toy-nf"): {"progress": {"epoch": 10, "epochs": 30, "resumed_after": 10, "claimed_by": "node-b:4242"}}}

    progress = read_progress([search, retrain], trials, workers=1, now=NOW, step_outputs=outputs)

    # 20 epochs left at the search's 20 s per epoch
    assert progress.stage_eta_s(progress.stages[1]) == pytest.approx(20 * 20.0)


def test_resume_logged_once(caplog):
    running = dataclasses.replace(
        step_progress("retrain:toy-nf", StageState.RUNNING, estimate_s=600.0, running_s=3.0),
        epoch=5,
        epochs=16,
        resumed_after=5,
    )
    monitor = PipelineMonitor(log_trials=False)

    with caplog.at_level(logging.INFO, logger="hpo.progress"):
        monitor.update(PipelineProgress(stages=(running,), workers=1), {})
        monitor.update(PipelineProgress(stages=(running,), workers=1), {})

    messages = [record.getMessage() for record in caplog.records]
    assert messages == ["Step retrain:toy-nf of pipeline toy resumed from its saved training state after epoch 5 of 16"]


@pytest.mark.parametrize(
    ("log_trials", "epochs_seen", "expected"),
    [
        (True, [0, 3, 5, 7, 9, 10, 12, 100], [5, 10, 100]),
        (True, [1, 2], [1, 2]),
        (False, [0, 50, 100], []),
    ],
)
def test_retraining_epochs_logged(caplog, log_trials, epochs_seen, expected):
    running = step_progress("retrain:toy-nf", StageState.RUNNING, estimate_s=600.0, running_s=3.0)
    total = epochs_seen[-1]
    monitor = PipelineMonitor(log_trials=log_trials)

    with caplog.at_level(logging.INFO, logger="hpo.progress"):
        for epoch in epochs_seen:
            stage = dataclasses.replace(running, epoch=epoch, epochs=total)
            monitor.update(PipelineProgress(stages=(stage,), workers=1), {})

    messages = [record.getMessage() for record in caplog.records]
    assert messages == [f"Step retrain:toy-nf of pipeline toy trained {epoch} of {total} epochs" for epoch in expected]


def test_running_step_without_claim_time():
    search = search_record("toy-nf.only", "toy-nf", StageState.DONE)
    retrain = step_record(RETRAIN, "toy-nf", StageState.RUNNING, ("toy-nf.only",))
    trials = {"toy-nf.only": [trial(0, TrialState.COMPLETE, 80.0, value=1.0)]}

    progress = read_progress([search, retrain], trials, workers=1, now=NOW)

    assert progress.stages[1].running_s is None
    assert progress.stage_eta_s(progress.stages[1]) is None
    assert progress.eta_s() is None


# ETA


def test_eta_counts_running_retraining():
    # every search stage done, and a 10-minute retraining that has run for 2 minutes
    progress = PipelineProgress(
        stages=(
            StageProgress("toy-nf.only", "toy", StageState.DONE, 2, StageCounts(complete=2), 1.0, 0, 40.0),
            step_progress("retrain:toy-nf", StageState.RUNNING, estimate_s=600.0, running_s=120.0),
        ),
        workers=2,
    )

    assert progress.eta_s() == pytest.approx(480.0)


def test_step_past_estimate_keeps_eta():
    # the retraining of toy-nf ran 100 s past its estimate, and another one has 300 s left
    progress = PipelineProgress(
        stages=(
            step_progress("retrain:toy-nf", StageState.RUNNING, estimate_s=600.0, running_s=700.0),
            step_progress("retrain:other", StageState.RUNNING, estimate_s=400.0, running_s=100.0),
        ),
        workers=2,
    )

    estimate = progress.eta_estimate()

    assert progress.stages[0].is_past_estimate
    assert not progress.stages[1].is_past_estimate
    assert progress.stage_eta_s(progress.stages[0]) == 0.0
    assert estimate.seconds == pytest.approx(300.0)
    assert estimate.past_estimate == ("retrain:toy-nf",)
    assert estimate.not_estimated == ()
    assert progress.eta_s() == pytest.approx(300.0)


def test_eta_follows_dependency_chain():
    # 4 trials of 10 s on 4 workers take 10 s, then the retraining takes 600 s on one of them
    search = StageProgress("toy-nf.only", "toy", StageState.RUNNING, 4, StageCounts(), None, None, 10.0)
    retrain = dataclasses.replace(
        step_progress("retrain:toy-nf", StageState.PENDING, estimate_s=600.0), depends_on=("toy-nf.only",)
    )
    progress = PipelineProgress(stages=(search, retrain), workers=4)

    assert progress.eta_s() == pytest.approx(10.0 + 600.0)


def test_eta_divides_steps_over_workers():
    # three independent 100 s steps on 2 workers: 300 s of work, critical path 100 s
    steps = tuple(
        step_progress(f"retrain:family-{index}", StageState.PENDING, estimate_s=100.0) for index in range(3)
    )
    progress = PipelineProgress(stages=steps, workers=2)

    assert progress.eta_s() == pytest.approx(150.0)


def test_eta_lists_unestimated_steps():
    progress = PipelineProgress(
        stages=(
            step_progress("retrain:toy-nf", StageState.PENDING, estimate_s=600.0),
            step_progress("evaluate:toy-nf", StageState.PENDING, estimate_s=None),
            step_progress("results:toy", StageState.DONE, estimate_s=None),
        ),
        workers=1,
    )

    estimate = progress.eta_estimate()

    assert estimate.seconds == pytest.approx(600.0)
    assert estimate.not_estimated == ("evaluate:toy-nf",)
    assert estimate.past_estimate == ()
    assert progress.eta_s() is None


# table


def test_table_shows_running_step():
    progress = PipelineProgress(
        stages=(
            StageProgress("toy-nf.only", "toy", StageState.DONE, 2, StageCounts(complete=2), 1.23, 1, 40.0),
            step_progress("retrain:toy-nf", StageState.RUNNING, estimate_s=600.0, running_s=250.0),
            step_progress("evaluate:toy-nf", StageState.PENDING, estimate_s=None),
        ),
        workers=2,
    )

    lines = rendered(progress)

    retrain = row_of(lines, "retrain:toy-nf")
    assert retrain[:3] == ["retrain:toy-nf", "running", "step"]
    assert " ".join(retrain[3:5]) == "4m 10s"
    assert " ".join(retrain[-2:]) == "5m 50s"
    assert "0/0" not in " ".join(lines)
    evaluate = row_of(lines, "evaluate:toy-nf")
    assert evaluate == ["evaluate:toy-nf", "pending", "step", "-", "-", "-", "-"]


def test_table_title_names_unestimated_steps():
    progress = PipelineProgress(
        stages=(
            step_progress("retrain:toy-nf", StageState.RUNNING, estimate_s=600.0, running_s=250.0),
            step_progress("evaluate:toy-nf", StageState.PENDING, estimate_s=None),
        ),
        workers=1,
    )

    lines = rendered(progress)

    assert lines[0] == "1 worker, ETA 5m 50s (estimate) + 1 step not estimated (evaluation)"


def test_table_title_unknown_eta():
    progress = PipelineProgress(
        stages=(step_progress("retrain:toy-nf", StageState.RUNNING, estimate_s=600.0, running_s=None),),
        workers=1,
    )

    lines = rendered(progress)

    assert lines[0] == "1 worker, ETA unknown + 1 step not estimated (retraining)"
    assert row_of(lines, "retrain:toy-nf")[3] == "claimed"
    assert row_of(lines, "retrain:toy-nf")[-1] == "unknown"


def test_table_title_step_past_estimate():
    # a search with 2 trials of 60 s left on 2 workers, and a retraining past its estimate
    progress = PipelineProgress(
        stages=(
            StageProgress("other.only", "toy", StageState.RUNNING, 4, StageCounts(complete=2), 1.0, 0, 60.0),
            step_progress("retrain:toy-nf", StageState.RUNNING, estimate_s=114.0, running_s=125.0),
            step_progress("evaluate:toy-nf", StageState.PENDING, estimate_s=None),
            step_progress("results:toy", StageState.PENDING, estimate_s=None),
        ),
        workers=2,
    )

    lines = rendered(progress)

    assert title_of(lines) == (
        "2 workers, ETA 1m 00s (estimate) + 1 step past its estimate + 2 steps not estimated"
        " (evaluation, results)"
    )
    assert row_of(lines, "retrain:toy-nf")[-1] == "overdue"


def test_table_title_only_step_past_estimate():
    progress = PipelineProgress(
        stages=(
            step_progress("retrain:toy-nf", StageState.RUNNING, estimate_s=114.0, running_s=125.0),
            step_progress("evaluate:toy-nf", StageState.PENDING, estimate_s=None),
        ),
        workers=1,
    )

    lines = rendered(progress)

    assert title_of(lines) == (
        "1 worker, ETA 0s (estimate) + 1 step past its estimate + 1 step not estimated (evaluation)"
    )


def test_table_with_steps_fits_80_columns():
    progress = PipelineProgress(
        stages=(
            StageProgress("convae-gen.arch", "paper", StageState.DONE, 300, StageCounts(complete=300), 17160.0, 120, 60.0),
            step_progress("retrain:convae-gen", StageState.RUNNING, estimate_s=90_000.0, running_s=3_000.0),
            step_progress("evaluate:convae-gen", StageState.PENDING, estimate_s=None),
            step_progress("results:paper", StageState.PENDING, estimate_s=None),
        ),
        workers=16,
    )

    lines = rendered(progress)

    assert max(len(line) for line in lines) <= 80
    assert row_of(lines, "retrain:convae-gen")[3:5] == ["50m", "00s"]


# log


def retraining_progress(estimate_s: float, running_s: float) -> PipelineProgress:
    """Return the progress of a pipeline whose search is done and whose retraining runs."""
    return PipelineProgress(
        stages=(
            StageProgress("toy-nf.only", "toy", StageState.DONE, 2, StageCounts(complete=2), 1.0, 0, 40.0),
            step_progress("retrain:toy-nf", StageState.RUNNING, estimate_s=estimate_s, running_s=running_s),
        ),
        workers=1,
    )


def test_summary_logs_step_state(caplog):
    progress = retraining_progress(estimate_s=600.0, running_s=250.0)

    with caplog.at_level(logging.INFO, logger="hpo.progress"):
        PipelineMonitor(log_trials=False).summarize(progress)

    messages = [record.getMessage() for record in caplog.records]
    assert "Step retrain:toy-nf of pipeline toy is running on node-b:4242 for 4m 10s, 5m 50s left (estimate)" in messages
    assert not any("retrain:toy-nf" in message and "trials" in message for message in messages)


def test_summary_logs_step_past_estimate(caplog):
    progress = retraining_progress(estimate_s=114.0, running_s=125.0)

    with caplog.at_level(logging.INFO, logger="hpo.progress"):
        PipelineMonitor(log_trials=False).summarize(progress)

    messages = [record.getMessage() for record in caplog.records]
    assert (
        "Step retrain:toy-nf of pipeline toy is running on node-b:4242 for 2m 05s, past its estimated run time of 1m 54s"
        in messages
    )


def test_log_and_title_show_same_eta(caplog):
    # the log line of a finished stage and the title of the same reading
    search = StageProgress("toy-nf.only", "toy", StageState.RUNNING, 2, StageCounts(complete=1), 1.0, 0, 40.0)
    done = dataclasses.replace(search, state=StageState.DONE, counts=StageCounts(complete=2))
    retrain = dataclasses.replace(
        step_progress("retrain:toy-nf", StageState.PENDING, estimate_s=600.0), depends_on=("toy-nf.only",)
    )
    evaluate = step_progress("evaluate:toy-nf", StageState.PENDING, estimate_s=None)
    monitor = PipelineMonitor(log_trials=False)
    monitor.update(PipelineProgress(stages=(search, retrain, evaluate), workers=1), {})
    progress = PipelineProgress(stages=(done, retrain, evaluate), workers=1)

    with caplog.at_level(logging.INFO, logger="hpo.progress"):
        monitor.update(progress, {})

    eta = "10m 00s (estimate) + 1 step not estimated (evaluation)"
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1
    assert messages[0].endswith(f". Pipeline ETA {eta}")
    assert title_of(rendered(progress)) == f"1 worker, ETA {eta}"


def test_step_start_logs_estimate(caplog):
    pending = step_progress("retrain:toy-nf", StageState.PENDING, estimate_s=600.0)
    running = step_progress("retrain:toy-nf", StageState.RUNNING, estimate_s=600.0, running_s=3.0)
    monitor = PipelineMonitor(log_trials=False)
    monitor.update(PipelineProgress(stages=(pending,), workers=1), {})

    with caplog.at_level(logging.INFO, logger="hpo.progress"):
        monitor.update(PipelineProgress(stages=(running,), workers=1), {})

    messages = [record.getMessage() for record in caplog.records]
    assert messages == ["Step retrain:toy-nf of pipeline toy started on node-b:4242, estimated run time 10m 00s"]


def test_unseen_step_start_logged(caplog):
    pending = step_progress("retrain:toy-nf", StageState.PENDING, estimate_s=600.0)
    done = step_progress("retrain:toy-nf", StageState.DONE, estimate_s=600.0)
    monitor = PipelineMonitor(log_trials=False)
    monitor.update(PipelineProgress(stages=(pending,), workers=1), {})

    with caplog.at_level(logging.INFO, logger="hpo.progress"):
        monitor.update(PipelineProgress(stages=(done,), workers=1), {})

    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1
    assert messages[0].startswith("Step retrain:toy-nf of pipeline toy started and is done. Pipeline ETA")


# storage


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'jethpo.db'}"
    else:
        url = request.getfixturevalue("fresh_postgres_url")
    rdb = open_storage(url, heartbeat_interval=1, grace_period=2)
    save_space(rdb.engine, "toy-nf", SPACE)
    yield rdb
    rdb.engine.dispose()


def test_registered_retraining_estimated(storage):
    space = parse_space(SPACE, "toy-nf test space")
    register_pipeline(storage, plan_pipeline({"toy-nf": space}, parse_profile(PROFILE, "toy test profile")), RUN_INFO)
    study = optuna.load_study(study_name="toy-nf.only", storage=storage)
    # 4 epochs in 60 s and 120 s; the better trial sets 30 s per epoch
    study.add_trial(trial(0, TrialState.COMPLETE, 60.0, value=2.0))
    study.add_trial(trial(1, TrialState.COMPLETE, 120.0, value=1.0))
    finish_stage(storage.engine, "toy", "toy-nf.only", StageState.DONE)

    records = load_stage_records(storage, "toy", {"toy-nf": space})
    trials = {record.study_name: optuna.load_study(study_name=record.study_name, storage=storage).get_trials() for record in records}
    progress = read_progress(records, trials, workers=1)

    stages = {stage.name: stage for stage in progress.stages}
    assert stages["retrain:toy-nf"].estimate_s == pytest.approx(30 * 30.0)
    assert stages[f"{EVALUATE}:toy-nf"].estimate_s is None
    estimate = progress.eta_estimate()
    assert estimate.seconds == pytest.approx(30 * 30.0)
    assert estimate.not_estimated == ("evaluate:toy-nf", "results:toy")


def test_failed_step_logged_with_error(caplog):
    search = search_record("toy-nf.only", "toy-nf", StageState.DONE)
    running = step_record(RETRAIN, "toy-nf", StageState.RUNNING, ("toy-nf.only",))
    failed = dataclasses.replace(running, state=StageState.FAILED)
    error = "ArtifactError: Artifact 7abaa828 is not in the artifact directory '/data/artifacts'"
    outputs = {("toy", "retrain:toy-nf"): {"error": error}}
    monitor = PipelineMonitor(log_trials=False)

    with caplog.at_level(logging.WARNING, logger="hpo.progress"):
        monitor.update(read_progress([search, running], {}, workers=1, now=NOW), {})
        monitor.update(read_progress([search, failed], {}, workers=1, now=NOW, step_outputs=outputs), {})

    messages = [record.getMessage() for record in caplog.records]
    assert messages == [f"Step retrain:toy-nf of pipeline toy failed: {error}"]


def test_summary_names_takeover_time(caplog):
    progress = retraining_progress(estimate_s=600.0, running_s=24.0)

    with caplog.at_level(logging.INFO, logger="hpo.progress"):
        PipelineMonitor(log_trials=False, grace_period_s=120).summarize(progress)

    messages = [record.getMessage() for record in caplog.records]
    assert (
        "Step retrain:toy-nf of pipeline toy is running on node-b:4242 for 24s, 9m 36s left (estimate). "
        "If node-b:4242 has stopped, a worker takes the step over 2m 00s after its last sign of life"
    ) in messages


def test_step_takeover_logged(caplog):
    running = step_progress("retrain:toy-nf", StageState.RUNNING, estimate_s=600.0, running_s=3.0)
    taken_over = dataclasses.replace(running, claimed_by="node-c:777")
    monitor = PipelineMonitor(log_trials=False)

    with caplog.at_level(logging.INFO, logger="hpo.progress"):
        monitor.update(PipelineProgress(stages=(running,), workers=1), {})
        monitor.update(PipelineProgress(stages=(running,), workers=1), {})
        monitor.update(PipelineProgress(stages=(taken_over,), workers=1), {})

    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "Step retrain:toy-nf of pipeline toy was taken over by node-c:777 from node-b:4242, "
        "which had stopped renewing its claim"
    ]
