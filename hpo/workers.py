"""Ray workers that pull trials of the most urgent open stage, and the controller that drives them.

A worker is a Ray actor that reserves the resources of one trial (``num_cpus`` and
``num_gpus`` from the run profile). Its :meth:`Worker.run` loop repeats: fail the stale trials
of the running stages, pick the most urgent stage with budget left, ask its study for a trial
(:func:`hpo.objectives.run_trial`), train, tell. It returns when every stage of its pipelines
is done or failed. Until then a worker with nothing to do polls the storage, because a
RUNNING trial elsewhere may die and be retried, and a finished stage may start the next one.

Ray restarts a worker whose process dies (``max_restarts=-1``) and calls ``run`` again
(``max_task_retries=-1``). The dead worker's trial stops recording heartbeats, so after the
grace period the next worker or controller that looks marks it FAIL, and the storage's retry
callback queues a WAITING copy with the same parameters.

Workers, and the Ray task of a retraining by hand, start with the malloc settings of
:mod:`hpo.host_memory` unless ``WorkerSettings.keep_freed_memory`` is off, so training reuses
the memory of its large tensors from step to step. A worker hands that memory back to the
system after each trial and each step.

The controller (:func:`run_pipeline`, ``jethpo run``) registers the pipeline, starts Ray or
joins a cluster, and starts the workers spread over the cluster's nodes. Then it reads the
storage every few seconds. Each time, it starts and finishes stages
(``hpo.pipeline.advance_pipeline``), fails stale trials, logs what changed and draws the
progress view. :func:`run_workers`
(``jethpo worker``) does the same for the pipelines already registered, without a profile.
A controller stopped by Ctrl-C or SIGTERM ends its workers and hands the steps they claimed
and their RUNNING trials back to the storage, so the next run takes them over at once
instead of after the grace period.

Every process keeps at most one idle PostgreSQL connection: the storages opened here have a
pool of one connection plus one overflow connection, which is closed after use. A worker
uses both for a moment while it requests a trial, and when a heartbeat coincides with
another request.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import optuna
import sqlalchemy.exc
from optuna.trial import FrozenTrial, TrialState

from hpo import pipeline as stages
from hpo.host_memory import release_freed_memory, worker_env_vars
from hpo.pipeline import BudgetExhausted, StageRecord, budget_lock, count_study_trials
from hpo.spaces import Profile, Resources
from hpo.steps import StepRunner, claimable_steps
from storage import pipeline as stage_table
from storage import open_storage, schema_head, set_trial_user_attrs
from storage.urls import StorageError, describe_database_error, mask_password

if TYPE_CHECKING:
    from hpo.objectives import TooFewJetsError

__all__ = [
    "DEFAULT_GRACE_PERIOD",
    "DEFAULT_HEARTBEAT_INTERVAL",
    "SPLIT_SEED",
    "DataMismatchError",
    "PipelineOutcome",
    "RunError",
    "Worker",
    "WorkerPool",
    "WorkerSettings",
    "connect_ray",
    "default_worker_count",
    "open_worker_storage",
    "prepare_jets",
    "retrain_by_hand",
    "run_pipeline",
    "run_step",
    "run_workers",
    "start_workers",
    "supervise",
]

logger = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_INTERVAL = 60
"""Seconds between heartbeats of a running trial."""

DEFAULT_GRACE_PERIOD = 120
"""Seconds without a heartbeat after which a RUNNING trial is failed and retried."""

SPLIT_SEED = 0
"""Seed of the train/validation/test split of every pipeline (``hpo.objectives.prepare_data``)."""

GENERATED_JETS_FOLDER = "pythia"
"""Folder under the data directory that receives generated jets when no ``--data`` is given."""

_NODE_WAIT_S = 600
"""Seconds a controller that joined a cluster waits for nodes with resources for one trial."""

# Exceptions that mean the database is unreachable for a while, as during a PostgreSQL
# restart, rather than a bug: the loops here wait and try again.
_OUTAGE_ERRORS = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.DisconnectionError,
    sqlalchemy.exc.TimeoutError,
    StorageError,
)

class RunError(Exception):
    """Error that stops a run from starting or going on. Its message names the cause and the fix."""


class DataMismatchError(RunError):
    """Jets that a worker prepared differ from those the controller registered."""


@dataclass(frozen=True)
class WorkerSettings:
    """Settings shared by a controller and its workers, sent to every worker process.

    Attributes:
        storage_url: Storage URL with the password, because workers must log in.
        heartbeat_interval: Seconds between heartbeats of a running trial.
        grace_period: Seconds without a heartbeat after which a RUNNING trial is stale.
            Every process that works on a storage must use the same two values, because
            each one fails the trials that look stale to it.
        max_retry: How many times a stale trial is re-queued.
        poll_interval_s: Seconds a worker or controller waits before it reads the storage
            again when it has nothing to do.
        data_path: Jets file to read instead of the one registered with the pipeline, for a
            cluster that mounts the data at another path than the controller. Its data
            fingerprint must match.
        artifact_dir: Artifact directory to use instead of the one registered with the
            pipeline, for a node that mounts it at another path.
        keep_freed_memory: Start workers with the malloc settings of
            :mod:`hpo.host_memory`, which make CPU training faster and its peak memory
            higher. Without, workers start with the environment of their Ray node.
        schema_head: Optuna version and head revision of its storage schema, as read by
            the process that started the workers (:meth:`with_schema_head`). A worker with
            the same Optuna version checks its database against it without importing
            Optuna's migration scripts.
    """

    storage_url: str
    heartbeat_interval: int = DEFAULT_HEARTBEAT_INTERVAL
    grace_period: int = DEFAULT_GRACE_PERIOD
    max_retry: int = 3
    poll_interval_s: float = 2.0
    data_path: str | None = None
    artifact_dir: str | None = None
    keep_freed_memory: bool = True
    schema_head: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.heartbeat_interval, bool) or not isinstance(self.heartbeat_interval, int) or self.heartbeat_interval < 1:
            raise ValueError(
                f"invalid heartbeat interval {self.heartbeat_interval!r}: expected a whole number of seconds of at least 1"
            )
        if self.grace_period <= self.heartbeat_interval:
            raise ValueError(
                f"invalid grace period {self.grace_period!r} s: it must be longer than the heartbeat interval "
                f"of {self.heartbeat_interval} s, or running trials would be failed. Use at least twice the interval."
            )

    def with_schema_head(self) -> WorkerSettings:
        """Return these settings with the schema head that this process read when it opened a storage."""
        return dataclasses.replace(self, schema_head=schema_head() or self.schema_head)

    def __repr__(self) -> str:
        return (
            f"WorkerSettings(storage_url={mask_password(self.storage_url)!r}, heartbeat_interval="
            f"{self.heartbeat_interval}, grace_period={self.grace_period}, max_retry={self.max_retry})"
        )


def open_worker_storage(settings: WorkerSettings) -> optuna.storages.RDBStorage:
    """Open the storage with heartbeats, retries and the small pool of a worker.

    The pool keeps two connections: a trial is asked for on one while the other holds the
    budget lock. With one pooled connection, SQLAlchemy would open and close a second one
    for every trial, a new database session each time.

    Raises:
        StorageError: The URL is invalid or the database cannot be opened.
    """
    return open_storage(
        settings.storage_url,
        heartbeat_interval=settings.heartbeat_interval,
        grace_period=settings.grace_period,
        failed_trial_max_retry=settings.max_retry,
        pool_size=2,
        max_overflow=0,
        known_head=settings.schema_head,
    )


def _is_outage(error: BaseException) -> bool:
    """Return whether an error, or one that caused it, means the database is unreachable."""
    seen = 0
    current: BaseException | None = error
    while current is not None and seen < 10:
        if isinstance(current, _OUTAGE_ERRORS):
            return True
        if isinstance(current, sqlalchemy.exc.DBAPIError) and current.connection_invalidated:
            return True
        current = current.__cause__ or current.__context__
        seen += 1
    return False


class _Outage:
    """Backoff and rate-limited logging while the storage is unreachable."""

    def __init__(self, process_name: str) -> None:
        self.process_name = process_name
        self.failures = 0

    def failed(self, error: BaseException) -> float:
        """Log the failure (the first and every tenth in a row) and return the seconds to wait."""
        self.failures += 1
        if self.failures % 10 == 1:
            logger.warning(
                "%s failed to reach the storage (%d failures in a row), retrying: %s",
                self.process_name,
                self.failures,
                describe_database_error(error.__cause__ or error),
            )
        return min(30.0, 0.5 * 2 ** min(self.failures - 1, 6))

    def recovered(self) -> None:
        if self.failures:
            logger.info("%s reached the storage again after %d failed attempts", self.process_name, self.failures)
        self.failures = 0


# the worker


class _WorkerStudy(optuna.Study):
    """Study whose ``ask`` enforces the stage's global budget and tags the trial with its worker.

    ``hpo.objectives.run_trial`` calls ``ask`` once per trial. Here ``ask`` takes the
    study's :func:`~hpo.pipeline.budget_lock`, counts the trials, and raises
    :class:`~hpo.pipeline.BudgetExhausted` instead of creating a trial when no budget is
    left. ``run_trial`` stores ``trial_attrs``, the worker's identity, with its own
    attributes in one transaction, and records the first heartbeat one interval after
    ``ask``. A worker that dies before that leaves a trial without a heartbeat, which
    :func:`hpo.pipeline.fail_stale_trials` fails once it is older than the grace period.
    """

    def __init__(
        self,
        study_name: str,
        storage: optuna.storages.RDBStorage,
        sampler: optuna.samplers.BaseSampler,
        pruner: optuna.pruners.BasePruner,
        trial_attrs: Mapping[str, Any],
    ) -> None:
        super().__init__(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner)
        self._rdb = storage
        self.trial_attrs = dict(trial_attrs)
        self.n_trials = 0
        self._none_waiting = False

    def ask(self, fixed_distributions=None) -> optuna.Trial:
        with budget_lock(self._rdb, self.study_name) as locked:
            if locked is None:
                with self._rdb.engine.connect() as connection:
                    counts = count_study_trials(connection, self._study_id)
            else:
                counts = count_study_trials(locked, self._study_id)
            if not counts.has_budget(self.n_trials):
                raise BudgetExhausted(
                    f"study {self.study_name} has {counts.used} of {self.n_trials} trials counted and none WAITING"
                )
            # a trial enqueued after this count waits for the next ask, like one enqueued after the ask
            self._none_waiting = counts.waiting == 0
            try:
                return super().ask(fixed_distributions)
            finally:
                self._none_waiting = False

    def _pop_waiting_trial_id(self) -> int | None:
        # NOTE: overrides the private method with which Optuna 5's ``Study.ask`` looks for a
        # WAITING trial, reading every unfinished trial and every trial finished since the
        # last read. That read is skipped when the count under the budget lock found none
        # WAITING. Should Optuna stop calling this method, ``ask`` reads as before.
        if self._none_waiting:
            return None
        return super()._pop_waiting_trial_id()


class Worker:
    """Trial loop of one worker process, run as a Ray actor or directly.

    Args:
        settings: Storage URL, heartbeat settings and poll interval.
        pipelines: Names of the pipelines to work on.
        index: Number of the worker among its controller's workers. It offsets the sampler
            seeds (``hpo.spaces.SamplerSpec.create``) and is stored with each trial.
        threads: Torch threads for training, normally the CPUs reserved per trial.
    """

    def __init__(
        self,
        settings: WorkerSettings,
        pipelines: Sequence[str],
        index: int = 0,
        threads: int = 1,
    ) -> None:
        self.settings = settings
        self.pipelines = list(pipelines)
        self.index = index
        self.threads = max(1, int(threads))
        self._storage: optuna.storages.RDBStorage | None = None
        self._studies: dict[str, _WorkerStudy] = {}
        self._data: dict[tuple, Any] = {}
        self._inherited: dict[str, dict[str, Any]] = {}
        self._latent_inputs: dict[str, tuple[Any, Any]] = {}
        self._step_runner: StepRunner | None = None
        self._trials_run = 0
        self._steps_run = 0
        self._swept: dict[str, float] = {}
        self._spaces: dict[str, Any] | None = None

    # identity

    def identity(self) -> dict[str, Any]:
        """Return the node id, host name, process id and worker index stored with each trial."""
        node_id = "local"
        restarted = False
        # a Worker run outside Ray, as in a thread, must not import Ray just to ask
        ray = sys.modules.get("ray")
        if ray is not None:
            if ray.is_initialized():
                context = ray.get_runtime_context()
                node_id = context.get_node_id()
                with warnings.catch_warnings():
                    # Ray 2.60 reads its own deprecated actor_id inside this property
                    warnings.simplefilter("ignore", DeprecationWarning)
                    restarted = bool(context.get_actor_id()) and context.was_current_actor_reconstructed
        return {
            "node_id": node_id,
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "worker": self.index,
            "restarted": restarted,
        }

    def _device(self) -> str:
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized() and ray.get_gpu_ids():
            # Ray sets CUDA_VISIBLE_DEVICES to the GPUs it assigned, so cuda means those.
            # NOTE: this path has not run on a machine with GPUs yet.
            return "cuda"
        return "cpu"

    # main loop

    def run(self) -> dict[str, Any]:
        """Run trials until every stage of the worker's pipelines is done or failed.

        Storage outages, such as a PostgreSQL restart, are logged and waited out. A trial
        that could not report during an outage is retried, either by the storage's retry
        callback once its heartbeat is stale or, when it already ended as FAIL, by this worker.

        Returns:
            :meth:`identity` plus ``trials`` and ``steps``, the numbers of trials and steps
            that this process ran.

        Raises:
            DataMismatchError: The jets file on this node differs from the registered one.
        """
        import torch

        _configure_worker_logging()
        torch.set_num_threads(self.threads)
        identity = self.identity()
        worker_name = f"Worker {self.index} (pid {identity['pid']} on {identity['hostname']})"
        logger.info(
            "%s started for pipelines %s%s",
            worker_name,
            ", ".join(self.pipelines),
            " after a restart" if identity["restarted"] else "",
        )

        outage = _Outage(worker_name)
        while True:
            try:
                if self._storage is None:
                    self._storage = open_worker_storage(self.settings)
                step = self._step(identity)
                outage.recovered()
            except Exception as error:
                if not _is_outage(error):
                    raise
                time.sleep(outage.failed(error))
                continue
            if step == "finished":
                break
            if step == "ran":
                release_freed_memory()
            if step == "idle":
                time.sleep(self.settings.poll_interval_s)

        logger.info(
            "%s stopped after %s: every stage is done or failed", worker_name, _work_done(self._trials_run, self._steps_run)
        )
        if self._storage is not None:
            self._storage.engine.dispose()
        return {**identity, "trials": self._trials_run, "steps": self._steps_run}

    def _step(self, identity: Mapping[str, Any]) -> str:
        """Run one trial of the most urgent open stage and return "ran", "idle" or "finished"."""
        records = self._stage_records()
        if not records or all(record.is_terminal for record in records):
            return "finished"

        # steps first: they are few, and the latent flows wait for the retrained ConVAE
        for record in claimable_steps(records, self.settings.grace_period):
            if self._steps().claim(record):
                self._steps().run(record, [item for item in records if item.pipeline == record.pipeline])
                self._steps_run += 1
                return "ran"

        running = [
            record
            for record in records
            if record.state == stages.StageState.RUNNING and record.problem is None and not record.is_step
        ]
        # a trial goes stale only after the grace period, so one sweep per heartbeat
        # interval finds it at most one interval late
        now = time.monotonic()
        for record in running:
            if now - self._swept.get(record.study_name, -math.inf) < self.settings.heartbeat_interval:
                continue
            self._swept[record.study_name] = now
            study = self._study(record, identity)
            for number, retry in stages.fail_stale_trials(study, self._storage):
                _log_stale(record.study_name, number, retry, self.settings.grace_period)

        for record in running:
            study = self._study(record, identity)
            # the study's ask counts the budget under the budget lock, before a trial exists
            try:
                self._run_trial(record, study)
            except BudgetExhausted as exhausted:
                logger.debug("Skipping stage %s: %s", record.name, exhausted)
                continue
            return "ran"
        return "idle"

    def _stage_records(self) -> list[StageRecord]:
        """Read the stages of the worker's pipelines, with the search spaces read once.

        A stored search space never changes (``storage.pipeline.save_space`` rejects other
        text under a name in use), so the spaces are read again only when a stage names one
        that this worker has not seen.
        """
        from hpo.studies import load_spaces

        def read() -> list[StageRecord]:
            return [
                record for name in self.pipelines for record in stages.load_stage_records(self._storage, name, self._spaces)
            ]

        if self._spaces is None:
            self._spaces = load_spaces(self._storage)
        records = read()
        if any(record.space is None and record.kind != stages.RESULTS for record in records):
            self._spaces = load_spaces(self._storage)
            records = read()
        return records

    def _steps(self) -> StepRunner:
        if self._step_runner is None:
            identity = self.identity()
            self._step_runner = StepRunner(
                storage=self._storage,
                owner=_step_owner(identity),
                heartbeat_interval_s=self.settings.heartbeat_interval,
                grace_period_s=self.settings.grace_period,
                data_loader=self._prepared_data,
                artifact_dir=self.settings.artifact_dir,
                device=self._device(),
            )
        return self._step_runner

    def _study(self, record: StageRecord, identity: Mapping[str, Any]) -> _WorkerStudy:
        study = self._studies.get(record.study_name)
        if study is None:
            attrs = {key: identity[key] for key in ("node_id", "hostname", "pid", "worker")}
            study = _WorkerStudy(
                record.study_name,
                self._storage,
                sampler=record.space.create_sampler(self.index),
                pruner=record.space.create_pruner(),
                trial_attrs=attrs,
            )
            self._studies[record.study_name] = study
        return study

    def _run_trial(self, record: StageRecord, study: _WorkerStudy) -> FrozenTrial:
        from hpo.objectives import run_trial

        data = self._prepared_data(record)
        inherited = self._inherited.get(record.study_name)
        if inherited is None:
            from hpo.studies import inherited_params

            inherited = inherited_params(self._storage, record.space, record.stage)
            self._inherited[record.study_name] = inherited

        latent_model, latents = self._latent_inputs.get(record.study_name, (None, None))
        if record.space.model == "realnvp-latent" and latent_model is None:
            latent_model, latents = self._steps().latent_inputs(record, data)
            self._latent_inputs[record.study_name] = (latent_model, latents)

        study.n_trials = record.budget.n_trials
        frozen = run_trial(
            study,
            record.space,
            record.stage,
            record.budget,
            data,
            inherited=inherited,
            latent_model=latent_model,
            latents=latents,
            storage=self._storage,
            user_attrs=study.trial_attrs,
            # _step sweeps the stale trials of every running stage
            fail_stale=False,
        )
        self._trials_run += 1
        if frozen.state == TrialState.FAIL and str(frozen.user_attrs.get("fail_message", "")).startswith(
            stages.STORAGE_FAILURE_PREFIXES
        ):
            self._retry_after_storage_failure(study, frozen)
        return frozen

    def _retry_after_storage_failure(self, study: _WorkerStudy, frozen: FrozenTrial) -> None:
        # NOTE: run_trial ends a trial as FAIL for every exception of the training, including
        # a failed trial.report while the database restarts, so the worker re-queues such
        # trials with the storage's retry callback, as if their heartbeat had gone stale.
        if self._storage.get_heartbeat_stale_trial_callback() is None:
            return
        with budget_lock(self._storage, study.study_name):
            retry = stages.queue_retry(study, self._storage, frozen)

        if retry is not None:
            logger.warning(
                "Trial %d of study %s failed because a storage request failed; re-queued its parameters as trial %d",
                frozen.number,
                study.study_name,
                retry,
            )
        else:
            logger.warning(
                "Trial %d of study %s failed because a storage request failed, and its retries ran out",
                frozen.number,
                study.study_name,
            )

    def _prepared_data(self, record: StageRecord):
        from hpo.objectives import prepare_data

        run = record.run
        path = self.settings.data_path or run["data_path"]
        key = (path, run.get("n_jets"), run.get("split_seed", SPLIT_SEED))
        data = self._data.get(key)
        if data is None:
            data = prepare_data(path, seed=key[2], n_jets=key[1], device=self._device())
            expected = run.get("data_fingerprint")
            if expected and data.fingerprint != expected:
                raise DataMismatchError(
                    f"Jets file {path} on host {socket.gethostname()} has data fingerprint "
                    f"{data.fingerprint[:12]}, but pipeline {record.pipeline} registered {expected[:12]}. "
                    f"Make the same jets file available at this path on every node, or pass its path "
                    f"on this node with 'jethpo worker --data'."
                )
            self._data[key] = data
        return data


def _log_stale(study_name: str, number: int, retry: int | None, grace_period: int) -> None:
    if retry is None:
        logger.warning(
            "Failed trial %d of study %s: no heartbeat for more than %d s, and its retries ran out",
            number,
            study_name,
            grace_period,
        )
    else:
        logger.warning(
            "Failed trial %d of study %s: no heartbeat for more than %d s. Retrying its parameters as trial %d",
            number,
            study_name,
            grace_period,
            retry,
        )


def _configure_worker_logging() -> None:
    """Send jethpo's INFO records to the worker process's stderr, which Ray keeps in its logs."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()


