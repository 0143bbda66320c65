"""Every check that can fail before Ray starts or any image is read, and what it finds: a :class:`Plan`.

Preflight lists the input shards, checks each stage (files, weights), refuses an output that
holds shards unless ``--overwrite`` or ``--resume``, and for a resume keeps the shards already
written by the same work (:mod:`pipeline.engine.fingerprint`): a shard whose output exists whole,
with all its rows and this job's stamp, is not read again (``_finished_shards``).
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config.load import ConfigError, dump, missing_files
from pipeline.config.spec import JobSpec
from pipeline.data.importers import IMAGE_EXTENSIONS
from pipeline.data.shards import DatasetError, DatasetMeta, check_shard, list_shards, read_meta, shard_rows
from pipeline.engine.fingerprint import diff, job_fingerprint, row_affecting, shard_stamp
from pipeline.engine.job_record import read_record

@dataclass
class Plan:
    """What preflight found: the shards to process and the metadata that travels with them."""

    job: JobSpec
    shards: list[str]
    rows_per_shard: list[int]
    meta: DatasetMeta
    stage_kwargs: list[dict] = field(default_factory=list)
    finished: set[int] = field(default_factory=set)  # shards already in the output (resume)
    model_categories: list[dict] | None = None  # [{"label", "name"}] of the first stage whose weights name them

    @property
    def categories(self) -> list[dict]:
        """The output's categories: the input's, or else the model's (``category_ids`` are then its labels)."""
        if self.meta.categories or not self.model_categories:
            return self.meta.categories
        return [{"id": c["label"], "name": c["name"]} for c in self.model_categories]

    @property
    def pending(self) -> list[int]:
        return [i for i in range(len(self.shards)) if i not in self.finished]


def preflight(job: JobSpec, source: str, *, overwrite: bool = False, resume: bool = False) -> Plan:
    """Every check that can fail before Ray starts or any image is read.

    ``resume``: output shards that exist with all their rows are kept and not recomputed, provided
    the output was written by the same stages (resource keys aside); anything else is refused.
    An existing file counts as finished only if ``check_shard`` accepts it (``_finished_shards``);
    any other file under a shard's name is rewritten.
    """
    try:
        shards = list_shards(job.input)
    except DatasetError as exc:
        raise ConfigError(f"{source}: input: {exc}{_import_hint(job.input)}") from exc
    meta = read_meta(job.input)
    for i, stage in enumerate(job.stages):
        missing = missing_files(stage, Path(source).parent if os.path.isfile(source) else None)
        if missing:
            raise ConfigError(f"{source}: stages.{i} ({stage.name}).{missing[0]}")
        try:
            stage.preflight()
        except Exception as exc:  # noqa: BLE001 - weights/model problems are reported as config errors
            raise ConfigError(f"{source}: stages.{i} ({stage.name}): {exc}") from exc
    existing = existing_outputs(job.output)
    if existing and not (overwrite or resume):
        raise ConfigError(
            f"{source}: output: {job.output} already holds {len(existing)} shard(s); "
            "pass --resume to continue that run, --overwrite to replace it, or choose another --output"
        )
    rows = [shard_rows(s) for s in shards]
    plan = Plan(job, shards, rows, meta, [s.stage_kwargs(meta.categories) for s in job.stages])
    plan.model_categories = next((c for c in (s.model_categories() for s in job.stages) if c), None)
    if resume and existing and not overwrite:
        _check_same_work(job, source)
        plan.finished = _finished_shards(job, shards, rows, existing)
    return plan


def _import_hint(path: str) -> str:
    """A folder of image files given as --input: say how to make it a dataset."""
    if "://" in path or not os.path.isdir(path):
        return ""
    for entry in os.scandir(path):
        if entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
            return (
                f"; {path} holds image files, not a dataset of shards: import it first with "
                f"`pipeline data import-images {path} DATASET`, then pass --input DATASET"
            )
    return ""


def _check_same_work(job: JobSpec, source: str) -> None:
    previous = read_record(job.output)
    if previous is None or "spec" not in previous:
        return  # shards without a record (e.g. copied by hand): their row counts were checked
    before, now = row_affecting(previous["spec"]), row_affecting(dump(job))
    if before != now:
        diffs = diff(before, now)
        raise ConfigError(
            f"{source}: --resume: {job.output} was written by a different job "
            f"({'; '.join(diffs[:3])}); use --overwrite or another --output"
        )


def existing_outputs(output: str) -> list[str]:
    try:
        return list_shards(output)
    except DatasetError:
        return []


def _finished_shards(job: JobSpec, shards: list[str], rows: list[int], existing: list[str]) -> set[int]:
    """Indices of input shards whose output a resumed run keeps.

    Kept: a readable Parquet file at the shard's name, with the input shard's row count and this
    job's stamp for this shard name (``check_shard``; only footers are read). Anything else under
    that name (truncated or foreign bytes, a shard of another job or another shard's copy, an
    older version's unstamped file) is rewritten by the run, and said so here.
    """
    fingerprint = job_fingerprint(job)
    present = {posixpath.basename(p): p for p in existing}
    finished = set()
    for i, shard in enumerate(shards):
        name = posixpath.basename(shard)
        if name not in present:
            continue
        why = check_shard(present[name], rows=rows[i], stamp=shard_stamp(fingerprint, name))
        if why is None:
            finished.add(i)
        else:
            print(f"--resume: {name} in {job.output} is not a finished shard of this job ({why}); it is rewritten", flush=True)
    return finished
