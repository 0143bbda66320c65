"""One registry of the models the stages can run, and the one function that builds them.

Entries are plain data (name, builder, task, the keyword names its builder uses for the score
threshold and the detections cap). Adding a model is one :func:`register` call; a duplicate
name raises. torchvision's detection models are registered below under their torchvision names,
and so are its semantic segmentation models (task ``semantic``: FCN, DeepLabV3, LR-ASPP; no score
threshold or detections cap, so those two keyword names are empty).
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from pipeline.models.small_rcnn import small_maskrcnn
from pipeline.models.small_cnn import small_cnn
from pipeline.models.small_unet import small_unet
from pipeline.models.pixelcnn import pixelcnn
from pipeline.models.vae import conv_vae
from pipeline.models.dcgan import dcgan
from pipeline.models.weights import ResolvedWeights, WeightsError, load_checkpoint, torchvision_loads_safely


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]  # builder(weights=, weights_backbone=, num_classes=, **kwargs)
    task: str  # "detect" (boxes), "masks" (boxes + masks), "keypoints" (boxes + keypoints), "semantic" (a label per pixel),
    # "classify" (one set of class scores per image), "generative" (images: pipeline generate samples)
    score_kwarg: str
    max_dets_kwarg: str


MODELS: dict[str, ModelEntry] = {}


def register(entry: ModelEntry) -> ModelEntry:
    if entry.name in MODELS:
        raise ValueError(f"model {entry.name!r} is already registered")
    MODELS[entry.name] = entry
    return entry


DETECTION_TASKS = ("detect", "masks", "keypoints")  # models that output boxes (stages detect/masks/keypoints, pipeline train)


def require_detector(name: str) -> str:
    """``name`` if it is a registered model that outputs boxes; else a ValueError saying what it is."""
    entry = get_entry(name)
    if entry.task not in DETECTION_TASKS:
        raise ValueError(
            f"model {name} is a {entry.task} model, not a detector (detectors: {', '.join(sorted(n for t in DETECTION_TASKS for n in list_models(t)))}); "
            "semantic segmentation models run in stage 'segment', classifiers in stage 'classify'"
        )
    return name


def list_models(task: str | None = None) -> list[str]:
    return sorted(n for n, e in MODELS.items() if task is None or e.task == task)


def get_entry(name: str) -> ModelEntry:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}") from None


def unknown_kwargs(name: str, model: nn.Module | None, kwargs: dict) -> list[str]:
    """Keys of ``kwargs`` that neither the builder nor ``model``'s constructors name.

    torchvision's detection models pass unknown keyword arguments on to their transform, which
    ignores them, so a misspelt ``box_batch_size_per_imag`` would train silently with the default.
    ``model`` None: the model's class is found by building it once on PyTorch's meta device (no
    memory, no weights; cached per model name).
    """
    return sorted(set(kwargs) - accepted_kwargs(name, type(model) if model is not None else None))


def accepted_kwargs(name: str, model_class: type | None = None) -> frozenset[str]:
    """Keyword names model ``name`` uses: its builder's, the transform's, its class's constructors'."""
    return _accepted_kwargs(name, model_class or _model_class(name))


@functools.lru_cache(maxsize=None)
def _model_class(name: str) -> type:
    with torch.device("meta"), torch.random.fork_rng(devices=[]):
        return type(get_entry(name).builder(weights=None, weights_backbone=None))


@functools.lru_cache(maxsize=None)
def _accepted_kwargs(name: str, model_class: type) -> frozenset[str]:
    builder = torchvision.models.get_model_builder(name) if name in torchvision.models.list_models() else get_entry(name).builder
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    functions = [builder]
    task = get_entry(name).task
    if task in DETECTION_TASKS:  # detectors hand unknown keywords on to their transform
        functions.append(GeneralizedRCNNTransform.__init__)
    if task != "semantic":  # semantic builders use their named keywords only and drop the rest
        functions += [c.__init__ for c in model_class.__mro__ if issubclass(c, nn.Module) and c is not nn.Module]
    return frozenset(
        p.name
        for fn in functions
        for p in inspect.signature(fn).parameters.values()
        if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self"
    )


def unknown_kwargs_messages(name: str, kwargs: dict) -> dict[str, str]:
    """``{key: "unknown keyword for NAME (did you mean KEY?)"}`` for each key model ``name`` ignores."""
    if not kwargs:
        return {}
    known = sorted(accepted_kwargs(name))
    out = {}
    for key in unknown_kwargs(name, None, kwargs):
        close = difflib.get_close_matches(str(key), known, n=1)
        out[key] = f"unknown keyword for {name}" + (f" (did you mean {close[0]}?)" if close else "")
    return out


def _torchvision_builder(name: str) -> Callable[..., nn.Module]:
    def build(**kwargs) -> nn.Module:
        return torchvision.models.get_model(name, **kwargs)

    return build


def _register_torchvision() -> None:
    for name in torchvision.models.list_models(module=torchvision.models.detection):
        if name.startswith(("fasterrcnn", "maskrcnn", "keypointrcnn")):
            score, max_dets = "box_score_thresh", "box_detections_per_img"
        else:  # retinanet, fcos, ssd, ssdlite
            score, max_dets = "score_thresh", "detections_per_img"
        task = "masks" if name.startswith("maskrcnn") else "keypoints" if name.startswith("keypointrcnn") else "detect"
        register(ModelEntry(name, _torchvision_builder(name), task, score, max_dets))


def _register_torchvision_semantic() -> None:
    """FCN, DeepLabV3, LR-ASPP: ``model(x)["out"]`` is (N, num_classes, H, W) logits at the input's size."""
    for name in torchvision.models.list_models(module=torchvision.models.segmentation):
        register(ModelEntry(name, _torchvision_builder(name), "semantic", "", ""))


