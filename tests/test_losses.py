"""ConVAE loss terms on jets whose values can be computed by hand."""

import math

import numpy as np
import pytest
import torch

from models.data import MinMaxScaler
from models.losses import (
    LossTerms,
    LossWeights,
    LossWeightsError,
    chamfer_distance,
    convae_loss,
    gamma_m_range,
    jet_mse,
    kl_divergence,
)

SQRT2 = math.sqrt(2.0)


def two_particle_jets():
    """Reference and reconstructed 2-particle jets in GeV.

    Reference: 100 GeV along x and 100 GeV along y, so E = 200 GeV, pT = 100 sqrt(2) GeV
    and m^2 = 200^2 - 2 * 100^2 = 20000 GeV^2.
    Reconstruction: both particles 100 GeV along x, so pT = 200 GeV and m = 0.
    """
    reference = torch.tensor([[[100.0, 0.0, 0.0], [0.0, 100.0, 0.0]]], dtype=torch.float64)
    reconstruction = torch.tensor([[[100.0, 0.0, 0.0], [100.0, 0.0, 0.0]]], dtype=torch.float64)
    return reference, reconstruction


# chamfer distance


def test_chamfer_two_particle_jets_by_hand():
    a = torch.tensor(
        [
            [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]],
            [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]],
        ]
    )
    b = torch.tensor(
        [
            [[0.0, 0.0, 0.0], [0.0, 2.0, 0.0]],
            [[1.0, 1.0, 2.0], [2.0, 2.0, 2.0]],
        ]
    )

    # Jet 0: a -> b gives 0 + 1 and b -> a gives 0 + 4.
    # Jet 1: a -> b gives 1 + 0 and b -> a gives 1 + 0.
    distance = chamfer_distance(a, b)

    assert distance.tolist() == [5.0, 2.0]


def test_chamfer_zero_for_identical_jets():
    jets = torch.rand(4, 30, 3, generator=torch.Generator().manual_seed(0))

    assert torch.equal(chamfer_distance(jets, jets.clone()), torch.zeros(4))


def test_chamfer_is_symmetric():
    generator = torch.Generator().manual_seed(1)
    a = torch.rand(6, 30, 3, generator=generator)
    b = torch.rand(6, 30, 3, generator=generator)

    assert torch.allclose(chamfer_distance(a, b), chamfer_distance(b, a))


def test_chamfer_ignores_particle_order():
    generator = torch.Generator().manual_seed(2)
    a = torch.rand(3, 30, 3, generator=generator)
    b = torch.rand(3, 30, 3, generator=generator)
    permutation = torch.randperm(30, generator=generator)

    assert torch.allclose(chamfer_distance(a, b), chamfer_distance(a[:, permutation], b))


def test_chamfer_accepts_different_particle_counts():
    a = torch.tensor([[[0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 4.0]]])
    b = torch.tensor([[[0.0, 0.0, 0.0]]])

    # a -> b gives 0 + 9 + 16, b -> a gives 0
    assert chamfer_distance(a, b).tolist() == [25.0]


def test_chamfer_compares_jets_pairwise_not_across_batch():
    # jet 1 of b equals jet 0 of a. A distance computed across the batch would find it
    # and report 0 for jet 0.
    a = torch.tensor([[[0.0, 0.0, 0.0]], [[5.0, 5.0, 5.0]]])
    b = torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]]])

    assert chamfer_distance(a, b).tolist() == [2.0, 150.0]


def test_chamfer_large_batch_matches_per_jet_loop():
    # 4096 jets of 30 particles need 4096 * 30 * 30 pairwise distances (about 44 MB with
    # the three feature differences). A [B, B, N, N] tensor would need 60 GB.
    generator = torch.Generator().manual_seed(3)
    a = torch.rand(4096, 30, 3, generator=generator)
    b = torch.rand(4096, 30, 3, generator=generator)

    distance = chamfer_distance(a, b)

    assert distance.shape == (4096,)
    for i in (0, 1234, 4095):
        assert distance[i].item() == pytest.approx(chamfer_distance(a[i : i + 1], b[i : i + 1]).item())


def test_chamfer_gradient_finite_for_identical_jets():
    a = torch.rand(2, 30, 3, generator=torch.Generator().manual_seed(4), requires_grad=True)

    chamfer_distance(a, a.detach().clone()).sum().backward()

    assert torch.isfinite(a.grad).all()
    assert torch.equal(a.grad, torch.zeros_like(a))


# jet pT and mass


