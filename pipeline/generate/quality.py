"""Sample quality of a generative model, measured through a trained classifier (``pipeline eval-generative``).

A generative model's samples are an images dataset; the reference is a dataset of held-out real
images. Both go through a classifier that knows the domain (by default the project's shipped
``small_cnn`` for the synthetic shapes, ``conf/models/small_cnn_shapes.pth``), exactly as the
``classify`` stage runs it (its resize, center crop and normalisation), and three things are read
off its outputs:

* **confident share**: the share of images whose top class has probability >= ``CONFIDENT``
  (0.9). Measured on the samples, on the real images as they are (the ceiling the issue sets:
  ``confident_share_ratio`` = samples / real) and on the real images as the models learned them
  (shorter side resized to the samples' side, center crop: ``real_confident_share_at_size``),
  which separates what the resolution costs from what the model costs;
* **class histogram**: the share of samples per top class, against the training set's label
  shares (``--train``; by default the reference's labels, else its top classes), and their total
  variation distance (0: the same shares; 1: disjoint);
* **Frechet distance** between Gaussians fitted to the classifier's penultimate features (the
  input of its last linear layer: 128 numbers for ``small_cnn``) of the samples and of the real
  images at the samples' size. It is the FID formula in this classifier's feature space, **not
  Inception FID**: its numbers are not comparable with published FIDs. The estimate is biased
  upwards by finite samples, so it comes with its floor: the reference is split into two random
  halves A and B (a fixed seed), the first ``frechet_count`` samples (at most as many as B has)
  are compared with A, and as many of B with A (``frechet_floor``, real against real). The bias
  grows as the count falls: compare distances computed with the same count.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from pipeline import schema
from pipeline.data.decode import DecodeError, decode_image
from pipeline.data.shards import DatasetError, list_shards, read_meta, read_shard, shard_schema
from pipeline.generate.sheet import image_grid
from pipeline.models.registry import get_entry
from pipeline.models.weights import WeightsError, checkpoint_model_name, resolve_weights
from pipeline.stages.classify import ClassifyStage
from pipeline.train.generative_objective import to_square

CONFIDENT = 0.9  # a prediction at least this probable counts as confident


class ClassifierView:
    """A classifier's probabilities and penultimate features, through the classify stage's preprocessing."""

    def __init__(self, checkpoint: str, *, batch_size: int = 128):
        self.stage_model_name = checkpoint_model_name(checkpoint)
        if get_entry(self.stage_model_name).task != "classify":
            raise WeightsError(f"{checkpoint} is a {self.stage_model_name} checkpoint, not a classifier's: --classifier takes one "
                               "(e.g. conf/models/small_cnn_shapes.pth)")
        self.stage = ClassifyStage(model=self.stage_model_name, weights=checkpoint, top_k=1)
        self.stage.model.eval()
        linears = [m for m in self.stage.model.modules() if isinstance(m, torch.nn.Linear)]
        if not linears:
            raise WeightsError(f"{checkpoint}: the classifier has no linear layer whose input could serve as features")
        self.features: list[torch.Tensor] = []
        linears[-1].register_forward_pre_hook(lambda module, args: self.features.append(args[0].detach().flatten(1)))
        self.batch_size = batch_size
        named = resolve_weights(self.stage_model_name, checkpoint).categories()
        self.name_of_class = {c["label"]: c["name"] for c in named or []}  # class index -> category name
        self.class_of_name = {name: label for label, name in self.name_of_class.items()}

    @torch.inference_mode()
    def __call__(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """RGB uint8 (H, W, 3) images -> (probabilities (N, C), features (N, D)), float64."""
        probabilities, features = [], []
        for start in range(0, len(images), self.batch_size):
            x = torch.stack([self.stage.preprocess(img) for img in images[start : start + self.batch_size]])
            self.features.clear()
            probabilities.append(torch.softmax(self.stage.model(x.to(self.stage.device)).float(), dim=1).cpu())
            features.append(self.features[-1].cpu())
        return torch.cat(probabilities).double().numpy(), torch.cat(features).double().numpy()


def read_images(dataset: str) -> list[np.ndarray]:
    """Every decodable image of ``dataset``, in shard order (undecodable ones are left out)."""
    images = []
    for shard in list_shards(dataset):
        for data in read_shard(shard, columns=[schema.IMAGE]).column(schema.IMAGE).to_pylist():
            try:
                images.append(decode_image(data))
            except DecodeError:
                continue
    if not images:
        raise DatasetError(f"{dataset}: no decodable images")
    return images


def dataset_labels(dataset: str) -> list[int] | None:
    """The ``label`` column of every row, or None when some row (or shard) has none."""
    labels: list = []
    for shard in list_shards(dataset):
        if schema.LABEL not in shard_schema(shard).names:
            return None
        labels += read_shard(shard, columns=[schema.LABEL]).column(schema.LABEL).to_pylist()
    return labels if labels and all(label is not None for label in labels) else None


def at_size(images: list[np.ndarray], size: int) -> list[np.ndarray]:
    """Real images as the generative models learned them: shorter side resized to ``size``, center crop."""
    return [(to_square(img, size, None) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy() for img in images]


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of Gaussians fitted to (N, D) features.

    Tr((S_a S_b)^(1/2)) is the sum of the square roots of the eigenvalues of S_a^(1/2) S_b S_a^(1/2),
    a symmetric positive semi-definite matrix with the same eigenvalues as S_a S_b: two symmetric
    eigendecompositions, no general matrix square root.
    """
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(w.clip(min=0))) @ v.T
    cross = np.sqrt(np.linalg.eigvalsh(root_a @ cov_b @ root_a).clip(min=0)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


def histogram(labels: np.ndarray, classes: int) -> np.ndarray:
    return np.bincount(labels, minlength=classes)[:classes] / max(len(labels), 1)


def evaluate_samples(samples: str, reference: str, *, classifier: str, train: str | None = None) -> dict:
    """The numbers of the module docstring, as ``metrics.json`` holds them.

    Class histograms are keyed by category name (the classifier's categories); labels of a dataset
    are its category ids, mapped to the classifier's classes by name (ids where names are missing).
    """
    view = ClassifierView(classifier)
    fake, real = read_images(samples), read_images(reference)
    if len(real) < 4:
        raise DatasetError(f"{reference}: {len(real)} images; the Frechet floor needs at least 4 (two halves of 2)")
    if len(fake) < 2:
        raise DatasetError(f"{samples}: {len(fake)} sample; a Frechet distance needs at least 2 (a covariance)")
    sizes = {img.shape[:2] for img in fake}
    if len(sizes) != 1 or next(iter(sizes))[0] != next(iter(sizes))[1]:
        raise DatasetError(f"{samples}: samples are not squares of one size ({sorted(sizes)[:3]}...)")
    size = next(iter(sizes))[0]

    p_fake, f_fake = view(fake)
    p_real, _ = view(real)
    p_real_size, f_real_size = view(at_size(real, size))
    classes = p_fake.shape[1]

    order = np.random.default_rng(0).permutation(len(real))  # halves of every class, even if the reference is sorted by class
    a, b = order[: len(real) // 2], order[len(real) // 2 :]
    n = min(len(fake), len(b))
    fd = frechet_distance(f_fake[:n], f_real_size[a])
    floor = frechet_distance(f_real_size[b[:n]], f_real_size[a])

    confident = float((p_fake.max(axis=1) >= CONFIDENT).mean())
    real_confident = float((p_real.max(axis=1) >= CONFIDENT).mean())
    train_shares = class_shares(train or reference, view, classes)
    sample_shares = histogram(p_fake.argmax(axis=1), classes)

    def label(k: int) -> str:
        return view.name_of_class.get(k, str(k))

    return {
        "samples": samples, "reference": reference, "classifier": classifier, "image_size": size,
        "sample_count": len(fake), "reference_count": len(real), "frechet_count": n,
        "confident_threshold": CONFIDENT,
        "confident_share": confident,
        "real_confident_share": real_confident,
        "real_confident_share_at_size": float((p_real_size.max(axis=1) >= CONFIDENT).mean()),
        "confident_share_ratio": confident / real_confident if real_confident else None,
        "class_histogram": {label(k): float(v) for k, v in enumerate(sample_shares)},
        "train_class_histogram": {label(k): float(v) for k, v in enumerate(train_shares)},
        "histogram_distance": float(0.5 * np.abs(sample_shares - train_shares).sum()),
        "frechet_distance": fd,
        "frechet_floor": floor,
    }


def label_indices(labels: list[int], view: ClassifierView, dataset: str, classes: int) -> np.ndarray:
    """A dataset's category ids -> the classifier's class indices: by category name when both name them,
    else id - 1 (the project's classifiers number the categories 1..C as classes 0..C-1)."""
    by_id = {c["id"]: c["name"] for c in read_meta(dataset).categories}
    if view.class_of_name and by_id:
        missing = sorted({i for i in labels if i not in by_id})
        if missing:
            raise DatasetError(f"{dataset}: labels {missing[:5]} are not among its dataset.json categories")
        unknown = sorted({by_id[i] for i in labels} - set(view.class_of_name))
        if unknown:
            raise DatasetError(f"{dataset}: categories {unknown} are not the classifier's ({', '.join(view.class_of_name)})")
        return np.array([view.class_of_name[by_id[i]] for i in labels])
    out = np.array(labels) - 1
    if out.min() < 0 or out.max() >= classes:
        raise DatasetError(f"{dataset}: labels outside the classifier's {classes} classes")
    return out


def class_shares(dataset: str, view: ClassifierView, classes: int) -> np.ndarray:
    """Share of each class in ``dataset``: of its labels when every row has one, else of the classifier's top classes."""
    labels = dataset_labels(dataset)
    if labels is not None:
        return histogram(label_indices(labels, view, dataset, classes), classes)
    return histogram(view(read_images(dataset))[0].argmax(axis=1), classes)


def samples_sheet(dataset: str, count: int = 64) -> Image.Image:
    """The first ``count`` images of ``dataset`` on one picture, a near-square grid (``samples.png``)."""
    images = [torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255 for img in read_images(dataset)[:count]]
    columns = max(1, math.ceil(math.sqrt(len(images))))
    return image_grid([images[k : k + columns] for k in range(0, len(images), columns)], min_cell=64)
