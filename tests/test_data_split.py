"""Stratified seeded split: no leakage, per-class proportions, determinism, JSON round trip."""
import json
import os
from collections import Counter

import pytest

from cnnbench.data.folder import FolderIndex, Sample
from cnnbench.data.split import load_split, make_split, save_split, spread_evenly

CLASS_SIZES = {"001.a": 50, "002.b": 10, "003.c": 7, "004.d": 2, "005.e": 1}


@pytest.fixture
def data_index(tmp_path):
    root = str(tmp_path / "root")
    classes = list(CLASS_SIZES)
    samples = [Sample(os.path.join(root, name, f"{i:04d}.jpg"), label)
               for label, name in enumerate(classes) for i in range(CLASS_SIZES[name])]
    return FolderIndex(root, classes, samples, [])


def test_no_overlap_and_nothing_lost(data_index):
    split = make_split(data_index, 0.2, seed=0)
    train, test = {s.path for s in split.train}, {s.path for s in split.test}
    assert not train & test
    assert train | test == {s.path for s in data_index.samples}
    assert len(split.train) + len(split.test) == len(data_index.samples)


def test_every_class_is_stratified(data_index):
    split = make_split(data_index, 0.2, seed=3)
    test_counts = Counter(s.label for s in split.test)
    # round(n * 0.2), at least one test image when a class has two, never the whole class
    assert [test_counts[label] for label in range(5)] == [10, 2, 1, 1, 0]
    train_counts = Counter(s.label for s in split.train)
    assert [train_counts[label] for label in range(5)] == [40, 8, 6, 1, 1]


def test_seed_determines_the_split(data_index):
    first = make_split(data_index, 0.2, seed=7)
    again = make_split(data_index, 0.2, seed=7)
    other = make_split(data_index, 0.2, seed=8)
    assert first.test == again.test and first.train == again.train
    assert {s.path for s in first.test} != {s.path for s in other.test}


def test_a_class_split_does_not_depend_on_the_other_classes(data_index):
    full = make_split(data_index, 0.2, seed=1)
    fewer = FolderIndex(data_index.root, data_index.classes,
                        [s for s in data_index.samples if s.label != 1], [])
    reduced = make_split(fewer, 0.2, seed=1)
    assert [s for s in full.test if s.label == 0] == [s for s in reduced.test if s.label == 0]


def test_round_trip_uses_relative_paths(data_index, tmp_path):
    split = make_split(data_index, 0.25, seed=5)
    path = tmp_path / "run" / "split.json"
    save_split(split, path)
    raw = json.loads(path.read_text())
    assert raw["root"] == data_index.root and raw["classes"] == data_index.classes
    assert raw["seed"] == 5 and raw["test_fraction"] == 0.25
    assert all(not os.path.isabs(rel) and "/" in rel for rel, _ in raw["train"] + raw["test"])
    assert not [p for p in os.listdir(path.parent) if p != "split.json"]  # no temp file left behind

    loaded = load_split(path)
    assert loaded == split

    moved = load_split(path, root=tmp_path / "elsewhere")
    assert moved.test[0].path == os.path.join(str(tmp_path / "elsewhere"), *raw["test"][0][0].split("/"))
    assert [s.label for s in moved.test] == [s.label for s in split.test]


def test_bad_fraction_and_bad_files(data_index, tmp_path):
    for fraction in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="test_fraction"):
            make_split(data_index, fraction)
    with pytest.raises(FileNotFoundError, match="split file not found"):
        load_split(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid JSON"):
        load_split(bad)
    save_split(make_split(data_index), bad)
    raw = json.loads(bad.read_text())
    del raw["classes"]
    bad.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="missing key.*classes"):
        load_split(bad)
    save_split(make_split(data_index), bad)
    raw = json.loads(bad.read_text())
    raw["test"][0][1] = 99
    bad.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="label 99"):
        load_split(bad)


def test_spread_evenly_keeps_every_class_of_a_sorted_list():
    items = [(label, i) for label in range(8) for i in range(10)]   # sorted by class, as a split is
    picked = spread_evenly(items, 16)
    assert len(picked) == 16 and picked[0] == items[0] and picked[-1] == items[-1]
    assert sorted(Counter(label for label, _ in picked).values()) == [2] * 8
    assert spread_evenly(items, None) == items and spread_evenly(items, 500) == items
    with pytest.raises(ValueError, match="at least 1"):
        spread_evenly(items, 0)
