"""Search spaces and run profiles: YAML schema, validation and Optuna suggestions.

A search space is one YAML file per study family, such as ``hpo/spaces/convae-gen.yaml``.
Each stage of a family is one Optuna study named ``<family>.<stage>`` (:func:`study_name`).
A file with a new ``name`` adds a study family without code changes. Schema::

    name: convae-gen            # a letter, then lowercase letters, digits, "-" or "_"
    description: free text      # optional
    model: convae               # convae | realnvp-latent | realnvp-flat
    objective: generation       # generation | reconstruction (reconstruction: convae only)
    latents_from: convae-rec    # realnvp-latent only, and required there: the convae family
                                # whose retrained model encodes the jets into latents
    sampler:                    # optional, default {type: tpe, seed: 0}
      type: tpe                 # tpe | random | qmc
      seed: 0
      n_startup_trials: 10      # other options: see SamplerSpec
    pruner:                     # optional, default {type: median}
      type: median              # median | percentile | hyperband | successive_halving | none
      n_startup_trials: 5       # other options: see PrunerSpec
    stages:                     # one or more, each one Optuna study
      - name: loss
        description: free text  # optional
        params:                 # tuned parameters, suggested in this order
          lr: {type: float, low: 1.0e-5, high: 1.0e-1, log: true}
          gamma_m: {type: float, from_data: pt_over_mass, spread: 0.2}
          n_conv_layers: {type: int, low: 1, high: 4}
          activation: {type: categorical, choices: [ReLU, GELU]}
        fixed: {latent_dim: 30} # optional constants
      - name: arch
        inherits: loss          # optional: one earlier stage name or a list of them
        params: {...}

Parameter types:

- ``float``: ``low`` and ``high``, optional ``log`` (default false) and ``step``. With
  ``from_data: STATISTIC`` and ``spread: s`` in place of low and high, the range is
  ``value * (1 - s)`` to ``value * (1 + s)``, where ``value`` is a statistic of the training
  jets passed as ``data_stats[STATISTIC]`` (see :data:`DATA_STATISTICS`).
- ``int``: ``low`` and ``high``, optional ``step`` (default 1) and ``log`` (only with step 1).
- ``categorical``: ``choices``, a non-empty list of distinct scalars.

A step must divide ``high - low``, and a log scale needs ``low > 0``. Write floats with a
dot (``1.0e-5``), because YAML 1.1 reads ``1e-5`` as a string.

Conditional parameters: ``when: {param: n_mlp_layers, at_least: 3}`` on a parameter makes a
trial suggest it only when an earlier parameter of the same stage has at least that value.
Trials with fewer layers then have no ``nodes_3`` in their parameters, and TPE models
``nodes_3`` on the trials that have it. Only RealNVP layer widths can be conditional, because
every trial needs all other parameters: each ``nodes_i`` that a trial may not need must carry
``when: {param: n_mlp_layers, at_least: i}``, and no other parameter may carry ``when``.

Inheritance: ``inherits`` names earlier stages. The stage takes every parameter that those
stages tuned or inherited, at the values of their best trial, and does not suggest them.
Fixed values of an inherited stage are not carried over. Each name gets its value from one
place only: ``params``, ``fixed`` or one inherited stage.

Parameter names are those of the model code. ``convae``: ``lr``, the ConVAEConfig fields
latent_dim, n_filters, kernel_size, linear_nodes, n_conv_layers and activation, and the
LossWeights fields alpha, beta, gamma, gamma_pt and gamma_m. ``realnvp-latent`` and
``realnvp-flat``: ``lr``, ``n_flows``, ``n_mlp_layers`` and ``nodes_1`` to ``nodes_N``, the
width of each hidden layer (:func:`realnvp_hidden_sizes`). Every stage must give a value to
each parameter of its model, and other names are rejected.

A run profile (``hpo/profiles/<name>.yaml``) sets the budgets, as data::

    name: quick
    description: free text
    n_jets: 3000                # jets read before the train/validation/test split; null: all
    models:                     # required for convae, realnvp-latent and realnvp-flat
      convae:
        search:                 # every stage of every family of this model kind
          n_trials: 6           # trials per stage
          epochs: 4             # epochs per trial
          batch_size: 100
          eval_every: 2         # epochs between EMD_sum evaluations, at most epochs
          resources: {cpus: 1, gpus: 0}   # Ray resources per trial
        retrain: {epochs: 20, batch_size: 100, eval_every: 2, resources: {cpus: 1, gpus: 0}}
    families:                   # optional overrides of single keys for one family
      convae-gen:
        search: {n_trials: 8}
        stages: {arch: {n_trials: 4}}
        retrain: {epochs: 30}

All errors are :class:`SpaceError` or :class:`ProfileError`, and each message names the file,
the line where known, the key path and the value, and says what to change.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

import optuna
import yaml
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

__all__ = [
    "CONVAE_ACTIVATIONS",
    "DATA_STATISTICS",
    "MODEL_KINDS",
    "OBJECTIVES",
    "PARAM_TYPES",
    "PRUNER_TYPES",
    "SAMPLER_TYPES",
    "ConfigError",
    "Condition",
    "ParamSpec",
    "Profile",
    "ProfileError",
    "PrunerSpec",
    "Resources",
    "RetrainBudget",
    "SamplerSpec",
    "SearchBudget",
    "Space",
    "SpaceError",
    "Stage",
    "builtin_profile_names",
    "builtin_profiles",
    "builtin_spaces",
    "check_space_references",
    "load_profile",
    "load_space",
    "parse_profile",
    "parse_space",
    "realnvp_hidden_sizes",
    "study_name",
]

MODEL_KINDS = ("convae", "realnvp-latent", "realnvp-flat")
OBJECTIVES = ("generation", "reconstruction")
PARAM_TYPES = ("float", "int", "categorical")
SAMPLER_TYPES = ("tpe", "random", "qmc")
PRUNER_TYPES = ("median", "percentile", "hyperband", "successive_halving", "none")

#: Statistics of the training jets that ``from_data`` can refer to, with their meaning.
DATA_STATISTICS = {
    "pt_over_mass": "mean jet pT divided by mean jet mass of the training jets (dimensionless)",
}

#: Activation names that the ConVAE accepts, the keys of ``models.convae.ACTIVATIONS``.
#: Repeated here because this module must not import torch.
CONVAE_ACTIVATIONS = ("ReLU", "GELU", "LeakyReLU", "SELU", "ELU")

#: Constituents per jet, ``models.jets.N_PARTICLES``, for the ConVAE width check.
_N_PARTICLES = 30

_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
_PARAM_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_NODES_PATTERN = re.compile(r"^nodes_([1-9][0-9]*)$")
_SEED_LIMIT = 2**32
# libyaml's loader reads YAML faster than the pure-Python one, and every command and every
# worker's first step read the shipped search spaces
_FAST_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# errors


class _Missing:
    """Marker for an error without a value, such as a missing key."""

    def __repr__(self) -> str:
        return "<missing>"

    def __reduce__(self) -> str:
        return "_MISSING"


_MISSING: Any = _Missing()


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


class ConfigError(ValueError):
    """Invalid search space, run profile or parameter set.

    The message reads ``SOURCE, line N: PATH = VALUE: PROBLEM. FIX``.

    Attributes:
        source: File path or label of the checked text, such as ``hpo/spaces/nf.yaml``.
        path: Key path of the invalid entry, such as ``stages[1].params.beta.low``, or an
            empty string for the whole document.
        value: The invalid value, or None where a key is missing.
        problem: What is wrong.
        fix: What to change.
        line: Line of the entry in the source (1-based), or None where unknown.
        column: Column of a YAML syntax error (1-based), or None.
    """

    def __init__(
        self,
        source: str,
        path: str,
        problem: str,
        value: Any = _MISSING,
        fix: str = "",
        line: int | None = None,
        column: int | None = None,
    ) -> None:
        self.source = source
        self.path = path
        self.problem = problem
        self.value = None if value is _MISSING else value
        self.fix = fix
        self.line = line
        self.column = column
        self._value_given = value is not _MISSING

        where = source
        if line is not None:
            where += f", line {line}"
            if column is not None:
                where += f", column {column}"
        subject = path
        if value is not _MISSING:
            subject = f"{path} = {_show(value)}" if path else _show(value)
        message = f"{where}: {subject}: {problem}." if subject else f"{where}: {problem}."
        if fix:
            message += f" {fix}"
        super().__init__(message)

    def __reduce__(self):
        value = self.value if self._value_given else _MISSING
        arguments = (self.source, self.path, self.problem, value, self.fix, self.line, self.column)
        return (type(self), arguments)


class SpaceError(ConfigError):
    """Invalid search space, or parameters that do not fit one."""


class ProfileError(ConfigError):
    """Invalid run profile, or a profile without a budget for a study."""


# YAML reading


def _format_path(path: tuple) -> str:
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def _index_lines(node: yaml.Node, path: tuple, lines: dict, checker: _Checker, seen: set) -> None:
    """Record the line of every key path and raise on a key repeated in one mapping.

    ``yaml.safe_load`` keeps the last of two equal keys without a warning, so a repeated
    parameter would silently replace the first one.
    """
    # an alias repeats a node that is already indexed, and may even contain itself
    if id(node) in seen:
        return
    seen.add(id(node))
    lines.setdefault(path, node.start_mark.line + 1)

    if isinstance(node, yaml.MappingNode):
        first_lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in first_lines:
                raise checker.error(
                    checker.source,
                    _format_path(path + (key,)),
                    f"duplicate key {key!r}, first defined on line {first_lines[key]}",
                    fix="Keep one of the two entries.",
                    line=line,
                )
            first_lines[key] = line
            _index_lines(value_node, path + (key,), lines, checker, seen)
    elif isinstance(node, yaml.SequenceNode):
        for position, item in enumerate(node.value):
            _index_lines(item, path + (position,), lines, checker, seen)


class _Checker:
    """Validation helpers that raise ``error`` with the source, line, key path and value."""

    def __init__(self, source: str, error: type[ConfigError], document_kind: str) -> None:
        self.source = source
        self.error = error
        self.document_kind = document_kind
        self.lines: dict[tuple, int] = {}

    def read(self, text: str) -> Any:
        """Parse YAML text, rejecting syntax errors, repeated keys and empty documents."""
        if not isinstance(text, str):
            self.fail((), f"expected the {self.document_kind} as text", value=type(text).__name__)

        try:
            document = self._load(text, _FAST_LOADER)
        except yaml.YAMLError:
            # parse again for the message, because the pure-Python loader's messages are more
            # specific, for example in naming an undefined alias
            self.lines.clear()
            try:
                document = self._load(text, yaml.SafeLoader)
            except yaml.MarkedYAMLError as exc:
                mark = exc.problem_mark or exc.context_mark
                problem = exc.problem or exc.context or "unreadable YAML"
                raise self.error(
                    self.source,
                    "",
                    f"YAML syntax error: {problem}",
                    fix="Correct the YAML at that position.",
                    line=mark.line + 1 if mark else None,
                    column=mark.column + 1 if mark else None,
                ) from exc
            except yaml.YAMLError as exc:
                raise self.error(
                    self.source,
                    "",
                    f"unreadable YAML: {exc}",
                    fix="Save the file as UTF-8 YAML text.",
                ) from exc

        if document is None:
            raise self.error(
                self.source,
                "",
                f"the {self.document_kind} is empty",
                fix="Write a YAML mapping as described in hpo/spaces.py.",
            )
        return document

    def _load(self, text: str, loader_class: type) -> Any:
        loader = loader_class(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _index_lines(node, (), self.lines, self, set())
            return loader.construct_document(node)
        finally:
            loader.dispose()

    def line(self, path: tuple) -> int | None:
        for length in range(len(path), -1, -1):
            if path[:length] in self.lines:
                return self.lines[path[:length]]
        return None

    def fail(self, path: tuple, problem: str, *, value: Any = _MISSING, fix: str = "") -> NoReturn:
        raise self.error(self.source, _format_path(path), problem, value, fix, self.line(path))

    def mapping(self, value: Any, path: tuple, *, required=(), optional=(), entry_kind: str) -> dict:
        """Check that ``value`` is a mapping with string keys, all required keys and no others."""
        if not isinstance(value, dict):
            self.fail(path, f"expected a mapping for the {entry_kind}", value=value)
        allowed = (*required, *optional)
        for key in value:
            if not isinstance(key, str):
                self.fail(path, f"invalid key {key!r}, expected text", value=key, fix=f"Use only {', '.join(allowed)}.")
            if key not in allowed:
                self.fail(
                    path + (key,),
                    f"unknown key {key!r} in the {entry_kind}",
                    value=value[key],
                    fix=f"Valid keys are {', '.join(allowed)}.",
                )
        for key in required:
            if key not in value:
                self.fail(path, f"missing key {key!r} in the {entry_kind}", fix=f"Add {key}.")
        return value

    def identifier(self, value: Any, path: tuple, value_kind: str) -> str:
        if not isinstance(value, str) or not _NAME_PATTERN.match(value):
            self.fail(
                path,
                f"invalid {value_kind}",
                value=value,
                fix="Use 1 to 64 characters: a lowercase letter, then lowercase letters, digits, '-' or '_'.",
            )
        return value

    def text(self, value: Any, path: tuple) -> str:
        if not isinstance(value, str):
            self.fail(path, "expected text", value=value, fix="Quote the value.")
        return value

    def choice(self, value: Any, path: tuple, options: tuple, value_kind: str) -> str:
        if not isinstance(value, str) or value not in options:
            self.fail(path, f"unknown {value_kind}", value=value, fix=f"Use one of {', '.join(options)}.")
        return value

    def boolean(self, value: Any, path: tuple) -> bool:
        if not isinstance(value, bool):
            self.fail(path, "expected true or false", value=value)
        return value

    def integer(self, value: Any, path: tuple, minimum: int | None = None, maximum: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(path, "expected an integer", value=value, fix="Write a whole number without a dot.")
        if minimum is not None and value < minimum:
            self.fail(path, f"expected an integer of at least {minimum}", value=value)
        if maximum is not None and value > maximum:
            self.fail(path, f"expected an integer of at most {maximum}", value=value)
        return value

    def number(self, value: Any, path: tuple) -> float:
        if isinstance(value, str) and _looks_numeric(value):
            self.fail(
                path,
                "expected a number, but YAML reads this as text",
                value=value,
                fix="Write floats with a dot and a signed exponent, such as 1.0e-5.",
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(path, "expected a finite number", value=value)
        return float(value)


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# model parameters


@dataclass(frozen=True)
class _Rule:
    """Value type and bounds that the model code accepts for one parameter."""

    kind: str  # "int", "float" or "choice"
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    choices: tuple[str, ...] = ()
    meaning: str = ""


_LEARNING_RATE = _Rule("float", 0.0, exclusive_minimum=True, meaning="the Adam learning rate")

_CONVAE_RULES = {
    "lr": _LEARNING_RATE,
    "latent_dim": _Rule("int", 1, meaning="the latent size"),
    "n_filters": _Rule("int", 1, meaning="the number of channels of the first convolution"),
    "kernel_size": _Rule("int", 1, meaning="the kernel width along the particle axis"),
    "linear_nodes": _Rule("int", 1, meaning="the width of the hidden linear layer"),
    "n_conv_layers": _Rule("int", 1, meaning="the number of convolutions"),
    "activation": _Rule("choice", choices=CONVAE_ACTIVATIONS, meaning="the activation function"),
    "alpha": _Rule("float", 0.0, meaning="the weight of the chamfer distance"),
    "beta": _Rule("float", 0.0, 1.0, meaning="the share of the KL divergence in the loss"),
    "gamma": _Rule("float", 0.0, meaning="the weight of the jet pT and mass term"),
    "gamma_pt": _Rule("float", 0.0, meaning="the weight of the jet pT MSE"),
    "gamma_m": _Rule("float", 0.0, meaning="the weight of the jet mass MSE"),
}

_REALNVP_RULES = {
    "lr": _LEARNING_RATE,
    "n_flows": _Rule("int", 2, meaning="the number of coupling transforms"),
    "n_mlp_layers": _Rule("int", 1, meaning="the number of hidden layers of the scale and shift networks"),
}

_NODES_RULE = _Rule("int", 1, meaning="the width of one hidden layer")


def _rule(model: str, name: str) -> _Rule | None:
    if model == "convae":
        return _CONVAE_RULES.get(name)
    if _NODES_PATTERN.match(name):
        return _NODES_RULE
    return _REALNVP_RULES.get(name)


def _known_names(model: str) -> str:
    if model == "convae":
        return ", ".join(_CONVAE_RULES)
    return ", ".join(_REALNVP_RULES) + " and nodes_1, nodes_2 and so on"


def realnvp_hidden_sizes(params: Mapping[str, Any]) -> list[int]:
    """Build the ``hidden_sizes`` argument of RealNVP from a trial's parameters.

    Args:
        params: Contains ``n_mlp_layers`` and ``nodes_1`` to ``nodes_<n_mlp_layers>``.
            Further ``nodes_i`` are ignored, as an inactive conditional parameter would be.

    Returns:
        ``[nodes_1, ..., nodes_<n_mlp_layers>]``.

    Raises:
        KeyError: if ``n_mlp_layers`` or one of the needed widths is missing.
    """
    return [params[f"nodes_{layer}"] for layer in range(1, params["n_mlp_layers"] + 1)]


# parameters


def _same_value(a: Any, b: Any) -> bool:
    """Compare YAML scalars so that true and 1 differ but 1 and 1.0 do not."""
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return a == b
    return type(a) is type(b) and a == b


@dataclass(frozen=True)
class Condition:
    """Requirement on an earlier parameter of the same stage for a parameter to be suggested.

    Attributes:
        param: Name of the earlier, numeric parameter.
        at_least: Minimum value of that parameter.
    """

    param: str
    at_least: float

    def is_met(self, value: Any) -> bool:
        """Return whether the parameter is active when ``param`` has the given value."""
        return value >= self.at_least

    def to_dict(self) -> dict[str, Any]:
        return {"param": self.param, "at_least": self.at_least}


@dataclass(frozen=True)
class ParamSpec:
    """One tuned parameter of a stage, as an Optuna distribution.

    Attributes:
        name: Parameter name as the model code spells it, such as ``beta``.
        type: ``float``, ``int`` or ``categorical``.
        low: Lower bound, or None for categorical and from_data parameters.
        high: Upper bound, or None for categorical and from_data parameters.
        step: Distance between allowed values, or None for a continuous float.
        log: Whether values are sampled on a log scale.
        choices: Values of a categorical parameter.
        from_data: Name of the data statistic at the centre of the range, or None.
        spread: Relative half-width of a from_data range, in (0, 1).
        when: Condition for the parameter to be suggested, or None if it always is.
        stage: Name of the stage that tunes it.
        source: File or label of the search space, for error messages.
        path: Key path of the parameter in that file, for error messages.
    """

    name: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    log: bool = False
    choices: tuple = ()
    from_data: str | None = None
    spread: float | None = None
    when: Condition | None = None
    stage: str = ""
    source: str = field(default="", compare=False, repr=False)
    path: str = field(default="", compare=False, repr=False)

    def bounds(self, data_stats: Mapping[str, float] | None = None) -> tuple[float, float]:
        """Return ``(low, high)`` of a float or int parameter.

        Raises:
            SpaceError: if a from_data parameter's statistic is missing from ``data_stats``
                or is not a positive finite number.
        """
        if self.from_data is None:
            return self.low, self.high

        stats = data_stats if isinstance(data_stats, Mapping) else {}
        if self.from_data not in stats:
            raise SpaceError(
                self.source,
                f"{self.path}.from_data",
                f"the data statistic {self.from_data!r} is missing from data_stats",
                self.from_data,
                f"Compute {DATA_STATISTICS[self.from_data]} and pass it as data_stats[{self.from_data!r}].",
            )
        value = stats[self.from_data]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise SpaceError(
                self.source,
                f"{self.path}.from_data",
                f"invalid data statistic {self.from_data}={value!r}, expected a positive finite number",
                self.from_data,
                f"Pass the {DATA_STATISTICS[self.from_data]}, which must be positive.",
            )
        return value * (1 - self.spread), value * (1 + self.spread)

    def distribution(self, data_stats: Mapping[str, float] | None = None) -> BaseDistribution:
        """Build the Optuna distribution that :meth:`suggest` samples from."""
        if self.type == "categorical":
            return CategoricalDistribution(list(self.choices))
        low, high = self.bounds(data_stats)
        if self.type == "int":
            return IntDistribution(low, high, log=self.log, step=self.step)
        return FloatDistribution(low, high, log=self.log, step=self.step)

    def suggest(self, trial: optuna.trial.BaseTrial, data_stats: Mapping[str, float] | None = None) -> Any:
        """Suggest a value with ``trial.suggest_float``, ``suggest_int`` or ``suggest_categorical``."""
        if self.type == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        low, high = self.bounds(data_stats)
        if self.type == "int":
            return trial.suggest_int(self.name, low, high, step=self.step, log=self.log)
        return trial.suggest_float(self.name, low, high, step=self.step, log=self.log)

    def check_value(self, value: Any, data_stats: Mapping[str, float] | None, source: str) -> Any:
        """Return ``value`` as the parameter's type, or raise SpaceError if it is outside the space.

        Args:
            value: A candidate value, such as one given to ``jethpo enqueue``.
            data_stats: Data statistics for a from_data range.
            source: Label of the parameter set, for the error message.
        """

        def reject(problem: str, fix: str) -> NoReturn:
            raise SpaceError(source, self.name, problem, value, fix)

        if self.type == "categorical":
            if not any(_same_value(value, choice) for choice in self.choices):
                reject("not one of the choices", f"Use one of {', '.join(map(repr, self.choices))}.")
            return value

        if self.type == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                reject("wrong type, expected an integer", "Pass a whole number without a dot.")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            reject("wrong type, expected a finite number", "Pass a number.")

        low, high = self.bounds(data_stats)
        if not low <= value <= high:
            reject(f"out of range [{low!r}, {high!r}]", "Pass a value inside the range.")

        if self.type == "int":
            if (value - low) % self.step != 0:
                reject(
                    f"off the step {self.step} from {low}",
                    f"Pass {low} plus a multiple of {self.step}.",
                )
            return value

        value = float(value)
        if self.step is not None:
            steps = (value - low) / self.step
            if abs(steps - round(steps)) > 1e-8 * max(1.0, abs(steps)):
                nearest = low + round(steps) * self.step
                reject(
                    f"off the step {self.step!r} from {low!r}",
                    f"Pass {low!r} plus a multiple of {self.step!r}, such as {nearest!r}.",
                )
        return value

    def to_dict(self) -> dict[str, Any]:
        """Return the parameter as it is written in the YAML schema, with defaults filled in."""
        entry: dict[str, Any] = {"type": self.type}
        if self.type == "categorical":
            entry["choices"] = list(self.choices)
        elif self.from_data is not None:
            entry.update(from_data=self.from_data, spread=self.spread, log=self.log)
        else:
            entry.update(low=self.low, high=self.high, log=self.log)
            if self.step is not None:
                entry["step"] = self.step
        if self.when is not None:
            entry["when"] = self.when.to_dict()
        return entry


# samplers and pruners


@dataclass(frozen=True)
class _Option:
    """Type and bounds of one sampler or pruner option."""

    kind: str  # "int", "float", "bool", "choice" or "int_or_auto"
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()


_SAMPLER_OPTIONS: dict[str, dict[str, _Option]] = {
    "tpe": {
        "n_startup_trials": _Option("int", 0),
        "n_ei_candidates": _Option("int", 1),
        "multivariate": _Option("bool"),
        "group": _Option("bool"),
        "constant_liar": _Option("bool"),
    },
    "random": {},
    "qmc": {
        "qmc_type": _Option("choice", choices=("sobol", "halton")),
        "scramble": _Option("bool"),
    },
}

_PRUNING_SCHEDULE = {
    "n_startup_trials": _Option("int", 0),
    "n_warmup_steps": _Option("int", 0),
    "interval_steps": _Option("int", 1),
    "n_min_trials": _Option("int", 1),
}

_PRUNER_OPTIONS: dict[str, dict[str, _Option]] = {
    "median": _PRUNING_SCHEDULE,
    "percentile": {"percentile": _Option("float", 0, 100), **_PRUNING_SCHEDULE},
    "hyperband": {
        "min_resource": _Option("int", 1),
        "max_resource": _Option("int_or_auto", 1),
        "reduction_factor": _Option("int", 2),
        "bootstrap_count": _Option("int", 0),
    },
    "successive_halving": {
        "min_resource": _Option("int_or_auto", 1),
        "reduction_factor": _Option("int", 2),
        "min_early_stopping_rate": _Option("int", 0),
        "bootstrap_count": _Option("int", 0),
    },
    "none": {},
}


def _parse_option(checker: _Checker, option: _Option, value: Any, path: tuple) -> Any:
    if option.kind == "bool":
        return checker.boolean(value, path)
    if option.kind == "choice":
        return checker.choice(value, path, option.choices, "option value")
    if option.kind == "int_or_auto" and value == "auto":
        return value
    if option.kind in ("int", "int_or_auto"):
        return checker.integer(value, path, minimum=option.minimum)

    number = checker.number(value, path)
    if option.minimum is not None and number < option.minimum or option.maximum is not None and number > option.maximum:
        checker.fail(path, f"out of range [{option.minimum}, {option.maximum}]", value=value)
    return number


@dataclass(frozen=True)
class SamplerSpec:
    """Optuna sampler of every study of a search space.

    Options by type, passed to the Optuna sampler of the same name:

    - ``tpe`` (TPESampler): n_startup_trials, n_ei_candidates, multivariate, group,
      constant_liar.
    - ``random`` (RandomSampler): none.
    - ``qmc`` (QMCSampler): qmc_type (sobol or halton), scramble.

    Attributes:
        type: One of :data:`SAMPLER_TYPES`.
        seed: Base seed, from 0 to 2**32 - 1.
        options: Further keyword arguments of the sampler.
    """

    type: str = "tpe"
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def create(self, worker_index: int = 0) -> optuna.samplers.BaseSampler:
        """Create the sampler for one worker.

        TPE and random samplers of worker i get the seed ``seed + i``, so that workers on the
        same study do not draw the same random trials. QMC samplers get ``seed`` on every
        worker, because QMCSampler indexes one shared sequence by trial number.
        """
        if self.type == "qmc":
            return optuna.samplers.QMCSampler(seed=self.seed, **self.options)

        seed = (self.seed + worker_index) % _SEED_LIMIT
        if self.type == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed, **self.options)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "seed": self.seed, **self.options}


@dataclass(frozen=True)
class PrunerSpec:
    """Optuna pruner of every study of a search space.

    A step is the step that the objective passes to ``trial.report``. Options by type,
    passed to the Optuna pruner of the same name:

    - ``median`` (MedianPruner): n_startup_trials, n_warmup_steps, interval_steps,
      n_min_trials.
    - ``percentile`` (PercentilePruner): percentile (required, 0 to 100) and the median
      options.
    - ``hyperband`` (HyperbandPruner): min_resource, max_resource (an integer or auto),
      reduction_factor, bootstrap_count.
    - ``successive_halving`` (SuccessiveHalvingPruner): min_resource (an integer or auto),
      reduction_factor, min_early_stopping_rate, bootstrap_count.
    - ``none`` (NopPruner): none, so no trial is pruned.

    Attributes:
        type: One of :data:`PRUNER_TYPES`.
        options: Keyword arguments of the pruner.
    """

    type: str = "median"
    options: dict[str, Any] = field(default_factory=dict)

    def create(self) -> optuna.pruners.BasePruner:
        """Create the pruner."""
        pruners = {
            "median": optuna.pruners.MedianPruner,
            "percentile": optuna.pruners.PercentilePruner,
            "hyperband": optuna.pruners.HyperbandPruner,
            "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
            "none": optuna.pruners.NopPruner,
        }
        return pruners[self.type](**self.options)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **self.options}


def _parse_strategy(checker: _Checker, raw: Any, key: str, tables: dict, default_type: str) -> tuple[str, dict, dict]:
    """Check a sampler or pruner mapping and return its type, options and raw entries."""
    path = (key,)
    if not isinstance(raw, dict):
        checker.fail(
            path,
            f"expected a mapping with the {key} type and options",
            value=raw,
            fix=f"Remove {key} to use the default.",
        )
    kind = checker.choice(raw.get("type", default_type), path + ("type",), tuple(tables), f"{key} type")
    extra = ("seed",) if key == "sampler" else ()
    checker.mapping(raw, path, optional=("type", *extra, *tables[kind]), entry_kind=f"{kind} {key} options")

    options = {
        name: _parse_option(checker, option, raw[name], path + (name,))
        for name, option in tables[kind].items()
        if name in raw
    }
    return kind, options, raw


def _check_creates(checker: _Checker, key: str, spec: SamplerSpec | PrunerSpec) -> None:
    """Build the Optuna object once, so that constraints between options fail at parse time."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec.create()
    except (ValueError, TypeError) as exc:
        checker.fail((key,), f"Optuna rejected these options: {exc}", value=spec.to_dict(), fix="Change the options.")


