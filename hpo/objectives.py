"""Trial objectives: train one ConVAE or RealNVP from a trial's parameters and score it by
the validation EMD_sum.

A search space's ``model`` and ``objective`` select one of four objectives:

- ``convae`` + ``generation``: jets decoded from z ~ N(0, 1).
- ``convae`` + ``reconstruction``: the decoded encoder means of the validation jets.
- ``realnvp-latent``: a RealNVP learns the encoder means of the training and validation
  jets under a trained ConVAE (``latent_model``). Jets are z ~ N(0, 1) mapped through the
  flow's inverse and the ConVAE decoder.
- ``realnvp-flat``: a RealNVP learns the flattened 90-value scaled jet
  (``models.training.flatten_jets``), and its samples are the jets.

Each objective reports the EMD_sum between its jets and the validation jets every
``budget.eval_every`` epochs, and the study minimizes it. :func:`run_trial` runs one Optuna
trial with ``Study.ask`` and ``Study.tell`` and turns model failures into FAIL trials with a
``fail_reason`` user attribute, so that one bad trial never stops a worker.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import gc
import hashlib
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from torch import Tensor

from hpo.spaces import RetrainBudget, SearchBudget, Space, SpaceError, Stage, realnvp_hidden_sizes
from models.convae import ConVAE, ConVAEConfig
from models.data import MIN_JETS, JetDataError, MinMaxScaler, Splits, read_jets, split_jets
from models.losses import LossWeights, gamma_m_range
from models.realnvp import RealNVP
from models.training import (
    EpochCallback,
    NonFiniteLossError,
    TrainingResult,
    flatten_jets,
    train_convae,
    train_realnvp,
    unflatten_jets,
)
from storage.rdb import record_heartbeats, set_trial_user_attrs

try:
    # NOTE: private, see _tell. Study.optimize of Optuna 5.0 and 5.1 calls it.
    from optuna.study._tell import _tell_with_warning
except ImportError:  # pragma: no cover, only a later Optuna
    _tell_with_warning = None

__all__ = [
    "FAIL_REASONS",
    "TrialData",
    "TrialFailure",
    "check_device",
    "encode_latents",
    "prepare_data",
    "run_trial",
    "train_params",
    "trial_seed",
]

logger = logging.getLogger(__name__)

#: Values of a FAIL trial's ``fail_reason`` user attribute:
#:
#: - ``nan_loss``: the training loss became NaN or infinite, or no validation evaluation
#:   gave a finite EMD_sum because the model's jets were NaN or infinite.
#: - ``invalid_architecture``: the model cannot be built from the parameters, such as a
#:   ConVAE kernel wider than the jet or a RealNVP on a 1-dimensional latent space.
#: - ``out_of_memory``: an allocation failed on the CPU or the GPU.
#: - ``error``: any other exception, or a KeyboardInterrupt. ``fail_message`` names it.
#: - ``interrupted``: the controller was stopped with Ctrl-C or SIGTERM and handed the
#:   trial back, so that a retry with the same parameters runs in the next run.
FAIL_REASONS = ("nan_loss", "invalid_architecture", "out_of_memory", "error", "interrupted")

_CONVAE_ARCHITECTURE = (
    "latent_dim",
    "n_filters",
    "kernel_size",
    "linear_nodes",
    "n_conv_layers",
    "activation",
)
_CONVAE_LOSS_WEIGHTS = ("alpha", "beta", "gamma", "gamma_pt", "gamma_m")
_REALNVP_PARAMS = ("lr", "n_flows", "n_mlp_layers")
_ENCODE_BATCH_SIZE = 4096

# Study.ask emits this UserWarning whenever the storage records heartbeats, although
# run_trial records them itself with storage.rdb.record_heartbeats.
_HEARTBEAT_WARNING = r"Heartbeat of storage is supposed to be used with Study\.optimize"


class TrialFailure(Exception):
    """Known model failure that ends a trial as FAIL.

    Attributes:
        reason: One of :data:`FAIL_REASONS`.
        message: What failed and what to change, also returned by ``str()``.
    """

    def __init__(self, reason: str, message: str) -> None:
        if reason not in FAIL_REASONS:
            raise ValueError(
                f"invalid trial failure reason {reason!r}, expected one of {', '.join(FAIL_REASONS)}"
            )
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        # the default would call TrialFailure(message) without the reason, for example
        # when Ray sends the exception to another process
        return (type(self), (self.reason, self.message))


# data


@dataclass
class TrialData:
    """Jets prepared once per worker and shared by all of its trials.

    Attributes:
        path: The jets file or directory as given to :func:`prepare_data`.
        splits: Train, validation and test jets in GeV. Trials use train and validation
            only, and the test split is kept for the final evaluation.
        scaler: Min-max scaler fitted on the real constituents of the training jets.
        train: float32 ``[n_train, 30, 3]`` scaled (px, py, pz) training jets on ``device``.
        validation: float32 ``[n_validation, 30, 3]`` scaled validation jets on ``device``.
        validation_gev: float32 ``[n_validation, 30, 3]`` (px, py, pz) in GeV, the
            reference sample of every EMD_sum.
        fingerprint: SHA-256 hex digest of the data set used: the fingerprint of the file's
            jets, the number of jets used and the split seed (see :func:`prepare_data`).
        statistics: Statistics of the training jets that ``from_data`` parameters need,
            ``{"pt_over_mass": mean jet pT / mean jet mass}`` (dimensionless).
        device: Torch device of the tensors, such as ``"cpu"`` or ``"cuda:0"``.
    """

    path: str
    splits: Splits
    scaler: MinMaxScaler
    train: Tensor
    validation: Tensor
    validation_gev: np.ndarray
    fingerprint: str
    statistics: dict[str, float]
    device: str


class TooFewJetsError(JetDataError):
    """A jets file that contains fewer jets than requested.

    Attributes:
        path: The file.
        available: Jets in the file.
        requested: The ``n_jets`` requested.
    """

    def __init__(self, path: str, available: int, requested: int) -> None:
        super().__init__(
            f"{path}: contains {available} jets, but n_jets={requested} were requested. "
            f"Pass n_jets of at most {available}, or make more jets with `jethpo data generate`."
        )
        self.path = path
        self.available = available
        self.requested = requested


def prepare_data(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    n_jets: int | None = None,
    device: str = "cpu",
) -> TrialData:
    """Read jets, split them, fit the scaler and move the scaled jets to the device.

    With ``n_jets``, the first ``n_jets`` jets of the file are used before the split, so a
    different ``seed`` splits the same jets differently. The same file, ``n_jets`` and
    ``seed`` give the same train, validation and test jets on every machine. The first jets
    are a fair sample of a file that stores jets in event order, as ``jethpo data generate``
    does. NOTE: a file sorted by a jet property, such as pT, would bias them. JetNet and
    HLS4ML files were not checked for such an order.

    Args:
        path: A jets file or directory that ``models.data.read_jets`` reads.
        seed: Seed of the 70/15/15 train/validation/test split.
        n_jets: Number of jets to use, or None for all jets of the file.
        device: Torch device for the tensors, such as ``"cpu"``, ``"cuda"`` or ``"cuda:1"``.

    Returns:
        The prepared jets. ``statistics["pt_over_mass"]`` is the centre of the
        ``models.losses.gamma_m_range`` of the training jets, which is also the centre of
        a search space's ``gamma_m: {from_data: pt_over_mass}`` range.

    Raises:
        JetDataError: The file is unreadable, contains fewer than ``n_jets`` jets, or
            ``n_jets`` is below ``models.data.MIN_JETS``.
        ValueError: The device is invalid or not available, or the seed is negative.
    """
    torch_device = check_device(device)
    data = read_jets(path)

    # selection
    n_available = len(data)
    if n_jets is not None:
        if isinstance(n_jets, bool) or not isinstance(n_jets, (int, np.integer)) or n_jets < MIN_JETS:
            raise JetDataError(
                f"{data.path}: n_jets={n_jets!r} is invalid, expected an integer of at least {MIN_JETS} "
                f"so that every split gets a jet. Pass a larger n_jets, or none to use all jets."
            )
        if n_jets > n_available:
            raise TooFewJetsError(data.path, n_available, n_jets)
        used = data.subset(np.arange(n_jets)) if n_jets < n_available else data
    else:
        used = data

    # split and scaling
    splits = split_jets(used, seed)
    scaler = MinMaxScaler().fit(splits.train.constituents, splits.train.mask)
    train = torch.as_tensor(scaler.transform(splits.train.constituents), dtype=torch.float32).to(torch_device)
    validation = torch.as_tensor(scaler.transform(splits.validation.constituents), dtype=torch.float32)
    validation = validation.to(torch_device)

    # statistics: spread 0 gives the centre of gamma_m_range twice
    pt_over_mass, _ = gamma_m_range(splits.train.constituents, splits.train.mask, spread=0.0)

    fingerprint = _data_fingerprint(data.fingerprint, len(used), seed)
    logger.info(
        "Prepared %d of %d jets from %s on %s: %d train, %d validation, %d test (split seed %d)",
        len(used),
        n_available,
        data.path,
        torch_device,
        len(splits.train),
        len(splits.validation),
        len(splits.test),
        seed,
    )
    return TrialData(
        path=str(path),
        splits=splits,
        scaler=scaler,
        train=train,
        validation=validation,
        validation_gev=splits.validation.constituents,
        fingerprint=fingerprint,
        statistics={"pt_over_mass": float(pt_over_mass)},
        device=str(torch_device),
    )


def check_device(device: str) -> torch.device:
    """Return ``device`` as a torch device, or raise ValueError that names the devices PyTorch finds."""
    try:
        torch_device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"invalid device {device!r} ({error}). Use cpu, cuda or cuda:N.") from None
    if torch_device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested, but PyTorch finds no CUDA GPU. Use cpu.")
        if torch_device.index is not None and torch_device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r} not found: PyTorch finds {torch.cuda.device_count()} CUDA GPUs. "
                f"Use cuda:0 to cuda:{torch.cuda.device_count() - 1}."
            )
    return torch_device


def _data_fingerprint(file_fingerprint: str, n_jets: int, split_seed: int) -> str:
    description = {"jets": file_fingerprint, "n_jets": n_jets, "selection": "first", "split_seed": split_seed}
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode("utf-8")).hexdigest()


@torch.no_grad()
def encode_latents(model: ConVAE, jets_scaled: Tensor, batch_size: int = _ENCODE_BATCH_SIZE) -> Tensor:
    """Encode jets into the means of the ConVAE's latent Gaussian.

    Args:
        model: The ConVAE, on the device of ``jets_scaled``. It runs in eval mode for the
            call and returns to its previous mode afterwards.
        jets_scaled: ``[n, 30, 3]`` scaled (px, py, pz).
        batch_size: Jets per encoder call, which bounds the memory of one call.

    Returns:
        ``[n, latent_dim]`` encoder means on the device of ``jets_scaled``.
    """
    was_training = model.training
    model.eval()
    try:
        means = [model.encode(batch)[0] for batch in jets_scaled.split(batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(means)


# training


def trial_seed(study_name: str, trial_number: int) -> int:
    """Derive a trial's seed from its study name and trial number.

    Returns:
        An integer in [0, 2**31): the first four bytes of the SHA-256 digest of
        ``"<study_name>/<trial_number>"`` with the top bit cleared. It is the same on every
        machine and in every Python process.
    """
    digest = hashlib.sha256(f"{study_name}/{trial_number}".encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFF_FFFF


def _retried_seed(trial: optuna.Trial) -> int | None:
    """Return the seed of the trial that ``trial`` retries, or None for a trial that retries none.

    Optuna's retry callback copies the user attributes of the failed trial, which include
    the seed that :func:`run_trial` stored before training. So a trial retried after its
    worker died or a storage request failed trains with the seed of the trial it retries.
    """
    seed = trial.user_attrs.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**31:
        return seed
    return None


def train_params(
    space: Space,
    params: Mapping[str, Any],
    budget: SearchBudget | RetrainBudget,
    data: TrialData,
    *,
    seed: int,
    report: EpochCallback | None = None,
    latent_model: ConVAE | None = None,
    latents: Tensor | None = None,
    resume: dict | None = None,
    on_state: Callable[[dict], None] | None = None,
) -> TrainingResult:
    """Build the model of a search space from parameters, train it and score it.

    The model is built on the CPU after ``torch.manual_seed(seed)``, so one seed gives the
    same initial weights on every device, and then moved to ``data.device``.

    Args:
        space: Its ``model`` and ``objective`` select the objective.
        params: Every parameter of the model, tuned, fixed and inherited, such as
            ``Stage.suggest`` returns.
        budget: Epochs, batch size and epochs between EMD_sum evaluations.
        data: The prepared jets.
        seed: Seeds the initial weights, batch order, noise and generated jets.
        report: Receives ``(epoch, validation EMD_sum)`` after each evaluation. It may raise
            ``optuna.TrialPruned``, which propagates unchanged.
        latent_model: For ``realnvp-latent`` only, the trained ConVAE whose encoder means
            the flow learns and whose decoder makes the jets. It is moved to ``data.device``.
        latents: For ``realnvp-latent`` only, ``[n_train + n_validation, latent_dim]``
            encoder means of the training then the validation jets under ``latent_model``,
            such as the ``latents`` step stores them. Without it they are encoded here.
        resume: Training state from ``on_state`` of an interrupted run of the same
            parameters, data and seed; training continues after its epoch.
        on_state: Receives the full training state after each evaluation, for resuming.

    Returns:
        The best validation EMD_sum, its epoch, the evaluation history and the checkpoint.

    Raises:
        TrialFailure: with reason ``nan_loss``, ``invalid_architecture`` or ``out_of_memory``.
        SpaceError: ``params`` lacks a parameter of the model.
        ValueError: ``latent_model`` is missing for ``realnvp-latent``, or the loss weights
            are invalid (``models.losses.LossWeightsError``).
        optuna.TrialPruned: raised by ``report``.
    """
    _check_params(space, params)
    if space.model == "realnvp-latent" and latent_model is None:
        raise ValueError(
            f"search space {space.name!r} trains a flow on ConVAE latents, but no latent_model "
            f"was passed. Pass the retrained ConVAE of {space.latents_from!r}."
        )

    torch.manual_seed(seed)
    out_of_memory = None
    try:
        resuming = {"resume": resume, "on_state": on_state}
        if space.model == "convae":
            result = _train_convae_params(space, params, budget, data, seed, report, resuming)
        else:
            result = _train_realnvp_params(space, params, budget, data, seed, report, latent_model, latents, resuming)
    except NonFiniteLossError as error:
        raise TrialFailure("nan_loss", str(error)) from error
    except Exception as error:
        if not _is_out_of_memory(error):
            raise
        out_of_memory = (
            f"{space.model} ran out of memory on {data.device} ({error}). Lower the batch size "
            f"or the model size, or give the trial more memory."
        )
    if out_of_memory is not None:
        # The exception and its frames, which held the model, are gone after the except block.
        _free_memory()
        raise TrialFailure("out_of_memory", out_of_memory)

    if not math.isfinite(result.best_emd_sum):
        raise TrialFailure(
            "nan_loss",
            f"{space.model} produced NaN or infinite jets at every evaluation "
            f"(validation EMD_sum {[value for _, value in result.history]}), so no checkpoint "
            f"was kept. Lower the learning rate or make the model smaller.",
        )
    return result


def _check_params(space: Space, params: Mapping[str, Any]) -> None:
    if space.model == "convae":
        required = ["lr", *_CONVAE_ARCHITECTURE, *_CONVAE_LOSS_WEIGHTS]
    else:
        required = list(_REALNVP_PARAMS)
        layers = params.get("n_mlp_layers")
        if isinstance(layers, int) and not isinstance(layers, bool):
            required += [f"nodes_{layer}" for layer in range(1, layers + 1)]
    missing = [name for name in required if name not in params]
    if missing:
        raise SpaceError(
            f"parameters for {space.name}",
            missing[0],
            f"missing parameters {', '.join(missing)} of model {space.model}",
            fix="Pass the full parameters of the trial, including fixed and inherited ones.",
        )


def _build(description: str, factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    # ConVAEConfigError and RealNVPConfigError are ValueErrors
    try:
        return factory()
    except ValueError as error:
        raise TrialFailure("invalid_architecture", f"invalid {description}: {error}") from error


def _train_convae_params(
    space: Space,
    params: Mapping[str, Any],
    budget: SearchBudget | RetrainBudget,
    data: TrialData,
    seed: int,
    report: EpochCallback | None,
    resuming: Mapping[str, Any],
) -> TrainingResult:
    # Invalid loss weights are no architecture problem, so their LossWeightsError propagates.
    weights = LossWeights(**{name: params[name] for name in _CONVAE_LOSS_WEIGHTS})
    model = _build(
        "ConVAE architecture",
        lambda: ConVAE(ConVAEConfig(**{name: params[name] for name in _CONVAE_ARCHITECTURE})),
    )
    return train_convae(
        model.to(data.device),
        data.train,
        data.validation,
        data.scaler,
        weights,
        objective=space.objective,
        epochs=budget.epochs,
        batch_size=budget.batch_size,
        lr=params["lr"],
        seed=seed,
        data_fingerprint=data.fingerprint,
        eval_every=budget.eval_every,
        callback=report,
        **resuming,
    )


def _train_realnvp_params(
    space: Space,
    params: Mapping[str, Any],
    budget: SearchBudget | RetrainBudget,
    data: TrialData,
    seed: int,
    report: EpochCallback | None,
    latent_model: ConVAE | None,
    latents: Tensor | None,
    resuming: Mapping[str, Any],
) -> TrainingResult:
    # inputs and decoder
    extra_checkpoint = None
    if space.model == "realnvp-latent":
        latent_model = latent_model.to(data.device)
        # the flow learns the latents of the training and the validation jets
        if latents is not None:
            inputs = latents.to(data.device)
        else:
            inputs = torch.cat(
                [encode_latents(latent_model, data.train), encode_latents(latent_model, data.validation)]
            )
        decode = latent_model.decode

        # the checkpoint keeps the ConVAE too, so that it alone can generate jets
        convae_state = {
            name: tensor.detach().to("cpu", copy=True) for name, tensor in latent_model.state_dict().items()
        }
        extra_checkpoint = {
            "latent_model": {
                "hyperparameters": dataclasses.asdict(latent_model.config),
                "state_dict": convae_state,
            }
        }
    else:
        inputs = flatten_jets(data.train)
        decode = unflatten_jets

    flow = _build(
        "RealNVP architecture",
        lambda: RealNVP(
            dim=inputs.shape[1], n_flows=params["n_flows"], hidden_sizes=realnvp_hidden_sizes(params)
        ),
    )
    return train_realnvp(
        flow.to(data.device),
        inputs,
        decode,
        data.validation_gev,
        data.scaler,
        epochs=budget.epochs,
        batch_size=budget.batch_size,
        lr=params["lr"],
        seed=seed,
        data_fingerprint=data.fingerprint,
        eval_every=budget.eval_every,
        callback=report,
        extra_checkpoint=extra_checkpoint,
        **resuming,
    )


def _is_out_of_memory(error: BaseException) -> bool:
    # torch.OutOfMemoryError is also torch.cuda.OutOfMemoryError
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    # PyTorch 2.13 reports a failed CPU allocation as a plain RuntimeError of DefaultCPUAllocator
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


# trials


def run_trial(
    study: optuna.Study,
    space: Space,
    stage: Stage,
    budget: SearchBudget,
    data: TrialData,
    *,
    inherited: Mapping[str, Any],
    latent_model: ConVAE | None = None,
    latents: Tensor | None = None,
    storage: optuna.storages.BaseStorage | None = None,
    user_attrs: Mapping[str, Any] | None = None,
    fail_stale: bool = True,
) -> FrozenTrial:
    """Ask the study for a trial, train its model and tell the study the result.

    The trial ends as one of:

    - COMPLETE with the best validation EMD_sum of the run;
    - PRUNED when the study's pruner stops it after an evaluation. Optuna stores the last
      intermediate value as the trial's value;
    - FAIL with the user attributes ``fail_reason`` (one of :data:`FAIL_REASONS`) and
      ``fail_message``, logged at WARNING with the study name and trial number.

    Every trial gets the user attributes ``seed`` (:func:`trial_seed`, or for a retried trial
    the seed of the trial it retries), ``data_fingerprint``,
    ``device`` and ``wall_time_s`` (seconds from ask to tell), and ``params``, the full
    parameters with fixed and inherited values, once the stage has suggested them. A
    COMPLETE trial also gets ``best_epoch``. The attributes are written in two groups, one
    once the parameters are suggested and one with the result, each in one transaction
    where the storage is an ``RDBStorage`` (:func:`storage.set_trial_user_attrs`).

    When the storage records heartbeats, stale trials of the study are failed first, as
    ``Study.optimize`` does, so that the storage's retry callback re-queues them, and the
    trial's heartbeat is recorded while it trains.

    Args:
        study: The study of ``stage``.
        space: The search space of ``stage``.
        stage: Suggests the parameters.
        budget: Epochs, batch size and epochs between EMD_sum evaluations.
        data: The prepared jets.
        inherited: Best parameters of the stages that ``stage`` inherits, or ``{}``.
        latent_model: For ``realnvp-latent``, the trained ConVAE (see :func:`train_params`).
        latents: For ``realnvp-latent``, its encoder means (see :func:`train_params`).
        storage: The study's storage, to record heartbeats. The default is the storage
            that ``study`` uses.
        user_attrs: More user attributes to store with the trial before it trains, such as
            the worker that runs it.
        fail_stale: Fail the study's stale trials with ``optuna.storages.fail_stale_trials``
            before asking, and record the trial's first heartbeat at once. A caller that
            has just run :func:`hpo.pipeline.fail_stale_trials` on the study passes False:
            that sweep also fails trials without a heartbeat once they are older than the
            grace period, so the first heartbeat can wait one interval.

    Returns:
        The finished trial.

    Raises:
        KeyboardInterrupt: after telling the trial FAIL.
        SpaceError: ``stage`` is not a stage of ``space``. No trial is created.
        ValueError: ``latent_model`` is missing for ``realnvp-latent``. No trial is created.
    """
    # argument checks, before a trial exists
    space.stage(stage.name)
    if space.model == "realnvp-latent" and latent_model is None:
        raise ValueError(
            f"search space {space.name!r} trains a flow on ConVAE latents, but no latent_model "
            f"was passed. Pass the retrained ConVAE of {space.latents_from!r}."
        )

    # NOTE: Optuna 5.1 has no public accessor for a study's storage.
    heartbeat_storage = storage if storage is not None else study._storage
    heartbeats = _records_heartbeats(heartbeat_storage)
    if heartbeats and fail_stale:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_HEARTBEAT_WARNING, category=UserWarning)
        trial = study.ask()

    started = time.perf_counter()
    seed = _retried_seed(trial)
    if seed is None:
        seed = trial_seed(study.study_name, trial.number)

    def report(epoch: int, value: float) -> None:
        trial.report(value, epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch} with validation EMD_sum {value:.6g}")

    # the heartbeat starts at once, so that a worker that dies from here on leaves no
    # RUNNING trial behind
    heartbeat = contextlib.nullcontext()
    if heartbeats:
        heartbeat = record_heartbeats(heartbeat_storage, trial._trial_id, beat_now=fail_stale)
    try:
        with heartbeat:
            attrs = {**(user_attrs or {}), "seed": seed, "data_fingerprint": data.fingerprint, "device": data.device}
            try:
                params = stage.suggest(trial, data.statistics, inherited)
                attrs["params"] = dict(params)
            finally:
                # a failed suggestion still leaves the trial's worker and seed on record
                _set_user_attrs(trial, heartbeat_storage, attrs)
            result = train_params(
                space, params, budget, data, seed=seed, report=report, latent_model=latent_model, latents=latents
            )
    except optuna.TrialPruned as pruned:
        return _finish(study, trial, started, TrialState.PRUNED, detail=str(pruned))
    except TrialFailure as failure:
        return _fail(study, trial, started, failure.reason, str(failure))
    except KeyboardInterrupt:
        _fail(study, trial, started, "error", "KeyboardInterrupt: the worker was interrupted during the trial")
        raise
    except Exception as error:
        return _fail(study, trial, started, "error", f"{type(error).__name__}: {error}", exc_info=True)

    return _finish(
        study,
        trial,
        started,
        TrialState.COMPLETE,
        value=result.best_emd_sum,
        attrs={"best_epoch": result.best_epoch},
        detail=f"validation EMD_sum {result.best_emd_sum:.6g} at epoch {result.best_epoch}",
    )


def _tell(study: optuna.Study, trial: optuna.Trial, state: TrialState, value: float | None) -> FrozenTrial:
    """Tell the study the trial's state and value, and return the trial as stored.

    The public ``Study.tell`` reads the trial from the storage before and after the update,
    one query per trial table each time. ``Study.optimize`` calls the function behind it,
    which reads it only before. This calls that function too and builds the returned trial
    from the trial's own copy, which contains the parameters, intermediate values and user
    attributes that this process stored. Where the trial may have ended elsewhere (another
    process fails a trial whose heartbeat went stale), it is read from the storage instead.
    """
    if _tell_with_warning is None:
        try:
            return study.tell(trial, value, state=state, skip_if_finished=True)
        except optuna.exceptions.UpdateFinishedTrialError:
            return study._storage.get_trial(trial._trial_id)
    try:
        outcome = _tell_with_warning(study=study, trial=trial, value_or_values=value, state=state, skip_if_finished=True)
    except optuna.exceptions.UpdateFinishedTrialError:
        # the trial ended elsewhere between the read and the update
        return study._storage.get_trial(trial._trial_id)
    if not (isinstance(outcome, tuple) and len(outcome) == 3 and isinstance(outcome[0], TrialState)):
        # Optuna 5.0 and 5.1 return the state, values and a message. The trial is stored either way.
        return study._storage.get_trial(trial._trial_id)
    stored_state, values, _ = outcome
    if stored_state != state or state == TrialState.FAIL:
        # another process ends a trial only as FAIL, so a FAIL is read back from the storage
        return study._storage.get_trial(trial._trial_id)
    frozen = copy.deepcopy(trial._cached_frozen_trial)
    frozen.state = stored_state
    frozen.values = values
    frozen.datetime_complete = datetime.datetime.now()
    return frozen


def _set_user_attrs(trial: optuna.Trial, storage: optuna.storages.BaseStorage, attrs: Mapping[str, Any]) -> None:
    """Store ``attrs`` in one transaction and in the trial's own copy, as ``Trial.set_user_attr`` does."""
    set_trial_user_attrs(storage, trial._trial_id, dict(attrs))
    # NOTE: Trial keeps a private copy of its frozen trial, which its user_attrs property reads
    trial._cached_frozen_trial.user_attrs.update(attrs)