# Ray


def connect_ray(address: str | None, *, log_to_driver: bool = False) -> bool:
    """Join the Ray cluster at ``address``, or start a local Ray instance when it is None.

    Ray's own log records below WARNING are dropped, and the output of worker processes
    stays in Ray's log files unless ``log_to_driver`` is set.

    Returns:
        Whether a local instance was started.

    Raises:
        RunError: The cluster cannot be reached.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray 2.60 turns token authentication on for a new local instance unless the mode is set,
    # and `ray start` turns it on where it finds a token. A driver sends its token only in
    # token mode, and aborts in token mode without one. Ray reads the mode when it is imported.
    global _token_mode_from_found_token
    token_found = _ray_token_found()
    if address and "RAY_AUTH_MODE" not in os.environ and token_found:
        _token_mode_from_found_token = True
    if not address or token_found:
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    common = {"logging_level": logging.WARNING, "log_to_driver": log_to_driver}
    probed = _check_reachable(address) if address else False
    try:
        if address:
            ray.init(address=address, **common)
            logger.info("Joined the Ray cluster at %s: %s", address, _describe_resources(ray.cluster_resources()))
            return False
        # "local" starts a new instance even when RAY_ADDRESS or a `ray start` cluster exists
        with _sigterm_blocked():
            ray.init(address="local", include_dashboard=False, **common)
    except (ConnectionError, RuntimeError, ValueError) as error:
        if not address:
            raise RunError(
                f"Failed to start a local Ray instance: {error}. Its logs are under /tmp/ray/session_latest/logs."
            ) from None
        cause = "Its address responds, so check the token" if probed else "Check the address and the token"
        raise RunError(
            f"Failed to join the Ray cluster at {address}: {error}. {cause}: a cluster with token authentication, "
            f"which 'ray start' of Ray 2.60 turns on where it finds a token, needs the same token on this machine, "
            f"in ~/.ray/auth_token or RAY_AUTH_TOKEN, with RAY_AUTH_MODE unset or set to token."
        ) from None
    logger.info("Started a local Ray instance: %s", _describe_resources(ray.cluster_resources()))
    return True


_token_mode_from_found_token = False
"""Whether :func:`connect_ray` joined a cluster in token mode only because it found a token."""


def _ray_token_found() -> bool:
    """Return whether Ray would find an authentication token: its variables or ``~/.ray/auth_token``."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token"
    return Path(path).expanduser().is_file()


