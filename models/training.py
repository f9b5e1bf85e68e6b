"""Training loops for the ConVAE and RealNVP that evaluate EMD_sum every few epochs, keep the
best checkpoint and can resume from a saved training state.

After each evaluation a loop can pass its full training state to ``on_state``: the weights,
the Adam and learning-rate scheduler states, every random generator state, the evaluation
history and the best checkpoint. Passing that state back as ``resume`` continues the run
where it stopped. On the same device, the resumed run ends with the same weights, history
and best checkpoint, bit for bit, as a run that was never interrupted (see the note on
:func:`train_convae` for the one exception).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

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
    "EVAL_BATCH_SIZE",
    "NonFiniteLossError",
    "EpochCallback",
    "StateCallback",
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

#: Called as ``on_state(state)`` after each evaluation, after the :data:`EpochCallback`,
#: with the full training state. The state is the checkpoint of the current weights, with
#: the keys of ``TrainingResult.checkpoint``. It adds the training settings (``lr``,
#: ``batch_size``, ``eval_every`` and, for RealNVP, ``lr_decay``), ``optimizer``,
#: ``lr_scheduler`` (RealNVP only), ``rng`` (random generator states), ``history``,
#: ``best_emd_sum``, ``best_epoch``, ``best`` (the best checkpoint so far, or None) and
#: ``seconds``. ``torch.save`` writes it, and ``torch.load(weights_only=True)`` reads it
#: back as a valid ``resume`` argument. The state shares tensors with the best checkpoint,
#: so the callback must not modify them.
StateCallback = Callable[[dict], None]

ConVAEObjective = Literal["generation", "reconstruction"]

# Keys of every training state besides the checkpoint entries and the settings. RealNVP
# states also have "lr_scheduler".
_STATE_KEYS = ("optimizer", "rng", "history", "best_emd_sum", "best_epoch", "best", "seconds")


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
            once saved: ``kind`` (``"convae"`` or ``"realnvp"``), ``state_dict`` (weights),
            ``scaler``, ``hyperparameters``, ``data_fingerprint``, ``seed``, ``epoch`` and
            ``emd_sum``. None when no evaluation was finite.
        seconds: Wall time in seconds of the whole run. For a resumed run it includes the
            time of the runs before, as recorded in the training state.
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


#: Jets per network call when an evaluation decodes its validation-sized sample. The output
#: of the generation-tuned ConVAE's ``Linear(1100, 13200)`` alone takes 52.8 kB per jet.
#: Decoding the 26,588 validation jets of a paper-size trial at once took the trial's peak
#: resident memory to 5,283 MiB, and batches of 1024 to about 1,300 MiB
#: (``python -m bench.memory --paper-size`` on the CPU).
EVAL_BATCH_SIZE = 1024


@torch.no_grad()
def evaluate_convae(
    model: ConVAE,
    objective: ConVAEObjective,
    validation_scaled: Tensor,
    validation_gev: np.ndarray,
    scaler: MinMaxScaler,
    generator: torch.Generator,
    batch_size: int = EVAL_BATCH_SIZE,
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
        batch_size: Jets per encoder and decoder call, which bounds the memory of the
            evaluation. All latent samples are drawn in one call before decoding, so the
            jets do not depend on the batch size.

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
            produced_gev = _decode_in_batches(model.decode, z, scaler, batch_size)
        else:

            def reconstruct(jets: Tensor) -> Tensor:
                mean, _ = model.encode(jets)
                return model.decode(mean)

            produced_gev = _decode_in_batches(reconstruct, validation_scaled, scaler, batch_size)
    finally:
        model.train(was_training)
    return emd_sum(produced_gev, validation_gev).total


def _decode_in_batches(
    decode: Callable[[Tensor], Tensor], inputs: Tensor, scaler: MinMaxScaler, batch_size: int
) -> np.ndarray:
    """Apply ``decode`` to ``inputs`` in batches of ``batch_size`` rows and return the
    decoded jets in GeV, float64 ``[n, 30, 3]`` on the CPU."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"evaluation batch_size must be a positive integer, got {batch_size!r}")
    return np.concatenate([_jets_in_gev(decode(batch), scaler) for batch in inputs.split(batch_size)])


def _batches(n: int, batch_size: int, generator: torch.Generator, device: torch.device):
    order = torch.randperm(n, generator=generator, device=generator.device).to(device)
    return order.split(batch_size)


def _check_finite(loss_sum: Tensor, model: str, epoch: int) -> None:
    # One host synchronisation per epoch instead of one per batch. A NaN batch can corrupt
    # the weights for the rest of that epoch, but the best checkpoint is an earlier copy.
    value = loss_sum.item()
    if not math.isfinite(value):
        raise NonFiniteLossError(model, epoch, value)


