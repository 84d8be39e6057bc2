"""Shared by the Grad-CAM tests: a tiny untrained checkpoint on a synthetic set with masks (what the
pointing game and the galleries read), built fresh in ``folder``."""
import torch

from cnnbench.data.folder import scan_folder
from cnnbench.data.split import make_split, save_split
from cnnbench.data.synth import synthesize
from cnnbench.models.checkpoint import save_checkpoint
from cnnbench.models.registry import create_model


def tiny_cam_run(folder, per_class: int, spec) -> dict:
    """{"root", "split", "checkpoint"}: 3 classes of ``per_class`` 80 px images and a width-1/16 ResNet-18."""
    root = synthesize(folder / "data", classes=3, per_class=per_class, size=80, progress=False)
    split = make_split(scan_folder(root))
    save_split(split, folder / "split.json")
    torch.manual_seed(0)
    model = create_model("resnet18", 3, width_mult=0.0625)
    checkpoint = folder / "runs" / "train" / "tiny" / "best.pt"
    save_checkpoint(checkpoint, model, arch="resnet18", classes=split.classes, spec=spec,
                    record={"split": str(folder / "split.json"), "data": root})
    return {"root": root, "split": split, "checkpoint": checkpoint}