RAY_CONNECT_TIMEOUT_S = 10.0
"""Seconds :func:`connect_ray` waits for a TCP connection to a cluster's address, and for its response."""

# HTTP/2's client connection preface followed by an empty SETTINGS frame
_HTTP2_CLIENT_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_HTTP2_SETTINGS = 0x04


def _check_reachable(address: str) -> bool:
    """Raise RunError unless ``address`` of the form HOST:PORT or ray://HOST:PORT accepts a gRPC connection.

    Ray 2.60 tries a GCS address that accepts no connection 20 times, and one try took
    about 35 s on a development machine, so ``ray.init`` would give up only after minutes.
    For a loopback host, Ray connects to this machine's node address instead, so that
    address is tried. Other forms, such as ``auto``, are left to Ray.

    Returns:
        True once the address responded, False for a form that is left to Ray.
    """
    match = re.fullmatch(r"(ray://)?(\[[0-9a-fA-F:.]+\]|[^:/\[\]]+):(\d+)", address.strip())
    if match is None:
        return False
    client, host, port = match.group(1), match.group(2).strip("[]"), int(match.group(3))
    if not client and (host == "localhost" or host == "::1" or host.startswith("127.")):
        from ray.util import get_node_ip_address

        host = get_node_ip_address()
    try:
        connection = socket.create_connection((host, port), timeout=RAY_CONNECT_TIMEOUT_S)
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        raise RunError(
            f"Failed to join the Ray cluster at {address}: no connection to {host}:{port}, where Ray looks for "
            f"it ({reason}). Check the address and that the cluster is running."
        ) from None
    # Ray's GCS and client server speak gRPC, so they respond to HTTP/2's client preface with a
    # SETTINGS frame. Another server, such as Redis on port 6379, would make ray.init retry.
    with connection:
        try:
            connection.sendall(_HTTP2_CLIENT_PREFACE)
            header = b""
            while len(header) < 9:
                chunk = connection.recv(9 - len(header))
                if not chunk:
                    break
                header += chunk
        except OSError:
            header = b""
    if len(header) < 9 or header[3] != _HTTP2_SETTINGS:
        raise RunError(
            f"Failed to join the Ray cluster at {address}: the server at {host}:{port} did not respond with gRPC, "
            f"as a Ray cluster's address does. Check the port: 'ray start --head' prints the address to join."
        )
    return True


@contextmanager
def _sigterm_blocked() -> Iterator[None]:
    """Block SIGTERM in this thread, so that the processes it starts inherit the block.

    A local Ray instance's processes inherit the signal mask of the thread that calls
    ``ray.init``: its GCS server, its raylet and the workers that the raylet starts.
    ``timeout`` sends SIGTERM to the controller's whole process group, and a batch system
    may send it to every process of the run. Without the block, the GCS server and the
    raylet would end at once, and the controller could neither stop its workers nor hand
    their work back. The workers would end in the middle of their trials. With the block,
    they leave SIGTERM to the controller, which hands the work back and ends them with
    ``ray.shutdown``: SIGKILL, one second after a SIGTERM that they ignore. Ray blocks
    SIGINT in them in the same way. A SIGTERM that arrives during ``ray.init`` reaches this
    process when the block ends.

    NOTE: so ``kill PID`` no longer ends a single worker of a local instance, and
    ``kill -9 PID`` is needed. Ray then restarts the worker.
    """
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextmanager
def _interrupts_ignored(local: bool) -> Iterator[None]:
    """Ignore SIGINT and SIGTERM in the block when ``local``, in the main thread only.

    ``ray.shutdown`` of a local instance takes a few seconds, because its processes block
    SIGTERM (:func:`_sigterm_blocked`) and Ray waits a second for each before SIGKILL. A
    second Ctrl-C in that time would cut the shutdown short and leave Ray processes that
    ignore SIGTERM. Leaving a joined cluster only disconnects, so there the signals stay.
    """
    if not local or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, signal.SIG_IGN) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _shutdown_ray(local: bool, pool: WorkerPool | None = None) -> None:
    """End the pool's actors, if any, and disconnect from Ray, stopping the instance when ``local``."""
    import ray

    with _interrupts_ignored(local):
        if local:
            logger.info("Stopping the local Ray instance")
        if pool is not None:
            pool.kill()
        ray.shutdown()