def _state_copy(module: torch.nn.Module) -> dict[str, Tensor]:
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in module.state_dict().items()}


def _cpu_copy(value: Any) -> Any:
    """Copy nested dicts, lists and tuples, with every tensor copied to the CPU."""
    if isinstance(value, Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, Mapping):
        return {key: _cpu_copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu_copy(item) for item in value)
    return value


def _same(saved: Any, current: Any) -> bool:
    """Compare nested values, with tensors compared element by element and lists equal to
    tuples, because ``torch.load`` may return either."""
    if isinstance(saved, Tensor) or isinstance(current, Tensor):
        return (
            isinstance(saved, Tensor)
            and isinstance(current, Tensor)
            and saved.dtype == current.dtype
            and torch.equal(saved.cpu(), current.cpu())
        )
    if isinstance(saved, Mapping) and isinstance(current, Mapping):
        return saved.keys() == current.keys() and all(_same(saved[key], current[key]) for key in saved)
    if isinstance(saved, (list, tuple)) and isinstance(current, (list, tuple)):
        return len(saved) == len(current) and all(map(_same, saved, current))
    return bool(saved == current)


def _brief(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# Checkpoint keys that a resume state must match first, in this order, so that the error
# names the most basic difference. The other checkpoint keys and the settings follow.
_FIRST_CHECKED = ("kind", "hyperparameters", "data_fingerprint", "seed")


class _TrainingRun:
    """Evaluation history, best checkpoint and resumable state of one training loop.

    Arguments:
        model_name: ``"ConVAE"`` or ``"RealNVP"``, for messages.
        module: The network being trained.
        optimizer: Its optimizer.
        scheduler: Its learning-rate scheduler, or None.
        generators: The loop's own random generators by name (batch order, samples).
        settings: Training settings outside the checkpoint that a resume must match, such
            as the learning rate and the batch size.
        make_checkpoint: Builds the checkpoint of the current weights, without ``epoch``
            and ``emd_sum``.
        callback: Receives ``(epoch, EMD_sum)`` after each evaluation.
        on_state: Receives the training state after each evaluation, after ``callback``.
    """

    def __init__(
        self,
        model_name: str,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        generators: dict[str, torch.Generator],
        settings: dict[str, Any],
        make_checkpoint: Callable[[], dict],
        callback: EpochCallback | None,
        on_state: StateCallback | None,
    ) -> None:
        self.model_name = model_name
        self.module = module
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.generators = generators
        self.settings = settings
        self.make_checkpoint = make_checkpoint
        self.callback = callback
        self.on_state = on_state

        self.result = TrainingResult()
        self.first_epoch = 1
        self._started = time.perf_counter()
        self._seconds_before = 0.0

    def record(self, epoch: int, value: float) -> None:
        """Record an evaluation, keep the checkpoint if it is the best, then call
        ``callback`` and ``on_state``."""
        result = self.result
        result.history.append((epoch, value))
        if math.isfinite(value) and value < result.best_emd_sum:
            result.best_emd_sum = value
            result.best_epoch = epoch
            result.checkpoint = self.make_checkpoint() | {"epoch": epoch, "emd_sum": value}

        if self.callback is not None:
            self.callback(epoch, value)
        if self.on_state is not None:
            self.on_state(self.state(epoch, value))

    def state(self, epoch: int, value: float) -> dict:
        """Build the training state after the evaluation of ``epoch`` (see :data:`StateCallback`).

        ``rng`` contains the states of the batch-order and sample generators, of PyTorch's
        global CPU generator and, on CUDA, of the device's generator.
        """
        result = self.result
        if result.best_epoch == epoch:
            current = result.checkpoint
        else:
            current = self.make_checkpoint() | {"epoch": epoch, "emd_sum": value}

        rng = {name: generator.get_state() for name, generator in self.generators.items()}
        rng["torch"] = torch.get_rng_state()
        # NOTE: the ConVAE's reparameterisation noise on a device other than the CPU or
        # CUDA (such as MPS) comes from a generator whose state is not saved, so a resumed
        # run there differs from an uninterrupted one.
        device = self._device()
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)

        state = dict(current) | dict(self.settings)
        state["optimizer"] = _cpu_copy(self.optimizer.state_dict())
        if self.scheduler is not None:
            state["lr_scheduler"] = copy.deepcopy(self.scheduler.state_dict())
        state["rng"] = rng
        state["history"] = [[evaluated, emd] for evaluated, emd in result.history]
        state["best_emd_sum"] = result.best_emd_sum
        state["best_epoch"] = result.best_epoch
        state["best"] = result.checkpoint
        state["seconds"] = self._seconds_before + time.perf_counter() - self._started
        return state

    def resume_from(self, state: Mapping[str, Any], epochs: int) -> None:
        """Restore weights, optimizer, scheduler, random generators, history and best
        checkpoint from a training state, so that training continues at its epoch + 1.

        Raises:
            ValueError: A key is missing, the state belongs to another run (kind,
                hyperparameters, data, seed, loss or settings differ), or its epoch is past
                ``epochs``.
        """
        if not isinstance(state, Mapping):
            raise ValueError(
                f"resume state for {self.model_name} training is a {type(state).__name__}, "
                "expected the dict that on_state received"
            )
        self._check_matches(state)

        epoch = state["epoch"]
        if epoch > epochs:
            raise ValueError(
                f"resume state of {self.model_name} training is at epoch {epoch}, past the "
                f"{epochs} epochs of this run. Request at least {epoch} epochs."
            )

        # weights, optimizer and learning-rate schedule; the optimizer updates its state
        # tensors in place, so it gets copies and the caller's state stays unchanged
        self.module.load_state_dict(state["state_dict"])
        self.optimizer.load_state_dict(_cpu_copy(state["optimizer"]))
        if self.scheduler is not None:
            self.scheduler.load_state_dict(copy.deepcopy(state["lr_scheduler"]))

        # random generators
        rng = state["rng"]
        for name, generator in self.generators.items():
            generator.set_state(rng[name])
        torch.set_rng_state(rng["torch"])
        device = self._device()
        if device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)

        # evaluations so far
        result = self.result
        result.history = [(int(evaluated), float(emd)) for evaluated, emd in state["history"]]
        result.best_emd_sum = float(state["best_emd_sum"])
        result.best_epoch = int(state["best_epoch"])
        result.checkpoint = state["best"]
        self._seconds_before = float(state["seconds"])
        self.first_epoch = epoch + 1
        logger.info("Resuming %s training after epoch %d of %d", self.model_name, epoch, epochs)

    def _check_matches(self, state: Mapping[str, Any]) -> None:
        current = self.make_checkpoint() | self.settings
        later = [key for key in current if key not in _FIRST_CHECKED and key != "state_dict"]

        # a state of another kind also lacks keys, so the kind is compared first
        for key in _FIRST_CHECKED:
            if key in state:
                self._check_same(key, state[key], current[key])

        required = [*current, "epoch", *_STATE_KEYS]
        if self.scheduler is not None:
            required.append("lr_scheduler")
        missing = [key for key in required if key not in state]
        if missing:
            raise ValueError(
                f"resume state for {self.model_name} training is missing {', '.join(map(repr, missing))}. "
                "Pass a state that on_state received from the same training function."
            )

        for key in later:
            self._check_same(key, state[key], current[key])

    def _check_same(self, key: str, saved: Any, current: Any) -> None:
        if not _same(saved, current):
            raise ValueError(
                f"resume state does not match this {self.model_name} training run: {key!r} is "
                f"{_brief(saved)} in the state but {_brief(current)} here. Resume with the same "
                f"{key}, or train from the start without resume."
            )

    def _device(self) -> torch.device:
        return next(self.module.parameters()).device

    def finish(self) -> TrainingResult:
        """Set the wall time, including that of the runs a resume continues, and return the result."""
        self.result.seconds = self._seconds_before + time.perf_counter() - self._started
        return self.result


