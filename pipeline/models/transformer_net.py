"""Fast neural style (Johnson et al. 2016): the image transformation network and its VGG-16 loss.

``TransformerNet`` and its layers are pytorch/examples' ``fast_neural_style/neural_style/
transformer_net.py`` unchanged (bar ``super()`` without arguments) -- same modules, same attribute names (``conv1, in1, ..., res1..res5,
deconv1..deconv3, in4, in5``), same forward -- so the ``.pth`` files that example writes and
publishes (candy, mosaic, rain_princess, udnie) load here, and ours load there.

Conventions the checkpoints depend on (from the example's ``neural_style.py`` / ``utils.py``):

* the network takes **float RGB in 0..255**, shape (N, 3, H, W), with no normalisation, and returns
  the same scale, unclamped; a picture is ``output.clamp(0, 255)`` cast to uint8 (truncating, as the
  example's ``save_image`` does);
* old checkpoints carry InstanceNorm ``running_mean``/``running_var`` entries that current PyTorch
  does not have; they are dropped on load (:data:`LEGACY_KEY`), as the example's ``stylize`` does;
* the loss network is VGG-16's ``features`` up to relu4_3, fed ``(x / 255 - mean) / std``
  (ImageNet mean/std): content is compared at relu2_2, style as Gram matrices at relu1_2, relu2_2,
  relu3_3 and relu4_3, each Gram divided by ``C * H * W``.

The network's output side is ``4 * ceil(side / 4)`` (two stride-2 convolutions, then two 2x
upsamplings): for a side that is not a multiple of 4 it is up to 3 pixels larger, and
:func:`stylize_tensor` crops it back to the input frame (top-left aligned, which is where the
network's pixels sit).
"""

from __future__ import annotations

import os
import re
from collections import namedtuple

import torch
from torch import nn

from pipeline.models.registry import check_state_dict
from pipeline.models.weights import (
    WeightsError,
    load_checkpoint,
    load_hub_file,
    resolve_weights,
)

ARCHITECTURE = "TransformerNet (pytorch/examples fast_neural_style)"
LEGACY_KEY = re.compile(r"in\d+\.running_(mean|var)$")
"""InstanceNorm running statistics saved by PyTorch < 0.4; the example's ``stylize`` deletes them."""
MIN_SIDE = 5
"""The first layer reflection-pads by 4 pixels, which needs at least 5 pixels per side."""
DEFAULT_VGG = "VGG16_Weights.IMAGENET1K_V1"  # the loss network's weights: torchvision's name, from the hub cache


# --- the transformation network: pytorch/examples fast_neural_style, unchanged -------------------


class TransformerNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        # Initial convolution layers
        self.conv1 = ConvLayer(3, 32, kernel_size=9, stride=1)
        self.in1 = torch.nn.InstanceNorm2d(32, affine=True)
        self.conv2 = ConvLayer(32, 64, kernel_size=3, stride=2)
        self.in2 = torch.nn.InstanceNorm2d(64, affine=True)
        self.conv3 = ConvLayer(64, 128, kernel_size=3, stride=2)
        self.in3 = torch.nn.InstanceNorm2d(128, affine=True)
        # Residual layers
        self.res1 = ResidualBlock(128)
        self.res2 = ResidualBlock(128)
        self.res3 = ResidualBlock(128)
        self.res4 = ResidualBlock(128)
        self.res5 = ResidualBlock(128)
        # Upsampling Layers
        self.deconv1 = UpsampleConvLayer(128, 64, kernel_size=3, stride=1, upsample=2)
        self.in4 = torch.nn.InstanceNorm2d(64, affine=True)
        self.deconv2 = UpsampleConvLayer(64, 32, kernel_size=3, stride=1, upsample=2)
        self.in5 = torch.nn.InstanceNorm2d(32, affine=True)
        self.deconv3 = ConvLayer(32, 3, kernel_size=9, stride=1)
        # Non-linearities
        self.relu = torch.nn.ReLU()

    def forward(self, X):
        y = self.relu(self.in1(self.conv1(X)))
        y = self.relu(self.in2(self.conv2(y)))
        y = self.relu(self.in3(self.conv3(y)))
        y = self.res1(y)
        y = self.res2(y)
        y = self.res3(y)
        y = self.res4(y)
        y = self.res5(y)
        y = self.relu(self.in4(self.deconv1(y)))
        y = self.relu(self.in5(self.deconv2(y)))
        y = self.deconv3(y)
        return y


