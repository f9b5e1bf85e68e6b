"""Pure-PyTorch ParticleNet that runs jetnet's pretrained FPND classifier without torch_geometric.

jetnet 0.2.5 builds its ParticleNet from ``torch_cluster.knn_graph`` and
``torch_geometric.nn.EdgeConv``, neither of which is installed here. This module rebuilds the
same network on batched ``[n_jets, n_particles, n_features]`` tensors, with the same module
and parameter names, so that the weights jetnet ships for the Frechet ParticleNet Distance
(FPND) load with ``strict=True``.

References:
    Qu and Gouskos, "ParticleNet: Jet Tagging via Particle Clouds" (arXiv:1902.08570).
    Kansal et al., "Particle Cloud Generation with Message Passing Generative Adversarial
    Networks", which defines FPND (arXiv:2106.11535).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FPND_JET_TYPES",
    "EdgeConv",
    "EdgeNet",
    "ParticleNet",
    "fpnd_resources_dir",
    "knn_indices",
    "load_fpnd_particlenet",
    "load_fpnd_statistics",
]

logger = logging.getLogger(__name__)

#: Jet types for which jetnet ships real-jet activation statistics (gluon, light quark, top).
FPND_JET_TYPES = ("g", "q", "t")


def knn_indices(points: Tensor, k: int) -> Tensor:
    """Find the k nearest other particles of each particle, within its own jet.

    This is the neighbour list that ``torch_cluster.knn_graph(x, k, batch)`` builds with its
    defaults (``loop=False``, ``flow="source_to_target"``): Euclidean distance in the given
    features, every particle of the jet a candidate (padded ones included), the particle
    itself excluded.

    Ties are broken by the lower particle index, whereas torch_cluster leaves the order of
    tied points to its search. torch_cluster also searches for the k + 1 nearest points and
    drops the particle itself. When more than k other points coincide with a particle, the
    k + 1 points returned need not include it, and it then keeps k + 1 neighbours. Neither
    difference changes an EdgeConv output while the coinciding points have identical
    features, as zero-padded particles do. Distinct points at exactly equal distance can
    still lead to a different neighbour than torch_cluster picks.

    Args:
        points: ``[n_jets, n_particles, n_features]`` coordinates to measure distance in.
        k: number of neighbours, at most ``n_particles - 1``.

    Returns:
        ``[n_jets, n_particles, k]`` int64 particle indices into the same jet, nearest first.

    Raises:
        ValueError: if ``points`` is not 3-dimensional or a jet has k or fewer particles.
    """
    if points.dim() != 3:
        raise ValueError(
            f"points must have shape [n_jets, n_particles, n_features], got {tuple(points.shape)}"
        )
    n_particles = points.shape[1]
    if not 0 < k < n_particles:
        raise ValueError(
            f"k={k} nearest neighbours need at least k + 1 particles per jet, got {n_particles}"
        )

    # The direct formula keeps coinciding points at a distance of exactly 0. The default
    # matrix-product formula can leave them at a small non-zero value and reorder ties.
    distances = torch.cdist(points, points, compute_mode="donot_use_mm_for_euclid_dist")
    self_pairs = torch.eye(n_particles, dtype=torch.bool, device=points.device)
    distances = distances.masked_fill(self_pairs, float("inf"))

    order = torch.argsort(distances, dim=-1, stable=True)
    return order[..., :k]


class EdgeNet(nn.Module):
    """Edge MLP h of one EdgeConv block: three Linear-BatchNorm-ReLU layers.

    Arguments:
        in_size: number of particle features F. The MLP input is the 2F edge feature.
        layer_size: width of every layer and of the output.
    """

    def __init__(self, in_size: int, layer_size: int):
        super().__init__()
        self.in_size = in_size

        layers: list[nn.Module] = [
            nn.Linear(in_size * 2, layer_size),
            nn.BatchNorm1d(layer_size),
            nn.ReLU(),
        ]
        for _ in range(2):
            layers += [nn.Linear(layer_size, layer_size), nn.BatchNorm1d(layer_size), nn.ReLU()]

        # The name `model` fixes the state-dict keys of jetnet's weights.
        self.model = nn.Sequential(*layers)

    def forward(self, edges: Tensor) -> Tensor:
        """Map ``[n_edges, 2F]`` edge features ``[x_i, x_j - x_i]`` to ``[n_edges, layer_size]``."""
        return self.model(edges)

    def edge_messages(self, x: Tensor, neighbours: Tensor) -> Tensor:
        """Apply h to the edge feature ``[x_i, x_j - x_i]`` of every particle i and neighbour j.

        Equal to :meth:`forward` on the concatenated edge features up to float rounding, but
        the first Linear layer runs once per particle rather than once per edge, because
        ``W [x_i, x_j - x_i] + b = (W_i - W_j) x_i + W_j x_j + b`` with ``W = [W_i, W_j]``.

        Args:
            x: ``[n_jets, n_particles, F]`` particle features.
            neighbours: ``[n_jets, n_particles, k]`` indices from :func:`knn_indices`.

        Returns:
            ``[n_jets, n_particles, k, layer_size]``.
        """
        n_jets, n_particles, _ = x.shape
        k = neighbours.shape[-1]
        first = self.model[0]
        weight_centre, weight_neighbour = first.weight.split(self.in_size, dim=1)

        # first layer, split into the centre and the neighbour term
        centre_term = F.linear(x, weight_centre - weight_neighbour, first.bias)
        neighbour_term = F.linear(x, weight_neighbour)

        # neighbour terms: offset each jet's indices into the flattened particle list
        offsets = torch.arange(n_jets, device=x.device).view(n_jets, 1, 1) * n_particles
        flat_terms = neighbour_term.reshape(n_jets * n_particles, -1)
        gathered = flat_terms[(neighbours + offsets).reshape(-1)].view(n_jets, n_particles, k, -1)

        # remaining layers on all edges at once, so that BatchNorm normalises one
        # [n_edges, C] batch as in torch_geometric
        hidden = (centre_term.unsqueeze(2) + gathered).reshape(n_jets * n_particles * k, -1)
        return self.model[1:](hidden).view(n_jets, n_particles, k, -1)


class EdgeConv(nn.Module):
    """Edge convolution with mean aggregation over a fixed number of neighbours.

    For particle i with neighbours N(i), the output is the mean over j in N(i) of
    ``h([x_i, x_j - x_i])``, as in ``torch_geometric.nn.EdgeConv(h, aggr="mean")``, where
    messages flow from the neighbours j to the centre particle i.

    References:
        Wang et al., "Dynamic Graph CNN for Learning on Point Clouds" (arXiv:1801.07829).

    Arguments:
        edge_net: the edge MLP h, stored as ``self.nn`` (torch_geometric's attribute name, which
            the state-dict keys of jetnet's weights contain).
    """

    def __init__(self, edge_net: EdgeNet):
        super().__init__()
        self.nn = edge_net

    def forward(self, x: Tensor, neighbours: Tensor) -> Tensor:
        """Aggregate edge messages.

        Args:
            x: ``[n_jets, n_particles, F]`` particle features.
            neighbours: ``[n_jets, n_particles, k]`` indices from :func:`knn_indices`.

        Returns:
            ``[n_jets, n_particles, out]`` with ``out`` the width of the edge MLP.
        """
        return self.nn.edge_messages(x, neighbours).mean(dim=2)


class ParticleNet(nn.Module):
    """ParticleNet classifier with jetnet's FPND layout.

    Three EdgeConv blocks of widths 64, 128 and 256 with k = 16 neighbours. The first block
    finds neighbours in the first two features (etarel, phirel), the later blocks in all
    current features. Each block's output is concatenated with its input (skip connection),
    so the widths grow 3 -> 67 -> 195 -> 451. A mean over all particles of the jet, padded
    ones included as in jetnet, feeds ``fc1`` (451 -> 256), whose output is the FPND
    activation. ReLU, dropout 0.1 and ``fc2`` give the class logits.

    Module and parameter names match ``jetnet.evaluation.particlenet._ParticleNet``.
    ``edge_nets[i]`` and ``edge_convs[i].nn`` are the same module, so each edge MLP appears
    twice in the state dict, as it does in jetnet's file.

    Arguments:
        num_particles: particles per jet (jetnet's FPND weights: 30).
        num_features: features per particle (jetnet's FPND weights: 3).
        num_classes: classifier outputs (jetnet's FPND weights: 5 JetNet jet types).

    Example:
        >>> network = load_fpnd_particlenet()
        >>> network.activations(torch.zeros(2, 30, 3)).shape
        torch.Size([2, 256])
    """

    k = 16
    kernel_sizes = (64, 128, 256)
    fc_size = 256
    dropout = 0.1

    def __init__(self, num_particles: int = 30, num_features: int = 3, num_classes: int = 5):
        super().__init__()
        self.num_particles = num_particles
        self.num_features = num_features
        self.num_classes = num_classes

        # edge convolutions: input widths grow with each skip connection
        self.edge_nets = nn.ModuleList()
        self.edge_convs = nn.ModuleList()
        in_size = num_features
        for layer_size in self.kernel_sizes:
            edge_net = EdgeNet(in_size, layer_size)
            self.edge_nets.append(edge_net)
            self.edge_convs.append(EdgeConv(edge_net))
            in_size += layer_size

        # head
        self.fc1 = nn.Sequential(nn.Linear(in_size, self.fc_size))
        self.dropout_layer = nn.Dropout(p=self.dropout)
        self.fc2 = nn.Linear(self.fc_size, num_classes)

    def activations(self, jets: Tensor) -> Tensor:
        """Compute the ``fc1`` output that FPND compares, before any ReLU.

        Args:
            jets: ``[n_jets, num_particles, num_features]``, for jetnet's weights
                (etarel, phirel, ptrel) after ``jetnet.datasets.JetNet.fpnd_norm``.

        Returns:
            ``[n_jets, 256]``.

        Raises:
            ValueError: if ``jets`` does not have shape ``[n_jets, num_particles,
                num_features]``.
        """
        expected = (self.num_particles, self.num_features)
        if jets.dim() != 3 or tuple(jets.shape[1:]) != expected:
            raise ValueError(
                f"jets must have shape [n_jets, {expected[0]}, {expected[1]}], "
                f"got {tuple(jets.shape)}"
            )

        x = jets
        for i, edge_conv in enumerate(self.edge_convs):
            # the first block measures distance in (etarel, phirel) only
            coordinates = x[..., :2] if i == 0 else x
            neighbours = knn_indices(coordinates, self.k)
            x = torch.cat([edge_conv(x, neighbours), x], dim=-1)

        return self.fc1(x.mean(dim=1))

    def forward(self, jets: Tensor) -> Tensor:
        """Classify jets.

        Args:
            jets: as for :meth:`activations`.

        Returns:
            ``[n_jets, num_classes]`` logits, without softmax.
        """
        hidden = self.dropout_layer(torch.relu(self.activations(jets)))
        return self.fc2(hidden)


def fpnd_resources_dir(num_particles: int = 30) -> Path:
    """Locate jetnet's shipped FPND files without importing jetnet.

    Importing jetnet loads its whole evaluation stack, which takes several seconds, and the
    files only need the package's location.

    Args:
        num_particles: particles per jet. jetnet 0.2.5 ships files for 30 only.

    Returns:
        The folder with ``pnet_state_dict.pt`` and ``{g,q,t}_mu.txt`` / ``{g,q,t}_sigma.txt``.

    Raises:
        FileNotFoundError: if jetnet is not installed or has no files for ``num_particles``.
    """
    spec = importlib.util.find_spec("jetnet")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "jetnet is not installed, so its FPND weights are missing. "
            "Install jetnet>=0.2.5,<0.3."
        )

    package_dir = Path(next(iter(spec.submodule_search_locations)))
    resources = package_dir / "evaluation" / "fpnd_resources" / "jetnet"
    resources = resources / f"{num_particles}_particles"
    if not (resources / "pnet_state_dict.pt").is_file():
        raise FileNotFoundError(
            f"no FPND weights for {num_particles} particles in {resources}. "
            "jetnet ships them for 30 particles only."
        )
    return resources


def load_fpnd_particlenet(device: str | torch.device = "cpu") -> ParticleNet:
    """Build the 30-particle ParticleNet and load jetnet's FPND weights.

    Args:
        device: where to put the network.

    Returns:
        The network in eval mode (dropout off, BatchNorm with its stored running statistics),
        with gradients disabled.

    Raises:
        FileNotFoundError: see :func:`fpnd_resources_dir`.
    """
    path = fpnd_resources_dir(30) / "pnet_state_dict.pt"
    state_dict = torch.load(path, map_location=device, weights_only=True)

    network = ParticleNet(num_particles=30, num_features=3).to(device)
    network.load_state_dict(state_dict, strict=True)
    network.eval()
    network.requires_grad_(False)
    logger.debug("loaded FPND ParticleNet weights from %s", path)
    return network


def load_fpnd_statistics(jet_type: str = "g") -> tuple[np.ndarray, np.ndarray]:
    """Load jetnet's mean and covariance of ParticleNet activations on real JetNet jets.

    Args:
        jet_type: one of :data:`FPND_JET_TYPES`.

    Returns:
        ``(mu [256], sigma [256, 256])`` float64.

    Raises:
        ValueError: if ``jet_type`` has no stored statistics.
    """
    if jet_type not in FPND_JET_TYPES:
        raise ValueError(
            f"jetnet ships FPND statistics for jet types {FPND_JET_TYPES}, got {jet_type!r}"
        )
    resources = fpnd_resources_dir(30)
    mu = np.loadtxt(resources / f"{jet_type}_mu.txt")
    sigma = np.loadtxt(resources / f"{jet_type}_sigma.txt")
    return mu, sigma