def _parse_sampler(checker: _Checker, top: dict) -> SamplerSpec:
    if "sampler" not in top:
        return SamplerSpec()
    kind, options, raw = _parse_strategy(checker, top["sampler"], "sampler", _SAMPLER_OPTIONS, "tpe")
    seed = checker.integer(raw.get("seed", 0), ("sampler", "seed"), minimum=0, maximum=_SEED_LIMIT - 1)
    if options.get("group") and options.get("multivariate") is False:
        checker.fail(
            ("sampler", "group"),
            "group needs multivariate: true",
            value=True,
            fix="Set multivariate: true or remove group.",
        )
    spec = SamplerSpec(kind, seed, options)
    _check_creates(checker, "sampler", spec)
    return spec


def _parse_pruner(checker: _Checker, top: dict) -> PrunerSpec:
    if "pruner" not in top:
        return PrunerSpec()
    kind, options, _ = _parse_strategy(checker, top["pruner"], "pruner", _PRUNER_OPTIONS, "median")
    if kind == "percentile" and "percentile" not in options:
        checker.fail(
            ("pruner",),
            "missing key 'percentile' in the percentile pruner options",
            fix="Add percentile, such as 25.0.",
        )
    maximum = options.get("max_resource", "auto")
    if kind == "hyperband" and maximum != "auto" and maximum < options.get("min_resource", 1):
        checker.fail(
            ("pruner", "max_resource"),
            f"max_resource is below min_resource = {options.get('min_resource', 1)}",
            value=maximum,
            fix="Raise max_resource or set it to auto.",
        )
    spec = PrunerSpec(kind, options)
    _check_creates(checker, "pruner", spec)
    return spec