def _describe_resources(resources: Mapping[str, float]) -> str:
    return f"{_count_of(resources.get('CPU', 0), 'CPU')}, {_count_of(resources.get('GPU', 0), 'GPU')}"


def _count_of(number: float, noun: str) -> str:
    """Return ``number`` and ``noun``, plural unless the number is 1: "1 worker", "0.5 GPUs"."""
    return f"{number:g} {noun}" if number == 1 else f"{number:g} {noun}s"


def default_worker_count(cluster: Mapping[str, float], trial: Resources) -> int:
    """Return the default number of workers for a cluster.

    One worker per GPU when trials request GPUs (more when they request a fraction of
    one), else as many as the cluster's CPUs hold trials, at least 1. A worker trains
    with as many torch threads as its trial requests CPUs, so the CPUs are used without
    oversubscribing them.

    Args:
        cluster: Total resources of the Ray cluster, ``ray.cluster_resources()``.
        trial: Resources of one trial.
    """
    cpus = float(cluster.get("CPU", 0))
    gpus = float(cluster.get("GPU", 0))
    if trial.gpus > 0 and gpus > 0:
        count = math.floor(gpus / trial.gpus + 1e-9)
    else:
        count = math.floor(cpus / max(trial.cpus, 1e-9) + 1e-9)
    return max(1, min(count, _capacity(cluster, trial)))


_IDENTITY_GROUP = "identity"
"""Ray concurrency group of the workers' ``identity`` calls, apart from the run loop's group."""


@dataclass
class WorkerPool:
    """Worker actors started by one controller.

    Attributes:
        workers: ``(actor handle, object ref of its run loop)`` per worker.
        placement_group: Placement group that reserves the workers' resources, or None.
    """

    workers: list[tuple[Any, Any]]
    placement_group: Any = None

    def identities(self, timeout_s: float) -> dict[int, dict[str, Any]]:
        """Ask every actor for its :meth:`Worker.identity` while its run loop goes on.

        The calls run in a concurrency group of their own, so an actor returns its identity
        while its run loop runs.

        Returns:
            The identities by position in ``workers``. Actors that did not return their
            identity within ``timeout_s``, such as dead or restarting ones, are left out.
        """
        import ray

        if not self.workers:
            return {}
        positions = {
            actor.identity.options(concurrency_group=_IDENTITY_GROUP).remote(): position
            for position, (actor, _) in enumerate(self.workers)
        }
        ready, _ = ray.wait(list(positions), num_returns=len(positions), timeout=timeout_s)
        found = {}
        for ref in ready:
            try:
                found[positions[ref]] = ray.get(ref)
            except ray.exceptions.RayError:
                continue
        return found

    def stop(self, timeout_s: float) -> set[int]:
        """End every actor without restart and wait for their run loops to end.

        Returns:
            Positions in ``workers`` of the actors whose run loop ended within ``timeout_s``,
            because it returned, raised, or its actor is dead.
        """
        import ray

        if not self.workers:
            return set()
        positions = {ref: position for position, (_, ref) in enumerate(self.workers)}
        for actor, _ in self.workers:
            ray.kill(actor, no_restart=True)
        ended, _ = ray.wait(list(positions), num_returns=len(positions), timeout=timeout_s)
        return {positions[ref] for ref in ended}

    def kill(self) -> None:
        """End every actor without restart and release the placement group."""
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor, _ in self.workers:
            ray.kill(actor, no_restart=True)
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
            self.placement_group = None


def start_workers(
    count: int,
    trial: Resources,
    settings: WorkerSettings,
    pipelines: Sequence[str],
    first_index: int = 0,
) -> WorkerPool:
    """Start worker actors spread over the cluster's nodes and call their ``run`` loops.

    The workers that fit into the cluster's free resources get one bundle each of a
    placement group with the SPREAD strategy, so Ray reserves them on as many different
    nodes as it can, and restarts a worker in its bundle. Workers beyond that wait for
    resources with the SPREAD scheduling strategy.

    Args:
        count: Number of workers.
        trial: Resources of one trial, reserved by each worker.
        settings: Settings sent to every worker.
        pipelines: Pipeline names the workers work on.
        first_index: Index of the first worker.

    Returns:
        The workers and their placement group.
    """
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundle = {"CPU": float(trial.cpus)}
    if trial.gpus > 0:
        bundle["GPU"] = float(trial.gpus)
    in_group = min(count, _capacity(ray.available_resources(), trial))
    group = None
    if in_group > 0:
        group = placement_group([bundle] * in_group, strategy="SPREAD")
        ray.get(group.ready(), timeout=120)

    actor_class = ray.remote(concurrency_groups={_IDENTITY_GROUP: 1})(Worker)
    settings = settings.with_schema_head()
    threads = max(1, math.floor(trial.cpus))
    workers = []
    for position, index in enumerate(range(first_index, first_index + count)):
        strategy: Any = "SPREAD"
        if group is not None and position < in_group:
            strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=position)
        actor = actor_class.options(
            num_cpus=trial.cpus,
            num_gpus=trial.gpus,
            max_restarts=-1,
            max_task_retries=-1,
            scheduling_strategy=strategy,
            runtime_env={"env_vars": worker_env_vars(settings.keep_freed_memory)},
        ).remote(settings, list(pipelines), index, threads)
        workers.append((actor, actor.run.remote()))
    logger.info(
        "Started %s for pipelines %s, each with %s",
        _count_of(count, "worker"),
        ", ".join(pipelines),
        _describe_resources({"CPU": trial.cpus, "GPU": trial.gpus}),
    )
    return WorkerPool(workers=workers, placement_group=group)


def _capacity(resources: Mapping[str, float], trial: Resources) -> int:
    """Return how many trials fit into the given resources at once."""
    limits = [math.floor(float(resources.get("CPU", 0)) / trial.cpus + 1e-9)]
    if trial.gpus > 0:
        limits.append(math.floor(float(resources.get("GPU", 0)) / trial.gpus + 1e-9))
    return max(0, min(limits))


def _wait_for_capacity(trial: Resources, timeout_s: float) -> Mapping[str, float]:
    """Return the cluster's resources once they fit one trial, or after ``timeout_s``.

    A controller may start before the nodes of its cluster have joined, as in
    docker compose, where the workers' nodes start after the head.
    """
    import ray

    cluster = ray.cluster_resources()
    if _capacity(cluster, trial) > 0 or timeout_s <= 0:
        return cluster
    logger.info(
        "Waiting up to %g s for Ray nodes with %g CPUs and %g GPUs for one trial (the cluster has %s)",
        timeout_s,
        trial.cpus,
        trial.gpus,
        _describe_resources(cluster),
    )
    deadline = time.monotonic() + timeout_s
    while _capacity(cluster, trial) == 0 and time.monotonic() < deadline:
        time.sleep(2.0)
        cluster = ray.cluster_resources()
    return cluster


def _check_capacity(count: int, trial: Resources, cluster: Mapping[str, float]) -> None:
    if trial.gpus > 0 and float(cluster.get("GPU", 0)) == 0:
        raise RunError(
            f"Every trial requests {trial.gpus:g} GPUs, but the Ray cluster has none. Use a profile "
            f"with gpus: 0, or add nodes with GPUs to the cluster."
        )
    capacity = _capacity(cluster, trial)
    if capacity == 0:
        raise RunError(
            f"Every trial requests {trial.cpus:g} CPUs and {trial.gpus:g} GPUs, but the Ray cluster has "
            f"{_describe_resources(cluster)}. Use a profile that requests fewer, or add nodes."
        )
    if count > capacity:
        logger.warning(
            "%d workers requested, but the cluster can run %d at once (%s); the others wait for resources",
            count,
            capacity,
            _describe_resources(cluster),
        )


# the controller


