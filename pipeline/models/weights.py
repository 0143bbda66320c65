"""Where a model's weights come from, resolved before any data is read.

A stage's ``weights`` setting is one of:

* ``none`` -- random initialisation (backbone too: torchvision would otherwise download ImageNet
  weights for it);
* a torchvision weights name -- ``DEFAULT``, ``COCO_V1`` or ``FasterRCNN_ResNet50_FPN_Weights.COCO_V1``
  -- looked up in the torch hub cache (``torch.hub.get_dir()/checkpoints``). Nothing is downloaded
  by this module: on an offline machine a missing file is a :class:`WeightsError` that names the
  exact file, the folder to put it in and the URL it comes from. The file's sha256 must start with
  the hex its name carries (``...-dd69338a.pth``), checked when the name is resolved (before any
  data is read) and again when it is loaded;
* a path to a ``.pth``/``.pt`` checkpoint, loaded with ``torch.load(weights_only=True)``: either a
  bare state dict or the project's own format ``{"model": state_dict, "model_name": str,
  "num_classes": int, "categories": [{"id", "name"}, ...]}``.

Every weights file the project reads goes through :func:`load_weights_file`, which never unpickles
anything but tensors and plain containers (``weights_only=True``). torchvision's builders read their
weights with ``torch.hub.load_state_dict_from_url`` (``weights_only=False``, the hash only checked on
download), so :func:`torchvision_loads_safely` routes them to :func:`load_hub_file` while a model is
built.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torchvision.models import get_model_weights
from torchvision.models._api import WeightsEnum

from pipeline.config.paths import is_path, sha256_of


class WeightsError(RuntimeError):
    """Weights that cannot be used; the message says which file to provide and where."""


@dataclass(frozen=True)
class ResolvedWeights:
    kind: str  # "none" | "torchvision" | "checkpoint"
    enum: WeightsEnum | None = None
    path: str | None = None

    def categories(self) -> list[dict] | None:
        """What each model label means, ``[{"label": int, "name": str}, ...]``, when the weights say.

        torchvision weights carry names in their meta (COCO's ``__background__`` and ``N/A``
        placeholders are left out: no box is ever given those labels); project checkpoints carry
        ``categories`` (the file is read, safely, once more: call this at preflight, not per batch).
        Random weights (``none``) and bare state dicts name nothing: None.
        """
        if self.enum is not None:
            names = self.enum.meta.get("categories") or []
            return [{"label": i, "name": n} for i, n in enumerate(names) if n not in ("__background__", "N/A")] or None
        if self.kind == "checkpoint":
            listed = load_checkpoint(self.path).get("categories") or []
            return [{"label": int(c["label"]), "name": str(c["name"])} for c in listed] or None
        return None


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_weights(model_name: str, weights: str, *, setting: str = "weights") -> ResolvedWeights:
    """Resolve a ``weights`` setting without loading tensors; raise WeightsError if unusable.

    ``setting`` is what the user typed to choose the weights (a job key such as ``vgg_weights``, or
    a command option such as ``--vgg-weights``): the error tells them what to change.
    """
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
            f"(it is published at {enum.url}), or set {setting} to a local .pth path or 'none'."
        )
    verify_sha256(cached, _required_hash_prefix(enum.url), url=enum.url)
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


# --- the one way a weights file is read --------------------------------------------------------


def hash_prefix(file_name: str) -> str | None:
    """The sha256 prefix a torch hub file name carries: the hex after the stem's last '-', else None.

    ``fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth`` -> ``dd69338a`` (what ``torch.hub``'s
    ``check_hash`` compares on download).
    """
    stem = os.path.basename(file_name).split(".", 1)[0]
    _, dash, tail = stem.rpartition("-")
    if dash and tail and all(c in "0123456789abcdef" for c in tail):
        return tail
    return None


def _required_hash_prefix(url: str) -> str:
    prefix = hash_prefix(url)
    if prefix is None:
        raise WeightsError(
            f"torch hub file {os.path.basename(url)} carries no sha256 prefix in its name, so it cannot be verified; "
            "use a local .pth path instead"
        )
    return prefix




def verify_sha256(path: str | os.PathLike, prefix: str, *, url: str | None = None) -> None:
    """Raise WeightsError unless the sha256 of ``path`` starts with ``prefix``."""
    try:
        actual = sha256_of(path)
    except OSError as exc:
        raise WeightsError(f"cannot read weights file {path}: {exc}") from exc
    if not actual.startswith(prefix.lower()):
        source = f" (it is published at {url})" if url else ""
        raise WeightsError(
            f"weights file {path} failed its hash check: its name says its sha256 starts with {prefix}, "
            f"but the file's sha256 is {actual} (starts with {actual[:len(prefix)]}). It is not the published file "
            f"(truncated, corrupt or replaced) and was not loaded; delete it and place the original{source}."
        )


def load_weights_file(path: str | os.PathLike, *, sha256_prefix: str | None = None, what: str = "weights file") -> Any:
    """Read a weights file: the only place the project calls ``torch.load`` on weights.

    With ``sha256_prefix`` (torch hub files) the file's sha256 must start with it. The file is read
    with ``torch.load(path, map_location="cpu", weights_only=True)``: a pickle that needs anything but
    tensors and plain containers (an object whose ``__reduce__`` would run code) is refused, unrun.
    Any failure is a :class:`WeightsError` naming the file.
    """
    if sha256_prefix is not None:
        verify_sha256(path, sha256_prefix)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's own text advises weights_only=False; keep only its one-line reason.
        found = re.search(r"WeightsUnpickler error: ([^\n]*)", str(exc))
        reason = found.group(1).strip() if found else str(exc).splitlines()[0]
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", reason)
        if unsafe:
            raise WeightsError(
                f"refused to load {what} {path}: it needs {unsafe.group(1)} to be unpickled, and weights are read with "
                f"torch.load(weights_only=True), which unpickles only tensors and plain containers (anything else could "
                f"run code). Use a state dict saved with torch.save(model.state_dict(), ...) or the published file."
            ) from exc
        raise WeightsError(f"cannot load {what} {path}: not readable with torch.load(weights_only=True): {reason}") from exc
    except Exception as exc:  # noqa: BLE001 - zip/format/IO errors all mean "not a usable file"
        raise WeightsError(f"cannot load {what} {path}: {type(exc).__name__}: {exc}") from exc


def load_hub_file(url: str, *, model_dir: str | os.PathLike | None = None, file_name: str | None = None) -> dict:
    """The state dict of the torch hub file for ``url``, from the cache only, hash-checked, weights_only."""
    name = file_name or os.path.basename(url)
    folder = Path(model_dir) if model_dir else hub_checkpoint_dir()
    path = folder / name
    if not path.is_file():
        raise WeightsError(
            f"{name} is not in the torch hub cache ({folder}/) and is never downloaded at job time; "
            f"place it there (it is published at {url})"
        )
    prefix = _required_hash_prefix(name)
    verify_sha256(path, prefix, url=url)
    return load_weights_file(path, sha256_prefix=prefix, what="torch hub weights file")


_patch_lock = threading.RLock()


@contextlib.contextmanager
def torchvision_loads_safely() -> Iterator[list[str]]:
    """While active, torchvision's builders read their weights through :func:`load_hub_file`.

    Every torchvision builder loads with ``weights.get_state_dict(...)``, i.e.
    ``torchvision.models._api.load_state_dict_from_url`` (torch.hub's: ``weights_only=False``, hash only
    checked on download, and it would download a missing file). That module global is replaced for
    the duration of the block (and ``torch.hub.load_state_dict_from_url`` too, for code that calls it
    by attribute), under a lock, and restored after. Yields the list of URLs loaded, so the caller can
    check the weights really came through here.

    Why patch rather than build with ``weights=None`` and load the state dict ourselves: a builder
    given weights does model-specific things -- num_classes (and num_keypoints) from the weights'
    meta, FrozenBatchNorm2d for a trained backbone, no backbone weights, trainable-layer defaults,
    version-specific fix-ups -- which would have to be copied per model and kept in step with
    torchvision. Routing the one load call they all share keeps every registered model built exactly
    as torchvision builds it, with only the file read made safe.
    """
    import torchvision.models._api as api

    loaded: list[str] = []

    def safe_load_state_dict_from_url(url: str, model_dir=None, map_location=None, progress=True,
                                      check_hash=False, file_name=None, weights_only=False) -> dict:
        loaded.append(url)
        state = load_hub_file(url, model_dir=model_dir, file_name=file_name)
        return state if map_location is None else {k: v.to(map_location) if isinstance(v, torch.Tensor) else v
                                                   for k, v in state.items()}

    with _patch_lock:
        saved = api.load_state_dict_from_url, torch.hub.load_state_dict_from_url
        api.load_state_dict_from_url = safe_load_state_dict_from_url
        torch.hub.load_state_dict_from_url = safe_load_state_dict_from_url
        try:
            yield loaded
        finally:
            api.load_state_dict_from_url, torch.hub.load_state_dict_from_url = saved


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint file safely; returns the project's dict format (bare state dicts wrapped)."""
    obj = load_weights_file(path, what="checkpoint")
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return obj
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"model": obj}
    raise WeightsError(f"checkpoint {path} is neither a state dict nor a dict with a 'model' state dict")


def checkpoint_model_name(path: str) -> str:
    """The registered model a project checkpoint was trained as (its ``model_name``); raises naming the file."""
    if not os.path.isfile(path):
        raise WeightsError(f"{path} is not a checkpoint file: give a project checkpoint .pth, or a model name and --weights")
    name = load_checkpoint(path).get("model_name")
    if not name:
        raise WeightsError(f"checkpoint {path} does not name its model (no 'model_name'): give the model name and --weights {path}")
    return str(name)