def _torchvision_classifier_builder(name: str) -> Callable[..., nn.Module]:
    """torchvision's classifier builder, taking (and dropping) ``weights_backbone`` like the other builders.

    A classifier has no separate backbone, and its builder hands unknown keywords to the model's
    constructor, which raises on ``weights_backbone``; the callers here (build_model, the meta-device
    shape check) pass it to every builder.
    """

    def build(*, weights_backbone=None, **kwargs) -> nn.Module:
        return torchvision.models.get_model(name, **kwargs)

    return build


def _register_torchvision_classify() -> None:
    """``model(x)`` is (N, num_classes) logits for x (N, 3, H, W) normalised; the quantized variants are left out."""
    for name in torchvision.models.list_models(module=torchvision.models):
        register(ModelEntry(name, _torchvision_classifier_builder(name), "classify", "", ""))


_register_torchvision()
register(ModelEntry("small_maskrcnn", small_maskrcnn, "masks", "box_score_thresh", "box_detections_per_img"))
_register_torchvision_semantic()
register(ModelEntry("small_unet", small_unet, "semantic", "", ""))
_register_torchvision_classify()
register(ModelEntry("small_cnn", small_cnn, "classify", "", ""))
register(ModelEntry("pixelcnn", pixelcnn, "generative", "", ""))
register(ModelEntry("conv_vae", conv_vae, "generative", "", ""))
register(ModelEntry("dcgan", dcgan, "generative", "", ""))


def build_model(
    name: str,
    weights: ResolvedWeights,
    *,
    num_classes: int | None = None,
    score_threshold: float | None = None,
    max_detections: int | None = None,
    extra: dict | None = None,
) -> tuple[nn.Module, list[dict] | None]:
    """Build model ``name`` in eval mode with ``weights``.

    Returns (model, categories) where categories is ``[{"label": int, "name": str}, ...]`` when
    the weights say what each label means (torchvision weights, project checkpoints), else None.
    """
    entry = get_entry(name)
    kwargs = dict(extra or {})
    if score_threshold is not None:
        kwargs[entry.score_kwarg] = score_threshold
    if max_detections is not None:
        kwargs[entry.max_dets_kwarg] = max_detections
    categories = None
    if weights.kind == "torchvision":
        # torchvision's builder, with its one weights read routed to the hash-checked weights_only loader.
        with torchvision_loads_safely() as loaded:
            model = entry.builder(weights=weights.enum, **kwargs)
        if weights.enum.url not in loaded:
            raise WeightsError(
                f"the builder of {name} did not read {weights.enum.url} through the project's safe loader; "
                "refusing to use it (torchvision changed how it loads weights?)"
            )
        categories = weights.categories()
    elif weights.kind == "checkpoint":
        ckpt = load_checkpoint(weights.path)
        if ckpt.get("model_name") not in (None, name):
            raise WeightsError(f"checkpoint {weights.path} is for model {ckpt['model_name']}, not {name}")
        classes = ckpt.get("num_classes") or num_classes or 91
        model = entry.builder(weights=None, weights_backbone=None, num_classes=classes, **{**ckpt.get("build_kwargs", {}), **kwargs})
        check_state_dict(model, ckpt["model"], weights.path, name)
        model.load_state_dict(ckpt["model"])
        if ckpt.get("categories"):
            categories = [{"label": int(c["label"]), "name": str(c["name"])} for c in ckpt["categories"]]
    else:
        # Seeded, so every actor of a pool and every (resumed) run builds the same random model.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = entry.builder(weights=None, weights_backbone=None, num_classes=num_classes or 91, **kwargs)
    return model.eval(), categories


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], path: str, name: str) -> None:
    """Raise a WeightsError listing what does not fit, instead of PyTorch's wall of text."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise WeightsError(f"checkpoint {path} does not fit model {name}: " + "; ".join(parts))


def check_layers(name: str, layers: Sequence[str], *, num_classes: int | None = None, extra: dict | None = None) -> None:
    """Refuse layer names the model does not have, listing the ones it has. The model is built on the
    meta device with random weights: no memory, no file read."""
    with torch.device("meta"):
        network, _ = build_model(name, ResolvedWeights("none"), num_classes=num_classes, extra=extra)
    modules = [n for n, _ in network.named_modules() if n]
    unknown = [layer for layer in layers if layer not in modules]
    if unknown:
        raise ValueError(f"layer {', '.join(repr(u) for u in unknown)} is not a module of {name}; its layers: {', '.join(modules)}")
    calls = dict.fromkeys(layers, 0)  # a module that runs twice per pass (a ResNet block's relu) has no one output
    named = dict(network.named_modules())
    handles = [named[layer].register_forward_hook(lambda *_args, layer=layer: calls.__setitem__(layer, calls[layer] + 1)) for layer in layers]
    try:
        with torch.device("meta"):
            network(torch.zeros(1, 3, 64, 64))
    except Exception:  # noqa: BLE001 - a network that cannot run on the meta device: the names were checked
        return
    finally:
        for h in handles:
            h.remove()
    twice = [layer for layer, n in calls.items() if n > 1]
    if twice:
        raise ValueError(f"layer {twice[0]!r} of {name} runs {calls[twice[0]]} times per forward pass: choose a module that runs once")
