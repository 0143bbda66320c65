"""The VAE's likelihood is a proper discrete density (the 256 values of a sub-pixel sum to one), its
negative ELBO is finite and trains down, and it samples and decodes images of its size."""

from __future__ import annotations

import math

import torch

from pipeline.models.vae import ConvVAE, discretised_logistic_log_prob


def test_the_discretised_logistic_sums_to_one_over_the_256_values():
    values = torch.arange(256).float() / 255 * 2 - 1  # every 8-bit value, scaled to [-1, 1]
    for mean, log_scale in [(0.0, -3.0), (0.9, -5.0), (-1.0, 0.0), (0.3, -7.0)]:
        p = discretised_logistic_log_prob(values, torch.full_like(values, mean), torch.full_like(values, log_scale)).exp()
        assert abs(float(p.sum()) - 1) < 1e-4, (mean, log_scale, float(p.sum()))


def test_the_negative_elbo_is_finite_and_a_few_steps_lower_it():
    torch.manual_seed(0)
    vae = ConvVAE(latent=8, size=16)
    x = torch.rand(8, 3, 16, 16)
    x[:, :, 4:12, 4:12] = 0.9  # something to learn: a bright square on noise
    first = vae.nll(x).mean().detach()
    bits = float(first) / (3 * 16 * 16 * math.log(2))
    assert math.isfinite(bits) and bits > 0
    optimiser = torch.optim.Adam(vae.parameters(), lr=2e-3)
    for _ in range(40):
        optimiser.zero_grad()
        loss = vae.nll(x).mean()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        last = float(vae.nll(x).mean())
    assert last < 0.9 * float(first)  # the noise around the square is incompressible
    images = vae.sample([torch.Generator().manual_seed(k) for k in range(3)])
    assert images.shape == (3, 3, 16, 16) and float(images.min()) >= 0 and float(images.max()) <= 1


def test_a_value_far_from_the_mean_still_pulls_the_mean_towards_it():
    """Where the bin's mass underflows (2 units away at a scale of e^-6) the density at the bin's centre
    stands in: finite, lower than any near value's, and its gradient moves the mean towards the value."""
    mean = torch.tensor([-0.9, 0.0], requires_grad=True)
    x, log_scale = torch.tensor([0.9, 0.01]), torch.full((2,), -6.0)
    log_p = discretised_logistic_log_prob(x, mean, log_scale)
    assert torch.isfinite(log_p).all() and log_p[0] < log_p[1] < 0
    log_p[0].backward()
    assert mean.grad[0] > 0


def test_the_scale_learns_from_the_start():
    """The log-scale's upper bound is soft: at initialisation (raw log-scales near 0, above the bound) the
    decoder's log-scale outputs still get a gradient, and they stay below the bound."""
    from pipeline.models.vae import MAX_LOG_SCALE

    torch.manual_seed(0)
    vae = ConvVAE(latent=8, size=16)
    x = torch.rand(4, 3, 16, 16)
    vae.nll(x).mean().backward()
    bias_grad = vae.decoder[-1].bias.grad  # 3 mean channels, then 3 log-scale channels
    assert (bias_grad[3:].abs() > 0).all()
    with torch.no_grad():
        assert float(vae.logistic(torch.randn(4, 8))[1].max()) < MAX_LOG_SCALE