# stages and spaces


@dataclass(frozen=True)
class Stage:
    """One stage of a search space, which is one Optuna study.

    Attributes:
        name: Stage name, unique in its space.
        space_name: Name of the search space.
        params: Tuned parameters in suggestion order.
        fixed: Constant parameter values.
        inherits: Names of the earlier stages whose best trial gives the inherited values.
        inherited: Inherited parameter names with their specification in the stage that
            tunes them.
        description: Free text.
        source: File or label of the search space, for error messages.
    """

    name: str
    space_name: str
    params: dict[str, ParamSpec]
    fixed: dict[str, Any] = field(default_factory=dict)
    inherits: tuple[str, ...] = ()
    inherited: dict[str, ParamSpec] = field(default_factory=dict)
    description: str = ""
    source: str = field(default="", compare=False, repr=False)

    @property
    def study_name(self) -> str:
        """Optuna study name, ``<space>.<stage>``."""
        return f"{self.space_name}.{self.name}"

    @property
    def data_statistics(self) -> tuple[str, ...]:
        """Names of the data statistics that :meth:`suggest` needs in ``data_stats``.

        Inherited from_data parameters count, because suggest checks the inherited values.
        """
        specs = [*self.params.values(), *self.inherited.values()]
        return tuple(sorted({spec.from_data for spec in specs if spec.from_data}))

    def required_inherited(self) -> tuple[str, ...]:
        """Return the inherited names that every best trial of the inherited stages has.

        Conditional parameters may be absent from a best trial and are not listed.
        """
        return tuple(name for name, spec in self.inherited.items() if spec.when is None)

    def distributions(self, data_stats: Mapping[str, float] | None = None) -> dict[str, BaseDistribution]:
        """Build the Optuna distribution of every tuned parameter, conditional ones included.

        Args:
            data_stats: Values of the statistics in :data:`DATA_STATISTICS` that the stage's
                from_data parameters use.
        """
        return {name: spec.distribution(data_stats) for name, spec in self.params.items()}

    def suggest(
        self,
        trial: optuna.trial.BaseTrial,
        data_stats: Mapping[str, float] | None = None,
        inherited: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Suggest the stage's parameters for one trial and merge the constant ones.

        A conditional parameter is suggested only when its condition is met by the values
        suggested before it, so it is missing from the trial's parameters otherwise.

        Args:
            trial: The Optuna trial.
            data_stats: Values of the statistics in :attr:`data_statistics`, such as
                ``{"pt_over_mass": 12.48}``.
            inherited: Values of the inherited parameters from the best trials of the stages
                in ``inherits``. Must contain every name of :meth:`required_inherited`.

        Returns:
            The inherited values, then the fixed values, then the suggested values. Only the
            suggested ones are in ``trial.params``.

        Raises:
            SpaceError: for missing, unknown or out-of-range inherited values, or a missing
                data statistic.
        """
        values = self.check_inherited(inherited or {}, data_stats)
        values.update(self.fixed)

        suggested: dict[str, Any] = {}
        for name, spec in self.params.items():
            if spec.when is not None and not self._is_active(spec.when, suggested):
                continue
            suggested[name] = spec.suggest(trial, data_stats)

        values.update(suggested)
        return values

    @staticmethod
    def _is_active(condition: Condition, values: Mapping[str, Any]) -> bool:
        # a parameter whose parent is inactive is inactive too
        return condition.param in values and condition.is_met(values[condition.param])

    def check_inherited(
        self,
        inherited: Mapping[str, Any],
        data_stats: Mapping[str, float] | None = None,
    ) -> dict[str, Any]:
        """Return the inherited values after checking them against the stages that tuned them.

        Raises:
            SpaceError: for a missing or unknown name, or a value outside its space.
        """
        source = f"inherited parameters of {self.study_name}"
        if not isinstance(inherited, Mapping):
            raise SpaceError(
                source,
                "",
                "expected a mapping of parameter names to values",
                inherited,
                "Pass the best trial's parameters of the inherited stages as a dict.",
            )

        unknown = [name for name in inherited if name not in self.inherited]
        if unknown:
            raise SpaceError(
                source,
                unknown[0],
                f"unknown inherited parameter, because stage {self.name!r} inherits only "
                f"{', '.join(self.inherited) or 'nothing'}",
                inherited[unknown[0]],
                "Pass only the best trial's parameters of the inherited stages.",
            )
        missing = [name for name in self.required_inherited() if name not in inherited]
        if missing:
            raise SpaceError(
                source,
                missing[0],
                f"missing inherited parameters {', '.join(missing)}",
                fix=f"Pass the best trial's values from stage(s) {', '.join(self.inherits)}.",
            )
        return {name: self.inherited[name].check_value(value, data_stats, source) for name, value in inherited.items()}

    def validate_params(
        self,
        params: Mapping[str, Any],
        data_stats: Mapping[str, float] | None = None,
    ) -> dict[str, Any]:
        """Check parameters to enqueue in this stage's study and return them normalized.

        The mapping may leave out tuned parameters, which the sampler then suggests, as
        ``optuna.Study.enqueue_trial`` does. Fixed and inherited names are rejected, because
        the stage sets them itself.

        Args:
            params: Parameter names and values, such as ``{"lr": 1e-3, "beta": 0.95}``.
            data_stats: Values of the statistics that from_data parameters use.

        Returns:
            The parameters in suggestion order, ints as int and floats as float.

        Raises:
            SpaceError: for an unknown, fixed or inherited name, a value of the wrong type,
                out of range or off the step, or a conditional parameter whose condition
                the given values do not meet.
        """
        source = f"parameters for {self.study_name}"
        if not isinstance(params, Mapping):
            raise SpaceError(
                source,
                "",
                "expected a mapping of parameter names to values",
                params,
                "Pass a JSON object.",
            )

        for name, value in params.items():
            if name in self.fixed:
                raise SpaceError(source, name, f"fixed at {self.fixed[name]!r} in this stage", value, "Remove it.")
            if name in self.inherited:
                raise SpaceError(
                    source,
                    name,
                    f"inherited from the best trial of stage {self.inherited[name].stage!r}",
                    value,
                    "Remove it.",
                )
            if name not in self.params:
                raise SpaceError(
                    source,
                    name,
                    "unknown parameter",
                    value,
                    f"Tuned parameters of this stage are {', '.join(self.params)}.",
                )

        normalized = {
            name: spec.check_value(params[name], data_stats, source)
            for name, spec in self.params.items()
            if name in params
        }

        for name, spec in self.params.items():
            condition = spec.when
            if name in normalized and condition is not None and condition.param in normalized:
                if not condition.is_met(normalized[condition.param]):
                    raise SpaceError(
                        source,
                        name,
                        f"inactive because {condition.param} = {normalized[condition.param]!r} "
                        f"does not meet its condition {condition.to_dict()}",
                        normalized[name],
                        f"Remove {name} or change {condition.param}.",
                    )
        return normalized

    def to_dict(self) -> dict[str, Any]:
        """Return the stage as it is written in the YAML schema."""
        entry: dict[str, Any] = {"name": self.name}
        if self.description:
            entry["description"] = self.description
        if self.inherits:
            entry["inherits"] = list(self.inherits)
        entry["params"] = {name: spec.to_dict() for name, spec in self.params.items()}
        if self.fixed:
            entry["fixed"] = dict(self.fixed)
        return entry


@dataclass(frozen=True)
class Space:
    """A search space: one study family with its stages, sampler and pruner.

    Attributes:
        name: Family name, the prefix of its study names.
        model: One of :data:`MODEL_KINDS`.
        objective: One of :data:`OBJECTIVES`.
        stages: Stages in file order. A stage comes after every stage it inherits from.
        sampler: Sampler settings.
        pruner: Pruner settings.
        latents_from: For ``realnvp-latent``, the convae family whose retrained model
            encodes the jets, otherwise None.
        description: Free text.
        source: File path or label of the text.
        text: The YAML text as given.
    """

    name: str
    model: str
    objective: str
    stages: tuple[Stage, ...]
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    pruner: PrunerSpec = field(default_factory=PrunerSpec)
    latents_from: str | None = None
    description: str = ""
    source: str = field(default="", compare=False, repr=False)
    text: str = field(default="", compare=False, repr=False)

    def stage(self, name: str) -> Stage:
        """Return the stage with the given name.

        Raises:
            SpaceError: if the space has no such stage.
        """
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise SpaceError(
            self.source,
            "stages",
            f"no stage named {name!r} in search space {self.name!r}",
            name,
            f"Use one of {', '.join(stage.name for stage in self.stages)}.",
        )

    @property
    def study_names(self) -> tuple[str, ...]:
        return tuple(stage.study_name for stage in self.stages)

    @property
    def data_statistics(self) -> tuple[str, ...]:
        """Names of the data statistics that the stages' from_data parameters need."""
        return tuple(sorted({name for stage in self.stages for name in stage.data_statistics}))

    def create_sampler(self, worker_index: int = 0) -> optuna.samplers.BaseSampler:
        """Create this space's sampler for one worker (see :meth:`SamplerSpec.create`)."""
        return self.sampler.create(worker_index)

    def create_pruner(self) -> optuna.pruners.BasePruner:
        """Create this space's pruner."""
        return self.pruner.create()

    def to_dict(self) -> dict[str, Any]:
        """Return the space as it is written in the YAML schema, with defaults filled in."""
        entry: dict[str, Any] = {"name": self.name}
        if self.description:
            entry["description"] = self.description
        entry.update(model=self.model, objective=self.objective)
        if self.latents_from is not None:
            entry["latents_from"] = self.latents_from
        entry.update(
            sampler=self.sampler.to_dict(),
            pruner=self.pruner.to_dict(),
            stages=[stage.to_dict() for stage in self.stages],
        )
        return entry

    def to_yaml(self) -> str:
        """Return the YAML text as given, or a dump of :meth:`to_dict` if there is none."""
        if self.text:
            return self.text
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def fingerprint(self) -> str:
        """SHA-256 hex digest of what the space samples and how.

        Comments, formatting, the order of keys and parameters, and descriptions do not
        change it. Any change of a range, step, scale, condition, fixed value, inheritance,
        sampler or pruner setting, model or objective does.
        """
        canonical = self.to_dict()
        canonical.pop("description", None)
        for stage in canonical["stages"]:
            stage.pop("description", None)
        text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _parse_condition(checker: _Checker, raw: Any, path: tuple, earlier: dict[str, ParamSpec]) -> Condition:
    entry = checker.mapping(raw, path, required=("param", "at_least"), entry_kind="condition")
    parent_name = entry["param"]
    if not isinstance(parent_name, str) or parent_name not in earlier:
        checker.fail(
            path + ("param",),
            "a condition must refer to a parameter tuned earlier in the same stage",
            value=parent_name,
            fix=f"Use one of {', '.join(earlier)}." if earlier else "List the parameter it depends on first.",
        )
    parent = earlier[parent_name]
    threshold = checker.number(entry["at_least"], path + ("at_least",))

    # the range of the parameter that the condition tests
    if parent.type == "categorical":
        numeric = all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in parent.choices)
        if not numeric:
            checker.fail(
                path + ("param",),
                f"at_least needs a numeric parameter, but {parent_name} has choices {list(parent.choices)}",
                value=parent_name,
                fix="Refer to an int or float parameter.",
            )
        highest = max(parent.choices)
    else:
        highest = None if parent.from_data else parent.high
    if highest is not None and threshold > highest:
        checker.fail(
            path + ("at_least",),
            f"the condition is never met, because {parent_name} is at most {highest}",
            value=entry["at_least"],
            fix=f"Lower at_least or raise the upper bound of {parent_name}.",
        )

    if isinstance(entry["at_least"], int):
        threshold = entry["at_least"]
    return Condition(parent_name, at_least=threshold)


