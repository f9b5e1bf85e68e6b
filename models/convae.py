"""Convolutional variational autoencoder (ConVAE) for jets of constituents in (px, py, pz)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "ACTIVATIONS",
    "ConVAE",
    "ConVAEConfig",
    "ConVAEConfigError",
]

#: Activation functions that the ConVAE accepts, keyed by the name used in configs and
#: search spaces. LeakyReLU uses PyTorch's default negative slope of 0.01.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "ReLU": nn.ReLU,
    "GELU": nn.GELU,
    "LeakyReLU": nn.LeakyReLU,
    "SELU": nn.SELU,
    "ELU": nn.ELU,
}


class ConVAEConfigError(ValueError):
    """Invalid ConVAE hyperparameters, such as a kernel wider than the jet."""


@dataclass(frozen=True)
class ConVAEConfig:
    """Hyperparameters of :class:`ConVAE`.

    Construction validates the values and raises :class:`ConVAEConfigError` for a value
    out of range or a combination that leaves no width after the convolutions.

    Arguments:
        latent_dim: Size of the latent space.
        n_filters: Output channels of the first convolution. Layer i has
            ``2 ** (i - 1) * n_filters`` channels.
        kernel_size: Kernel width k along the particle axis. The first kernel is
            ``(n_features, k)`` and the later ones are ``(1, k)``.
        linear_nodes: Width of the hidden linear layer in the encoder and decoder.
        n_conv_layers: Number of convolutions in the encoder, mirrored by as many transposed
            convolutions in the decoder. Orzari et al. (2023) search 1 to 4. More layers are
            accepted while the jet keeps a positive width.
        activation: A key of :data:`ACTIVATIONS`.
        n_particles: Constituents per jet.
        n_features: Features per constituent, (px, py, pz) by default.
    """

    latent_dim: int
    n_filters: int
    kernel_size: int
    linear_nodes: int
    n_conv_layers: int
    activation: str = "ReLU"
    n_particles: int = 30
    n_features: int = 3

    def __post_init__(self) -> None:
        for name in (
            "latent_dim",
            "n_filters",
            "kernel_size",
            "linear_nodes",
            "n_conv_layers",
            "n_particles",
            "n_features",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConVAEConfigError(
                    f"Invalid ConVAE hyperparameter {name}={value!r}: expected a positive integer."
                )

        if self.activation not in ACTIVATIONS:
            raise ConVAEConfigError(
                f"Invalid ConVAE activation {self.activation!r}: expected one of {', '.join(ACTIVATIONS)}."
            )

        if self.encoded_width < 1:
            raise ConVAEConfigError(
                f"Invalid ConVAE hyperparameters kernel_size={self.kernel_size} with "
                f"n_conv_layers={self.n_conv_layers}: each convolution removes kernel_size - 1 = "
                f"{self.kernel_size - 1} of the {self.n_particles} particle positions, which leaves "
                f"a width of {self.encoded_width}. Use a smaller kernel_size or fewer layers so that "
                f"n_particles - n_conv_layers * (kernel_size - 1) is at least 1."
            )

    @property
    def encoded_width(self) -> int:
        """Width along the particle axis after the last convolution (stride 1, no padding)."""
        return self.n_particles - self.n_conv_layers * (self.kernel_size - 1)

    @property
    def encoded_channels(self) -> int:
        """Channels of the last convolution."""
        return 2 ** (self.n_conv_layers - 1) * self.n_filters

    @property
    def flat_size(self) -> int:
        """Number of values in the flattened output of the last convolution."""
        return self.encoded_channels * self.encoded_width


class ConVAE(nn.Module):
    r"""Convolutional variational autoencoder for jets, after Orzari et al. (2023).

    A jet ``[B, n_particles, n_features]`` is read as a one-channel image of height
    ``n_features`` (px, py, pz) and width ``n_particles``. The encoder runs the convolutions
    with stride 1 and no padding, each followed by the activation. The first kernel
    ``(n_features, k)`` spans all features, which leaves a height of 1. The output is
    flattened and passed through ``Linear(flat, linear_nodes)``, the activation and
    ``Linear(linear_nodes, 2 * latent_dim)``. The two halves of the result are the mean and
    the log-variance of the latent Gaussian.

    The decoder mirrors the encoder: ``Linear(latent_dim, linear_nodes)`` and
    ``Linear(linear_nodes, flat)``, each followed by the activation, then the transposed
    convolutions in reverse order. The last one has kernel ``(n_features, k)`` and one output
    channel, and a sigmoid maps the result into (0, 1), the range of the min-max scaled
    constituents.

    References:
        | LHC hadronic jet generation using convolutional variational autoencoders with
          normalizing flows (Orzari et al., 2023)
        | https://arxiv.org/abs/2310.13138

    Arguments:
        config: The hyperparameters. :class:`ConVAEConfig` validates them when it is built,
            so an impossible combination raises :class:`ConVAEConfigError` before any layer
            exists.

    Example:
        >>> model = ConVAE(ConVAEConfig(latent_dim=20, n_filters=8, kernel_size=5,
        ...                             linear_nodes=100, n_conv_layers=3))
        >>> reconstruction, mean, logvar = model(torch.rand(4, 30, 3))
        >>> reconstruction.shape, mean.shape
        (torch.Size([4, 30, 3]), torch.Size([4, 20]))
    """

    def __init__(self, config: ConVAEConfig):
        super().__init__()

        self.config = config
        activation = ACTIVATIONS[config.activation]
        channels = [1] + [2**i * config.n_filters for i in range(config.n_conv_layers)]
        kernels = [(config.n_features, config.kernel_size)] + [
            (1, config.kernel_size)
        ] * (config.n_conv_layers - 1)

        # encoder
        encoder: list[nn.Module] = []
        for i, kernel in enumerate(kernels):
            encoder += [nn.Conv2d(channels[i], channels[i + 1], kernel), activation()]
        encoder += [
            nn.Flatten(),
            nn.Linear(config.flat_size, config.linear_nodes),
            activation(),
            nn.Linear(config.linear_nodes, 2 * config.latent_dim),
        ]
        self.encoder = nn.Sequential(*encoder)

        # decoder
        decoder: list[nn.Module] = [
            nn.Linear(config.latent_dim, config.linear_nodes),
            activation(),
            nn.Linear(config.linear_nodes, config.flat_size),
            activation(),
            nn.Unflatten(1, (config.encoded_channels, 1, config.encoded_width)),
        ]
        for i in reversed(range(config.n_conv_layers)):
            decoder.append(nn.ConvTranspose2d(channels[i + 1], channels[i], kernels[i]))
            decoder.append(activation() if i > 0 else nn.Sigmoid())
        self.decoder = nn.Sequential(*decoder)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Encode scaled jets into the parameters of the latent Gaussian.

        Args:
            x: ``[B, n_particles, n_features]`` min-max scaled (px, py, pz).

        Returns:
            ``(mean, logvar)``, each ``[B, latent_dim]``.
        """
        image = x.transpose(1, 2).unsqueeze(1)
        mean, logvar = self.encoder(image).chunk(2, dim=-1)
        return mean, logvar

    def decode(self, z: Tensor) -> Tensor:
        """Decode latent vectors into scaled jets.

        Args:
            z: ``[B, latent_dim]``.

        Returns:
            ``[B, n_particles, n_features]`` scaled (px, py, pz), each value in (0, 1).
        """
        return self.decoder(z).squeeze(1).transpose(1, 2)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Encode, draw z with the reparameterisation trick and decode.

        Args:
            x: ``[B, n_particles, n_features]`` min-max scaled (px, py, pz).
            generator: Random generator for the noise, on the same device as ``x``. The
                default draws from PyTorch's global generator.

        Returns:
            ``(reconstruction, mean, logvar)``: the decoded ``[B, n_particles, n_features]``
            and the latent parameters ``[B, latent_dim]``.
        """
        mean, logvar = self.encode(x)

        # reparameterisation
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        z = mean + torch.exp(0.5 * logvar) * noise

        return self.decode(z), mean, logvar

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Generate jets by decoding z ~ N(0, 1).

        Gradients are tracked as in any forward pass. Wrap the call in
        :func:`torch.no_grad` for generation.

        Args:
            n: Number of jets.
            generator: Random generator for z. z is drawn on the generator's device and then
                moved to the model's, so a CPU generator with one seed gives the same z
                for a model on any device.

        Returns:
            ``[n, n_particles, n_features]`` scaled (px, py, pz) in (0, 1).
        """
        parameter = next(self.parameters())
        noise_device = generator.device if generator is not None else parameter.device
        z = torch.randn(
            n, self.config.latent_dim, generator=generator, device=noise_device, dtype=parameter.dtype
        )
        return self.decode(z.to(parameter.device))
