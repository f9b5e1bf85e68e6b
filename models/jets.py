"""Jet kinematics and the conversion between absolute and relative constituent coordinates."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "N_PARTICLES",
    "KINEMATIC_NAMES",
    "constituent_coordinates",
    "jet_four_vector",
    "jet_kinematics",
    "jet_kinematics_numpy",
    "relative_coordinates",
    "constituents_from_relative",
    "wrap_phi",
]

#: Constituents kept per jet, ordered by decreasing pT and zero-padded.
N_PARTICLES = 30

#: Jet quantities that EMD_sum compares, in this order.
KINEMATIC_NAMES = ("mass", "energy", "pt", "eta", "phi")


def _safe_sqrt(x: Tensor) -> Tensor:
    """Square root that is 0 with a zero gradient for x <= 0, so that massless or empty
    jets never produce NaN gradients."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), 0.0)


def _safe_atan2(y: Tensor, x: Tensor) -> Tensor:
    """atan2 that is 0 with a zero gradient at the origin."""
    origin = (x == 0) & (y == 0)
    return torch.where(origin, 0.0, torch.atan2(y, torch.where(origin, torch.ones_like(x), x)))


def _safe_asinh_ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """asinh(numerator / denominator), 0 with a zero gradient where the denominator is 0."""
    zero = denominator == 0
    return torch.where(zero, 0.0, torch.asinh(numerator / torch.where(zero, 1.0, denominator)))


def wrap_phi(phi: Tensor | np.ndarray) -> Tensor | np.ndarray:
    """Wrap azimuthal angles in radians to [-pi, pi)."""
    return (phi + math.pi) % (2 * math.pi) - math.pi


def constituent_coordinates(constituents: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Compute each constituent's (pT in GeV, eta, phi in radians).

    Args:
        constituents: ``[..., n_particles, 3]`` with features (px, py, pz) in GeV. Padded
            constituents are all zero and get pT, eta and phi of 0.

    Returns:
        Three tensors of shape ``[..., n_particles]``: pT, eta and phi.
    """
    px, py, pz = constituents.unbind(-1)
    pt = _safe_sqrt(px**2 + py**2)
    return pt, _safe_asinh_ratio(pz, pt), _safe_atan2(py, px)


def jet_four_vector(constituents: Tensor) -> Tensor:
    """Sum massless constituents into the jet four-vector.

    Args:
        constituents: ``[..., n_particles, 3]`` (px, py, pz) in GeV; zero rows are padding.

    Returns:
        ``[..., 4]`` with (E, px, py, pz) in GeV, each constituent's energy taken as |p|
        (massless, as in JetNet and the HLS4ML data).
    """
    energy = _safe_sqrt((constituents**2).sum(-1)).sum(-1, keepdim=True)
    return torch.cat([energy, constituents.sum(-2)], dim=-1)


def jet_kinematics(constituents: Tensor) -> dict[str, Tensor]:
    """Compute jet mass, energy and pT (GeV), pseudorapidity eta and azimuth phi (radians).

    Args:
        constituents: ``[..., n_particles, 3]`` (px, py, pz) in GeV; zero rows are padding.

    Returns:
        A dict keyed by :data:`KINEMATIC_NAMES`, each value of shape ``[...]``. Every
        quantity is differentiable without NaN gradients, including at zero mass and for
        an empty jet.
    """
    energy, px, py, pz = jet_four_vector(constituents).unbind(-1)
    pt = _safe_sqrt(px**2 + py**2)
    return {
        "mass": _safe_sqrt(energy**2 - px**2 - py**2 - pz**2),
        "energy": energy,
        "pt": pt,
        "eta": _safe_asinh_ratio(pz, pt),
        "phi": _safe_atan2(py, px),
    }


def jet_kinematics_numpy(constituents: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`jet_kinematics` for numpy arrays, computed in float64."""
    with torch.no_grad():
        values = jet_kinematics(torch.as_tensor(np.asarray(constituents, dtype=np.float64)))
    return {name: value.numpy() for name, value in values.items()}


def relative_coordinates(constituents: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Convert absolute constituents to JetNet's relative coordinates.

    Args:
        constituents: ``[n_jets, n_particles, 3]`` (px, py, pz) in GeV.
        mask: ``[n_jets, n_particles]``, true for real constituents.

    Returns:
        ``[n_jets, n_particles, 3]`` float32 with features (etarel, phirel, ptrel):
        eta minus jet eta, phi minus jet phi wrapped to [-pi, pi), and pT over jet pT.
        Padded constituents are all zero, as in JetNet's files.
    """
    tensor = torch.as_tensor(np.asarray(constituents, dtype=np.float64))
    mask = np.asarray(mask, dtype=bool)
    with torch.no_grad():
        pt, eta, phi = (x.numpy() for x in constituent_coordinates(tensor))
        jet = {k: v.numpy() for k, v in jet_kinematics(tensor * torch.as_tensor(mask)[..., None]).items()}

    jet_pt = np.where(jet["pt"] > 0, jet["pt"], 1.0)[:, None]
    relative = np.stack(
        [
            eta - jet["eta"][:, None],
            wrap_phi(phi - jet["phi"][:, None]),
            pt / jet_pt,
        ],
        axis=-1,
    )
    relative[~mask] = 0.0
    return relative.astype(np.float32)


def constituents_from_relative(
    relative: np.ndarray,
    mask: np.ndarray,
    jet_pt: np.ndarray,
    jet_eta: np.ndarray,
    jet_phi: np.ndarray | float = 0.0,
) -> np.ndarray:
    """Rebuild absolute (px, py, pz) in GeV from JetNet's relative coordinates.

    Args:
        relative: ``[n_jets, n_particles, 3]`` (etarel, phirel, ptrel).
        mask: ``[n_jets, n_particles]``, true for real constituents.
        jet_pt: ``[n_jets]`` jet pT in GeV.
        jet_eta: ``[n_jets]`` jet pseudorapidity.
        jet_phi: ``[n_jets]`` or a scalar, jet azimuth in radians. JetNet files do not store
            it; the default of 0 rotates every jet to phi = 0, which changes no jet mass, pT,
            energy or eta, and makes the jet phi distribution a spike at 0.

    Returns:
        ``[n_jets, n_particles, 3]`` float64 (px, py, pz), zero for padded constituents.
    """
    relative = np.asarray(relative, dtype=np.float64)
    pt = relative[..., 2] * np.asarray(jet_pt, dtype=np.float64)[:, None]
    eta = relative[..., 0] + np.asarray(jet_eta, dtype=np.float64)[:, None]
    phi = relative[..., 1] + np.broadcast_to(np.asarray(jet_phi, dtype=np.float64), pt.shape[:1])[:, None]
    constituents = np.stack([pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)], axis=-1)
    constituents[~np.asarray(mask, dtype=bool)] = 0.0
    return constituents
