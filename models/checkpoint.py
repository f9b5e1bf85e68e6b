"""Checkpoint files of trained ConVAE and RealNVP models, and the jet samplers built from them.

A checkpoint is a dict of tensors and plain Python values, as the training loops in
:mod:`models.training` return it: ``kind`` (``"convae"`` or ``"realnvp"``), ``state_dict``,
``scaler`` (``MinMaxScaler.state_dict()``), ``hyperparameters``, ``data_fingerprint``,
``seed`` and usually ``epoch`` and ``emd_sum``. A RealNVP trained on ConVAE latent vectors
also stores that ConVAE under ``latent_model`` (``hyperparameters`` and ``state_dict``), so
the file alone generates jets. :func:`save_checkpoint` adds ``jethpo_version``.

Files are written atomically and read with ``torch.load(weights_only=True)``, which
unpickles tensors and plain values only and never runs code from the file.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import pickle
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from models.convae import ConVAE, ConVAEConfig
from models.data import MinMaxScaler
from models.realnvp import RealNVP
from models.training import unflatten_jets

__all__ = [
    "CHECKPOINT_KEYS",
    "CheckpointError",
    "JetSampler",
    "convae_from_checkpoint",
    "jethpo_version",
    "load_checkpoint",
    "sampler_from_checkpoint",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

#: Keys that every jethpo checkpoint has.
CHECKPOINT_KEYS = ("kind", "state_dict", "scaler", "hyperparameters", "data_fingerprint", "seed")

#: Values of a checkpoint's ``kind``.
CHECKPOINT_KINDS = ("convae", "realnvp")

#: Names of the samplers, by what they chain: ConVAE decoder, flow then decoder, flow alone.
SAMPLER_NAMES = ("convae", "convae-nf", "nf")

_RETRAIN = "Retrain with 'jethpo retrain STUDY' to write a new checkpoint."


class CheckpointError(ValueError):
    """Missing, unreadable or invalid checkpoint, or one trained on other data. The message
    names the file or the checkpoint, and the fix."""


def jethpo_version() -> str:
    """Return the installed jethpo version, or "unknown" when jethpo runs from a source tree."""
    try:
        return importlib.metadata.version("jethpo")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------------------------
# files


def save_checkpoint(checkpoint: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write a checkpoint or training state atomically.

    The dict goes to a temporary file in the target folder, which is flushed to disk and
    then renamed over ``path``. A reader, or a run that crashes while writing, therefore
    finds either the old file or the complete new one.

    Args:
        checkpoint: Tensors and plain Python values, such as ``TrainingResult.checkpoint``
            or a training state from ``on_state``. It is not modified.
        path: Target file. Missing parent folders are created.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        TypeError: ``checkpoint`` is not a mapping.
        OSError: The folder or the file cannot be written. No temporary file is left.
    """
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"cannot save {type(checkpoint).__name__} to {path}: expected a checkpoint dict")
    path = Path(path)
    contents = dict(checkpoint)
    contents.setdefault("jethpo_version", jethpo_version())

    # open() rather than tempfile.mkstemp, so that the file gets the umask's permissions
    # (mkstemp's 0600 would hide it from a dashboard that runs as another user)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temporary, "xb") as file:
            torch.save(contents, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _sync_folder(path.parent)

    logger.debug("Saved checkpoint of kind %s to %s", contents.get("kind"), path)
    return path


def _sync_folder(folder: Path) -> None:
    # Makes the rename durable. Some file systems reject fsync on a folder, and the file
    # itself is already on disk then, so that error is ignored.
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def load_checkpoint(path: str | os.PathLike[str], *, data_fingerprint: str | None = None) -> dict:
    """Read a checkpoint with ``torch.load(map_location="cpu", weights_only=True)``.

    Args:
        path: File written by :func:`save_checkpoint` or ``torch.save``.
        data_fingerprint: Fingerprint of the current data (``JetData.fingerprint``). When
            given, a checkpoint trained on other data is rejected.

    Returns:
        The checkpoint dict, with its tensors on the CPU.

    Raises:
        CheckpointError: The file is missing or unreadable, contains Python objects other
            than tensors and plain values, is not a dict with the keys
            :data:`CHECKPOINT_KEYS` and a known ``kind``, or was trained on data with
            another fingerprint. The message names the file.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint file not found. Check the path. {_RETRAIN}")
    if not path.is_file():
        raise CheckpointError(f"{path}: is not a file. Pass the path of a checkpoint file.")
    if path.stat().st_size == 0:
        raise CheckpointError(_unreadable(path, "the file is empty"))

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        detail = _unpickling_detail(error)
        if "Unsupported global" not in detail:
            raise CheckpointError(_unreadable(path, f"UnpicklingError: {detail}")) from error
        raise CheckpointError(
            f"{path}: cannot be loaded with weights_only=True ({detail}). A jethpo checkpoint "
            f"contains only tensors and plain Python values. {_RETRAIN}"
        ) from error
    # torch.load raises these for empty, truncated, non-PyTorch and unreadable files
    # (KeyError for some text files, whose first byte is no pickle opcode)
    except (OSError, EOFError, RuntimeError, KeyError, ValueError) as error:
        raise CheckpointError(_unreadable(path, f"{type(error).__name__}: {_first_line(error)}")) from error

    _check_contents(checkpoint, str(path))
    if data_fingerprint is not None and checkpoint["data_fingerprint"] != data_fingerprint:
        raise CheckpointError(
            f"{path}: the {checkpoint['kind']} checkpoint was trained on data with fingerprint "
            f"{str(checkpoint['data_fingerprint'])[:12]}, but the current data has fingerprint "
            f"{data_fingerprint[:12]}. Retrain with 'jethpo retrain STUDY' on the current data, "
            f"or use the data it was trained on."
        )
    return checkpoint


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no message"


def _unreadable(path: Path, detail: str) -> str:
    return (
        f"{path}: not a readable PyTorch checkpoint ({detail}). The file may be truncated or "
        f"not written by jethpo. {_RETRAIN}"
    )


def _unpickling_detail(error: pickle.UnpicklingError) -> str:
    # torch's message starts with advice to set weights_only=False. The useful part follows
    # "WeightsUnpickler error:": "Unsupported global: GLOBAL <class> ..." for an object
    # that is no tensor or plain value, "Unsupported operand <n>" for a file that is no pickle.
    _, marker, rest = str(error).partition("WeightsUnpickler error:")
    if not marker:
        return _first_line(error)
    detail = " ".join(rest.split("Check the documentation")[0].split())
    return detail.split(" Please use")[0] or "no details"


def _check_contents(checkpoint: Any, source: str) -> None:
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(
            f"{source}: contains a {type(checkpoint).__name__}, not a jethpo checkpoint dict. {_RETRAIN}"
        )
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(
            f"{source}: not a jethpo checkpoint, because it lacks {', '.join(missing)} "
            f"(it has {', '.join(map(str, checkpoint)) or 'no keys'}). {_RETRAIN}"
        )
    if checkpoint["kind"] not in CHECKPOINT_KINDS:
        raise CheckpointError(
            f"{source}: checkpoint kind {checkpoint['kind']!r} is invalid, expected one of "
            f"{', '.join(CHECKPOINT_KINDS)}. {_RETRAIN}"
        )


# --------------------------------------------------------------------------------------------
# models


def _convae(hyperparameters: Any, state_dict: Any, source: str) -> ConVAE:
    """Build a ConVAE on the CPU from hyperparameters and weights, in eval mode."""
    try:
        model = ConVAE(ConVAEConfig(**hyperparameters))
    except (TypeError, ValueError) as error:
        raise CheckpointError(
            f"{source}: invalid ConVAE hyperparameters {hyperparameters!r} ({error}). {_RETRAIN}"
        ) from error
    _load_weights(model, state_dict, source)
    return model.eval()


def _flow(hyperparameters: Any, state_dict: Any, source: str) -> RealNVP:
    """Build a RealNVP on the CPU from hyperparameters and weights, in eval mode."""
    try:
        flow = RealNVP(**hyperparameters)
    except (TypeError, ValueError) as error:
        raise CheckpointError(
            f"{source}: invalid RealNVP hyperparameters {hyperparameters!r} ({error}). {_RETRAIN}"
        ) from error
    _load_weights(flow, state_dict, source)
    return flow.eval()


def _load_weights(module: torch.nn.Module, state_dict: Any, source: str) -> None:
    try:
        module.load_state_dict(state_dict)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise CheckpointError(
            f"{source}: the weights do not fit the {type(module).__name__} that its "
            f"hyperparameters describe ({error}). {_RETRAIN}"
        ) from error


def _latent_model(checkpoint: Mapping[str, Any], source: str) -> Mapping[str, Any] | None:
    latent = checkpoint.get("latent_model")
    if latent is None:
        return None
    if not isinstance(latent, Mapping) or not {"hyperparameters", "state_dict"} <= latent.keys():
        raise CheckpointError(
            f"{source}: latent_model must contain the ConVAE's hyperparameters and state_dict. {_RETRAIN}"
        )
    return latent


def _describe(checkpoint: Mapping[str, Any]) -> str:
    return f"{checkpoint['kind']} checkpoint (data {str(checkpoint['data_fingerprint'])[:12]})"


def convae_from_checkpoint(checkpoint: Mapping[str, Any]) -> ConVAE:
    """Rebuild the ConVAE of a checkpoint, for example to encode jets into latent vectors.

    Args:
        checkpoint: A ``"convae"`` checkpoint, or a ``"realnvp"`` one with ``latent_model``,
            whose ConVAE is returned.

    Returns:
        The ConVAE with the checkpoint's weights, on the CPU and in eval mode.

    Raises:
        CheckpointError: The checkpoint lacks a key, contains no ConVAE (a standalone NF), or
            its weights do not fit its hyperparameters.
    """
    _check_contents(checkpoint, "checkpoint")
    source = _describe(checkpoint)
    if checkpoint["kind"] == "convae":
        return _convae(checkpoint["hyperparameters"], checkpoint["state_dict"], source)

    latent = _latent_model(checkpoint, source)
    if latent is None:
        raise CheckpointError(
            f"{source}: a standalone NF checkpoint contains no ConVAE. Pass a ConVAE checkpoint "
            "or a latent NF checkpoint."
        )
    return _convae(latent["hyperparameters"], latent["state_dict"], f"{source}, latent_model")


# --------------------------------------------------------------------------------------------
# sampling


def _check_count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class JetSampler:
    """Generator of jets from trained networks: a ConVAE decoder, a flow followed by a ConVAE
    decoder, or a flow alone.

    Build one with :func:`sampler_from_checkpoint`. Every random number comes from the
    generator passed to each call, so one seed gives the same jets on every call.

    Arguments:
        name: ``"convae"`` (z ~ N(0, I) decoded by ``convae``), ``"convae-nf"`` (flow samples
            decoded by ``convae``) or ``"nf"`` (flow samples of the flattened jet,
            unflattened with :func:`models.training.unflatten_jets`).
        scaler: Maps network space to (px, py, pz) in GeV.
        convae: The ConVAE, for ``"convae"`` and ``"convae-nf"``.
        flow: The RealNVP, for ``"convae-nf"`` and ``"nf"``.

    Attributes:
        name: As above.
        scaler: As above.
        device: Device of the networks, where :meth:`sample_scaled` returns its jets.
        n_particles: Constituents per generated jet.
        n_parameters: Parameters of the networks that generation runs: the ConVAE decoder
            and the flow. The ConVAE encoder is not counted.

    Example:
        >>> sampler = sampler_from_checkpoint(load_checkpoint("nf.pt"), device="cuda")
        >>> jets = sampler.sample_gev(10_000, torch.Generator().manual_seed(0), batch_size=2048)
        >>> jets.shape, jets.dtype
        ((10000, 30, 3), dtype('float64'))
    """

    def __init__(
        self,
        name: str,
        scaler: MinMaxScaler,
        *,
        convae: ConVAE | None = None,
        flow: RealNVP | None = None,
    ) -> None:
        expected = {"convae": (True, False), "convae-nf": (True, True), "nf": (False, True)}
        if expected.get(name) != (convae is not None, flow is not None):
            raise ValueError(
                f"invalid sampler {name!r} with convae={'set' if convae else None} and "
                f"flow={'set' if flow else None}: expected {SAMPLER_NAMES[0]!r} with a ConVAE, "
                f"{SAMPLER_NAMES[1]!r} with both, or {SAMPLER_NAMES[2]!r} with a flow"
            )

        self.name = name
        self.scaler = scaler
        self.convae = convae.eval() if convae is not None else None
        self.flow = flow.eval() if flow is not None else None

        networks = [module for module in (convae, flow) if module is not None]
        self.device = next(networks[0].parameters()).device
        self.n_particles = convae.config.n_particles if convae is not None else flow.dim // 3
        self.n_parameters = sum(parameter.numel() for parameter in self._generating_parameters())

    def __repr__(self) -> str:
        return f"JetSampler(name={self.name!r}, device={self.device}, n_parameters={self.n_parameters})"

    def _generating_parameters(self):
        if self.convae is not None:
            yield from self.convae.decoder.parameters()
        if self.flow is not None:
            yield from self.flow.parameters()

    @torch.no_grad()
    def sample_scaled(self, n: int, generator: torch.Generator) -> Tensor:
        """Generate jets in network space, without gradients.

        Args:
            n: Number of jets.
            generator: Source of z ~ N(0, I). Its device may differ from :attr:`device`,
                because z is drawn there and then moved.

        Returns:
            ``[n, n_particles, 3]`` scaled (px, py, pz) on :attr:`device`.

        Raises:
            ValueError: ``n`` is not a positive integer.
        """
        n = _check_count(n, "n")
        if self.flow is None:
            return self.convae.sample(n, generator)

        vectors = self.flow.sample(n, generator)
        if self.convae is None:
            return unflatten_jets(vectors, self.n_particles)
        return self.convae.decode(vectors)

    def sample_gev(self, n: int, generator: torch.Generator, batch_size: int | None = None) -> np.ndarray:
        """Generate jets in GeV.

        Args:
            n: Number of jets.
            generator: Source of z ~ N(0, I), as in :meth:`sample_scaled`.
            batch_size: Jets per network call, or None for all ``n`` at once. The batches
                draw from the same generator one after the other, so the jets differ from
                the unbatched ones but are reproducible for a given seed and batch size.

        Returns:
            float64 ``[n, n_particles, 3]`` (px, py, pz) in GeV on the CPU.

        Raises:
            ValueError: ``n`` or ``batch_size`` is not a positive integer.
        """
        n = _check_count(n, "n")
        batch_size = n if batch_size is None else _check_count(batch_size, "batch_size")

        jets = np.empty((n, self.n_particles, 3), dtype=np.float64)
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            scaled = self.sample_scaled(stop - start, generator)
            jets[start:stop] = self.scaler.inverse_transform(scaled.to("cpu", torch.float64)).numpy()
        return jets


def sampler_from_checkpoint(checkpoint: Mapping[str, Any], device: str | torch.device = "cpu") -> JetSampler:
    """Build the jet sampler of a checkpoint.

    A ``"convae"`` checkpoint gives a ``"convae"`` sampler, a ``"realnvp"`` checkpoint with
    ``latent_model`` a ``"convae-nf"`` sampler, and one without it an ``"nf"`` sampler.

    Args:
        checkpoint: As :func:`load_checkpoint` returns it, or ``TrainingResult.checkpoint``.
        device: Where the networks run.

    Returns:
        The sampler, with its networks in eval mode on ``device``.

    Raises:
        CheckpointError: A key is missing, the scaler or hyperparameters are invalid, the
            weights do not fit the hyperparameters, the flow's dimension does not match the
            ConVAE's latent dimension, or a standalone flow's dimension is not a multiple of 3.
    """
    _check_contents(checkpoint, "checkpoint")
    source = _describe(checkpoint)
    try:
        scaler = MinMaxScaler.from_state_dict(checkpoint["scaler"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{source}: invalid scaler ({error}). {_RETRAIN}") from error

    if checkpoint["kind"] == "convae":
        convae = _convae(checkpoint["hyperparameters"], checkpoint["state_dict"], source)
        return JetSampler("convae", scaler, convae=convae.to(device))

    flow = _flow(checkpoint["hyperparameters"], checkpoint["state_dict"], source)
    latent = _latent_model(checkpoint, source)
    if latent is None:
        if flow.dim % 3:
            raise CheckpointError(
                f"{source}: a standalone NF needs a dimension of 3 values (px, py, pz) per "
                f"constituent, but its dimension is {flow.dim}. {_RETRAIN}"
            )
        return JetSampler("nf", scaler, flow=flow.to(device))

    convae = _convae(latent["hyperparameters"], latent["state_dict"], f"{source}, latent_model")
    if flow.dim != convae.config.latent_dim:
        raise CheckpointError(
            f"{source}: the flow has dimension {flow.dim}, but its ConVAE has a latent "
            f"dimension of {convae.config.latent_dim}. {_RETRAIN}"
        )
    return JetSampler("convae-nf", scaler, convae=convae.to(device), flow=flow.to(device))
