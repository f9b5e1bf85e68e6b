"""RealNVP invertibility, log-determinant, masks, density and sampling."""

import math
import re

import pytest
import torch
from torch import nn
from torch.autograd.functional import jacobian

from models.realnvp import (
    AffineCoupling,
    RealNVP,
    RealNVPConfigError,
    StandardNormal,
    alternating_masks,
)


def randomised_flow(dim=6, n_flows=4, hidden_sizes=(16, 12), seed=0, std=0.3) -> RealNVP:
    """Build a float64 flow and replace its zero-initialised weights with seeded noise, so
    that no coupling is the identity."""
    flow = RealNVP(dim, n_flows, list(hidden_sizes)).double()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in flow.parameters():
            parameter.copy_(std * torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
    return flow


def data(n=7, dim=6, seed=1) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_inverse_undoes_forward():
    flow = randomised_flow()
    x = data()

    z, _ = flow(x)

    assert not torch.allclose(z, x)
    assert torch.allclose(flow.inverse(z), x, atol=1e-5, rtol=0)


def test_forward_undoes_inverse():
    flow = randomised_flow()
    z = data()

    x = flow.inverse(z)

    assert torch.allclose(flow(x)[0], z, atol=1e-5, rtol=0)


def test_log_det_matches_autograd_jacobian():
    flow = randomised_flow(dim=6)
    x = data(n=3, dim=6)

    _, log_det = flow(x)

    for i in range(len(x)):
        matrix = jacobian(lambda row: flow(row.unsqueeze(0))[0].squeeze(0), x[i])
        expected = torch.linalg.slogdet(matrix).logabsdet
        assert log_det[i].item() == pytest.approx(expected.item(), abs=1e-10)


def test_log_det_matches_jacobian_for_odd_dim():
    # With 5 features the couplings alternate between 3 and 2 transformed features.
    flow = randomised_flow(dim=5, n_flows=3)
    x = data(n=1, dim=5)

    _, log_det = flow(x)
    matrix = jacobian(lambda row: flow(row.unsqueeze(0))[0].squeeze(0), x[0])

    assert log_det.item() == pytest.approx(torch.linalg.slogdet(matrix).logabsdet.item(), abs=1e-10)


def test_single_coupling_keeps_conditioning_features():
    mask = torch.tensor([True, False, True, False])
    coupling = AffineCoupling(mask, [8]).double()
    with torch.no_grad():
        for parameter in coupling.parameters():
            parameter.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(3))
    x = data(n=1, dim=4)[0]

    matrix = jacobian(lambda row: coupling(row.unsqueeze(0))[0].squeeze(0), x)

    # rows 0 and 2 are unit vectors, rows 1 and 3 depend on x_0 and x_2
    assert torch.equal(matrix[0], torch.tensor([1.0, 0, 0, 0], dtype=torch.float64))
    assert torch.equal(matrix[2], torch.tensor([0, 0, 1.0, 0], dtype=torch.float64))
    assert matrix[1, 0] != 0
    assert matrix[3, 2] != 0


def test_every_coordinate_is_transformed():
    flow = randomised_flow(dim=6, n_flows=2)
    x = data(n=1, dim=6)[0]

    matrix = jacobian(lambda row: flow(row.unsqueeze(0))[0].squeeze(0), x)
    identity = torch.eye(6, dtype=torch.float64)

    for i in range(6):
        assert not torch.allclose(matrix[i], identity[i]), f"output coordinate {i} is the identity"


def test_masks_alternate_and_cover_every_feature():
    masks = alternating_masks(5, 3)

    expected = torch.tensor(
        [
            [True, False, True, False, True],
            [False, True, False, True, False],
            [True, False, True, False, True],
        ]
    )
    assert torch.equal(masks, expected)
    assert (~masks).any(dim=0).all()


def test_couplings_use_the_alternating_masks():
    flow = RealNVP(dim=4, n_flows=3, hidden_sizes=[8])

    transformed = [coupling.transformed.tolist() for coupling in flow.transform.transforms]

    assert transformed == [[1, 3], [0, 2], [1, 3]]


def test_new_flow_is_identity_with_standard_normal_density():
    flow = RealNVP(dim=6, n_flows=5, hidden_sizes=[20, 20]).double()
    x = data()

    z, log_det = flow(x)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(-1)

    assert torch.equal(z, x)
    assert torch.equal(log_det, torch.zeros(7, dtype=torch.float64))
    assert torch.allclose(flow.log_prob(x), expected, atol=1e-12)


