import pyarrow as pa
import pytest

from pipeline import schema
from pipeline.data.info import dataset_info
from pipeline.data.shards import DatasetError, iter_shard, list_shards, read_meta, shard_rows, write_shard
from pipeline.data.synth import synth_dataset


def test_uri_datasets_work_like_folders(tmp_path):
    uri = f"file://{tmp_path}/uri-ds"
    synth_dataset(uri, images=6, seed=0, rows_per_shard=4)
    shards = list_shards(uri)
    assert [s.rsplit("/", 1)[1] for s in shards] == ["part-00000.parquet", "part-00001.parquet"]
    assert all(s.startswith("file://") for s in shards)
    assert [shard_rows(s) for s in shards] == [4, 2]
    assert len(read_meta(uri).categories) == 3
    assert dataset_info(uri)["rows"] == 6


def test_iter_shard_streams_in_bounded_tables(tmp_path):
    synth_dataset(str(tmp_path / "ds"), images=10, seed=0, rows_per_shard=10)
    sizes = [t.num_rows for t in iter_shard(list_shards(str(tmp_path / "ds"))[0], 3, columns=["image_id", "nope"])]
    assert sizes == [3, 3, 3, 1]


def test_write_is_atomic_and_leaves_no_temporary_files(tmp_path):
    table = schema.image_table([{"image_id": 1}])
    write_shard(str(tmp_path / "out" / "part-00000.parquet"), table)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["part-00000.parquet"]


def test_relative_paths_come_back_absolute(tmp_path, monkeypatch):
    synth_dataset(str(tmp_path / "ds"), images=2, seed=0)
    monkeypatch.chdir(tmp_path)
    assert list_shards("ds")[0] == str(tmp_path / "ds" / "part-00000.parquet")


def test_not_a_dataset(tmp_path):
    with pytest.raises(DatasetError, match="dataset not found"):
        list_shards(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no .parquet shards"):
        list_shards(str(tmp_path / "empty"))


def test_conform_fills_missing_optional_columns():
    table = pa.table({"image_id": pa.array([1], pa.int64()), "image": pa.array([b"x"])})
    out = schema.conform(table, schema.IMAGE_SCHEMA)
    assert out.schema == schema.IMAGE_SCHEMA and out["error"].to_pylist() == [None]
