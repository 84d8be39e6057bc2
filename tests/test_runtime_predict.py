"""predict_files: a bad-input corpus mixed with good images, in one run; CSV; model discovery."""
import csv
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cnnbench import runtime
from cnnbench.data.images import MAX_PIXELS
from cnnbench.runtime.pipeline import run_files
from runtime_testlib import held_out_images, tiny_run, torchvision_ten_crop_logits


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.manual_seed(0)
    return tiny_run(tmp_path_factory.getbasetemp())


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height 1-bit pixels and holds no pixel data (a cheap 'bomb')."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    chunk = b"IHDR" + header
    end = b"IEND"
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))
            + struct.pack(">I", 0) + end + struct.pack(">I", zlib.crc32(end)))


def build_corpus(folder, sources: list[str]) -> tuple[dict, dict]:
    """({name: path} of usable images in awkward formats, {name: (path, expected reason)} of bad ones)."""
    os.makedirs(folder, exist_ok=True)
    a, b, c = (Image.open(p).convert("RGB") for p in sources[:3])
    good, bad = {}, {}

    def save(name, img, **kwargs):
        path = os.path.join(folder, name)
        img.save(path, **kwargs)
        good[name] = path

    def write(name, content: bytes, reason: str):
        path = os.path.join(folder, name)
        with open(path, "wb") as f:
            f.write(content)
        bad[name] = (path, reason)

    save("plain.jpg", a, quality=95)
    save("grayscale.jpg", b.convert("L"), quality=95)
    save("cmyk.jpg", c.convert("CMYK"), quality=95)
    save("palette.png", a.convert("P", palette=Image.ADAPTIVE, colors=64))
    rgba = b.copy()
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    save("rgba.png", rgba)
    sixteen = np.asarray(c.convert("L"), dtype=np.uint16) * 257
    save("sixteen_bit.png", Image.fromarray(sixteen))
    frames = [a, b.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    save("animated.gif", frames[0], save_all=True, append_images=frames[1:], duration=100, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    save("exif_rotated.jpg", b, quality=95, exif=exif.tobytes())
    save("tiny.png", c.resize((8, 8)))
    assert Image.open(good["sixteen_bit.png"]).mode.startswith("I")

    jpeg = open(good["plain.jpg"], "rb").read()
    png = open(good["palette.png"], "rb").read()
    broken_png = bytearray(png)
    broken_png[len(png) // 2] ^= 0xFF  # inside the IDAT chunk: its CRC no longer matches
    write("corrupt.png", bytes(broken_png), "")
    write("truncated.jpg", jpeg[: len(jpeg) // 2], "truncated")
    write("zero_bytes.jpg", b"", "empty file")
    write("not_an_image.jpg", b"this is a text file, not a JPEG\n" * 20, "not an image")
    side = int(MAX_PIXELS ** 0.5) + 1000
    write("enormous.png", png_header_claiming(side, side), "too large")
    return good, bad


def test_bad_input_corpus_in_one_run(run, tmp_path):
    paths, _ = held_out_images(run)
    good, bad = build_corpus(tmp_path / "corpus", paths)
    locked = tmp_path / "corpus" / "locked.jpg"
    shutil.copy(good["plain.jpg"], locked)
    os.chmod(locked, 0)
    missing = str(tmp_path / "missing.jpg")
    # Interleave good and bad files, so batches of 4 mix them (and some hold no usable image at all).
    order = [p for pair in zip(list(good.values()), [p for p, _ in bad.values()]) for p in pair]
    order += list(good.values())[len(bad):] + [str(locked), missing]

    streamed = []
    result = runtime.predict_files(run["checkpoint"], order, backend="torch", device="cpu", batch=4, topk=3,
                                   workers=2, csv=tmp_path / "out" / "predictions.csv", progress=False,
                                   on_result=streamed.append)
    assert "results" not in result  # they went to the file and the callback, not into memory
    by_path = {r["path"]: r for r in streamed}
    assert [r["path"] for r in streamed] == order

    reference = torchvision_ten_crop_logits(run["checkpoint"], list(good.values()))
    reference_probs = torch.softmax(reference.double(), dim=1)
    classes = runtime.load(run["checkpoint"], device="cpu").classes
    for i, (name, path) in enumerate(good.items()):
        top = by_path[path].get("top")
        assert top is not None, f"{name}: {by_path[path].get('error')}"
        assert top[0]["class"] == classes[int(reference[i].argmax())], name
        assert top[0]["prob"] == pytest.approx(float(reference_probs[i].max()), abs=1e-4), name
        assert len(top) == 3 and top[0]["prob"] >= top[1]["prob"] >= top[2]["prob"]

    for name, (path, reason) in bad.items():
        error = by_path[path].get("error")
        assert error is not None and "top" not in by_path[path], name
        assert reason in error, f"{name}: {error}"
    assert "not found" in by_path[missing]["error"]
    locked_readable = os.access(locked, os.R_OK)  # root reads a chmod-000 file
    assert ("top" in by_path[str(locked)]) == locked_readable
    if not locked_readable:
        assert "permission denied" in by_path[str(locked)]["error"]

    expected_failed = len(bad) + 1 + (0 if locked_readable else 1)
    assert result["failed"] == expected_failed
    assert result["succeeded"] == len(order) - expected_failed
    assert result["images"] == len(order) and result["ok"] is False

    rows = list(csv.DictReader(io.StringIO((tmp_path / "out" / "predictions.csv").read_text())))
    assert [r["path"] for r in rows] == order
    assert sum(r["status"] == "error" for r in rows) == expected_failed
    plain = next(r for r in rows if r["path"] == good["plain.jpg"])
    assert plain["class_1"] == by_path[good["plain.jpg"]]["top"][0]["class"] and plain["error"] == ""
    assert float(plain["prob_1"]) == pytest.approx(by_path[good["plain.jpg"]]["top"][0]["prob"], abs=1e-6)


def test_a_directory_given_as_an_image_is_a_named_error(run, tmp_path):
    predictor = runtime.load(run["checkpoint"], device="cpu")
    folder = tmp_path / "looks_like.jpg"
    folder.mkdir()
    result = run_files(predictor, [str(folder)], workers=0)
    assert result.positions == [] and result.failures == [(0, "is a directory, not an image file")]
    assert result.logits.shape == (0, 4)


def test_folders_are_searched_recursively_and_all_good_means_ok(run, tmp_path):
    paths, _ = held_out_images(run)
    nested = tmp_path / "photos" / "deeper"
    nested.mkdir(parents=True)
    shutil.copy(paths[0], tmp_path / "photos" / "a.jpg")
    shutil.copy(paths[1], nested / "b.JPG")
    (tmp_path / "photos" / "notes.txt").write_text("not an image, and not an image name: skipped")
    (tmp_path / "photos" / "a.mask.png").write_bytes(b"")  # object masks of the synthetic set are not samples
    result = runtime.predict_files(run["checkpoint"], [tmp_path / "photos"], device="cpu", topk=10, crops=1,
                                   workers=0, progress=False)
    assert [r["path"] for r in result["results"]] == [str(tmp_path / "photos" / "a.jpg"), str(nested / "b.JPG")]
    assert result["ok"] is True and result["failed"] == 0 and result["succeeded"] == 2
    assert result["topk"] == 4 and all(len(r["top"]) == 4 for r in result["results"])  # k capped at K classes
    for r in result["results"]:
        assert sum(t["prob"] for t in r["top"]) == pytest.approx(1.0)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no image files found"):
        runtime.predict_files(run["checkpoint"], [empty], device="cpu", progress=False)


def test_newest_trained_checkpoint_is_the_default_model(run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no finished trained model found"):
        runtime.predict_files(None, [held_out_images(run)[0][0]], device="cpu", progress=False)
    for name in ("finished_first", "finished_last", "still_training"):
        os.makedirs(f"runs/train/{name}")
        shutil.copy(run["checkpoint"], f"runs/train/{name}/best.pt")
        if name != "still_training":
            with open(f"runs/train/{name}/train.json", "w") as f:
                json.dump({"data": run["data"], "classes": 4, "spec": None}, f)
    past = time.time() - 3600
    os.utime("runs/train/finished_first/train.json", (past, past))
    os.utime("runs/train/finished_last/best.pt", (past, past))  # its last improvement was early on
    result = runtime.predict_files(None, [held_out_images(run)[0][0]], device="cpu", workers=0, progress=False)
    assert result["model"] == os.path.join("runs", "train", "finished_last", "best.pt") and result["ok"]


# --- Results written as they come; a killed run resumed ------------------------------------------

class _Killed(Exception):
    """Stands in for the process dying in the middle of a run."""


def _inputs(run, tmp_path, copies=5) -> list[str]:
    """Numbered copies of the held-out images (distinct paths), with an unreadable file among them."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    paths = []
    for i, source in enumerate(held_out_images(run)[0][:copies] * 2):
        paths.append(str(folder / f"{i:02d}.jpg"))
        shutil.copy(source, paths[-1])
    (folder / "03.jpg").write_bytes(b"not a JPEG")
    return paths


@pytest.mark.parametrize("output_format", ["csv", "jsonl"])
def test_rows_are_on_disk_as_each_batch_ends_and_a_killed_run_resumes(run, tmp_path, output_format):
    paths = _inputs(run, tmp_path)
    options = dict(backend="torch", device="cpu", batch=4, topk=2, crops=1, workers=0, progress=False)
    whole = tmp_path / f"whole.{output_format}"
    runtime.predict_files(run["checkpoint"], paths, **options, **{output_format: whole})

    resumed = tmp_path / f"resumed.{output_format}"
    seen = []

    def die_in_the_second_batch(result):
        on_disk = resumed.read_text().splitlines()
        assert any(result["path"] in line for line in on_disk)  # written (and flushed) before it is handed out
        seen.append(result["path"])
        if len(seen) == 6:
            raise _Killed

    with pytest.raises(_Killed):
        runtime.predict_files(run["checkpoint"], paths, **options, **{output_format: resumed},
                              on_result=die_in_the_second_batch)
    redone = []
    summary = runtime.predict_files(run["checkpoint"], paths, **options, **{output_format: resumed},
                                    on_result=lambda r: redone.append(r["path"]))
    assert redone == paths[8:]  # the two written batches are not redone
    assert summary["resumed"] == 8 and summary["images"] == 10
    assert (summary["succeeded"], summary["failed"], summary["ok"]) == (9, 1, False)
    assert resumed.read_text() == whole.read_text()  # no row lost, none twice, the same order
    again = runtime.predict_files(run["checkpoint"], paths, **options, **{output_format: resumed},
                                  on_result=lambda r: pytest.fail(f"{r['path']} was done already"))
    assert again["resumed"] == 10 and resumed.read_text() == whole.read_text()


@pytest.mark.parametrize("output_format", ["csv", "jsonl"])
def test_a_row_torn_by_a_crash_is_cut_off_and_redone(run, tmp_path, output_format):
    paths = _inputs(run, tmp_path, copies=2)
    options = dict(backend="torch", device="cpu", batch=3, topk=2, crops=1, workers=0, progress=False)
    whole = tmp_path / f"whole.{output_format}"
    runtime.predict_files(run["checkpoint"], paths, **options, **{output_format: whole})
    lines = whole.read_text().splitlines(keepends=True)
    rows_kept = 2
    header = 1 if output_format == "csv" else 0
    torn = tmp_path / f"torn.{output_format}"
    torn.write_text("".join(lines[:header + rows_kept]) + lines[header + rows_kept][:12])  # no newline: cut mid-write
    summary = runtime.predict_files(run["checkpoint"], paths, **options, **{output_format: torn})
    assert summary["resumed"] == rows_kept and torn.read_text() == whole.read_text()


def test_a_file_of_other_columns_is_refused_not_appended_to(run, tmp_path):
    paths = _inputs(run, tmp_path, copies=2)
    options = dict(backend="torch", device="cpu", crops=1, workers=0, progress=False)
    out = tmp_path / "top2.csv"
    runtime.predict_files(run["checkpoint"], paths, topk=2, csv=out, **options)
    before = out.read_text()
    with pytest.raises(ValueError, match=r"top2.csv is not a predictions file of this kind .*topk 3"):
        runtime.predict_files(run["checkpoint"], paths, topk=3, csv=out, **options)
    jsonl = tmp_path / "notes.jsonl"
    jsonl.write_text('{"path": "a.jpg", "top": []}\n')
    with pytest.raises(ValueError, match="line 1 is not a prediction row"):
        runtime.predict_files(run["checkpoint"], paths, topk=2, jsonl=jsonl, **options)
    with pytest.raises(ValueError, match="not both"):
        runtime.predict_files(run["checkpoint"], paths, csv=out, jsonl=jsonl, **options)
    assert out.read_text() == before


def test_sigkill_mid_run_then_the_same_command_finishes_the_file(run, tmp_path):
    """A real kill: the CLI in a child process, slowed to one batch a second, killed after two batches."""
    paths = _inputs(run, tmp_path)
    out = tmp_path / "killed.jsonl"
    command = ["predict", *paths, "--model", run["checkpoint"], "--device", "cpu", "--crops", "1", "--topk", "2",
               "--batch", "2", "--jsonl", str(out)]
    slowed = ("import sys, time\n"
              "from cnnbench.runtime import pipeline\n"
              "iterate = pipeline.FileStream.__iter__\n"
              "def slow(self):\n"
              "    for part in iterate(self):\n"
              "        yield part\n"
              "        time.sleep(1)\n"
              "pipeline.FileStream.__iter__ = slow\n"
              "from cnnbench.cli import main\n"
              "sys.argv = ['cli.py'] + sys.argv[1:]\n"
              "main()\n")
    child = subprocess.Popen([sys.executable, "-c", slowed, *command], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 4:
            break
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    written = out.read_text().count("\n")
    assert 4 <= written < len(paths), child.stderr.read().decode()[-2000:]

    from cnnbench.cli import cli
    result = CliRunner().invoke(cli, command + ["--json"], catch_exceptions=False)
    summary = json.loads(result.stdout)
    assert summary["resumed"] == written and summary["images"] == len(paths)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in rows] == paths  # every file once, in order
    assert "not an image" in rows[3]["error"]


def test_text_output_is_one_line_per_file_then_the_counts(run, tmp_path):
    from cnnbench.cli import cli

    paths = _inputs(run, tmp_path, copies=2)[:4]
    result = CliRunner().invoke(cli, ["predict", *paths, "--model", run["checkpoint"], "--device", "cpu", "--crops",
                                      "1", "--topk", "2"])
    lines = result.stdout.splitlines()  # the progress bar goes to stderr
    assert result.exit_code == 1 and len(lines) == 5
    assert lines[3] == f"{paths[3]}: ERROR not an image file (format not recognised, or the header is damaged)"
    assert all(re.fullmatch(rf"{re.escape(p)}: \S+ \d+\.\d%, \S+ \d+\.\d%", line) for p, line in zip(paths, lines[:3]))
    assert lines[4] == "3 classified, 1 failed"
