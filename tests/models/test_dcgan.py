"""The DCGAN's two networks have the paper's shapes, and a few adversarial steps move the discriminator."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.models.dcgan import Discriminator, Generator, init_weights


def test_shapes_ranges_and_a_discriminator_that_learns():
    torch.manual_seed(0)
    g, d = Generator(latent=16, width=8), Discriminator(width=8)
    g.apply(init_weights)
    d.apply(init_weights)
    fake = g(torch.randn(4, 16))
    assert fake.shape == (4, 3, 32, 32) and float(fake.min()) >= 0 and float(fake.max()) <= 1
    assert d(fake).shape == (4,)
    real = torch.zeros(8, 3, 32, 32)
    real[:, 0] = 1.0  # red images: easy to tell from the generator's grey
    optimiser = torch.optim.Adam(d.parameters(), lr=2e-3, betas=(0.5, 0.999))

    def loss() -> torch.Tensor:
        logits = torch.cat([d(real), d(g.sample([torch.Generator().manual_seed(k) for k in range(8)]))])
        return F.binary_cross_entropy_with_logits(logits, torch.cat([torch.ones(8), torch.zeros(8)]))

    first = float(loss())
    for _ in range(20):
        optimiser.zero_grad()
        loss().backward()
        optimiser.step()
    assert float(loss()) < 0.5 * first
    images = g.sample([torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)])
    assert torch.equal(images, g.sample([torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)]))  # seeds make the same images


def test_the_training_loss_moves_each_player_by_its_own_term():
    """forward(x, loss=True): the discriminator's gradient is its own loss's only (the generator's term goes
    through detached parameters); the generator gets a gradient (through the fakes)."""
    from pipeline.models.dcgan import DCGAN

    torch.manual_seed(0)
    gan = DCGAN(latent=8, width=4)
    x = torch.rand(4, 3, 32, 32)
    torch.manual_seed(1)
    gan(x, loss=True).mean().backward()
    both = {n: p.grad.clone() for n, p in gan.discriminator.named_parameters()}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gan.generator.parameters() if p.dim() > 1)
    gan.zero_grad()
    torch.manual_seed(1)  # the same z
    z = torch.randn(4, 8)
    fake = gan.generator(z).detach()
    real_logits, fake_logits = gan.discriminator(x), gan.discriminator(fake)
    d_only = (F.binary_cross_entropy_with_logits(real_logits, torch.ones(4), reduction="none")
              + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros(4), reduction="none")).mean()
    d_only.backward()
    for n, p in gan.discriminator.named_parameters():
        torch.testing.assert_close(both[n], p.grad, rtol=1e-4, atol=1e-6)
