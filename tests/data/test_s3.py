"""Datasets on an object store, for real: moto's standalone S3 server on loopback, pyarrow's S3FileSystem.

The server is the only stand-in: the CLI, pyarrow, Parquet and the embedded Ray (whose workers read
the input shards from the bucket) are the real ones. They are pointed at it the way a user points
them at MinIO (README, "Datasets"; docker-compose.yml sets the same): ``AWS_ENDPOINT_URL`` plus
credentials and region in the environment, with plain ``s3://bucket/prefix`` URIs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.engine.jobfile import load_job
from pipeline.data.shards import STAMP_KEY, check_shard, list_shards, read_shard, write_shard
from pipeline.data.synth import synth_dataset
from pipeline.engine.fingerprint import job_fingerprint, shard_stamp
from pipeline.engine.preflight import preflight
from pipeline.engine.job_record import read_record
from tests.conftest import FAST_DETECT, REPO

BUCKET = "shards"
SHARDS, ROWS = 6, 4  # 24 images in 6 shards of 4
PIPELINE = [sys.executable, "-m", "pipeline"]  # the same entry point as .venv/bin/pipeline
DETECT = str(REPO / "jobs" / "detect.yaml")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server in a subprocess on a free loopback port, a bucket in it, and the env to reach it."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(endpoint + "/", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"moto server did not start on {endpoint}:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.2)
        env = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_REGION": "us-east-1",
        }
        admin = pafs.S3FileSystem(
            endpoint_override=endpoint, access_key="test", secret_key="test", region="us-east-1", allow_bucket_creation=True
        )
        admin.create_dir(BUCKET)
        with pytest.MonkeyPatch.context() as mp:  # this process reads the bucket as a user would
            mp.delenv("AWS_ENDPOINT_URL_S3", raising=False)
            for k, v in env.items():
                mp.setenv(k, v)
            yield SimpleNamespace(endpoint=endpoint, env=dict(os.environ), fs=admin)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def keys(s3, prefix: str) -> list[str]:
    """Every object under ``BUCKET/prefix`` (directory markers aside), relative to it."""
    infos = s3.fs.get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True))
    return sorted(i.path.split(f"{BUCKET}/{prefix}/", 1)[1] for i in infos if i.type == pafs.FileType.File)


def detect_args(**extra) -> list[str]:
    settings = {**FAST_DETECT, "batch_size": 2, "num_cpus": 0.5, **extra}
    return [x for k, v in settings.items() for x in ("--set", f"stages.detect.{k}={json.dumps(v)}")]


def run_cmd(input_: str, output: str, *extra: str) -> list[str]:
    return PIPELINE + ["run", DETECT, "--input", input_, "--output", output, "--no-progress", *detect_args(), *extra]


def test_import_images_to_s3(s3, tmp_path):
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(5):
        Image.new("RGB", (20 + i, 16), (40 * i, 100, 200)).save(folder / f"img{i}.png")
    uri = f"s3://{BUCKET}/photos"
    result = CliRunner().invoke(main, ["data", "import-images", str(folder), uri, "--rows-per-shard", "2"])
    assert result.exit_code == 0, result.output
    assert keys(s3, "photos") == ["dataset.json", "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]  # no temporaries
    rows = [r for p in list_shards(uri) for r in read_shard(p).to_pylist()]
    assert sorted(r["file_name"] for r in rows) == [f"img{i}.png" for i in range(5)]
    assert {r["file_name"]: r["image"] for r in rows} == {f"img{i}.png": (folder / f"img{i}.png").read_bytes() for i in range(5)}
    assert {r["file_name"]: (r["width"], r["height"]) for r in rows} == {f"img{i}.png": (20 + i, 16) for i in range(5)}


@pytest.mark.ray
def test_run_killed_then_resumed_then_evaluated_on_s3(s3, tmp_path):
    """pipeline run S3 -> S3, SIGKILLed mid-way, then --resume over planted bad objects, then pipeline eval."""
    ds, part = f"s3://{BUCKET}/shapes", f"s3://{BUCKET}/pred"
    synth = CliRunner().invoke(main, ["data", "synth", ds, "--images", str(SHARDS * ROWS), "--seed", "3", "--size", "96", "--rows-per-shard", str(ROWS)])
    assert synth.exit_code == 0, synth.output
    names = [f"part-{i:05d}.parquet" for i in range(SHARDS)]
    input_ids = {p.rsplit("/", 1)[1]: read_shard(p, columns=["image_id"])["image_id"].to_pylist() for p in list_shards(ds)}
    assert sorted(input_ids) == names and all(len(v) == ROWS for v in input_ids.values())

    # The job as a separate driver (its own embedded Ray, whose workers read the input from the bucket),
    # killed with its whole process group once a shard is out.
    proc = subprocess.Popen(run_cmd(ds, part), env=s3.env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while proc.poll() is None and time.time() < deadline:
            if any(k.endswith(".parquet") for k in keys(s3, "pred")):
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = [k for k in keys(s3, "pred") if k.endswith(".parquet")]
    assert 1 <= len(done) < SHARDS, f"kill came at {len(done)} shards; the test needs a job cut in the middle"
    assert read_record(part)["state"] == "running"
    # Only whole shards of this job are visible, and nothing but them and the record (no temporaries).
    assert set(keys(s3, "pred")) <= {"job.json", *names}
    # Stamped by the job (the fingerprint of its row-affecting settings) for their own input shard.
    fingerprint = json.loads(pq.read_metadata(f"{BUCKET}/pred/{done[0]}", filesystem=s3.fs).metadata[STAMP_KEY.encode()])["job"]
    for name in done:
        assert check_shard(f"{part}/{name}", rows=ROWS, stamp=shard_stamp(fingerprint, name)) is None
        assert read_shard(f"{part}/{name}", columns=["image_id"])["image_id"].to_pylist() == input_ids[name]

    # Plant what a crashed foreign writer or a wrong copy leaves under two other shards' names:
    # truncated bytes, and a whole, valid shard of this very job but made for another input shard.
    source = done[0]
    with s3.fs.open_input_stream(f"{BUCKET}/pred/{source}") as f:
        good = f.read()
    truncated, copied = [n for n in names if n != source][-2:]
    for name, data in ((truncated, good[: len(good) // 2]), (copied, good)):
        with s3.fs.open_output_stream(f"{BUCKET}/pred/{name}") as f:
            f.write(data)
    kept = sorted(set(done) - {truncated, copied})
    mtimes = {n: s3.fs.get_file_info(f"{BUCKET}/pred/{n}").mtime for n in kept}

    resumed = subprocess.run(run_cmd(ds, part, "--resume"), env=s3.env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"--resume: {truncated} in {part} is not a finished shard of this job (not a readable Parquet file" in resumed.stdout
    assert f"--resume: {copied} in {part} is not a finished shard of this job (written by another job or for another shard" in resumed.stdout
    record = read_record(part)
    assert record["state"] == "succeeded"
    assert record["shards_skipped"] == len(kept) and record["summary"]["rows_out"] == SHARDS * ROWS
    assert {n: s3.fs.get_file_info(f"{BUCKET}/pred/{n}").mtime for n in kept} == mtimes  # kept as they were
    # Every input row exactly once, in its own shard, each shard whole and stamped.
    out_ids = {p.rsplit("/", 1)[1]: read_shard(p, columns=["image_id"])["image_id"].to_pylist() for p in list_shards(part)}
    assert out_ids == input_ids
    assert all(check_shard(f"{part}/{n}", rows=ROWS, stamp=shard_stamp(fingerprint, n)) is None for n in names)

    # pipeline eval on the resumed output, ground truth from the bucket too: the numbers the job wrote.
    out = tmp_path / "eval"
    evaluated = subprocess.run(
        PIPELINE + ["eval", part, "--gt", ds, "--iou-type", "bbox", "--out", str(out)], env=s3.env, capture_output=True, text=True, timeout=300
    )
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    with s3.fs.open_input_stream(f"{BUCKET}/pred/metrics.json") as f:
        in_job = json.loads(f.read())
    assert set(metrics["bbox"]) >= {"AP", "AP50", "ARl", "per_category"}
    assert metrics["bbox"]["AP"] == in_job["bbox"]["AP"] and metrics["bbox"]["AR100"] == in_job["bbox"]["AR100"]
    assert not [k for k in keys(s3, "pred") if ".tmp-" in k]


def test_the_s3_specific_endpoint_variable_works_too(s3, monkeypatch):
    """pyarrow 26 also takes ``AWS_ENDPOINT_URL_S3`` (the AWS SDKs' per-service form) for s3:// URIs."""
    uri = f"s3://{BUCKET}/endpoint-check"
    write_shard(f"{uri}/part-00000.parquet", pa.table({"image_id": pa.array([7], pa.int64())}))
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.endpoint)
    assert [read_shard(p).to_pylist() for p in list_shards(uri)] == [[{"image_id": 7}]]


