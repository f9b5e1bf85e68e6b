"""Orchestration overhead per trial: jethpo's worker step against plain ``study.optimize``.

Both paths run a no-op objective on the same PostgreSQL database, in one process, at a given
number of finished trials in their study:

- ``jethpo``: ``hpo.workers.Worker._step``, the loop body of a Ray worker, called directly.
  It reads the pipeline's stages, fails stale trials, counts the budget, takes the
  ``hpo.pipeline.budget_lock``, asks (``_WorkerStudy.ask``), records heartbeats, stores the
  trial's user attributes, reports one intermediate value, asks the pruner and tells,
  through the storage of ``storage.open_storage``. Only ``hpo.objectives.train_params`` is
  replaced, by a function that reports one value and returns it.
- ``optuna``: ``optuna.Study.optimize`` on a plain ``optuna.storages.RDBStorage`` with the
  same sampler and pruner, whose objective suggests the same parameter, reports one value,
  asks the pruner and returns the value.

Three more cases measure the fixes side by side with the code before them, each undone inside
this process on a worker of its own: ``jethpo_before_third`` is the path before the third
fix (:func:`optuna_reads`: Optuna's read of WAITING trials in every ``ask`` and the public
``Study.tell``), ``jethpo_earlier`` the path before the second fix as well
(:func:`earlier_trial_path`: the worker's connection pool, the budget count, the search
spaces read per step and the attribute writes), and ``jethpo_per_call_writes`` the path
before all three (:func:`per_call_writes` as well: one transaction per user attribute, two
reads per stage, and a stale-trial sweep per trial). Blocks of ``--block`` trials of the
five cases alternate ``--repeats`` times at every level, and the table shows the median
time per trial and the SQL statements and commits per trial. Studies are filled up to each
level with a bulk insert (:func:`fill_study`), with the user attributes that each path
stores itself.

Run from the repository root::

    python -m bench.orchestration                       # levels 100 and 1,000: about 1 minute
    python -m bench.orchestration --levels 100 1000 10000   # up to 10,000 trials: 2 to 6 minutes
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import logging
import pstats
import random
import socket
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from bench.common import (
    DEFAULT_POSTGRES_ADMIN_URL,
    interleave,
    jets_file,
    median,
    positive_int,
    print_table,
    run_benchmark,
    throwaway_postgres,
    write_results,
)

__all__ = ["main", "noop_objective"]

logger = logging.getLogger(__name__)

PIPELINE = "bench"

# One stage tuning one parameter, as in a RealNVP loss stage. The pruner is the one the
# shipped spaces use, so that report + should_prune cost what they cost in a real search.
SPACE_TEMPLATE = """
name: bench-noop
description: One-stage space whose trials the orchestration benchmark runs with a no-op objective.
model: realnvp-flat
objective: generation
sampler: {{type: {sampler}, seed: 0}}
pruner: {{type: median, n_startup_trials: 5, n_warmup_steps: 0}}
stages:
  - name: search
    params:
      lr: {{type: float, low: 1.0e-5, high: 1.0e-1, log: true}}
    fixed: {{n_flows: 2, n_mlp_layers: 1, nodes_1: 16}}
"""

PROFILE = """
name: bench
n_jets: 600
models:
  convae: &budget
    search: {n_trials: 1000000, epochs: 1, batch_size: 100, eval_every: 1, resources: {cpus: 1, gpus: 0}}
    retrain: {epochs: 1, batch_size: 100, eval_every: 1, resources: {cpus: 1, gpus: 0}}
  realnvp-latent: *budget
  realnvp-flat: *budget