@dataclass
class PipelineOutcome:
    """Result of a controller run.

    Attributes:
        states: Final state of every stage, by ``(pipeline, stage)``.
        progress: The last reading of the storage, or None.
        worker_errors: One message per worker whose loop raised.
        pending_runs: Object refs of the worker loops that had not returned when the
            pipelines finished.
    """

    states: dict[tuple[str, str], stages.StageState] = field(default_factory=dict)
    progress: Any = None
    worker_errors: list[str] = field(default_factory=list)
    pending_runs: list[Any] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether every stage is done."""
        return bool(self.states) and all(state == stages.StageState.DONE for state in self.states.values())


def _read_trials(
    storage: optuna.storages.RDBStorage,
    records: Sequence[StageRecord],
    cache: dict[str, optuna.Study],
) -> dict[str, list[FrozenTrial]]:
    trials = {}
    for record in records:
        if record.is_step:
            continue
        study = cache.get(record.study_name)
        if study is None:
            try:
                study = optuna.load_study(study_name=record.study_name, storage=storage)
            except KeyError:
                continue
            cache[record.study_name] = study
        trials[record.study_name] = study.get_trials(deepcopy=False)
    return trials


def _step_outputs(storage: optuna.storages.RDBStorage, records: Sequence[StageRecord]) -> dict[tuple[str, str], dict]:
    """Read the step outputs of the pipelines with a running or failed step, by ``(pipeline, step)``.

    A running retraining reports its epoch there, and a failed step its error.
    """
    watched = (stages.StageState.RUNNING, stages.StageState.FAILED)
    pipelines = {record.pipeline for record in records if record.is_step and record.state in watched}
    found = {}
    for pipeline in sorted(pipelines):
        for name, payload in stage_table.get_outputs(storage.engine, pipeline).items():
            found[(pipeline, name)] = payload
    return found


def supervise(
    storage: optuna.storages.RDBStorage,
    pipelines: Sequence[str],
    workers: Sequence[tuple[Any, Any]],
    *,
    settings: WorkerSettings,
    monitor: Any,
    view: Any = None,
    owner: str | None = None,
) -> PipelineOutcome:
    """Drive the pipelines until every stage is done or failed, watching the workers.

    Each round reads the stages and trials, fails stale trials, starts and finishes stages
    (``hpo.pipeline.advance_pipeline``), logs the changes and redraws the view. Storage
    outages are waited out.

    Args:
        storage: Storage of the controller.
        pipelines: Pipeline names.
        workers: ``(actor, run ref)`` pairs from :func:`start_workers`.
        settings: Poll interval and grace period.
        monitor: A ``hpo.progress.PipelineMonitor``.
        view: A ``hpo.progress.LiveView``, or None.
        owner: Name recorded as the claimer of started stages, by default ``host:pid``.

    Returns:
        The final states.

    Raises:
        RunError: Every worker stopped before the pipelines finished.
    """
    import ray

    from hpo.progress import read_progress

    owner = owner or f"{socket.gethostname()}:{os.getpid()}"
    pending = [ref for _, ref in workers]
    outcome = PipelineOutcome()
    cache: dict[str, optuna.Study] = {}
    outage = _Outage("The controller")
    first = True
    workers_stopped = False
    records: list[StageRecord] = []

    while True:
        try:
            records = [record for name in pipelines for record in stages.load_stage_records(storage, name)]
            runnable = [record for record in records if record.problem is None]
            for record in runnable:
                if record.state == stages.StageState.RUNNING and record.study_name in cache:
                    stages.fail_stale_trials(cache[record.study_name], storage)
            trials = _read_trials(storage, runnable, cache)
            events = []
            for name in pipelines:
                events += stages.advance_pipeline(
                    storage, [record for record in records if record.pipeline == name], owner, trials
                )
            if events:
                records = [record for name in pipelines for record in stages.load_stage_records(storage, name)]
                trials = _read_trials(storage, [record for record in records if record.problem is None], cache)
            progress = read_progress(records, trials, workers=len(workers), step_outputs=_step_outputs(storage, records))
            monitor.update(progress, trials, events)
            if first:
                monitor.summarize(progress)
                first = False
            if view is not None:
                view.update(progress)
            outcome.progress = progress
            outage.recovered()
        except Exception as error:
            if not _is_outage(error):
                raise
            time.sleep(outage.failed(error))
            continue

        outcome.states = {(record.pipeline, record.name): record.state for record in records}
        if pending:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
            for ref in ready:
                _collect(ref, outcome)
        if records and all(record.is_terminal for record in records):
            outcome.pending_runs = pending
            return outcome
        if workers and not pending:
            if not workers_stopped:
                # read the storage once more, because another controller may have finished
                # the last stage after this one read it
                workers_stopped = True
                continue
            hint = ""
            if _token_mode_from_found_token:
                hint = (
                    " This process joined the cluster in token mode because it found a Ray token. If the "
                    "cluster runs without authentication, set RAY_AUTH_MODE=disabled for the jethpo commands too."
                )
            raise RunError(
                "Every worker stopped before the pipeline finished"
                + (f": {outcome.worker_errors[0]}" if outcome.worker_errors else ".")
                + " Fix the cause and run the same command again to resume."
                + hint
            )
        time.sleep(settings.poll_interval_s)


def _collect(ref: Any, outcome: PipelineOutcome) -> None:
    import ray

    try:
        summary = ray.get(ref)
    except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as error:
        cause = getattr(error, "cause", None)
        message = str(cause) if isinstance(cause, RunError) else str(error).strip().splitlines()[-1]
        logger.error("A worker stopped with an error: %s", message)
        outcome.worker_errors.append(message)
        return
    logger.info(
        "Worker %s on %s (node %s) finished after %s%s",
        summary["worker"],
        summary["hostname"],
        summary["node_id"][:12],
        _work_done(summary["trials"], summary["steps"]),
        " since Ray restarted it" if summary["restarted"] else "",
    )


def _work_done(trials: int, steps: int) -> str:
    """Describe a worker's work, such as "5 trials and 1 step"."""
    done = f"{trials} trial{'' if trials == 1 else 's'}"
    if steps:
        done += f" and {steps} step{'' if steps == 1 else 's'}"
    return done


def _stop_workers(pool: WorkerPool, outcome: PipelineOutcome, timeout_s: float) -> None:
    """Wait for the worker loops that are still running to return, log them, and end the actors."""
    import ray

    pending = list(outcome.pending_runs)
    if pending:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=timeout_s)
        for ref in ready:
            _collect(ref, outcome)
    if pending:
        logger.warning("%d workers did not stop within %g s after the pipeline finished; ending them", len(pending), timeout_s)
    outcome.pending_runs = []
    pool.kill()


# handing back the work of an interrupted run

_IDENTITY_TIMEOUT_S = 2.0
"""Seconds an interrupted controller waits for its workers to report their identity."""

_STOP_TIMEOUT_S = 5.0
"""Seconds an interrupted controller waits for Ray to confirm that its workers ended."""

_HAND_BACK_TIMEOUT_S = 10.0
"""Seconds an interrupted controller spends releasing its workers' steps and failing their trials.

It matches the PostgreSQL connect timeout of ``storage.open_storage``, so an unreachable
database costs one connection attempt.
"""

HAND_BACK_LIMIT_S = _IDENTITY_TIMEOUT_S + _STOP_TIMEOUT_S + _HAND_BACK_TIMEOUT_S
"""Maximum seconds from Ctrl-C or SIGTERM to the end of the hand-back. A container manager
must wait longer than this before it kills the controller."""


def _warn_interrupted_hand_back() -> None:
    logger.warning(
        "Interrupted again while handing back the work of the stopped workers. What is left is taken over "
        "after the grace period."
    )


def _hand_back_work(storage: optuna.storages.RDBStorage, pipelines: Sequence[str], pool: WorkerPool) -> None:
    """End the workers of an interrupted run and hand the steps and trials they held back to the storage.

    Their claimed steps become pending again, and their RUNNING trials are failed and
    re-queued by the storage's retry callback, as heartbeat-stale trials are. So the next
    run starts both at once instead of after the grace period, and a retraining resumes
    from the training state it saved. Only workers that reported their identity and that
    Ray confirmed as ended are handed back, so other controllers and workers that share the
    storage keep their claims and trials.

    Every wait is bounded, so an unreachable Ray cluster or database delays the exit by at
    most ``_IDENTITY_TIMEOUT_S + _STOP_TIMEOUT_S + _HAND_BACK_TIMEOUT_S`` (17 s). Whatever is
    not handed back is taken over after the grace period.
    """
    try:
        identities = pool.identities(timeout_s=_IDENTITY_TIMEOUT_S)
        ended = pool.stop(timeout_s=_STOP_TIMEOUT_S)
    except KeyboardInterrupt:
        _warn_interrupted_hand_back()
        raise
    except Exception as error:
        # Ray may be failing too, as when the controller lost the cluster
        logger.warning(
            "Failed to end the workers through Ray: %s. Their steps and trials are taken over after the grace period.",
            error,
        )
        return
    workers = [identities[position] for position in sorted(ended) if position in identities]
    if len(workers) < len(pool.workers):
        logger.warning(
            "%d of %d workers did not report their identity within %g s or did not end within %g s. Their "
            "steps and trials are taken over after the grace period.",
            len(pool.workers) - len(workers),
            len(pool.workers),
            _IDENTITY_TIMEOUT_S,
            _STOP_TIMEOUT_S,
        )
    if not workers:
        return

    # a thread, because a database request can block longer than the bound
    thread = threading.Thread(
        target=_release_work, args=(storage, pipelines, workers), name="hand back work", daemon=True
    )
    thread.start()
    try:
        thread.join(_HAND_BACK_TIMEOUT_S)
    except KeyboardInterrupt:
        _warn_interrupted_hand_back()
        raise
    if thread.is_alive():
        logger.warning(
            "Handing back the steps and trials of %d stopped workers did not finish within %g s. What is left "
            "is taken over after the grace period.",
            len(workers),
            _HAND_BACK_TIMEOUT_S,
        )


def _release_work(storage: optuna.storages.RDBStorage, pipelines: Sequence[str], workers: Sequence[Mapping[str, Any]]) -> None:
    """Release the steps and fail the RUNNING trials of ended workers, logging instead of raising."""
    try:
        owners = [_step_owner(identity) for identity in workers]
        steps = sum(len(stage_table.release_stages(storage.engine, pipeline, owners)) for pipeline in pipelines)
        trials = _fail_trials_of(storage, pipelines, workers)
    except Exception as error:
        logger.warning(
            "Failed to hand back the steps and trials of the stopped workers: %s. They are taken over after "
            "the grace period.",
            describe_database_error(error),
        )
        return
    logger.info(
        "Handed back %s and %s of %s: the next run starts them at once",
        _count(steps, "step"),
        _count(trials, "RUNNING trial"),
        _count(len(workers), "stopped worker"),
    )


