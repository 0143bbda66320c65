"""A small convolutional VAE (Kingma & Welling 2014) with an exact discrete likelihood.

Encoder: three stride-2 3x3 convolutions (32-64-128 channels, BatchNorm-free, SiLU) and a linear
layer to the mean and log-variance of ``q(z | x)``, a diagonal Gaussian of ``latent`` dimensions.
Decoder: a linear layer to 128 x (s/8) x (s/8) and three stride-2 transposed convolutions back to
s x s, ending in 6 channels: per sub-pixel the mean and log-scale of a *discretised logistic*
(Salimans et al. 2017, PixelCNN++): the probability of each 8-bit value is the logistic's mass
on its bin of width 2/255 in [-1, 1], the two end bins taking the tails. So ``log p(x | z)`` is a
proper log-probability of the 8-bit image and the ELBO bounds its log-likelihood: bits per
dimension are comparable with the PixelCNN's exact ones.

``nll(x)``: (N,) the negative ELBO in nats (one reparameterised sample of z), an upper bound of
``-log p(x)``; ``sample(generators)``: decoded means of z ~ N(0, I), one image per generator; ``encode(x)``: q's means;
``decode(z)``: the means as images in [0, 1]. Images are s x s with s a multiple of 8 (32 here).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

BIN = 1 / 255  # half the width of an 8-bit value's bin in [-1, 1]
MIN_LOG_SCALE = -7.0  # a logistic scale of 0.0009, a tenth of a bin: sharper adds nothing
# Below about 10 grey levels: a scale free to grow explains every error by width, and the means get
# gradients of (x - mean) / (2 s^2) (tiny at s ~ 1): the same VAE, free, was at 7.3 bits/dim after 300
# steps, with a hard cap at 5.9, its means' squared error 10x lower. The bound is soft (MAX - softplus(MAX -
# raw)): a hard clamp passes no gradient above it, so a scale that starts there never shrinks (69% of the
# sub-pixels of a VAE trained so stayed at exactly e^-2.5, limiting it to 5.4 bits each at best).
MAX_LOG_SCALE = -2.5


def discretised_logistic_log_prob(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) for x on the 8-bit grid scaled to [-1, 1], elementwise (same shapes)."""
    centred = x - mean
    inv_scale = torch.exp(-log_scale)
    plus = inv_scale * (centred + BIN)
    minus = inv_scale * (centred - BIN)
    log_cdf_plus = plus - F.softplus(plus)  # log sigmoid(plus): all the mass below the bin's top (x = -1)
    log_survival_minus = -F.softplus(minus)  # log (1 - sigmoid(minus)): all the mass above its bottom (x = 1)
    mass = torch.sigmoid(plus) - torch.sigmoid(minus)
    # A bin far from the mean has a mass that rounds to 0 and no gradient: there the density at the
    # bin's centre times its width stands in (PixelCNN++'s fallback), which keeps pulling the mean.
    centre = inv_scale * centred
    log_density_times_width = centre - log_scale - 2 * F.softplus(centre) + math.log(2 * BIN)
    middle = torch.where(mass > 1e-5, torch.log(mass.clamp_min(1e-12)), log_density_times_width)
    return torch.where(x < -1 + BIN, log_cdf_plus, torch.where(x > 1 - BIN, log_survival_minus, middle))


class ConvVAE(nn.Module):
    def __init__(self, latent: int = 32, size: int = 32):
        super().__init__()
        if size % 8:
            raise ValueError(f"image size {size} is not a multiple of 8")
        self.latent, self.size, s = latent, size, size // 8
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.SiLU(), nn.Flatten(),
            nn.Linear(128 * s * s, 2 * latent),
        )
        self.project = nn.Linear(latent, 128 * s * s)
        self.decoder = nn.Sequential(
            nn.SiLU(),
            nn.ConvTranspose2d(128, 64, 4, stride=2, padding=1), nn.SiLU(),
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.SiLU(),
            nn.ConvTranspose2d(32, 6, 4, stride=2, padding=1),
        )

    likelihood = True  # nll() bounds the negative log-likelihood: training and validation report bits/dim

    def forward(self, x: torch.Tensor, loss: bool = False) -> torch.Tensor:
        """``nll(x)`` with ``loss=True`` (training, through DDP); else the reconstruction of x from q's means."""
        return self.nll(x) if loss else self.decode(self.encode(x)[0])

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, s, s) in [0, 1] -> q(z | x)'s (mean, log-variance), each (N, latent)."""
        mean, log_var = self.encoder(x * 2 - 1).chunk(2, dim=1)
        return mean, log_var.clamp(-12, 8)

    def logistic(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, latent) -> the decoder's (mean, log-scale), each (N, 3, s, s), means in [-1, 1]."""
        s = self.size // 8
        out = self.decoder(self.project(z).view(-1, 128, s, s))
        mean, log_scale = out.chunk(2, dim=1)
        return torch.tanh(mean), (MAX_LOG_SCALE - F.softplus(MAX_LOG_SCALE - log_scale)).clamp(min=MIN_LOG_SCALE)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(N, latent) -> (N, 3, s, s) images in [0, 1] (the logistics' means)."""
        return (self.logistic(z)[0] + 1) / 2

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, s, s) in [0, 1] -> (N,) negative ELBO in nats: reconstruction + KL(q || N(0, I))."""
        mean, log_var = self.encode(x)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * log_var)
        pixel_mean, log_scale = self.logistic(z)
        target = torch.round(x * 255) / 255 * 2 - 1
        reconstruction = -discretised_logistic_log_prob(target, pixel_mean, log_scale).flatten(1).sum(dim=1)
        kl = 0.5 * (mean.pow(2) + log_var.exp() - 1 - log_var).sum(dim=1)
        return reconstruction + kl

    @torch.no_grad()
    def sample(self, generators: list[torch.Generator], size: int | None = None) -> torch.Tensor:
        """One image per generator: the decoded means of z ~ N(0, I) drawn from it."""
        z = torch.stack([torch.randn(self.latent, generator=g) for g in generators]).to(next(self.parameters()).device)
        return self.decode(z)


def conv_vae(*, weights=None, weights_backbone=None, num_classes: int | None = None, latent: int = 32, size: int = 32) -> ConvVAE:
    """Build the VAE (random init). ``weights`` must be None: load checkpoints by path."""
    if weights is not None or weights_backbone is not None:
        raise ValueError("conv_vae has no published weights; train one (pipeline train) and load it by path")
    return ConvVAE(latent=latent, size=size)
