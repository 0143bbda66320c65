"""A small DCGAN (Radford et al. 2016): a generator trained against a discriminator.

The paper's rules at 32 x 32: no pooling (strided convolutions in the discriminator, transposed
ones in the generator), BatchNorm in both except the generator's output and the discriminator's
input, ReLU in the generator with tanh at its output, LeakyReLU (0.2) in the discriminator.

* ``Generator``: z (N, latent) -> a 4 x 4 x 4w map (one transposed convolution) -> 8, 16, 32 px
  (three stride-2 transposed convolutions, 2w, w, then 3 channels) -> images (N, 3, 32, 32) in
  [0, 1] (tanh rescaled);
* ``Discriminator``: images in [0, 1] -> 16, 8, 4 px (three stride-2 convolutions, w, 2w, 4w)
  -> one logit per image (a 4 x 4 convolution), real = positive.

``DCGAN`` holds both so that ``pipeline train`` steps them with one optimiser: ``forward(x,
loss=True)`` returns per image the discriminator's loss (real x against a batch of fakes, the fakes
detached) plus the generator's non-saturating loss (``-log D(G(z))``, computed through a copy of the
discriminator's parameters cut from the graph, so it moves the generator only): simultaneous
gradient steps for the two players, with Adam's ``beta1 = 0.5`` as the paper's recipe
(``optimizer.beta1`` in the training spec).

The implicit density has no likelihood to report: the generator is measured by its samples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


class Generator(nn.Module):
    def __init__(self, latent: int = 64, width: int = 64):
        super().__init__()
        self.latent = latent
        w = width
        self.net = nn.Sequential(
            nn.ConvTranspose2d(latent, 4 * w, 4, 1, 0, bias=False), nn.BatchNorm2d(4 * w), nn.ReLU(True),
            nn.ConvTranspose2d(4 * w, 2 * w, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(True),
            nn.ConvTranspose2d(2 * w, w, 4, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(True),
            nn.ConvTranspose2d(w, 3, 4, 2, 1), nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (self.net(z[:, :, None, None]) + 1) / 2

    @torch.no_grad()
    def sample(self, generators: list[torch.Generator], size: int | None = None) -> torch.Tensor:
        """One image per generator, from z ~ N(0, I) drawn from it."""
        z = torch.stack([torch.randn(self.latent, generator=g) for g in generators]).to(next(self.parameters()).device)
        return self(z)


class Discriminator(nn.Module):
    def __init__(self, width: int = 64):
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(3, w, 4, 2, 1), nn.LeakyReLU(0.2, True),
            nn.Conv2d(w, 2 * w, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * w), nn.LeakyReLU(0.2, True),
            nn.Conv2d(2 * w, 4 * w, 4, 2, 1, bias=False), nn.BatchNorm2d(4 * w), nn.LeakyReLU(0.2, True),
            nn.Conv2d(4 * w, 1, 4, 1, 0),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images * 2 - 1).flatten()


class DCGAN(nn.Module):
    likelihood = False  # no density: training reports the two players' summed loss

    def __init__(self, latent: int = 64, width: int = 64, size: int = 32):
        super().__init__()
        if size != 32:
            raise ValueError(f"the DCGAN here makes 32 x 32 images, not {size} x {size}")
        self.generator, self.discriminator = Generator(latent, width), Discriminator(width)
        self.apply(init_weights)

    def forward(self, x: torch.Tensor, loss: bool = False) -> torch.Tensor:
        """``loss=True``: (N,) both players' losses on real images x (N, 3, 32, 32); else G(x) for z = x."""
        if not loss:
            return self.generator(x)
        z = torch.randn(len(x), self.generator.latent, device=x.device)
        fake = self.generator(z)
        real_logits = self.discriminator(x)
        fake_logits = self.discriminator(fake.detach())
        d_loss = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits), reduction="none") + \
            F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits), reduction="none")
        frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        g_logits = functional_call(self.discriminator, {**frozen, **dict(self.discriminator.named_buffers())}, (fake,))
        g_loss = F.binary_cross_entropy_with_logits(g_logits, torch.ones_like(g_logits), reduction="none")
        return d_loss + g_loss

    def sample(self, generators: list[torch.Generator], size: int | None = None) -> torch.Tensor:
        return self.generator.sample(generators)


def dcgan(*, weights=None, weights_backbone=None, num_classes: int | None = None, latent: int = 64, width: int = 64, size: int = 32) -> DCGAN:
    """Build the DCGAN (random init, the paper's). ``weights`` must be None: load checkpoints by path."""
    if weights is not None or weights_backbone is not None:
        raise ValueError("dcgan has no published weights; train one (pipeline train) and load it by path")
    return DCGAN(latent=latent, width=width, size=size)


def init_weights(module: nn.Module) -> None:
    """The paper's initialisation: N(0, 0.02) for convolutions, N(1, 0.02) for BatchNorm scales."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