"""

N_JETS = 600
LR_DISTRIBUTION = FloatDistribution(1.0e-5, 1.0e-1, log=True)


def noop_train_params(space, params, budget, data, *, seed, report=None, **ignored):
    """Stand in for ``hpo.objectives.train_params``: report the learning rate once and return it."""
    from models.training import TrainingResult

    value = float(params["lr"])
    if report is not None:
        report(1, value)
    return TrainingResult(best_emd_sum=value, best_epoch=1)


def noop_objective(trial: optuna.Trial) -> float:
    """Plain Optuna objective with the same suggestion, report and pruning check as the jethpo path."""
    value = trial.suggest_float("lr", LR_DISTRIBUTION.low, LR_DISTRIBUTION.high, log=True)
    trial.report(value, 1)
    if trial.should_prune():
        raise optuna.TrialPruned()
    return value


@contextlib.contextmanager
def noop_training() -> Iterator[None]:
    """Replace ``hpo.objectives.train_params`` in this process for the duration of the block."""
    import hpo.objectives

    original = hpo.objectives.train_params
    hpo.objectives.train_params = noop_train_params
    try:
        yield
    finally:
        hpo.objectives.train_params = original


def fill_study(study: optuna.Study, storage: optuna.storages.RDBStorage, target: int, user_attrs: dict[str, Any], rng: random.Random) -> float:
    """Insert COMPLETE trials until the study has ``target`` trials; return the seconds it took.

    The trials go in with one bulk insert into Optuna's tables (``optuna.storages._rdb.models``,
    Optuna 5.1), because ``Study.add_trials`` took 55 ms per trial on the shared development
    machine, 10 minutes per study for 10,000 trials. Each trial has the parameter, value,
    intermediate value and user attributes that a real trial of its path would have.
    """
    import datetime
    import json

    from optuna.distributions import distribution_to_json
    from optuna.storages._rdb import models

    started = time.perf_counter()
    existing = len(study.get_trials(deepcopy=False))
    missing = max(0, target - existing)
    distribution_json = distribution_to_json(LR_DISTRIBUTION)
    now = datetime.datetime.now()
    session = storage.scoped_session()
    try:
        for first in range(0, missing, 2000):
            trials = []
            for number in range(existing + first, existing + min(first + 2000, missing)):
                value = LR_DISTRIBUTION.low * (LR_DISTRIBUTION.high / LR_DISTRIBUTION.low) ** rng.random()
                trial = models.TrialModel(
                    number=number,
                    study_id=study._study_id,
                    state=TrialState.COMPLETE,
                    datetime_start=now,
                    datetime_complete=now,
                )
                trial.params = [
                    models.TrialParamModel(
                        param_name="lr",
                        param_value=LR_DISTRIBUTION.to_internal_repr(value),
                        distribution_json=distribution_json,
                    )
                ]
                trial.values = [
                    models.TrialValueModel(objective=0, value=value, value_type=models.TrialValueModel.TrialValueType.FINITE)
                ]
                trial.intermediate_values = [
                    models.TrialIntermediateValueModel(
                        step=1,
                        intermediate_value=value,
                        intermediate_value_type=models.TrialIntermediateValueModel.TrialIntermediateValueType.FINITE,
                    )
                ]
                trial.user_attributes = [
                    models.TrialUserAttributeModel(key=key, value_json=json.dumps(attr)) for key, attr in user_attrs.items()
                ]
                trials.append(trial)
            session.add_all(trials)
            session.commit()
    finally:
        session.close()
    return time.perf_counter() - started


@contextlib.contextmanager
def optuna_reads() -> Iterator[None]:
    """Run the jethpo path as it ran before the third fix, for the block.

    The changes measured against this case, each undone here inside this process:

    - ``ask``: Optuna reads the study's unfinished and newly finished trials to look for a
      WAITING one, although the budget count under the lock found none
      (``hpo.workers._WorkerStudy._pop_waiting_trial_id``);
    - the tell: the public ``Study.tell``, which reads the trial again after the update,
      instead of the function that ``Study.optimize`` calls (``hpo.objectives._tell``).
    """
    import hpo.objectives
    import hpo.workers

    saved = (hpo.workers._WorkerStudy._pop_waiting_trial_id, hpo.objectives._tell_with_warning)
    hpo.workers._WorkerStudy._pop_waiting_trial_id = optuna.Study._pop_waiting_trial_id
    hpo.objectives._tell_with_warning = None
    try:
        yield
    finally:
        hpo.workers._WorkerStudy._pop_waiting_trial_id, hpo.objectives._tell_with_warning = saved


@contextlib.contextmanager
def per_call_writes(worker: Any) -> Iterator[None]:
    """Run the jethpo path as it ran before its database work was grouped, for the block.

    The changes measured against this case, each undone here inside this process:

    - a trial's user attributes: one transaction per attribute instead of one per group
      (``storage.rdb.set_trial_user_attrs``);
    - the stages' study attributes: two reads per stage instead of one query
      (``storage.rdb.read_study_user_attrs``);
    - the stale-trial sweep: on every step instead of once per heartbeat interval and study,
      plus Optuna's own sweep and an immediate first heartbeat in ``run_trial``
      (``fail_stale=True``).

    Not undone: the former code also recorded a heartbeat inside the budget lock, one more
    write transaction per trial than this case makes.
    """
    import hpo.objectives
    import hpo.pipeline

    def set_each(storage, trial_id, attrs):
        for key, value in attrs.items():
            storage.set_trial_user_attr(trial_id, key, value)

    def read_each(storage, study_names):
        found = {}
        for name in study_names:
            try:
                found[name] = storage.get_study_user_attrs(storage.get_study_id_from_name(name))
            except KeyError:
                continue
        return found

    run_trial = hpo.objectives.run_trial

    def run_trial_sweeping(*args, **kwargs):
        kwargs["fail_stale"] = True
        return run_trial(*args, **kwargs)

    saved = (hpo.objectives.set_trial_user_attrs, hpo.pipeline.read_study_user_attrs, worker._swept)
    hpo.objectives.set_trial_user_attrs = set_each
    hpo.pipeline.read_study_user_attrs = read_each
    hpo.objectives.run_trial = run_trial_sweeping
    # a dict that keeps no sweep time, so that each step sweeps again
    worker._swept = _Forgetful()
    try:
        yield
    finally:
        hpo.objectives.set_trial_user_attrs, hpo.pipeline.read_study_user_attrs, worker._swept = saved
        hpo.objectives.run_trial = run_trial


def earlier_worker_storage(settings: Any) -> optuna.storages.RDBStorage:
    """Open a worker's storage as ``hpo.workers.open_worker_storage`` did before the second fix.

    One pooled connection plus one overflow connection, which SQLAlchemy opened and closed
    for every trial, and ``pool_pre_ping``, a ``SELECT 1`` at every checkout.
    """
    from sqlalchemy.engine import make_url

    from storage.rdb import _create_rdb_storage, _engine_kwargs, _retry_callback

    url = settings.storage_url
    kwargs = _engine_kwargs(make_url(url), pool_size=1, max_overflow=1, connect_timeout=10, sqlite_busy_timeout=60.0)
    kwargs.pop("poolclass", None)
    kwargs["pool_pre_ping"] = True
    return _create_rdb_storage(
        url,
        skip_table_creation=True,
        engine_kwargs=kwargs,
        heartbeat_interval=settings.heartbeat_interval,
        grace_period=settings.grace_period,
        heartbeat_stale_trial_callback=_retry_callback(settings.max_retry),
    )


@contextlib.contextmanager
def earlier_trial_path(worker: Any) -> Iterator[None]:
    """Run the jethpo path as it ran before the second fix (commit ef4e3ed), for the block.

    The changes measured against this case, each undone here inside this process:

    - the worker's pool: :func:`earlier_worker_storage` instead of two kept connections
      and a ping only after a rest (``storage.rdb.IdlePingPool``). The worker must have
      been opened with it; ``Worker.run`` opens it inside this block;
    - the budget count: every trial of the study read through Optuna and counted in Python,
      instead of one grouped count (``hpo.pipeline.count_study_trials``);
    - the search spaces: read with the stages at every step instead of once per worker;
    - the grouped user attributes: an ORM session and one multi-row ``VALUES`` compiled per
      call instead of SQLAlchemy Core and a cached statement.
    """
    import sqlalchemy
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    import hpo.objectives
    import hpo.workers
    from hpo.pipeline import BudgetExhausted, budget_lock, count_trials, load_stage_records
    from storage.rdb import _UPSERT_DIALECTS

    def ask_counting_in_python(study, fixed_distributions=None):
        with budget_lock(study._rdb, study.study_name):
            counts = count_trials(study.get_trials(deepcopy=False))
            if not counts.has_budget(study.n_trials):
                raise BudgetExhausted(f"study {study.study_name} has no budget left")
            return optuna.Study.ask(study, fixed_distributions)

    def stage_records_with_spaces():
        return [record for name in worker.pipelines for record in load_stage_records(worker._storage, name)]

    def set_attrs_in_session(storage, trial_id, attrs):
        if not attrs:
            return
        rdb = getattr(storage, "_backend", storage)
        model = models.TrialUserAttributeModel
        with _create_scoped_session(rdb.scoped_session, True) as session:
            if rdb.engine.name == "postgresql":
                session.execute(sqlalchemy.text("SET LOCAL synchronous_commit TO OFF"))
            trial = models.TrialModel.find_or_raise_by_id(trial_id, session)
            rdb.check_trial_is_updatable(trial_id, trial.state)
            rows = [{"trial_id": trial_id, "key": key, "value_json": json.dumps(value)} for key, value in attrs.items()]
            upsert = _UPSERT_DIALECTS[rdb.engine.name](model).values(rows)
            session.execute(
                upsert.on_conflict_do_update(
                    index_elements=[model.trial_id, model.key], set_={"value_json": upsert.excluded.value_json}
                )
            )

    saved = (hpo.workers.open_worker_storage, hpo.workers._WorkerStudy.ask, hpo.objectives.set_trial_user_attrs)
    hpo.workers.open_worker_storage = earlier_worker_storage
    hpo.workers._WorkerStudy.ask = ask_counting_in_python
    hpo.objectives.set_trial_user_attrs = set_attrs_in_session
    worker._stage_records = stage_records_with_spaces
    try:
        yield
    finally:
        hpo.workers.open_worker_storage, hpo.workers._WorkerStudy.ask, hpo.objectives.set_trial_user_attrs = saved
        del worker._stage_records


class _Forgetful(dict):
    """A dict that drops every item set in it."""

    def __setitem__(self, key: Any, value: Any) -> None:
        pass


class StatementCounter:
    """Count the SQL statements and commits that a SQLAlchemy engine sends."""

    def __init__(self, engine) -> None:
        from sqlalchemy import event

        self.statements = 0
        self.commits = 0
        self.write_commits = 0
        self._wrote = False
        self.log: list[str] | None = None
        event.listen(engine, "before_cursor_execute", self._statement)
        event.listen(engine, "commit", self._commit)

    def _statement(self, connection, cursor, statement: str, *args: Any) -> None:
        self.statements += 1
        if statement.lstrip()[:6].upper() in ("INSERT", "UPDATE", "DELETE"):
            self._wrote = True
        if self.log is not None:
            self.log.append(" ".join(statement.split())[:100])

    def _commit(self, *args: Any) -> None:
        self.commits += 1
        self.write_commits += self._wrote
        self._wrote = False
        if self.log is not None:
            self.log.append("COMMIT")

    def snapshot(self) -> tuple[int, int, int]:
        return self.statements, self.commits, self.write_commits


def probe_database(url: str, repeats: int = 200) -> dict[str, float]:
    """Measure the median latency of a ``SELECT 1`` round trip and of a one-row INSERT + COMMIT.

    Every write transaction of a trial waits for PostgreSQL to flush its write-ahead log
    (``synchronous_commit`` is on by default), so the second number is the cost floor of
    each write transaction.
    """
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    select_ms, insert_ms = [], []
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text("CREATE TABLE IF NOT EXISTS bench_probe (id serial PRIMARY KEY, value float)"))
        connection.commit()
        for _ in range(repeats):
            started = time.perf_counter()
            connection.execute(sqlalchemy.text("SELECT 1")).scalar()
            select_ms.append((time.perf_counter() - started) * 1e3)
            connection.commit()
            started = time.perf_counter()
            connection.execute(sqlalchemy.text("INSERT INTO bench_probe (value) VALUES (1.0)"))
            connection.commit()
            insert_ms.append((time.perf_counter() - started) * 1e3)
        synchronous_commit = connection.execute(sqlalchemy.text("SHOW synchronous_commit")).scalar()
    engine.dispose()
    return {
        "select_1_ms": median(select_ms),
        "insert_commit_ms": median(insert_ms),
        "synchronous_commit": synchronous_commit,
    }


# (file name ending, function name) of the steps shown in the per-trial breakdown
BREAKDOWN_FUNCTIONS = {
    "worker step (total)": ("hpo/workers.py", "_step"),
    "load_stage_records": ("hpo/pipeline.py", "load_stage_records"),
    "hpo.pipeline.fail_stale_trials": ("hpo/pipeline.py", "fail_stale_trials"),
    "optuna fail_stale_trials": ("optuna/storages/_heartbeat.py", "fail_stale_trials"),
    "  set_trial_user_attrs (grouped attributes)": ("storage/rdb.py", "set_trial_user_attrs"),
    "run_trial": ("hpo/objectives.py", "run_trial"),
    "  _WorkerStudy.ask (lock, budget, ask)": ("hpo/workers.py", "ask"),
    "    count_study_trials, inside the lock": ("hpo/pipeline.py", "count_study_trials"),
    "    Study.ask (Optuna), inside the lock": ("optuna/study/study.py", "ask"),
    "  Trial.set_user_attr": ("optuna/trial/_trial.py", "set_user_attr"),
    "  Trial.report": ("optuna/trial/_trial.py", "report"),
    "  Trial.should_prune": ("optuna/trial/_trial.py", "should_prune"),
    "  tell (hpo.objectives._tell)": ("hpo/objectives.py", "_tell"),
}


def breakdown(profile: cProfile.Profile, trials: int) -> dict[str, dict[str, float]]:
    """Return cumulative milliseconds and calls per trial of :data:`BREAKDOWN_FUNCTIONS`."""
    stats = pstats.Stats(profile).stats
    result = {}
    for label, (file_end, function) in BREAKDOWN_FUNCTIONS.items():
        calls = 0
        seconds = 0.0
        for (filename, _, name), (_, total_calls, _, cumulative, _) in stats.items():
            if name == function and filename.endswith(file_end):
                calls += total_calls
                seconds += cumulative
        result[label] = {"ms_per_trial": seconds * 1e3 / trials, "calls_per_trial": calls / trials}
    return result


def _top_functions(profile: cProfile.Profile, count: int = 40) -> str:
    stream = io.StringIO()
    pstats.Stats(profile, stream=stream).sort_stats("cumulative").print_stats(count)
    return stream.getvalue()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark with command-line arguments ``argv`` and return what it writes to its JSON file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", type=positive_int, nargs="+", default=[100, 1000], help="finished trials in the study before each measurement")
    parser.add_argument("--block", type=positive_int, default=10, help="trials per timed block")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed blocks per path and level")
    parser.add_argument("--sampler", choices=("random", "tpe"), default="random", help="sampler of both paths")
    parser.add_argument("--profile", action="store_true", help="also run one cProfile'd block of the jethpo path per level")
    parser.add_argument("--admin-url", default=DEFAULT_POSTGRES_ADMIN_URL, help="PostgreSQL URL allowed to create databases")
    parser.add_argument("--jets", default=None, help="jets file for the worker's data preparation; default: generated Pythia jets")
    args = parser.parse_args(argv)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")

    from hpo.objectives import prepare_data
    from hpo.pipeline import advance_pipeline, load_stage_records, plan_pipeline, register_pipeline
    from hpo.spaces import parse_profile
    from hpo.studies import add_space
    from hpo.workers import Worker, WorkerSettings, open_worker_storage
    from storage import open_storage

    path = jets_file(args.jets, N_JETS)
    rows: list[dict[str, Any]] = []
    profiles: dict[int, str] = {}
    with throwaway_postgres(args.admin_url, "orchestration") as url, noop_training(), tempfile.TemporaryDirectory() as folder:
        # the pipeline, registered as `jethpo run` does
        storage = open_storage(url)
        space_file = Path(folder) / "bench-noop.yaml"
        space_file.write_text(SPACE_TEMPLATE.format(sampler=args.sampler))
        space, _ = add_space(storage, space_file)
        data = prepare_data(path, n_jets=N_JETS)
        register_pipeline(
            storage,
            plan_pipeline({space.name: space}, parse_profile(PROFILE, "benchmark profile")),
            {"data_path": str(path), "n_jets": N_JETS, "split_seed": 0, "data_fingerprint": data.fingerprint},
        )
        advance_pipeline(storage, load_stage_records(storage, PIPELINE), "bench-controller")

        # the worker, as a Ray actor would run it
        settings = WorkerSettings(url)
        worker = Worker(settings, [PIPELINE], index=0)
        worker._storage = open_worker_storage(settings)
        identity = worker.identity()
        # the same worker before the third fix, and before the second, each with its own
        # storage and studies
        before_third = Worker(settings, [PIPELINE], index=0)
        before_third._storage = open_worker_storage(settings)
        earlier = Worker(settings, [PIPELINE], index=0)
        earlier._storage = earlier_worker_storage(settings)
        jethpo_study = optuna.load_study(study_name=space.stages[0].study_name, storage=storage)
        jethpo_attrs = {
            "seed": 123456789,
            "data_fingerprint": data.fingerprint,
            "device": "cpu",
            "params": {"lr": 1.0e-3, "n_flows": 2, "n_mlp_layers": 1, "nodes_1": 16},
            "wall_time_s": 0.05,
            "best_epoch": 1,
            "node_id": "local",
            "hostname": socket.gethostname(),
            "pid": 1,
            "worker": 0,
        }

        # plain Optuna on the same database
        plain_storage = optuna.storages.RDBStorage(url)
        plain_study = optuna.create_study(
            study_name="plain-noop",
            storage=plain_storage,
            sampler=space.create_sampler(0),
            pruner=space.create_pruner(),
        )

        jethpo_counter = StatementCounter(worker._storage.engine)
        before_third_counter = StatementCounter(before_third._storage.engine)
        earlier_counter = StatementCounter(earlier._storage.engine)
        optuna_counter = StatementCounter(plain_storage.engine)
        counts: dict[str, list[tuple[int, int]]] = {}

        def run_jethpo(runner: Any = worker) -> None:
            for _ in range(args.block):
                step = runner._step(identity)
                if step != "ran":
                    raise RuntimeError(f"the worker step returned {step!r} instead of running a trial")

        def timed(name: str, run: Any, counter: StatementCounter) -> Any:
            def block() -> float:
                before = counter.snapshot()
                started = time.perf_counter()
                run()
                seconds = time.perf_counter() - started
                after = counter.snapshot()
                counts.setdefault(name, []).append(tuple(a - b for a, b in zip(after, before)))
                return seconds / args.block

            return block

        def run_jethpo_before_third() -> None:
            with optuna_reads():
                run_jethpo(before_third)

        def run_jethpo_earlier() -> None:
            with optuna_reads(), earlier_trial_path(earlier):
                run_jethpo(earlier)

        def run_jethpo_per_call() -> None:
            with optuna_reads(), earlier_trial_path(earlier), per_call_writes(earlier):
                run_jethpo(earlier)

        cases = {
            "jethpo": timed("jethpo", run_jethpo, jethpo_counter),
            "optuna": timed("optuna", lambda: plain_study.optimize(noop_objective, n_trials=args.block), optuna_counter),
            "jethpo_before_third": timed("jethpo_before_third", run_jethpo_before_third, before_third_counter),
            "jethpo_earlier": timed("jethpo_earlier", run_jethpo_earlier, earlier_counter),
            "jethpo_per_call_writes": timed("jethpo_per_call_writes", run_jethpo_per_call, earlier_counter),
        }

        database = probe_database(url)
        print(
            f"database round trips: SELECT 1 {database['select_1_ms']:.2f} ms, one-row INSERT + COMMIT "
            f"{database['insert_commit_ms']:.2f} ms (synchronous_commit {database['synchronous_commit']})",
            flush=True,
        )

        # warm-up: the worker prepares its data and both paths open their connections
        worker._step(identity)
        with optuna_reads():
            before_third._step(identity)
        with optuna_reads(), earlier_trial_path(earlier):
            earlier._step(identity)
        plain_study.optimize(noop_objective, n_trials=1)

        rng = random.Random(0)
        for level in args.levels:
            fill_seconds = fill_study(jethpo_study, storage, level, jethpo_attrs, rng)
            fill_seconds += fill_study(plain_study, plain_storage, level, {}, rng)
            counts.clear()
            times = interleave(cases, args.repeats)
            failed = jethpo_study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
            if failed:
                raise RuntimeError(f"{len(failed)} jethpo trials failed: {failed[0].user_attrs.get('fail_message')}")
            row: dict[str, Any] = {"finished_trials": level, "fill_s": fill_seconds}
            for name, values in times.items():
                row[f"{name}_ms_per_trial"] = median(values) * 1e3
                row[f"{name}_blocks_ms"] = [value * 1e3 for value in values]
                row[f"{name}_statements_per_trial"] = median([pair[0] for pair in counts[name]]) / args.block
                row[f"{name}_commits_per_trial"] = median([pair[1] for pair in counts[name]]) / args.block
                row[f"{name}_write_commits_per_trial"] = median([pair[2] for pair in counts[name]]) / args.block
            row["ratio"] = row["jethpo_ms_per_trial"] / row["optuna_ms_per_trial"]
            row["ratio_before_third"] = row["jethpo_before_third_ms_per_trial"] / row["optuna_ms_per_trial"]
            row["ratio_earlier"] = row["jethpo_earlier_ms_per_trial"] / row["optuna_ms_per_trial"]
            row["ratio_per_call_writes"] = row["jethpo_per_call_writes_ms_per_trial"] / row["optuna_ms_per_trial"]
            rows.append(row)
            print(
                f"{level} finished trials: jethpo {row['jethpo_ms_per_trial']:.1f} ms, optuna "
                f"{row['optuna_ms_per_trial']:.1f} ms, before the third fix "
                f"{row['jethpo_before_third_ms_per_trial']:.1f} ms, before the second "
                f"{row['jethpo_earlier_ms_per_trial']:.1f} ms, before all three "
                f"{row['jethpo_per_call_writes_ms_per_trial']:.1f} ms per trial (filling took {fill_seconds:.0f} s)",
                flush=True,
            )
            if args.profile:
                # the statements of one trial, then a profiled block
                jethpo_counter.log = []
                worker._step(identity)
                statement_log = jethpo_counter.log
                jethpo_counter.log = None
                profile = cProfile.Profile()
                profile.enable()
                run_jethpo()
                profile.disable()
                profiles[level] = {
                    "breakdown": breakdown(profile, args.block),
                    "top": _top_functions(profile),
                    "statements_of_one_trial": statement_log,
                }

        worker._storage.engine.dispose()
        before_third._storage.engine.dispose()
        earlier._storage.engine.dispose()
        storage.engine.dispose()
        plain_storage.engine.dispose()

    print_table(
        rows,
        [
            "finished_trials",
            "jethpo_ms_per_trial",
            "optuna_ms_per_trial",
            "ratio",
            "jethpo_before_third_ms_per_trial",
            "ratio_before_third",
            "jethpo_earlier_ms_per_trial",
            "ratio_earlier",
            "jethpo_per_call_writes_ms_per_trial",
            "ratio_per_call_writes",
        ],
        title=f"Orchestration overhead, median of {args.repeats} blocks of {args.block} trials ({args.sampler} sampler)",
    )
    print_table(
        rows,
        [
            "finished_trials",
            "jethpo_statements_per_trial",
            "jethpo_commits_per_trial",
            "jethpo_write_commits_per_trial",
            "jethpo_before_third_statements_per_trial",
            "jethpo_before_third_commits_per_trial",
            "jethpo_earlier_statements_per_trial",
            "jethpo_earlier_commits_per_trial",
            "jethpo_per_call_writes_statements_per_trial",
            "jethpo_per_call_writes_commits_per_trial",
            "jethpo_per_call_writes_write_commits_per_trial",
            "optuna_statements_per_trial",
            "optuna_commits_per_trial",
            "optuna_write_commits_per_trial",
        ],
        title="SQL statements and commits per trial",
    )
    for level, profile in profiles.items():
        lines = [{"step": label, **values} for label, values in profile["breakdown"].items()]
        print_table(lines, ["step", "ms_per_trial", "calls_per_trial"], title=f"cProfile of the jethpo path at {level} finished trials")
    payload = {
        "settings": vars(args),
        "database": database,
        "rows": rows,
        "targets": {"max_ratio": 1.2, "max_ms_per_trial_at_10000": 50.0},
        "profiles": profiles,
    }
    write_results("orchestration", payload)
    return payload


if __name__ == "__main__":
    run_benchmark(main)