def _parse_param(
    checker: _Checker,
    name: Any,
    raw: Any,
    path: tuple,
    stage: str,
    earlier: dict[str, ParamSpec],
) -> ParamSpec:
    if not isinstance(name, str) or not _PARAM_NAME_PATTERN.match(name):
        checker.fail(
            path,
            "invalid parameter name",
            value=name,
            fix="Use the model's parameter names, such as lr or n_flows.",
        )
    if not isinstance(raw, dict):
        checker.fail(path, "expected a mapping such as {type: float, low: 0.1, high: 1.0}", value=raw)
    if "type" not in raw:
        checker.fail(path, "missing key 'type' in the parameter", fix=f"Add type: one of {', '.join(PARAM_TYPES)}.")
    kind = checker.choice(raw.get("type"), path + ("type",), PARAM_TYPES, "parameter type")
    common = {"name": name, "type": kind, "stage": stage, "source": checker.source, "path": _format_path(path)}

    if kind == "categorical":
        entry = checker.mapping(
            raw,
            path,
            required=("type", "choices"),
            optional=("when",),
            entry_kind="categorical parameter",
        )
        choices = entry["choices"]
        if not isinstance(choices, list) or not choices:
            checker.fail(path + ("choices",), "expected a non-empty list of choices", value=choices)
        for position, choice in enumerate(choices):
            if choice is not None and not isinstance(choice, (bool, int, float, str)):
                checker.fail(path + ("choices", position), "expected a number, text, true, false or null", value=choice)
            if any(_same_value(choice, other) for other in choices[:position]):
                checker.fail(
                    path + ("choices", position),
                    "duplicate choice",
                    value=choice,
                    fix="List each choice once.",
                )
        spec = ParamSpec(**common, choices=tuple(choices))
    elif kind == "int":
        entry = checker.mapping(
            raw,
            path,
            required=("type", "low", "high"),
            optional=("step", "log", "when"),
            entry_kind="int parameter",
        )
        low = checker.integer(entry["low"], path + ("low",))
        high = checker.integer(entry["high"], path + ("high",))
        step = checker.integer(entry.get("step", 1), path + ("step",), minimum=1)
        log = checker.boolean(entry.get("log", False), path + ("log",))
        _check_range(checker, path, entry, low, high, step, log, allow_unit_log_step=True)
        spec = ParamSpec(**common, low=low, high=high, step=step, log=log)
    elif "from_data" in raw:
        entry = checker.mapping(
            raw,
            path,
            required=("type", "from_data", "spread"),
            optional=("log", "when"),
            entry_kind="float parameter with from_data",
        )
        statistic = checker.choice(entry["from_data"], path + ("from_data",), tuple(DATA_STATISTICS), "data statistic")
        spread = checker.number(entry["spread"], path + ("spread",))
        if not 0 < spread < 1:
            checker.fail(
                path + ("spread",),
                "expected a relative half-width in (0, 1)",
                value=entry["spread"],
                fix="Use 0.2 for +-20%.",
            )
        log = checker.boolean(entry.get("log", False), path + ("log",))
        spec = ParamSpec(**common, from_data=statistic, spread=spread, log=log)
    else:
        entry = checker.mapping(
            raw,
            path,
            required=("type", "low", "high"),
            optional=("step", "log", "when"),
            entry_kind="float parameter",
        )
        low = checker.number(entry["low"], path + ("low",))
        high = checker.number(entry["high"], path + ("high",))
        step = checker.number(entry["step"], path + ("step",)) if "step" in entry else None
        log = checker.boolean(entry.get("log", False), path + ("log",))
        if step is not None and step <= 0:
            checker.fail(path + ("step",), "expected a positive step", value=entry["step"])
        _check_range(checker, path, entry, low, high, step, log, allow_unit_log_step=False)
        spec = ParamSpec(**common, low=low, high=high, step=step, log=log)

    if "when" in raw:
        spec = replace(spec, when=_parse_condition(checker, raw["when"], path + ("when",), earlier))
    return spec


