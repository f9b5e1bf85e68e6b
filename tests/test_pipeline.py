"""Stage graph, trial budgets, stage transitions and progress of a pipeline.

Storage tests run on a real SQLite file under tmp_path and on a throwaway PostgreSQL
database from conftest.py. Nothing here starts Ray or trains a model: trials are written
with ``Study.add_trial``, as a finished worker would leave them.
"""

from __future__ import annotations

import datetime
import io
import logging
import threading
import time

import optuna
import pytest
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from hpo.pipeline import (
    StageCounts,
    advance_pipeline,
    budget_lock,
    count_study_trials,
    count_trials,
    fail_stale_trials,
    load_stage_records,
    plan_pipeline,
    queue_retry,
    register_pipeline,
    studies_of_other_pipelines,
    unfinished_pipelines,
)
from hpo.progress import (
    LiveView,
    PipelineMonitor,
    PipelineProgress,
    StageProgress,
    format_duration,
    read_progress,
    render_table,
)
from hpo.spaces import SpaceError, builtin_spaces, load_profile, parse_profile, parse_space
from storage import StageState, get_stages, open_storage, save_space

pytestmark = [
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
    pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used"),
]

TINY_SPACE = """
name: tiny-nf
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
      n_flows: {type: int, low: 2, high: 4}
    fixed: {n_mlp_layers: 1, nodes_1: 16}
"""

TINY_PROFILE = """
name: tiny
n_jets: 600
models:
  convae: &budget
    search: {n_trials: 2, epochs: 2, batch_size: 100, eval_every: 1, resources: {cpus: 1, gpus: 0}}
    retrain: {epochs: 1, batch_size: 100, eval_every: 1, resources: {cpus: 1, gpus: 0}}
  realnvp-latent: *budget
  realnvp-flat: *budget
families:
  tiny-nf:
    stages: {second: {n_trials: 3, resources: {cpus: 2, gpus: 0.5}}}
"""

RUN_INFO = {"data_path": "/data/jets.hdf5", "n_jets": 600, "split_seed": 0, "data_fingerprint": "f" * 64}

LR = FloatDistribution(1e-4, 1e-2, log=True)
N_FLOWS = IntDistribution(2, 4)


@pytest.fixture
def tiny_space():
    return parse_space(TINY_SPACE, "tiny-nf test space")