def _count(number: int, noun: str) -> str:
    """Return ``number`` with ``noun`` in the singular or the plural, as in "1 step" or "2 steps"."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _step_owner(identity: Mapping[str, Any]) -> str:
    """Return the ``claimed_by`` value of the steps that a worker with this identity claims."""
    return f"{identity['hostname']}:{identity['pid']}:worker-{identity['worker']}"


def _trial_tag(attrs: Mapping[str, Any]) -> tuple[Any, ...]:
    """Return ``(node_id, hostname, pid, worker)`` of a trial's user attributes or a worker's identity."""
    return (attrs.get("node_id"), attrs.get("hostname"), attrs.get("pid"), attrs.get("worker"))


def _fail_trials_of(
    storage: optuna.storages.RDBStorage, pipelines: Sequence[str], workers: Sequence[Mapping[str, Any]]
) -> int:
    """Fail the RUNNING trials of ended workers and re-queue them with the storage's retry callback.

    A trial belongs to a worker when its user attributes ``node_id``, ``hostname``, ``pid``
    and ``worker`` equal the worker's identity.

    Returns:
        The number of trials failed.
    """
    tags = {_trial_tag(identity): identity for identity in workers}
    study_names = dict.fromkeys(
        stage.study_name for pipeline in pipelines for stage in stage_table.get_stages(storage.engine, pipeline)
    )
    callback = storage.get_heartbeat_stale_trial_callback()
    failed = 0
    for study_name in study_names:
        try:
            study_id = storage.get_study_id_from_name(study_name)
        except KeyError:
            continue
        for trial in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            identity = tags.get(_trial_tag(trial.user_attrs))
            if identity is None:
                continue
            reason = {
                "fail_reason": "interrupted",
                "fail_message": "the run was interrupted (Ctrl-C or SIGTERM) and handed the trial back",
            }
            # under the lock, so that advance_pipeline never counts the trial without its retry
            with budget_lock(storage, study_name):
                try:
                    set_trial_user_attrs(storage, trial._trial_id, reason)
                    if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                        continue
                except optuna.exceptions.UpdateFinishedTrialError:
                    # the worker finished the trial before it ended
                    continue
                failed += 1
                retry = None
                if callback is not None:
                    study = optuna.load_study(study_name=study_name, storage=storage)
                    retry = stages.queue_retry(study, storage, trial)
            worker = f"worker {identity['worker']} (pid {identity['pid']} on {identity['hostname']})"
            if retry is None:
                logger.warning(
                    "Failed trial %d of study %s, which the stopped %s ran, and its retries ran out",
                    trial.number,
                    study_name,
                    worker,
                )
            else:
                logger.info(
                    "Failed trial %d of study %s, which the stopped %s ran. Retrying its parameters as trial %d",
                    trial.number,
                    study_name,
                    worker,
                    retry,
                )
    return failed


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM, as sent by ``docker stop``, into KeyboardInterrupt in the main thread.

    The exception's argument is "SIGTERM", from which the command line picks its exit code.
    Later SIGTERMs are ignored, because the stop is under way: GNU ``timeout`` sends the
    signal to the controller and then to its process group, and the second one would cut
    the hand-back short. A Ctrl-C still does.
    """
    stopping = False

    def interrupt(signum: int, frame: Any) -> None:
        nonlocal stopping
        # no log line here: writing to stderr from a signal handler can interrupt another write
        if stopping:
            return
        stopping = True
        raise KeyboardInterrupt(signal.Signals(signum).name)

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:
        # not the main thread, where signal handlers cannot be set
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def existing_data_path(data: str) -> Path:
    """Return the ``--data`` path made absolute, or raise RunError when it does not exist."""
    path = Path(data).expanduser()
    if not path.exists():
        raise RunError(f"Jets file {str(path)!r} not found. Pass an existing file or directory with --data.")
    return path.resolve()


def prepare_jets(data: str | None, data_dir: Path, n_jets: int | None, profile_name: str) -> Path:
    """Return the jets file to use, generating Pythia jets into the data directory if none is given.

    Generated jets go to ``<data_dir>/pythia/jets.hdf5`` with seed 0. A file there that
    already has at least ``n_jets`` jets is reused, because a pipeline reads the first
    ``n_jets`` jets and the same seed always generates the same first jets. When that file
    has fewer, the jets go to ``<data_dir>/pythia/<n_jets>-jets/jets.hdf5`` instead, so a
    file that another pipeline registered is never rewritten.

    Args:
        data: Value of ``--data``, or None.
        data_dir: Data directory.
        n_jets: The profile's jets, None for all jets of a file.
        profile_name: Profile name, for messages.

    Raises:
        RunError: ``--data`` does not exist, or no ``--data`` is given for a profile that
            reads all jets of a file.
    """
    if data is not None:
        return existing_data_path(data)

    if n_jets is None:
        raise RunError(
            f"Profile {profile_name!r} reads every jet of a data set, so it needs --data, such as "
            f"JetNet's g.hdf5. Or make jets with 'jethpo data generate --jets N --out DIR' and pass that file."
        )
    import h5py

    from models.generate import generate_jets

    folder = (Path(data_dir) / GENERATED_JETS_FOLDER).expanduser().resolve()
    target = folder
    for candidate in (folder, folder / f"{n_jets}-jets"):
        path = candidate / "jets.hdf5"
        available = 0
        if path.exists():
            try:
                with h5py.File(path, "r") as jets_file:
                    available = int(jets_file.attrs.get("n_jets", 0))
            except OSError:
                available = 0
        if available >= n_jets:
            logger.info("Using %d generated jets in %s (the profile needs %d)", available, path, n_jets)
            return path
        target = candidate
        if available == 0:
            break
    logger.info(
        "No --data given: generating %d gluon jets with Pythia 8 into %s. Later runs reuse them.",
        n_jets,
        target,
    )
    return Path(generate_jets(n_jets, target, seed=0)).resolve()


def _run_info(path: Path, profile: Profile, artifact_dir: Path) -> dict[str, Any]:
    from hpo.objectives import prepare_data
    from hpo.spaces import builtin_profiles
    from storage.artifacts import open_artifact_store

    open_artifact_store(artifact_dir)
    data = prepare_data(path, seed=SPLIT_SEED, n_jets=profile.n_jets, device="cpu")
    info = {
        "data_path": str(path),
        "n_jets": profile.n_jets,
        "split_seed": SPLIT_SEED,
        "data_fingerprint": data.fingerprint,
        "artifact_dir": str(Path(artifact_dir).resolve()),
    }
    source = Path(profile.source).expanduser()
    if profile.name not in builtin_profiles() and source.is_file():
        # 'jethpo run' without --profile resumes the pipeline with this file
        info["profile_file"] = str(source.resolve())
    return info


def run_pipeline(
    settings: WorkerSettings,
    profile: Profile,
    *,
    data: str | None,
    data_dir: Path,
    artifact_dir: Path | None = None,
    address: str | None = None,
    workers: int | None = None,
    families: Sequence[str] | None = None,
    live: bool = False,
    log_to_driver: bool = False,
) -> PipelineOutcome:
    """Register a profile's pipeline, or resume it, and run it to the end on Ray workers.

    Args:
        settings: Storage and heartbeat settings.
        profile: Run profile. The pipeline is named after it.
        data: Jets file, or None to generate Pythia jets (see :func:`prepare_jets`).
        data_dir: Data directory for generated jets.
        artifact_dir: Artifact directory for checkpoints, plots and tables that every node
            reads. None keeps the directory of a resumed pipeline, and otherwise means
            ``$JETHPO_ARTIFACTS`` or ``<data_dir>/artifacts``.
        address: Ray cluster to join, or None to start a local Ray instance.
        workers: Number of workers, or None for :func:`default_worker_count`.
        families: Search spaces to run, or None for all.
        live: Draw the live progress view on stderr instead of logging each trial.
        log_to_driver: Show the workers' own log lines on this process's stderr.

    Returns:
        The final stage states.

    Raises:
        RunError, StorageError, ConfigError: for invalid input, or when the run cannot go on.
        KeyboardInterrupt: on Ctrl-C or SIGTERM, after the workers were stopped and the
            steps and RUNNING trials they held were handed back to the storage.
    """
    from hpo.objectives import TooFewJetsError
    from hpo.progress import LiveView, PipelineMonitor
    from hpo.studies import load_spaces

    if address:
        # before the pipeline is registered and its jets are generated
        _check_reachable(address)
    storage = open_worker_storage(settings)
    plan = stages.plan_pipeline(load_spaces(storage), profile, families)
    for stage in plan.excluded:
        logger.info("Leaving out stage %s: %s", stage.name, stage.excluded)
    if not plan.runnable:
        raise RunError(f"Profile {profile.name!r} has no stage that this version of jethpo can run for the chosen search spaces.")

    # pipeline registration, which keeps the state of stages stored before
    _check_one_pipeline(storage, plan, settings.storage_url)
    stored = stages.load_stage_records(storage, plan.name)
    existing = {record.name: record.state for record in stored}
    registered = stages.registered_run(storage, plan.name) if existing else None
    changes = stages.changed_budgets(storage, plan) if existing else []
    # failed steps that can run again keep the pipeline open (register_pipeline resets them)
    retry = stages.retryable_steps({record.name: (record.state, record.depends_on) for record in stored})
    terminal = (stages.StageState.DONE, stages.StageState.FAILED)
    if existing and not retry and all(existing.get(stage.name) in terminal for stage in plan.runnable):
        if data is not None and registered is not None:
            # other jets are rejected as for a pipeline that is not finished, rather than ignored
            _check_registered_jets(existing_data_path(data), profile, plan.name, settings.storage_url, registered)
        if changes:
            logger.warning(
                "Pipeline %s is already finished, so these budget changes of profile %s are not applied: %s. "
                "To search with them, run the profile on another storage.",
                plan.name,
                profile.name,
                "; ".join(changes),
            )
        logger.info("Pipeline %s is already finished; nothing to run", plan.name)
        _check_finished_artifacts(storage, registered, artifact_dir, plan.name)
        return _final_outcome(storage, [plan.name])
    if data is None and registered is not None and Path(registered["data_path"]).exists():
        # a resumed pipeline keeps its jets, even when the data directory now has other generated jets
        data = registered["data_path"]
    path = prepare_jets(data, data_dir, profile.n_jets, profile.name)
    artifact_dir = _resumed_artifact_dir(artifact_dir, registered, data_dir, plan.name)
    try:
        run_info = _run_info(path, profile, artifact_dir)
    except TooFewJetsError as error:
        _reject_too_few_jets(error, profile.name, plan.name, registered)
    if registered is not None and registered.get("data_fingerprint") not in (None, run_info["data_fingerprint"]):
        _reject_other_jets(plan.name, settings.storage_url, registered, path, run_info["data_fingerprint"])
    stages.register_pipeline(storage, plan, run_info)
    if existing:
        logger.info("Resuming pipeline %s from the storage %s", plan.name, mask_password(settings.storage_url))
        if changes:
            logger.info(
                "Profile %s changed these budgets, which apply to the stages that are not done: %s",
                profile.name,
                "; ".join(changes),
            )
    else:
        logger.info(
            "Registered pipeline %s with stages %s in %s",
            plan.name,
            ", ".join(stage.name for stage in plan.runnable),
            mask_password(settings.storage_url),
        )

    return _drive(
        storage,
        settings,
        [plan.name],
        plan.trial_resources(),
        address=address,
        workers=workers,
        view=LiveView() if live else None,
        monitor=PipelineMonitor(log_trials=not live, grace_period_s=settings.grace_period),
        log_to_driver=log_to_driver,
    )


