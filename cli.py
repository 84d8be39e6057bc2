"""cnnbench: train → export → verify → benchmark → explain CNN image classifiers.

    python cli.py demo                 the whole pipeline on the embedded data set
    python cli.py train resnet26       train (or fine-tune) one architecture
    python cli.py eval CHECKPOINT      accuracy on the saved split's test part (1 or 10 crops)
    python cli.py export --fp16        ONNX fp32/fp16 (+ TensorRT) of every checkpoint and their ensemble
    python cli.py predict IMG...       batched 10-crop inference through any backend
    python cli.py bench --batch 64     speed, accuracy and agreement of every backend side by side
    python cli.py gradcam IMG...       what the model looked at

Every command takes --json: a JSON summary on stdout and nothing else there (progress goes to stderr).
"""
from __future__ import annotations

import json
import sys

import click


def emit(result: dict, as_json: bool, render) -> None:
    """Print the JSON summary or the human rendering; exit non-zero when the result says not ok."""
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    else:
        click.echo(render(result))
    if result.get("ok") is False:
        sys.exit(1)


json_option = click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout (nothing else).")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli():
    """Train, export, verify, benchmark and explain CNN image classifiers."""


@cli.group()
def data():
    """Make the embedded data set, or check a data folder."""


@data.command("synth")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write the data set into.")
@click.option("--classes", default=16, show_default=True, help="Number of shape/texture classes.")
@click.option("--per-class", default=100, show_default=True, help="Images per class.")
@click.option("--size", default=160, show_default=True, help="Image side in pixels.")
@click.option("--seed", default=0, show_default=True)
@json_option
def data_synth(out, classes, per_class, size, seed, as_json):
    """Generate the procedural data set (Caltech-256 folder layout, object masks beside images)."""
    from data.check import synth_command

    emit(synth_command(out, classes=classes, per_class=per_class, size=size, seed=seed), as_json,
         lambda r: f"wrote {r['images']} images in {r['classes']} classes to {r['root']}")


@data.command("check")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--verify", is_flag=True, help="Open every image too (slower) and list the unreadable ones.")
@json_option
def data_check(path, verify, as_json):
    """Count classes and images under PATH and say what was skipped and why."""
    from data.check import check_folder, render_check

    emit(check_folder(path, verify=verify), as_json, render_check)


@cli.command()
@click.argument("arch")
@click.option("--data", type=click.Path(exists=True, file_okay=False), help="Data folder (Caltech-256 or ImageFolder). Default: the embedded set.")
@click.option("--quick-data", is_flag=True, help="Use the small embedded set (tests, quick looks).")
@click.option("--epochs", default=5, show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="sgd", show_default=True, help="SGD with Nesterov momentum, or AdamW.")
@click.option("--lr", type=float, help="Peak learning rate (default: scaled from the batch size).")
@click.option("--weight-decay", default=5e-4, show_default=True)
@click.option("--dropout", default=0.0, show_default=True, help="Dropout before the classifier.")
@click.option("--label-smoothing", default=0.0, show_default=True)
@click.option("--image-size", type=int, help="Crop side (test resize = crop·256/224). Default: the data set's.")
@click.option("--norm", type=click.Choice(["imagenet", "half"]), help="Normalisation: ImageNet mean/std, or mean=std=0.5.")
@click.option("--amp/--no-amp", default=None, help="Mixed precision (bf16 on CPUs with bf16 units, fp16 on CUDA). Default: on where fast.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--workers", type=int, help="DataLoader worker processes (default min(4, cores)).")
@click.option("--seed", default=0, show_default=True, help="Seeds the split, the data order and the initial weights.")
@click.option("--out", default="runs/train", show_default=True, type=click.Path(file_okay=False))
@click.option("--name", help="Run folder name under --out (default: ARCH).")
@click.option("--resume", is_flag=True, help="Continue the run from its last.pt; ends where an uninterrupted run would.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), help="xception_pretrained: local ImageNet weights file.")
@click.option("--width-mult", default=1.0, show_default=True, help="Scale every layer's width (tiny models for experiments).")
@json_option
def train(arch, data, quick_data, epochs, batch_size, optimizer, lr, weight_decay, dropout, label_smoothing,
          image_size, norm, amp, device, workers, seed, out, name, resume, weights, width_mult, as_json):
    """Train ARCH (resnet18, resnet26, xception_small, xception_medium, xception_pretrained).

    Works under `torchrun --nproc_per_node N cli.py train ...` (DistributedDataParallel).
    """
    from train import TrainConfig, train_model

    config = TrainConfig(arch=arch, data=data, quick_data=quick_data, epochs=epochs, batch_size=batch_size,
                         optimizer=optimizer, lr=lr, weight_decay=weight_decay, dropout=dropout,
                         label_smoothing=label_smoothing, image_size=image_size, norm=norm, amp=amp,
                         device=device, workers=workers, seed=seed, out=out, name=name, resume=resume,
                         weights=weights, width_mult=width_mult, progress=not as_json)
    result = train_model(config)
    if result:
        emit(result, as_json, lambda r: f"{r['arch']}: best val top-1 {r['best_val_top1']:.1f}% (1 crop) "
                                       f"at epoch {r['best_epoch']}; checkpoint {r['best']}")


if __name__ == "__main__":
    cli()
