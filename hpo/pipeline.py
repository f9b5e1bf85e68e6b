"""Stage graph of a run profile, global trial budgets and stage transitions in the storage.

A pipeline is named after its run profile, such as ``smoke``. Its stages are nodes of a graph:

- search stages, one per stage of every search space, named after their Optuna study
  (``convae-gen.loss``). A stage depends on the stages it inherits parameters from, so
  ``convae-gen.loss -> convae-gen.arch``.
- steps, which run once each, named ``<kind>:<family>``:

  - ``retrain:<family>`` retrains the best trial of the family's last search stage with the
    profile's long schedule, after all search stages of the family;
  - ``latents:<family>`` encodes the training and validation jets with a retrained ConVAE,
    for the ``realnvp-latent`` spaces whose ``latents_from`` names the family. Their search
    stages depend on it;
  - ``evaluate:<family>`` scores a retrained model that generates jets (a generation-tuned
    ConVAE, a latent flow with its ConVAE, or a standalone flow) on the test split;
  - ``results:<pipeline>`` adds the truth and published rows, writes the table and the
    plots, after every evaluation.

Each stage is a row of ``jethpo_stages`` (``storage.pipeline``) whose state moves
pending -> running -> done or failed, so a restarted controller resumes where the last one
stopped. :func:`advance_pipeline` moves the states of search stages. A pending stage starts
when every stage it depends on is done, by one atomic claim, so it never starts twice. A
running search stage is done when its budget is used and no trial of it is RUNNING or
WAITING. Steps are claimed and finished by the worker that runs them (``hpo.steps``).

Budgets are global across workers. :func:`count_trials` counts a trial toward the budget when
it is COMPLETE, PRUNED, RUNNING, or FAIL without a retry. A stage has budget left while that
count is below ``n_trials`` or while WAITING trials exist, which the workers always run. A
worker counts and requests a trial under :func:`budget_lock`, so the count never exceeds ``n_trials``
unless WAITING trials were enqueued on top of it.

The search budget, the jets file and the trial resources of a stage are stored in its study's
user attributes (``hpo.studies.BUDGET_ATTRS`` and :data:`RUN_ATTR`), and the retraining
budget of a family in its last study's :data:`RETRAIN_ATTR`, so a worker needs only the
storage URL to run any registered stage.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import threading
import warnings
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.storages._rdb import models as optuna_models
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import select, update

from hpo import studies
from hpo.spaces import Profile, Resources, RetrainBudget, SearchBudget, Space, SpaceError
from hpo.spaces import Stage as SpaceStage
from storage import pipeline as stage_table
from storage.locks import sqlite_database_path
from storage.rdb import read_study_user_attrs
from storage.pipeline import StageState

__all__ = [
    "EVALUATE",
    "LATENTS",
    "RESULTS",
    "RETRAIN",
    "RETRAIN_ATTR",
    "RUNNABLE_KINDS",
    "RUN_ATTR",
    "SEARCH",
    "STEP_KINDS",
    "STORAGE_FAILURE_PREFIXES",
    "evaluated_model",
    "BudgetExhausted",
    "PipelinePlan",
    "PipelineStage",
    "StageCounts",
    "StageRecord",
    "advance_pipeline",
    "budget_lock",
    "changed_budgets",
    "count_study_trials",
    "count_trials",
    "fail_stale_trials",
    "load_stage_records",
    "queue_retry",
    "plan_pipeline",
    "record_artifact_dir",
    "register_pipeline",
    "studies_of_other_pipelines",
    "step_name",
    "retried_trial_numbers",
    "unfinished_pipelines",
]

logger = logging.getLogger(__name__)

SEARCH = "search"
"""Kind of a stage that runs the trials of one Optuna study."""

STORAGE_FAILURE_PREFIXES = ("StorageInternalError:", "OperationalError:", "InterfaceError:")
"""Starts of the ``fail_message`` of a trial that ``hpo.objectives.run_trial`` ended as FAIL
because a storage request failed, such as ``trial.report`` during a PostgreSQL restart
(exception type, then ": "). Such a trial gets a retry, as a stale one does."""

RETRAIN = "retrain"
"""Kind of a step that retrains the best trial of a search space."""

LATENTS = "latents"
"""Kind of a step that encodes the training and validation jets with a retrained ConVAE."""

EVALUATE = "evaluate"
"""Kind of a step that scores a retrained model on the test split."""

RESULTS = "results"
"""Kind of the step that writes the final table and plots of a pipeline."""

STEP_KINDS = (RETRAIN, LATENTS, EVALUATE, RESULTS)
"""Stage kinds that run once, on one worker, instead of as trials."""

RUNNABLE_KINDS = (SEARCH, *STEP_KINDS)
"""Stage kinds that this version of jethpo runs."""

RETRAIN_ATTR = "retrain"
"""User attribute of a family's last study with its retraining budget.

Its value is a dict with ``epochs``, ``batch_size``, ``eval_every`` and ``resources``
(``{"cpus": float, "gpus": float}``).
"""

RUN_ATTR = "run"
"""Study user attribute with the pipeline, jets file and trial resources of the last run.