def _records_heartbeats(storage: Any) -> bool:
    # RDBStorage and the _CachedStorage that wraps it in a Study both have this method
    get_interval = getattr(storage, "get_heartbeat_interval", None)
    return callable(get_interval) and get_interval() is not None


def _fail(
    study: optuna.Study,
    trial: optuna.Trial,
    started: float,
    reason: str,
    message: str,
    *,
    exc_info: bool = False,
) -> FrozenTrial:
    logger.warning(
        "Trial %d of study %s failed (%s): %s",
        trial.number,
        study.study_name,
        reason,
        message,
        exc_info=exc_info,
    )
    return _finish(
        study,
        trial,
        started,
        TrialState.FAIL,
        attrs={"fail_reason": reason, "fail_message": message},
    )


def _finish(
    study: optuna.Study,
    trial: optuna.Trial,
    started: float,
    state: TrialState,
    *,
    value: float | None = None,
    attrs: Mapping[str, Any] | None = None,
    detail: str = "",
) -> FrozenTrial:
    """Store the user attributes and tell the study, unless the trial is already finished."""
    wall_time = time.perf_counter() - started
    try:
        # NOTE: Optuna 5.1 has no public accessor for a study's storage.
        _set_user_attrs(trial, study._storage, {**(attrs or {}), "wall_time_s": wall_time})
    except optuna.exceptions.UpdateFinishedTrialError:
        frozen = study._storage.get_trial(trial._trial_id)
    else:
        frozen = _tell(study, trial, state, value)

    if frozen.state != state:
        # most likely another worker failed the trial because its heartbeat went stale
        logger.warning(
            "Trial %d of study %s was already %s when this worker tried to tell %s after %.1f s. "
            "Its heartbeat probably went stale, so the storage may have queued a retry.",
            trial.number,
            study.study_name,
            frozen.state.name,
            state.name,
            wall_time,
        )
    elif state != TrialState.FAIL:
        logger.info(
            "Trial %d of study %s is %s after %.1f s: %s",
            trial.number,
            study.study_name,
            state.name,
            wall_time,
            detail,
        )
    return frozen
