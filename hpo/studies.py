"""Optuna studies of the search spaces: creation, inheritance between stages, summaries and enqueueing.

Each stage of a search space is one study named ``<family>.<stage>`` (such as
``convae-gen.loss``) that minimizes the validation EMD_sum. Its user attributes record where it
comes from, so that any process can read a study without the YAML file:

- ``family``, ``stage``, ``model``, ``objective``: the search space and stage.
- ``space_fingerprint``: :attr:`hpo.spaces.Space.fingerprint` of the space that created it.
  A study is never reused for a space with another fingerprint.
- ``profile``, ``n_trials``, ``epochs``, ``batch_size``, ``eval_every``: the search budget of
  the last run profile that opened the study, present once a profile has been given.

Search spaces come from two places: the files shipped in ``hpo/spaces/`` and the spaces that
``jethpo spaces add`` stored in the database. :func:`load_spaces` reads the database on every
call, so a running worker also gets the spaces added after it started.

Every function takes the storage returned by :func:`storage.open_storage`.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from hpo.spaces import (
    Profile,
    Space,
    SpaceError,
    Stage,
    builtin_spaces,
    check_space_references,
    load_space,
    parse_space,
)
from storage import pipeline

__all__ = [
    "BUDGET_ATTRS",
    "REPORTED_STATES",
    "StudyError",
    "add_space",
    "best_trial_summary",
    "check_new_space",
    "enqueue",
    "find_stage",
    "inherited_params",
    "load_spaces",
    "load_study",
    "open_study",
    "space_origin",
    "study_summaries",
]

logger = logging.getLogger(__name__)

#: Trial states counted by :func:`study_summaries`, in display order.
REPORTED_STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")

#: Study user attributes that store the search budget of the run profile.
BUDGET_ATTRS = ("profile", "n_trials", "epochs", "batch_size", "eval_every")

#: Relative tolerance under which Optuna's ``enqueue_trial(skip_if_exists=True)`` treats two
#: float values as equal (``numpy.isclose`` with its default rtol, Optuna 4 and 5).
_ENQUEUE_FLOAT_RTOL = 1e-5


class StudyError(ValueError):
    """Study that is missing, has no COMPLETE trial yet, or cannot be used as requested."""


# search spaces


_SHIPPED_SOURCE_PREFIX = "hpo/spaces/"
_STORED_SOURCE_PREFIX = "stored search space "


def space_origin(space: Space) -> str:
    """Return where a search space comes from: ``shipped``, ``stored`` (in the database) or ``file``."""
    if space.source.startswith(_SHIPPED_SOURCE_PREFIX):
        return "shipped"
    if space.source.startswith(_STORED_SOURCE_PREFIX):
        return "stored"
    return "file"


def load_spaces(storage: RDBStorage) -> dict[str, Space]:
    """Return the shipped search spaces and those stored in the database, keyed by name.

    A stored space that no longer parses, or whose name is taken by a shipped space, is left
    out with a warning, so one bad row does not stop every command.

    Args:
        storage: Storage returned by ``open_storage``.

    Returns:
        Shipped spaces in file order, then stored spaces sorted by name.
    """
    spaces = builtin_spaces()
    for name, text in pipeline.load_spaces(storage.engine).items():
        try:
            space = parse_space(text, _STORED_SOURCE_PREFIX + name)
        except SpaceError as error:
            logger.warning("Skipping stored search space %r because it is invalid: %s", name, error)
            continue

        if space.name != name:
            logger.warning(
                "Skipping stored search space %r because its YAML names it %r", name, space.name
            )
            continue
        if name in spaces:
            logger.warning(
                "Skipping stored search space %r because a shipped search space has that name", name
            )
            continue
        spaces[name] = space
    return spaces


def check_new_space(space: Space, spaces: Mapping[str, Space]) -> Space | None:
    """Check that a search space can be added next to the known ones.

    Args:
        space: The space to add.
        spaces: Known spaces, as returned by :func:`load_spaces` or ``builtin_spaces``.

    Returns:
        The known space of the same name when it has the same fingerprint, so that adding
        the new one would change nothing, else None.

    Raises:
        SpaceError: if a known space has this name and a different fingerprint, or the
            space's ``latents_from`` names no known convae space.
    """
    known = spaces.get(space.name)
    if known is not None and known.fingerprint != space.fingerprint:
        origin = space_origin(known)
        # the source of a stored space only repeats its name
        where = "" if origin == "stored" else f" ({known.source})"
        raise SpaceError(
            space.source,
            "name",
            f"a {origin} search space{where} already has this name with different content",
            space.name,
            "Rename the family (the name key), so that its studies get new names.",
        )

    # only convae spaces can be the target of latents_from
    targets = {name: other for name, other in spaces.items() if other.model == "convae"}
    targets[space.name] = space
    check_space_references(targets)
    return known


def add_space(storage: RDBStorage, path: str | Path) -> tuple[Space, bool]:
    """Validate a search space file and store it in the database.

    Nothing is written when the file is invalid or conflicts with a known space or study.

    Args:
        storage: Storage returned by ``open_storage``.
        path: YAML file in the schema of :mod:`hpo.spaces`.

    Returns:
        The space and whether it was stored now. ``False`` means a space with this name and
        the same fingerprint was already shipped or stored.

    Raises:
        SpaceError: if the file is unreadable or invalid, or its name is taken by a space
            with different content. Also if its ``latents_from`` names no known convae
            space, or a study of a different space already has one of its study names.
    """
    space = load_space(path)
    known = check_new_space(space, load_spaces(storage))
    if known is not None:
        logger.info("Search space %r is already known from %s, so nothing was stored", space.name, known.source)
        return known, False

    for stage in space.stages:
        _check_study_fingerprint(storage, space, stage)

    try:
        created = pipeline.save_space(storage.engine, space.name, space.text)
    except pipeline.SpaceConflictError as error:
        # another process stored a different space of this name after load_spaces read the table
        raise SpaceError(
            space.source,
            "name",
            "a stored search space already has this name with different content",
            space.name,
            "Rename the family (the name key), so that its studies get new names.",
        ) from error
    return space, created


def find_stage(spaces: Mapping[str, Space], study_name: str) -> tuple[Space, Stage]:
    """Return the search space and stage whose study is named ``study_name``.

    Raises:
        StudyError: if no stage of the given spaces has this study name. The message lists
            the known study names.
    """
    for space in spaces.values():
        for stage in space.stages:
            if stage.study_name == study_name:
                return space, stage

    known = [name for space in spaces.values() for name in space.study_names]
    raise StudyError(
        f"Study {study_name!r} not found: no search space has this stage. "
        f"Known studies: {', '.join(known)}."
    )


# studies


def _stage_of(space: Space, stage: Stage | str) -> Stage:
    return space.stage(stage.name if isinstance(stage, Stage) else stage)


def _stored_study_attrs(storage: RDBStorage, study_name: str) -> dict[str, Any] | None:
    """Return the user attributes of an existing study, or None if there is no such study."""
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return None
    return storage.get_study_user_attrs(study_id)


def _check_study_fingerprint(storage: RDBStorage, space: Space, stage: Stage) -> None:
    attrs = _stored_study_attrs(storage, stage.study_name)
    stored = (attrs or {}).get("space_fingerprint")
    if stored is None or stored == space.fingerprint:
        return

    raise SpaceError(
        space.source,
        "name",
        f"study {stage.study_name!r} already exists in the storage for a different search space "
        f"(stored fingerprint {stored[:12]}, this space {space.fingerprint[:12]})",
        space.name,
        "Rename the family (the name key), so that its studies get new names, or delete the old study.",
    )


def _study_attrs(space: Space, stage: Stage, profile: Profile | None) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "family": space.name,
        "stage": stage.name,
        "model": space.model,
        "objective": space.objective,
        "space_fingerprint": space.fingerprint,
    }
    if profile is not None:
        budget = profile.search_budget(space, stage)
        attrs.update(
            profile=profile.name,
            n_trials=budget.n_trials,
            epochs=budget.epochs,
            batch_size=budget.batch_size,
            eval_every=budget.eval_every,
        )
    return attrs


def _check_direction(study: optuna.Study) -> None:
    if study.directions != [StudyDirection.MINIMIZE]:
        directions = ", ".join(direction.name for direction in study.directions)
        raise StudyError(
            f"Study {study.study_name!r} exists with direction {directions}, but jethpo "
            f"minimizes EMD_sum. Rename the family (the name key of its search space) or delete the study."
        )


def open_study(
    storage: RDBStorage,
    space: Space,
    stage: Stage | str,
    *,
    profile: Profile | None = None,
    sampler_index: int = 0,
) -> optuna.Study:
    """Create the study of one stage, or load it if it exists, and record its user attributes.

    Args:
        storage: Storage returned by ``open_storage``.
        space: The search space.
        stage: A stage of ``space`` or its name.
        profile: Run profile whose search budget for this stage is stored in the study's user
            attributes. None leaves stored budget attributes unchanged.
        sampler_index: Index of the calling worker, which offsets the sampler seed
            (:meth:`hpo.spaces.SamplerSpec.create`).

    Returns:
        The study, minimizing, with the space's sampler and pruner.

    Raises:
        SpaceError: if the stage is not part of the space, or the study exists with another
            space's fingerprint.
        StudyError: if the study exists with a direction other than minimize.
        ProfileError: if the profile has no valid budget for this stage.
    """
    stage = _stage_of(space, stage)
    attrs = _study_attrs(space, stage, profile)
    _check_study_fingerprint(storage, space, stage)

    study = optuna.create_study(
        storage=storage,
        study_name=stage.study_name,
        direction="minimize",
        sampler=space.create_sampler(sampler_index),
        pruner=space.create_pruner(),
        load_if_exists=True,
    )
    _check_direction(study)

    # another process may have created the study for a different space in the meantime
    stored = study.user_attrs
    if stored.get("space_fingerprint") not in (None, space.fingerprint):
        _check_study_fingerprint(storage, space, stage)
    for key, value in attrs.items():
        if stored.get(key) != value:
            study.set_user_attr(key, value)
    return study


def load_study(storage: RDBStorage, space: Space, stage: Stage | str) -> optuna.Study:
    """Load the existing study of one stage without creating it.

    Raises:
        StudyError: if the study does not exist yet.
        SpaceError: if the stage is not part of the space, or the study belongs to another
            space's fingerprint.
    """
    stage = _stage_of(space, stage)
    if _stored_study_attrs(storage, stage.study_name) is None:
        raise StudyError(
            f"Study {stage.study_name!r} not found in the storage: no trial of this stage has "
            f"started yet. Start the search with 'jethpo run', or enqueue a trial."
        )
    _check_study_fingerprint(storage, space, stage)
    return optuna.load_study(
        study_name=stage.study_name,
        storage=storage,
        sampler=space.create_sampler(),
        pruner=space.create_pruner(),
    )


# trials


def _best_trial(trials: list[FrozenTrial]) -> FrozenTrial | None:
    """Return the COMPLETE trial with the lowest value, the lowest number on ties."""
    complete = [trial for trial in trials if trial.state == TrialState.COMPLETE and trial.value is not None]
    if not complete:
        return None
    return min(complete, key=lambda trial: (trial.value, trial.number))


def _full_params(trial: FrozenTrial) -> dict[str, Any]:
    """Return the trial's merged parameters: the ``params`` user attribute, else ``trial.params``.

    ``trial.params`` contains only the suggested values, so without the user attribute the fixed
    and inherited values are missing.
    """
    params = trial.user_attrs.get("params")
    if isinstance(params, Mapping):
        return dict(params)
    return dict(trial.params)


def _state_counts(trials: list[FrozenTrial]) -> dict[str, int]:
    counts = Counter(trial.state.name for trial in trials)
    return {state: counts.get(state, 0) for state in REPORTED_STATES}


def _describe_states(trials: list[FrozenTrial]) -> str:
    counts = _state_counts(trials)
    parts = [f"{count} {state}" for state, count in counts.items() if count]
    return ", ".join(parts) if parts else "no trials"


def inherited_params(storage: RDBStorage, space: Space, stage: Stage | str) -> dict[str, Any]:
    """Return the parameter values that a stage inherits from the best trials of earlier stages.

    For each stage in ``stage.inherits``, the best COMPLETE trial of its study gives its full
    parameters (the ``params`` user attribute, else ``trial.params``), restricted to the
    names that ``stage`` inherits from it.

    Args:
        storage: Storage returned by ``open_storage``.
        space: The search space.
        stage: A stage of ``space`` or its name.

    Returns:
        Inherited names and values, ``{}`` for a stage that inherits nothing. Conditional
        parameters that the best trial did not use are absent.

    Raises:
        StudyError: if an inherited stage's study does not exist or has no COMPLETE trial,
            or its best trial lacks a parameter that every trial of that stage has.
    """
    stage = _stage_of(space, stage)
    values: dict[str, Any] = {}
    for parent_name in stage.inherits:
        parent = space.stage(parent_name)
        passed_on = [name for name in stage.inherited if name in parent.params or name in parent.inherited]

        # best trial of the parent stage
        if _stored_study_attrs(storage, parent.study_name) is None:
            raise StudyError(
                f"Stage {stage.study_name!r} inherits from study {parent.study_name!r}, which "
                f"does not exist yet. Finish stage {parent.name!r} first."
            )
        _check_study_fingerprint(storage, space, parent)
        study_id = storage.get_study_id_from_name(parent.study_name)
        trials = storage.get_all_trials(study_id, deepcopy=False)
        best = _best_trial(trials)
        if best is None:
            raise StudyError(
                f"Stage {stage.study_name!r} inherits from study {parent.study_name!r}, which has "
                f"no COMPLETE trial yet ({_describe_states(trials)}). Finish stage {parent.name!r} first."
            )

        # the names passed on to this stage
        params = _full_params(best)
        for name in passed_on:
            if name in params:
                values[name] = params[name]
            elif stage.inherited[name].when is None:
                raise StudyError(
                    f"Best trial {best.number} of study {parent.study_name!r} has no value for "
                    f"{name!r}, which stage {stage.study_name!r} inherits. Its 'params' user "
                    f"attribute is {'missing' if 'params' not in best.user_attrs else 'incomplete'}. "
                    f"Rerun stage {parent.name!r} with this version of jethpo."
                )
        logger.debug("Stage %s inherits %s from trial %d of %s", stage.study_name, passed_on, best.number, parent.study_name)
    return values


def _family_and_stage(
    name: str, attrs: Mapping[str, Any], spaces: Mapping[str, Space]
) -> tuple[str, str] | None:
    """Return the family and stage of a jethpo study, or None for a study of something else."""
    if isinstance(attrs.get("family"), str) and isinstance(attrs.get("stage"), str):
        return attrs["family"], attrs["stage"]
    try:
        space, stage = find_stage(spaces, name)
    except StudyError:
        return None
    return space.name, stage.name


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def study_summaries(storage: RDBStorage) -> list[dict[str, Any]]:
    """Summarize every jethpo study in the storage, sorted by study name.

    A study counts as a jethpo study if its user attributes name a family and stage, or its
    name is the study name of a known search space's stage.

    Args:
        storage: Storage returned by ``open_storage``.

    Returns:
        One dict per study with keys ``study``, ``family``, ``stage``, ``model``,
        ``objective``, ``n_trials`` (all trials), ``states`` (count per state in
        :data:`REPORTED_STATES`), ``best_value`` (lowest EMD_sum of a COMPLETE trial, or
        None), ``best_trial`` (its number, or None), ``budget`` (the stored
        :data:`BUDGET_ATTRS`, ``{}`` before a profile was given), ``fail_reasons`` (count per
        ``fail_reason`` user attribute of FAIL trials) and ``space_fingerprint`` (or None).
    """
    spaces = load_spaces(storage)
    summaries = []
    for frozen in storage.get_all_studies():
        attrs = frozen.user_attrs
        identity = _family_and_stage(frozen.study_name, attrs, spaces)
        if identity is None:
            continue
        family, stage_name = identity
        space = spaces.get(family)

        study_id = storage.get_study_id_from_name(frozen.study_name)
        trials = storage.get_all_trials(study_id, deepcopy=False)
        best = _best_trial(trials)
        fail_reasons = Counter(
            str(trial.user_attrs.get("fail_reason", "unrecorded"))
            for trial in trials
            if trial.state == TrialState.FAIL
        )
        summaries.append(
            {
                "study": frozen.study_name,
                "family": family,
                "stage": stage_name,
                "model": attrs.get("model", space.model if space else None),
                "objective": attrs.get("objective", space.objective if space else None),
                "n_trials": len(trials),
                "states": _state_counts(trials),
                "best_value": _finite_or_none(best.value) if best else None,
                "best_trial": best.number if best else None,
                "budget": {key: attrs[key] for key in BUDGET_ATTRS if key in attrs},
                "fail_reasons": dict(sorted(fail_reasons.items())),
                "space_fingerprint": attrs.get("space_fingerprint"),
            }
        )
    return sorted(summaries, key=lambda summary: summary["study"])


def _isoformat(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def best_trial_summary(study: optuna.Study, space: Space, stage: Stage | str) -> dict[str, Any]:
    """Describe the best COMPLETE trial of a stage's study.

    Args:
        study: The stage's study.
        space: The search space.
        stage: A stage of ``space`` or its name.

    Returns:
        A dict with ``study``, ``family``, ``stage``, ``number``, ``value`` (validation
        EMD_sum), ``params`` (every parameter of the trial: tuned, fixed and inherited),
        ``tuned``, ``fixed`` and ``inherited`` (the same values split by origin),
        ``user_attrs``, ``datetime_start``, ``datetime_complete`` (ISO 8601) and
        ``duration_s``. Fixed values are taken from the space, and inherited values are
        missing, when the trial has no ``params`` user attribute.

    Raises:
        StudyError: if the study has no COMPLETE trial.
    """
    stage = _stage_of(space, stage)
    trials = study.get_trials(deepcopy=False)
    best = _best_trial(trials)
    if best is None:
        raise StudyError(
            f"Study {study.study_name!r} has no COMPLETE trial yet ({_describe_states(trials)}). "
            f"Wait for a trial to finish."
        )

    if "params" in best.user_attrs:
        params = _full_params(best)
    else:
        logger.warning(
            "Trial %d of study %s has no 'params' user attribute, so its inherited values are unknown",
            best.number,
            study.study_name,
        )
        params = {**stage.fixed, **best.params}

    duration = best.duration.total_seconds() if best.duration is not None else None
    return {
        "study": study.study_name,
        "family": space.name,
        "stage": stage.name,
        "number": best.number,
        "value": best.value,
        "params": params,
        "tuned": {name: value for name, value in params.items() if name in stage.params},
        "fixed": {name: value for name, value in params.items() if name in stage.fixed},
        "inherited": {name: value for name, value in params.items() if name in stage.inherited},
        "user_attrs": dict(best.user_attrs),
        "datetime_start": _isoformat(best.datetime_start),
        "datetime_complete": _isoformat(best.datetime_complete),
        "duration_s": duration,
    }


# enqueueing


def _existing_trials(storage: RDBStorage, study_name: str) -> list[FrozenTrial]:
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return []
    return storage.get_all_trials(study_id, deepcopy=False)


def _recorded_data_stats(stage: Stage, trials: list[FrozenTrial]) -> dict[str, float]:
    """Recover data statistics from the ranges that earlier trials recorded for from_data parameters.

    A from_data range is ``value * (1 - spread)`` to ``value * (1 + spread)``, so the
    statistic is the midpoint of the recorded distribution.
    """
    stats: dict[str, float] = {}
    for name, spec in stage.params.items():
        if spec.from_data is None or spec.from_data in stats:
            continue
        for trial in trials:
            distribution = trial.distributions.get(name)
            if distribution is not None:
                stats[spec.from_data] = (distribution.low + distribution.high) / 2
                break
    return stats


def _same_param_value(candidate: Any, existing: Any) -> bool:
    if not isinstance(candidate, type(existing)):
        return False
    if isinstance(candidate, float):
        return abs(candidate - existing) <= _ENQUEUE_FLOAT_RTOL * abs(existing) or candidate == existing
    return candidate == existing


def _has_trial_with_params(trials: list[FrozenTrial], params: Mapping[str, Any]) -> bool:
    """Return whether a trial has these parameters, as Optuna's ``skip_if_exists`` decides it."""
    for trial in trials:
        trial_params = trial.system_attrs.get("fixed_params", trial.params)
        if trial_params.keys() != params.keys():
            continue
        if all(_same_param_value(value, trial_params[name]) for name, value in params.items()):
            return True
    return False