def _resumed_artifact_dir(
    chosen: Path | None, registered: Mapping[str, Any] | None, data_dir: Path, pipeline: str
) -> Path:
    """Return the artifact directory of a run: a resumed pipeline keeps the one it was registered with.

    Args:
        chosen: ``--artifacts`` or ``JETHPO_ARTIFACTS``, or None when neither is set.
        registered: What the pipeline was registered with, or None for a new pipeline.
        data_dir: Data directory, whose ``artifacts`` folder is the default.
        pipeline: Name of the pipeline, for messages.

    Raises:
        RunError: ``chosen`` differs from the registered directory, which still exists. The
            checkpoints of the finished steps are there, so the next steps would not find them.
    """
    from storage.artifacts import resolve_artifact_dir

    before = registered.get("artifact_dir") if registered is not None else None
    before = Path(before) if before else None
    if chosen is None:
        if before is not None and before.is_dir():
            return before
        chosen = resolve_artifact_dir(None, data_dir)
    chosen = Path(chosen).expanduser().resolve()
    if before is None or chosen == before:
        return chosen
    if before.is_dir():
        raise RunError(
            f"Pipeline {pipeline} keeps its checkpoints, plots and tables in the artifact directory {before}, "
            f"not {chosen}. Resume with --artifacts {before}, or leave --artifacts and JETHPO_ARTIFACTS unset. "
            f"To move the artifacts, move that folder first and pass its new path."
        )
    logger.warning(
        "Pipeline %s was registered with the artifact directory %s, which does not exist here, and now uses %s. "
        "Its next steps read the artifacts stored so far from there, so copy them there if they are elsewhere",
        pipeline,
        before,
        chosen,
    )
    return chosen


def _check_finished_artifacts(
    storage: optuna.storages.RDBStorage, registered: Mapping[str, Any] | None, chosen: Path | None, pipeline: str
) -> None:
    """Record the new path of a finished pipeline's moved artifact directory, or warn that it is missing."""
    before = registered.get("artifact_dir") if registered is not None else None
    if not before or Path(before).is_dir():
        return
    if chosen is not None and Path(chosen).is_dir():
        stages.record_artifact_dir(storage, pipeline, str(chosen))
        logger.info("Pipeline %s now keeps its artifacts in %s instead of %s", pipeline, chosen, before)
        return
    logger.warning(
        "Pipeline %s is finished, but its artifact directory %s does not exist here, so the checkpoints, "
        "plots and tables of its results are missing. Mount the folder at that path, or pass its new path "
        "to 'jethpo run --artifacts', which records it.",
        pipeline,
        before,
    )


def _check_registered_jets(
    path: Path, profile: Profile, pipeline: str, storage_url: str, registered: Mapping[str, Any]
) -> None:
    """Raise RunError when ``path`` contains other jets than those the pipeline was registered with."""
    from hpo.objectives import TooFewJetsError, prepare_data

    try:
        fingerprint = prepare_data(path, seed=SPLIT_SEED, n_jets=profile.n_jets, device="cpu").fingerprint
    except TooFewJetsError as error:
        _reject_too_few_jets(error, profile.name, pipeline, registered)
    if registered.get("data_fingerprint") not in (None, fingerprint):
        _reject_other_jets(pipeline, storage_url, registered, path, fingerprint)


def _reject_too_few_jets(error: TooFewJetsError, profile_name: str, pipeline: str, registered: Mapping[str, Any] | None) -> NoReturn:
    message = (
        f"Jets file {error.path} contains {error.available} jets, but profile {profile_name!r} uses "
        f"{error.requested}. Pass --data with at least {error.requested} jets, or a profile file with a smaller n_jets."
    )
    if registered is not None and Path(registered["data_path"]) != Path(error.path):
        message += (
            f" Pipeline {pipeline} was registered with the jets of {registered['data_path']}: resume with "
            f"--data {registered['data_path']}, or leave --data out."
        )
    raise RunError(message) from None


def _reject_other_jets(pipeline: str, storage_url: str, registered: Mapping[str, Any], path: Path, fingerprint: str) -> NoReturn:
    before = str(registered["data_fingerprint"])[:12]
    prefix = f"Pipeline {pipeline} in {mask_password(storage_url)} was registered with the jets of {registered['data_path']}"
    if Path(registered["data_path"]) == path:
        raise RunError(
            f"{prefix} when their data fingerprint was {before}. It is {fingerprint[:12]} now, so the file "
            f"changed, and the pipeline's trials would mix the two. Restore the file, or run on another storage."
        )
    raise RunError(
        f"{prefix} (data fingerprint {before}), but this run would use {path} (data fingerprint "
        f"{fingerprint[:12]}), and the pipeline's trials would mix the two. Resume with --data "
        f"{registered['data_path']}, or run on another storage."
    )


def _check_one_pipeline(storage: optuna.storages.RDBStorage, plan: stages.PipelinePlan, storage_url: str) -> None:
    """Raise RunError when the storage contains the pipeline of another profile.

    Study names do not contain the profile, so two profiles on one storage would share
    the studies of every family they both run, including a search space added later.
    """
    owners = stages.studies_of_other_pipelines(storage, plan)
    others = sorted({*stages.pipeline_names(storage), *owners.values()} - {plan.name})
    if not others:
        return
    where = mask_password(storage_url)
    if owners:
        study, owner = next(iter(owners.items()))
        reason = f"Study {study} in {where} belongs to pipeline {owner!r}, and profile {plan.name!r} would share it ({len(owners)} studies in all)"
    else:
        owner = others[0]
        reason = (
            f"{where} contains the pipeline of profile {owner!r}, and one storage can contain the pipeline of one profile only, "
            f"because every profile uses the same study names"
        )
    raise RunError(
        f"{reason}. Run profile {plan.name!r} on another storage (--storage, or another --data-dir for the "
        f"default SQLite file), or resume with --profile {owner}."
    )


def run_workers(
    settings: WorkerSettings,
    *,
    address: str | None = None,
    workers: int | None = None,
    log_to_driver: bool = False,
    wait_s: float | None = None,
) -> PipelineOutcome:
    """Start workers for every pipeline with unfinished stages and drive them to the end.

    The pipelines, budgets and jets file come from the storage, so this needs no profile.
    With no unfinished pipeline, it waits for ``jethpo run`` to register one.

    Args:
        settings: Storage and heartbeat settings.
        address: Ray cluster to join, or None to start a local Ray instance.
        workers: Number of workers, or None for :func:`default_worker_count`.
        log_to_driver: Show the workers' own log lines on this process's stderr.
        wait_s: Maximum seconds to wait for a pipeline, None for no limit.

    Raises:
        RunError: No pipeline appeared within ``wait_s``.
    """
    from hpo.progress import PipelineMonitor

    storage = open_worker_storage(settings)
    started = time.monotonic()
    pipelines = stages.unfinished_pipelines(storage)
    if not pipelines:
        logger.info("No pipeline with unfinished stages in the storage yet; waiting for 'jethpo run' to register one")
    while not pipelines:
        if wait_s is not None and time.monotonic() - started > wait_s:
            raise RunError(f"No pipeline with unfinished stages appeared within {wait_s:g} s. Start one with 'jethpo run'.")
        time.sleep(settings.poll_interval_s)
        pipelines = stages.unfinished_pipelines(storage)

    requests = [
        (record.budget or record.retrain).resources
        for name in pipelines
        for record in stages.load_stage_records(storage, name)
        if (record.budget or record.retrain) is not None and not record.is_terminal
    ]
    trial = Resources(
        cpus=max((request.cpus for request in requests), default=1.0),
        gpus=max((request.gpus for request in requests), default=0.0),
    )
    logger.info("Working on pipelines %s", ", ".join(pipelines))
    return _drive(
        storage,
        settings,
        pipelines,
        trial,
        address=address,
        workers=workers,
        view=None,
        monitor=PipelineMonitor(log_trials=True, grace_period_s=settings.grace_period),
        log_to_driver=log_to_driver,
    )


