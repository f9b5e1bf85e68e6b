"""Tests for models.metrics (EMD_sum, jetnet metrics, FPND, truth floor) and models.particlenet."""

from __future__ import annotations

import dataclasses
import logging
import math
import socket
import sys
import types

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree
from scipy.stats import wasserstein_distance

from models import metrics
from models.jets import (
    KINEMATIC_NAMES,
    constituents_from_relative,
    jet_kinematics_numpy,
    relative_coordinates,
)
from models.metrics import EMDSum, JetNetMetricSettings, MetricInputError
from models.particlenet import ParticleNet, fpnd_resources_dir, knn_indices, load_fpnd_particlenet

#: Small sample sizes so that every jetnet metric runs in seconds on two CPU cores.
FAST_SETTINGS = JetNetMetricSettings(
    num_eval_samples=150,
    num_batches=3,
    cov_mmd_samples=30,
    cov_mmd_batches=2,
    fpd_min_samples=50,
    fpd_max_samples=100,
    fpd_batches=3,
    fpd_points=3,
    kpd_batches=3,
    kpd_batch_size=100,
    efp_jobs=1,
    fpnd_batch_size=50,
)


def toy_jets(n_jets: int, seed: int, spread: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Build gluon-like jets near 1 TeV: 8-30 constituents, pT-ordered, zero-padded.

    Returns constituents ``[n_jets, 30, 3]`` (px, py, pz) in GeV (float32) and the mask.
    ``spread`` is the standard deviation of etarel and phirel.
    """
    rng = np.random.default_rng(seed)
    counts = rng.integers(8, 31, n_jets)
    mask = np.arange(30)[None, :] < counts[:, None]

    fractions = rng.dirichlet(np.full(30, 0.6), n_jets) * mask
    fractions = -np.sort(-fractions / fractions.sum(axis=1, keepdims=True), axis=1)
    etarel = rng.normal(0.0, spread, (n_jets, 30))
    phirel = rng.normal(0.0, spread, (n_jets, 30))
    relative = np.stack([etarel, phirel, fractions], axis=-1)
    relative[~mask] = 0.0

    constituents = constituents_from_relative(
        relative,
        mask,
        jet_pt=rng.normal(1000.0, 80.0, n_jets),
        jet_eta=rng.uniform(-1.5, 1.5, n_jets),
        jet_phi=rng.uniform(-np.pi, np.pi, n_jets),
    )
    return constituents.astype(np.float32), mask


@pytest.fixture(scope="module")
def real_jets() -> tuple[np.ndarray, np.ndarray]:
    return toy_jets(400, seed=1)


@pytest.fixture(scope="module")
def other_real_jets() -> tuple[np.ndarray, np.ndarray]:
    return toy_jets(400, seed=2)


@pytest.fixture()
def no_network(monkeypatch):
    """Make every attempt to open a network connection fail the test."""

    def fail_connection(*args, **kwargs):
        raise AssertionError(f"a metric tried to open a network connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", fail_connection)
    monkeypatch.setattr(socket, "create_connection", fail_connection)


# --------------------------------------------------------------------------------------------
# EMD_sum


def test_emd_sum_two_particle_jets_by_hand():
    # generated jets: two 100 GeV particles along x and y. Reference jets: both along x.
    generated = np.zeros((3, 30, 3), dtype=np.float32)
    generated[:, 0] = [100.0, 0.0, 0.0]
    generated[:, 1] = [0.0, 100.0, 0.0]
    reference = np.zeros((4, 30, 3), dtype=np.float32)
    reference[:, 0] = [100.0, 0.0, 0.0]
    reference[:, 1] = [100.0, 0.0, 0.0]

    result = metrics.emd_sum(generated, reference)

    # m^2 = 2 E1 E2 (1 - cos 90 deg) = 20000 GeV^2, and a collinear massless pair has m = 0
    expected = {
        "mass": math.sqrt(20000.0),
        "energy": 0.0,
        "pt": 200.0 - math.sqrt(20000.0),
        "eta": 0.0,
        "phi": math.pi / 4,
    }
    for name, value in expected.items():
        assert result.per_quantity[name] == pytest.approx(value, abs=1e-4), name
    assert result.total == pytest.approx(sum(expected.values()), abs=1e-4)


def test_emd_sum_matches_scipy_per_quantity(real_jets, other_real_jets):
    generated, reference = real_jets[0], other_real_jets[0]

    result = metrics.emd_sum(generated, reference)

    generated_quantities = jet_kinematics_numpy(generated)
    reference_quantities = jet_kinematics_numpy(reference)
    assert isinstance(result, EMDSum)
    assert set(result.per_quantity) == set(KINEMATIC_NAMES)
    for name in KINEMATIC_NAMES:
        expected = wasserstein_distance(generated_quantities[name], reference_quantities[name])
        assert result.per_quantity[name] == pytest.approx(expected, rel=1e-12), name
    assert result.total == pytest.approx(sum(result.per_quantity.values()))


def test_emd_sum_identical_samples_zero(real_jets):
    result = metrics.emd_sum(real_jets[0], real_jets[0].copy())

    assert result.total == 0.0
    assert all(value == 0.0 for value in result.per_quantity.values())


def test_emd_sum_shifted_sample_scores_higher(real_jets, other_real_jets):
    reference = other_real_jets[0]

    same_distribution = metrics.emd_sum(real_jets[0], reference)
    # 10 % harder jets: mass, energy and pT all grow by 10 %
    shifted = metrics.emd_sum(real_jets[0] * 1.1, reference)

    assert shifted.total > same_distribution.total
    for name in ("mass", "energy", "pt"):
        assert shifted.per_quantity[name] > same_distribution.per_quantity[name], name


def test_emd_sum_histogram_mode_within_bin_width(real_jets, other_real_jets):
    generated, reference = real_jets[0], other_real_jets[0] * 1.05
    bins = 200

    exact = metrics.emd_sum(generated, reference)
    histogram = metrics.emd_sum(generated, reference, bins=bins)

    generated_quantities = jet_kinematics_numpy(generated)
    reference_quantities = jet_kinematics_numpy(reference)
    for name in KINEMATIC_NAMES:
        values = np.concatenate([generated_quantities[name], reference_quantities[name]])
        bin_width = (values.max() - values.min()) / bins
        assert abs(histogram.per_quantity[name] - exact.per_quantity[name]) <= bin_width, name


def test_emd_sum_nan_generated_returns_inf(real_jets, other_real_jets, caplog):
    generated = real_jets[0].copy()
    generated[3, 0, 0] = np.nan

    with caplog.at_level(logging.WARNING, logger="models.metrics"):
        result = metrics.emd_sum(generated, other_real_jets[0])

    assert result.total == math.inf
    assert all(value == math.inf for value in result.per_quantity.values())
    assert "1 of 400 generated jets" in caplog.text


def test_emd_sum_mask_drops_constituents(real_jets, other_real_jets):
    constituents, mask = real_jets
    noisy = constituents.copy()
    noisy[~mask] = 5.0  # padding slots filled with junk that the mask must remove

    masked = metrics.emd_sum(noisy, other_real_jets[0], generated_mask=mask)
    clean = metrics.emd_sum(constituents, other_real_jets[0])

    assert masked.total == pytest.approx(clean.total, rel=1e-9)


def test_emd_sum_rejects_invalid_input(real_jets):
    reference = real_jets[0].copy()
    reference[0, 0, 0] = np.inf

    with pytest.raises(MetricInputError, match="reference jets contain NaN"):
        metrics.emd_sum(real_jets[0], reference)
    with pytest.raises(MetricInputError, match="shape"):
        metrics.emd_sum(real_jets[0][..., :2], real_jets[0])
    with pytest.raises(MetricInputError, match="no jets"):
        metrics.emd_sum(real_jets[0][:0], real_jets[0])
    with pytest.raises(MetricInputError, match="bins"):
        metrics.emd_sum(real_jets[0], real_jets[0], bins=0)


# --------------------------------------------------------------------------------------------
# ParticleNet


def points_without_ties(n_jets: int, n_features: int, seed: int) -> torch.Tensor:
    """Random jets whose last particle is a single zero-padded one, so no distances tie."""
    points = np.random.default_rng(seed).normal(size=(n_jets, 30, n_features))
    points[:, -1] = 0.0
    return torch.as_tensor(points)


@pytest.mark.parametrize("n_features", [2, 3, 67])
def test_knn_matches_kdtree_without_ties(n_features):
    points = points_without_ties(5, n_features, seed=n_features)

    neighbours = knn_indices(points, 16).numpy()

    for jet, jet_points in enumerate(points.numpy()):
        distances, indices = cKDTree(jet_points).query(jet_points, k=17)
        # the particle itself is its own nearest point; torch_cluster's loop=False drops it
        assert (indices[:, 0] == np.arange(30)).all()
        np.testing.assert_array_equal(neighbours[jet], indices[:, 1:])


def test_knn_with_padding_picks_nearest_distances():
    # 20 padded particles at the origin, which tie with each other at distance 0
    points = points_without_ties(4, 2, seed=7)
    points[:, 10:] = 0.0

    neighbours = knn_indices(points, 16).numpy()

    for jet, jet_points in enumerate(points.numpy()):
        full = np.linalg.norm(jet_points[:, None] - jet_points[None, :], axis=-1)
        np.fill_diagonal(full, np.inf)
        expected = np.sort(full, axis=1)[:, :16]
        chosen = np.take_along_axis(full, neighbours[jet], axis=1)
        np.testing.assert_allclose(chosen, expected, atol=1e-12)
        assert not (neighbours[jet] == np.arange(30)[:, None]).any(), "self-loop in the kNN graph"


def test_particlenet_state_dict_loads_strictly():
    path = fpnd_resources_dir() / "pnet_state_dict.pt"
    stored = torch.load(path, map_location="cpu", weights_only=True)
    network = ParticleNet()

    result = network.load_state_dict(stored, strict=True)

    assert not result.missing_keys
    assert not result.unexpected_keys
    assert set(network.state_dict()) == set(stored)
    assert network.edge_convs[2].nn is network.edge_nets[2]


def test_particlenet_loader_sets_eval_mode():
    network = load_fpnd_particlenet()
    jets = torch.as_tensor(points_without_ties(3, 3, seed=3), dtype=torch.float32)

    assert not network.training
    assert all(not module.training for module in network.modules())
    torch.testing.assert_close(network(jets), network(jets), rtol=0, atol=0)


def reference_activations(network: ParticleNet, jet: np.ndarray) -> np.ndarray:
    """Per-particle loop over one jet, with numpy brute-force neighbours, as jetnet defines it."""
    x = torch.as_tensor(jet, dtype=torch.float32)
    for block, edge_net in enumerate(network.edge_nets):
        coordinates = x[:, :2] if block == 0 else x
        points = coordinates.numpy()
        distances = np.linalg.norm(points[:, None] - points[None, :], axis=-1)
        np.fill_diagonal(distances, np.inf)
        aggregated = []
        for i in range(len(x)):
            nearest = np.argsort(distances[i], kind="stable")[: network.k]
            centre = x[i].expand(network.k, -1)
            aggregated.append(edge_net(torch.cat([centre, x[nearest] - centre], dim=1)).mean(dim=0))
        x = torch.cat([torch.stack(aggregated), x], dim=1)
    return network.fc1(x.mean(dim=0, keepdim=True))[0].numpy()


def test_particlenet_matches_per_particle_loop():
    network = load_fpnd_particlenet()
    jets = points_without_ties(1, 3, seed=11).float() * 0.3

    with torch.inference_mode():
        batched = network.activations(jets).numpy()
        looped = np.stack([reference_activations(network, jet) for jet in jets.numpy()])

    np.testing.assert_allclose(batched, looped, rtol=1e-4, atol=1e-4)


def reference_knn_graph(x, k, batch, loop=False, flow="source_to_target"):
    """Brute-force ``torch_cluster.knn_graph``: the k + 1 nearest points, minus the point itself.

    Ties go to the lower index, so a padded particle with more than k padded particles before it
    misses itself among the k + 1 and keeps k + 1 neighbours, as torch_cluster can.
    """
    assert not loop
    assert flow == "source_to_target"
    sources, targets = [], []
    points = x.numpy()
    for graph in torch.unique(batch):
        nodes = torch.nonzero(batch == graph).flatten().numpy()
        distances = np.linalg.norm(points[nodes, None] - points[None, nodes], axis=-1)
        for row, centre in enumerate(nodes):
            nearest = nodes[np.argsort(distances[row], kind="stable")[: k + 1]]
            nearest = nearest[nearest != centre]
            sources += nearest.tolist()
            targets += [centre] * len(nearest)
    return torch.tensor([sources, targets])


class ReferenceEdgeConv(torch.nn.Module):
    """``torch_geometric.nn.EdgeConv(nn, aggr="mean")``: messages nn([x_i, x_j - x_i]) from j to i."""

    def __init__(self, nn, aggr):
        super().__init__()
        assert aggr == "mean"
        self.nn = nn

    def forward(self, x, edge_index):
        source, target = edge_index
        messages = self.nn(torch.cat([x[target], x[source] - x[target]], dim=1))
        totals = torch.zeros(len(x), messages.shape[1]).index_add_(0, target, messages)
        counts = torch.zeros(len(x)).index_add_(0, target, torch.ones(len(target)))
        return totals / counts[:, None]


def reference_global_mean_pool(x, batch):
    return torch.stack([x[batch == graph].mean(dim=0) for graph in torch.unique(batch)])


def test_particlenet_matches_jetnet_forward(real_jets, monkeypatch):
    # jetnet's own _ParticleNet code, with brute-force stand-ins for its graph operations
    torch_cluster = types.ModuleType("torch_cluster")
    torch_cluster.knn_graph = reference_knn_graph
    geometric_nn = types.ModuleType("torch_geometric.nn")
    geometric_nn.EdgeConv = ReferenceEdgeConv
    geometric_nn.global_mean_pool = reference_global_mean_pool
    monkeypatch.setitem(sys.modules, "torch_cluster", torch_cluster)
    monkeypatch.setitem(sys.modules, "torch_geometric", types.ModuleType("torch_geometric"))
    monkeypatch.setitem(sys.modules, "torch_geometric.nn", geometric_nn)
    monkeypatch.delitem(sys.modules, "jetnet.evaluation.particlenet", raising=False)
    from jetnet.datasets import JetNet
    from jetnet.evaluation.particlenet import _ParticleNet

    path = fpnd_resources_dir() / "pnet_state_dict.pt"
    jetnet_network = _ParticleNet(30, 3)
    jetnet_network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    jetnet_network.eval()
    network = load_fpnd_particlenet()
    # the two sparsest and two fullest jets: with 18 or more padded particles, the padded
    # ones tie beyond the k + 1 = 17 nearest and some keep 17 neighbours in the reference
    constituents, mask = real_jets
    order = np.argsort(mask.sum(axis=1), kind="stable")
    chosen = np.concatenate([order[:2], order[-2:]])
    assert mask[chosen[0]].sum() <= 12
    relative = relative_coordinates(constituents[chosen], mask[chosen])
    jets = JetNet.fpnd_norm(torch.as_tensor(relative), inplace=False)

    with torch.inference_mode():
        expected = jetnet_network(jets, ret_activations=True)
        actual = network.activations(jets)
        expected_logits = jetnet_network(jets)
        actual_logits = network(jets)

    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(actual_logits, expected_logits, rtol=1e-4, atol=1e-4)


def test_particlenet_invariant_to_particle_order(real_jets):
    # padded particles tie in the kNN search; the activations must not depend on which is taken
    network = load_fpnd_particlenet()
    relative = torch.as_tensor(relative_coordinates(*real_jets)[:20])
    permutation = torch.randperm(30, generator=torch.Generator().manual_seed(0))

    with torch.inference_mode():
        original = network.activations(relative)
        permuted = network.activations(relative[:, permutation])

    torch.testing.assert_close(permuted, original, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# FPND


def test_fpnd_finite_and_grows_with_distortion(real_jets, no_network):
    relative = relative_coordinates(*real_jets)[:150]
    distorted = relative.copy()
    distorted[..., :2] *= 3.0  # jets three times wider

    value = metrics.fpnd(relative, batch_size=50)
    distorted_value = metrics.fpnd(distorted, batch_size=50)

    assert math.isfinite(value)
    assert value >= 0.0
    assert distorted_value > value


def test_fpnd_same_for_any_batch_size(real_jets):
    relative = relative_coordinates(*real_jets)[:150]

    one_batch = metrics.fpnd(relative, batch_size=150)

    # 64 leaves a last batch of 22 jets
    for batch_size in (7, 64):
        assert metrics.fpnd(relative, batch_size=batch_size) == pytest.approx(one_batch, rel=1e-4), batch_size


def test_fpnd_nan_jets_return_inf(real_jets, caplog):
    relative = relative_coordinates(*real_jets)[:10]
    relative[0, 0, 0] = np.nan

    with caplog.at_level(logging.WARNING, logger="models.metrics"):
        assert metrics.fpnd(relative) == math.inf
    assert "FPND is inf" in caplog.text


def test_fpnd_rejects_wrong_particle_count(real_jets):
    with pytest.raises(MetricInputError, match="30 particles"):
        metrics.fpnd(relative_coordinates(*real_jets)[:10, :20])
    with pytest.raises(MetricInputError, match="jet types"):
        metrics.fpnd(relative_coordinates(*real_jets)[:10], jet_type="w")


# --------------------------------------------------------------------------------------------
# jetnet metrics, evaluation and truth floor


@pytest.fixture(scope="module")
def evaluation(real_jets, other_real_jets) -> dict[str, float]:
    generated, _ = real_jets
    reference, reference_mask = other_real_jets
    # generated jets without a mask: their padding is exactly zero, so pT > 0 recovers it
    return metrics.evaluate_generated(
        generated[:150], None, reference[:150], reference_mask[:150], seed=0, settings=FAST_SETTINGS
    )


def test_evaluate_generated_returns_plain_floats(evaluation):
    expected = {
        "emd_sum", "emd_mass", "emd_energy", "emd_pt", "emd_eta", "emd_phi",
        "w1m", "w1m_err", "w1p", "w1p_err", "w1p_etarel", "w1p_phirel", "w1p_ptrel",
        "w1efp", "w1efp_err", "cov", "mmd", "fpd", "fpd_err", "kpd", "kpd_err", "fpnd",
    }  # fmt: skip

    assert set(evaluation) == expected
    for key, value in evaluation.items():
        assert type(value) is float, f"{key} is {type(value).__name__}"
        assert math.isfinite(value), key
    assert 0.0 < evaluation["cov"] <= 1.0


def test_evaluate_generated_derives_mask_from_pt(real_jets, other_real_jets):
    constituents, mask = real_jets

    derived = metrics.evaluate_generated(constituents, None, *other_real_jets, seed=0, jetnet=False)
    explicit = metrics.evaluate_generated(
        constituents, mask, *other_real_jets, seed=0, jetnet=False
    )

    assert derived == explicit


def test_evaluate_generated_nan_jets_score_inf(real_jets, other_real_jets):
    generated = real_jets[0].copy()
    generated[:, :] = np.nan  # a diverged decoder: no constituent may be taken for padding

    result = metrics.evaluate_generated(
        generated, None, *other_real_jets, seed=0, settings=FAST_SETTINGS
    )

    assert result["emd_sum"] == math.inf
    assert result["w1m"] == math.inf
    assert result["fpnd"] == math.inf


def test_jetnet_metrics_seed_reproducible(real_jets, other_real_jets, no_network):
    from jetnet.evaluation import gen_metrics

    generated = relative_coordinates(*real_jets)[:100]
    reference = relative_coordinates(*other_real_jets)[:100]
    settings = dataclasses.replace(FAST_SETTINGS, num_eval_samples=100, fpnd=False)
    jetnet_rng = gen_metrics.rng

    first = metrics.jetnet_metrics(generated, reference, seed=5, settings=settings)
    second = metrics.jetnet_metrics(generated, reference, seed=5, settings=settings)
    other_seed = metrics.jetnet_metrics(generated, reference, seed=6, settings=settings)

    assert first == second
    assert other_seed["w1m"] != first["w1m"]
    assert "fpnd" not in first
    assert gen_metrics.rng is jetnet_rng, "jetnet's module generator was not restored"


def test_jetnet_metrics_grow_with_distortion(real_jets, other_real_jets, evaluation):
    constituents, mask = real_jets
    # the generated jets of `evaluation`, three times wider in etarel and phirel
    generated = relative_coordinates(constituents[:150], mask[:150])
    generated[..., :2] *= 3.0
    reference = relative_coordinates(other_real_jets[0][:150], other_real_jets[1][:150])

    distorted = metrics.jetnet_metrics(
        generated, reference, seed=0, settings=dataclasses.replace(FAST_SETTINGS, fpnd=False)
    )

    for key in ("w1m", "w1p_etarel", "w1p_phirel", "w1efp", "mmd", "fpd", "kpd"):
        assert distorted[key] > evaluation[key], key


def test_jetnet_metrics_diverged_generated(real_jets, caplog):
    relative = relative_coordinates(*real_jets)[:50]
    generated = relative.copy()
    generated[0, 0, 2] = np.inf

    with caplog.at_level(logging.WARNING, logger="models.metrics"):
        result = metrics.jetnet_metrics(generated, relative, seed=0, settings=FAST_SETTINGS)

    assert result["w1m"] == math.inf
    assert result["fpnd"] == math.inf
    assert math.isnan(result["cov"])
    assert math.isnan(result["w1m_err"])
    assert "1 of 50 generated jets" in caplog.text


def test_truth_floor_splits_disjoint_halves(real_jets, monkeypatch):
    constituents, mask = real_jets
    calls = []
    def record_call(*args, **kwargs):
        calls.append(args)
        return {}

    monkeypatch.setattr(metrics, "evaluate_generated", record_call)

    metrics.truth_floor(constituents[:101], mask[:101], seed=3)
    metrics.truth_floor(constituents[:101], mask[:101], seed=3)
    metrics.truth_floor(constituents[:101], mask[:101], seed=4)

    # each jet's leading constituent is unique, so it identifies the jet
    def jet_ids(jets):
        return {tuple(jet[0]) for jet in jets}

    first, first_mask, second, second_mask, seed = calls[0]
    assert len(first) == len(second) == 50
    assert not jet_ids(first) & jet_ids(second)
    assert jet_ids(first) | jet_ids(second) <= jet_ids(constituents[:101])
    np.testing.assert_array_equal(first_mask, (first != 0).any(axis=-1))
    assert seed == 3
    np.testing.assert_array_equal(calls[1][0], first)
    assert jet_ids(calls[2][0]) != jet_ids(first)


def test_truth_floor_below_distorted_model(real_jets, other_real_jets):
    constituents = np.concatenate([real_jets[0], other_real_jets[0]])
    mask = np.concatenate([real_jets[1], other_real_jets[1]])

    floor = metrics.truth_floor(constituents, mask, seed=0, jetnet=False)
    distorted = metrics.evaluate_generated(
        real_jets[0] * 1.1, real_jets[1], *other_real_jets, seed=0, jetnet=False
    )

    assert 0.0 < floor["emd_sum"] < distorted["emd_sum"]


def test_settings_reject_invalid_sizes():
    with pytest.raises(MetricInputError, match="num_batches"):
        JetNetMetricSettings(num_batches=0)
    with pytest.raises(MetricInputError, match="fpd_min_samples"):
        JetNetMetricSettings(fpd_min_samples=100, fpd_max_samples=100)


def test_failed_fpd_fit_is_nan():
    from models.metrics import _checked_fpd

    # jetnet's curve_fit returns its starting point 1.0 with zero error when it cannot fit
    assert all(math.isnan(value) for value in _checked_fpd(1.0, 0.0))
    assert _checked_fpd(1.0, 0.02) == (1.0, 0.02)
    assert _checked_fpd(15.3, 0.0) == (15.3, 0.0)
