"""Progress of a running pipeline: trial counts, best values, step states and an ETA per stage.

A controller reads the storage every few seconds and passes each reading to a
:class:`PipelineMonitor`, which logs what changed (stage starts and ends, retries, failed
trials, and on a plain log every finished trial), and to a :class:`LiveView`, which draws the
readings as a table on a terminal. Search stages are shown by their trial counts, and steps
(retraining, latents, evaluation, results) by their state and how long they have run.
"""

from __future__ import annotations

import datetime
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, TextIO

from optuna.trial import FrozenTrial, TrialState

from hpo.pipeline import EVALUATE, LATENTS, RESULTS, RETRAIN, SEARCH, StageCounts, StageRecord, count_trials
from storage.pipeline import StageState

__all__ = [
    "EtaEstimate",
    "LiveView",
    "PipelineMonitor",
    "PipelineProgress",
    "StageProgress",
    "format_duration",
    "log_retraining_epoch",
    "read_progress",
    "render_table",
]

logger = logging.getLogger(__name__)

_FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


@dataclass(frozen=True)
class StageProgress:
    """One stage at one reading of the storage.

    Attributes:
        name: Stage name.
        pipeline: Pipeline name.
        state: State in ``jethpo_stages``.
        n_trials: Trial budget, or 0 when the stage has none.
        counts: Trials by state as the budget counts them.
        best_value: Lowest validation EMD_sum of a COMPLETE trial, or None.
        best_trial: Number of that trial, or None.
        mean_trial_s: Mean wall time in seconds of the finished trials, or None before the
            first one finished.
        is_step: Whether the stage is a step (retraining, latents, evaluation, results)
            that runs once instead of as trials.
        depends_on: Names of the stages of the same pipeline that it waits for.
        claimed_by: The process that claimed a step, such as ``host:pid``, or None.
        running_s: Seconds since a running step was claimed, or None when the step is not
            running or its claim time is unknown.
        estimate_s: Estimated run time in seconds of a whole step, or None when it cannot be
            estimated (see :func:`read_progress`).
        epoch: Last epoch whose training state a running retraining saved, or None.
        epochs: Epochs of that retraining, or None.
        resumed_after: Epoch after which that retraining resumed from a saved state, or
            None when it started from scratch.
        error: Why a failed step failed, from its stored output, or None.
    """

    name: str
    pipeline: str
    state: StageState
    n_trials: int
    counts: StageCounts
    best_value: float | None
    best_trial: int | None
    mean_trial_s: float | None
    is_step: bool = False
    depends_on: tuple[str, ...] = ()
    claimed_by: str | None = None
    running_s: float | None = None
    estimate_s: float | None = None
    epoch: int | None = None
    epochs: int | None = None
    resumed_after: int | None = None
    error: str | None = None

    @property
    def is_finished(self) -> bool:
        """Whether the stage is done or failed."""
        return self.state in (StageState.DONE, StageState.FAILED)

    @property
    def is_past_estimate(self) -> bool:
        """Whether the stage is a running step that has run longer than its estimated run time."""
        return (
            self.is_step
            and self.state == StageState.RUNNING
            and self.estimate_s is not None
            and self.running_s is not None
            and self.running_s > self.estimate_s
        )

    @property
    def remaining(self) -> int:
        """Trials of the budget that have not finished yet, at least the RUNNING and WAITING ones.

        A step has no trials, so this is 0 for every step.
        """
        if self.is_finished:
            return 0
        return max(self.n_trials - self.counts.finished, self.counts.running + self.counts.waiting)


class EtaEstimate(NamedTuple):
    """Estimated time until every stage of a reading is done (:meth:`PipelineProgress.eta_estimate`).

    Attributes:
        seconds: Estimated seconds of the stages that have an estimate.
        not_estimated: Names of the unfinished stages that have no estimate, in order.
        past_estimate: Names of the running steps that have run longer than their estimate,
            in order. Each counts as 0 s left.
    """

    seconds: float
    not_estimated: tuple[str, ...]
    past_estimate: tuple[str, ...]