class ConvLayer(torch.nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride):
        super().__init__()
        reflection_padding = kernel_size // 2
        self.reflection_pad = torch.nn.ReflectionPad2d(reflection_padding)
        self.conv2d = torch.nn.Conv2d(in_channels, out_channels, kernel_size, stride)

    def forward(self, x):
        out = self.reflection_pad(x)
        out = self.conv2d(out)
        return out


class ResidualBlock(torch.nn.Module):
    """ResidualBlock
    introduced in: https://arxiv.org/abs/1512.03385
    recommended architecture: http://torch.ch/blog/2016/02/04/resnets.html
    """

    def __init__(self, channels):
        super().__init__()
        self.conv1 = ConvLayer(channels, channels, kernel_size=3, stride=1)
        self.in1 = torch.nn.InstanceNorm2d(channels, affine=True)
        self.conv2 = ConvLayer(channels, channels, kernel_size=3, stride=1)
        self.in2 = torch.nn.InstanceNorm2d(channels, affine=True)
        self.relu = torch.nn.ReLU()

    def forward(self, x):
        residual = x
        out = self.relu(self.in1(self.conv1(x)))
        out = self.in2(self.conv2(out))
        out = out + residual
        return out


class UpsampleConvLayer(torch.nn.Module):
    """UpsampleConvLayer
    Upsamples the input and then does a convolution. This method gives better results
    compared to ConvTranspose2d.
    ref: http://distill.pub/2016/deconv-checkerboard/
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride, upsample=None):
        super().__init__()
        self.upsample = upsample
        reflection_padding = kernel_size // 2
        self.reflection_pad = torch.nn.ReflectionPad2d(reflection_padding)
        self.conv2d = torch.nn.Conv2d(in_channels, out_channels, kernel_size, stride)

    def forward(self, x):
        x_in = x
        if self.upsample:
            x_in = torch.nn.functional.interpolate(x_in, mode='nearest', scale_factor=self.upsample)
        out = self.reflection_pad(x_in)
        out = self.conv2d(out)
        return out


# --- checkpoints -----------------------------------------------------------------------------------


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the legacy InstanceNorm ``running_mean``/``running_var`` entries."""
    return {k: v for k, v in state.items() if not LEGACY_KEY.search(k)}


def read_transformer_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """The TransformerNet state dict in ``path``, checked, legacy keys dropped; no model is built.

    Accepts the example's bare state dict or the project's ``{"model": state_dict}``. Raises
    :class:`WeightsError` naming the file when it is missing, unreadable, or of another
    architecture (keys and shapes compared with a TransformerNet on the meta device).
    """
    if not os.path.isfile(path):
        raise WeightsError(f"style checkpoint file not found: {path}")
    state = clean_state_dict(load_checkpoint(path)["model"])
    with torch.device("meta"):
        reference = TransformerNet()
    check_state_dict(reference, state, path, ARCHITECTURE)
    return state


def load_transformer_net(path: str, *, device: str | torch.device = "cpu") -> TransformerNet:
    """A TransformerNet with the weights in ``path``, in eval mode, on ``device``."""
    state = read_transformer_checkpoint(path)
    net = TransformerNet()
    net.load_state_dict(state)
    return net.to(device).eval()


