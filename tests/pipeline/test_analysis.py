"""pipeline/analysis.py helpers that need no run (no Ray, no training)."""

import numpy as np
from PIL import Image

from pipeline.analysis import THUMBNAIL_HEIGHT, _thumbnail


def test_thumbnail_of_a_sixteen_bit_image_is_scaled_not_clipped(tmp_path):
    Image.fromarray(np.full((THUMBNAIL_HEIGHT, 8), 32896, np.uint16)).save(tmp_path / "grey16.png")  # 128 * 257
    assert np.unique(np.asarray(_thumbnail(tmp_path / "grey16.png"))).tolist() == [128]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    assert _thumbnail(tmp_path / "broken.png").size == (THUMBNAIL_HEIGHT, THUMBNAIL_HEIGHT)  # a grey tile
