"""`cli.py train xception_pretrained --weights FILE`, the README's fine-tune command, end to end.

Only the new head may change: after an epoch every trunk tensor of the checkpoint, the BatchNorm
running statistics and batch counters included, is bit-identical to the weights file.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def legacy_xception_file(tmp_path_factory):
    torch.manual_seed(0)
    reference = timm.create_model("legacy_xception", pretrained=False, num_classes=1000)
    with torch.no_grad():  # statistics unlike a fresh BatchNorm, so any re-estimation shows
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.num_batches_tracked.fill_(1000)
    path = tmp_path_factory.mktemp("weights") / "legacy_xception.pth"
    torch.save(reference.state_dict(), path)
    return path


def test_finetune_from_the_cli_changes_only_the_head(legacy_xception_file, tmp_path):
    done = subprocess.run(
        [sys.executable, "cli.py", "train", "xception_pretrained", "--weights", str(legacy_xception_file),
         "--quick-data", "--epochs", "1", "--image-size", "71", "--workers", "0", "--out", str(tmp_path), "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["arch"] == "xception_pretrained" and summary["epochs"] == 1

    weights = torch.load(legacy_xception_file, weights_only=True)
    last = torch.load(summary["last"], weights_only=True)
    trunk = {k: v for k, v in last["state_dict"].items() if not k.startswith("fc.")}
    assert trunk.keys() == {k for k in weights if not k.startswith("fc.")}
    for key, value in trunk.items():
        assert torch.equal(value, weights[key]), key
    assert last["model_kwargs"] == {"dropout": 0.0}
    # The optimiser saw the two head tensors and nothing else, and it moved them.
    moments = last["extra"]["optimizer"]["state"]
    assert len(moments) == 2
    assert all(state["exp_avg"].abs().sum() > 0 for state in moments.values())


def test_width_mult_on_the_one_size_model_is_a_clear_error(legacy_xception_file, tmp_path):
    done = subprocess.run(
        [sys.executable, "cli.py", "train", "xception_pretrained", "--weights", str(legacy_xception_file),
         "--quick-data", "--width-mult", "0.5", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "does not take width_mult" in done.stderr and "Traceback" not in done.stderr
