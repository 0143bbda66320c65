"""Where a model's weights come from, resolved before any data is read.

A stage's ``weights`` setting is one of:

* ``none`` -- random initialisation (backbone too: torchvision would otherwise download ImageNet
  weights for it);
* a torchvision weights name -- ``DEFAULT``, ``COCO_V1`` or ``FasterRCNN_ResNet50_FPN_Weights.COCO_V1``
  -- looked up in the torch hub cache (``torch.hub.get_dir()/checkpoints``). Nothing is downloaded
  by this module: on an offline machine a missing file is a :class:`WeightsError` that names the
  exact file, the folder to put it in and the URL it comes from;
* a path to a ``.pth``/``.pt`` checkpoint, loaded with ``torch.load(weights_only=True)``: either a
  bare state dict or the project's own format ``{"model": state_dict, "model_name": str,
  "num_classes": int, "categories": [{"id", "name"}, ...]}``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.models import get_model_weights
from torchvision.models._api import WeightsEnum


class WeightsError(RuntimeError):
    """Weights that cannot be used; the message says which file to provide and where."""


@dataclass(frozen=True)
class ResolvedWeights:
    kind: str  # "none" | "torchvision" | "checkpoint"
    enum: WeightsEnum | None = None
    path: str | None = None

    def categories(self) -> list[str] | None:
        """Category names indexed by model label, when the weights carry them."""
        if self.enum is not None:
            return list(self.enum.meta.get("categories") or []) or None
        return None


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def is_path(weights: str) -> bool:
    return os.sep in weights or weights.endswith((".pth", ".pt")) or weights.startswith(".")


def resolve_weights(model_name: str, weights: str) -> ResolvedWeights:
    """Resolve a ``weights`` setting without loading tensors; raise WeightsError if unusable."""
    if weights.lower() == "none":
        return ResolvedWeights("none")
    if is_path(weights):
        if not os.path.isfile(weights):
            raise WeightsError(f"checkpoint file not found: {weights} (weights of model {model_name})")
        return ResolvedWeights("checkpoint", path=weights)
    enum = _weights_enum(model_name, weights)
    file_name = os.path.basename(enum.url)
    cached = hub_checkpoint_dir() / file_name
    if not cached.is_file():
        raise WeightsError(
            f"weights {type(enum).__name__}.{enum.name} for model {model_name} are not in the torch hub cache, "
            f"and they are never downloaded at job time. Place the file {file_name} in {hub_checkpoint_dir()}/ "
            f"(it is published at {enum.url}), or set weights to a local .pth path or 'none'."
        )
    return ResolvedWeights("torchvision", enum=enum)


def _weights_enum(model_name: str, weights: str) -> WeightsEnum:
    try:
        enum_cls = get_model_weights(model_name)
    except (ValueError, KeyError) as exc:
        raise WeightsError(f"model {model_name} has no torchvision weights; use 'none' or a checkpoint path") from exc
    member = weights.split(".", 1)[1] if "." in weights else weights
    if "." in weights and weights.split(".", 1)[0] != enum_cls.__name__:
        raise WeightsError(f"weights {weights!r} do not belong to model {model_name} (expected {enum_cls.__name__}.*)")
    try:
        return enum_cls[member]
    except KeyError:
        names = ", ".join(enum_cls.__members__)
        raise WeightsError(f"unknown weights {weights!r} for model {model_name}; known: {names}, or 'none', or a path") from None


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint file safely; returns the project's dict format (bare state dicts wrapped)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle/zip/format errors all mean "not a usable checkpoint"
        raise WeightsError(f"cannot load checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return obj
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"model": obj}
    raise WeightsError(f"checkpoint {path} is neither a state dict nor a dict with a 'model' state dict")
