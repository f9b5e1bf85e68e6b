"""Jet kinematics on jets whose values can be computed by hand."""

import math

import numpy as np
import pytest
import torch

from models.jets import (
    constituent_coordinates,
    constituents_from_relative,
    jet_kinematics,
    jet_kinematics_numpy,
    relative_coordinates,
    wrap_phi,
)


def two_particle_jet(dtype=torch.float64):
    # Two massless 100 GeV particles along x and y: E = 200 GeV, |p| = 100 sqrt(2) GeV,
    # so m^2 = 200^2 - 2 * 100^2 = 20000 GeV^2 and pT = 100 sqrt(2) GeV at phi = pi/4.
    return torch.tensor([[[100.0, 0.0, 0.0], [0.0, 100.0, 0.0], [0.0, 0.0, 0.0]]], dtype=dtype)


def test_two_particle_jet_mass_by_hand():
    kinematics = jet_kinematics(two_particle_jet())

    assert kinematics["mass"].item() == pytest.approx(math.sqrt(20000.0))
    assert kinematics["energy"].item() == pytest.approx(200.0)
    assert kinematics["pt"].item() == pytest.approx(100.0 * math.sqrt(2.0))
    assert kinematics["eta"].item() == pytest.approx(0.0)
    assert kinematics["phi"].item() == pytest.approx(math.pi / 4)


def test_back_to_back_jet_mass():
    jet = torch.tensor([[[0.0, 0.0, 50.0], [0.0, 0.0, -50.0]]], dtype=torch.float64)
    kinematics = jet_kinematics(jet)

    assert kinematics["mass"].item() == pytest.approx(100.0)
    assert kinematics["pt"].item() == pytest.approx(0.0)
    assert kinematics["eta"].item() == 0.0


def test_collinear_jet_is_massless_without_nan_gradients():
    jet = torch.tensor([[[30.0, 40.0, 0.0], [3.0, 4.0, 0.0]]], dtype=torch.float64, requires_grad=True)
    kinematics = jet_kinematics(jet)
    sum(kinematics.values()).sum().backward()

    assert kinematics["mass"].item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(jet.grad).all()


def test_empty_jet_has_finite_zero_kinematics_and_gradients():
    jet = torch.zeros(2, 30, 3, requires_grad=True)
    kinematics = jet_kinematics(jet)
    sum(kinematics.values()).sum().backward()

    for name, value in kinematics.items():
        assert torch.equal(value, torch.zeros(2)), name
    assert torch.isfinite(jet.grad).all()


def test_constituent_coordinates_of_one_particle():
    # pT = 5 GeV from (3, 4); pz = pT sinh(1) puts it at eta = 1.
    particle = torch.tensor([[3.0, 4.0, 5.0 * math.sinh(1.0)]], dtype=torch.float64)
    pt, eta, phi = constituent_coordinates(particle)

    assert pt.item() == pytest.approx(5.0)
    assert eta.item() == pytest.approx(1.0)
    assert phi.item() == pytest.approx(math.atan2(4.0, 3.0))


def test_wrap_phi_maps_into_minus_pi_pi():
    wrapped = wrap_phi(np.array([3 * math.pi / 2, -3 * math.pi / 2, 0.5]))

    np.testing.assert_allclose(wrapped, [-math.pi / 2, math.pi / 2, 0.5])


def test_relative_coordinates_of_two_particle_jet():
    jet = two_particle_jet().numpy()
    mask = np.array([[True, True, False]])
    relative = relative_coordinates(jet, mask)

    # Jet axis at phi = pi/4: the particles sit at -pi/4 and +pi/4 from it, each with
    # pT / jet pT = 100 / (100 sqrt 2).
    np.testing.assert_allclose(relative[0, 0], [0.0, -math.pi / 4, 1 / math.sqrt(2)], atol=1e-6)
    np.testing.assert_allclose(relative[0, 1], [0.0, math.pi / 4, 1 / math.sqrt(2)], atol=1e-6)
    np.testing.assert_array_equal(relative[0, 2], [0.0, 0.0, 0.0])


def test_relative_phi_wraps_across_the_branch_cut():
    # Two particles at phi = +-(pi - 0.1): the jet axis is at phi = pi, and their offsets
    # are +-0.1, not +-(2 pi - 0.1).
    angle = math.pi - 0.1
    jet = np.array([[[math.cos(angle), math.sin(angle), 0.0], [math.cos(angle), -math.sin(angle), 0.0]]]) * 50.0
    relative = relative_coordinates(jet, np.ones((1, 2), bool))

    np.testing.assert_allclose(np.sort(relative[0, :, 1]), [-0.1, 0.1], atol=1e-6)


def test_relative_round_trip_restores_constituents():
    rng = np.random.default_rng(7)
    pt = rng.uniform(5.0, 200.0, size=(4, 6))
    eta = rng.uniform(-0.5, 0.5, size=(4, 6))
    phi = rng.uniform(-0.4, 0.4, size=(4, 6)) + 1.0
    jets = np.stack([pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)], axis=-1)
    mask = np.ones((4, 6), bool)
    mask[:, 5] = False
    jets[~mask] = 0.0

    kinematics = jet_kinematics_numpy(jets)
    rebuilt = constituents_from_relative(
        relative_coordinates(jets, mask), mask, kinematics["pt"], kinematics["eta"], kinematics["phi"]
    )

    np.testing.assert_allclose(rebuilt, jets, rtol=1e-5, atol=1e-4)


def test_rebuilt_jet_keeps_mass():
    # The pT-weighted phirel is 0.6 * 0.05 - 0.4 * 0.075 = 0, so the jet axis lands on phi = 0.
    relative = np.array([[[0.1, 0.05, 0.6], [-0.1, -0.075, 0.4]]])
    mask = np.ones((1, 2), bool)
    jet = constituents_from_relative(relative, mask, np.array([1000.0]), np.array([0.3]))
    kinematics = jet_kinematics_numpy(jet)

    # Two massless particles: m^2 = 2 pT1 pT2 (cosh(d eta) - cos(d phi)).
    expected_mass = math.sqrt(2 * 600.0 * 400.0 * (math.cosh(0.2) - math.cos(0.125)))
    assert kinematics["mass"][0] == pytest.approx(expected_mass)
    assert kinematics["phi"][0] == pytest.approx(0.0, abs=1e-3)
