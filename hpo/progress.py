"""Progress of a running pipeline: trial counts, best values and an ETA per stage.

A controller reads the storage every few seconds and passes each reading to a
:class:`PipelineMonitor`, which logs what changed (stage starts and ends, retries, failed
trials, and on a plain log every finished trial), and to a :class:`LiveView`, which draws the
readings as a table on a terminal.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from optuna.trial import FrozenTrial, TrialState

from hpo.pipeline import StageCounts, StageRecord, count_trials
from storage.pipeline import StageState

__all__ = [
    "LiveView",
    "PipelineMonitor",
    "PipelineProgress",
    "StageProgress",
    "format_duration",
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

    @property
    def remaining(self) -> int:
        """Trials of the budget that have not finished yet, at least the RUNNING and WAITING ones."""
        if self.state in (StageState.DONE, StageState.FAILED):
            return 0
        return max(self.n_trials - self.counts.finished, self.counts.running + self.counts.waiting)


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
        return all(stage.state in (StageState.DONE, StageState.FAILED) for stage in self.stages)

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
        """Estimate the seconds until a stage is done, if all workers ran its trials.

        The estimate is the stage's remaining trials times its mean trial time (else the
        mean over all stages) divided by the number of workers that the remaining trials
        can keep busy. It ignores pruning, which ends trials early.
        """
        if stage.remaining == 0:
            return 0.0
        mean = stage.mean_trial_s if stage.mean_trial_s is not None else self.mean_trial_s()
        if mean is None:
            return None
        slots = max(1, min(self.workers, stage.remaining))
        return math.ceil(stage.remaining / slots) * mean

    def eta_s(self) -> float | None:
        """Estimate the seconds until every stage is done, or None before any trial finished.

        The remaining trial time of all stages is divided by the number of workers, which
        assumes that the workers always find a stage with budget left.
        """
        total = 0.0
        for stage in self.stages:
            if stage.remaining == 0:
                continue
            mean = stage.mean_trial_s if stage.mean_trial_s is not None else self.mean_trial_s()
            if mean is None:
                return None
            total += stage.remaining * mean
        return total / max(self.workers, 1)


def _stage_progress(record: StageRecord, trials: Sequence[FrozenTrial]) -> StageProgress:
    complete = [trial for trial in trials if trial.state == TrialState.COMPLETE and trial.value is not None]
    best = min(complete, key=lambda trial: (trial.value, trial.number)) if complete else None
    durations = [
        trial.duration.total_seconds()
        for trial in trials
        if trial.state in _FINISHED_STATES and trial.duration is not None
    ]
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
    )


def read_progress(
    records: Sequence[StageRecord],
    trials: Mapping[str, Sequence[FrozenTrial]],
    workers: int,
) -> PipelineProgress:
    """Build the progress of the given stages from their studies' trials.

    Args:
        records: Stages from ``hpo.pipeline.load_stage_records``.
        trials: Trials of each stage's study, by study name. A missing study counts as empty.
        workers: Number of workers.
    """
    stages = tuple(
        _stage_progress(record, () if record.is_step else trials.get(record.study_name, ())) for record in records
    )
    return PipelineProgress(stages=stages, workers=workers)


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


class PipelineMonitor:
    """Log writer for the changes between two readings of the storage.

    At INFO: stage starts, ends and failures, and every retry with the study and trial
    numbers. At WARNING: every FAIL trial with its reason. With ``log_trials``, every
    COMPLETE or PRUNED trial at INFO too, for logs that have no live view. The first
    reading only records the state, so a resumed pipeline does not log its history again.

    Args:
        log_trials: Whether to log each finished trial.
    """

    def __init__(self, log_trials: bool) -> None:
        self.log_trials = log_trials
        self._stage_states: dict[tuple[str, str], StageState] = {}
        self._trial_states: dict[str, dict[int, TrialState]] = {}
        self._baseline_done = False

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
                self._log_stage(stage, reasons.get(stage.name, ""), progress)

    def summarize(self, progress: PipelineProgress) -> None:
        """Log the state of every stage at INFO when any stage has trials, as on a resumed pipeline."""
        if not any(stage.counts.used or stage.counts.waiting or stage.counts.retried for stage in progress.stages):
            return
        for stage in progress.stages:
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

    def _log_stage(self, stage: StageProgress, reason: str, progress: PipelineProgress) -> None:
        if stage.is_step:
            log = logger.warning if stage.state == StageState.FAILED else logger.info
            verb = {StageState.RUNNING: "started", StageState.DONE: "is done", StageState.FAILED: "failed"}
            log(
                "Step %s of pipeline %s %s%s",
                stage.name,
                stage.pipeline,
                verb.get(stage.state, f"is {stage.state.value}"),
                f": {reason}" if reason else "",
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
                format_duration(progress.eta_s()),
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

    "Done" counts the finished trials of the budget (``hpo.pipeline.StageCounts.finished``).
    The title has the workers, the WAITING trials if any, and the ETA of the whole run.
    """
    from rich import box
    from rich.table import Table

    waiting = sum(stage.counts.waiting for stage in progress.stages)
    title = f"{progress.workers} workers"
    if waiting:
        title += f", {waiting} WAITING trial{'s' if waiting > 1 else ''}"
    title += f", ETA {format_duration(progress.eta_s())} (estimate)"
    table = Table(
        title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, show_edge=False
    )
    table.add_column("Stage", no_wrap=True)
    table.add_column("State", no_wrap=True)
    table.add_column("Done", justify="right", no_wrap=True)
    table.add_column("Running", justify="right")
    table.add_column("Failed", justify="right")
    table.add_column("Best EMD_sum", justify="right", no_wrap=True)
    table.add_column("ETA", justify="right", no_wrap=True)
    for stage in progress.stages:
        best = "-"
        if stage.best_trial is not None:
            best = f"{stage.best_value:.3g} (#{stage.best_trial})"
        table.add_row(
            stage.name,
            stage.state.value,
            "step" if stage.is_step else f"{stage.counts.finished}/{stage.n_trials}",
            str(stage.counts.running),
            str(stage.counts.failed),
            best,
            format_duration(progress.stage_eta_s(stage)) if stage.state == StageState.RUNNING else "-",
        )
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
