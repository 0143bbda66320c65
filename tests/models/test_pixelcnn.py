"""The PixelCNN is autoregressive: the logits of a sub-pixel depend on the sub-pixels before it in raster
order (R, G, B within a pixel) and on nothing after it, itself included; its NLL is a proper density."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.models.pixelcnn import LEVELS, PixelCNN


@pytest.mark.parametrize("i, j, c", [(0, 0, 0), (3, 4, 0), (3, 4, 1), (3, 4, 2), (7, 7, 2)])
def test_each_sub_pixel_sees_exactly_what_comes_before_it(i, j, c):
    torch.manual_seed(0)
    model = PixelCNN(channels=12, layers=2)
    x = torch.rand(1, 3, 8, 8, requires_grad=True)
    model(x)[0, c, :, i, j].sum().backward()
    seen = x.grad[0].abs() > 0  # (3, 8, 8)
    order = torch.arange(8 * 8 * 3).view(8, 8, 3).permute(2, 0, 1)  # raster order of each (colour, row, column)
    before = order < order[c, i, j]
    assert not seen[~before].any()  # nothing after it, not itself
    if (i, j, c) != (0, 0, 0):
        assert seen[before].any()  # and it does look back (the test can fail)
    else:
        assert not seen.any()


def test_the_nll_is_a_normalised_discrete_density():
    """Untrained, the logits are near uniform: about 8 bits per sub-pixel; the 256 probabilities of every
    sub-pixel sum to one (a softmax over the 256 values)."""
    torch.manual_seed(0)
    model = PixelCNN(channels=12, layers=2)
    x = torch.randint(0, LEVELS, (2, 3, 6, 6)).float() / (LEVELS - 1)
    bits_per_dim = model.nll(x) / (3 * 6 * 6 * math.log(2))
    assert ((bits_per_dim > 7.5) & (bits_per_dim < 9.0)).all()
    probs = torch.softmax(model(x), dim=2).sum(dim=2)
    torch.testing.assert_close(probs, torch.ones_like(probs))
    images = model.sample([torch.Generator().manual_seed(k) for k in range(2)], 4)
    assert images.shape == (2, 3, 4, 4) and ((images * 255) == (images * 255).round()).all()


def test_the_training_loss_is_bits_per_dim_through_forward():
    """What pipeline train minimises: model(x, loss=True) is nll(x), and the objective reports it per dimension."""
    from pipeline.train.generative_objective import GenerativeObjective

    torch.manual_seed(0)
    model = PixelCNN(channels=12, layers=1)
    x = torch.randint(0, LEVELS, (2, 3, 8, 8)).float() / (LEVELS - 1)
    torch.testing.assert_close(model(x, loss=True), model.nll(x))
    loss = GenerativeObjective(image_size=8, seed=0).loss(model, list(x), torch.device("cpu"))
    torch.testing.assert_close(loss, (model.nll(x) / (3 * 8 * 8 * math.log(2))).mean())


def test_sampling_on_a_window_of_rows_draws_what_whole_image_passes_draw():
    """sample() runs each pass on the ``reach`` rows above the current one and the head on one pixel; the
    slow reference below runs every pass on the whole image. Same generators, same images, bit for bit,
    with rows enough (12 > reach 4 + 1) that the window drops rows."""
    torch.manual_seed(0)
    model = PixelCNN(channels=12, layers=1).eval()
    assert model.reach == 4
    size = 12
    fast = model.sample([torch.Generator().manual_seed(k) for k in range(2)], size)
    generators = [torch.Generator().manual_seed(k) for k in range(2)]
    x = torch.zeros(2, 3, size, size)
    with torch.no_grad():
        for i in range(size):
            for j in range(size):
                for c in range(3):
                    probs = torch.softmax(model(x)[:, c, :, i, j], dim=1)
                    x[:, c, i, j] = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)]).float() / 255
    assert torch.equal(fast, x)
