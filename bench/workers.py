"""Worker scaling: trials per second through jethpo's Ray worker actors on a sleep objective.

For each worker count N, a fresh PostgreSQL database gets a one-stage search space and a
pipeline whose budget is ``N x --trials-per-worker`` trials. N Ray actors of a subclass of
``hpo.workers.Worker`` then run the real worker loop (``Worker.run``: stage records, stale
trials, budget lock, ask, heartbeats, user attributes, report, tell) while this process
plays the controller with ``hpo.pipeline.advance_pipeline``. The subclass only replaces
``hpo.objectives.train_params`` in its own process by a function that sleeps
``--sleep`` seconds and reports one value.

Each actor reserves ``--cpus-per-worker`` Ray CPUs (default 2/32), so that 32 actors fit on
the 2-core development machine whatever N is, and starts with the malloc settings of
jethpo's workers (``hpo.host_memory.worker_env_vars``). The actors are started and have
imported torch, the PostgreSQL driver and alembic (which Optuna's ``RDBStorage`` loads)
before the stage starts, so start-up is not timed. The ``cold-imports`` variant leaves the driver and
alembic to the first storage opening inside the timed run, as the code before this
variant did.

Each worker count runs once per variant (``--variants``): jethpo as it is (``jethpo``),
with each worker finding the head revision of Optuna's schema by importing Optuna's
migration scripts, because its settings do not carry the head that this process read
(``read-head``, as before ``hpo.workers.WorkerSettings.schema_head``), with the storage
libraries imported inside the timed run (``cold-imports``), as before the third fix of
``bench.orchestration`` (``before-third``: ``bench.orchestration.optuna_reads`` in every
worker), as before the second fix as well (``earlier``:
``bench.orchestration.earlier_trial_path`` too), and as before all three
(``per-call-writes``: ``bench.orchestration.per_call_writes`` as well). CPU time per
trial is summed by process group (workers, PostgreSQL, Ray, this controller) with psutil.

Throughput is the number of trials divided by the time from the first trial's start to
the last trial's end, both read from the trials in the database. Efficiency is
``throughput(N) / (N x throughput(1))``.

The start spread is the time from the first trial's start to the start of the last
worker's first trial, and the end spread the time from the end of the first worker's last
trial to the last trial's end. Both count in the time that throughput divides by. In the
runs of ``bench/BENCHMARKS.md`` neither grew with the number of trials per worker.

Each worker also logs when it requested the budget lock (``hpo.pipeline.budget_lock``),
was granted it and released it. The third table gives, for the first ask call of each
worker, the spread of those calls and of the lock grants and how long the lock was held,
and the median hold of the later calls.

Run from the repository root::

    python -m bench.workers                                  # N = 1, 2, 4, 8: about 3 minutes
    python -m bench.workers --workers 1 2 4 8 16 32          # up to 32 workers: about 10 minutes
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from bench.common import (
    DEFAULT_POSTGRES_ADMIN_URL,
    jets_file,
    non_negative_float,
    positive_float,
    positive_int,
    print_table,
    result_name,
    run_benchmark,
    throwaway_postgres,
    write_results,
)
from hpo.host_memory import worker_env_vars
from hpo.workers import Worker

__all__ = ["SleepWorker", "main", "sleep_train_params"]

logger = logging.getLogger(__name__)

N_JETS = 600

SPACE = """
name: bench-sleep
description: One-stage space whose trials sleep, for the worker scaling benchmark.
model: realnvp-flat
objective: generation
sampler: {type: random, seed: 0}
pruner: {type: none}
stages:
  - name: search
    params:
      lr: {type: float, low: 1.0e-5, high: 1.0e-1, log: true}
    fixed: {n_flows: 2, n_mlp_layers: 1, nodes_1: 16}
"""

PROFILE_TEMPLATE = """
name: scaling
n_jets: {n_jets}
models:
  convae: &budget
    search: {{n_trials: {n_trials}, epochs: 1, batch_size: 100, eval_every: 1, resources: {{cpus: 1, gpus: 0}}}}
    retrain: {{epochs: 1, batch_size: 100, eval_every: 1, resources: {{cpus: 1, gpus: 0}}}}
  realnvp-latent: *budget
  realnvp-flat: *budget
