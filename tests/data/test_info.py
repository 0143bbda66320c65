"""data info: counts, and which rows are error rows and why."""

import json
import shutil

from click.testing import CliRunner

from pipeline.cli import main
from pipeline.data.importers import import_images
from pipeline.data.info import dataset_info


def test_error_rows_are_named_with_their_reason(fixtures_dir, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(fixtures_dir / "images" / "skimage" / "astronaut.png", folder / "astronaut.png")
    shutil.copy(fixtures_dir / "images" / "sahi" / "terrain2.png", folder / "terrain2.png")
    good = (folder / "astronaut.png").read_bytes()
    for n in range(7):  # corrupt files: a JPEG header then text, a PNG cut short, an empty file
        data = [b"\xff\xd8\xff\xe0 this is not really a jpeg", good[:40], b""][n % 3]
        (folder / f"broken{n}.{'jpg' if n % 3 == 0 else 'png'}").write_bytes(data)
    out = str(tmp_path / "ds")
    imported = import_images(str(folder), out, rows_per_shard=3)
    assert len(imported["errors"]) == 7

    info = dataset_info(out)
    assert info["rows"] == 9 and info["error_rows"] == 7
    examples = info["error_examples"]
    assert len(examples) == 5
    assert [e["file_name"] for e in examples] == [f"broken{n}.{'jpg' if n % 3 == 0 else 'png'}" for n in range(5)]
    assert [e["image_id"] for e in examples] == [2, 3, 4, 5, 6]  # ids in sorted name order: astronaut 1, broken0..6, terrain2 9
    assert all(e["error"] for e in examples)

    text = CliRunner().invoke(main, ["data", "info", out])
    assert text.exit_code == 0, text.output
    assert "error_rows" in text.output and "broken0.jpg" in text.output and "broken4.png" in text.output
    assert "broken5.png" not in text.output and "... and 2 more" in text.output
    assert "cannot read image header" in text.output or "empty" in text.output
    as_json = json.loads(CliRunner().invoke(main, ["data", "info", out, "--json"]).output)
    assert as_json["error_examples"] == examples


def test_a_clean_dataset_lists_no_error_rows(tmp_path):
    from pipeline.data.synth import synth_dataset

    out = str(tmp_path / "s")
    synth_dataset(out, images=3, seed=1, size=64)
    assert dataset_info(out)["error_examples"] == []
    text = CliRunner().invoke(main, ["data", "info", out]).output
    assert "error rows (first" not in text