@dataclass(frozen=True)
class PipelineProgress:
    """Every stage of one or more pipelines at one reading of the storage.

    Attributes:
        stages: Stage progress, sorted by urgency.
        workers: Number of workers, which divides the ETA.
    """

    stages: tuple[StageProgress, ...]
    workers: int

    @property
    def is_finished(self) -> bool:
        """Whether every stage is done or failed."""
        return all(stage.is_finished for stage in self.stages)

    def mean_trial_s(self) -> float | None:
        """Return the mean wall time of the finished trials over all stages, or None."""
        means = [
            (stage.mean_trial_s, stage.counts.finished)
            for stage in self.stages
            if stage.mean_trial_s is not None and stage.counts.finished
        ]
        total = sum(count for _, count in means)
        if not total:
            return None
        return sum(mean * count for mean, count in means) / total

    def stage_eta_s(self, stage: StageProgress) -> float | None:
        """Estimate the seconds until a stage is done, or return None when it has no estimate.

        A search stage takes its remaining trials times its mean trial time (else the mean
        over all stages), divided by the number of workers that the remaining trials can
        keep busy. This ignores pruning, which ends trials early.

        A step takes its estimated run time (:attr:`StageProgress.estimate_s`), less the
        time it has run if it is running. A running step whose claim time is unknown has no
        estimate. One that has run longer than its estimate
        (:attr:`StageProgress.is_past_estimate`) gets 0 s, because it is expected to end soon
        and its overrun does not tell how much longer it takes.
        """
        if stage.is_finished:
            return 0.0
        if stage.is_step:
            if stage.estimate_s is None:
                return None
            if stage.state != StageState.RUNNING:
                return stage.estimate_s
            if stage.running_s is None:
                return None
            return max(stage.estimate_s - stage.running_s, 0.0)
        if stage.remaining == 0:
            return 0.0
        mean = stage.mean_trial_s if stage.mean_trial_s is not None else self.mean_trial_s()
        if mean is None:
            return None
        slots = max(1, min(self.workers, stage.remaining))
        return math.ceil(stage.remaining / slots) * mean

    def eta_estimate(self) -> EtaEstimate:
        """Estimate the seconds until every stage that has an estimate is done.

        Each unfinished stage takes :meth:`stage_eta_s`. The estimate is the larger of two
        times:

        - the critical path: the longest chain of stages that wait for each other
          (``depends_on``), such as the search stages of a family, then its retraining,
          then its evaluation;
        - the work left, divided by the number of workers: the remaining trials times their
          mean time, plus the steps, each of which occupies one worker.

        With these durations the run cannot take less than either, so the estimate is low
        when workers wait for the inputs of a stage. A stage without an estimate counts as 0 s,
        and so does a step past its estimate. Both are listed in the result.
        """
        durations: dict[tuple[str, str], float] = {}
        missing: list[str] = []
        past_estimate = [stage.name for stage in self.stages if stage.is_past_estimate]
        work = 0.0
        for stage in self.stages:
            if stage.is_finished:
                continue
            duration = self.stage_eta_s(stage)
            if duration is None:
                missing.append(stage.name)
                duration = 0.0
            durations[(stage.pipeline, stage.name)] = duration
            if stage.is_step:
                work += duration
                continue
            mean = stage.mean_trial_s if stage.mean_trial_s is not None else self.mean_trial_s()
            if mean is not None:
                work += stage.remaining * mean

        # critical path: a stage ends its duration after the latest end of the unfinished
        # stages it waits for
        stages = {(stage.pipeline, stage.name): stage for stage in self.stages}
        ends: dict[tuple[str, str], float] = {}

        def end_time(key: tuple[str, str], visiting: frozenset[tuple[str, str]]) -> float:
            if key in ends:
                return ends[key]
            parents = [
                (key[0], parent)
                for parent in stages[key].depends_on
                if (key[0], parent) in durations and (key[0], parent) not in visiting
            ]
            start = max((end_time(parent, visiting | {key}) for parent in parents), default=0.0)
            ends[key] = start + durations[key]
            return ends[key]

        chain = max((end_time(key, frozenset()) for key in durations), default=0.0)
        return EtaEstimate(max(chain, work / max(self.workers, 1)), tuple(missing), tuple(past_estimate))

    def eta_s(self) -> float | None:
        """Estimate the seconds until every stage is done (:meth:`eta_estimate`).

        Returns:
            The estimate, or None when an unfinished stage has no estimate, such as every
            stage before the first trial finished. A step past its estimate counts as 0 s.
        """
        estimate = self.eta_estimate()
        return None if estimate.not_estimated else estimate.seconds


