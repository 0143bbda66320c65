"""The one loop behind every image made by optimisation: pixels changed by gradient steps against a
fixed network.

Fooling images, class visualisation, feature inversion, DeepDream, texture synthesis and Gatys
style transfer (cs231n's "visualizing and understanding" and "style transfer") differ only in the
objective; the loop is the same:

* the parameter is a batch of images, (N, 3, H, W) floats in [0, 1] (the range every method
  writes back as 8-bit pixels);
* ``objective(images) -> (N,)`` losses to *minimise*, one per image (images do not interact, so
  each image's gradient is its own loss's);
* regularisers added to it: total variation (``tv``: mean absolute difference of neighbouring
  pixels, the natural-image prior of Mahendran & Vedaldi), ``l2`` (mean squared distance to mid
  grey, Simonyan et al.); between steps, a Gaussian blur every ``blur_every`` steps (Yosinski et
  al.), and a random shift of up to ``jitter`` pixels of the image the objective sees
  (Mordvintsev et al.), drawn per image from its seed (so an image's result does not depend on
  the batch it ran in);
* steps: ``adam`` (``lr`` in pixel units) or ``sign`` (``x -= lr * sign(grad)``, the iterative
  fast gradient sign method of Kurakin et al.);
* after every step the image is clamped to [0, 1] and, with ``epsilon``, to the L-infinity ball of
  that radius around the start image (projected gradient descent); with ``quantize``, rounded to
  the 1/255 grid, so the result is exactly what an 8-bit PNG stores;
* ``steps`` is the budget; ``done(images) -> (N,) bool``, checked before every step, freezes the
  images it says are finished (a fooled image stops changing), and ``steps_used`` counts each one's
  steps.

Everything runs on the device of ``start``; nothing here knows which method it serves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import math

import torch
import torch.nn.functional as F

Step = Literal["adam", "sign"]


@dataclass(frozen=True)
class LoopSettings:
    """How the pixels move (see the module docstring); each method fills what it needs."""

    steps: int
    lr: float
    step: Step = "adam"
    tv: float = 0.0
    l2: float = 0.0
    jitter: int = 0
    blur_every: int = 0
    blur_sigma: float = 0.5
    epsilon: float | None = None
    quantize: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.epsilon is not None and not 0 < self.epsilon <= 1:
            raise ValueError(f"epsilon must be in (0, 1] (a fraction of the pixel range), got {self.epsilon}")
        if self.quantize and self.epsilon is not None and self.radius() == 0:
            raise ValueError(f"epsilon {self.epsilon} is less than one grey level (1/255): an 8-bit image cannot move")

    def radius(self) -> float | None:
        """The L-infinity radius the images keep to: ``epsilon``, on the 8-bit grid rounded down to a
        whole number of grey levels (rounding a pixel inside a ball of 3.5/255 could leave it 4/255 away)."""
        if self.epsilon is None or not self.quantize:
            return self.epsilon
        return math.floor(self.epsilon * 255 + 1e-6) / 255


@dataclass
class LoopResult:
    images: torch.Tensor  # (N, 3, H, W) in [0, 1], detached
    steps_used: torch.Tensor  # (N,) int64: steps each image took before ``done`` said it was finished
    first_loss: torch.Tensor  # (N,) the objective (without regularisers) before the first step
    last_loss: torch.Tensor  # (N,) the same for the images returned
    history: list[torch.Tensor]  # per step taken, (N,) the loss it descended (objective + regularisers)


def grey_noise(seeds: Sequence[int], shape: tuple[int, ...], std: float = 0.1) -> torch.Tensor:
    """(len(seeds), *shape) mid-grey plus Gaussian noise of ``std``, clamped to [0, 1]: the usual start of
    an image made from nothing, drawn from each image's own seed (the same image in any batch)."""
    return torch.stack([(0.5 + std * torch.randn(shape, generator=torch.Generator().manual_seed(int(s)))).clamp(0, 1) for s in seeds])


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N,) mean absolute difference between vertical and horizontal neighbours."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean(dim=(1, 2, 3)) + (x[..., :, 1:] - x[..., :, :-1]).abs().mean(dim=(1, 2, 3))


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (kernel radius 2 sigma, reflect padding), same shape."""
    radius = max(1, int(round(2 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def optimize(
    start: torch.Tensor,
    objective: Callable[[torch.Tensor], torch.Tensor],
    settings: LoopSettings,
    *,
    done: Callable[[torch.Tensor], torch.Tensor] | None = None,
    seeds: Sequence[int] | None = None,
) -> LoopResult:
    """Run the loop from ``start`` (N, 3, H, W) in [0, 1]; see the module docstring. ``seeds``: one per
    image for its jitter (default ``settings.seed + k``)."""
    s = settings
    seeds = list(seeds) if seeds is not None else [s.seed + k for k in range(len(start))]
    generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
    history: list[torch.Tensor] = []
    with torch.inference_mode(False), torch.enable_grad():  # callers may run under inference mode (a stage's predict)
        origin = start.detach().clone()
        x = origin.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=s.lr) if s.step == "adam" else None
        steps_used = torch.zeros(len(x), dtype=torch.int64, device=x.device)
        active = torch.ones(len(x), dtype=torch.bool, device=x.device)
        with torch.no_grad():
            first_loss = objective(x.detach()).detach()
        for step in range(s.steps):
            if done is not None:
                with torch.no_grad():
                    active &= ~done(x.detach())
            if not active.any():
                break
            seen = x
            if s.jitter:  # each image its own shift, from its own generator: a result does not depend on its batch
                shifts = [[int(v) for v in torch.randint(-s.jitter, s.jitter + 1, (2,), generator=g)] for g in generators]
                seen = torch.stack([torch.roll(x[k], shifts=tuple(shifts[k]), dims=(1, 2)) for k in range(len(x))])
            loss = objective(seen)
            if s.tv:
                loss = loss + s.tv * total_variation(x)
            if s.l2:
                loss = loss + s.l2 * ((x - 0.5) ** 2).mean(dim=(1, 2, 3))
            history.append(loss.detach())
            (gradient,) = torch.autograd.grad(loss.sum(), x)
            before = x.detach().clone()
            with torch.no_grad():
                if optimizer is None:
                    x -= s.lr * gradient.sign()
                else:
                    x.grad = gradient
                    optimizer.step()
                if s.blur_every and (step + 1) % s.blur_every == 0:
                    x.copy_(gaussian_blur(x, s.blur_sigma))
                if s.epsilon is not None:
                    x.copy_(torch.maximum(torch.minimum(x, origin + s.radius()), origin - s.radius()))
                x.clamp_(0, 1)
                if s.quantize:
                    x.copy_(torch.round(x * 255) / 255)
                x[~active] = before[~active]  # finished images stay as they were
                steps_used += active.long()
        with torch.no_grad():
            last_loss = objective(x.detach()).detach()
    return LoopResult(x.detach(), steps_used, first_loss, last_loss, history)


class _Reached(Exception):
    """Raised by a forward hook once the last wanted layer has run: the layers after it are skipped."""


def layer_outputs(model: torch.nn.Module, layers: Sequence[torch.nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """Run ``model`` on ``x`` and return the outputs of ``layers`` (in their order), stopping the
    forward pass as soon as all have run: the objectives on a layer's features pay for no more of
    the network than they use."""
    kept: dict[int, torch.Tensor] = {}
    wanted = {id(m) for m in layers}

    def tap(module, _inputs, output):
        kept[id(module)] = output
        if wanted <= kept.keys():
            raise _Reached

    handles = [m.register_forward_hook(tap) for m in layers]
    try:
        model(x)
    except _Reached:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [m for m in layers if id(m) not in kept]
    if missing:
        raise RuntimeError(f"{len(missing)} layer(s) were not reached by the forward pass")
    return [kept[id(m)] for m in layers]
