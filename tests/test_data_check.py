"""`data check` and `data synth` reports: JSON-serialisable, exact counts, every problem named."""
import json

from PIL import Image

from cnnbench.data.check import check_folder, render_check, synth_command


def _folder(tmp_path):
    cats = tmp_path / "256_ObjectCategories"
    for cls, count in (("001.ak47", 2), ("002.bat", 3)):
        (cats / cls).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(cats / cls / f"{cls[:3]}_{i + 1:04d}.jpg")
    Image.new("L", (8, 8), 40).save(cats / "002.bat" / "002_0009.jpg")  # grayscale
    (cats / "002.bat" / "002_0010.jpg").write_bytes(b"")  # broken
    (cats / "002.bat" / "RENAME2").write_text("?")
    (cats / "257.clutter").mkdir()
    Image.new("RGB", (8, 8)).save(cats / "257.clutter" / "257_0001.jpg")
    return tmp_path


def test_check_counts_and_skipped(tmp_path):
    report = check_folder(_folder(tmp_path))
    json.dumps(report)
    assert report["layout"] == "caltech256" and report["verified"] is False
    assert report["classes"] == ["001.ak47", "002.bat"] and report["num_classes"] == 2
    assert report["per_class"] == {"001.ak47": 2, "002.bat": 5} and report["total"] == 7
    assert {item["path"]: item["reason"] for item in report["skipped"]} == {
        "002.bat/RENAME2": "not an image file (extension: none)",
        "257.clutter": "clutter class dropped",
    }
    assert "unreadable" not in report


def test_check_verify_lists_unreadable_images(tmp_path):
    report = check_folder(_folder(tmp_path), verify=True)
    json.dumps(report)
    assert report["verified"] is True and report["readable"] == 6
    assert report["unreadable"] == [{"path": "002.bat/002_0010.jpg", "reason": "empty file (0 bytes)"}]
    assert report["source_modes"] == {"L": 1, "RGB": 5}


def test_render_check_names_everything(tmp_path):
    text = render_check(check_folder(_folder(tmp_path), verify=True))
    assert "2 classes, 7 images" in text and "caltech256" in text
    for expected in ("001.ak47", "002.bat", "257.clutter: clutter class dropped", "002.bat/RENAME2",
                     "002.bat/002_0010.jpg: empty file (0 bytes)", "6 readable (L 1, RGB 5), 1 unreadable"):
        assert expected in text


def test_synth_command_reports_what_it_wrote(tmp_path):
    report = synth_command(tmp_path / "out", classes=3, per_class=2, size=32, seed=4)
    json.dumps(report)
    assert report["root"] == str(tmp_path / "out")
    assert report["classes"] == 3 and len(report["class_names"]) == 3 and report["images"] == 6
    assert (report["per_class"], report["size"], report["seed"]) == (2, 32, 4)
    assert check_folder(report["root"], verify=True)["readable"] == 6
