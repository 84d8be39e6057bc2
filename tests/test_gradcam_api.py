"""gradcam_images and errors_gallery on a checkpoint; panels; peak mapping and the pointing game."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cnnbench.data.folder import scan_folder
from cnnbench.data.images import load_rgb
from cnnbench.data.spec import spec_for_crop
from cnnbench.data.synth import mask_path
from cnnbench.data.transforms import resize_uint8
from cnnbench.gradcam import errors_gallery, gradcam_images
from cnnbench.gradcam.panels import MapView, save_panel
from cnnbench.gradcam.pointing import load_mask, peak_in_mask, peak_location, pointing_summary, to_original
from cnnbench.gradcam.tencrop import image_cam, peak
from cnnbench.models.checkpoint import load_checkpoint
from cnnbench.runtime import evaluate
from gradcam_testlib import tiny_cam_run

SPEC = spec_for_crop(64)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gradcam-api")
    made = tiny_cam_run(tmp, per_class=10, spec=SPEC)
    root, split, checkpoint = made["root"], made["split"], made["checkpoint"]
    # A finished run (common.runs): the commands given no model pick runs whose train.json is written.
    (checkpoint.parent / "train.json").write_text(json.dumps({"arch": "resnet18", "data": str(root),
                                                              "classes": split.classes, "spec": SPEC.to_dict()}))
    return {"tmp": tmp, "root": root, "split": split, "checkpoint": str(checkpoint)}


def test_to_original_and_peak_location_by_hand():
    # Resized 10 px -> original 100 x 50: pixel x=3 has centre 3.5 -> 35; y=9 -> 9.5 * 5 = 47.5 -> 47.
    assert to_original(3, 9, 10, 100, 50) == (35, 47)
    assert to_original(9, 9, 10, 10, 10) == (9, 9)
    assert peak_location(3, 9, 10, 100, 50) == {"x": 35, "y": 47, "x_frac": 0.35, "y_frac": 0.95}


def test_peak_in_mask_maps_to_the_mask_resolution():
    mask = np.zeros((20, 40), dtype=bool)
    mask[10:20, 0:10] = True  # bottom-left quarter of the left half
    assert peak_in_mask(0, 9, 10, mask)  # resized (0, 9) -> mask column 2, row 19
    assert not peak_in_mask(9, 9, 10, mask)  # -> column 38
    assert not peak_in_mask(0, 0, 10, mask)  # -> row 1
    assert pointing_summary([True, False, True, True]) == {"images": 4, "hits": 3, "share": 0.75}
    assert pointing_summary([])["share"] is None


def test_pointing_game_on_the_synthetic_masks(run):
    """A map equal to the resized object mask always points inside it; its complement never does."""
    hits, misses = [], []
    for sample in run["split"].test:
        mask = load_mask(sample.path)
        resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((SPEC.resize, SPEC.resize), Image.BILINEAR)
        on_object = torch.from_numpy(np.array(resized, dtype=np.float32))
        for cam, record in ((on_object, hits), (255 - on_object, misses)):
            x, y = peak(cam[None])[0]
            record.append(peak_in_mask(x, y, SPEC.resize, mask))
    assert pointing_summary(hits)["share"] == 1.0 and pointing_summary(misses)["share"] == 0.0


def test_save_panel_writes_a_png_and_no_temporary_files(tmp_path):
    image = torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8)
    path = save_panel(tmp_path / "p.png", image, [MapView("a", torch.rand(20, 20)), MapView("zero", torch.zeros(20, 20))])
    with Image.open(path) as png:
        assert png.format == "PNG" and png.width > 100
    assert os.listdir(tmp_path) == ["p.png"]


def test_gradcam_images_on_a_checkpoint(run, tmp_path):
    samples = run["split"].test[:3]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    paths = [s.path for s in samples] + [str(bad), str(tmp_path / "missing.jpg")]
    classes = run["split"].classes
    result = gradcam_images(paths, model=run["checkpoint"], class_name=classes[2], out=tmp_path / "out",
                            progress=False)
    json.dumps(result)
    assert not result["ok"]  # two inputs failed...
    assert result["succeeded"] == 3 and result["failed"] == 2  # ...and the others went on
    errors = {f["path"]: f["error"] for f in result["failures"]}
    assert set(errors) == {str(bad), str(tmp_path / "missing.jpg")} and all(errors.values())

    model, _ = load_checkpoint(run["checkpoint"])
    for sample, item in zip(samples, result["results"]):
        img = load_rgb(sample.path)
        expected = image_cam(model, resize_uint8(img, SPEC)[None], SPEC, crops=10)
        assert item["predicted"] == classes[int(expected.targets[0])]
        assert item["top"][0]["class"] == item["predicted"] and len(item["top"]) == 3
        assert sum(t["prob"] for t in item["top"]) == pytest.approx(1.0)
        x, y = peak(expected.maps)[0]
        assert (item["peak"]["x"], item["peak"]["y"]) == to_original(x, y, SPEC.resize, img.width, img.height)
        assert item["class"]["class"] == classes[2]
        with Image.open(item["panel"]) as png:
            assert png.format == "PNG"


def test_gradcam_images_with_another_method_and_layer(run, tmp_path):
    path = run["split"].test[0].path
    result = gradcam_images([path], model=run["checkpoint"], out=tmp_path / "out", progress=False,
                            method="hirescam", layer="last-1")
    assert result["ok"], result
    assert result["method"] == "HiResCAM at last-1 (layer3)"
    model, _ = load_checkpoint(run["checkpoint"])
    expected = image_cam(model, resize_uint8(load_rgb(path), SPEC)[None], SPEC, crops=10, method="hirescam",
                         layer="layer3")
    x, y = peak(expected.maps)[0]
    img = load_rgb(path)
    assert (result["results"][0]["peak"]["x"], result["results"][0]["peak"]["y"]) == to_original(
        x, y, SPEC.resize, img.width, img.height)
    dense = gradcam_images([path], model=run["checkpoint"], crops="dense", layer="last-1", progress=False,
                           out=tmp_path / "d")
    assert not dense["ok"] and "dense maps exist at layer 'last' only" in dense["error"]


def test_gradcam_images_input_errors_and_default_model(run, tmp_path, monkeypatch):
    path = run["split"].test[0].path
    unknown = gradcam_images([path], model=run["checkpoint"], class_name="no-such-class", progress=False)
    assert not unknown["ok"] and "no-such-class" in unknown["error"]
    assert not gradcam_images([path], model=run["checkpoint"], crops=5, progress=False)["ok"]
    missing = gradcam_images([path], model=tmp_path / "none.pt", progress=False)
    assert not missing["ok"] and "none.pt" in missing["error"]

    monkeypatch.chdir(run["tmp"])  # holds runs/train/tiny/best.pt
    result = gradcam_images([path], crops=1, out=tmp_path / "one", progress=False)
    assert result["ok"] and result["crops"] == 1
    assert os.path.samefile(result["model"], run["checkpoint"])


def test_errors_gallery_with_pointing_game(run, tmp_path):
    result = errors_gallery(run["checkpoint"], limit=4, out=tmp_path / "errors", progress=False)
    json.dumps(result)
    assert result["ok"], result
    n = len(run["split"].test)
    assert result["images"]["n_images"] == n
    # Ten-crop accuracy agrees with the runtime's own evaluation of the same checkpoint.
    reference = evaluate(run["checkpoint"], backend="torch", device="cpu", crops=10, workers=0, progress=False)
    assert result["top1"] == pytest.approx(reference["top1"])
    assert result["misclassified"] == round(n * (100 - reference["top1"]) / 100)
    for name in ("errors", "correct"):
        if result["galleries"][name] is not None:
            with Image.open(result["galleries"][name]) as png:
                assert png.format == "PNG"
    game = result["pointing_game"]
    for key in ("1_crop", "10_crops"):
        assert game[key]["images"] == n and 0 <= game[key]["hits"] <= n
    # The ten-crop game split by the ten-crop prediction: the two parts add up to the whole.
    right, wrong = game["by_prediction"]["correct"], game["by_prediction"]["misclassified"]
    assert (right["images"], wrong["images"]) == (n - result["misclassified"], result["misclassified"])
    assert right["hits"] + wrong["hits"] == game["10_crops"]["hits"]
    assert game["ideal_map"]["cells"] >= 1 and game["ideal_map"]["10_crops"]["images"] == n  # the ceiling
    # The default method and layer, and its panels beside Grad-CAM at last's.
    assert (result["method"], result["layer"]) == ("xgradcam", "last-2 (layer2)")  # a ResNet's default
    with Image.open(result["galleries"]["side_by_side"]) as png:
        assert png.format == "PNG"


def test_errors_gallery_without_masks(run, tmp_path):
    data = tmp_path / "nomasks"
    for sample in scan_folder(run["root"]).samples:
        target = data / os.path.basename(os.path.dirname(sample.path)) / os.path.basename(sample.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample.path, target)
        assert os.path.isfile(mask_path(sample.path)) and not os.path.exists(mask_path(target))
    result = errors_gallery(run["checkpoint"], data=data, limit=2, crops=1, out=tmp_path / "e", progress=False)
    assert result["ok"] and result["pointing_game"] is None and result["pointing_game_note"]
    assert result["images"]["source"].startswith("seed-0 split")


def test_errors_gallery_scans_at_most_the_images_asked_for(run, tmp_path):
    result = errors_gallery(run["checkpoint"], limit=2, crops=1, images=3, out=tmp_path / "few", progress=False)
    assert result["ok"], result
    assert result["images"]["n_images"] == 3 < len(run["split"].test)
    assert result["pointing_game"]["1_crop"]["images"] == 3