def _check_range(checker, path, entry, low, high, step, log, *, allow_unit_log_step: bool) -> None:
    if low > high:
        checker.fail(
            path + ("low",),
            f"low is above high = {entry['high']!r}",
            value=entry["low"],
            fix="Swap low and high.",
        )
    if log and low <= 0:
        checker.fail(
            path + ("low",),
            "a log scale needs low > 0",
            value=entry["low"],
            fix="Set low to a positive number or remove log.",
        )
    if log and "step" in entry and not (allow_unit_log_step and step == 1):
        checker.fail(
            path + ("step",),
            "a step cannot be combined with a log scale",
            value=entry["step"],
            fix="Remove step or log.",
        )
    if step is None:
        return
    intervals = (high - low) / step
    if abs(intervals - round(intervals)) > 1e-9 * max(1.0, intervals):
        checker.fail(
            path + ("step",),
            f"the step does not divide high - low = {high - low!r}",
            value=entry.get("step"),
            fix="Change low, high or step so that high - low is a multiple of step.",
        )


def _parse_inherits(
    checker: _Checker,
    raw: Any,
    path: tuple,
    stage: str,
    earlier: dict,
    all_names: list,
) -> tuple[str, ...]:
    names = [raw] if isinstance(raw, str) else raw
    if not isinstance(names, list) or not names:
        checker.fail(path, "expected a stage name or a non-empty list of stage names", value=raw)

    for position, name in enumerate(names):
        item_path = path if isinstance(raw, str) else path + (position,)
        if not isinstance(name, str):
            checker.fail(item_path, "expected a stage name", value=name)
        if name == stage:
            checker.fail(item_path, "a stage cannot inherit from itself", value=name, fix="Name an earlier stage.")
        if name not in all_names:
            checker.fail(
                item_path,
                "no stage has this name",
                value=name,
                fix=f"Name an earlier stage: {', '.join(earlier) or 'this is the first stage'}.",
            )
        if name not in earlier:
            checker.fail(
                item_path,
                "this stage comes later in the file, but a stage can inherit only from stages listed before it",
                value=name,
                fix="Move the inherited stage above this one.",
            )
        if name in names[:position]:
            checker.fail(item_path, "duplicate stage name", value=name, fix="List each stage once.")
    return tuple(names)