def _stage_progress(record: StageRecord, trials: Sequence[FrozenTrial], now: datetime.datetime) -> StageProgress:
    complete = [trial for trial in trials if trial.state == TrialState.COMPLETE and trial.value is not None]
    best = min(complete, key=lambda trial: (trial.value, trial.number)) if complete else None
    durations = [
        trial.duration.total_seconds()
        for trial in trials
        if trial.state in _FINISHED_STATES and trial.duration is not None
    ]
    running_s = None
    claimed_at = record.claimed_at
    if record.is_step and record.state == StageState.RUNNING and claimed_at is not None:
        if claimed_at.tzinfo is None:
            claimed_at = claimed_at.replace(tzinfo=datetime.timezone.utc)
        running_s = max((now - claimed_at).total_seconds(), 0.0)
    return StageProgress(
        name=record.name,
        pipeline=record.pipeline,
        state=record.state,
        n_trials=record.budget.n_trials if record.budget is not None else 0,
        counts=count_trials(trials),
        best_value=best.value if best is not None else None,
        best_trial=best.number if best is not None else None,
        mean_trial_s=sum(durations) / len(durations) if durations else None,
        is_step=record.is_step,
        depends_on=tuple(record.depends_on),
        claimed_by=record.claimed_by if record.is_step else None,
        running_s=running_s,
    )


def _trained_epochs(trial: FrozenTrial, budget_epochs: int) -> int | None:
    """Return the epochs a COMPLETE or PRUNED trial trained, or None if unknown.

    A COMPLETE trial trained its budget. A PRUNED trial stopped at its last report, whose
    step is its epoch (1-based, ``hpo.objectives``).
    """
    if trial.state == TrialState.COMPLETE:
        return budget_epochs
    if trial.state == TrialState.PRUNED and trial.intermediate_values:
        return max(trial.intermediate_values)
    return None


def _seconds_per_epoch(
    searches: Sequence[StageRecord], trials: Mapping[str, Sequence[FrozenTrial]]
) -> float | None:
    """Return the total wall time of the COMPLETE and PRUNED trials of some search stages
    divided by the epochs they trained, or None before any of them finished."""
    seconds = 0.0
    epochs = 0
    for record in searches:
        for trial in trials.get(record.study_name, ()):
            trained = _trained_epochs(trial, record.budget.epochs)
            if trained and trial.duration is not None:
                seconds += trial.duration.total_seconds()
                epochs += trained
    return seconds / epochs if epochs else None


def _family_seconds_per_epoch(
    family: str,
    searches: Sequence[StageRecord],
    trials: Mapping[str, Sequence[FrozenTrial]],
) -> float | None:
    """Estimate the seconds per training epoch of the model that a family's retraining trains.

    Once every search stage of the family is finished, the estimate is the time per epoch of
    the trial that the retraining takes: the best COMPLETE trial, as ``hpo.steps`` chooses
    it. While a search stage still runs, the best trial so far can still be replaced by one
    of a much larger or smaller model, so the estimate is that of all the family's finished
    trials. That is also the fallback without a COMPLETE trial, and without any finished
    trial of the family it is that of the finished trials of every family.
    """
    own = [record for record in searches if record.family == family]
    if not own or not all(record.is_terminal for record in own):
        per_epoch = _seconds_per_epoch(own, trials)
        return per_epoch if per_epoch is not None else _seconds_per_epoch(searches, trials)
    candidates = [
        (trial.value, record.study_name, trial.number, trial, record)
        for record in own
        for trial in trials.get(record.study_name, ())
        if trial.state == TrialState.COMPLETE and trial.value is not None and math.isfinite(trial.value)
    ]
    if candidates:
        _, _, _, best, record = min(candidates, key=lambda item: item[:3])
        if best.duration is not None and record.budget.epochs:
            return best.duration.total_seconds() / record.budget.epochs
    per_epoch = _seconds_per_epoch(own, trials)
    if per_epoch is not None:
        return per_epoch
    return _seconds_per_epoch(searches, trials)


