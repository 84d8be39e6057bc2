"""scan_folder on a Caltech-256-shaped tree with every kind of stray, and on ImageFolder roots."""
import os

import pytest
from PIL import Image

from cnnbench.data.folder import scan_folder
from cnnbench.data.images import ImageError, load_rgb


def _jpeg(path, mode="RGB", colour=(120, 60, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (8, 8), colour).save(path, "JPEG")


@pytest.fixture
def caltech_root(tmp_path):
    """256_ObjectCategories with 4 real classes (one empty), clutter and the real set's strays."""
    cats = tmp_path / "256_ObjectCategories"
    for i in range(1, 4):
        _jpeg(cats / "001.ak47" / f"001_{i:04d}.jpg")
    _jpeg(cats / "056.dog" / "056_0001.jpg")
    _jpeg(cats / "056.dog" / "056_0002.JPG")  # upper-case extension still an image
    _jpeg(cats / "056.dog" / "greg" / "vision309.jpg")  # the nested folder of the real archive
    _jpeg(cats / "056.dog" / "greg" / "vision310.jpg")
    _jpeg(cats / "198.spider" / "198_0001.jpg", mode="L", colour=70)  # grayscale JPEG
    _jpeg(cats / "198.spider" / "198_0002.jpg", mode="CMYK", colour=(0, 255, 255, 0))
    (cats / "198.spider" / "198_0003.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")  # unreadable
    (cats / "198.spider" / "RENAME2").write_text("stray\n")
    Image.new("L", (8, 8)).save(cats / "198.spider" / "198_0001.mask.png")  # masks are not samples
    Image.new("RGB", (8, 8)).save(cats / "200.stained-glass.png")  # stray file at top level
    _jpeg(cats / "257.clutter" / "257_0001.jpg")
    (cats / "README-notes").mkdir()  # not NNN.name
    (cats / "010.beer-mug").mkdir()  # a class folder without images
    (cats / "010.beer-mug" / "Thumbs.db").write_bytes(b"\0")
    return tmp_path


def test_caltech_layout_counts_and_every_skipped_item_is_named(caltech_root):
    index = scan_folder(caltech_root)
    cats = caltech_root / "256_ObjectCategories"
    assert index.root == str(cats) and index.layout == "caltech256"
    assert index.classes == ["001.ak47", "056.dog", "198.spider"]
    assert index.counts() == {"001.ak47": 3, "056.dog": 2, "198.spider": 3}
    assert len(index.samples) == 8
    assert all(os.path.isabs(s.path) for s in index.samples)
    assert {os.path.basename(s.path) for s in index.samples if s.label == 2} == {
        "198_0001.jpg", "198_0002.jpg", "198_0003.jpg"}

    skipped = {os.path.relpath(path, cats): reason for path, reason in index.skipped}
    assert set(skipped) == {
        "257.clutter", "README-notes", "200.stained-glass.png", "056.dog/greg",
        "198.spider/RENAME2", "010.beer-mug/Thumbs.db", "010.beer-mug",
    }
    assert skipped["257.clutter"] == "clutter class dropped"
    assert "not a class folder" in skipped["README-notes"]
    assert "stray file at the top level" in skipped["200.stained-glass.png"]
    assert "nested folder" in skipped["056.dog/greg"] and "2 files" in skipped["056.dog/greg"]
    assert "not an image file" in skipped["198.spider/RENAME2"]
    assert "no images" in skipped["010.beer-mug"]


def test_grayscale_cmyk_and_broken_files_are_handled_at_load_time(caltech_root):
    index = scan_folder(caltech_root)
    spider = sorted(s.path for s in index.samples if s.label == 2)
    assert load_rgb(spider[0]).mode == "RGB"  # grayscale
    assert load_rgb(spider[1]).mode == "RGB"  # CMYK
    with pytest.raises(ImageError):
        load_rgb(spider[2])


def test_the_object_categories_folder_itself_can_be_given(caltech_root):
    direct = scan_folder(caltech_root / "256_ObjectCategories")
    assert direct.classes == scan_folder(caltech_root).classes and len(direct.samples) == 8


def test_labels_follow_sorted_folder_names(tmp_path):
    for name in ("003.c", "001.a", "002.b"):
        _jpeg(tmp_path / name / "x.jpg")
    index = scan_folder(tmp_path)
    assert index.classes == ["001.a", "002.b", "003.c"]
    assert [os.path.basename(os.path.dirname(s.path)) for s in index.samples] == index.classes
    assert [s.label for s in index.samples] == [0, 1, 2]


def test_imagefolder_root(tmp_path):
    for cls, count in (("cats", 2), ("dogs", 1)):
        for i in range(count):
            _jpeg(tmp_path / cls / f"{i}.png")
    (tmp_path / "dogs" / "clip.mp4").write_bytes(b"\0")
    (tmp_path / "labels.csv").write_text("x\n")
    for extension in ("bmp", "gif", "tif", "tiff", "webp", "jpeg"):
        Image.new("RGB", (4, 4)).save(tmp_path / "cats" / f"more.{extension}")
    index = scan_folder(tmp_path)
    assert index.layout == "imagefolder"
    assert index.classes == ["cats", "dogs"]
    assert index.counts() == {"cats": 8, "dogs": 1}
    reasons = {os.path.basename(p): r for p, r in index.skipped}
    assert set(reasons) == {"clip.mp4", "labels.csv"}


def test_empty_or_missing_roots_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no class folders"):
        scan_folder(tmp_path)
    (tmp_path / "only_text").mkdir()
    (tmp_path / "only_text" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="no class folders"):
        scan_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        scan_folder(tmp_path / "missing")
    with pytest.raises(NotADirectoryError):
        scan_folder(tmp_path / "only_text" / "a.txt")
