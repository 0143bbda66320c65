"""Reading and writing datasets: a folder of Parquet shards plus ``dataset.json``.

Layout (local folder or any pyarrow filesystem URI such as ``s3://bucket/prefix``)::

    DATASET/
      dataset.json          # {"info": {...}, "categories": [...], "kind": "images"|"predictions"}
      part-00000.parquet    # rows sorted by image_id within a shard
      part-00001.parquet
      ...

Shards are the unit of parallelism, of resumption and of output naming: a job writes one output
shard per input shard, under the same name. A file appears under its final name only when it is
complete, so a reader never sees half a shard (``publish_bytes`` says how, per filesystem).
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

DATASET_JSON = "dataset.json"
SHARD_PATTERN = "part-{:05d}.parquet"
# Parquet key-value metadata a job writes into each output shard: what it is the output of (JSON),
# so a resumed run can tell its own finished shard from a foreign file under the same name.
STAMP_KEY = "pipeline.stamp"
# Filesystems whose rename is atomic (within one volume): files are written to a temporary name and
# renamed. On the others (object stores: s3, gcs, abfs...) a "move" is a copy plus a delete.
RENAME_IS_ATOMIC = frozenset({"local", "hdfs", "mock"})


class DatasetError(ValueError):
    """A dataset path that cannot be read as a dataset (named in the message)."""


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """Map a local path or URI to (filesystem, path inside it)."""
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def join(base: str, name: str) -> str:
    """Join a URI-or-path with a file name without mangling the scheme."""
    if "://" in base:
        return base.rstrip("/") + "/" + name
    return os.path.join(base, name)


@dataclass
class DatasetMeta:
    """What travels beside the shards: categories (COCO dicts), info, and what kind of rows."""

    categories: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    kind: str = "images"  # "images" (input) or "predictions" (written by a job)

    def to_json(self) -> dict:
        return {"kind": self.kind, "info": self.info, "categories": self.categories}

    @classmethod
    def from_json(cls, data: dict) -> DatasetMeta:
        return cls(
            categories=list(data.get("categories", [])),
            info=dict(data.get("info", {})),
            kind=data.get("kind", "images"),
        )


def list_shards(path: str) -> list[str]:
    """Full paths of a dataset's shard files, sorted by name. Raises if there are none.

    Local paths come back absolute: Ray workers may run in another working directory.
    """
    if "://" not in path:
        path = os.path.abspath(path)
    fs, root = resolve(path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise DatasetError(f"dataset not found: {path}")
    if info.type == pafs.FileType.File:
        if root.endswith(".parquet"):
            return [path]
        raise DatasetError(f"not a dataset folder or .parquet file: {path}")
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    names = sorted(
        posixpath.basename(i.path)
        for i in infos
        if i.type == pafs.FileType.File and i.path.endswith(".parquet")
    )
    if not names:
        raise DatasetError(f"no .parquet shards in {path}")
    return [join(path, n) for n in names]


def read_meta(path: str) -> DatasetMeta:
    """Read ``dataset.json``; a dataset without one has no categories (e.g. plain Parquet)."""
    fs, root = resolve(path)
    if root.endswith(".parquet"):
        root = posixpath.dirname(root)
    meta_path = posixpath.join(root, DATASET_JSON)
    try:
        with fs.open_input_stream(meta_path) as f:
            return DatasetMeta.from_json(json.loads(f.read().decode("utf-8")))
    except FileNotFoundError:
        return DatasetMeta()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{meta_path}: not valid JSON ({exc})") from exc


def write_meta(path: str, meta: DatasetMeta) -> None:
    fs, root = resolve(path)
    fs.create_dir(root, recursive=True)
    data = json.dumps(meta.to_json(), indent=2).encode("utf-8")
    publish_bytes(fs, posixpath.join(root, DATASET_JSON), data)


def shard_rows(shard: str) -> int:
    """Row count of one shard from its footer (no data read)."""
    fs, p = resolve(shard)
    with fs.open_input_file(p) as f:
        return pq.ParquetFile(f).metadata.num_rows


def shard_schema(shard: str) -> pa.Schema:
    fs, p = resolve(shard)
    with fs.open_input_file(p) as f:
        return pq.ParquetFile(f).schema_arrow


def read_shard(shard: str, columns: list[str] | None = None) -> pa.Table:
    fs, p = resolve(shard)
    return pq.read_table(p, filesystem=fs, columns=columns)


def iter_shard(shard: str, batch_rows: int, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """Stream a shard in tables of at most ``batch_rows`` rows, so a shard never sits in memory whole."""
    fs, p = resolve(shard)
    with fs.open_input_file(p) as f:
        pf = pq.ParquetFile(f)
        names = columns if columns is not None else pf.schema_arrow.names
        names = [c for c in names if c in pf.schema_arrow.names]
        for batch in pf.iter_batches(batch_size=batch_rows, columns=names):
            yield pa.Table.from_batches([batch])


def renames_atomically(fs: pafs.FileSystem) -> bool:
    return fs.type_name in RENAME_IS_ATOMIC


def write_shard(path: str, table: pa.Table, stamp: Mapping | None = None) -> None:
    """Write one shard so that it appears under ``path`` complete or not at all (``publish_bytes``).

    ``stamp`` (JSON-able) is stored in the file's key-value metadata under ``STAMP_KEY``; a job
    stamps its outputs so that ``check_shard`` recognises them on ``--resume``.
    """
    if stamp is not None:
        meta = dict(table.schema.metadata or {})
        meta[STAMP_KEY.encode()] = json.dumps(stamp, sort_keys=True).encode("utf-8")
        table = table.replace_schema_metadata(meta)
    fs, p = resolve(path)
    if renames_atomically(fs):
        fs.create_dir(posixpath.dirname(p), recursive=True)
        tmp = _tmp_name(p)
        try:
            pq.write_table(table, tmp, filesystem=fs, compression="zstd")
            fs.move(tmp, p)
        except BaseException:
            _remove_quietly(fs, tmp)
            raise
    else:
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, compression="zstd")
        publish_bytes(fs, p, buf.getvalue())


def publish_bytes(fs: pafs.FileSystem, p: str, data: bytes | pa.Buffer) -> None:
    """Make ``data`` appear at ``p`` whole or not at all, replacing what was there.

    The guarantee, per filesystem:

    * local (and other ``RENAME_IS_ATOMIC``) filesystems: write a temporary file beside ``p``, then
      rename it over ``p``. rename(2) is atomic: readers see the old file or the new one. A killed
      writer leaves at most a ``*.tmp-XXXXXXXX`` file, which no reader lists (not ``*.parquet``).
    * object stores (S3, MinIO, GCS...): there is no atomic rename (pyarrow's ``move`` on S3 is a
      copy and then a delete, so a reader or a crash in between sees a half-published state), but
      an object write is atomic: S3 makes an object visible only when its PutObject or
      CompleteMultipartUpload succeeds. pyarrow's S3 output stream uploads parts as they fill
      and completes the multipart upload only in ``close()``, so the payload, fully serialised
      in memory beforehand, goes to the final name in one ``write`` followed by ``close``. A
      writer killed before ``close`` leaves no object, only an incomplete multipart upload that
      is invisible to readers (a bucket lifecycle rule ``AbortIncompleteMultipartUpload`` reclaims
      its parts). ``close`` fails without completing if a part failed to upload. Nothing is ever
      passed to the stream before the payload is whole: pyarrow's stream *completes* the upload
      when it is closed by ``with`` after an exception, or by its destructor, so streaming a
      Parquet writer straight into it could publish a truncated file.

    Whichever way, a reader can still meet a file at a shard's name that this code did not write
    complete (a hand copy, an older version's crash, another tool): ``check_shard`` is what decides,
    on resume, whether an existing file is a finished shard.
    """
    if renames_atomically(fs):
        tmp = _tmp_name(p)
        try:
            with fs.open_output_stream(tmp) as f:
                f.write(data)
            fs.move(tmp, p)
        except BaseException:
            _remove_quietly(fs, tmp)
            raise
    else:
        stream = fs.open_output_stream(p)
        stream.write(data)
        stream.close()


# Kept for callers of the old private name.
_atomic_write_bytes = publish_bytes


def _tmp_name(p: str) -> str:
    return f"{p}.tmp-{uuid.uuid4().hex[:8]}"


def _remove_quietly(fs: pafs.FileSystem, p: str) -> None:
    try:
        fs.delete_file(p)
    except OSError:
        pass


def check_shard(path: str, *, rows: int, stamp: Mapping | None = None) -> str | None:
    """Why the file at ``path`` is not a finished shard of ``rows`` rows stamped ``stamp``; None if it is.

    Reads only the Parquet footer (one ranged read on an object store). Anything that is not a
    readable Parquet file (truncated, empty, another format), has another row count, or (when
    ``stamp`` is given) lacks that exact stamp is reported, so that the caller rewrites it.
    """
    try:
        fs, p = resolve(path)
        with fs.open_input_file(p) as f:
            md = pq.ParquetFile(f).metadata
    except (OSError, ValueError, pa.ArrowException) as exc:  # ArrowInvalid is a ValueError
        return f"not a readable Parquet file ({' '.join(str(exc).split())[:200]})"
    if md.num_rows != rows:
        return f"holds {md.num_rows} rows, its input shard {rows}"
    if stamp is not None:
        raw = (md.metadata or {}).get(STAMP_KEY.encode())
        try:
            found = json.loads(raw.decode("utf-8")) if raw is not None else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            found = None
        if found != json.loads(json.dumps(stamp, sort_keys=True)):
            return "not stamped by a job" if found is None else f"written by another job or for another shard (stamp {found})"
    return None


def prepare_output(out: str, *, overwrite: bool) -> None:
    """Make ``out`` ready for a new dataset: refuse a non-empty one unless ``overwrite``.

    Writing a dataset into a folder that already holds one would leave its old shards beside the
    new ones (duplicate image ids, foreign images), so every command that writes a dataset calls
    this first. ``overwrite`` removes the old dataset's own files (shards, ``dataset.json``,
    temporary files) and nothing else; a folder that holds other files is refused even then.
    """
    fs, root = resolve(out)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        return
    if info.type != pafs.FileType.Directory:
        raise DatasetError(f"output {out} exists and is not a folder")
    entries = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    if not entries:
        return
    ours = [e for e in entries if e.type == pafs.FileType.File and _is_dataset_file(e.base_name)]
    others = sorted(e.base_name for e in entries if e not in ours)
    if not overwrite:
        raise DatasetError(
            f"output {out} is not empty ({len(entries)} entries, e.g. {', '.join(sorted(e.base_name for e in entries)[:3])}); "
            "pass --overwrite to replace the dataset there, or choose an empty folder"
        )
    if others:
        raise DatasetError(
            f"output {out} holds files that are not part of a dataset ({', '.join(others[:5])}); "
            "--overwrite only replaces a dataset: choose an empty folder"
        )
    for e in ours:
        fs.delete_file(e.path)


def _is_dataset_file(name: str) -> bool:
    return name == DATASET_JSON or name.startswith("part-") or ".tmp-" in name


class ShardWriter:
    """Cut a stream of image rows into shards of ``rows_per_shard`` rows: part-00000, part-00001...

    The output must be empty (or ``overwrite``): see :func:`prepare_output`.
    """

    def __init__(self, out: str, rows_per_shard: int, schema: pa.Schema, *, overwrite: bool = False):
        if rows_per_shard < 1:
            raise ValueError("rows_per_shard must be >= 1")
        prepare_output(out, overwrite=overwrite)
        self.out, self.rows_per_shard, self.schema = out, rows_per_shard, schema
        self._rows: list[dict] = []
        self.shards_written = 0
        self.rows_written = 0

    def add(self, row: dict) -> None:
        self._rows.append(row)
        if len(self._rows) >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        table = pa.Table.from_pylist(self._rows, schema=self.schema)
        write_shard(join(self.out, SHARD_PATTERN.format(self.shards_written)), table)
        self.shards_written += 1
        self.rows_written += len(self._rows)
        self._rows = []