def _step_estimate_s(
    record: StageRecord,
    searches: Sequence[StageRecord],
    trials: Mapping[str, Sequence[FrozenTrial]],
) -> float | None:
    """Estimate the run time of a whole step in seconds, or return None (see :func:`read_progress`)."""
    if record.kind not in (RETRAIN, LATENTS):
        return None
    per_epoch = _family_seconds_per_epoch(record.family, searches, trials)
    if per_epoch is None:
        return None
    if record.kind == LATENTS:
        return per_epoch
    if record.retrain is None:
        return None
    return record.retrain.epochs * per_epoch


def read_progress(
    records: Sequence[StageRecord],
    trials: Mapping[str, Sequence[FrozenTrial]],
    workers: int,
    *,
    now: datetime.datetime | None = None,
    step_outputs: Mapping[tuple[str, str], Mapping[str, Any]] | None = None,
) -> PipelineProgress:
    """Build the progress of the given stages from their studies' trials.

    Steps get an estimated run time (:attr:`StageProgress.estimate_s`) from the trials of
    the search stages of the same pipeline. Every estimate counts the training epochs only
    at the time per epoch that the search measured, which includes the trials' setup and
    their validation EMD_sum every few epochs. It ignores a difference in batch size or
    evaluation interval between search and retraining.

    - ``retrain:<family>``: the retraining budget's epochs times the seconds per epoch of
      the trial that it retrains once the family's search is finished. Before that, or
      without a COMPLETE trial, it uses the family's COMPLETE and PRUNED trials, else those
      of every family, whose models can be much faster or slower. Trials that are still
      RUNNING are not counted.
    - ``latents:<family>``: one epoch of the same. Encoding the training and validation
      jets is one forward pass, less work than a training epoch with its backward pass.
    - ``evaluate:<family>`` and ``results:<pipeline>``: no estimate. Their cost is mostly
      the jetnet metrics, which depends on the test split's size and the machine, not on
      the trials.

    A running retraining that reported its epoch (``step_outputs``) is estimated from its
    own pace instead: its run time over the epochs it trained since it started or resumed,
    times the epochs left. Before its first report the search's seconds per epoch are used
    for the epochs left.

    Args:
        records: Stages from ``hpo.pipeline.load_stage_records``.
        trials: Trials of each stage's study, by study name. A missing study counts as empty.
        workers: Number of workers.
        now: Time of the reading (timezone-aware), by default the current time. A running
            step's run time is measured up to it.
        step_outputs: Outputs of steps by ``(pipeline, step)``, as
            ``storage.pipeline.get_outputs`` returns them. A running retraining's ``progress``
            entry (``epoch``, ``epochs``, ``resumed_after``) and a failed step's ``error``
            are read from them.
    """
    now = now or datetime.datetime.now(datetime.timezone.utc)
    searches: dict[str, list[StageRecord]] = {}
    for record in records:
        if record.kind == SEARCH and record.budget is not None:
            searches.setdefault(record.pipeline, []).append(record)

    stages = []
    for record in records:
        stage = _stage_progress(record, () if record.is_step else trials.get(record.study_name, ()), now)
        if record.is_step:
            estimate = _step_estimate_s(record, searches.get(record.pipeline, []), trials)
            stage = replace(stage, estimate_s=estimate)
            output = (step_outputs or {}).get((record.pipeline, record.name)) or {}
            reported = output.get("progress")
            if record.state == StageState.RUNNING and isinstance(reported, Mapping):
                stage = _with_reported_epochs(stage, reported)
            if record.state == StageState.FAILED and output.get("error"):
                stage = replace(stage, error=str(output["error"]))
        stages.append(stage)
    return PipelineProgress(stages=tuple(stages), workers=workers)


