"""Training loops for the ConVAE and RealNVP that evaluate EMD_sum every few epochs and keep
the best checkpoint."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from models.convae import ConVAE
from models.data import MinMaxScaler
from models.jets import N_PARTICLES
from models.losses import LossWeights, convae_loss
from models.metrics import emd_sum
from models.realnvp import RealNVP

__all__ = [
    "NonFiniteLossError",
    "EpochCallback",
    "TrainingResult",
    "flatten_jets",
    "unflatten_jets",
    "evaluate_convae",
    "train_convae",
    "train_realnvp",
]

logger = logging.getLogger(__name__)

#: Called as ``callback(epoch, emd_sum)`` after each evaluation. It may raise to stop
#: training, for example ``optuna.TrialPruned``, which propagates unchanged.
EpochCallback = Callable[[int, float], None]

ConVAEObjective = Literal["generation", "reconstruction"]


class NonFiniteLossError(ArithmeticError):
    """The training loss became NaN or infinite."""

    def __init__(self, model: str, epoch: int, value: float) -> None:
        super().__init__(
            f"{model} training loss is {value} in epoch {epoch}; "
            "lower the learning rate or change the loss weights"
        )
        self.epoch = epoch
        self.value = value


@dataclass
class TrainingResult:
    """Outcome of one training run.

    Attributes:
        best_emd_sum: Lowest validation EMD_sum seen (inf when no evaluation was finite).
        best_epoch: Epoch (1-based) of that evaluation, 0 when there was none.
        history: ``(epoch, validation EMD_sum)`` for every evaluation, in order.
        checkpoint: State at the best epoch, loadable with ``torch.load(weights_only=True)``
            once saved: ``state_dict`` (weights), ``scaler``, ``hyperparameters``,
            ``data_fingerprint``, ``seed``, ``epoch`` and ``emd_sum``.
        seconds: Wall time of the whole run.
    """

    best_emd_sum: float = math.inf
    best_epoch: int = 0
    history: list[tuple[int, float]] = field(default_factory=list)
    checkpoint: dict | None = None
    seconds: float = 0.0


def flatten_jets(jets: Tensor) -> Tensor:
    """Flatten ``[n, 30, 3]`` (px, py, pz) jets to ``[n, 90]``: all px, then all py, then all pz."""
    return jets.transpose(1, 2).reshape(jets.shape[0], -1)


def unflatten_jets(flat: Tensor, n_particles: int = N_PARTICLES) -> Tensor:
    """Invert :func:`flatten_jets`: ``[n, 3 * n_particles]`` to ``[n, n_particles, 3]``."""
    return flat.reshape(flat.shape[0], 3, n_particles).transpose(1, 2)


def _jets_in_gev(scaled: Tensor, scaler: MinMaxScaler) -> np.ndarray:
    return scaler.inverse_transform(scaled.detach().to("cpu", torch.float64)).numpy()


@torch.no_grad()
def evaluate_convae(
    model: ConVAE,
    objective: ConVAEObjective,
    validation_scaled: Tensor,
    validation_gev: np.ndarray,
    scaler: MinMaxScaler,
    generator: torch.Generator,
) -> float:
    """Compute the validation EMD_sum of a ConVAE.

    Args:
        model: The network, switched to eval mode for the call and back afterwards.
        objective: ``"generation"`` scores jets decoded from z ~ N(0, 1), as many as there
            are validation jets. ``"reconstruction"`` scores the decoded encoder means of
            the validation jets.
        validation_scaled: ``[n, 30, 3]`` validation jets in network space, on the model's device.
        validation_gev: ``[n, 30, 3]`` (px, py, pz) in GeV, the reference sample.
        scaler: Maps network space back to GeV.
        generator: Source of the latent samples for ``"generation"``.

    Returns:
        EMD_sum between the model's jets and the validation jets.
    """
    was_training = model.training
    model.eval()
    try:
        if objective == "generation":
            z = torch.randn(
                validation_scaled.shape[0],
                model.config.latent_dim,
                generator=generator,
                device=generator.device,
            ).to(validation_scaled.device)
            produced = model.decode(z)
        else:
            mean, _ = model.encode(validation_scaled)
            produced = model.decode(mean)
    finally:
        model.train(was_training)
    return emd_sum(_jets_in_gev(produced, scaler), validation_gev).total


def _batches(n: int, batch_size: int, generator: torch.Generator, device: torch.device):
    order = torch.randperm(n, generator=generator, device=generator.device).to(device)
    return order.split(batch_size)


def _check_finite(loss_sum: Tensor, model: str, epoch: int) -> None:
    # One host synchronisation per epoch instead of one per batch. A NaN batch can corrupt
    # the weights for the rest of that epoch, but the best checkpoint is an earlier copy.
    value = loss_sum.item()
    if not math.isfinite(value):
        raise NonFiniteLossError(model, epoch, value)


def _record(
    result: TrainingResult,
    epoch: int,
    value: float,
    make_checkpoint: Callable[[], dict],
) -> None:
    result.history.append((epoch, value))
    if math.isfinite(value) and value < result.best_emd_sum:
        result.best_emd_sum = value
        result.best_epoch = epoch
        result.checkpoint = make_checkpoint() | {"epoch": epoch, "emd_sum": value}


def _state_copy(module: torch.nn.Module) -> dict[str, Tensor]:
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in module.state_dict().items()}


def train_convae(
    model: ConVAE,
    train_scaled: Tensor,
    validation_scaled: Tensor,
    scaler: MinMaxScaler,
    weights: LossWeights,
    *,
    objective: ConVAEObjective,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    data_fingerprint: str,
    eval_every: int = 5,
    callback: EpochCallback | None = None,
) -> TrainingResult:
    """Train a ConVAE with Adam and keep the state with the lowest validation EMD_sum.

    The test split is never passed here: model choice uses the validation split only.

    Args:
        model: Network to train in place, already on its device.
        train_scaled: ``[n_train, 30, 3]`` training jets in network space, on the model's device.
        validation_scaled: ``[n_val, 30, 3]`` validation jets in network space, same device.
        scaler: The scaler fitted on the training jets; stored in the checkpoint.
        weights: alpha, beta, gamma, gamma_pT and gamma_m of the loss.
        objective: What the validation EMD_sum scores (see :func:`evaluate_convae`).
        epochs: Number of passes over the training jets.
        batch_size: Jets per optimizer step.
        lr: Adam learning rate.
        seed: Seeds batch order, the reparameterisation noise and the latent samples.
        data_fingerprint: Identifies the data set; stored in the checkpoint.
        eval_every: Evaluate after every this many epochs, and always after the last.
        callback: Receives ``(epoch, validation EMD_sum)`` after each evaluation.

    Returns:
        The best validation EMD_sum, its epoch, the evaluation history and the checkpoint.

    Raises:
        NonFiniteLossError: The loss became NaN or infinite.
    """
    started = time.perf_counter()
    device = train_scaled.device
    torch.manual_seed(seed)
    batch_generator = torch.Generator().manual_seed(seed)
    sample_generator = torch.Generator().manual_seed(seed + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    validation_gev = _jets_in_gev(validation_scaled, scaler)
    result = TrainingResult()

    def make_checkpoint() -> dict:
        return {
            "kind": "convae",
            "state_dict": _state_copy(model),
            "scaler": scaler.state_dict(),
            "hyperparameters": dataclasses.asdict(model.config),
            "loss_weights": dataclasses.asdict(weights),
            "objective": objective,
            "data_fingerprint": data_fingerprint,
            "seed": seed,
        }

    model.train()
    for epoch in range(1, epochs + 1):
        loss_sum = torch.zeros((), device=device)
        for indices in _batches(len(train_scaled), batch_size, batch_generator, device):
            x = train_scaled[indices]
            reconstruction, mean, logvar = model(x)
            loss = convae_loss(x, reconstruction, mean, logvar, scaler, weights).total
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
        _check_finite(loss_sum, "ConVAE", epoch)

        if epoch % eval_every == 0 or epoch == epochs:
            value = evaluate_convae(model, objective, validation_scaled, validation_gev, scaler, sample_generator)
            logger.debug("convae epoch %d: validation EMD_sum %.4g", epoch, value)
            _record(result, epoch, value, make_checkpoint)
            if callback is not None:
                callback(epoch, value)

    result.seconds = time.perf_counter() - started
    return result


@torch.no_grad()
def _evaluate_flow(
    flow: RealNVP,
    decode: Callable[[Tensor], Tensor],
    n_jets: int,
    validation_gev: np.ndarray,
    scaler: MinMaxScaler,
    generator: torch.Generator,
) -> float:
    was_training = flow.training
    flow.eval()
    try:
        jets = decode(flow.sample(n_jets, generator=generator))
    finally:
        flow.train(was_training)
    return emd_sum(_jets_in_gev(jets, scaler), validation_gev).total


def train_realnvp(
    flow: RealNVP,
    train_inputs: Tensor,
    decode: Callable[[Tensor], Tensor],
    validation_gev: np.ndarray,
    scaler: MinMaxScaler,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    data_fingerprint: str,
    lr_decay: float = 0.99,
    eval_every: int = 4,
    callback: EpochCallback | None = None,
    extra_checkpoint: dict | None = None,
) -> TrainingResult:
    """Train a RealNVP by maximum likelihood and keep the state with the lowest validation EMD_sum.

    Args:
        flow: Flow to train in place, already on its device.
        train_inputs: ``[n, dim]`` training vectors on the flow's device: flattened scaled
            jets (see :func:`flatten_jets`) for the standalone NF, or ConVAE latent vectors
            for the latent NF.
        decode: Maps ``[n, dim]`` flow samples to ``[n, 30, 3]`` jets in network space,
            e.g. :func:`unflatten_jets` or a ConVAE decoder.
        validation_gev: ``[n_val, 30, 3]`` (px, py, pz) in GeV, the reference sample.
        scaler: Maps network space back to GeV; stored in the checkpoint.
        epochs: Number of passes over ``train_inputs``.
        batch_size: Vectors per optimizer step.
        lr: Initial Adam learning rate.
        seed: Seeds batch order and the flow samples.
        data_fingerprint: Identifies the data set; stored in the checkpoint.
        lr_decay: Factor applied to the learning rate after every epoch (exponential decay).
        eval_every: Evaluate after every this many epochs, and always after the last.
        callback: Receives ``(epoch, validation EMD_sum)`` after each evaluation.
        extra_checkpoint: Entries added to the checkpoint, e.g. the ConVAE it decodes with.

    Returns:
        The best validation EMD_sum, its epoch, the evaluation history and the checkpoint.

    Raises:
        NonFiniteLossError: The negative log-likelihood became NaN or infinite.
    """
    started = time.perf_counter()
    device = train_inputs.device
    torch.manual_seed(seed)
    batch_generator = torch.Generator().manual_seed(seed)
    sample_generator = torch.Generator().manual_seed(seed + 1)
    optimizer = torch.optim.Adam(flow.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=lr_decay)
    result = TrainingResult()

    def make_checkpoint() -> dict:
        return {
            "kind": "realnvp",
            "state_dict": _state_copy(flow),
            "scaler": scaler.state_dict(),
            "hyperparameters": copy.deepcopy(flow.hyperparameters),
            "data_fingerprint": data_fingerprint,
            "seed": seed,
        } | (extra_checkpoint or {})

    flow.train()
    for epoch in range(1, epochs + 1):
        loss_sum = torch.zeros((), device=device)
        for indices in _batches(len(train_inputs), batch_size, batch_generator, device):
            loss = -flow.log_prob(train_inputs[indices]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
        _check_finite(loss_sum, "RealNVP", epoch)
        scheduler.step()

        if epoch % eval_every == 0 or epoch == epochs:
            value = _evaluate_flow(flow, decode, len(validation_gev), validation_gev, scaler, sample_generator)
            logger.debug("realnvp epoch %d: validation EMD_sum %.4g", epoch, value)
            _record(result, epoch, value, make_checkpoint)
            if callback is not None:
                callback(epoch, value)

    result.seconds = time.perf_counter() - started
    return result
