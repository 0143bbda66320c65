"""Annotation round trips: predictions out to labelling tools, people's labels back in.

* :mod:`pipeline.annotate.select` -- the one place that decides which predicted objects leave
  (score thresholds, per-class thresholds, the model -> dataset class map) and counts the rest.
* :mod:`pipeline.annotate.yolo` -- ``pipeline data export-yolo``: an Ultralytics-style folder.
* :mod:`pipeline.annotate.labelstudio` -- ``pipeline data export-labelstudio`` (tasks with
  pre-annotations) and ``pipeline data import-labelstudio`` (a Label Studio JSON export -> dataset).

Box formats: our ``boxes`` column is **xyxy** pixels; COCO ``bbox`` is **xywh** pixels; YOLO is
``cx cy w h`` normalised to [0, 1]; Label Studio is ``x y width height`` in percent of the image.
"""

from __future__ import annotations


class AnnotationError(ValueError):
    """Input that cannot be exported or imported as asked; the message names the item (class, image, task)."""