def enqueue(
    storage: RDBStorage,
    study_name: str,
    params: Mapping[str, Any],
    *,
    data_stats: Mapping[str, float] | None = None,
) -> bool:
    """Add a WAITING trial with the given parameters to a stage's study.

    The study is created if it does not exist. Parameters left out are suggested by the
    sampler when a worker picks up the trial. A from_data parameter, such as ``gamma_m``,
    has a range that depends on the training jets, so it can be given only with
    ``data_stats`` or after a trial of the study has recorded that range.

    Args:
        storage: Storage returned by ``open_storage``.
        study_name: Study name such as ``convae-gen.loss``.
        params: Tuned parameters of the stage and their values.
        data_stats: Values of the data statistics of from_data parameters, such as
            ``{"pt_over_mass": 12.48}``. None recovers them from the study's trials.

    Returns:
        True if a WAITING trial was added, False if a trial with the same parameters
        already exists (Optuna's ``skip_if_exists``).

    Raises:
        StudyError: if no search space has a stage with this study name.
        SpaceError: if a name is unknown, fixed or inherited in the stage, or a value is of
            the wrong type, outside its range, off its step or inactive, or a from_data
            parameter is given while its data statistic is unknown.
    """
    space, stage = find_stage(load_spaces(storage), study_name)
    _check_study_fingerprint(storage, space, stage)
    trials = _existing_trials(storage, study_name)

    # validate before open_study, which creates the study
    stats = dict(data_stats) if data_stats is not None else _recorded_data_stats(stage, trials)
    for name, spec in stage.params.items():
        if name in params and spec.from_data is not None and spec.from_data not in stats:
            raise SpaceError(
                f"parameters for {study_name}",
                name,
                f"the range of {name} is {spec.spread:.0%} around the {spec.from_data} statistic of "
                f"the training jets, which no trial of this study has recorded yet",
                params[name],
                f"Leave {name} out so that the sampler suggests it, or enqueue it after the first trial has started.",
            )
    normalized = stage.validate_params(params, stats)

    study = open_study(storage, space, stage)
    duplicate = _has_trial_with_params(trials, normalized)
    study.enqueue_trial(normalized, skip_if_exists=True)
    if duplicate:
        logger.info("Study %s already has a trial with parameters %s, so nothing was enqueued", study_name, normalized)
    else:
        logger.info("Enqueued a trial with parameters %s in study %s", normalized, study_name)
    return not duplicate