def test_a_writer_killed_before_close_leaves_no_object(s3):
    """What the S3 publish relies on: an object exists only once its upload completes at close().

    A writer process sends 12 MiB (more than one multipart part) to the final name and is SIGKILLed
    before close: the name stays empty, while the server holds the started upload.
    """
    script = textwrap.dedent(
        f"""
        import os, signal
        import pyarrow.fs as pafs
        fs, p = pafs.FileSystem.from_uri("s3://{BUCKET}/crash/part-00000.parquet")
        stream = fs.open_output_stream(p)
        stream.write(os.urandom(12 << 20))
        stream.flush()  # the parts are uploaded; only CompleteMultipartUpload is missing
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], env=s3.env, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert s3.fs.get_file_info(f"{BUCKET}/crash/part-00000.parquet").type == pafs.FileType.NotFound
    import boto3

    client = boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test")
    uploads = client.list_multipart_uploads(Bucket=BUCKET, Prefix="crash/").get("Uploads", [])
    assert [u["Key"] for u in uploads] == ["crash/part-00000.parquet"]  # the bytes went out, unpublished


def test_write_shard_on_s3_publishes_the_final_name_only(s3):
    table = pa.table({"image_id": pa.array(range(10), pa.int64()), "error": pa.nulls(10, pa.string())})
    uri = f"s3://{BUCKET}/direct/part-00000.parquet"
    write_shard(uri, table, stamp={"job": "x", "shard": "part-00000.parquet"})
    assert keys(s3, "direct") == ["part-00000.parquet"]
    assert read_shard(uri).to_pylist() == table.to_pylist()
    assert check_shard(uri, rows=10, stamp={"job": "x", "shard": "part-00000.parquet"}) is None
    assert "another job" in check_shard(uri, rows=10, stamp={"job": "y", "shard": "part-00000.parquet"})
    # Nothing is handed to the stream before the payload is whole: a table that cannot be written
    # (a column Parquet cannot store) fails before any object exists. (pq.write_table straight into
    # an S3 stream, as the tmp+move code did, leaves an empty object: the stream is closed, so completed.)
    bad = pa.table({"x": pa.array([{}], pa.struct([]))})
    with pytest.raises(pa.ArrowNotImplementedError, match="no child field"):
        write_shard(f"s3://{BUCKET}/direct/part-00001.parquet", bad)
    assert keys(s3, "direct") == ["part-00000.parquet"]


def _stamped(table: pa.Table, stamp: dict | None, path: Path) -> None:
    write_shard(str(path), table, stamp=stamp)


def test_resume_keeps_only_whole_shards_of_this_job(tmp_path, capsys):
    """Local: what --resume keeps. Truncated, empty, foreign, mis-copied, other-job and short files are rewritten."""
    ds = str(tmp_path / "ds")
    synth_dataset(ds, images=7 * 2, seed=1, size=64, rows_per_shard=2)
    out = tmp_path / "out"
    job = load_job(DETECT, input=ds, output=str(out), overrides=[a for a in detect_args() if a != "--set"])
    other = load_job(DETECT, input=ds, output=str(out), overrides=[a for a in detect_args(score_threshold=0.6) if a != "--set"])
    fp, fp_other = job_fingerprint(job), job_fingerprint(other)
    assert fp != fp_other
    assert job_fingerprint(load_job(DETECT, input=ds, output=str(out), overrides=[a for a in detect_args(batch_size=3) if a != "--set"])) == fp
    table = pa.table({"image_id": pa.array([1, 2], pa.int64()), "error": pa.nulls(2, pa.string())})
    name = [f"part-{i:05d}.parquet" for i in range(7)]
    _stamped(table, shard_stamp(fp, name[0]), out / name[0])  # whole, this job, this shard: kept
    _stamped(table, shard_stamp(fp, name[1]), out / name[1])
    data = (out / name[1]).read_bytes()
    (out / name[1]).write_bytes(data[: len(data) - 100])  # truncated
    _stamped(table.slice(0, 1), shard_stamp(fp, name[2]), out / name[2])  # a row short
    _stamped(table, shard_stamp(fp_other, name[3]), out / name[3])  # another job's output
    _stamped(table, shard_stamp(fp, name[0]), out / name[4])  # a copy of shard 0
    _stamped(table, None, out / name[5])  # right size, but nobody's stamp (foreign)
    (out / name[6]).write_bytes(b"")  # empty

    plan = preflight(job, "detect.yaml", resume=True)
    assert plan.finished == {0}
    assert plan.pending == [1, 2, 3, 4, 5, 6]
    said = capsys.readouterr().out
    for n in name[1:]:
        assert f"--resume: {n} in {out} is not a finished shard of this job" in said
    assert "not a readable Parquet file" in said and "holds 1 rows, its input shard 2" in said
    assert said.count("written by another job or for another shard") == 2 and "not stamped by a job" in said