"""


def sleep_train_params(space, params, budget, data, *, seed, report=None, sleep_s: float, **ignored):
    """Stand in for ``hpo.objectives.train_params``: sleep, report the learning rate once, return it."""
    from models.training import TrainingResult

    time.sleep(sleep_s)
    value = float(params["lr"])
    if report is not None:
        report(1, value)
    return TrainingResult(best_emd_sum=value, best_epoch=1)


class SleepWorker(Worker):
    """``hpo.workers.Worker`` whose trials sleep instead of training.

    Args:
        sleep_s: Seconds each trial sleeps.
        variant: ``jethpo``, ``read-head``, ``cold-imports``, ``before-third``, ``earlier`` or ``per-call-writes`` (see the
            module docstring).
        Other arguments: see ``hpo.workers.Worker``.
    """

    def __init__(
        self,
        settings,
        pipelines,
        index: int,
        threads: int,
        sleep_s: float,
        variant: str = "jethpo",
        lock_log: str | None = None,
    ) -> None:
        super().__init__(settings, pipelines, index, threads)
        self.sleep_s = sleep_s
        self.variant = variant
        self.lock_log = lock_log

    def ready(self) -> dict[str, Any]:
        """Import what the worker loop imports; return the process id and its resident and unique memory in MiB."""
        import psutil
        import torch  # noqa: F401

        import hpo.objectives  # noqa: F401

        if self.variant != "cold-imports":
            # about 0.13 s of CPU per worker process on machine E (bench/BENCHMARKS.md, section 2)
            import alembic.migration  # noqa: F401
            import psycopg2  # noqa: F401

        memory = psutil.Process().memory_full_info()
        return {"pid": os.getpid(), "rss_mib": memory.rss / 2**20, "uss_mib": memory.uss / 2**20}

    def run(self) -> dict[str, Any]:
        import hpo.objectives

        from bench.orchestration import earlier_trial_path, optuna_reads, per_call_writes

        hpo.objectives.train_params = functools.partial(sleep_train_params, sleep_s=self.sleep_s)
        if self.lock_log is not None:
            _time_budget_lock(Path(self.lock_log) / f"worker-{self.index}.jsonl")
        if self.variant in ("jethpo", "cold-imports", "read-head"):
            return super().run()
        with optuna_reads():
            if self.variant == "before-third":
                return super().run()
            with earlier_trial_path(self):
                if self.variant == "earlier":
                    return super().run()
                with per_call_writes(self):
                    return super().run()


def _time_budget_lock(log: Path) -> None:
    """Make this process's workers append to ``log`` when they requested the budget lock, were granted it and released it."""
    import hpo.workers

    locked = hpo.workers.budget_lock

    @contextlib.contextmanager
    def timed(storage, study_name):
        requested = time.time()
        granted = None
        try:
            with locked(storage, study_name) as connection:
                granted = time.time()
                yield connection
        finally:
            # written once the lock is released, so the hold does not include the write
            if granted is not None:
                with open(log, "a") as output:
                    output.write(json.dumps([requested, granted, time.time()]) + "\n")

    hpo.workers.budget_lock = timed