def _drive(
    storage: optuna.storages.RDBStorage,
    settings: WorkerSettings,
    pipelines: Sequence[str],
    trial: Resources,
    *,
    address: str | None,
    workers: int | None,
    view: Any,
    monitor: Any,
    log_to_driver: bool,
) -> PipelineOutcome:
    pool: WorkerPool | None = None
    local = connect_ray(address, log_to_driver=log_to_driver)

    # after connect_ray, because ray.init (Ray 2.60) replaces the SIGTERM handler with one
    # that calls sys.exit, which would skip the hand-back below
    with _sigterm_as_interrupt():
        try:
            cluster = _wait_for_capacity(trial, timeout_s=_NODE_WAIT_S if address else 0)
            count = workers if workers is not None else default_worker_count(cluster, trial)
            _check_capacity(count, trial, cluster)
            pool = start_workers(count, trial, settings, pipelines)
            if view is not None:
                with view:
                    outcome = supervise(storage, pipelines, pool.workers, settings=settings, monitor=monitor, view=view)
            else:
                outcome = supervise(storage, pipelines, pool.workers, settings=settings, monitor=monitor)
            _stop_workers(pool, outcome, timeout_s=settings.poll_interval_s * 3 + 30)
        except KeyboardInterrupt:
            # on Ctrl-C or SIGTERM the workers stop with this controller, so the steps and
            # trials they hold go back to the storage for the next run
            if pool is not None:
                _hand_back_work(storage, pipelines, pool)
            raise
        finally:
            # after another error, the running trials and steps go stale and are taken over
            _shutdown_ray(local, pool)
            storage.engine.dispose()
    return outcome


def run_step(settings: WorkerSettings, pipeline: str, step: str) -> dict[str, Any]:
    """Claim one step of a pipeline and run it in this process.

    Args:
        settings: Storage and heartbeat settings.
        pipeline: Pipeline name.
        step: Step name, such as ``retrain:convae-gen``.

    Returns:
        ``state`` ("done" or "failed") and ``output``, the step's stored output.

    Raises:
        RunError: The step is unknown, not ready, or claimed by a live process.
    """
    import torch

    _configure_worker_logging()
    worker = Worker(settings, [pipeline], threads=torch.get_num_threads())
    worker._storage = open_worker_storage(settings)
    try:
        records = stages.load_stage_records(worker._storage, pipeline)
        record = next((item for item in records if item.name == step), None)
        if record is None or not record.is_step:
            raise RunError(f"Pipeline {pipeline} has no step {step}.")
        if record.problem is not None:
            raise RunError(f"Step {step} of pipeline {pipeline} cannot run: {record.problem}.")
        if record not in claimable_steps(records, settings.grace_period):
            waiting = [parent for parent in record.depends_on if parent not in {r.name for r in records if r.state == stages.StageState.DONE}]
            if record.state == stages.StageState.RUNNING:
                raise RunError(
                    f"Step {step} of pipeline {pipeline} is running in {record.claimed_by}. Wait for it, or stop "
                    f"that process and retry after the grace period of {settings.grace_period} s."
                )
            raise RunError(f"Step {step} of pipeline {pipeline} waits for {', '.join(waiting)}. Run 'jethpo run' to finish them.")
        runner = worker._steps()
        if not runner.claim(record):
            raise RunError(f"Step {step} of pipeline {pipeline} was claimed by another process just now.")
        state = runner.run(record, records)
        output = stage_table.get_outputs(worker._storage.engine, pipeline).get(step, {})
        return {"state": state.value, "output": output}
    finally:
        worker._storage.engine.dispose()
        release_freed_memory()


def retrain_by_hand(
    settings: WorkerSettings,
    pipeline: str,
    step: str,
    *,
    address: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Run a retraining step now, as a Ray task with the step's resources (``jethpo retrain``).

    A failed step is reset and run again. A done step is run again only with ``force``,
    which also resets the steps that use its model, so the next ``jethpo run`` redoes them.

    Returns:
        The step's output (see ``hpo.steps.StepRunner``).

    Raises:
        RunError: The step is done and ``force`` is not set, the registered artifact
            directory is missing and ``settings`` names no other, or the step is running
            elsewhere or failed again.
    """
    storage = open_worker_storage(settings)
    try:
        records = stages.load_stage_records(storage, pipeline)
        record = next((item for item in records if item.name == step), None)
        if record is None or record.retrain is None:
            raise RunError(f"Pipeline {pipeline} has no registered step {step}. Run 'jethpo run' first.")
        if record.state == stages.StageState.DONE and not force:
            output = stage_table.get_outputs(storage.engine, pipeline).get(step, {})
            raise RunError(
                f"Step {step} of pipeline {pipeline} is done (checkpoint artifact {output.get('checkpoint', '?')}). "
                f"Pass --force to retrain again."
            )
        registered = stages.registered_run(storage, pipeline) or {}
        if settings.artifact_dir is None and registered.get("artifact_dir") and not Path(registered["artifact_dir"]).is_dir():
            # the retrained checkpoint would land in a new empty folder, apart from the other artifacts
            raise RunError(
                f"Pipeline {pipeline} keeps its checkpoints in the artifact directory {registered['artifact_dir']}, "
                f"which does not exist here. Pass its new path with --artifacts, or restore the folder there."
            )
        if record.state == stages.StageState.FAILED or (record.state == stages.StageState.DONE and force):
            downstream = _downstream(records, step)
            stage_table.reset_stages(storage.engine, pipeline, [step, *downstream])
            if downstream:
                logger.info("Reset %s, which use this retraining; the next 'jethpo run' redoes them", ", ".join(downstream))
        resources = record.retrain.resources
    finally:
        storage.engine.dispose()

    local = connect_ray(address)
    import ray

    try:
        task = ray.remote(run_step).options(
            num_cpus=resources.cpus,
            num_gpus=resources.gpus,
            max_retries=0,
            runtime_env={"env_vars": worker_env_vars(settings.keep_freed_memory)},
        )
        logger.info("Retraining %s of pipeline %s as a Ray task with %s", step, pipeline, _describe_resources(
            {"CPU": resources.cpus, "GPU": resources.gpus}))
        running = task.remote(settings.with_schema_head(), pipeline, step)
        _wait_logging_epochs(running, settings, pipeline, step)
        result = ray.get(running)
    except ray.exceptions.RayTaskError as error:
        cause = getattr(error, "cause", None)
        raise RunError(str(cause) if cause is not None else str(error).strip().splitlines()[-1]) from None
    finally:
        _shutdown_ray(local)
    if result["state"] != "done":
        raise RunError(f"Retraining {step} of pipeline {pipeline} failed: {result['output'].get('error', 'see the log')}")
    return result["output"]


def _wait_logging_epochs(running: Any, settings: WorkerSettings, pipeline: str, step: str) -> None:
    """Wait for a retraining task, and log its epochs as the step's progress output reports them."""
    import ray

    storage = open_worker_storage(settings)
    last = None
    try:
        while not ray.wait([running], timeout=settings.poll_interval_s)[0]:
            last = _log_step_epoch(storage, pipeline, step, last)
    finally:
        storage.engine.dispose()


def _log_step_epoch(storage: optuna.storages.RDBStorage, pipeline: str, step: str, last: int | None) -> int | None:
    """Log the epoch that a retraining step reported, if it is far enough past ``last``.

    Args:
        last: The epoch logged last, or None before the first reading, which counts from
            the epoch at which the retraining started or resumed.

    Returns:
        The epoch logged last after this reading, or None while the step reported none.
    """
    from hpo.progress import log_retraining_epoch

    progress = stage_table.get_outputs(storage.engine, pipeline).get(step, {}).get("progress") or {}
    epoch, epochs = progress.get("epoch"), progress.get("epochs")
    if not isinstance(epoch, int) or not isinstance(epochs, int) or epochs < 1:
        return last
    if last is None:
        last = int(progress.get("resumed_after") or 0)
    return log_retraining_epoch(pipeline, step, epoch, epochs, last)


def _downstream(records: Sequence[StageRecord], name: str) -> list[str]:
    """Return the steps that depend on a stage, directly or through other stages.

    Search stages are left out: their trials stay, and a later retraining uses them.
    """
    found: list[str] = []
    frontier = [name]
    while frontier:
        current = frontier.pop()
        for record in records:
            if current in record.depends_on and record.name not in found:
                found.append(record.name)
                frontier.append(record.name)
    steps = {record.name for record in records if record.is_step}
    return [item for item in found if item in steps]


def _final_outcome(storage: optuna.storages.RDBStorage, pipelines: Sequence[str]) -> PipelineOutcome:
    from hpo.progress import read_progress

    records = [record for name in pipelines for record in stages.load_stage_records(storage, name)]
    trials = _read_trials(storage, [record for record in records if record.problem is None], {})
    return PipelineOutcome(
        states={(record.pipeline, record.name): record.state for record in records},
        progress=read_progress(records, trials, workers=0),
    )