def test_density_integrates_to_one_in_two_dims():
    flow = randomised_flow(dim=2, n_flows=4, hidden_sizes=[8, 8], std=0.4)

    # midpoint rule on [-15, 15]^2 with 400 x 400 cells of 0.075 x 0.075
    edges = torch.linspace(-15, 15, 401, dtype=torch.float64)
    centres = 0.5 * (edges[1:] + edges[:-1])
    grid = torch.cartesian_prod(centres, centres)
    with torch.no_grad():
        integral = flow.log_prob(grid).exp().sum().item() * 0.075**2

    assert integral == pytest.approx(1.0, abs=2e-3)


def test_log_prob_matches_base_density_of_latent():
    flow = randomised_flow()
    x = data()

    z, log_det = flow(x)
    base = StandardNormal(6).double()

    assert torch.allclose(flow.log_prob(x), base.log_prob(z) + log_det, atol=1e-12)


def test_standard_normal_log_prob_by_hand():
    base = StandardNormal(2)

    # log N((0, 0)) = -log(2 pi), and each unit of squared norm subtracts 1/2
    value = base.log_prob(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))

    assert value[0].item() == pytest.approx(-math.log(2 * math.pi))
    assert value[1].item() == pytest.approx(-math.log(2 * math.pi) - 1.0)


def test_seeded_sample_is_reproducible():
    flow = randomised_flow()

    first = flow.sample(5, torch.Generator().manual_seed(7))
    second = flow.sample(5, torch.Generator().manual_seed(7))
    other = flow.sample(5, torch.Generator().manual_seed(8))

    assert first.shape == (5, 6)
    assert first.dtype == torch.float64
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_sample_maps_back_to_base_draw():
    flow = randomised_flow()

    x = flow.sample(5, torch.Generator().manual_seed(7))
    z = torch.randn(5, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    assert torch.allclose(flow(x)[0], z, atol=1e-10)


def test_log_scale_bounded_by_tanh():
    # Huge weights saturate tanh, so each transformed feature adds at most 1 to |log_det|:
    # 4 flows x 3 transformed features of 6.
    flow = randomised_flow(std=50.0)

    _, log_det = flow(data(n=50) * 10)

    assert (log_det.abs() <= 4 * 3).all()


def test_hidden_layers_take_their_own_widths():
    flow = RealNVP(dim=6, n_flows=2, hidden_sizes=[50, 120, 7])
    coupling = flow.transform.transforms[0]

    scale_linears = [m for m in coupling.scale if isinstance(m, nn.Linear)]
    shift_linears = [m for m in coupling.shift if isinstance(m, nn.Linear)]

    assert [m.out_features for m in scale_linears] == [50, 120, 7, 3]
    assert [m.out_features for m in shift_linears] == [50, 120, 7, 3]
    assert scale_linears[0].in_features == 3


def test_only_scale_network_ends_in_tanh():
    coupling = RealNVP(dim=6, n_flows=2, hidden_sizes=[10, 10]).transform.transforms[0]

    assert [type(m) for m in coupling.scale] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear, nn.Tanh]
    assert [type(m) for m in coupling.shift] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]


@pytest.mark.parametrize(
    ("arguments", "name"),
    [
        ({"dim": 1, "n_flows": 4, "hidden_sizes": [8]}, "dim=1"),
        ({"dim": 6, "n_flows": 1, "hidden_sizes": [8]}, "n_flows=1"),
        ({"dim": 6, "n_flows": 4, "hidden_sizes": []}, "hidden_sizes=[]"),
        ({"dim": 6, "n_flows": 4, "hidden_sizes": [8, 0]}, "hidden_sizes=[8, 0]"),
    ],
)
def test_invalid_hyperparameters_raise(arguments, name):
    with pytest.raises(RealNVPConfigError, match=re.escape(name)):
        RealNVP(**arguments)


def test_training_steps_raise_log_likelihood():
    # Data from N((2, -1), diag(0.25, 4)) has a mean log-likelihood of about -6.2 under the
    # initial standard normal and at best -2.84, its negative entropy.
    torch.manual_seed(0)
    flow = RealNVP(dim=2, n_flows=4, hidden_sizes=[16])
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(512, 2, generator=generator) * torch.tensor([0.5, 2.0]) + torch.tensor([2.0, -1.0])
    optimizer = torch.optim.Adam(flow.parameters(), lr=2e-2)

    with torch.no_grad():
        initial = flow.log_prob(x).mean().item()
    for _ in range(60):
        optimizer.zero_grad()
        loss = -flow.log_prob(x).mean()
        loss.backward()
        optimizer.step()
    final = flow.log_prob(x).mean().item()

    assert final > initial + 2.0