def _lock_statistics(folder: Path) -> dict[str, float]:
    """Summarise the budget-lock times of each worker's first ask call and of the later calls, in seconds."""
    first, later = [], []
    for log in folder.glob("worker-*.jsonl"):
        entries = [json.loads(line) for line in log.read_text().splitlines()]
        first.append(entries[0])
        later.extend(entries[1:])
    if not first:
        return {}
    first_holds = sorted(released - granted for _, granted, released in first)
    later_holds = sorted(released - granted for _, granted, released in later) or [float("nan")]
    return {
        "first_ask_spread_s": max(requested for requested, _, _ in first) - min(requested for requested, _, _ in first),
        "first_lock_spread_s": max(granted for _, granted, _ in first) - min(granted for _, granted, _ in first),
        "first_hold_median_s": first_holds[len(first_holds) // 2],
        "first_hold_max_s": first_holds[-1],
        "first_hold_sum_s": sum(first_holds),
        "later_hold_median_s": later_holds[len(later_holds) // 2],
    }


def _read_trials(url: str, study_name: str, state: TrialState) -> list[optuna.trial.FrozenTrial]:
    """Return the trials of a study in one state, read through a storage of their own."""
    storage = optuna.storages.RDBStorage(url)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
        return study.get_trials(deepcopy=False, states=(state,))
    finally:
        storage.engine.dispose()


def _trial_times(url: str, study_name: str) -> list[tuple[float, float, int]]:
    return [
        (trial.datetime_start.timestamp(), trial.datetime_complete.timestamp(), int(trial.user_attrs.get("worker", -1)))
        for trial in _read_trials(url, study_name, TrialState.COMPLETE)
    ]


def _failure_reason(url: str, study_name: str) -> str:
    """Return why the trials of a failed stage failed, from their ``fail_message`` attribute."""
    failed = _read_trials(url, study_name, TrialState.FAIL)
    for trial in failed:
        message = trial.user_attrs.get("fail_message")
        if message:
            return f"{len(failed)} trials failed, trial {trial.number} with {message}"
    return f"{len(failed)} trials failed without a message. The workers' log lines above say why."


def _cpu_seconds_by_group(worker_pids: set[int]) -> dict[str, float]:
    """Sum user + system CPU seconds of the worker actors, PostgreSQL, Ray's own processes and this process.

    Ray's processes are those that the local Ray instance started under this process,
    other than the actors. PostgreSQL's processes serve every database of the server, so
    other users of the server add to that group.
    """
    import psutil

    def seconds(process: psutil.Process) -> float:
        try:
            times = process.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return 0.0
        return times.user + times.system

    this = psutil.Process()
    totals = {"workers": 0.0, "postgres": 0.0, "ray": 0.0, "controller": seconds(this)}
    for child in this.children(recursive=True):
        totals["workers" if child.pid in worker_pids else "ray"] += seconds(child)
    for process in psutil.process_iter(["name"]):
        if process.info["name"] == "postgres":
            totals["postgres"] += seconds(process)
    return totals


def measure(count: int, args: argparse.Namespace, path: Path, variant: str) -> dict[str, Any]:
    """Run one pipeline with ``count`` sleep workers and return its throughput."""
    import ray

    from hpo.objectives import prepare_data
    from hpo.pipeline import advance_pipeline, load_stage_records, plan_pipeline, register_pipeline
    from hpo.spaces import parse_profile
    from hpo.studies import add_space
    from hpo.workers import WorkerSettings
    from storage import open_storage

    n_trials = count * args.trials_per_worker
    with throwaway_postgres(args.admin_url, f"workers{count}_{variant.replace('-', '_')}") as url, tempfile.TemporaryDirectory() as folder:
        storage = open_storage(url)
        space_file = Path(folder) / "bench-sleep.yaml"
        space_file.write_text(SPACE)
        space, _ = add_space(storage, space_file)
        data = prepare_data(path, n_jets=N_JETS)
        profile = parse_profile(PROFILE_TEMPLATE.format(n_jets=N_JETS, n_trials=n_trials), "benchmark profile")
        register_pipeline(
            storage,
            plan_pipeline({space.name: space}, profile),
            {"data_path": str(path), "n_jets": N_JETS, "split_seed": 0, "data_fingerprint": data.fingerprint},
        )

        # workers, started and idle before the stage starts
        settings = WorkerSettings(url, poll_interval_s=args.poll)
        if variant != "read-head":
            settings = settings.with_schema_head()
        actor_class = ray.remote(SleepWorker)
        actors = [
            actor_class.options(
                num_cpus=args.cpus_per_worker, max_restarts=0, runtime_env={"env_vars": worker_env_vars()}
            ).remote(
                settings, [profile.name], index, 1, args.sleep, variant, folder
            )
            for index in range(count)
        ]
        started = time.perf_counter()
        readiness = ray.get([actor.ready.remote() for actor in actors], timeout=600)
        start_up_s = time.perf_counter() - started
        worker_pids = {item["pid"] for item in readiness}
        cpu_before = _cpu_seconds_by_group(worker_pids)
        dispatched = time.time()
        runs = [actor.run.remote() for actor in actors]

        # the controller's part
        study_name = space.stages[0].study_name
        deadline = time.monotonic() + args.timeout
        state = None
        while time.monotonic() < deadline:
            records = load_stage_records(storage, profile.name)
            search = next(record for record in records if record.study_name == study_name and record.kind == "search")
            if search.state.value in ("done", "failed"):
                state = search.state.value
                break
            advance_pipeline(storage, records, "bench-controller")
            # the poll interval of the `jethpo run` controller (WorkerSettings.poll_interval_s)
            time.sleep(WorkerSettings.poll_interval_s)
        cpu_after = _cpu_seconds_by_group(worker_pids)
        for actor in actors:
            ray.kill(actor, no_restart=True)
        errors = []
        for run in runs:
            try:
                ray.get(run, timeout=5)
            except Exception as error:  # noqa: BLE001 - killed actors raise RayActorError, which is expected
                errors.append(type(error).__name__)
        storage.engine.dispose()
        if state == "failed":
            raise SystemExit(f"The search stage with {count} workers failed: {_failure_reason(url, study_name)}")
        if state is None:
            raise SystemExit(
                f"The search stage with {count} workers did not finish within {args.timeout:g} s. "
                f"Pass a larger --timeout, or fewer --trials-per-worker."
            )

        times = _trial_times(url, study_name)
        lock = _lock_statistics(Path(folder))

    first_start = min(start for start, _, _ in times)
    last_end = max(end for _, end, _ in times)
    per_worker: dict[int, list[tuple[float, float]]] = {}
    for start, end, worker in times:
        per_worker.setdefault(worker, []).append((start, end))
    worker_rates = [
        len(spans) / (max(end for _, end in spans) - min(start for start, _ in spans)) for spans in per_worker.values()
    ]
    durations = sorted(end - start for start, end, _ in times)
    first_starts = [min(start for start, _ in spans) for spans in per_worker.values()]
    last_ends = [max(end for _, end in spans) for spans in per_worker.values()]
    cpu_ms_per_trial = {
        f"cpu_ms_per_trial_{group}": (cpu_after[group] - cpu_before[group]) * 1e3 / len(times) for group in cpu_after
    }
    return {
        "workers": count,
        "variant": variant,
        **cpu_ms_per_trial,
        "trials": len(times),
        "span_s": last_end - first_start,
        "trials_per_s": len(times) / (last_end - first_start),
        "sum_of_worker_rates_per_s": sum(worker_rates),
        "median_trial_s": durations[len(durations) // 2],
        # how long the last worker took to start its first trial, and the first to end its last
        "start_spread_s": max(first_starts) - first_start,
        "end_spread_s": last_end - min(last_ends),
        "first_trial_after_dispatch_s": sorted(start - dispatched for start in first_starts),
        "workers_that_ran_trials": len(per_worker),
        "start_up_s": start_up_s,
        **lock,
        "worker_rss_mib_median": sorted(item["rss_mib"] for item in readiness)[len(readiness) // 2],
        "worker_uss_mib_median": sorted(item["uss_mib"] for item in readiness)[len(readiness) // 2],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark with command-line arguments ``argv`` and return what it writes to its JSON file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=positive_int, nargs="+", default=[1, 2, 4, 8], help="worker counts to measure")
    parser.add_argument("--sleep", type=non_negative_float, default=2.0, help="seconds each trial sleeps")
    parser.add_argument("--trials-per-worker", type=positive_int, default=5, help="budget of the stage per worker")
    parser.add_argument("--cpus-per-worker", type=positive_float, default=2 / 32, help="Ray CPUs each actor reserves")
    parser.add_argument("--poll", type=positive_float, default=0.2, help="seconds an idle worker waits before it reads the storage again")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=("jethpo", "read-head", "cold-imports", "before-third", "earlier", "per-call-writes"),
        default=["jethpo", "before-third"],
        help="jethpo as it is, with each worker reading Optuna's schema head itself, with the storage libraries imported "
        "inside the timed run, and as before the third, the second or all three fixes of bench.orchestration",
    )
    parser.add_argument("--output", type=result_name, default="workers", help="name of the result file under bench/results/")
    parser.add_argument("--timeout", type=positive_float, default=600, help="seconds one worker count may take")
    parser.add_argument("--admin-url", default=DEFAULT_POSTGRES_ADMIN_URL, help="PostgreSQL URL allowed to create databases")
    parser.add_argument("--jets", default=None, help="jets file for the workers' data preparation; default: generated Pythia jets")
    args = parser.parse_args(argv)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    path = jets_file(args.jets, N_JETS)

    from hpo.workers import connect_ray

    connect_ray(None)
    import ray

    rows = []
    try:
        for count in args.workers:
            for variant in args.variants:
                row = measure(count, args, path, variant)
                rows.append(row)
                print(
                    f"{count} workers ({variant}): {row['trials_per_s']:.2f} trials/s over {row['span_s']:.1f} s "
                    f"(start-up {row['start_up_s']:.0f} s)",
                    flush=True,
                )
    finally:
        ray.shutdown()

    for row in rows:
        row["ideal_trials_per_s"] = row["workers"] / args.sleep
        single = next((item["trials_per_s"] for item in rows if item["workers"] == 1 and item["variant"] == row["variant"]), None)
        if single is not None:
            row["efficiency"] = row["trials_per_s"] / (row["workers"] * single)
    print_table(
        rows,
        ["workers", "variant", "trials", "span_s", "trials_per_s", "ideal_trials_per_s", "efficiency", "median_trial_s", "start_spread_s", "end_spread_s"],
        title=f"Worker scaling, {args.sleep:g} s sleep objective, {args.trials_per_worker} trials per worker",
    )
    print_table(
        rows,
        ["workers", "variant", "cpu_ms_per_trial_workers", "cpu_ms_per_trial_postgres", "cpu_ms_per_trial_ray", "cpu_ms_per_trial_controller"],
        title="CPU time per trial by process group (user + system)",
    )
    print_table(
        rows,
        ["workers", "variant", "first_ask_spread_s", "first_lock_spread_s", "first_hold_median_s", "first_hold_max_s", "first_hold_sum_s", "later_hold_median_s"],
        title="Budget lock: the first ask call of each worker, and the later calls",
    )
    payload = {"settings": vars(args), "rows": rows, "targets": {"min_efficiency_at_32": 0.9}}
    write_results(args.output, payload)
    return payload


if __name__ == "__main__":
    run_benchmark(main)
