"""core.boxes.read_box and core.atomic.write_json / json_safe (shared by the session's history and initial
masks, and by every report writer)."""
import json
import math

import numpy as np
import pytest

from SAM3DSegmentLib.core.atomic import json_safe, write_json, write_text
from SAM3DSegmentLib.core.boxes import read_box


def test_read_box_copies_the_overlap_and_zeroes_the_rest():
    stored = np.arange(1, 2 * 3 * 4 + 1, dtype=np.uint8).reshape(2, 3, 4)
    stored_box = (slice(10, 12), slice(5, 8), slice(0, 4))
    out = read_box(stored, stored_box, (slice(11, 13), slice(4, 6), slice(2, 6)))
    assert out.shape == (2, 2, 4) and out.dtype == np.uint8
    expected = np.zeros((2, 2, 4), np.uint8)
    expected[0, 1:2, 0:2] = stored[1, 0:1, 2:4]
    np.testing.assert_array_equal(out, expected)
    out[...] = 0  # a new array: the stored one is untouched
    assert stored.sum() == sum(range(1, 25))


def test_read_box_without_a_stored_mask_is_zero():
    out = read_box(None, None, (slice(0, 2), slice(0, 3), slice(0, 1)))
    assert out.shape == (2, 3, 1) and not out.any()


def test_json_safe_turns_nan_and_numpy_into_json():
    data = {1: np.float32(0.5), "nan": float("nan"), "inf": np.float64(math.inf), "n": np.int64(3),
            "b": np.bool_(True), "t": (1, np.int16(2))}
    assert json_safe(data) == {"1": 0.5, "nan": None, "inf": None, "n": 3, "b": True, "t": [1, 2]}


def test_write_json_writes_valid_json_for_nan(tmp_path):
    path = tmp_path / "summary.json"
    write_json(path, {"dice": float("nan"), "steps": [np.float64(0.25)]})
    text = path.read_text(encoding="utf-8")
    assert "NaN" not in text and text.endswith("\n")
    assert json.loads(text) == {"dice": None, "steps": [0.25]}


def test_write_text_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "a.csv"
    write_text(path, "old\n")

    with pytest.raises(TypeError):
        write_text(path, 42)  # not text: the temporary write fails, the target stays
    assert path.read_text(encoding="utf-8") == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["a.csv"]
