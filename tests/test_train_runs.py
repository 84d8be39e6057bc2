"""What a run records and when it may go on: the training precision as a switch (whatever the CPU),
per-part records, --resume keeping the whole run's facts, a resume refused when the run was made with
other settings, and --initial-checkpoint's checks."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from cnnbench.common import device as device_module
from cnnbench.common.device import TRAIN_PRECISION_ENV, training_precision
from cnnbench.common.errors import UserError
from cnnbench.data import synth
from cnnbench.models import create_model, default_spec
from cnnbench.models.checkpoint import load_checkpoint, save_checkpoint
from cnnbench.train import TrainConfig, train_model
from cnnbench.train.loop import RunMismatchError
from train_testlib import Interrupted, stop_after

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def tiny_config(tmp_path, **overrides) -> TrainConfig:
    base = dict(arch="resnet18", quick_data=True, epochs=2, batch_size=16, width_mult=0.125, workers=0,
                image_size=32, out=str(tmp_path / "runs"), progress=False, seed=1, device="cpu")
    base.update(overrides)
    return TrainConfig(**base)


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_precision_auto_follows_the_cpu_unless_forced(monkeypatch, fast_bf16):
    monkeypatch.setattr(device_module, "cpu_has_fast_bf16", lambda: fast_bf16)
    monkeypatch.delenv(TRAIN_PRECISION_ENV, raising=False)
    assert training_precision("auto", CPU) == ("bf16" if fast_bf16 else "fp32")
    assert training_precision("auto", torch.device("cuda")) == "fp16"
    for forced in ("fp32", "bf16"):  # the CI switch: the same answer on every CPU, and on a GPU
        monkeypatch.setenv(TRAIN_PRECISION_ENV, forced)
        assert training_precision("auto", CPU) == training_precision("auto", torch.device("cuda")) == forced
        assert training_precision("fp32", CPU) == "fp32"  # an explicit choice is never overridden
    monkeypatch.setenv(TRAIN_PRECISION_ENV, "fp8")
    with pytest.raises(UserError, match=f"{TRAIN_PRECISION_ENV}='fp8'"):
        training_precision("auto", CPU)
    with pytest.raises(UserError, match="fp16 training needs a CUDA GPU"):
        training_precision("fp16", CPU)
    with pytest.raises(UserError, match="unknown training precision"):
        training_precision("int8", CPU)


def test_bf16_trains_on_any_cpu_and_a_precision_change_on_resume_is_refused(tmp_path):
    with pytest.raises(Interrupted):
        train_model(tiny_config(tmp_path, precision="bf16"), on_epoch_end=stop_after(1))
    with pytest.raises(RunMismatchError, match="trained in bf16 so far, this run would train in fp32.*"
                                               "--precision bf16"):
        train_model(tiny_config(tmp_path, precision="fp32", resume=True))
    summary = train_model(tiny_config(tmp_path, precision="fp32", resume=True, allow_precision_change=True))
    assert [(p["epochs"], p["precision"], p["device"]) for p in summary["parts"]] == [
        ([1, 1], "bf16", "cpu"), ([2, 2], "fp32", "cpu")]
    recorded = json.loads((Path(summary["run_dir"]) / "train.json").read_text())
    assert recorded["parts"] == summary["parts"] and recorded["precision"] == "fp32"
    assert torch.load(summary["last"], weights_only=True)["record"]["parts"] == summary["parts"]


def test_the_cli_takes_precision_and_refuses_fp16_on_the_cpu_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "cli.py", "train", "resnet18", "--quick-data", "--device", "cpu",
                           "--precision", "fp16", "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: fp16 training needs a CUDA GPU")


def test_resume_keeps_best_epoch_skipped_images_and_every_parts_seconds(tmp_path):
    folder = tmp_path / "data"
    for index, cls in enumerate(("a", "b")):
        (folder / cls).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (40, 40), (100 * index, 20 * i, 50)).save(folder / cls / f"{i}.jpg")
    broken = folder / "a" / "0.jpg"
    broken.write_bytes(b"not a jpeg")
    config = dict(data=str(folder), quick_data=False, epochs=3, batch_size=4)
    with pytest.raises(Interrupted):
        train_model(tiny_config(tmp_path, **config), on_epoch_end=stop_after(2))
    first = torch.load(tmp_path / "runs" / "resnet18" / "last.pt", weights_only=True)["record"]
    assert str(broken) in dict(first["skipped_images"])
    Image.new("RGB", (40, 40)).save(broken, format="JPEG")  # repaired: the resumed part reads it fine
    summary = train_model(tiny_config(tmp_path, resume=True, **config))
    assert str(broken) in dict(summary["skipped_images"])  # skipped in the first part, still reported
    assert summary["best_epoch"] is not None and summary["best_epoch"] >= first["best_epoch"] >= 1
    history = torch.load(summary["last"], weights_only=True)["record"]["history"]
    assert summary["best_epoch"] == max(range(1, 4), key=lambda e: (history[e - 1]["val_top1"], -e))
    parts = summary["parts"]
    assert [p["epochs"] for p in parts] == [[1, 2], [3, 3]]
    assert summary["seconds"] == pytest.approx(sum(row["seconds"] for row in history), abs=0.2)
    assert summary["seconds"] > parts[1]["seconds"] > 0


def test_resume_with_other_settings_names_each_difference(tmp_path):
    with pytest.raises(Interrupted):
        train_model(tiny_config(tmp_path), on_epoch_end=stop_after(1))
    with pytest.raises(RunMismatchError) as caught:
        train_model(tiny_config(tmp_path, width_mult=0.25, epochs=3, resume=True))
    message = str(caught.value)
    assert "width_mult 0.125 → 0.25" in message and "epochs 2 → 3" in message and "--name" in message
    with pytest.raises(RunMismatchError, match="data embedded synth-v1-8c"):
        train_model(tiny_config(tmp_path, quick_data=False, data=str(synth.default_data_root(quick=True)),
                                resume=True))
    assert train_model(tiny_config(tmp_path, resume=True))["epochs"] == 2  # the same settings go on


def test_initial_checkpoint_checks_normalisation_and_honours_dropout(tmp_path):
    first = train_model(tiny_config(tmp_path, name="first", epochs=1))
    with pytest.raises(UserError, match=r"normalisation mean \(0.485, 0.456, 0.406\).*this run uses mean "
                                        r"\(0.5, 0.5, 0.5\)"):
        train_model(tiny_config(tmp_path, name="half", epochs=1, norm="half", initial_checkpoint=first["best"]))
    again = train_model(tiny_config(tmp_path, name="dropout", epochs=1, dropout=0.3, initial_checkpoint=first["best"]))
    model, meta = load_checkpoint(again["best"])
    assert meta["model_kwargs"]["dropout"] == 0.3 and model.dropout.p == 0.3


def test_initial_checkpoint_of_xception_pretrained_needs_no_weights(tmp_path):
    """A fine-tuned ImageNet Xception goes on from its checkpoint alone (no --weights demanded)."""
    classes = synth.class_folder_names(synth.QUICK_SET["classes"])
    torch.manual_seed(0)
    model = create_model("xception_pretrained", len(classes))
    start = tmp_path / "start.pt"
    save_checkpoint(start, model, arch="xception_pretrained", classes=classes,
                    spec=default_spec("xception_pretrained", crop=71), record={})
    # fp32 whatever CNNBENCH_TRAIN_PRECISION says: precision is not what this tests, and a full-width
    # Xception in bf16 emulated on a CPU without bf16 units takes minutes.
    summary = train_model(tiny_config(tmp_path, arch="xception_pretrained", width_mult=None, image_size=71, epochs=1,
                                      initial_checkpoint=str(start), precision="fp32"))
    trained = torch.load(summary["last"], weights_only=True)["state_dict"]
    for key, value in model.state_dict().items():
        if not key.startswith("fc."):  # the head-only recipe: the trunk stays the checkpoint's
            assert torch.equal(trained[key], value), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GradScaler state exists only for fp16 training on CUDA")
def test_resume_keeps_the_gradscaler_state_on_cuda(tmp_path):
    cuda = dict(device="cuda", precision="fp16")
    full = train_model(tiny_config(tmp_path, name="full", **cuda))
    with pytest.raises(Interrupted):
        train_model(tiny_config(tmp_path, name="resumed", **cuda), on_epoch_end=stop_after(1))
    resumed = train_model(tiny_config(tmp_path, name="resumed", resume=True, **cuda))
    a = torch.load(full["last"], weights_only=True)["extra"]["scaler"]
    b = torch.load(resumed["last"], weights_only=True)["extra"]["scaler"]
    assert a == b  # the loss scale and its growth tracker went on from the interrupted part's
