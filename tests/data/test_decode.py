import numpy as np
import pyarrow as pa
import pytest

from pipeline import schema
from pipeline.data.decode import DecodeError, decode_batch, decode_image, pixels_to_array
from tests.badimages import HUGE_LIMIT, bad_images

CASES = bad_images()


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_awkward_image_decodes_or_says_why(name):
    data, expectation = CASES[name]
    if expectation == "ok":
        rgb = decode_image(data, max_pixels=HUGE_LIMIT)
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    else:
        with pytest.raises(DecodeError) as info:
            decode_image(data, max_pixels=HUGE_LIMIT)
        assert str(info.value)  # a reason, not an empty message


def test_exif_orientation_is_applied():
    rgb = decode_image(CASES["rotated.jpg"][0])
    assert rgb.shape == (80, 60, 3)  # stored 80x60 (WxH), displayed rotated
    assert decode_image(CASES["rotated.jpg"][0], exif_transpose=False).shape == (60, 80, 3)


def test_16bit_png_is_scaled_not_clipped():
    rgb = decode_image(CASES["grey16.png"][0])
    assert rgb.max() > 200 and len(np.unique(rgb)) > 100  # clipping would saturate almost everything


def test_pixel_limit_message_names_the_setting():
    with pytest.raises(DecodeError, match="decode.max_pixels=1000000"):
        decode_image(CASES["huge.png"][0], max_pixels=HUGE_LIMIT)


def test_decode_batch_keeps_every_row():
    names = sorted(CASES)
    table = schema.image_table(
        [{"image_id": i, "file_name": n, "image": CASES[n][0], "width": 1, "height": 1} for i, n in enumerate(names)]
    )
    table = table.set_column(table.column_names.index("error"), "error", pa.array(["pre-existing" if n == "ok.png" else None for n in names]))
    out = decode_batch(table, max_pixels=HUGE_LIMIT)
    assert out["image_id"].to_pylist() == list(range(len(names)))
    assert "image" not in out.column_names and "annotations" not in out.column_names
    for row in out.to_pylist():
        name = names[row["image_id"]]
        if name == "ok.png":
            assert row["error"] == "pre-existing" and row["pixels"] is None
        elif CASES[name][1] == "ok":
            assert row["error"] is None
            assert pixels_to_array(row["pixels"], row["height"], row["width"]).shape == (row["height"], row["width"], 3)
        else:
            assert row["error"] and row["pixels"] is None