def _adam(parameters, lr: float) -> torch.optim.Adam:
    """Create Adam with its fused kernel, which PyTorch picks by default only for CUDA tensors.

    On the CPU, Adam's default per-tensor loop took 29 % to 40 % of a ConVAE training step
    (``bench/training.py``), and the fused kernel made an epoch 1.27 to 1.59 times faster.
    """
    return torch.optim.Adam(parameters, lr=lr, fused=True)


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
    resume: Mapping[str, Any] | None = None,
    on_state: StateCallback | None = None,
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
        resume: A training state that ``on_state`` received, directly or after
            ``torch.save`` and ``torch.load``. Training continues after its epoch with its
            weights, optimizer state, random generator states, history and best checkpoint.
            The state must come from a run with the same hyperparameters, data fingerprint,
            seed, scaler, loss weights, objective, learning rate, batch size and
            ``eval_every``. Only ``epochs`` may differ.
        on_state: Receives the full training state after each evaluation, after
            ``callback`` (see :data:`StateCallback`). Its ``"best"`` entry is the best
            checkpoint so far.

    Returns:
        The best validation EMD_sum, its epoch, the evaluation history and the checkpoint.

    Raises:
        NonFiniteLossError: The loss became NaN or infinite.
        ValueError: ``resume`` belongs to another run (the message names the key that
            differs), lacks a key, or is past ``epochs``.

    Note:
        Two epochs and a resume for two more give bit-identical weights, history and best
        checkpoint to four epochs in one run on the same device, as long as the shorter
        run ended on an epoch that the longer one also evaluates (a multiple of
        ``eval_every``). A run always evaluates its last epoch, so another split draws
        one more set of latent samples and the sample generators diverge.
    """
    device = train_scaled.device
    torch.manual_seed(seed)
    batch_generator = torch.Generator().manual_seed(seed)
    sample_generator = torch.Generator().manual_seed(seed + 1)
    optimizer = _adam(model.parameters(), lr)
    validation_gev = _jets_in_gev(validation_scaled, scaler)

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

    run = _TrainingRun(
        "ConVAE",
        model,
        optimizer,
        None,
        {"batch": batch_generator, "sample": sample_generator},
        {"lr": lr, "batch_size": batch_size, "eval_every": eval_every},
        make_checkpoint,
        callback,
        on_state,
    )
    if resume is not None:
        run.resume_from(resume, epochs)

    model.train()
    for epoch in range(run.first_epoch, epochs + 1):
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
            value = evaluate_convae(
                model, objective, validation_scaled, validation_gev, scaler, sample_generator, EVAL_BATCH_SIZE
            )
            logger.debug("convae epoch %d: validation EMD_sum %.4g", epoch, value)
            run.record(epoch, value)

    return run.finish()


@torch.no_grad()
def _evaluate_flow(
    flow: RealNVP,
    decode: Callable[[Tensor], Tensor],
    n_jets: int,
    validation_gev: np.ndarray,
    scaler: MinMaxScaler,
    generator: torch.Generator,
    batch_size: int = EVAL_BATCH_SIZE,
) -> float:
    was_training = flow.training
    flow.eval()
    try:
        # z for all jets in one draw, as flow.sample(n_jets) makes it, so that the jets do
        # not depend on the batch size
        z = flow.base.sample(n_jets, generator)
        produced_gev = _decode_in_batches(lambda batch: decode(flow.inverse(batch)), z, scaler, batch_size)
    finally:
        flow.train(was_training)
    return emd_sum(produced_gev, validation_gev).total


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
    resume: Mapping[str, Any] | None = None,
    on_state: StateCallback | None = None,
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
        extra_checkpoint: Entries added to the checkpoint, e.g. the ConVAE it decodes with
            under ``"latent_model"``.
        resume: A training state that ``on_state`` received, directly or after
            ``torch.save`` and ``torch.load``. Training continues after its epoch with its
            weights, Adam and learning-rate schedule states, random generator states,
            history and best checkpoint. The state must come from a run with the same
            hyperparameters, data fingerprint, seed, scaler, ``extra_checkpoint`` entries
            (compared tensor by tensor), learning rate, ``lr_decay``, batch size and
            ``eval_every``. Only ``epochs`` may differ.
        on_state: Receives the full training state after each evaluation, after
            ``callback`` (see :data:`StateCallback`). Its ``"best"`` entry is the best
            checkpoint so far.

    Returns:
        The best validation EMD_sum, its epoch, the evaluation history and the checkpoint.

    Raises:
        NonFiniteLossError: The negative log-likelihood became NaN or infinite.
        ValueError: ``resume`` belongs to another run (the message names the key that
            differs), lacks a key, or is past ``epochs``.

    Note:
        A resumed run matches an uninterrupted one bit for bit under the same condition as
        in :func:`train_convae`.
    """
    device = train_inputs.device
    torch.manual_seed(seed)
    batch_generator = torch.Generator().manual_seed(seed)
    sample_generator = torch.Generator().manual_seed(seed + 1)
    optimizer = _adam(flow.parameters(), lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=lr_decay)

    def make_checkpoint() -> dict:
        return {
            "kind": "realnvp",
            "state_dict": _state_copy(flow),
            "scaler": scaler.state_dict(),
            "hyperparameters": copy.deepcopy(flow.hyperparameters),
            "data_fingerprint": data_fingerprint,
            "seed": seed,
        } | (extra_checkpoint or {})

    run = _TrainingRun(
        "RealNVP",
        flow,
        optimizer,
        scheduler,
        {"batch": batch_generator, "sample": sample_generator},
        {"lr": lr, "lr_decay": lr_decay, "batch_size": batch_size, "eval_every": eval_every},
        make_checkpoint,
        callback,
        on_state,
    )
    if resume is not None:
        run.resume_from(resume, epochs)

    flow.train()
    for epoch in range(run.first_epoch, epochs + 1):
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
            value = _evaluate_flow(
                flow, decode, len(validation_gev), validation_gev, scaler, sample_generator, EVAL_BATCH_SIZE
            )
            logger.debug("realnvp epoch %d: validation EMD_sum %.4g", epoch, value)
            run.record(epoch, value)

    return run.finish()
