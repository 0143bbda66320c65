"""StageActor without Ray: error rows pass through, a failing row cannot take its batch down."""

import io

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline import schema
from pipeline.data.decode import decode_batch
from pipeline.engine.stage_actor import StageActor
from pipeline.stages.detect import DetectSpec, DetectStage
from tests.conftest import FAST_DETECT


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_error_rows_pass_and_a_bad_row_fails_alone():
    rows = [{"image_id": i, "file_name": f"{i}.png", "image": _png(i), "width": 120, "height": 90} for i in range(4)]
    rows[1]["image"] = b"garbage"
    batch = decode_batch(schema.image_table(rows))
    # Row 3 carries pixels that do not match its size: the stage raises on it (a real failure).
    pixels = batch["pixels"].to_pylist()
    pixels[3] = pixels[3][:-7]
    batch = batch.set_column(batch.column_names.index("pixels"), "pixels", pa.array(pixels, pa.large_binary()))

    writes = DetectSpec(name="detect", type="detect").output_columns()
    actor = StageActor(stage_name="detect", stage_cls=DetectStage, stage_kwargs=FAST_DETECT, output_columns=writes,
                       drop_columns=("pixels",))
    out = actor(batch)
    assert sorted(out["image_id"].to_pylist()) == [0, 1, 2, 3]
    assert "pixels" not in out.column_names
    assert out.schema.field("boxes").type == schema.BOXES_TYPE
    by_id = {r["image_id"]: r for r in out.to_pylist()}
    assert by_id[1]["error"].startswith("cannot decode image") and by_id[1]["boxes"] is None
    assert by_id[3]["error"].startswith("detect: ValueError") and by_id[3]["boxes"] is None
    for ok in (0, 2):
        assert by_id[ok]["error"] is None and isinstance(by_id[ok]["boxes"], list)