def _with_reported_epochs(stage: StageProgress, reported: Mapping[str, Any]) -> StageProgress:
    """Return ``stage`` with the epochs a running retraining reported and an estimate from its pace.

    Epochs reported under another claim, by a run that was interrupted, are left out: their
    pace would be measured against this claim's running time.
    """
    if reported.get("claimed_by") != stage.claimed_by:
        return stage
    try:
        epoch = int(reported["epoch"])
        epochs = int(reported["epochs"])
        resumed_after = int(reported.get("resumed_after") or 0)
    except (KeyError, TypeError, ValueError):
        return stage
    stage = replace(stage, epoch=epoch, epochs=epochs, resumed_after=resumed_after or None)
    if stage.running_s is None or epochs <= 0:
        return stage
    left = max(epochs - epoch, 0)
    if epoch > resumed_after:
        per_epoch = stage.running_s / (epoch - resumed_after)
    elif stage.estimate_s is not None:
        per_epoch = stage.estimate_s / epochs
    else:
        return stage
    return replace(stage, estimate_s=stage.running_s + per_epoch * left)


def format_duration(seconds: float | None) -> str:
    """Format seconds as ``1h 05m``, ``3m 20s`` or ``45s``, and None as ``-``."""
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {seconds:02d}s"
    return f"{seconds}s"