def stylize_tensor(net: TransformerNet, images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) float 0..255 -> (N, 3, H, W) float, unclamped: the network cropped to the input frame."""
    h, w = images.shape[-2:]
    if min(h, w) < MIN_SIDE:
        raise ValueError(f"image is {w}x{h} px; fast neural style needs at least {MIN_SIDE} px per side")
    return net(images)[..., :h, :w]


# --- the loss network: VGG-16 features up to relu4_3 ---------------------------------------------

VGG_MODEL = "vgg16"
VGG_LAYERS = 23  # torchvision vgg16().features[:23] ends at relu4_3
VGG_TAPS = {3: "relu1_2", 8: "relu2_2", 15: "relu3_3", 22: "relu4_3"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VggOutputs = namedtuple("VggOutputs", ["relu1_2", "relu2_2", "relu3_3", "relu4_3"])


class Vgg16Features(nn.Module):
    """VGG-16 ``features[:23]`` returning relu1_2, relu2_2, relu3_3, relu4_3 (the example's ``Vgg16``).

    Parameter names are torchvision's (``features.0.weight`` ...), so a torchvision VGG-16 state
    dict loads as is. ``forward`` takes float RGB in **0..255** and normalises it itself with the
    weights' mean/std, so callers hand it the same tensors they hand the TransformerNet.
    """

    def __init__(self, *, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        # Only the convolutional part: the full vgg16() would also build (and randomly
        # initialise) a 100M-parameter classifier the loss never uses.
        self.features = make_layers(cfgs["D"])[:VGG_LAYERS]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images / 255.0 - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> VggOutputs:
        h = self.normalize(images)
        taps = []
        for index, layer in enumerate(self.features):
            h = layer(h)
            if index in VGG_TAPS:
                taps.append(h)
        return VggOutputs(*taps)


def gram_matrix(y: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) features -> (B, C, C) Gram matrices divided by C * H * W (the example's)."""
    (b, ch, h, w) = y.size()
    features = y.view(b, ch, w * h)
    features_t = features.transpose(1, 2)
    gram = features.bmm(features_t) / (ch * h * w)
    return gram


def check_vgg_weights(weights: str, *, setting: str = "vgg_weights") -> None:
    """Fail early (no tensors built) if ``weights`` cannot give VGG-16 features on this machine.

    ``setting``: how the user chose them (the stage key, or train-style's ``--vgg-weights``).
    """
    resolved = resolve_weights(VGG_MODEL, weights, setting=setting)
    if resolved.kind == "checkpoint":
        _vgg_state(resolved.path)


def build_vgg(weights: str, *, device: str | torch.device = "cpu") -> Vgg16Features:
    """VGG-16 features for the perceptual loss, in eval mode, frozen.

    ``weights``: ``none`` (random: tests), a torchvision name (``VGG16_Weights.IMAGENET1K_V1``,
    ``IMAGENET1K_V1``, ``DEFAULT``) read from the torch hub cache and never downloaded (the
    :class:`WeightsError` names the file, folder and URL), or a local ``.pth`` holding a torchvision
    VGG-16 state dict (classifier entries are ignored). Normalisation follows the weights: a
    torchvision name brings its own mean/std (``IMAGENET1K_FEATURES`` differs from ImageNet's).
    """
    resolved = resolve_weights(VGG_MODEL, weights)
    if resolved.kind == "none":
        vgg = Vgg16Features()
        for layer in vgg.features:  # the initialisation torchvision's vgg16(weights=None) gives
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                nn.init.constant_(layer.bias, 0)
        return vgg.to(device).eval()
    if resolved.kind == "torchvision":
        enum = resolved.enum
        preset = getattr(enum.transforms, "keywords", {})
        vgg = Vgg16Features(mean=tuple(preset.get("mean", IMAGENET_MEAN)), std=tuple(preset.get("std", IMAGENET_STD)))
        state = {k: v for k, v in load_hub_file(enum.url).items() if _is_feature_key(k)}
    else:
        vgg = Vgg16Features()
        state = _vgg_state(resolved.path)
    vgg.load_state_dict(state)
    return vgg.to(device).eval()


def _is_feature_key(key: str) -> bool:
    parts = key.split(".")
    return len(parts) == 3 and parts[0] == "features" and parts[1].isdigit() and int(parts[1]) < VGG_LAYERS


def _vgg_state(path: str) -> dict[str, torch.Tensor]:
    state = {k: v for k, v in load_checkpoint(path)["model"].items() if _is_feature_key(k)}
    with torch.device("meta"):
        reference = Vgg16Features()
    check_state_dict(reference, state, path, "vgg16 features (a torchvision VGG-16 state dict)")
    return state


class PerceptualLoss(nn.Module):
    """Johnson et al.'s loss: content at relu2_2 (MSE), style as Gram MSE at relu1_2..relu4_3.

    ``style_grams`` are computed once from the style image (:meth:`grams`); both losses come back
    already multiplied by their weights, as the example logs them.
    """

    def __init__(self, vgg: Vgg16Features, *, content_weight: float, style_weight: float):
        super().__init__()
        self.vgg = vgg
        self.content_weight = content_weight
        self.style_weight = style_weight

    @torch.no_grad()
    def grams(self, style: torch.Tensor) -> list[torch.Tensor]:
        """(1, 3, H, W) float 0..255 style image -> its four (1, C, C) Gram matrices."""
        return [gram_matrix(f) for f in self.vgg(style)]

    def forward(
        self, output: torch.Tensor, content_relu2_2: torch.Tensor, style_grams: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(content loss, style loss) of ``output`` (N, 3, H, W, 0..255) against fixed targets."""
        features = self.vgg(output)
        content = self.content_weight * nn.functional.mse_loss(features.relu2_2, content_relu2_2)
        style = output.new_zeros(())
        for feature, target in zip(features, style_grams):
            gram = gram_matrix(feature)
            style = style + nn.functional.mse_loss(gram, target.expand_as(gram))
        return content, self.style_weight * style
