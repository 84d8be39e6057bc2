"""The embedded synthetic set: layout, masks, determinism, and classes told apart only by shape/texture."""
import hashlib
import os
import time

import numpy as np
import pytest
from PIL import Image

import cnnbench.data.synth as synth
from cnnbench.data.folder import scan_folder
from cnnbench.data.spec import spec_for_crop
from cnnbench.data.synth import (MAX_CLASSES, class_folder_names, default_data_root, embedded_crop, mask_path,
                        synthesize)

SIZE = 48


@pytest.fixture(scope="module")
def data_synth_small(tmp_path_factory):
    """4 classes (circle and square, each solid and striped) x 30 images at 48 px."""
    return synthesize(tmp_path_factory.mktemp("synth") / "set", classes=4, per_class=30, size=SIZE, progress=False)


def _hashes(root):
    result = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                result[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return result


def _erode(mask, steps):
    for _ in range(steps):
        padded = np.pad(mask, 1, constant_values=False)
        mask = mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask


def _load(sample):
    image = np.asarray(Image.open(sample.path), dtype=np.float64)
    mask = Image.open(mask_path(sample.path))
    assert mask.mode == "L" and mask.size == (SIZE, SIZE)
    mask = np.asarray(mask)
    assert set(np.unique(mask)) <= {0, 255}
    return image, mask == 255


def test_layout_is_read_by_scan_folder(data_synth_small):
    index = scan_folder(data_synth_small)
    assert index.layout == "caltech256"
    assert index.classes == ["001.circle-solid", "002.circle-striped", "003.square-solid", "004.square-striped"]
    assert index.counts() == dict.fromkeys(index.classes, 30)
    assert index.skipped == []  # masks are neither samples nor strays
    first = index.samples[0].path
    assert first.endswith(os.path.join("001.circle-solid", "001_0001.jpg"))
    assert mask_path(first).endswith("001_0001.mask.png") and os.path.isfile(mask_path(first))
    assert Image.open(first).size == (SIZE, SIZE)
    assert not [n for n in os.listdir(os.path.dirname(data_synth_small)) if n.endswith(".partial")]


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    first = synthesize(tmp_path / "a", classes=3, per_class=3, size=SIZE, seed=11, progress=False)
    second = synthesize(tmp_path / "b", classes=3, per_class=3, size=SIZE, seed=11, progress=False)
    other = synthesize(tmp_path / "c", classes=3, per_class=3, size=SIZE, seed=12, progress=False)
    assert len(_hashes(first)) == 18
    assert _hashes(first) == _hashes(second)
    assert not set(_hashes(first).values()) & set(_hashes(other).values())


def test_masks_are_aligned_with_the_object(data_synth_small):
    """On solid objects, the pixels of the object's colour coincide with the mask, and not with a shifted mask."""
    index = scan_folder(data_synth_small)
    ious, shifted_ious = [], []
    for sample in index.samples:
        if "solid" not in index.classes[sample.label]:
            continue
        image, mask = _load(sample)
        assert 0.02 < mask.mean() < 0.6
        colour = np.median(image[_erode(mask, 2)], axis=0)
        object_coloured = np.linalg.norm(image - colour, axis=2) < 45
        shifted = np.roll(mask, (4, 4), axis=(0, 1))
        ious.append((object_coloured & mask).sum() / (object_coloured | mask).sum())
        shifted_ious.append((object_coloured & shifted).sum() / (object_coloured | shifted).sum())
    assert min(ious) > 0.6 and np.mean(ious) > 0.8
    assert np.mean(ious) > np.mean(shifted_ious) + 0.25


def _leave_one_out_nearest_centroid(features, labels):
    features, labels = np.asarray(features, dtype=np.float64), np.asarray(labels)
    correct = 0
    for i in range(len(features)):
        others = np.arange(len(features)) != i
        centroids = np.array([features[others & (labels == c)].mean(axis=0) for c in np.unique(labels)])
        correct += np.argmin(((centroids - features[i]) ** 2).sum(axis=1)) == labels[i]
    return correct / len(features)


def test_only_shape_and_texture_identify_the_class(data_synth_small):
    index = scan_folder(data_synth_small)
    nuisances = {"object colour": [], "image colour": [], "object area": [], "object position": []}
    shape_texture, labels = [], []
    for sample in index.samples:
        image, mask = _load(sample)
        ys, xs = np.nonzero(mask)
        nuisances["object colour"].append(image[mask].mean(axis=0))
        nuisances["image colour"].append(image.reshape(-1, 3).mean(axis=0))
        nuisances["object area"].append([mask.mean()])
        nuisances["object position"].append([ys.mean(), xs.mean()])
        boundary = mask & ~_erode(mask, 1)
        compactness = 4 * np.pi * mask.sum() / boundary.sum() ** 2
        gy, gx = np.gradient(image.mean(axis=2))
        interior_edges = np.hypot(gy, gx)[_erode(mask, 2)].mean() / 50
        shape_texture.append([compactness, interior_edges])
        labels.append(sample.label)
    chance = 1 / len(index.classes)
    for name, features in nuisances.items():
        accuracy = _leave_one_out_nearest_centroid(features, labels)
        assert accuracy < chance + 0.2, f"{name} predicts the class ({accuracy:.2f}, chance {chance:.2f})"
    # the same classifier does find the class in crude shape and texture features
    assert _leave_one_out_nearest_centroid(shape_texture, labels) > 0.6


def test_class_catalogue_and_parameter_checks(tmp_path):
    names = class_folder_names(MAX_CLASSES)
    assert MAX_CLASSES >= 24 and len(set(names)) == MAX_CLASSES
    assert all(name[:4] == f"{i + 1:03d}." for i, name in enumerate(names))
    assert len({name.split(".", 1)[1].split("-")[0] for name in class_folder_names(16)}) == 8
    for bad in ({"classes": MAX_CLASSES + 1}, {"classes": 0}, {"size": 16}, {"per_class": 0}):
        with pytest.raises(ValueError):
            synthesize(tmp_path / "x", **{"classes": 2, "per_class": 1, "size": 32, **bad})
    assert not (tmp_path / "x").exists()


def test_many_classes_render(tmp_path):
    root = synthesize(tmp_path / "all", classes=MAX_CLASSES, per_class=1, size=40, progress=False)
    assert len(scan_folder(root).classes) == MAX_CLASSES


def test_existing_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    assert synthesize(tmp_path / "empty", classes=1, per_class=1, size=32, progress=False) == str(tmp_path / "empty")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        synthesize(tmp_path / "empty", classes=1, per_class=1, size=32, progress=False)


def test_generation_is_fast(tmp_path):
    started = time.perf_counter()
    synthesize(tmp_path / "speed", classes=8, per_class=5, size=160, progress=False)
    # budget: 1,600 images in 30 s is 0.75 s per 40 images; allow 8x for a loaded machine
    assert time.perf_counter() - started < 6.0


def test_default_root_is_generated_once_and_never_half(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(synth, "QUICK_SET", {"classes": 2, "per_class": 3, "size": 32, "seed": 0})
    calls = []
    render = synth.render_image

    def failing_render(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # an interrupted generation
        return render(*args)

    monkeypatch.setattr(synth, "render_image", failing_render)
    with pytest.raises(KeyboardInterrupt):
        default_data_root(quick=True, progress=False)
    assert os.listdir(tmp_path / "cache") == []  # neither the set nor its staging folder remain

    root = default_data_root(quick=True, progress=False)
    assert root.startswith(str(tmp_path / "cache")) and "2c-3n-32px-seed0" in root
    assert len(scan_folder(root).samples) == 6
    generated = len(calls)
    assert default_data_root(quick=True, progress=False) == root
    assert len(calls) == generated  # the cached set is reused, not regenerated


def test_default_quick_set_and_specs():
    index = scan_folder(default_data_root(quick=True, progress=False))
    assert len(index.classes) == synth.QUICK_SET["classes"]
    assert index.counts() == dict.fromkeys(index.classes, synth.QUICK_SET["per_class"])
    assert Image.open(index.samples[0].path).size == (synth.QUICK_SET["size"],) * 2
    for quick, size in ((False, synth.FULL_SET["size"]), (True, synth.QUICK_SET["size"])):
        spec = spec_for_crop(embedded_crop(quick))
        assert spec.crop < 224 and spec.resize <= size
