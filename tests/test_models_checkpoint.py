import os

import numpy as np
import pytest
import timm
import torch

from cnnbench.data.spec import spec_for_crop
from cnnbench.models import (
    FORMAT_VERSION, CheckpointError, create_model, default_spec, load_checkpoint, read_checkpoint_meta,
    save_checkpoint,
)

CLASSES = ["ant", "bee", "cat"]


def _save_tiny(path, arch="resnet18", **kwargs):
    torch.manual_seed(0)
    model = create_model(arch, len(CLASSES), width_mult=0.125, dropout=0.1)
    save_checkpoint(path, model, arch=arch, classes=CLASSES, spec=spec_for_crop(64), record={"epochs": 2},
                    **kwargs)
    return model.eval()


def _rewrite(path, **changes):
    """Load a checkpoint dict, change some entries, save it back (a file as another program might write)."""
    checkpoint = torch.load(path, weights_only=True)
    checkpoint.update(changes)
    torch.save(checkpoint, path)


def test_round_trip_rebuilds_the_same_model(tmp_path):
    path = tmp_path / "best.pt"
    model = _save_tiny(path, extra={"optimizer": {"step": torch.tensor(3)}})
    assert os.listdir(tmp_path) == ["best.pt"]  # the atomic write left no temporary file
    loaded, meta = load_checkpoint(path)
    assert not loaded.training
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert meta["format_version"] == FORMAT_VERSION and meta["arch"] == "resnet18"
    assert meta["classes"] == CLASSES and meta["num_classes"] == 3
    assert meta["spec"] == spec_for_crop(64).to_dict() and meta["record"] == {"epochs": 2}
    assert meta["model_kwargs"] == {"width_mult": 0.125, "dropout": 0.1}
    assert meta["extra"]["optimizer"]["step"].item() == 3
    assert "state_dict" not in meta
    meta_only = read_checkpoint_meta(path)
    assert meta_only.keys() == meta.keys()
    assert {k: v for k, v in meta_only.items() if k != "extra"} == {k: v for k, v in meta.items() if k != "extra"}


def test_wrapped_models_are_saved_bare(tmp_path):
    torch.manual_seed(0)
    model = create_model("xception_small", 3, width_mult=0.125)
    save_checkpoint(tmp_path / "m.pt", torch.nn.DataParallel(model), arch="xception_small", classes=CLASSES,
                    spec=default_spec("xception_small"), record={})
    loaded, _ = load_checkpoint(tmp_path / "m.pt", expect_arch="xception_small")
    assert loaded.state_dict().keys() == model.state_dict().keys()


def test_save_rejects_class_names_that_do_not_match(tmp_path):
    model = create_model("resnet18", 3, width_mult=0.125)
    with pytest.raises(ValueError, match="2 class names for a 3-class model"):
        save_checkpoint(tmp_path / "m.pt", model, arch="resnet18", classes=["a", "b"], spec=spec_for_crop(64),
                        record={})
    assert not (tmp_path / "m.pt").exists()


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="absent.pt: checkpoint file not found"):
        load_checkpoint(tmp_path / "absent.pt")


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint\n", "truncated"])
def test_unreadable_files(tmp_path, content):
    path = tmp_path / "bad.pt"
    if content == "truncated":
        _save_tiny(path)
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.pt: not a readable torch file"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="bad.pt: not a readable torch file"):
        read_checkpoint_meta(path)


class _Malicious:
    marker = None

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_is_refused_and_never_runs(tmp_path):
    path, marker = tmp_path / "evil.pt", tmp_path / "executed"
    payload = _Malicious()
    payload.marker = str(marker)
    _save_tiny(path)
    _rewrite(path, record={"note": payload})
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="evil.pt: refused: the file holds pickled objects or code"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("changes,message", [
    ({"format_version": FORMAT_VERSION + 1}, f"format {FORMAT_VERSION + 1} is newer than this program reads"),
    ({"arch": "vgg16"}, "unknown arch 'vgg16'; known models: resnet18"),
    ({"classes": ["a", "b"]}, "has 2 class names for num_classes=3"),
    ({"spec": {"crop": 64}}, "bad preprocessing spec: .*missing key"),
])
def test_inconsistent_contents(tmp_path, changes, message):
    path = tmp_path / "m.pt"
    _save_tiny(path)
    _rewrite(path, **changes)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_missing_keys(tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"state_dict": {}, "arch": "resnet18"}, path)
    with pytest.raises(CheckpointError, match="m.pt: not a checkpoint of this project: missing key.*format_version"):
        load_checkpoint(path)
    torch.save([1, 2], path)
    with pytest.raises(CheckpointError, match="expected a dict, found list"):
        load_checkpoint(path)


def test_weights_that_do_not_fit_the_arch(tmp_path):
    path = tmp_path / "m.pt"
    _save_tiny(path)
    _rewrite(path, arch="resnet26")
    with pytest.raises(CheckpointError,
                       match="checkpoint says arch 'resnet26' but its weights do not fit 'resnet26': .*missing"):
        load_checkpoint(path)


def test_expect_arch(tmp_path):
    path = tmp_path / "m.pt"
    _save_tiny(path)
    with pytest.raises(CheckpointError, match="is a 'resnet18' model, expected 'xception_small'"):
        load_checkpoint(path, expect_arch="xception_small")


def test_pretrained_xception_reloads_without_the_imagenet_file(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "imagenet.pth"
    torch.save(timm.create_model("legacy_xception", pretrained=False).state_dict(), weights)
    model = create_model("xception_pretrained", 3, weights=str(weights)).eval()
    save_checkpoint(tmp_path / "best.pt", model, arch="xception_pretrained", classes=CLASSES,
                    spec=default_spec("xception_pretrained"), record={})
    weights.unlink()
    loaded, meta = load_checkpoint(tmp_path / "best.pt")
    assert meta["model_kwargs"] == {}
    x = torch.randn(1, 3, 71, 71)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_record_values_are_made_loadable_or_refused_at_save(tmp_path):
    path = tmp_path / "m.pt"
    model = create_model("resnet18", 3, width_mult=0.125)
    record = {"top1": np.float64(0.75), "epochs": np.int64(3), "data": tmp_path, "history": [(1, np.float32(0.5))]}
    save_checkpoint(path, model, arch="resnet18", classes=CLASSES, spec=spec_for_crop(64), record=record)
    assert read_checkpoint_meta(path)["record"] == {"top1": 0.75, "epochs": 3, "data": str(tmp_path),
                                                   "history": [(1, 0.5)]}
    with pytest.raises(TypeError, match=r"record\['bad'\]\[0\] is a object: a checkpoint holds only tensors"):
        save_checkpoint(tmp_path / "n.pt", model, arch="resnet18", classes=CLASSES, spec=spec_for_crop(64),
                        record={"bad": [object()]})
    assert not (tmp_path / "n.pt").exists()
