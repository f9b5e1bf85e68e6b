"""ConVAE shapes, channel layout, activations and hyperparameter validation."""

from dataclasses import asdict

import pytest
import torch
from torch import nn

from models.convae import ACTIVATIONS, ConVAE, ConVAEConfig, ConVAEConfigError


def make_config(**overrides) -> ConVAEConfig:
    values = dict(latent_dim=6, n_filters=4, kernel_size=5, linear_nodes=16, n_conv_layers=2)
    values.update(overrides)
    return ConVAEConfig(**values)


def scaled_jets(n: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 30, 3, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n_conv_layers", [1, 2, 3, 4])
@pytest.mark.parametrize("kernel_size", [1, 2, 5, 8])
def test_output_shapes_for_layers_and_kernels(n_conv_layers, kernel_size):
    model = ConVAE(make_config(n_conv_layers=n_conv_layers, kernel_size=kernel_size))

    reconstruction, mean, logvar = model(scaled_jets())

    assert reconstruction.shape == (5, 30, 3)
    assert mean.shape == (5, 6)
    assert logvar.shape == (5, 6)
    assert model.decode(mean).shape == (5, 30, 3)


def test_largest_kernel_leaves_one_position():
    # 30 - 1 * (30 - 1) = 1 position after the single convolution.
    model = ConVAE(make_config(n_conv_layers=1, kernel_size=30))

    assert model.config.encoded_width == 1
    assert model(scaled_jets())[0].shape == (5, 30, 3)


def test_outputs_lie_in_open_unit_interval():
    model = ConVAE(make_config())

    reconstruction, _, _ = model(scaled_jets())

    assert (reconstruction > 0).all()
    assert (reconstruction < 1).all()


@pytest.mark.parametrize(
    ("kernel_size", "n_conv_layers"),
    [(9, 4), (11, 3), (31, 1), (16, 2)],
)
def test_impossible_kernel_raises(kernel_size, n_conv_layers):
    # 30 - n_conv_layers * (kernel_size - 1) is below 1 in every case.
    with pytest.raises(ConVAEConfigError) as error:
        ConVAE(make_config(kernel_size=kernel_size, n_conv_layers=n_conv_layers))

    message = str(error.value)
    assert f"kernel_size={kernel_size}" in message
    assert f"n_conv_layers={n_conv_layers}" in message


def test_config_error_is_value_error():
    assert issubclass(ConVAEConfigError, ValueError)


@pytest.mark.parametrize(
    "overrides",
    [
        {"latent_dim": 0},
        {"n_filters": -1},
        {"linear_nodes": 0},
        {"n_conv_layers": 0},
        {"kernel_size": 0},
        {"latent_dim": 2.5},
        {"n_filters": True},
    ],
)
def test_invalid_sizes_raise(overrides):
    (name, value), = overrides.items()

    with pytest.raises(ConVAEConfigError, match=f"{name}={value!r}"):
        make_config(**overrides)


def test_unknown_activation_lists_valid_names():
    with pytest.raises(ConVAEConfigError) as error:
        make_config(activation="relu")

    message = str(error.value)
    assert "'relu'" in message
    for name in ACTIVATIONS:
        assert name in message


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_each_activation_builds_and_runs(activation):
    model = ConVAE(make_config(activation=activation))

    reconstruction, mean, logvar = model(scaled_jets())
    reconstruction.sum().backward()

    used = {type(module) for module in model.modules()}
    assert ACTIVATIONS[activation] in used
    assert torch.isfinite(reconstruction).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_encoder_channels_double_per_layer():
    model = ConVAE(make_config(n_filters=3, n_conv_layers=4, kernel_size=3))

    convolutions = [m for m in model.encoder if isinstance(m, nn.Conv2d)]

    assert [c.out_channels for c in convolutions] == [3, 6, 12, 24]
    assert [c.in_channels for c in convolutions] == [1, 3, 6, 12]
    assert convolutions[0].kernel_size == (3, 3)
    assert all(c.kernel_size == (1, 3) for c in convolutions[1:])
    assert all(c.stride == (1, 1) and c.padding == (0, 0) for c in convolutions)


def test_decoder_mirrors_encoder():
    model = ConVAE(make_config(n_filters=3, n_conv_layers=3, kernel_size=4))

    transposed = [m for m in model.decoder if isinstance(m, nn.ConvTranspose2d)]

    assert [t.in_channels for t in transposed] == [12, 6, 3]
    assert [t.out_channels for t in transposed] == [6, 3, 1]
    assert transposed[-1].kernel_size == (3, 4)
    assert isinstance(model.decoder[-1], nn.Sigmoid)


def test_flatten_size_matches_linear_layer():
    # 3 layers of kernel 4 leave 30 - 3 * 3 = 21 positions with 4 * 3 = 12 channels.
    model = ConVAE(make_config(n_filters=3, n_conv_layers=3, kernel_size=4))

    first_linear = next(m for m in model.encoder if isinstance(m, nn.Linear))

    assert model.config.flat_size == 12 * 21
    assert first_linear.in_features == 12 * 21


def test_encoder_reads_features_as_height():
    # A single convolution with kernel (3, 1) covers one particle's (px, py, pz) at a time,
    # so changing particle 7 changes only position 7 of its output.
    model = ConVAE(make_config(n_conv_layers=1, kernel_size=1))
    convolution = model.encoder[0]
    jets = scaled_jets(1)
    changed = jets.clone()
    changed[0, 7] += 0.5

    def feature_map(x):
        return convolution(x.transpose(1, 2).unsqueeze(1))

    difference = (feature_map(changed) - feature_map(jets)).abs().sum(dim=(0, 1, 2))

    assert difference.shape == (30,)
    assert difference[7] > 0
    assert torch.count_nonzero(difference) == 1


def test_seeded_sample_is_reproducible():
    torch.manual_seed(0)
    model = ConVAE(make_config())

    first = model.sample(4, torch.Generator().manual_seed(42))
    second = model.sample(4, torch.Generator().manual_seed(42))
    other = model.sample(4, torch.Generator().manual_seed(43))

    assert first.shape == (4, 30, 3)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_seeded_forward_is_reproducible():
    model = ConVAE(make_config())
    jets = scaled_jets()

    first = model(jets, torch.Generator().manual_seed(1))[0]
    second = model(jets, torch.Generator().manual_seed(1))[0]

    assert torch.equal(first, second)


def test_forward_without_variance_decodes_mean():
    # The encoder's last layer outputs mean 0 and logvar -60, so the noise is scaled by
    # exp(-30) ~ 1e-13 and z equals the mean.
    model = ConVAE(make_config())
    final = model.encoder[-1]
    with torch.no_grad():
        final.weight.zero_()
        final.bias.zero_()
        final.bias[6:] = -60.0

    reconstruction, mean, _ = model(scaled_jets(), torch.Generator().manual_seed(0))

    assert torch.allclose(reconstruction, model.decode(mean), atol=1e-6)


def test_config_is_asdict_roundtrip():
    config = make_config(activation="GELU")

    assert ConVAEConfig(**asdict(config)) == config
