"""A small PixelCNN (van den Oord et al. 2016): an exact density over 8-bit RGB images.

The image is a sequence of sub-pixels in raster order, R before G before B within a pixel, and
the model predicts each one's 256 values from all that come before it:
``log p(x) = sum_i log p(x_i | x_<i)``. Masked convolutions keep that order:

* a mask zeroes every kernel weight that would look at a pixel below the centre row, or right of
  the centre in its row;
* at the centre pixel, channels are split in three colour groups (channel ``c`` of ``C`` belongs to
  colour ``3c // C``); an output of colour ``o`` sees input colours ``< o`` (mask ``A``, the first
  layer: a sub-pixel never sees itself) or ``<= o`` (mask ``B``, every later layer: its own
  colour's features, which never saw the sub-pixel itself).

Layers: a 7x7 mask-A convolution, ``layers`` gated residual blocks (two 3x3 mask-B convolutions,
``tanh(a) * sigmoid(b)``, the gated activation of the conditional PixelCNN paper, a 1x1 mask-B
projection added back), then two 1x1 mask-B convolutions to 256 logits per sub-pixel.

``forward(x)``: x (N, 3, H, W) in [0, 1] (8-bit values / 255) -> logits (N, 3, 256, H, W);
``forward(x, loss=True)`` is ``nll(x)`` (training calls it so, through DDP).
``nll(x)``: (N,) exact negative log-likelihood in nats; bits per dimension = nll / (3 H W ln 2).
``sample(n, size, generator)``: pixel by pixel, colour by colour, batched over the n images:
3 H W forward passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LEVELS = 256  # values of an 8-bit sub-pixel


class MaskedConv2d(nn.Conv2d):
    """A same-padded convolution whose kernel sees only what comes before (see the module docstring)."""

    def __init__(self, cin: int, cout: int, kernel: int, mask: str):
        super().__init__(cin, cout, kernel, padding=kernel // 2)
        k = kernel // 2
        m = torch.zeros(cout, cin, kernel, kernel)
        m[:, :, :k, :] = 1  # rows above
        m[:, :, k, :k] = 1  # left in the centre row
        colour_out = torch.arange(cout) * 3 // cout
        colour_in = torch.arange(cin) * 3 // cin
        allowed = colour_in[None, :] < colour_out[:, None] if mask == "A" else colour_in[None, :] <= colour_out[:, None]
        m[:, :, k, k] = allowed.float()
        self.register_buffer("mask", m, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class GatedBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.value = MaskedConv2d(channels, channels, 3, "B")
        self.gate = MaskedConv2d(channels, channels, 3, "B")
        self.out = MaskedConv2d(channels, channels, 1, "B")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out(torch.tanh(self.value(x)) * torch.sigmoid(self.gate(x)))


class PixelCNN(nn.Module):
    def __init__(self, channels: int = 96, layers: int = 6):
        super().__init__()
        self.first = MaskedConv2d(3, channels, 7, "A")
        self.blocks = nn.Sequential(*[GatedBlock(channels) for _ in range(layers)])
        self.head = nn.Sequential(nn.ReLU(), MaskedConv2d(channels, channels, 1, "B"), nn.ReLU(),
                                  MaskedConv2d(channels, 3 * LEVELS, 1, "B"))

    likelihood = True  # nll() is an exact negative log-likelihood: training and validation report bits/dim

    def forward(self, x: torch.Tensor, loss: bool = False) -> torch.Tensor:
        if loss:
            return self.nll(x)
        n, _, h, w = x.shape
        out = self.head(self.blocks(self.first(x * 2 - 1)))  # inputs centred on 0
        # channel c of the head's output has colour 3c // (3 * 256): R's 256 logits, then G's, then B's
        return out.view(n, 3, LEVELS, h, w)

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N,) exact negative log-likelihood, nats."""
        target = torch.round(x * (LEVELS - 1)).long()
        return F.cross_entropy(self(x).transpose(1, 2), target, reduction="none").flatten(1).sum(dim=1)  # classes on dim 1

    @property
    def reach(self) -> int:
        """Rows above a pixel that its logits depend on: 3 for the 7 x 7 first layer, 1 per gated block."""
        return self.first.kernel_size[0] // 2 + sum(b.value.kernel_size[0] // 2 + b.out.kernel_size[0] // 2 for b in self.blocks)

    @torch.no_grad()
    def sample(self, generators: list[torch.Generator], size: int) -> torch.Tensor:
        """One image per generator (n, 3, size, size) in [0, 1], drawn sub-pixel by sub-pixel; image k's
        draws come from ``generators[k]`` alone.

        Row i's logits depend on rows ``i - reach .. i`` only, so each pass runs on that window (zero
        padding above it changes rows that row i does not read), and the 1 x 1 head on pixel (i, j) alone: the
        same distribution as passes over the whole image, and on CPU the same draws (tested; a GPU's
        convolution algorithms may round another way), about ``size / (reach + 1)`` times fewer computations.
        """
        device = next(self.parameters()).device
        x = torch.zeros(len(generators), 3, size, size, device=device)
        n = len(generators)
        for i in range(size):
            top = max(0, i - self.reach)
            for j in range(size):
                for c in range(3):
                    features = self.blocks(self.first(x[:, :, top : i + 1] * 2 - 1))[:, :, -1:, j : j + 1]
                    logits = self.head(features).view(n, 3, LEVELS)[:, c]
                    probs = torch.softmax(logits, dim=1).cpu()
                    values = [torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)]
                    x[:, c, i, j] = torch.cat(values).to(device).float() / (LEVELS - 1)
        return x


def pixelcnn(*, weights=None, weights_backbone=None, num_classes: int | None = None, channels: int = 96, layers: int = 6) -> PixelCNN:
    """Build the PixelCNN (random init). ``weights`` must be None: load checkpoints by path."""
    if weights is not None or weights_backbone is not None:
        raise ValueError("pixelcnn has no published weights; train one (pipeline train) and load it by path")
    return PixelCNN(channels=channels, layers=layers)