def test_jet_mse_two_particle_jet_by_hand():
    reference, reconstruction = two_particle_jets()

    # The pT error squared is (200 - 100 sqrt(2))^2 = 60000 - 40000 sqrt(2) GeV^2.
    # The mass error squared is (0 - sqrt(20000))^2 = 20000 GeV^2.
    pt_squared_error = 60000.0 - 40000.0 * SQRT2
    mass_squared_error = 20000.0

    assert jet_mse(reference, reconstruction, 1.0, 0.0).item() == pytest.approx(pt_squared_error)
    assert jet_mse(reference, reconstruction, 0.0, 1.0).item() == pytest.approx(mass_squared_error)
    assert jet_mse(reference, reconstruction, 2.0, 0.5).item() == pytest.approx(
        2.0 * pt_squared_error + 0.5 * mass_squared_error
    )


def test_jet_mse_averages_over_jets():
    reference, reconstruction = two_particle_jets()
    batch_reference = torch.cat([reference, reference])
    batch_reconstruction = torch.cat([reconstruction, reference])

    # the second jet is reconstructed exactly, so the mean halves the error
    value = jet_mse(batch_reference, batch_reconstruction, 0.0, 1.0)

    assert value.item() == pytest.approx(20000.0 / 2)


def test_jet_mse_zero_for_identical_jets():
    reference, _ = two_particle_jets()

    assert jet_mse(reference, reference.clone(), 1.0, 1.0).item() == 0.0


@pytest.mark.parametrize(
    "output",
    [
        torch.zeros(1, 30, 3, dtype=torch.float64),
        torch.tensor([[[30.0, 40.0, 10.0], [3.0, 4.0, 1.0], [0.0, 0.0, 0.0]]], dtype=torch.float64),
    ],
    ids=["all_zero", "collinear"],
)
def test_jet_mse_gradient_finite_at_zero_mass(output):
    reference = torch.zeros_like(output)
    reference[0, 0] = torch.tensor([100.0, 0.0, 0.0])
    reference[0, 1] = torch.tensor([0.0, 100.0, 0.0])
    output = output.clone().requires_grad_(True)

    value = jet_mse(reference, output, 1.0, 1.0)
    value.backward()

    assert torch.isfinite(value)
    assert torch.isfinite(output.grad).all()


def test_jet_mse_gradient_finite_when_reference_massless():
    reference = torch.zeros(1, 30, 3, dtype=torch.float64)
    output = torch.zeros(1, 30, 3, dtype=torch.float64, requires_grad=True)

    jet_mse(reference, output, 1.0, 1.0).backward()

    assert torch.isfinite(output.grad).all()


# KL divergence


def test_kl_zero_for_standard_normal():
    assert kl_divergence(torch.zeros(5, 8), torch.zeros(5, 8)).item() == 0.0


def test_kl_by_hand():
    # Mean 1 with variance 1 gives 1/2 per dimension, and mean 0 with variance 2 gives
    # (2 - 1 - ln 2) / 2. Row 0 has two dimensions of the first kind, row 1 one of each.
    mean = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    logvar = torch.tensor([[0.0, 0.0], [0.0, math.log(2.0)]])

    expected = (1.0 + 0.5 + 0.5 * (1.0 - math.log(2.0))) / 2

    assert kl_divergence(mean, logvar).item() == pytest.approx(expected)


# combined loss


def test_convae_loss_equals_hand_combination():
    reference, reconstruction = two_particle_jets()
    scaler = MinMaxScaler(minimum=[-100.0, -100.0, -100.0], maximum=[100.0, 100.0, 100.0])
    x_scaled = scaler.transform(reference)
    reconstruction_scaled = scaler.transform(reconstruction).requires_grad_(True)
    mean = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    logvar = torch.zeros(1, 2, dtype=torch.float64)
    weights = LossWeights(alpha=2.0, beta=0.25, gamma=0.1, gamma_pt=1.0, gamma_m=0.5)

    terms = convae_loss(x_scaled, reconstruction_scaled, mean, logvar, scaler, weights)

    # Chamfer in GeV: (0, 100, 0) is 20000 GeV^2 from (100, 0, 0), all other nearest
    # distances are 0. Scaling divides lengths by 200 GeV, so 20000 / 200^2 = 0.5.
    chamfer = 0.5
    jet = (60000.0 - 40000.0 * SQRT2) + 0.5 * 20000.0
    kl = 0.5
    reconstruction_loss = 2.0 * chamfer + 0.1 * jet
    total = 0.75 * reconstruction_loss + 0.25 * kl

    assert isinstance(terms, LossTerms)
    assert terms.chamfer.item() == pytest.approx(chamfer)
    assert terms.jet.item() == pytest.approx(jet)
    assert terms.kl.item() == pytest.approx(kl)
    assert terms.reconstruction.item() == pytest.approx(reconstruction_loss)
    assert terms.total.item() == pytest.approx(total)