Its value is a dict with ``pipeline``, ``data_path`` (absolute), ``n_jets`` (None for all),
``split_seed``, ``data_fingerprint`` (``hpo.objectives.TrialData.fingerprint``),
``artifact_dir`` (absolute; see ``storage.artifacts``) and ``resources``
(``{"cpus": float, "gpus": float}`` per trial).
"""

_BUDGET_LOCK_NAMESPACE = 0x6A657468
"""First key of the PostgreSQL advisory locks that serialise budget checks ("jeth" in ASCII)."""

_SQLITE_BUDGET_LOCK_SUFFIX = ".budget-lock"
_memory_budget_lock = threading.Lock()


class BudgetExhausted(Exception):
    """Stage whose trial budget was used up by other workers before this one asked."""


# stage graph


@dataclass(frozen=True)
class PipelineStage:
    """One node of the stage graph.

    Attributes:
        name: Unique name in the pipeline: the study name of a search stage
            (``convae-gen.loss``), ``<kind>:<family>`` for a step.
        kind: :data:`SEARCH` or one of :data:`STEP_KINDS`.
        family: Name of the search space.
        depends_on: Names of the stages that must be done before this one starts.
        order: Urgency, lower first: stages nearer the start of the graph come first, then
            the order of the search spaces, then the order of the stages in their space.
        study_name: Optuna study of a search stage, or the study that a step reads its
            best trial from and links its artifacts to: the family's last search stage.
        space: The search space.
        stage: The search space's stage, for search stages only.
        budget: The profile's search budget, for search stages only.
        excluded: Why the stage cannot run, or None if it can.
    """

    name: str
    kind: str
    family: str
    depends_on: tuple[str, ...]
    order: tuple[int, int, int]
    study_name: str
    space: Space = field(compare=False, repr=False)
    stage: SpaceStage | None = field(default=None, compare=False, repr=False)
    budget: SearchBudget | None = None
    excluded: str | None = None


@dataclass(frozen=True)
class PipelinePlan:
    """Stage graph of one run profile over a set of search spaces.

    Attributes:
        name: Pipeline name, the profile name.
        profile: The run profile.
        stages: Every node of the graph, sorted by urgency.
    """

    name: str
    profile: Profile
    stages: tuple[PipelineStage, ...]

    @property
    def runnable(self) -> tuple[PipelineStage, ...]:
        """Stages that can run, sorted by urgency."""
        return tuple(stage for stage in self.stages if stage.excluded is None)

    @property
    def excluded(self) -> tuple[PipelineStage, ...]:
        """Stages left out, each with its reason in ``excluded``."""
        return tuple(stage for stage in self.stages if stage.excluded is not None)

    def trial_resources(self) -> Resources:
        """Return the largest CPU and GPU request of one trial or retraining over the runnable stages.

        A worker runs trials of every stage and the steps, so it reserves the largest request once.
        """
        requests = [stage.budget.resources for stage in self.runnable if stage.budget is not None]
        requests += [
            self.profile.retrain_budget(stage.space).resources for stage in self.runnable if stage.kind == RETRAIN
        ]
        if not requests:
            return Resources(cpus=1.0, gpus=0.0)
        return Resources(cpus=max(item.cpus for item in requests), gpus=max(item.gpus for item in requests))


def step_name(kind: str, family: str) -> str:
    """Return the stage name of a step, such as ``retrain:convae-gen``."""
    return f"{kind}:{family}"


def evaluated_model(space: Space) -> str | None:
    """Return the model name that the final table gives a search space's retrained model.

    Returns:
        ``"convae"`` for a generation-tuned ConVAE, ``"convae-nf"`` for a flow on ConVAE
        latents, ``"nf"`` for a standalone flow, and None for a model that is not evaluated
        on its own, such as a reconstruction-tuned ConVAE.
    """
    if space.model == "convae":
        return "convae" if space.objective == "generation" else None
    return "convae-nf" if space.model == "realnvp-latent" else "nf"


def plan_pipeline(
    spaces: Mapping[str, Space],
    profile: Profile,
    families: Sequence[str] | None = None,
) -> PipelinePlan:
    """Build the stage graph of a profile and mark the stages that cannot run.

    Args:
        spaces: Search spaces in their order of urgency, such as ``hpo.studies.load_spaces``
            returns them (shipped spaces in file order, then stored ones).
        profile: Run profile with the search budgets.
        families: Names of the search spaces to run, or None for all of them.

    Returns:
        The plan. Its pipeline name is the profile name.

    Raises:
        SpaceError: if ``families`` names an unknown search space.
        ProfileError: if the profile has no valid budget for a stage.
    """
    selected = list(spaces) if families is None else list(dict.fromkeys(families))
    unknown = [name for name in selected if name not in spaces]
    if unknown:
        raise SpaceError(
            "--family",
            "",
            "no search space has this name",
            unknown[0],
            f"Use one of {', '.join(spaces)}.",
        )
    family_index = {name: index for index, name in enumerate(spaces)}
    latent_sources = {spaces[name].latents_from for name in selected if spaces[name].latents_from is not None}

    # nodes and dependencies
    nodes: dict[str, dict[str, Any]] = {}

    def add(name: str, kind: str, space: Space, depends_on: Sequence[str], position: int, stage=None) -> None:
        nodes[name] = {
            "kind": kind,
            "space": space,
            "stage": stage,
            "depends_on": tuple(depends_on),
            "position": (family_index[space.name], position),
            "study_name": stage.study_name if stage is not None else space.stages[-1].study_name,
        }

    evaluations = []
    for family in selected:
        space = spaces[family]
        search_names = []
        for stage_index, stage in enumerate(space.stages):
            depends_on = [space.stage(parent).study_name for parent in stage.inherits]
            if space.latents_from is not None:
                depends_on.append(step_name(LATENTS, space.latents_from))
            add(stage.study_name, SEARCH, space, depends_on, stage_index, stage)
            search_names.append(stage.study_name)
        retrain = step_name(RETRAIN, family)
        add(retrain, RETRAIN, space, search_names, len(space.stages))
        if family in latent_sources:
            add(step_name(LATENTS, family), LATENTS, space, [retrain], len(space.stages) + 1)
        if evaluated_model(space) is not None:
            evaluations.append(step_name(EVALUATE, family))
            add(evaluations[-1], EVALUATE, space, [retrain], len(space.stages) + 1)
    if evaluations:
        first = nodes[evaluations[0]]
        add(step_name(RESULTS, profile.name), RESULTS, first["space"], evaluations, len(first["space"].stages) + 2)
        nodes[step_name(RESULTS, profile.name)]["family"] = RESULTS

    # depth and the reason a node cannot run, in dependency order
    depth: dict[str, int] = {}
    excluded: dict[str, str | None] = {}

    def resolve(name: str) -> None:
        if name in depth:
            return
        node = nodes[name]
        parents = node["depends_on"]
        reason = None
        for parent in parents:
            if parent not in nodes:
                family = parent.split(":", 1)[-1]
                reason = reason or (
                    f"it depends on {parent}, whose search space {family} is not part of this run; "
                    f"add --family {family}"
                )
                continue
            resolve(parent)
            if excluded[parent] is not None and reason is None:
                # the root cause, which names what to add
                reason = excluded[parent]
        depth[name] = 1 + max((depth.get(parent, 0) for parent in parents), default=-1)
        excluded[name] = reason

    for name in nodes:
        resolve(name)

    stages = []
    for name, node in nodes.items():
        space, stage = node["space"], node["stage"]
        budget = profile.search_budget(space, stage) if stage is not None else None
        stages.append(
            PipelineStage(
                name=name,
                kind=node["kind"],
                family=node.get("family", space.name),
                depends_on=node["depends_on"],
                order=(depth[name], *node["position"]),
                study_name=node["study_name"],
                space=space,
                stage=stage,
                budget=budget,
                excluded=excluded[name],
            )
        )
    stages.sort(key=lambda stage: stage.order)
    return PipelinePlan(name=profile.name, profile=profile, stages=tuple(stages))


def studies_of_other_pipelines(storage: optuna.storages.RDBStorage, plan: PipelinePlan) -> dict[str, str]:
    """Return the plan's search studies that another pipeline registered, with that pipeline's name.

    Study names do not contain the pipeline (profile) name, so two profiles on one storage
    would share their studies: budgets would count the other profile's trials, and
    retraining could pick a trial trained on other jets.

    Args:
        storage: Storage returned by ``storage.open_storage``.
        plan: The stage graph to be registered.

    Returns:
        Study name to the name of the pipeline that owns it, ``{}`` if there is none.
    """
    names = [stage.study_name for stage in plan.runnable if stage.kind == SEARCH]
    stored = read_study_user_attrs(storage, names)
    owners = {}
    for name in names:
        owner = (stored.get(name, {}).get(RUN_ATTR) or {}).get("pipeline")
        if owner is not None and owner != plan.name:
            owners[name] = owner
    return owners


def register_pipeline(
    storage: optuna.storages.RDBStorage,
    plan: PipelinePlan,
    run_info: Mapping[str, Any],
) -> None:
    """Create the studies of the runnable stages and their ``jethpo_stages`` rows.

    Stages that are already stored keep their state, so registering a pipeline again
    resumes it. Each study gets the profile's budget (``hpo.studies.open_study``) and
    :data:`RUN_ATTR` with the given run information and the stage's trial resources. The
    study of a retraining step gets :data:`RETRAIN_ATTR`. The results step keeps the
    evaluations registered before, and a done step whose inputs are no longer all done,
    such as the results step when a new family joins, is set back to pending.

    Args:
        storage: Storage returned by ``storage.open_storage``.
        plan: The stage graph.
        run_info: ``data_path``, ``n_jets``, ``split_seed``, ``data_fingerprint`` and
            ``artifact_dir``.
    """
    for stage in plan.runnable:
        if stage.kind != SEARCH:
            continue
        study = studies.open_study(storage, stage.space, stage.stage, profile=plan.profile)
        resources = stage.budget.resources
        study.set_user_attr(
            RUN_ATTR,
            {
                "pipeline": plan.name,
                **run_info,
                "resources": {"cpus": resources.cpus, "gpus": resources.gpus},
            },
        )
    stored = {row.stage: row for row in stage_table.get_stages(storage.engine, plan.name)}
    for stage in plan.runnable:
        depends_on = stage.depends_on
        if stage.kind == RESULTS and stage.name in stored:
            # a run of some families adds their evaluations to the table of the others
            depends_on = tuple(dict.fromkeys((*stored[stage.name].depends_on, *stage.depends_on)))
        if stage.kind == RETRAIN:
            budget = plan.profile.retrain_budget(stage.space)
            study_id = storage.get_study_id_from_name(stage.study_name)
            storage.set_study_user_attr(
                study_id,
                RETRAIN_ATTR,
                {
                    "epochs": budget.epochs,
                    "batch_size": budget.batch_size,
                    "eval_every": budget.eval_every,
                    "resources": {"cpus": budget.resources.cpus, "gpus": budget.resources.gpus},
                },
            )
        stage_table.upsert_stage(
            storage.engine,
            plan.name,
            stage.name,
            study_name=stage.study_name,
            family=stage.family,
            depends_on=depends_on,
        )

    # a done step whose inputs are not all done any more, such as the results step after a
    # new family joined the pipeline, runs again once they are
    rows = {row.stage: row for row in stage_table.get_stages(storage.engine, plan.name)}
    states = {name: row.state for name, row in rows.items()}
    stale: list[str] = []
    changed = True
    while changed:
        changed = False
        for name, row in rows.items():
            parents = [states[parent] for parent in row.depends_on if parent in states]
            if ":" in name and states[name] == StageState.DONE and any(state != StageState.DONE for state in parents):
                states[name] = StageState.PENDING
                stale.append(name)
                changed = True
    if stale:
        stage_table.reset_stages(storage.engine, plan.name, stale)
        if len(stale) == 1:
            logger.info("Step %s will run again, because a stage it depends on is not done", stale[0])
        else:
            logger.info("Steps %s will run again, because stages they depend on are not done", ", ".join(stale))

    retry = retryable_steps({name: (states[name], row.depends_on) for name, row in rows.items()})
    if retry:
        stage_table.reset_stages(storage.engine, plan.name, retry)
        logger.info("Failed steps %s of pipeline %s will run again", ", ".join(retry), plan.name)


def retryable_steps(stages: Mapping[str, tuple[StageState, Sequence[str]]]) -> list[str]:
    """Return the failed steps that a new run can retry, in the order of ``stages``.

    A failed step is retried when every stage it depends on is done, pending, running or a
    retried step itself. A step below a failed search stage would fail again at once, so it
    stays failed, and so does the search stage, whose budget is used up.

    Args:
        stages: State and ``depends_on`` of each stage of a pipeline, by stage name.
    """
    retry: list[str] = []
    changed = True
    while changed:
        changed = False
        for name, (state, depends_on) in stages.items():
            if ":" not in name or state != StageState.FAILED or name in retry:
                continue
            parents = [parent for parent in depends_on if parent in stages]
            if all(stages[parent][0] != StageState.FAILED or parent in retry for parent in parents):
                retry.append(name)
                changed = True
    order = list(stages)
    return sorted(retry, key=order.index)


def changed_budgets(storage: optuna.storages.RDBStorage, plan: PipelinePlan) -> list[str]:
    """Describe where a profile's budgets differ from those stored with a pipeline's studies.

    Compares the search budgets and trial resources of the search stages and the budgets of
    the retraining steps with what :func:`register_pipeline` stored at the last run.

    Returns:
        One text per changed stage, such as ``"convae-gen.loss: n_trials 2 to 3"``. Empty for
        a pipeline that was never registered.
    """
    names = [stage.study_name for stage in plan.runnable if stage.kind in (SEARCH, RETRAIN)]
    stored = read_study_user_attrs(storage, names)
    changes: list[str] = []
    for stage in plan.runnable:
        attrs = stored.get(stage.study_name)
        if attrs is None or stage.kind not in (SEARCH, RETRAIN):
            continue
        if stage.kind == SEARCH:
            budget: SearchBudget | RetrainBudget = stage.budget
            keys = ("n_trials", "epochs", "batch_size", "eval_every")
            source, label = attrs, stage.study_name
            resources = (attrs.get(RUN_ATTR) or {}).get("resources") or {}
        else:
            budget = plan.profile.retrain_budget(stage.space)
            keys = ("epochs", "batch_size", "eval_every")
            source, label = attrs.get(RETRAIN_ATTR) or {}, f"retraining of {stage.family}"
            resources = source.get("resources") or {}
        before = {key: source.get(key) for key in keys} | {key: resources.get(key) for key in ("cpus", "gpus")}
        after = {key: getattr(budget, key) for key in keys} | {"cpus": budget.resources.cpus, "gpus": budget.resources.gpus}
        differences = [
            f"{key} {before[key]:g} to {after[key]:g}"
            for key in after
            if before[key] is not None and float(before[key]) != float(after[key])
        ]
        if differences:
            changes.append(f"{label}: {', '.join(differences)}")
    return changes


# trial counts


@dataclass(frozen=True)
class StageCounts:
    """Trials of one stage's study by state, as the budget counts them.

    Attributes:
        complete: COMPLETE trials.
        pruned: PRUNED trials.
        running: RUNNING trials, including stale ones not yet failed.
        waiting: WAITING trials: retries and enqueued trials.
        failed: FAIL trials without a retry, such as ``nan_loss`` failures or stale trials
            whose retries ran out.
        retried: FAIL trials that have a retry. Their retry counts in their place.
    """

    complete: int = 0
    pruned: int = 0
    running: int = 0
    waiting: int = 0
    failed: int = 0
    retried: int = 0

    @property
    def used(self) -> int:
        """Trials counted toward the budget: COMPLETE, PRUNED, RUNNING and FAIL without a retry."""
        return self.complete + self.pruned + self.running + self.failed

    @property
    def finished(self) -> int:
        """Trials counted toward the budget that have ended: COMPLETE, PRUNED, FAIL without a retry."""
        return self.complete + self.pruned + self.failed

    def has_budget(self, n_trials: int) -> bool:
        """Return whether a worker may ask for a trial: budget left, or WAITING trials to run."""
        return self.used < n_trials or self.waiting > 0

    def is_done(self, n_trials: int) -> bool:
        """Return whether the budget is used and no trial is RUNNING or WAITING."""
        return self.used >= n_trials and self.running == 0 and self.waiting == 0


def retried_trial_numbers(trials: Iterable[FrozenTrial]) -> set[int]:
    """Return the numbers of the trials that a retry re-queued.

    The storage's retry callback (Optuna's ``RetryHeartbeatStaleTrialCallback``) gives each
    retry the system attribute ``retry_history``, whose last entry is the trial it repeats.
    """
    numbers = set()
    for trial in trials:
        history = trial.system_attrs.get("retry_history")
        if history:
            numbers.add(history[-1])
    return numbers


def count_trials(trials: Sequence[FrozenTrial]) -> StageCounts:
    """Count a study's trials by state for the budget.

    Args:
        trials: Every trial of the study.

    Returns:
        The counts. A FAIL trial counts as ``retried`` when a later trial retries it, and as
        ``failed`` otherwise.
    """
    retried = retried_trial_numbers(trials)
    counts = {"complete": 0, "pruned": 0, "running": 0, "waiting": 0, "failed": 0, "retried": 0}
    for trial in trials:
        if trial.state == TrialState.COMPLETE:
            counts["complete"] += 1
        elif trial.state == TrialState.PRUNED:
            counts["pruned"] += 1
        elif trial.state == TrialState.RUNNING:
            counts["running"] += 1
        elif trial.state == TrialState.WAITING:
            counts["waiting"] += 1
        elif trial.number in retried:
            counts["retried"] += 1
        else:
            counts["failed"] += 1
    return StageCounts(**counts)


def count_study_trials(connection: sqlalchemy.Connection, study_id: int) -> StageCounts:
    """Count a study's trials for the budget in the database, as :func:`count_trials` does.

    One grouped count replaces reading every trial, which takes milliseconds per thousand
    trials. The FAIL trials and the retries' ``retry_history`` are read only when the study
    has FAIL trials.

    Args:
        connection: Open connection to the storage database, such as the one on which
            :func:`budget_lock` took its lock.
        study_id: Storage id of the study.

    Returns:
        The same counts as ``count_trials(study.get_trials())``.
    """
    trials = optuna_models.TrialModel.__table__
    system_attrs = optuna_models.TrialSystemAttributeModel.__table__
    by_state = dict(
        connection.execute(
            select(trials.c.state, sqlalchemy.func.count())
            .where(trials.c.study_id == study_id)
            .group_by(trials.c.state)
        ).all()
    )
    retried = 0
    if by_state.get(TrialState.FAIL, 0):
        failed = set(
            connection.execute(
                select(trials.c.number).where(trials.c.study_id == study_id, trials.c.state == TrialState.FAIL)
            ).scalars()
        )
        histories = connection.execute(
            select(system_attrs.c.value_json)
            .select_from(system_attrs.join(trials, trials.c.trial_id == system_attrs.c.trial_id))
            .where(trials.c.study_id == study_id, system_attrs.c.key == "retry_history")
        ).scalars()
        retried = len(failed & {history[-1] for history in map(json.loads, histories) if history})
    return StageCounts(
        complete=by_state.get(TrialState.COMPLETE, 0),
        pruned=by_state.get(TrialState.PRUNED, 0),
        running=by_state.get(TrialState.RUNNING, 0),
        waiting=by_state.get(TrialState.WAITING, 0),
        failed=by_state.get(TrialState.FAIL, 0) - retried,
        retried=retried,
    )


# budget lock


@contextmanager
def budget_lock(storage: optuna.storages.RDBStorage, study_name: str) -> Iterator[sqlalchemy.Connection | None]:
    """Hold a lock, shared by every jethpo process on the storage, for one study's budget.

    Workers check the budget and ask for a trial inside this block, so two workers never
    both take the last trial of a budget. On PostgreSQL the lock is a transaction-level
    advisory lock keyed by the study name, held on one pooled connection and released at
    commit, or by the server if the connection breaks. On a SQLite file it is an exclusive
    ``flock`` on ``<database>.budget-lock`` for all studies, and an in-memory SQLite
    database, private to one process, uses a thread lock.

    Args:
        storage: Storage returned by ``storage.open_storage``.
        study_name: The study whose budget is checked.

    Yields:
        On PostgreSQL, the connection whose transaction holds the lock, for queries inside
        the block (:func:`count_study_trials`); otherwise ``None``.
    """
    engine = storage.engine
    if engine.dialect.name == "postgresql":
        key = zlib.crc32(study_name.encode("utf-8"))
        key -= 2**32 if key >= 2**31 else 0
        with engine.begin() as connection:
            connection.execute(
                sqlalchemy.text("SELECT pg_advisory_xact_lock(:namespace, :key)"),
                {"namespace": _BUDGET_LOCK_NAMESPACE, "key": key},
            )
            yield connection
        return

    path = sqlite_database_path(engine.url)
    if path is None:
        with _memory_budget_lock:
            yield None
        return

    lock_path = Path(path).with_name(Path(path).name + _SQLITE_BUDGET_LOCK_SUFFIX)
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield None
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


# stale trials


def fail_stale_trials(study: optuna.Study, storage: optuna.storages.RDBStorage) -> list[tuple[int, int | None]]:
    """Fail the study's RUNNING trials whose worker stopped recording heartbeats, and retry them.

    A trial is stale when its last heartbeat is older than the storage's grace period, as in
    ``optuna.storages.fail_stale_trials``. A RUNNING trial that never recorded a heartbeat is
    stale too once it started more than the grace period ago, because its worker died
    between ``ask`` and the first heartbeat. Optuna would keep such a trial RUNNING forever,
    and its stage would never be done. The storage's retry callback then adds a WAITING
    copy of each failed trial with the same parameters, until its retries run out.

    Args:
        study: The study whose trials are checked.
        storage: The study's storage. Nothing happens when its heartbeats are off.

    Returns:
        ``(failed trial number, retry trial number or None)`` for each trial this call
        failed, for the caller to log. Trials that another process failed first are left
        out. None means that the trial's retries ran out.
    """
    interval = storage.get_heartbeat_interval()
    if interval is None:
        return []
    grace_period = storage.grace_period if storage.grace_period is not None else 2 * interval

    # NOTE: RDBStorage._get_stale_trial_ids is private, but it is the query that Optuna's
    # own fail_stale_trials runs (Optuna 4.x and 5.1).
    study_id = study._study_id
    stale_ids = list(storage._get_stale_trial_ids(study_id))
    stale_ids += _trials_without_heartbeat(storage, study_id, grace_period)
    if not stale_ids:
        return []

    # under the lock, so that advance_pipeline never counts a failed trial without its retry
    with budget_lock(storage, study.study_name):
        failed = []
        for trial_id in dict.fromkeys(stale_ids):
            try:
                if storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                    failed.append(trial_id)
            except optuna.exceptions.UpdateFinishedTrialError:
                # another process failed or finished it first
                continue
        return [(trial.number, queue_retry(study, storage, trial)) for trial in map(storage.get_trial, failed)]


def queue_retry(study: optuna.Study, storage: optuna.storages.RDBStorage, trial: FrozenTrial) -> int | None:
    """Queue a WAITING copy of a FAIL trial with the storage's retry callback, unless one exists.

    Call it inside :func:`budget_lock` for the study, in the same block as the update that
    failed the trial. :func:`advance_pipeline` counts a stage's trials under that lock before
    it marks the stage done, so it never counts a FAIL trial whose retry is still to come, and
    two processes never queue two retries of one trial. The copy has the trial's parameters
    and user attributes, without ``fail_reason`` and ``fail_message``.

    Args:
        study: The trial's study.
        storage: The study's storage.
        trial: The FAIL trial.

    Returns:
        The number of the trial that retries it, or None when its retries ran out or the
        storage has no retry callback.
    """
    existing = _retry_number(storage.get_all_trials(study._study_id, deepcopy=False), trial.number)
    if existing is not None:
        return existing
    callback = storage.get_heartbeat_stale_trial_callback()
    if callback is None:
        return None
    failed = storage.get_trial(trial._trial_id)
    failed.user_attrs = {key: value for key, value in failed.user_attrs.items() if key not in ("fail_reason", "fail_message")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        callback(study, failed)
    return _retry_number(storage.get_all_trials(study._study_id, deepcopy=False), trial.number)


def _settled_counts(storage: optuna.storages.RDBStorage, study_name: str) -> StageCounts:
    """Count a stage's trials under its budget lock, once every retry due is queued.

    A worker that ran a trial into a storage failure fails it, then queues its retry under
    the lock. If the worker died in between, the retry is queued here.
    """
    with budget_lock(storage, study_name):
        study_id = storage.get_study_id_from_name(study_name)
        trials = storage.get_all_trials(study_id, deepcopy=False)
        retried = retried_trial_numbers(trials)
        due = [
            trial
            for trial in trials
            if trial.state == TrialState.FAIL
            and trial.number not in retried
            and str(trial.user_attrs.get("fail_message", "")).startswith(STORAGE_FAILURE_PREFIXES)
        ]
        if due:
            study = optuna.load_study(study_name=study_name, storage=storage)
            for trial in due:
                queue_retry(study, storage, trial)
            trials = storage.get_all_trials(study_id, deepcopy=False)
        return count_trials(trials)


def _trials_without_heartbeat(
    storage: optuna.storages.RDBStorage, study_id: int, grace_period: int
) -> list[int]:
    # datetime_start comes from the worker's clock, so a skew between machines shifts
    # the cut-off by the same amount
    cutoff = datetime.datetime.now() - datetime.timedelta(seconds=grace_period)
    running = storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
    if not running:
        return []

    heartbeats = optuna_models.TrialHeartbeatModel
    with storage.engine.connect() as connection:
        beating = set(
            connection.execute(
                select(heartbeats.trial_id).where(
                    heartbeats.trial_id.in_([trial._trial_id for trial in running])
                )
            ).scalars()
        )
    return [
        trial._trial_id
        for trial in running
        if trial._trial_id not in beating
        and trial.datetime_start is not None
        and trial.datetime_start.replace(tzinfo=None) < cutoff
    ]


def _retry_number(trials: Iterable[FrozenTrial], number: int) -> int | None:
    for trial in trials:
        history = trial.system_attrs.get("retry_history")
        if history and history[-1] == number:
            return trial.number
    return None


# stages stored in the database


@dataclass(frozen=True)
class StageRecord:
    """A registered stage as every process reads it from the storage.

    Attributes:
        pipeline: Pipeline name.
        name: Stage name.
        kind: :data:`SEARCH` or :data:`RETRAIN`.
        state: State in ``jethpo_stages``.
        depends_on: Names of the stages it waits for.
        order: Urgency, lower first (see :class:`PipelineStage`).
        study_name: Optuna study of a search stage.
        space: The search space, or None if it is unknown to this process.
        stage: The search space's stage, or None.
        budget: Search budget from the study's user attributes, or None if missing.
        run: The study's :data:`RUN_ATTR`, or ``{}``.
        problem: Why a worker cannot run the stage, or None.
        retrain: Retraining budget of a ``retrain`` step, from :data:`RETRAIN_ATTR`.
        claimed_by: The process that claimed the stage, or None.
        claimed_at: When that process claimed it, or None.
        updated_at: When the stage's row last changed; a step's claimer touches it while
            it runs (timezone-aware UTC).
        family: Search space of the stage, or ``results`` for the results step.
    """

    pipeline: str
    name: str
    kind: str
    state: StageState
    depends_on: tuple[str, ...]
    order: tuple[int, int, int]
    study_name: str
    space: Space | None = field(default=None, repr=False, compare=False)
    stage: SpaceStage | None = field(default=None, repr=False, compare=False)
    budget: SearchBudget | None = None
    run: dict[str, Any] = field(default_factory=dict, compare=False)
    problem: str | None = None
    retrain: RetrainBudget | None = None
    claimed_by: str | None = field(default=None, compare=False)
    claimed_at: datetime.datetime | None = field(default=None, compare=False)
    updated_at: datetime.datetime | None = field(default=None, compare=False)
    family: str = ""

    @property
    def is_step(self) -> bool:
        """Whether the stage is a step that runs once instead of as trials."""
        return self.kind in STEP_KINDS

    @property
    def is_terminal(self) -> bool:
        """Whether the stage is done or failed."""
        return self.state in (StageState.DONE, StageState.FAILED)


def unfinished_pipelines(storage: optuna.storages.RDBStorage) -> list[str]:
    """Return the names of the pipelines that have pending or running stages, sorted."""
    return _pipeline_names(storage, (StageState.PENDING, StageState.RUNNING))


def pipeline_names(storage: optuna.storages.RDBStorage) -> list[str]:
    """Return the names of every pipeline registered in the storage, sorted."""
    return _pipeline_names(storage, None)


def _pipeline_names(storage: optuna.storages.RDBStorage, states: Sequence[StageState] | None) -> list[str]:
    table = stage_table.stages_table
    query = select(table.c.pipeline).distinct()
    if states is not None:
        query = query.where(table.c.state.in_([state.value for state in states]))
    with storage.engine.connect() as connection:
        return sorted(connection.execute(query).scalars())


def record_artifact_dir(storage: optuna.storages.RDBStorage, pipeline: str, artifact_dir: str) -> None:
    """Store a new artifact directory in the :data:`RUN_ATTR` of a pipeline's search studies.

    ``jethpo run`` records it for a finished pipeline whose folder was moved, which
    otherwise keeps the run information of its last registration.
    """
    names = [row.study_name for row in stage_table.get_stages(storage.engine, pipeline)]
    for name, attrs in read_study_user_attrs(storage, names).items():
        run = attrs.get(RUN_ATTR)
        if isinstance(run, Mapping) and run.get("pipeline") == pipeline:
            storage.set_study_user_attr(storage.get_study_id_from_name(name), RUN_ATTR, {**run, "artifact_dir": artifact_dir})


def registered_run(storage: optuna.storages.RDBStorage, pipeline: str) -> dict[str, Any] | None:
    """Return the :data:`RUN_ATTR` that a pipeline's last run stored, or None before its first run.

    Every search study of a pipeline gets the same run information at registration, so
    the first one found represents all.
    """
    names = [row.study_name for row in stage_table.get_stages(storage.engine, pipeline)]
    for attrs in read_study_user_attrs(storage, names).values():
        run = attrs.get(RUN_ATTR)
        if isinstance(run, Mapping) and run.get("pipeline") == pipeline:
            return dict(run)
    return None


def _depths(depends_on: Mapping[str, Sequence[str]]) -> dict[str, int]:
    depth: dict[str, int] = {}

    def resolve(name: str, seen: frozenset[str]) -> int:
        if name in depth:
            return depth[name]
        if name in seen:
            # a cycle cannot come from plan_pipeline, so it is counted as depth 0
            return 0
        parents = [parent for parent in depends_on.get(name, ()) if parent in depends_on]
        depth[name] = 1 + max((resolve(parent, seen | {name}) for parent in parents), default=-1)
        return depth[name]

    for name in depends_on:
        resolve(name, frozenset())
    return depth


def _budget_from_attrs(attrs: Mapping[str, Any], run: Mapping[str, Any]) -> SearchBudget | None:
    keys = ("n_trials", "epochs", "batch_size", "eval_every")
    if not all(isinstance(attrs.get(key), int) for key in keys):
        return None
    resources = run.get("resources") or {}
    return SearchBudget(
        n_trials=attrs["n_trials"],
        epochs=attrs["epochs"],
        batch_size=attrs["batch_size"],
        eval_every=attrs["eval_every"],
        resources=Resources(cpus=float(resources.get("cpus", 1.0)), gpus=float(resources.get("gpus", 0.0))),
    )


def _retrain_budget_from_attrs(attrs: Any) -> RetrainBudget | None:
    keys = ("epochs", "batch_size", "eval_every")
    if not isinstance(attrs, Mapping) or not all(isinstance(attrs.get(key), int) for key in keys):
        return None
    resources = attrs.get("resources") or {}
    return RetrainBudget(
        epochs=attrs["epochs"],
        batch_size=attrs["batch_size"],
        eval_every=attrs["eval_every"],
        resources=Resources(cpus=float(resources.get("cpus", 1.0)), gpus=float(resources.get("gpus", 0.0))),
    )


def load_stage_records(
    storage: optuna.storages.RDBStorage,
    pipeline: str,
    spaces: Mapping[str, Space] | None = None,
) -> list[StageRecord]:
    """Read the registered stages of a pipeline with their search spaces and budgets.

    Args:
        storage: Storage returned by ``storage.open_storage``.
        pipeline: Pipeline name.
        spaces: Known search spaces, by default ``hpo.studies.load_spaces(storage)``.

    Returns:
        The stages sorted by urgency, ``[]`` for an unknown pipeline.
    """
    rows = stage_table.get_stages(storage.engine, pipeline)
    if not rows:
        return []
    spaces = studies.load_spaces(storage) if spaces is None else spaces
    family_index = {name: index for index, name in enumerate(spaces)}
    depth = _depths({row.stage: row.depends_on for row in rows})
    study_attrs = read_study_user_attrs(storage, [row.study_name for row in rows])

    records = []
    for row in rows:
        kind = SEARCH if ":" not in row.stage else row.stage.split(":", 1)[0]
        space = spaces.get(row.family)
        stage = None
        budget = None
        retrain = None
        run: dict[str, Any] = {}
        problem = None
        attrs: dict[str, Any] = {}
        if kind not in RUNNABLE_KINDS:
            problem = f"{kind} steps are not known to this version of jethpo"
        elif space is None and kind != RESULTS:
            problem = f"search space {row.family!r} is not known to this worker"
        else:
            attrs = study_attrs.get(row.study_name, {})
            run = dict(attrs.get(RUN_ATTR) or {})
            if kind == SEARCH:
                stage = next((item for item in space.stages if item.study_name == row.study_name), None)
                if stage is None:
                    problem = f"search space {row.family!r} has no stage with study {row.study_name!r}"
                else:
                    budget = _budget_from_attrs(attrs, run)
            elif kind == RETRAIN:
                retrain = _retrain_budget_from_attrs(attrs.get(RETRAIN_ATTR))
            if problem is None and (not run or (kind == SEARCH and budget is None) or (kind == RETRAIN and retrain is None)):
                problem = f"study {row.study_name!r} has no budget or run attributes; run 'jethpo run' to register it"
        stage_index = len(space.stages) if space is not None else 0
        if space is not None and stage is not None:
            stage_index = space.stages.index(stage)
        elif kind != SEARCH:
            stage_index += STEP_KINDS.index(kind) if kind in STEP_KINDS else 0
        records.append(
            StageRecord(
                pipeline=pipeline,
                name=row.stage,
                kind=kind,
                state=row.state,
                depends_on=row.depends_on,
                order=(depth[row.stage], family_index.get(row.family, len(family_index)), stage_index),
                study_name=row.study_name,
                space=space,
                stage=stage,
                budget=budget,
                run=run,
                problem=problem,
                retrain=retrain,
                claimed_by=row.claimed_by,
                claimed_at=row.claimed_at,
                updated_at=row.updated_at,
                family=row.family,
            )
        )
    records.sort(key=lambda record: record.order)
    return records


# stage transitions


def _move_state(
    engine: sqlalchemy.Engine,
    pipeline: str,
    stage: str,
    from_state: StageState,
    to_state: StageState,
) -> bool:
    """Move a stage from one state to another in one UPDATE, and return whether it moved.

    Of several processes that try the same move at once, exactly one succeeds, so each
    transition is logged and acted on once.
    """
    table = stage_table.stages_table
    statement = (
        update(table)
        .where(
            (table.c.pipeline == pipeline)
            & (table.c.stage == stage)
            & (table.c.state == from_state.value)
        )
        .values(state=to_state.value, updated_at=datetime.datetime.now(datetime.timezone.utc))
    )
    with engine.begin() as connection:
        return connection.execute(statement).rowcount == 1


def advance_pipeline(
    storage: optuna.storages.RDBStorage,
    records: Sequence[StageRecord],
    owner: str,
    trials: Mapping[str, Sequence[FrozenTrial]] | None = None,
) -> list[tuple[str, StageState, str]]:
    """Finish running stages whose budget is used and start pending stages whose inputs are done.

    A running stage becomes done when its budget is used and no trial is RUNNING or
    WAITING, or failed when none of its trials is COMPLETE, because the stages that
    inherit from it need a best trial. A pending stage starts when every stage it depends
    on is done and the best parameters it inherits can be read, and fails when a stage it
    depends on failed. Every transition is one conditional UPDATE, so of several
    controllers only one makes each.

    Args:
        storage: Storage returned by ``storage.open_storage``.
        records: The pipeline's stages from :func:`load_stage_records`.
        owner: Name of this process for ``jethpo_stages.claimed_by``, such as ``host:pid``.
        trials: Trials of each running stage's study, by study name, if the caller has
            read them already. Others are counted in the storage.

    Returns:
        ``(stage name, new state, reason)`` for each transition made by this call.
    """
    engine = storage.engine
    states = {record.name: record.state for record in records}
    events = []
    for record in records:
        if record.problem is not None:
            continue
        if record.is_step:
            # a worker claims and finishes a step; only the failure of its inputs is decided here
            failed_parents = [name for name in record.depends_on if states.get(name) == StageState.FAILED]
            if states[record.name] == StageState.PENDING and failed_parents:
                reason = f"it depends on {', '.join(failed_parents)}, which failed"
                if _move_state(engine, record.pipeline, record.name, StageState.PENDING, StageState.FAILED):
                    events.append((record.name, StageState.FAILED, reason))
                states[record.name] = StageState.FAILED
            continue
        if record.budget is None:
            continue

        if states[record.name] == StageState.RUNNING:
            stage_trials = (trials or {}).get(record.study_name)
            if stage_trials is None:
                study_id = storage.get_study_id_from_name(record.study_name)
                with engine.connect() as connection:
                    counts = count_study_trials(connection, study_id)
            else:
                counts = count_trials(stage_trials)
            if not counts.is_done(record.budget.n_trials):
                continue
            counts = _settled_counts(storage, record.study_name)
            if not counts.is_done(record.budget.n_trials):
                continue
            if counts.complete == 0:
                reason = f"none of its {counts.finished} trials is COMPLETE"
                if _move_state(engine, record.pipeline, record.name, StageState.RUNNING, StageState.FAILED):
                    events.append((record.name, StageState.FAILED, reason))
                states[record.name] = StageState.FAILED
            else:
                reason = f"{counts.complete} COMPLETE, {counts.pruned} PRUNED, {counts.failed} FAIL"
                if _move_state(engine, record.pipeline, record.name, StageState.RUNNING, StageState.DONE):
                    events.append((record.name, StageState.DONE, reason))
                states[record.name] = StageState.DONE

        elif states[record.name] == StageState.PENDING:
            parents = [states.get(parent) for parent in record.depends_on]
            failed_parents = [name for name in record.depends_on if states.get(name) == StageState.FAILED]
            if failed_parents:
                reason = f"it depends on {', '.join(failed_parents)}, which failed"
                if _move_state(engine, record.pipeline, record.name, StageState.PENDING, StageState.FAILED):
                    events.append((record.name, StageState.FAILED, reason))
                states[record.name] = StageState.FAILED
                continue
            if not all(state == StageState.DONE for state in parents):
                continue

            try:
                inherited = studies.inherited_params(storage, record.space, record.stage)
            except studies.StudyError as error:
                if _move_state(engine, record.pipeline, record.name, StageState.PENDING, StageState.FAILED):
                    events.append((record.name, StageState.FAILED, str(error)))
                states[record.name] = StageState.FAILED
                continue
            if stage_table.claim_stage(engine, record.pipeline, record.name, owner):
                detail = f"inherits {inherited}" if inherited else "inherits nothing"
                events.append((record.name, StageState.RUNNING, detail))
            states[record.name] = StageState.RUNNING
    return events
