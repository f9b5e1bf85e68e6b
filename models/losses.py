"""ConVAE loss terms: chamfer distance between constituents, jet pT and mass MSE, and KL divergence."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from models.jets import jet_kinematics

__all__ = [
    "LossTerms",
    "LossWeights",
    "LossWeightsError",
    "chamfer_distance",
    "convae_loss",
    "gamma_m_range",
    "jet_mse",
    "kl_divergence",
]


class LossWeightsError(ValueError):
    """Invalid ConVAE loss weights, or invalid input to :func:`gamma_m_range`."""


class InverseScaler(Protocol):
    """Scaler that maps network-space constituents back to GeV, such as
    ``models.data.MinMaxScaler``."""

    def inverse_transform(self, x: Tensor) -> Tensor: ...


def chamfer_distance(a: Tensor, b: Tensor) -> Tensor:
    """Compute the chamfer (nearest-neighbour) distance between the constituents of two jets.

    Each constituent of ``a`` contributes the squared Euclidean distance in (px, py, pz) to
    its nearest constituent of ``b`` in the same jet, and each constituent of ``b``
    contributes the same towards ``a``. The result is the sum of both. It is a sum over
    constituents, not a mean, as in the original ConVAE code (borzari/ConVAE_Jet,
    ``core/models/vae.py``), so tuned values of alpha keep the same meaning. Padded
    constituents take part like real ones, so that the decoder learns to reproduce padding.

    Memory is O(B * N * M): the pairwise distances are computed within each jet only.

    Args:
        a: ``[B, N, 3]`` (px, py, pz), in any unit.
        b: ``[B, M, 3]`` in the same unit as ``a``.

    Returns:
        ``[B]``, one distance per jet, in the squared unit of the inputs.
    """
    # pairwise squared distances within each jet, [B, N, M]
    squared = (a.unsqueeze(-2) - b.unsqueeze(-3)).pow(2).sum(-1)

    # nearest neighbour in both directions
    a_to_b = squared.min(dim=-1).values.sum(-1)
    b_to_a = squared.min(dim=-2).values.sum(-1)

    return a_to_b + b_to_a


def jet_mse(input_gev: Tensor, output_gev: Tensor, gamma_pt: float, gamma_m: float) -> Tensor:
    """Compute the weighted MSE of jet pT and jet mass between two batches of jets.

    Jet pT and mass come from :func:`models.jets.jet_kinematics`, whose gradients stay finite
    for massless and empty jets. The MSEs are large: an error of 100 GeV adds 1e4 GeV^2, and
    a decoder that misses the whole pT of a 1 TeV jet adds 1e6 GeV^2, far above the chamfer
    distance in scaled units. They are not rescaled, so gamma_pt and gamma_m (and gamma in
    :func:`convae_loss`) carry the whole balance between the terms.

    Args:
        input_gev: ``[B, N, 3]`` reference constituents (px, py, pz) in GeV.
        output_gev: ``[B, N, 3]`` reconstructed constituents (px, py, pz) in GeV.
        gamma_pt: Weight of the jet pT MSE.
        gamma_m: Weight of the jet mass MSE.

    Returns:
        Scalar ``gamma_pt * MSE(pT) + gamma_m * MSE(mass)`` in GeV^2, each MSE a mean over
        the jets of the batch.
    """
    reference = jet_kinematics(input_gev)
    reconstructed = jet_kinematics(output_gev)

    pt_mse = (reconstructed["pt"] - reference["pt"]).pow(2).mean()
    mass_mse = (reconstructed["mass"] - reference["mass"]).pow(2).mean()

    return gamma_pt * pt_mse + gamma_m * mass_mse


def kl_divergence(mean: Tensor, logvar: Tensor) -> Tensor:
    """Compute KL(N(mean, exp(logvar)) || N(0, I)), summed over the latent dimensions.

    Args:
        mean: ``[B, latent_dim]``.
        logvar: ``[B, latent_dim]``, natural logarithm of the variance.

    Returns:
        Scalar, the mean over the batch, in nats.
    """
    per_dimension = -0.5 * (1 + logvar - mean.pow(2) - logvar.exp())
    return per_dimension.sum(-1).mean()


@dataclass
class LossWeights:
    """Weights of the ConVAE loss ``(1 - beta) * (alpha * L_NND + gamma * L_J) + beta * KL``
    with ``L_J = gamma_pt * MSE(jet pT) + gamma_m * MSE(jet mass)``.

    Construction raises :class:`LossWeightsError` for a negative or non-finite weight and
    for beta outside [0, 1].

    Attributes:
        alpha: Weight of the chamfer distance L_NND.
        beta: Share of the KL divergence, in [0, 1].
        gamma: Weight of the jet term L_J.
        gamma_pt: Weight of the jet pT MSE.
        gamma_m: Weight of the jet mass MSE.
    """

    alpha: float
    beta: float
    gamma: float
    gamma_pt: float
    gamma_m: float

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
                raise LossWeightsError(
                    f"Invalid loss weight {field.name}={value!r}: expected a finite number of at least 0."
                )
        if self.beta > 1:
            raise LossWeightsError(f"Invalid loss weight beta={self.beta!r}: expected a value in [0, 1].")


@dataclass
class LossTerms:
    """ConVAE loss and its parts, each a scalar tensor averaged over the batch.

    Attributes:
        total: ``(1 - beta) * reconstruction + beta * kl``, the value to minimise.
        reconstruction: ``alpha * chamfer + gamma * jet``.
        chamfer: Chamfer distance in scaled units, before alpha.
        jet: ``gamma_pt * MSE(pT) + gamma_m * MSE(mass)`` in GeV^2, before gamma.
        kl: KL divergence in nats, before beta.
    """

    total: Tensor
    reconstruction: Tensor
    chamfer: Tensor
    jet: Tensor
    kl: Tensor


def convae_loss(
    x_scaled: Tensor,
    reconstruction_scaled: Tensor,
    mean: Tensor,
    logvar: Tensor,
    scaler: InverseScaler,
    weights: LossWeights,
) -> LossTerms:
    """Compute the ConVAE loss ``(1 - beta) * (alpha * L_NND + gamma * L_J) + beta * KL``.

    The chamfer distance L_NND compares the constituents in network space, where each of
    px, py and pz is min-max scaled to [0, 1]. The jet term L_J compares jet pT and mass in
    GeV, after ``scaler.inverse_transform``, so that it has a physical scale. L_J is in GeV^2
    (1e4 GeV^2 for errors of 100 GeV), and gamma must absorb that scale.

    Args:
        x_scaled: ``[B, N, 3]`` input constituents (px, py, pz) in network space.
        reconstruction_scaled: ``[B, N, 3]`` decoder output in network space.
        mean: ``[B, latent_dim]`` latent mean from the encoder.
        logvar: ``[B, latent_dim]`` latent log-variance from the encoder.
        scaler: Maps network space back to GeV and keeps torch tensors differentiable.
        weights: Loss weights.

    Returns:
        The total loss and its parts, each averaged over the batch.
    """
    # constituent term, in network space
    chamfer = chamfer_distance(x_scaled, reconstruction_scaled).mean()

    # jet term, in GeV
    jet = jet_mse(
        scaler.inverse_transform(x_scaled),
        scaler.inverse_transform(reconstruction_scaled),
        weights.gamma_pt,
        weights.gamma_m,
    )

    # latent term
    kl = kl_divergence(mean, logvar)

    reconstruction = weights.alpha * chamfer + weights.gamma * jet
    total = (1 - weights.beta) * reconstruction + weights.beta * kl
    return LossTerms(total=total, reconstruction=reconstruction, chamfer=chamfer, jet=jet, kl=kl)


def gamma_m_range(
    constituents: np.ndarray | Tensor,
    mask: np.ndarray | Tensor | None = None,
    spread: float = 0.2,
) -> tuple[float, float]:
    """Compute the search range of gamma_m from real jets.

    The centre of the range is the mean jet pT divided by the mean jet mass, and the range
    extends ``spread`` times the centre on either side.

    Args:
        constituents: ``[n_jets, n_particles, 3]`` (px, py, pz) in GeV.
        mask: ``[n_jets, n_particles]``, true for real constituents. Padded constituents are
            set to zero before the sums. The default treats every row as real.
        spread: Relative half-width of the range, in [0, 1).

    Returns:
        ``(low, high)`` = ``(ratio * (1 - spread), ratio * (1 + spread))``, dimensionless.

    Raises:
        LossWeightsError: for a spread outside [0, 1), no jets, or a mean jet mass of 0.
    """
    if not 0 <= spread < 1:
        raise LossWeightsError(f"Invalid gamma_m spread={spread!r}: expected a value in [0, 1).")

    jets = torch.as_tensor(constituents).detach().to(device="cpu", dtype=torch.float64)
    if jets.ndim != 3 or jets.shape[0] == 0 or jets.shape[-1] != 3:
        raise LossWeightsError(
            f"Invalid constituents of shape {tuple(jets.shape)} for gamma_m_range: expected "
            "[n_jets, n_particles, 3] with at least one jet."
        )
    if mask is not None:
        jets = jets * torch.as_tensor(mask).to(device="cpu", dtype=torch.float64).unsqueeze(-1)

    kinematics = jet_kinematics(jets)
    mean_pt = kinematics["pt"].mean().item()
    mean_mass = kinematics["mass"].mean().item()
    if mean_mass <= 0:
        raise LossWeightsError(
            "Cannot compute the gamma_m range: the mean jet mass is 0 GeV. "
            "Pass jets with more than one non-collinear constituent."
        )

    ratio = mean_pt / mean_mass
    return ratio * (1 - spread), ratio * (1 + spread)