def _parse_stage(
    checker: _Checker,
    raw: Any,
    index: int,
    space_name: str,
    earlier: dict[str, Stage],
    all_names: list,
) -> Stage:
    path = ("stages", index)
    entry = checker.mapping(
        raw,
        path,
        required=("name", "params"),
        optional=("description", "inherits", "fixed"),
        entry_kind="stage",
    )
    name = checker.identifier(entry["name"], path + ("name",), "stage name")
    if name in earlier:
        checker.fail(path + ("name",), "duplicate stage name", value=name, fix="Give each stage its own name.")
    description = checker.text(entry["description"], path + ("description",)) if "description" in entry else ""

    # tuned parameters, in suggestion order
    raw_params = entry["params"]
    if not isinstance(raw_params, dict) or not raw_params:
        checker.fail(
            path + ("params",),
            "expected a non-empty mapping of tuned parameters",
            value=raw_params,
            fix="Tune at least one parameter.",
        )
    params: dict[str, ParamSpec] = {}
    for param_name, param_raw in raw_params.items():
        params[param_name] = _parse_param(
            checker,
            param_name,
            param_raw,
            path + ("params", param_name),
            name,
            dict(params),
        )

    # constants
    raw_fixed = entry.get("fixed", {})
    if not isinstance(raw_fixed, dict):
        checker.fail(path + ("fixed",), "expected a mapping of parameter names to values", value=raw_fixed)
    for fixed_name, value in raw_fixed.items():
        fixed_path = path + ("fixed", fixed_name)
        if not isinstance(fixed_name, str) or not _PARAM_NAME_PATTERN.match(fixed_name):
            checker.fail(fixed_path, "invalid parameter name", value=fixed_name)
        if isinstance(value, float) and not math.isfinite(value) or not isinstance(value, (bool, int, float, str)):
            checker.fail(fixed_path, "expected a finite number, text, true or false", value=value)
        if fixed_name in params:
            checker.fail(
                fixed_path,
                f"{fixed_name} is also tuned in params",
                value=value,
                fix="Keep it in params or in fixed, not both.",
            )

    # inherited parameters
    inherits: tuple[str, ...] = ()
    if "inherits" in entry:
        inherits = _parse_inherits(checker, entry["inherits"], path + ("inherits",), name, earlier, all_names)
    inherited: dict[str, ParamSpec] = {}
    for parent_name in inherits:
        parent = earlier[parent_name]
        for inherited_name, spec in {**parent.inherited, **parent.params}.items():
            # two inherited stages may pass on the same parameter of a common earlier stage
            if inherited_name in inherited and inherited[inherited_name].stage != spec.stage:
                checker.fail(
                    path + ("inherits",),
                    f"{inherited_name} would be inherited from both stage {inherited[inherited_name].stage!r} "
                    f"and stage {spec.stage!r}",
                    value=list(inherits),
                    fix="Inherit each parameter from one stage only.",
                )
            if inherited_name in params:
                checker.fail(
                    path + ("params", inherited_name),
                    f"{inherited_name} is also inherited from stage {parent_name!r}",
                    value=raw_params[inherited_name],
                    fix="Remove it here or stop inheriting from that stage.",
                )
            if inherited_name in raw_fixed:
                checker.fail(
                    path + ("fixed", inherited_name),
                    f"{inherited_name} is also inherited from stage {parent_name!r}",
                    value=raw_fixed[inherited_name],
                    fix="Remove it here or stop inheriting from that stage.",
                )
            inherited[inherited_name] = spec

    return Stage(
        name=name,
        space_name=space_name,
        params=params,
        fixed=dict(raw_fixed),
        inherits=inherits,
        inherited=inherited,
        description=description,
        source=checker.source,
    )


def _integer_range(stage: Stage, name: str) -> tuple[int, int] | None:
    """Return the lowest and highest value that an integer parameter can take in a stage."""
    if name in stage.fixed:
        value = stage.fixed[name]
        return (value, value) if isinstance(value, int) and not isinstance(value, bool) else None
    spec = stage.params.get(name) or stage.inherited.get(name)
    if spec is None:
        return None
    if spec.type == "int":
        return spec.low, spec.high
    if spec.type == "categorical" and all(isinstance(c, int) and not isinstance(c, bool) for c in spec.choices):
        return min(spec.choices), max(spec.choices)
    return None


def _check_rule_for_spec(checker: _Checker, rule: _Rule, spec: ParamSpec, path: tuple) -> None:
    """Check a tuned parameter's type and bounds against what the model code accepts."""
    if spec.type == "categorical":
        for position, choice in enumerate(spec.choices):
            _check_rule_for_value(checker, rule, spec.name, choice, path + ("choices", position))
        return

    expected_type = {"float": "float", "int": "int", "choice": "categorical"}[rule.kind]
    if spec.type != expected_type:
        checker.fail(
            path + ("type",),
            f"{spec.name} is {rule.meaning}, which the model expects as {expected_type}",
            value=spec.type,
            fix=f"Use type: {expected_type} or a categorical of such values.",
        )
    if spec.from_data is None:
        _check_rule_for_value(checker, rule, spec.name, spec.low, path + ("low",))
        _check_rule_for_value(checker, rule, spec.name, spec.high, path + ("high",))


def _check_rule_for_value(checker: _Checker, rule: _Rule, name: str, value: Any, path: tuple) -> None:
    """Check one constant or one bound against what the model code accepts."""
    if rule.kind == "choice":
        if value not in rule.choices or not isinstance(value, str):
            checker.fail(path, f"unknown {name} value", value=value, fix=f"Use one of {', '.join(rule.choices)}.")
        return

    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not numeric or rule.kind == "int" and not isinstance(value, int):
        checker.fail(path, f"{name} is {rule.meaning}, which the model expects as {rule.kind}", value=value)
    if rule.minimum is not None:
        too_low = value <= rule.minimum if rule.exclusive_minimum else value < rule.minimum
        if too_low:
            bound = "above" if rule.exclusive_minimum else "at least"
            checker.fail(path, f"{name} is {rule.meaning} and must be {bound} {rule.minimum}", value=value)
    if rule.maximum is not None and value > rule.maximum:
        checker.fail(path, f"{name} is {rule.meaning} and must be at most {rule.maximum}", value=value)


def _check_model_parameters(checker: _Checker, model: str, stage: Stage, index: int) -> None:
    """Check a stage's names, types and bounds against the model code and its completeness."""
    path = ("stages", index)

    # names, types and bounds of what this stage sets
    for name, spec in stage.params.items():
        rule = _rule(model, name)
        if rule is None:
            checker.fail(
                path + ("params", name),
                f"unknown parameter for model {model}",
                fix=f"Known names: {_known_names(model)}.",
            )
        _check_rule_for_spec(checker, rule, spec, path + ("params", name))
    for name, value in stage.fixed.items():
        rule = _rule(model, name)
        if rule is None:
            checker.fail(
                path + ("fixed", name),
                f"unknown parameter for model {model}",
                value=value,
                fix=f"Known names: {_known_names(model)}.",
            )
        _check_rule_for_value(checker, rule, name, value, path + ("fixed", name))

    # completeness
    names = {**stage.inherited, **stage.fixed, **stage.params}
    if model == "convae":
        required = list(_CONVAE_RULES)
    else:
        layers = _integer_range(stage, "n_mlp_layers") or (0, 0)
        required = [*_REALNVP_RULES, *(f"nodes_{layer}" for layer in range(1, layers[1] + 1))]
    missing = [name for name in required if name not in names]
    if missing:
        checker.fail(
            path,
            f"stage {stage.name!r} gives no value to {', '.join(missing)}",
            value=stage.name,
            fix="Add each to params or fixed, or inherit it from an earlier stage.",
        )

    # only RealNVP layer widths that some trials do not use may be conditional
    layers = None if model == "convae" else _integer_range(stage, "n_mlp_layers")
    for name, spec in stage.params.items():
        match = _NODES_PATTERN.match(name)
        optional = match is not None and layers is not None and int(match.group(1)) > layers[0]
        if spec.when is not None and not optional:
            checker.fail(
                path + ("params", name, "when"),
                f"{name} is needed by every trial, so it cannot be conditional",
                value=spec.when.to_dict(),
                fix="Remove when.",
            )

    if model == "convae":
        _check_convae_width(checker, stage, path)
    else:
        _check_realnvp_layers(checker, stage, path)