def test_convae_loss_gradient_reaches_reconstruction():
    reference, reconstruction = two_particle_jets()
    scaler = MinMaxScaler(minimum=[-100.0, -100.0, -100.0], maximum=[100.0, 100.0, 100.0])
    reconstruction_scaled = scaler.transform(reconstruction).requires_grad_(True)
    weights = LossWeights(alpha=1.0, beta=0.5, gamma=1.0, gamma_pt=1.0, gamma_m=1.0)

    terms = convae_loss(
        scaler.transform(reference),
        reconstruction_scaled,
        torch.zeros(1, 2, dtype=torch.float64),
        torch.zeros(1, 2, dtype=torch.float64),
        scaler,
        weights,
    )
    terms.total.backward()

    assert torch.isfinite(reconstruction_scaled.grad).all()
    assert reconstruction_scaled.grad.abs().sum() > 0


def test_convae_loss_beta_one_keeps_only_kl():
    reference, reconstruction = two_particle_jets()
    scaler = MinMaxScaler(minimum=[-100.0, -100.0, -100.0], maximum=[100.0, 100.0, 100.0])
    mean = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    weights = LossWeights(alpha=1.0, beta=1.0, gamma=1.0, gamma_pt=1.0, gamma_m=1.0)

    terms = convae_loss(
        scaler.transform(reference),
        scaler.transform(reconstruction),
        mean,
        torch.zeros(1, 2, dtype=torch.float64),
        scaler,
        weights,
    )

    assert terms.total.item() == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("name", "value"),
    [("alpha", -1.0), ("beta", 1.5), ("gamma", float("nan")), ("gamma_pt", float("inf")), ("gamma_m", "1")],
)
def test_invalid_loss_weights_raise(name, value):
    values = dict(alpha=1.0, beta=0.5, gamma=1.0, gamma_pt=1.0, gamma_m=1.0)
    values[name] = value

    with pytest.raises(LossWeightsError, match=name):
        LossWeights(**values)


def test_loss_weights_accept_numpy_floats():
    weights = LossWeights(alpha=np.float32(0.5), beta=np.float64(0.9), gamma=1, gamma_pt=0.0, gamma_m=2.0)

    assert weights.beta == pytest.approx(0.9)


# gamma_m range


def test_gamma_m_range_two_jets_by_hand():
    # Jet 0: 100 GeV along x and y, pT = m = 100 sqrt(2) GeV. Jet 1: two collinear 50 GeV
    # particles along x, pT = 100 GeV and m = 0. The third particle is padding and is
    # masked out. Mean pT / mean mass = (100 sqrt(2) + 100) / (100 sqrt(2)) = 1 + 1/sqrt(2).
    constituents = np.array(
        [
            [[100.0, 0.0, 0.0], [0.0, 100.0, 0.0], [500.0, 500.0, 500.0]],
            [[50.0, 0.0, 0.0], [50.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
        ],
        dtype=np.float32,
    )
    mask = np.array([[True, True, False], [True, True, False]])
    ratio = 1 + 1 / SQRT2

    low, high = gamma_m_range(constituents, mask)

    assert low == pytest.approx(0.8 * ratio, rel=1e-6)
    assert high == pytest.approx(1.2 * ratio, rel=1e-6)


def test_gamma_m_range_custom_spread_and_tensor_input():
    constituents = torch.tensor([[[100.0, 0.0, 0.0], [0.0, 100.0, 0.0]]])

    # pT = m for this jet, so the ratio is 1
    low, high = gamma_m_range(constituents, spread=0.5)

    assert low == pytest.approx(0.5)
    assert high == pytest.approx(1.5)


@pytest.mark.parametrize("spread", [-0.1, 1.0])
def test_gamma_m_range_invalid_spread_raises(spread):
    constituents = np.array([[[100.0, 0.0, 0.0], [0.0, 100.0, 0.0]]])

    with pytest.raises(LossWeightsError, match="spread"):
        gamma_m_range(constituents, spread=spread)


def test_gamma_m_range_massless_jets_raise():
    constituents = np.array([[[50.0, 0.0, 0.0], [25.0, 0.0, 0.0]]])

    with pytest.raises(LossWeightsError, match="mean jet mass is 0"):
        gamma_m_range(constituents)


def test_gamma_m_range_wrong_shape_raises():
    with pytest.raises(LossWeightsError, match="shape"):
        gamma_m_range(np.zeros((0, 30, 3)))