@pytest.fixture
def tiny_profile():
    return parse_profile(TINY_PROFILE, "tiny test profile")


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request, tmp_path):
    """A storage with heartbeats every second, a 2 s grace period and the tiny space stored."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'jethpo.db'}"
    else:
        url = request.getfixturevalue("fresh_postgres_url")
    rdb = open_storage(url, heartbeat_interval=1, grace_period=2)
    save_space(rdb.engine, "tiny-nf", TINY_SPACE)
    yield rdb
    rdb.engine.dispose()


def registered(storage, tiny_space, tiny_profile):
    plan = plan_pipeline({"tiny-nf": tiny_space}, tiny_profile)
    register_pipeline(storage, plan, RUN_INFO)
    return plan


def records_of(storage):
    return {record.name: record for record in load_stage_records(storage, "tiny")}


def add_trial(storage, study_name, state, *, value=None, params=None, user_attrs=None, system_attrs=None):
    study = optuna.load_study(study_name=study_name, storage=storage)
    params = params if params is not None else {"lr": 1e-3}
    distributions = {name: LR if name == "lr" else N_FLOWS for name in params}
    full = {"n_flows": 2, "n_mlp_layers": 1, "nodes_1": 16, **params}
    study.add_trial(
        optuna.trial.create_trial(
            state=state,
            value=value,
            params=params,
            distributions=distributions,
            user_attrs={"params": full, **(user_attrs or {})},
            system_attrs=system_attrs or {},
        )
    )


def frozen(number: int, state: TrialState, *, retry_of: list[int] | None = None) -> FrozenTrial:
    start = datetime.datetime(2024, 1, 1, 12, 0, 0)
    finished = state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return FrozenTrial(
        number=number,
        state=state,
        value=1.0 if state == TrialState.COMPLETE else None,
        datetime_start=start,
        datetime_complete=start + datetime.timedelta(seconds=10) if finished else None,
        params={},
        distributions={},
        user_attrs={},
        system_attrs={"retry_history": retry_of} if retry_of else {},
        intermediate_values={},
        trial_id=number,
    )


# stage graph


def test_plan_orders_builtin_stages():
    plan = plan_pipeline(builtin_spaces(), load_profile("smoke"))

    names = [stage.name for stage in plan.runnable]
    assert names[:5] == ["convae-gen.loss", "convae-rec.loss", "nf.search", "convae-gen.arch", "convae-rec.arch"]
    assert names[-1] == "results:smoke"
    assert plan.excluded == ()
    arch = next(stage for stage in plan.runnable if stage.name == "convae-gen.arch")
    assert arch.depends_on == ("convae-gen.loss",)
    assert arch.study_name == "convae-gen.arch"
    assert arch.budget.n_trials == 2


def test_plan_follows_the_data_flow_of_the_design():
    plan = plan_pipeline(builtin_spaces(), load_profile("smoke"))
    graph = {stage.name: stage.depends_on for stage in plan.stages}

    assert graph["retrain:convae-gen"] == ("convae-gen.loss", "convae-gen.arch")
    assert graph["evaluate:convae-gen"] == ("retrain:convae-gen",)
    assert graph["latents:convae-rec"] == ("retrain:convae-rec",)
    assert graph["latent-nf.search"] == ("latents:convae-rec",)
    assert graph["retrain:latent-nf"] == ("latent-nf.search",)
    assert graph["evaluate:latent-nf"] == ("retrain:latent-nf",)
    assert graph["evaluate:nf"] == ("retrain:nf",)
    assert graph["results:smoke"] == ("evaluate:convae-gen", "evaluate:latent-nf", "evaluate:nf")
    # the reconstruction-tuned ConVAE only feeds the latent flow, so it is not evaluated alone
    assert "evaluate:convae-rec" not in graph
    assert "latents:convae-gen" not in graph
    # every stage comes after the stages it depends on
    position = {stage.name: index for index, stage in enumerate(plan.stages)}
    assert all(position[parent] < position[name] for name, parents in graph.items() for parent in parents)
    # a step reads the best trial of its family's last search stage
    steps = {stage.name: stage for stage in plan.stages}
    assert steps["retrain:convae-rec"].study_name == "convae-rec.arch"
    assert steps["retrain:nf"].study_name == "nf.search"


def test_plan_leaves_out_latent_nf_without_its_convae():
    plan = plan_pipeline(builtin_spaces(), load_profile("smoke"), families=["latent-nf", "nf"])

    excluded = {stage.name: stage for stage in plan.excluded}
    assert set(excluded) == {"latent-nf.search", "retrain:latent-nf", "evaluate:latent-nf", "results:smoke"}
    assert "add --family convae-rec" in excluded["results:smoke"].excluded
    assert [stage.name for stage in plan.runnable] == ["nf.search", "retrain:nf", "evaluate:nf"]


def test_plan_of_selected_family(tiny_space, tiny_profile):
    spaces = {**builtin_spaces(), "tiny-nf": tiny_space}

    plan = plan_pipeline(spaces, tiny_profile, families=["tiny-nf"])

    assert [stage.name for stage in plan.runnable] == [
        "tiny-nf.first",
        "tiny-nf.second",
        "retrain:tiny-nf",
        "evaluate:tiny-nf",
        "results:tiny",
    ]
    assert plan.name == "tiny"


def test_plan_rejects_unknown_family(tiny_profile):
    with pytest.raises(SpaceError, match="no-such-family"):
        plan_pipeline(builtin_spaces(), tiny_profile, families=["no-such-family"])


def test_trial_resources_is_largest_request(tiny_space, tiny_profile):
    plan = plan_pipeline({"tiny-nf": tiny_space}, tiny_profile)

    resources = plan.trial_resources()

    assert resources.cpus == 2
    assert resources.gpus == 0.5


# trial counts


def test_count_trials_by_state():
    trials = [
        frozen(0, TrialState.COMPLETE),
        frozen(1, TrialState.PRUNED),
        frozen(2, TrialState.FAIL),  # nan_loss: counts
        frozen(3, TrialState.FAIL),  # stale, retried by trial 5
        frozen(4, TrialState.RUNNING),
        frozen(5, TrialState.WAITING, retry_of=[3]),
    ]

    counts = count_trials(trials)

    assert counts == StageCounts(complete=1, pruned=1, running=1, waiting=1, failed=1, retried=1)
    assert counts.used == 4
    assert counts.finished == 3


def test_retry_of_a_retry_counts_once():
    # trial 1 retried trial 0 and went stale too, then trial 2 retried it
    trials = [
        frozen(0, TrialState.FAIL),
        frozen(1, TrialState.FAIL, retry_of=[0]),
        frozen(2, TrialState.COMPLETE, retry_of=[0, 1]),
    ]

    counts = count_trials(trials)

    assert counts.retried == 2
    assert counts.used == 1


@pytest.mark.parametrize(
    "states",
    [
        [],
        [(TrialState.COMPLETE, None), (TrialState.PRUNED, None), (TrialState.RUNNING, None)],
        [
            (TrialState.COMPLETE, None),
            (TrialState.PRUNED, None),
            (TrialState.FAIL, None),
            (TrialState.FAIL, None),
            (TrialState.RUNNING, None),
            (TrialState.WAITING, [3]),
        ],
        [(TrialState.FAIL, None), (TrialState.FAIL, [0]), (TrialState.COMPLETE, [0, 1]), (TrialState.FAIL, None)],
    ],
    ids=["empty", "no failures", "retried and not", "retry of a retry"],
)
def test_sql_count_matches_python_count(storage, states):
    study = optuna.create_study(study_name="counted", storage=storage)
    other = optuna.create_study(study_name="other", storage=storage)
    for number, (state, retry_of) in enumerate(states):
        storage.create_new_trial(study._study_id, template_trial=frozen(number, state, retry_of=retry_of))
        # trials of another study must not count, even with a retry_history that names a FAIL number
        storage.create_new_trial(other._study_id, template_trial=frozen(number, TrialState.WAITING, retry_of=[2]))

    with storage.engine.connect() as connection:
        counted = count_study_trials(connection, study._study_id)

    assert counted == count_trials(study.get_trials())
    assert sum(vars(counted).values()) == len(states)


@pytest.mark.parametrize(
    ("counts", "n_trials", "has_budget", "is_done"),
    [
        (StageCounts(), 2, True, False),
        (StageCounts(complete=1, running=1), 2, False, False),
        (StageCounts(complete=1, failed=1), 2, False, True),
        (StageCounts(complete=2, waiting=1), 2, True, False),
        (StageCounts(complete=1, retried=1, waiting=1), 2, True, False),
        (StageCounts(complete=1, pruned=2), 2, False, True),
    ],
)
def test_budget_open_and_done(counts, n_trials, has_budget, is_done):
    assert counts.has_budget(n_trials) is has_budget
    assert counts.is_done(n_trials) is is_done


# registration and transitions


def test_register_stores_stages_and_run_attrs(storage, tiny_space, tiny_profile):
    registered(storage, tiny_space, tiny_profile)

    records = records_of(storage)
    assert list(records) == ["tiny-nf.first", "tiny-nf.second", "retrain:tiny-nf", "evaluate:tiny-nf", "results:tiny"]
    retrain = records["retrain:tiny-nf"]
    assert retrain.is_step and retrain.problem is None
    assert retrain.study_name == "tiny-nf.second"
    assert retrain.retrain.epochs == 1
    assert retrain.depends_on == ("tiny-nf.first", "tiny-nf.second")
    second = records["tiny-nf.second"]
    assert second.state == StageState.PENDING
    assert second.depends_on == ("tiny-nf.first",)
    assert second.budget.n_trials == 3
    assert second.budget.resources.gpus == 0.5
    assert second.run["data_fingerprint"] == "f" * 64
    assert second.run["pipeline"] == "tiny"
    assert second.problem is None
    assert unfinished_pipelines(storage) == ["tiny"]


def test_other_pipeline_owns_studies(storage, tiny_space, tiny_profile):
    registered(storage, tiny_space, tiny_profile)
    other = parse_profile(TINY_PROFILE.replace("name: tiny", "name: other"), "other test profile")

    owners = studies_of_other_pipelines(storage, plan_pipeline({"tiny-nf": tiny_space}, other))
    own = studies_of_other_pipelines(storage, plan_pipeline({"tiny-nf": tiny_space}, tiny_profile))

    assert owners == {"tiny-nf.first": "tiny", "tiny-nf.second": "tiny"}
    assert own == {}


def test_advance_starts_stages_in_order(storage, tiny_space, tiny_profile):
    registered(storage, tiny_space, tiny_profile)

    # only the first stage can start
    events = advance_pipeline(storage, list(records_of(storage).values()), "controller-a")
    assert events == [("tiny-nf.first", StageState.RUNNING, "inherits nothing")]

    # one trial RUNNING: the budget of 2 is not used yet
    add_trial(storage, "tiny-nf.first", TrialState.COMPLETE, value=3.0, params={"lr": 1e-3})
    add_trial(storage, "tiny-nf.first", TrialState.RUNNING, params={"lr": 2e-3})
    assert advance_pipeline(storage, list(records_of(storage).values()), "controller-a") == []

    # the best trial's lr is passed on
    study = optuna.load_study(study_name="tiny-nf.first", storage=storage)
    running = study.get_trials(states=(TrialState.RUNNING,))[0]
    storage.set_trial_state_values(running._trial_id, TrialState.COMPLETE, [2.0])
    events = advance_pipeline(storage, list(records_of(storage).values()), "controller-a")
    assert [(name, state) for name, state, _ in events] == [
        ("tiny-nf.first", StageState.DONE),
        ("tiny-nf.second", StageState.RUNNING),
    ]
    assert "0.002" in events[1][2]
    stored = {stage.stage: stage for stage in get_stages(storage.engine, "tiny")}
    assert stored["tiny-nf.second"].claimed_by == "controller-a"

    # another controller finds nothing to do
    assert advance_pipeline(storage, list(records_of(storage).values()), "controller-b") == []


def test_register_again_keeps_states(storage, tiny_space, tiny_profile):
    registered(storage, tiny_space, tiny_profile)
    advance_pipeline(storage, list(records_of(storage).values()), "controller-a")
    claimed_at = {stage.stage: stage.claimed_at for stage in get_stages(storage.engine, "tiny")}

    registered(storage, tiny_space, tiny_profile)

    stored = {stage.stage: stage for stage in get_stages(storage.engine, "tiny")}
    assert stored["tiny-nf.first"].state == StageState.RUNNING
    assert stored["tiny-nf.first"].claimed_at == claimed_at["tiny-nf.first"]
    assert stored["tiny-nf.second"].state == StageState.PENDING


def test_stage_without_complete_trial_fails_dependents(storage, tiny_space, tiny_profile):
    registered(storage, tiny_space, tiny_profile)
    advance_pipeline(storage, list(records_of(storage).values()), "controller-a")
    add_trial(storage, "tiny-nf.first", TrialState.FAIL, user_attrs={"fail_reason": "nan_loss"})
    add_trial(storage, "tiny-nf.first", TrialState.FAIL, user_attrs={"fail_reason": "nan_loss"})

    events = advance_pipeline(storage, list(records_of(storage).values()), "controller-a")

    # the failure runs down the graph, through the retraining to the results
    assert [(name, state) for name, state, _ in events] == [
        ("tiny-nf.first", StageState.FAILED),
        ("tiny-nf.second", StageState.FAILED),
        ("retrain:tiny-nf", StageState.FAILED),
        ("evaluate:tiny-nf", StageState.FAILED),
        ("results:tiny", StageState.FAILED),
    ]
    assert "tiny-nf.first" in events[1][2]
    assert unfinished_pipelines(storage) == []


def test_concurrent_controllers_start_stage_once(fresh_postgres_url, tiny_space, tiny_profile):
    storages = [open_storage(fresh_postgres_url, heartbeat_interval=1, grace_period=2) for _ in range(4)]
    save_space(storages[0].engine, "tiny-nf", TINY_SPACE)
    registered(storages[0], tiny_space, tiny_profile)
    barrier = threading.Barrier(len(storages))
    events: list = []

    def advance(index: int) -> None:
        records = list(records_of(storages[index]).values())
        barrier.wait()
        events.extend(advance_pipeline(storages[index], records, f"controller-{index}"))

    threads = [threading.Thread(target=advance, args=(index,)) for index in range(len(storages))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert [(name, state) for name, state, _ in events] == [("tiny-nf.first", StageState.RUNNING)]
    for rdb in storages:
        rdb.engine.dispose()


# stale trials


def test_stale_trial_retried_same_params(storage, tiny_space, tiny_profile):
    registered(storage, tiny_space, tiny_profile)
    study = optuna.load_study(study_name="tiny-nf.first", storage=storage)
    trial = study.ask()
    lr = trial.suggest_float("lr", 1e-4, 1e-2, log=True)
    storage.record_heartbeat(trial._trial_id)

    assert fail_stale_trials(study, storage) == []
    time.sleep(3.5)
    failed = fail_stale_trials(study, storage)

    assert failed == [(0, 1)]
    retry = study.get_trials()[1]
    assert study.get_trials()[0].state == TrialState.FAIL
    assert retry.state == TrialState.WAITING
    assert retry.params == {"lr": lr}
    assert retry.system_attrs["retry_history"] == [0]
    assert count_trials(study.get_trials()).used == 0


def test_stage_waits_for_retry_in_progress(storage, tiny_space, tiny_profile):
    registered(storage, tiny_space, tiny_profile)
    advance_pipeline(storage, list(records_of(storage).values()), "controller-a")
    add_trial(storage, "tiny-nf.first", TrialState.COMPLETE, value=3.0)
    add_trial(storage, "tiny-nf.first", TrialState.RUNNING, params={"lr": 2e-3})
    study = optuna.load_study(study_name="tiny-nf.first", storage=storage)
    running = study.get_trials(states=(TrialState.RUNNING,))[0]
    failed = threading.Event()

    # another process fails the stale trial and queues its retry a moment later
    def fail_then_retry() -> None:
        with budget_lock(storage, "tiny-nf.first"):
            storage.set_trial_state_values(running._trial_id, TrialState.FAIL)
            failed.set()
            time.sleep(0.5)
            queue_retry(study, storage, storage.get_trial(running._trial_id))

    thread = threading.Thread(target=fail_then_retry)
    thread.start()
    failed.wait(timeout=10)
    events = advance_pipeline(storage, list(records_of(storage).values()), "controller-a")
    thread.join(timeout=10)

    # the budget of 2 looked used (COMPLETE, FAIL), but the retry still has to run
    assert events == []
    retry = study.get_trials(states=(TrialState.WAITING,))
    assert [trial.system_attrs["retry_history"] for trial in retry] == [[running.number]]


def test_stage_queues_retry_of_storage_failure(storage, tiny_space, tiny_profile):
    registered(storage, tiny_space, tiny_profile)
    advance_pipeline(storage, list(records_of(storage).values()), "controller-a")
    add_trial(storage, "tiny-nf.first", TrialState.COMPLETE, value=3.0)
    # a worker ended this trial when a report failed, and died before queueing its retry
    message = {"fail_reason": "error", "fail_message": "OperationalError: server closed the connection"}
    add_trial(storage, "tiny-nf.first", TrialState.FAIL, params={"lr": 2e-3}, user_attrs=message)

    first = advance_pipeline(storage, list(records_of(storage).values()), "controller-a")
    second = advance_pipeline(storage, list(records_of(storage).values()), "controller-b")

    assert first == []
    assert second == []
    study = optuna.load_study(study_name="tiny-nf.first", storage=storage)
    retry = study.get_trials(states=(TrialState.WAITING,))
    assert len(retry) == 1
    assert retry[0].params == {"lr": 2e-3}
    assert "fail_message" not in retry[0].user_attrs


def test_running_trial_without_heartbeat_goes_stale(storage, tiny_space, tiny_profile):
    registered(storage, tiny_space, tiny_profile)
    study = optuna.load_study(study_name="tiny-nf.first", storage=storage)
    study.ask()  # a worker that died before its first heartbeat

    assert fail_stale_trials(study, storage) == []
    time.sleep(2.5)

    assert fail_stale_trials(study, storage) == [(0, 1)]
    assert study.get_trials()[1].state == TrialState.WAITING


# budget lock


def test_budget_lock_blocks_second_holder(storage):
    other = open_storage(str(storage.engine.url.render_as_string(hide_password=False)), heartbeat_interval=None)
    entered = threading.Event()
    release = threading.Event()
    order: list[str] = []

    def hold() -> None:
        with budget_lock(storage, "tiny-nf.first"):
            order.append("first in")
            entered.set()
            release.wait(timeout=10)
            order.append("first out")

    holder = threading.Thread(target=hold)
    holder.start()
    assert entered.wait(timeout=10)
    waiter = threading.Thread(target=lambda: _take(other, order))
    waiter.start()
    time.sleep(0.5)
    release.set()
    holder.join(timeout=10)
    waiter.join(timeout=10)
    other.engine.dispose()

    assert order == ["first in", "first out", "second in"]


def _take(storage, order: list[str]) -> None:
    with budget_lock(storage, "tiny-nf.first"):
        order.append("second in")


# progress


def stage_progress(name, state, n_trials, counts, mean_trial_s):
    return StageProgress(
        name=name,
        pipeline="tiny",
        state=state,
        n_trials=n_trials,
        counts=counts,
        best_value=None,
        best_trial=None,
        mean_trial_s=mean_trial_s,
    )


def test_eta_divides_remaining_time_by_workers():
    progress = PipelineProgress(
        stages=(
            stage_progress("a", StageState.RUNNING, 10, StageCounts(complete=4, running=2), 30.0),
            stage_progress("b", StageState.PENDING, 4, StageCounts(), None),
            stage_progress("c", StageState.DONE, 4, StageCounts(complete=4), 10.0),
        ),
        workers=2,
    )

    # a: 6 trials x 30 s, b: 4 trials x the mean of a and c ((4 x 30 + 4 x 10) / 8 = 20 s)
    assert progress.eta_s() == pytest.approx((6 * 30 + 4 * 20) / 2)
    assert progress.stage_eta_s(progress.stages[0]) == pytest.approx(3 * 30)
    assert not progress.is_finished


def test_eta_is_unknown_before_any_trial_finished():
    progress = PipelineProgress(
        stages=(stage_progress("a", StageState.RUNNING, 2, StageCounts(running=1), None),),
        workers=1,
    )

    assert progress.eta_s() is None


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "-"), (0, "0s"), (45.4, "45s"), (200, "3m 20s"), (3900, "1h 05m")],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_monitor_logs_retry_and_stage_end(storage, tiny_space, tiny_profile, caplog):
    registered(storage, tiny_space, tiny_profile)
    advance_pipeline(storage, list(records_of(storage).values()), "controller-a")
    monitor = PipelineMonitor(log_trials=True)
    study = optuna.load_study(study_name="tiny-nf.first", storage=storage)

    def read():
        records = list(records_of(storage).values())
        trials = {record.study_name: optuna.load_study(study_name=record.study_name, storage=storage).get_trials() for record in records}
        return records, trials

    records, trials = read()
    monitor.update(read_progress(records, trials, workers=1), trials)

    # a stale trial and its retry, then two COMPLETE trials
    study.ask()  # RUNNING trial 0
    storage.set_trial_state_values(study.get_trials()[0]._trial_id, TrialState.FAIL)
    add_trial(storage, "tiny-nf.first", TrialState.WAITING, system_attrs={"retry_history": [0], "failed_trial": 0})
    add_trial(storage, "tiny-nf.first", TrialState.COMPLETE, value=2.0)
    add_trial(storage, "tiny-nf.first", TrialState.COMPLETE, value=1.0)
    waiting = study.get_trials(states=(TrialState.WAITING,))[0]
    storage.set_trial_state_values(waiting._trial_id, TrialState.PRUNED, [4.0])
    events = advance_pipeline(storage, list(records_of(storage).values()), "controller-a")
    records, trials = read()

    with caplog.at_level(logging.INFO, logger="hpo.progress"):
        monitor.update(read_progress(records, trials, workers=1), trials, events)

    messages = [record.getMessage() for record in caplog.records]
    assert any("Retrying trial 0 of study tiny-nf.first as trial 1" in message for message in messages)
    assert any("Trial 0 of study tiny-nf.first failed because its worker stopped" in message for message in messages)
    assert any("Trial 3 of study tiny-nf.first is COMPLETE" in message for message in messages)
    done = [message for message in messages if "Stage tiny-nf.first of pipeline tiny is done" in message]
    assert len(done) == 1
    assert "best EMD_sum 1 (trial 3)" in done[0]
    assert any("Stage tiny-nf.second of pipeline tiny started" in message for message in messages)


def test_table_fits_80_columns():
    from rich.console import Console

    progress = PipelineProgress(
        stages=(
            StageProgress("convae-gen.loss", "paper", StageState.DONE, 300, StageCounts(complete=290, pruned=10), 1234.5, 3, 60.0),
            StageProgress("convae-gen.arch", "paper", StageState.RUNNING, 300, StageCounts(complete=1, running=2, waiting=1), 17160.0, 120, 60.0),
        ),
        workers=2,
    )
    console = Console(file=io.StringIO(), width=80, record=True)

    console.print(render_table(progress))

    lines = console.export_text().splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 80
    assert lines[0].startswith("2 workers, 1 WAITING trial, ETA")
    assert "300/300" in lines[3]
    assert "1.23e+03 (#3)" in lines[3]
    assert "1.72e+04 (#120)" in lines[4]


def test_live_view_prints_logs_above_table():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    progress = PipelineProgress(
        stages=(StageProgress("nf.search", "smoke", StageState.RUNNING, 2, StageCounts(running=1), None, None, None),),
        workers=1,
    )
    try:
        with LiveView(stream=stream) as view:
            view.update(progress)
            assert handler.stream is not stream
            logging.getLogger("hpo.test").warning("Trial 0 of study nf.search failed (nan_loss)")
    finally:
        root.removeHandler(handler)

    assert handler.stream is stream
    assert "Trial 0 of study nf.search failed (nan_loss)" in stream.getvalue()
    assert "nf.search" in stream.getvalue()


def test_register_resets_stale_done_steps(storage, tiny_space, tiny_profile):
    from storage.pipeline import finish_stage

    registered(storage, tiny_space, tiny_profile)
    # as after a run in which the results step finished, then the retraining was reset
    for name in ("evaluate:tiny-nf", "results:tiny"):
        finish_stage(storage.engine, "tiny", name, StageState.DONE)

    registered(storage, tiny_space, tiny_profile)

    states = {stage.stage: stage.state for stage in get_stages(storage.engine, "tiny")}
    assert states["evaluate:tiny-nf"] == StageState.PENDING
    assert states["results:tiny"] == StageState.PENDING


def test_results_step_keeps_evaluations_of_earlier_runs(storage, tiny_space, tiny_profile):
    other = parse_space(TINY_SPACE.replace("name: tiny-nf", "name: other-nf"), "other space")
    register_pipeline(storage, plan_pipeline({"tiny-nf": tiny_space, "other-nf": other}, tiny_profile, ["tiny-nf"]), RUN_INFO)

    register_pipeline(storage, plan_pipeline({"tiny-nf": tiny_space, "other-nf": other}, tiny_profile, ["other-nf"]), RUN_INFO)

    results = next(stage for stage in get_stages(storage.engine, "tiny") if stage.stage == "results:tiny")
    assert results.depends_on == ("evaluate:tiny-nf", "evaluate:other-nf")


def test_register_retries_failed_steps(storage, tiny_space, tiny_profile):
    from storage.pipeline import finish_stage

    registered(storage, tiny_space, tiny_profile)
    # as after a run whose evaluation failed, which failed the results step too
    for name in ("tiny-nf.first", "tiny-nf.second", "retrain:tiny-nf"):
        finish_stage(storage.engine, "tiny", name, StageState.DONE)
    for name in ("evaluate:tiny-nf", "results:tiny"):
        finish_stage(storage.engine, "tiny", name, StageState.FAILED)

    registered(storage, tiny_space, tiny_profile)

    states = {stage.stage: stage.state for stage in get_stages(storage.engine, "tiny")}
    assert states["retrain:tiny-nf"] == StageState.DONE
    assert states["evaluate:tiny-nf"] == StageState.PENDING
    assert states["results:tiny"] == StageState.PENDING


def test_failed_search_keeps_steps_failed(storage, tiny_space, tiny_profile):
    registered(storage, tiny_space, tiny_profile)
    advance_pipeline(storage, list(records_of(storage).values()), "controller-a")
    add_trial(storage, "tiny-nf.first", TrialState.FAIL, user_attrs={"fail_reason": "nan_loss"})
    add_trial(storage, "tiny-nf.first", TrialState.FAIL, user_attrs={"fail_reason": "nan_loss"})
    advance_pipeline(storage, list(records_of(storage).values()), "controller-a")

    registered(storage, tiny_space, tiny_profile)

    states = {stage.stage: stage.state for stage in get_stages(storage.engine, "tiny")}
    assert set(states.values()) == {StageState.FAILED}