def _check_convae_width(checker: _Checker, stage: Stage, path: tuple) -> None:
    """Reject spaces in which some trials would have no particle positions left after the convolutions."""
    kernel = _integer_range(stage, "kernel_size")
    layers = _integer_range(stage, "n_conv_layers")
    if kernel is None or layers is None:
        return
    width = _N_PARTICLES - layers[1] * (kernel[1] - 1)
    if width < 1:
        checker.fail(
            path,
            f"kernel_size up to {kernel[1]} with n_conv_layers up to {layers[1]} leaves {width} of the "
            f"{_N_PARTICLES} particle positions after the convolutions, but the ConVAE needs at least 1",
            value={"kernel_size": kernel[1], "n_conv_layers": layers[1]},
            fix="Lower the upper bound of kernel_size or of n_conv_layers.",
        )


def _check_realnvp_layers(checker: _Checker, stage: Stage, path: tuple) -> None:
    """Require nodes_i only for layers that exist, conditional on n_mlp_layers where needed."""
    lowest, highest = _integer_range(stage, "n_mlp_layers")
    for name in [*stage.params, *stage.fixed]:
        match = _NODES_PATTERN.match(name)
        if not match:
            continue
        layer = int(match.group(1))
        key = "params" if name in stage.params else "fixed"
        if layer > highest:
            checker.fail(
                path + (key, name),
                f"{name} is never used, because n_mlp_layers is at most {highest}",
                value=name,
                fix=f"Remove {name} or raise the upper bound of n_mlp_layers.",
            )
        if key == "params" and layer > lowest:
            expected = Condition("n_mlp_layers", at_least=layer)
            spec = stage.params[name]
            if spec.when != expected:
                checker.fail(
                    path + ("params", name, "when"),
                    f"{name} is used only by trials with n_mlp_layers >= {layer}",
                    value=spec.when.to_dict() if spec.when else None,
                    fix=f"Tune n_mlp_layers in this stage and add when: {{param: n_mlp_layers, at_least: {layer}}}.",
                )


@functools.lru_cache(maxsize=256)
def parse_space(text: str, source: str) -> Space:
    """Parse and validate the YAML text of a search space.

    Results are cached by text and source, because every worker step reads the stored
    spaces again, and parsing took about 20 ms per trial (``bench/orchestration.py``). A
    Space is a frozen dataclass, so the cached object is shared, never changed.

    Args:
        text: YAML text in the schema of this module's docstring.
        source: File path or label that error messages name.

    Returns:
        The search space, keeping ``text`` as given.

    Raises:
        SpaceError: for the first problem found, with the file, line, key path and value.
    """
    checker = _Checker(source, SpaceError, "search space")
    document = checker.read(text)
    top = checker.mapping(
        document,
        (),
        required=("name", "model", "objective", "stages"),
        optional=("description", "latents_from", "sampler", "pruner"),
        entry_kind="search space",
    )

    # family
    name = checker.identifier(top["name"], ("name",), "search space name")
    description = checker.text(top["description"], ("description",)) if "description" in top else ""
    model = checker.choice(top["model"], ("model",), MODEL_KINDS, "model kind")
    objective = checker.choice(top["objective"], ("objective",), OBJECTIVES, "objective")
    if model != "convae" and objective != "generation":
        checker.fail(
            ("objective",),
            f"a {model} flow has no reconstruction",
            value=objective,
            fix="Use objective: generation.",
        )

    latents_from = None
    if model == "realnvp-latent":
        if "latents_from" not in top:
            checker.fail(
                (),
                "missing key 'latents_from' for model realnvp-latent",
                fix="Name the convae search space whose retrained model gives the latents.",
            )
        latents_from = checker.identifier(top["latents_from"], ("latents_from",), "search space name")
    elif "latents_from" in top:
        checker.fail(
            ("latents_from",),
            f"latents_from applies only to model realnvp-latent, not {model}",
            value=top["latents_from"],
            fix="Remove it.",
        )

    sampler = _parse_sampler(checker, top)
    pruner = _parse_pruner(checker, top)

    # stages
    raw_stages = top["stages"]
    if not isinstance(raw_stages, list) or not raw_stages:
        checker.fail(("stages",), "expected a non-empty list of stages", value=raw_stages)
    all_names = [raw.get("name") for raw in raw_stages if isinstance(raw, dict)]
    stages: dict[str, Stage] = {}
    for index, raw_stage in enumerate(raw_stages):
        stage = _parse_stage(checker, raw_stage, index, name, stages, all_names)
        _check_model_parameters(checker, model, stage, index)
        stages[stage.name] = stage

    return Space(
        name=name,
        model=model,
        objective=objective,
        stages=tuple(stages.values()),
        sampler=sampler,
        pruner=pruner,
        latents_from=latents_from,
        description=description,
        source=source,
        text=text,
    )


def _read_text(path: str | Path, error: type[ConfigError]) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise error(str(path), "", "file not found", fix="Check the path.") from exc
    except UnicodeDecodeError as exc:
        raise error(str(path), "", f"not UTF-8 text: {exc}", fix="Save the file as UTF-8.") from exc
    except OSError as exc:
        raise error(
            str(path),
            "",
            f"cannot read the file: {exc.strerror}",
            fix="Check the path and its permissions.",
        ) from exc


def load_space(path: str | Path) -> Space:
    """Read and validate a search space file.

    Raises:
        SpaceError: if the file cannot be read or is invalid. The message names the path.
    """
    return parse_space(_read_text(path, SpaceError), str(path))


def _packaged_files(folder: str) -> list[tuple[str, str]]:
    """Return ``(source label, text)`` of each YAML file shipped in ``hpo/<folder>``."""
    directory = resources.files("hpo") / folder
    entries = sorted(
        (entry for entry in directory.iterdir() if entry.name.endswith(".yaml")),
        key=lambda entry: entry.name,
    )
    return [(f"hpo/{folder}/{entry.name}", entry.read_text(encoding="utf-8")) for entry in entries]


def check_space_references(spaces: Mapping[str, Space]) -> None:
    """Check that every ``latents_from`` names a convae search space among ``spaces``.

    Raises:
        SpaceError: naming the realnvp-latent space and its latents_from value.
    """
    for space in spaces.values():
        if space.latents_from is None:
            continue
        target = spaces.get(space.latents_from)
        if target is None:
            raise SpaceError(
                space.source,
                "latents_from",
                "no search space has this name",
                space.latents_from,
                f"Use one of {', '.join(name for name, other in spaces.items() if other.model == 'convae')}.",
            )
        if target.model != "convae":
            raise SpaceError(
                space.source,
                "latents_from",
                f"search space {target.name!r} has model {target.model}, not convae",
                space.latents_from,
                "Name a convae search space.",
            )


def builtin_spaces() -> dict[str, Space]:
    """Parse the search spaces shipped in ``hpo/spaces/``, keyed by name.

    Raises:
        SpaceError: if a shipped file is invalid, is named differently from its ``name``,
            or has a latents_from that names no shipped convae space.
    """
    spaces: dict[str, Space] = {}
    for source, text in _packaged_files("spaces"):
        space = parse_space(text, source)
        expected = Path(source).stem
        if space.name != expected:
            raise SpaceError(
                source,
                "name",
                f"a shipped search space must be named after its file, {expected!r}",
                space.name,
                "Rename the file or the space.",
            )
        spaces[space.name] = space
    check_space_references(spaces)
    return spaces


def study_name(space: Space, stage: Stage | str) -> str:
    """Return the Optuna study name of a stage, ``<space>.<stage>``, such as ``convae-gen.loss``.

    Raises:
        SpaceError: if the stage is not part of the space.
    """
    stage_name = stage.name if isinstance(stage, Stage) else stage
    return space.stage(stage_name).study_name


# profiles


@dataclass(frozen=True)
class Resources:
    """Ray resources that one trial or retraining requests.

    Attributes:
        cpus: CPU cores, above 0.
        gpus: GPUs, 0 or more. Fractions share a GPU between trials.
    """

    cpus: float
    gpus: float


@dataclass(frozen=True)
class SearchBudget:
    """Budget of one search stage.

    Attributes:
        n_trials: Trials of the stage's study.
        epochs: Training epochs per trial.
        batch_size: Jets per training batch.
        eval_every: Epochs between EMD_sum evaluations on the validation jets.
        resources: Ray resources per trial.
    """

    n_trials: int
    epochs: int
    batch_size: int
    eval_every: int
    resources: Resources


@dataclass(frozen=True)
class RetrainBudget:
    """Budget of the retraining of a family's best trial.

    Attributes:
        epochs: Training epochs.
        batch_size: Jets per training batch.
        eval_every: Epochs between EMD_sum evaluations that choose the kept checkpoint.
        resources: Ray resources of the retraining.
    """

    epochs: int
    batch_size: int
    eval_every: int
    resources: Resources


_SEARCH_KEYS = ("n_trials", "epochs", "batch_size", "eval_every", "resources")
_RETRAIN_KEYS = ("epochs", "batch_size", "eval_every", "resources")


