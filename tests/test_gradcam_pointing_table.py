"""The pointing table per method and layer: numbers from hand-made maps and masks, its text, chart and
JSON, and errors_gallery's table on a tiny checkpoint."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from cnnbench.data.spec import spec_for_crop
from cnnbench.gradcam import errors_gallery
from cnnbench.gradcam.core import METHODS, method_name
from cnnbench.gradcam.pointing import peak_in_mask
from cnnbench.gradcam.pointing_table import (PointingTally, pointing_table_block, render_pointing_table,
                                             save_pointing_plot)
from cnnbench.gradcam.tencrop import peak
from gradcam_testlib import tiny_cam_run


def _map_peaking_at(x: int, y: int, side: int = 8) -> torch.Tensor:
    cam = torch.zeros(1, side, side)
    cam[0, y, x] = 1.0
    return cam


def test_table_numbers_from_hand_made_maps_and_masks(tmp_path):
    mask = np.zeros((8, 8), bool)
    mask[:4, :4] = True  # the object: the top-left quarter
    inside, outside = _map_peaking_at(1, 1), _map_peaking_at(6, 6)
    # Three images; the 10-crop model classifies images 0 and 1 correctly, image 2 not.
    maps = {  # (layer, method, crops) -> the three images' maps
        ("last", "gradcam", "1"): [inside, outside, outside],
        ("last", "gradcam", "10"): [inside, inside, outside],
        ("last", "layercam", "1"): [inside, inside, inside],
        ("last", "layercam", "10"): [inside, inside, inside],
        ("last-1", "gradcam", "1"): [outside, outside, inside],
        ("last-1", "gradcam", "10"): [outside, inside, inside],
        ("last-1", "layercam", "1"): [inside, outside, outside],
        ("last-1", "layercam", "10"): [inside, outside, inside],
    }
    tally = PointingTally("10", {"last": {"module": "last", "cells": 3}, "last-1": {"module": "last-1 (layer3)",
                                                                                  "cells": 6}},
                          ["gradcam", "layercam"])
    for image in range(3):
        for (layer, method, crops), images in maps.items():
            x, y = peak(images[image])[0]
            tally.add(layer, method, crops, peak_in_mask(x, y, 8, mask))
        tally.correct.append(image < 2)
        for layer, ideal in (("last", [True, False, True]), ("last-1", [True, True, True])):
            for crops in ("1", "10"):
                tally.add_ideal(layer, crops, ideal[image] if crops == "10" else False)
    table = tally.table()
    json.dumps(table)
    assert [(r["layer"], r["method"]) for r in table["rows"]] == [
        ("last", "gradcam"), ("last", "layercam"), ("last-1", "gradcam"), ("last-1", "layercam")]
    row = table["rows"][0]
    assert row["label"] == "Grad-CAM"
    assert (row["1_crop"]["hits"], row["10_crops"]["hits"]) == (1, 2)
    assert row["by_prediction"] == {"crops": "10", "correct": {"images": 2, "hits": 2, "share": 1.0},
                                    "misclassified": {"images": 1, "hits": 0, "share": 0.0}}
    assert table["rows"][3]["by_prediction"]["correct"]["hits"] == 1  # image 0 in, image 1 out
    assert table["layers"]["last"]["ideal_map"]["10_crops"]["share"] == pytest.approx(2 / 3)
    assert table["layers"]["last-1"]["ideal_map"]["1_crop"]["hits"] == 0
    # LayerCAM at last hits all three with ten crops; the tie-free best row.
    assert table["best"]["method"] == "layercam" and table["best"]["layer"] == "last"
    headers, lines = pointing_table_block(table)
    assert len(headers) == 6 and len(lines) == 4 + 2  # a line per row, then each layer's ceiling
    assert lines[0] == ["last 3x3", "Grad-CAM", "33.3% of 3", "66.7% of 3", "100.0% of 2", "0.0% of 1"]
    assert lines[-1][:4] == ["last-1 (layer3) 6x6", "ideal map (ceiling)", "0.0% of 3", "100.0% of 3"]
    text = "\n".join(render_pointing_table(table))
    assert "points best with 10 crops: LayerCAM at last (100.0% of 3)" in text
    png = save_pointing_plot(table, tmp_path / "pointing.png")
    with Image.open(png) as image:
        assert image.format == "PNG"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    made = tiny_cam_run(tmp_path_factory.mktemp("pointing-table"), per_class=6, spec=spec_for_crop(64))
    return {"checkpoint": str(made["checkpoint"]), "split": made["split"]}


def test_errors_gallery_tables_every_method_at_two_layers(run, tmp_path):
    result = errors_gallery(run["checkpoint"], limit=2, out=tmp_path / "e", progress=False, methods="all",
                            layers="last,last-1", method="gradcam", layer="last")
    json.dumps(result)
    assert result["ok"], result
    table, n = result["pointing_table"], len(run["split"].test)
    assert [(r["layer"], r["method"]) for r in table["rows"]] == [(layer, m) for layer in ("last", "last-1")
                                                                  for m in METHODS]
    assert table["layers"]["last"]["cells"] == 2 and table["layers"]["last-1"]["cells"] == 4  # 64 px crops
    assert table["layers"]["last-1"]["module"] == "last-1 (layer3)"
    for row in table["rows"]:
        assert row["1_crop"]["images"] == row["10_crops"]["images"] == n
        split = row["by_prediction"]
        assert split["correct"]["hits"] + split["misclassified"]["hits"] == row["10_crops"]["hits"]
    # The galleries' own method and layer is the table's first row, and the classic pointing game.
    game, first = result["pointing_game"], table["rows"][0]
    assert (first["method"], first["layer"]) == ("gradcam", "last")
    assert game["10_crops"] == first["10_crops"] and game["ideal_map"]["cells"] == 2
    assert os.path.isfile(table["png"])
    assert "side_by_side" not in result["galleries"]  # Grad-CAM at last is what it would be shown beside


def test_errors_gallery_with_another_method_and_layer(run, tmp_path):
    result = errors_gallery(run["checkpoint"], limit=2, crops=1, out=tmp_path / "e", progress=False,
                            method="gradcam++", layer="last-1")
    assert result["ok"], result
    assert (result["method"], result["layer"], result["pointing_table"]) == ("gradcam++", "last-1 (layer3)", None)
    assert result["pointing_game"]["ideal_map"]["cells"] == 4


@pytest.mark.parametrize("kwargs, message", [({"layers": "last,layer9"}, "unknown layer 'layer9' for ResNet"),
                                             ({"methods": "gradcam,scorecam"}, "unknown CAM method 'scorecam'"),
                                             ({"crops": "dense", "layer": "last-1"}, "dense maps exist at layer 'last'")])
def test_errors_gallery_bad_names_say_what_is_valid(run, tmp_path, kwargs, message):
    result = errors_gallery(run["checkpoint"], out=tmp_path / "e", progress=False, **kwargs)
    assert not result["ok"] and message in result["error"]


def test_cli_prints_the_table_and_refuses_a_bad_layer(run, tmp_path):
    from click.testing import CliRunner

    from cli import cli

    runner = CliRunner()
    done = runner.invoke(cli, ["gradcam", "--errors", run["checkpoint"], "--limit", "1", "--crops", "1",
                               "--methods", "gradcam,layercam", "--layers", "last-1", "--out", str(tmp_path / "t")])
    assert done.exit_code == 0, done.output
    assert f"maps: {method_name('xgradcam')} at last-2 (layer2)" in done.output  # none named: a ResNet's default
    assert "last-1 (layer3) 4x4  LayerCAM" in done.output and "last-2 (layer2) 8x8  XGrad-CAM" in done.output
    assert "ideal map (ceiling)" in done.output
    assert "points best with 10 crops:" in done.output
    bad = runner.invoke(cli, ["gradcam", "--errors", run["checkpoint"], "--layer", "layer9", "--json",
                              "--out", str(tmp_path / "b")])
    assert bad.exit_code == 1 and "Valid layers: last, last-1 (layer3)" in json.loads(bad.output)["error"]
