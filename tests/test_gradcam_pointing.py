"""The pointing game's ceiling: the best map a network with n x n last maps can give, hand-computed."""
import numpy as np

from cnnbench.data.spec import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec
from cnnbench.gradcam.pointing import ideal_map_hit

SPEC = PreprocessSpec(resize=64, crop=64, mean=IMAGENET_MEAN, std=IMAGENET_STD)  # one crop = the whole image


def _mask(side: int, rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((side, side), bool)
    mask[rows, cols] = True
    return mask


def test_an_object_filling_one_cell_is_found():
    # The bottom-left cell of a 2x2 map: cells [[0, 0], [1, 0]]. Upsampled (half-pixel centres), the map is
    # 1 on the plateau x <= 15, y >= 48, whose first maximum in row-major order, (0, 48), is in the object.
    assert ideal_map_hit(_mask(64, slice(32, 64), slice(0, 32)), SPEC, 1, cells=2)


def test_an_object_between_the_cells_needs_finer_maps():
    mask = _mask(64, slice(20, 44), slice(20, 44))
    # 2x2: a quarter of the object in each cell, a flat map, whose first maximum is the corner (0, 0).
    assert not ideal_map_hit(mask, SPEC, 1, cells=2)
    # 4x4: the four middle cells hold it equally; their plateau starts at (24, 24), inside.
    assert ideal_map_hit(mask, SPEC, 1, cells=4)


def test_ten_crops_find_an_object_the_centre_crop_barely_sees():
    spec = PreprocessSpec(resize=96, crop=64, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    mask = _mask(96, slice(76, 96), slice(76, 96))
    # The centre crop (16..79) sees a 4x4 corner of it: its map peaks on the plateau from (64, 64), outside.
    assert not ideal_map_hit(mask, spec, 1, cells=2)
    # The bottom-right crops (32..95, plain and mirrored) alone cover x, y >= 80, where their cell holding
    # the object is clamped flat: the first maximum (80, 80) is inside.
    assert ideal_map_hit(mask, spec, 10, cells=2)