def _parse_budget_entries(
    checker: _Checker,
    raw: Any,
    path: tuple,
    keys: tuple,
    *,
    complete: bool,
    entry_kind: str,
) -> dict[str, Any]:
    """Check budget keys and values. Overrides (complete=False) may leave keys out."""
    entry = checker.mapping(
        raw,
        path,
        required=keys if complete else (),
        optional=() if complete else keys,
        entry_kind=entry_kind,
    )
    values: dict[str, Any] = {}
    for key, value in entry.items():
        if key == "resources":
            resources_entry = checker.mapping(
                value,
                path + (key,),
                required=("cpus", "gpus") if complete else (),
                optional=() if complete else ("cpus", "gpus"),
                entry_kind="resources per trial",
            )
            parsed = {}
            for resource, amount in resources_entry.items():
                number = checker.number(amount, path + (key, resource))
                if resource == "cpus" and number <= 0 or number < 0:
                    checker.fail(
                        path + (key, resource),
                        f"expected {'a positive' if resource == 'cpus' else 'a non-negative'} number",
                        value=amount,
                    )
                parsed[resource] = amount
            values[key] = parsed
        else:
            values[key] = checker.integer(value, path + (key,), minimum=1)
    return values


def _build_budget(checker: _Checker, budget_type: type, values: dict[str, Any], path: tuple):
    if values["eval_every"] > values["epochs"]:
        checker.fail(
            path + ("eval_every",),
            f"eval_every is above epochs = {values['epochs']}, so training would never evaluate EMD_sum",
            value=values["eval_every"],
            fix="Lower eval_every or raise epochs.",
        )
    return budget_type(**{**values, "resources": Resources(**values["resources"])})


def _merge_budget(base: dict[str, Any], *overrides: dict[str, Any]) -> dict[str, Any]:
    merged = {**base, "resources": dict(base["resources"])}
    for override in overrides:
        for key, value in override.items():
            if key == "resources":
                merged["resources"].update(value)
            else:
                merged[key] = value
    return merged


@dataclass(frozen=True)
class Profile:
    """Run profile: jets, trials, epochs, batch sizes and resources of a whole pipeline.

    Attributes:
        name: Profile name.
        n_jets: Jets read before the train/validation/test split, or None for all. One
            number for all families, so that every model is tested on the same test jets.
        models: Per model kind, the complete ``search`` and ``retrain`` entries.
        families: Per family name, partial overrides in ``search``, ``stages`` and ``retrain``.
        description: Free text.
        source: File path or label of the text.
        text: The YAML text as given.
    """

    name: str
    n_jets: int | None
    models: dict[str, dict[str, dict[str, Any]]]
    families: dict[str, dict[str, Any]] = field(default_factory=dict)
    description: str = ""
    source: str = field(default="", compare=False, repr=False)
    text: str = field(default="", compare=False, repr=False)

    def search_budget(self, space: Space, stage: Stage | str) -> SearchBudget:
        """Return the budget of one stage: the model kind's entry with the family's overrides.

        Raises:
            ProfileError: if the family overrides name a stage that the space does not have,
                or the merged budget evaluates less often than once.
            SpaceError: if the stage is not part of the space.
        """
        stage_name = space.stage(stage.name if isinstance(stage, Stage) else stage).name
        family = self._family_overrides(space)
        values = _merge_budget(
            self.models[space.model]["search"],
            family.get("search", {}),
            family.get("stages", {}).get(stage_name, {}),
        )
        checker = _Checker(self.source, ProfileError, "profile")
        return _build_budget(checker, SearchBudget, values, ("families", space.name, "stages", stage_name))

    def retrain_budget(self, space: Space) -> RetrainBudget:
        """Return the budget of the retraining of a family's best trial.

        Raises:
            ProfileError: as for :meth:`search_budget`.
        """
        family = self._family_overrides(space)
        values = _merge_budget(self.models[space.model]["retrain"], family.get("retrain", {}))
        checker = _Checker(self.source, ProfileError, "profile")
        return _build_budget(checker, RetrainBudget, values, ("families", space.name, "retrain"))

    def _family_overrides(self, space: Space) -> dict[str, Any]:
        family = self.families.get(space.name, {})
        for stage_name in family.get("stages", {}):
            if stage_name not in {stage.name for stage in space.stages}:
                raise ProfileError(
                    self.source,
                    _format_path(("families", space.name, "stages", stage_name)),
                    f"search space {space.name!r} has no such stage",
                    stage_name,
                    f"Use one of {', '.join(stage.name for stage in space.stages)}.",
                )
        return family


def parse_profile(text: str, source: str) -> Profile:
    """Parse and validate the YAML text of a run profile.

    Args:
        text: YAML text in the profile schema of this module's docstring.
        source: File path or label that error messages name.

    Raises:
        ProfileError: for the first problem found, with the file, line, key path and value.
    """
    checker = _Checker(source, ProfileError, "profile")
    document = checker.read(text)
    top = checker.mapping(
        document,
        (),
        required=("name", "n_jets", "models"),
        optional=("description", "families"),
        entry_kind="profile",
    )

    name = checker.identifier(top["name"], ("name",), "profile name")
    description = checker.text(top["description"], ("description",)) if "description" in top else ""
    n_jets = None if top["n_jets"] is None else checker.integer(top["n_jets"], ("n_jets",), minimum=3)

    # complete budgets per model kind
    models_entry = checker.mapping(
        top["models"],
        ("models",),
        required=MODEL_KINDS,
        entry_kind="budgets per model kind",
    )
    models: dict[str, dict[str, dict[str, Any]]] = {}
    for model in MODEL_KINDS:
        path = ("models", model)
        entry = checker.mapping(
            models_entry[model],
            path,
            required=("search", "retrain"),
            entry_kind=f"{model} budgets",
        )
        search = _parse_budget_entries(
            checker,
            entry["search"],
            path + ("search",),
            _SEARCH_KEYS,
            complete=True,
            entry_kind="search budget",
        )
        retrain = _parse_budget_entries(
            checker,
            entry["retrain"],
            path + ("retrain",),
            _RETRAIN_KEYS,
            complete=True,
            entry_kind="retrain budget",
        )
        _build_budget(checker, SearchBudget, search, path + ("search",))
        _build_budget(checker, RetrainBudget, retrain, path + ("retrain",))
        models[model] = {"search": search, "retrain": retrain}

    # partial overrides per family
    families_entry = top.get("families") or {}
    if not isinstance(families_entry, dict):
        checker.fail(("families",), "expected a mapping of search space names to overrides", value=families_entry)
    families: dict[str, dict[str, Any]] = {}
    for family_name, raw in families_entry.items():
        path = ("families", family_name)
        checker.identifier(family_name, path, "search space name")
        entry = checker.mapping(raw, path, optional=("search", "stages", "retrain"), entry_kind="family overrides")
        overrides: dict[str, Any] = {}
        if "search" in entry:
            overrides["search"] = _parse_budget_entries(
                checker,
                entry["search"],
                path + ("search",),
                _SEARCH_KEYS,
                complete=False,
                entry_kind="search budget",
            )
        if "retrain" in entry:
            overrides["retrain"] = _parse_budget_entries(
                checker,
                entry["retrain"],
                path + ("retrain",),
                _RETRAIN_KEYS,
                complete=False,
                entry_kind="retrain budget",
            )
        if "stages" in entry:
            if not isinstance(entry["stages"], dict):
                checker.fail(
                    path + ("stages",),
                    "expected a mapping of stage names to overrides",
                    value=entry["stages"],
                )
            for stage_name in entry["stages"]:
                checker.identifier(stage_name, path + ("stages", stage_name), "stage name")
            overrides["stages"] = {
                stage_name: _parse_budget_entries(
                    checker,
                    stage_raw,
                    path + ("stages", stage_name),
                    _SEARCH_KEYS,
                    complete=False,
                    entry_kind="stage budget",
                )
                for stage_name, stage_raw in entry["stages"].items()
            }
        families[family_name] = overrides

    return Profile(
        name=name,
        n_jets=n_jets,
        models=models,
        families=families,
        description=description,
        source=source,
        text=text,
    )


def builtin_profile_names() -> list[str]:
    """Return the names of the profiles shipped in ``hpo/profiles/``, sorted."""
    return [Path(source).stem for source, _ in _packaged_files("profiles")]


def builtin_profiles() -> dict[str, Profile]:
    """Parse the profiles shipped in ``hpo/profiles/``, keyed by name.

    Raises:
        ProfileError: if a shipped file is invalid or named differently from its ``name``.
    """
    profiles: dict[str, Profile] = {}
    for source, text in _packaged_files("profiles"):
        profile = parse_profile(text, source)
        expected = Path(source).stem
        if profile.name != expected:
            raise ProfileError(
                source,
                "name",
                f"a shipped profile must be named after its file, {expected!r}",
                profile.name,
                "Rename the file or the profile.",
            )
        profiles[profile.name] = profile
    return profiles


def load_profile(name_or_path: str | Path) -> Profile:
    """Load a shipped profile by name (paper, quick, smoke) or a profile file by path.

    A string without a path separator and without a ``.yaml`` or ``.yml`` suffix is a name.

    Raises:
        ProfileError: for an unknown name, an unreadable file or an invalid profile.
    """
    text = str(name_or_path)
    has_separator = "/" in text or "\\" in text
    is_path = isinstance(name_or_path, Path) or has_separator or text.endswith((".yaml", ".yml"))
    if not is_path:
        profiles = builtin_profiles()
        if text not in profiles:
            raise ProfileError(
                f"profile {text!r}",
                "",
                "not found",
                fix=f"Use one of {', '.join(profiles)}, or pass the path of a profile YAML file.",
            )
        return profiles[text]
    return parse_profile(_read_text(name_or_path, ProfileError), text)