def _format_value(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


_KIND_NOUNS = {SEARCH: "search", RETRAIN: "retraining", LATENTS: "latents", EVALUATE: "evaluation", RESULTS: "results"}


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _format_eta(progress: PipelineProgress) -> str:
    """Format the pipeline's ETA for the table title and the log.

    Examples are ``12m 30s (estimate)`` and ``9m 10s (estimate) + 1 step past its estimate +
    2 steps not estimated (evaluation, results)``. When no unfinished stage has an estimate,
    it reads ``unknown + 3 stages not estimated (search, retraining, evaluation)``.
    """
    estimate = progress.eta_estimate()
    unfinished = [stage for stage in progress.stages if not stage.is_finished]
    if estimate.not_estimated and len(estimate.not_estimated) == len(unfinished):
        text = "unknown"
    else:
        text = f"{format_duration(estimate.seconds)} (estimate)"
    if estimate.past_estimate:
        count = len(estimate.past_estimate)
        text += f" + {_plural(count, 'step')} past {'its' if count == 1 else 'their'} estimate"
    if estimate.not_estimated:
        by_name = {stage.name: stage for stage in progress.stages}
        missing = [by_name[name] for name in estimate.not_estimated]
        noun = "step" if all(stage.is_step for stage in missing) else "stage"
        kinds = dict.fromkeys(_KIND_NOUNS.get(_stage_kind(stage), _stage_kind(stage)) for stage in missing)
        text += f" + {_plural(len(missing), noun)} not estimated ({', '.join(kinds)})"
    return text


def _stage_kind(stage: StageProgress) -> str:
    """Return a stage's kind from its name: ``retrain:nf`` is a retraining, ``nf.search`` a search stage."""
    return stage.name.split(":", 1)[0] if stage.is_step else SEARCH


def _describe_step(stage: StageProgress, progress: PipelineProgress) -> str:
    """Describe a step's state for the log, such as ``running on host:1 for 4m 10s, 5m 50s left (estimate)``."""
    text = stage.state.value
    if stage.state == StageState.RUNNING:
        if stage.claimed_by:
            text += f" on {stage.claimed_by}"
        if stage.running_s is not None:
            text += f" for {format_duration(stage.running_s)}"
    if stage.is_past_estimate:
        text += f", past its estimated run time of {format_duration(stage.estimate_s)}"
    elif not stage.is_finished:
        left = progress.stage_eta_s(stage)
        text += f", {format_duration(left)} left (estimate)" if left is not None else ", time left unknown"
    return text


def log_retraining_epoch(pipeline: str, step: str, epoch: int, epochs: int, last: int) -> int:
    """Log a retraining's epoch once it has trained another twentieth of its epochs since ``last``.

    Returns:
        The epoch logged last: ``epoch`` when this call logged it, else ``last``.
    """
    if epoch < last + max(1, epochs // 20) and not (epoch == epochs > last):
        return last
    logger.info("Step %s of pipeline %s trained %d of %d epochs", step, pipeline, epoch, epochs)
    return epoch


class PipelineMonitor:
    """Log writer for the changes between two readings of the storage.

    At INFO: stage starts, ends and failures, and every retry with the study and trial
    numbers. At WARNING: every FAIL trial with its reason. With ``log_trials``, every
    COMPLETE or PRUNED trial at INFO too, and the epoch of a running retraining about 20
    times over its epochs, for logs that have no live view. The first reading only records
    the state, so a resumed pipeline does not log its history again.

    A running step whose claim passes from one process to another is logged too, because
    its state does not change.

    Args:
        log_trials: Whether to log each finished trial.
        grace_period_s: Seconds after a claimer's last sign of life at which a worker takes
            its step over, for the summary of a resumed pipeline, or None to leave it out.
    """

    def __init__(self, log_trials: bool, grace_period_s: float | None = None) -> None:
        self.log_trials = log_trials
        self.grace_period_s = grace_period_s
        self._claimers: dict[tuple[str, str], str | None] = {}
        self._stage_states: dict[tuple[str, str], StageState] = {}
        self._trial_states: dict[str, dict[int, TrialState]] = {}
        self._baseline_done = False
        self._resumes_logged: set[tuple[str, str, int]] = set()
        self._epochs_logged: dict[tuple[str, str], int] = {}

    def update(
        self,
        progress: PipelineProgress,
        trials: Mapping[str, Sequence[FrozenTrial]],
        events: Sequence[tuple[str, StageState, str]] = (),
    ) -> None:
        """Log the changes since the last reading.

        Args:
            progress: The new reading.
            trials: Trials of each stage's study, by study name.
            events: ``(stage name, new state, reason)`` of the transitions that this
                process made since the last reading (``hpo.pipeline.advance_pipeline``).
                They are logged with their reason, on the first reading too.
        """
        reasons = {name: reason for name, _, reason in events}
        first = not self._baseline_done
        self._baseline_done = True

        for study_name, study_trials in trials.items():
            self._log_trials(study_name, study_trials, first)
        for stage in progress.stages:
            key = (stage.pipeline, stage.name)
            previous = self._stage_states.get(key)
            self._stage_states[key] = stage.state
            changed = previous != stage.state if not first else stage.name in reasons
            if changed:
                # a step that ran from one reading to the next gets one line for both
                unseen_start = previous == StageState.PENDING
                self._log_stage(stage, reasons.get(stage.name, ""), progress, unseen_start)
            claimer = stage.claimed_by if stage.is_step and stage.state == StageState.RUNNING else None
            earlier = self._claimers.get(key)
            self._claimers[key] = claimer
            if previous == StageState.RUNNING and earlier and claimer and claimer != earlier:
                logger.info(
                    "Step %s of pipeline %s was taken over by %s from %s, which had stopped renewing its claim",
                    stage.name,
                    stage.pipeline,
                    claimer,
                    earlier,
                )
            # a retraining reports its resume shortly after its claim, so after the start line
            if stage.resumed_after is not None and (key + (stage.resumed_after,)) not in self._resumes_logged:
                self._resumes_logged.add(key + (stage.resumed_after,))
                logger.info(
                    "Step %s of pipeline %s resumed from its saved training state after epoch %d of %d",
                    stage.name,
                    stage.pipeline,
                    stage.resumed_after,
                    stage.epochs,
                )
            if self.log_trials:
                self._log_epoch(stage)

    def _log_epoch(self, stage: StageProgress) -> None:
        """Log the epoch of a running retraining each time it has trained a twentieth of its epochs."""
        if stage.state != StageState.RUNNING or not stage.epoch or not stage.epochs:
            return
        key = (stage.pipeline, stage.name)
        # the resume line above gives the epoch at which a resumed retraining starts
        last = self._epochs_logged.setdefault(key, stage.resumed_after or 0)
        self._epochs_logged[key] = log_retraining_epoch(stage.pipeline, stage.name, stage.epoch, stage.epochs, last)

    def summarize(self, progress: PipelineProgress) -> None:
        """Log the state of every stage at INFO when any stage has trials, as on a resumed pipeline."""
        if not any(stage.counts.used or stage.counts.waiting or stage.counts.retried for stage in progress.stages):
            return
        for stage in progress.stages:
            if stage.is_step:
                text = _describe_step(stage, progress)
                if stage.state == StageState.RUNNING and stage.claimed_by and self.grace_period_s is not None:
                    text += (
                        f". If {stage.claimed_by} has stopped, a worker takes the step over "
                        f"{format_duration(self.grace_period_s)} after its last sign of life"
                    )
                logger.info("Step %s of pipeline %s is %s", stage.name, stage.pipeline, text)
                continue
            logger.info(
                "Stage %s of pipeline %s is %s: %d of %d trials finished, %d RUNNING, %d WAITING, best EMD_sum %s",
                stage.name,
                stage.pipeline,
                stage.state.value,
                stage.counts.finished,
                stage.n_trials,
                stage.counts.running,
                stage.counts.waiting,
                _format_value(stage.best_value),
            )

    def _log_stage(self, stage: StageProgress, reason: str, progress: PipelineProgress, unseen_start: bool) -> None:
        if stage.is_step:
            log = logger.warning if stage.state == StageState.FAILED else logger.info
            verb = {StageState.RUNNING: "started", StageState.DONE: "is done", StageState.FAILED: "failed"}
            if unseen_start:
                verb[StageState.DONE] = "started and is done"
            detail = ""
            if stage.state == StageState.RUNNING:
                claimer = f" on {stage.claimed_by}" if stage.claimed_by else ""
                estimate = format_duration(stage.estimate_s) if stage.estimate_s is not None else "unknown"
                detail = f"{claimer}, estimated run time {estimate}"
            elif stage.state == StageState.DONE:
                detail = f". Pipeline ETA {_format_eta(progress)}"
            if not reason and stage.state == StageState.FAILED:
                reason = stage.error or ""
            log(
                "Step %s of pipeline %s %s%s%s",
                stage.name,
                stage.pipeline,
                verb.get(stage.state, f"is {stage.state.value}"),
                f": {reason}" if reason else "",
                detail,
            )
            return
        if stage.state == StageState.RUNNING:
            logger.info(
                "Stage %s of pipeline %s started with a budget of %d trials%s",
                stage.name,
                stage.pipeline,
                stage.n_trials,
                f"; it {reason}" if reason else "",
            )
        elif stage.state == StageState.DONE:
            best = "no COMPLETE trial"
            if stage.best_trial is not None:
                best = f"best EMD_sum {_format_value(stage.best_value)} (trial {stage.best_trial})"
            logger.info(
                "Stage %s of pipeline %s is done: %d COMPLETE, %d PRUNED, %d FAIL, %s. Pipeline ETA %s",
                stage.name,
                stage.pipeline,
                stage.counts.complete,
                stage.counts.pruned,
                stage.counts.failed,
                best,
                _format_eta(progress),
            )
        elif stage.state == StageState.FAILED:
            logger.warning(
                "Stage %s of pipeline %s failed%s",
                stage.name,
                stage.pipeline,
                f": {reason}" if reason else "",
            )

    def _log_trials(self, study_name: str, trials: Sequence[FrozenTrial], first: bool) -> None:
        known = self._trial_states.setdefault(study_name, {})
        for trial in trials:
            previous = known.get(trial.number)
            known[trial.number] = trial.state
            if first or previous == trial.state:
                continue

            history = trial.system_attrs.get("retry_history")
            if previous is None and history:
                logger.info(
                    "Retrying trial %d of study %s as trial %d with the same parameters (retry %d)",
                    history[-1],
                    study_name,
                    trial.number,
                    len(history),
                )
            if trial.state == TrialState.FAIL:
                reason = trial.user_attrs.get("fail_reason")
                if reason is None:
                    logger.warning(
                        "Trial %d of study %s failed because its worker stopped recording heartbeats",
                        trial.number,
                        study_name,
                    )
                else:
                    logger.warning(
                        "Trial %d of study %s failed (%s): %s",
                        trial.number,
                        study_name,
                        reason,
                        trial.user_attrs.get("fail_message", ""),
                    )
            elif trial.state in (TrialState.COMPLETE, TrialState.PRUNED) and self.log_trials:
                duration = trial.duration.total_seconds() if trial.duration is not None else math.nan
                logger.info(
                    "Trial %d of study %s is %s after %.1f s: EMD_sum %s (node %s)",
                    trial.number,
                    study_name,
                    trial.state.name,
                    duration,
                    _format_value(trial.value),
                    trial.user_attrs.get("hostname", "?"),
                )


def render_table(progress: PipelineProgress) -> Any:
    """Build a rich Table of the progress that fits 80 columns: one row per stage.

    For a search stage, "Done" counts the finished trials of the budget
    (``hpo.pipeline.StageCounts.finished``), and "Running" and "Failed" count trials. A
    step reads "step" under "Done", and while it runs, "Running" shows how long ago it was
    claimed ("claimed" when the claim time is unknown). "ETA" is the time left of a running
    stage (:meth:`PipelineProgress.stage_eta_s`), "unknown" when it has no estimate and
    "overdue" for a step past its estimate. The title has the workers, the WAITING trials
    if any, and the ETA of the whole run, as the log writes it.
    """
    from rich import box
    from rich.table import Table

    waiting = sum(stage.counts.waiting for stage in progress.stages)
    title = _plural(progress.workers, "worker")
    if waiting:
        title += f", {waiting} WAITING trial{'s' if waiting > 1 else ''}"
    title += f", ETA {_format_eta(progress)}"
    table = Table(
        title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, show_edge=False
    )
    table.add_column("Stage", no_wrap=True)
    table.add_column("State", no_wrap=True)
    table.add_column("Done", justify="right", no_wrap=True)
    table.add_column("Running", justify="right", no_wrap=True)
    table.add_column("Failed", justify="right")
    table.add_column("Best EMD_sum", justify="right", no_wrap=True)
    table.add_column("ETA", justify="right", no_wrap=True)
    for stage in progress.stages:
        best = "-"
        if stage.best_trial is not None:
            best = f"{stage.best_value:.3g} (#{stage.best_trial})"
        eta = "-"
        if stage.is_past_estimate:
            eta = "overdue"
        elif stage.state == StageState.RUNNING:
            left = progress.stage_eta_s(stage)
            eta = format_duration(left) if left is not None else "unknown"
        if stage.is_step:
            done, running, failed = "step", "-", "-"
            if stage.epoch is not None and stage.epochs:
                done = f"epoch {stage.epoch}/{stage.epochs}"
            if stage.state == StageState.RUNNING:
                running = format_duration(stage.running_s) if stage.running_s is not None else "claimed"
        else:
            done = f"{stage.counts.finished}/{stage.n_trials}"
            running, failed = str(stage.counts.running), str(stage.counts.failed)
        table.add_row(stage.name, stage.state.value, done, running, failed, best, eta)
    return table


class LiveView:
    """Live table of the pipeline's progress on a terminal, redrawn at each reading.

    While the view is shown, log records of the root logger's stream handlers that wrote
    to stderr are printed above the table, so they do not tear it apart.

    Args:
        stream: Terminal to draw on, stderr by default.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stderr
        self._live = None
        self._redirected: list[tuple[logging.StreamHandler, TextIO]] = []

    def __enter__(self) -> LiveView:
        from rich.console import Console
        from rich.live import Live

        console = Console(file=self._stream)
        self._live = Live(console=console, refresh_per_second=2, transient=False, redirect_stderr=False)
        self._live.start()
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is self._stream:
                self._redirected.append((handler, handler.stream))
                handler.setStream(_ConsoleWriter(console))
        return self

    def update(self, progress: PipelineProgress) -> None:
        """Redraw the table with a new reading."""
        if self._live is not None:
            self._live.update(render_table(progress), refresh=True)

    def __exit__(self, *exc_info: object) -> None:
        for handler, stream in self._redirected:
            handler.setStream(stream)
        self._redirected.clear()
        if self._live is not None:
            # After a normal end the caller prints the final table, so this one is cleared.
            # After Ctrl-C or an error, the last reading stays on the terminal.
            self._live.transient = exc_info[0] is None
            self._live.stop()
            self._live = None


class _ConsoleWriter:
    """File-like object that prints log lines through a rich Console above its live display."""

    def __init__(self, console: Any) -> None:
        self._console = console

    def write(self, text: str) -> int:
        line = text.rstrip("\n")
        if line:
            self._console.print(line, markup=False, highlight=False, soft_wrap=True)
        return len(text)

    def flush(self) -> None:
        pass
