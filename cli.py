"""cnnbench: train → export → verify → benchmark → explain CNN image classifiers.

    python cli.py demo                 the whole pipeline on the embedded data set
    python cli.py train resnet26       train (or fine-tune) one architecture
    python cli.py eval CHECKPOINT      accuracy on the saved split's test part (1, 10 or dense crops)
    python cli.py export --fp16        ONNX fp32/fp16 (+ TensorRT) of every checkpoint and their ensemble
    python cli.py predict IMG...       batched 10-crop inference through any backend
    python cli.py bench --batch 64     speed, accuracy and agreement of every backend side by side
    python cli.py gradcam IMG...       what the model looked at

Every command takes --json: a JSON summary on stdout and nothing else there (progress goes to stderr).
"""
from __future__ import annotations

import json
import os
import sys

import click

from common.errors import UserError

# Decoding workers and the model share few cores: OpenMP threads that spin while waiting for a
# descheduled sibling made PyTorch up to 45x slower here (1.4 s vs 31 ms for one batch). Passive
# waiting must be chosen before torch loads OpenMP; the user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from data.crops import CROP_MODES, TEN_CROP_PLACES  # noqa: E402 - loads torch, so only after the OpenMP setting
from data.heldout import DATA_HELP  # noqa: E402
from models.dense import CENTRE_MODES, DEFAULT_CENTRE  # noqa: E402


def emit(result: dict, as_json: bool, render) -> None:
    """Print the JSON summary or the human rendering; exit non-zero when the result says not ok."""
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    else:
        click.echo(render(result))
    if result.get("ok") is False:
        sys.exit(1)


json_option = click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout (nothing else).")


def with_picked(result: dict, picked: list) -> dict:
    """Record in the JSON summary which runs a command given no paths picked (common.runs.newest_runs)."""
    if picked:
        result["picked"] = [p.to_dict() for p in picked]
    return result


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli():
    """Train, export, verify, benchmark and explain CNN image classifiers.

    \b
    The pipeline, in order (`demo` runs all of it on the embedded data set):
      data synth|check → train ARCH → eval CKPT → export --fp16 → validate EXPORT
      → predict IMG... → bench --batch 64 → gradcam IMG... | --errors CKPT
    """


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
@click.option("--epochs", type=int, help="Default: the recipe's.")
@click.option("--batch-size", type=int, help="Default: the recipe's.")
@click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), help="AdamW, or SGD with Nesterov momentum (default: the recipe's).")
@click.option("--lr", type=float, help="Peak learning rate of the one-cycle schedule (default: the recipe's, scaled with the batch size).")
@click.option("--weight-decay", type=float, help="Never on BatchNorm or biases (default: the recipe's).")
@click.option("--dropout", default=0.0, show_default=True, help="Dropout before the classifier.")
@click.option("--label-smoothing", type=float, help="Default: the recipe's.")
@click.option("--augment", type=click.Choice(["affine", "resized-crop"]),
              help="affine: resize, random affine, random crop; resized-crop: random area/aspect crop (default: the recipe's).")
@click.option("--min-scale", type=float, help="resized-crop: smallest crop as a share of the image area (default: the recipe's).")
@click.option("--ema", type=float, help="Validate and save a moving average of the weights with this decay; 0: off (default: the recipe's).")
@click.option("--image-size", type=int, help="Crop side (test resize = crop·256/224). Default: the data set's.")
@click.option("--progressive-from", type=int, help="Progressive resizing: train at this crop side, and at --image-size for the "
              "last fifth of the epochs; 0: off (default: the recipe's share of --image-size).")
@click.option("--synth-stream", type=int, help="Embedded set: fresh images per class per epoch instead of the stored "
              "training split; 0: the stored split (default: the recipe's).")
@click.option("--resize", type=int, help="Resize side before cropping, in training and testing (default crop·256/224; "
                                        "dense ten crops need resize - crop a multiple of the output stride, e.g. 128 for 96).")
@click.option("--norm", type=click.Choice(["imagenet", "half"]), help="Normalisation: ImageNet mean/std, or mean=std=0.5.")
@click.option("--amp/--no-amp", default=None, help="Mixed precision (bf16 on CPUs with bf16 units, fp16 on CUDA). Default: on where fast.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--workers", type=int, help="DataLoader worker processes (default min(4, cores)).")
@click.option("--seed", default=0, show_default=True, help="Seeds the split, the data order and the initial weights.")
@click.option("--out", default="runs/train", show_default=True, type=click.Path(file_okay=False))
@click.option("--name", help="Run folder name under --out (default: ARCH).")
@click.option("--resume", is_flag=True, help="Continue the run from its last.pt; ends where an uninterrupted run would.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), help="xception_pretrained: local ImageNet weights file.")
@click.option("--initial-checkpoint", type=click.Path(exists=True, dir_okay=False),
              help="Start from this trained checkpoint (same architecture and classes), e.g. to fine-tune it at a larger --image-size.")
@click.option("--width-mult", type=float, help="Scale every layer's width (tiny models for experiments; default: full width).")
@json_option
def train(arch, data, quick_data, epochs, batch_size, optimizer, lr, weight_decay, dropout, label_smoothing, augment,
          min_scale, ema, image_size, resize, progressive_from, synth_stream, norm, amp, device, workers, seed, out, name,
          resume, weights, initial_checkpoint, width_mult, as_json):
    """Train ARCH (resnet18, resnet26, xception_small, xception_medium, xception_pretrained).

    Unset options follow the default recipe (train/recipe.py; measured in docs/RECIPES.md); the run's
    train.json records every value used.

    Works under `torchrun --nproc_per_node N cli.py train ...` (DistributedDataParallel).
    """
    from train import TrainConfig, train_model

    config = TrainConfig(arch=arch, data=data, quick_data=quick_data, epochs=epochs, batch_size=batch_size,
                         optimizer=optimizer, lr=lr, weight_decay=weight_decay, dropout=dropout,
                         label_smoothing=label_smoothing, augment=augment, min_scale=min_scale, ema=ema,
                         image_size=image_size, resize=resize, progressive_from=progressive_from, synth_stream=synth_stream,
                         norm=norm, amp=amp,
                         device=device, workers=workers, seed=seed, out=out, name=name, resume=resume,
                         weights=weights, initial_checkpoint=initial_checkpoint, width_mult=width_mult,
                         progress=not as_json)
    result = train_model(config)
    if result:
        emit(result, as_json, lambda r: f"{r['arch']}: best val top-1 {r['best_val_top1']:.1f}% (1 crop) "
                                       f"at epoch {r['best_epoch']}; checkpoint {r['best']}")


model_source = click.option("--backend", default="auto", show_default=True,
                            help="torch (checkpoints), onnxruntime or tensorrt (exports); auto picks the fastest available.")
device_option = click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
precision_option = click.option("--precision", default="fp32", show_default=True,
                                help="torch: fp32, bf16, fp16; exports: the graph to run (fp32, fp16, int8).")
crops_option = click.option("--crops", type=click.Choice(list(CROP_MODES)), default="10", show_default=True,
                            callback=lambda ctx, param, value: int(value) if value.isdigit() else value,
                            help="; ".join(f"{m.name}: {m.description}" for m in CROP_MODES.values()) + ".")
held_out_data_option = click.option("--data", type=click.Path(exists=True, file_okay=False), help=DATA_HELP)


@cli.command("eval")
@click.argument("model", type=click.Path(exists=True))
@held_out_data_option
@model_source
@device_option
@precision_option
@crops_option
@click.option("--batch", default=64, show_default=True, help="Images per batch (each is ten crops).")
@click.option("--workers", type=int, help="Decoding worker processes.")
@json_option
def evaluate(model, data, backend, device, precision, crops, batch, workers, as_json):
    """Accuracy of MODEL (checkpoint or export) on the saved split's test part: top-1, top-5, mean per-class."""
    import runtime
    from runtime.render import render_evaluation

    emit(runtime.evaluate(model, data=data, backend=backend, device=device, precision=precision, crops=crops,
                          batch=batch, workers=workers, progress=not as_json), as_json, render_evaluation)


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--model", type=click.Path(exists=True), help="Checkpoint or export (default: the newest best.pt of the newest "
              "runs/train or runs/*/train).")
@model_source
@device_option
@precision_option
@crops_option
@click.option("--batch", default=64, show_default=True, help="Images per batch (each is ten crops).")
@click.option("--topk", default=5, show_default=True)
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Also write the predictions as CSV.")
@json_option
def predict(paths, model, backend, device, precision, crops, batch, topk, csv_path, as_json):
    """Classify image files and folders (recursive); unreadable images are named, the rest go on."""
    import runtime
    from common.runs import newest_runs
    from runtime.render import render_predictions

    picked = [] if model else [newest_runs("train")]
    model = model or picked[0].newest
    emit(with_picked(runtime.predict_files(model, list(paths), backend=backend, device=device, precision=precision,
                                           batch=batch, crops=crops, topk=topk, csv=csv_path, progress=not as_json),
                     picked), as_json, render_predictions)


@cli.command()
@click.argument("images", nargs=-1, type=click.Path())
@click.option("--model", type=click.Path(exists=True), help="Checkpoint (reference Grad-CAM) or export made with --cam-output "
              "(default: the newest best.pt of the newest runs/train or runs/*/train).")
@click.option("--class", "class_name", help="Also explain this class.")
@crops_option
@click.option("--errors", "errors_of", type=click.Path(exists=True, dir_okay=False),
              help="Instead of IMAGES: galleries of misclassified and correct test images of this checkpoint.")
@held_out_data_option
@click.option("--limit", default=16, show_default=True, help="--errors: images per gallery.")
@click.option("--images", "max_images", type=int, help="--errors: scan at most this many test images (default: all).")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder (default runs/gradcam).")
@json_option
def gradcam(images, model, class_name, crops, errors_of, data, limit, max_images, out, as_json):
    """Grad-CAM panels (image, heatmap, overlay) for the predicted class; ten-crop aware."""
    from gradcam import errors_gallery, gradcam_images
    from gradcam.render import render_errors, render_gradcam

    if errors_of:
        emit(errors_gallery(errors_of, data=data, limit=limit, crops=crops, out=out, images=max_images,
                            progress=not as_json),
             as_json, render_errors)
    elif images:
        from common.runs import newest_runs

        picked = [] if model else [newest_runs("train")]
        model = model or picked[0].newest
        emit(with_picked(gradcam_images(list(images), model=model, class_name=class_name, crops=crops,
                                        out=out or "runs/gradcam", progress=not as_json), picked),
             as_json, render_gradcam)
    else:
        raise click.UsageError("give IMAGES, or --errors CHECKPOINT")


@cli.command()
@click.argument("export_dir", type=click.Path(exists=True))
@held_out_data_option
@click.option("--out", type=click.Path(file_okay=False), help="Report folder (default EXPORT/validation).")
@click.option("--limit", type=int, help="At most this many test images in the Grad-CAM comparison "
              "(the parity gates still use at least 200).")
@json_option
def validate(export_dir, data, out, limit, as_json):
    """Parity gates and CAM agreement of an export against its PyTorch reference, with panels."""
    from gradcam import validate_export
    from gradcam.render import render_validation

    emit(validate_export(export_dir, data=data, out=out, limit=limit, progress=not as_json), as_json, render_validation)


@cli.command()
@click.argument("checkpoints", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@click.option("--fp16", is_flag=True, help="Also an fp16 graph (weights and arithmetic; logits still fp32).")
@click.option("--ensemble/--no-ensemble", default=None, help="Also the logit-sum ensemble (default: with 2+ checkpoints).")
@click.option("--ten-crop", type=click.Choice(list(TEN_CROP_PLACES)), default=None,
              help="host (default): the graph takes normalised crops, cut outside; graph: it takes the resized uint8 "
                   "image and cuts/averages the exact ten crops itself; dense: it takes the resized uint8 image and "
                   "computes dense ten crops (trunk on image + mirror, crops as feature-map windows).")
@click.option("--ten-crop-in-graph", is_flag=True, help="Same as --ten-crop graph (kept for older scripts).")
@click.option("--dense-centre", type=click.Choice(CENTRE_MODES), default=DEFAULT_CENTRE, show_default=True,
              help="--ten-crop dense: the centre crop gets its own trunk pass (about 4.6 crop passes), an "
                   "interpolated window, or is dropped (both about 2.6).")
@click.option("--cam-output", is_flag=True, help="Second output: the feature map entering global pooling (CAM parity).")
@click.option("--int8", is_flag=True, help="Also a static int8 QDQ graph calibrated on training images (own parity gate).")
@click.option("--tensorrt", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Build TensorRT engines: auto = when TensorRT and a GPU exist.")
@click.option("--max-batch", default=64, show_default=True, help="Largest batch of images the exports are built for.")
@held_out_data_option
@click.option("--parity-images", default=200, show_default=True,
              help="Held-out images each graph is checked on (at most; spread over the classes).")
@click.option("--out", default="runs/export", show_default=True, type=click.Path(file_okay=False))
@click.option("--train-dir", help="Where to find checkpoints when none is named (default: the newest runs/train or runs/*/train).")
@json_option
def export(checkpoints, fp16, ensemble, ten_crop, ten_crop_in_graph, dense_centre, cam_output, int8, tensorrt, max_batch, data, parity_images, out,
           train_dir, as_json):
    """Export CHECKPOINTS (default: every runs/train/*/best.pt, plus their ensemble) and verify each against PyTorch.

    A failed parity gate exits non-zero and names the gate and the tolerance that would have been needed.
    """
    from common.runs import newest_runs
    from export import export_checkpoints
    from export.render import render_export

    if ten_crop_in_graph and ten_crop not in (None, "graph"):
        raise click.UsageError(f"--ten-crop-in-graph means --ten-crop graph; it contradicts --ten-crop {ten_crop}")
    ten_crop = "graph" if ten_crop_in_graph else (ten_crop or "host")
    picked = [newest_runs("train")] if not checkpoints and train_dir is None else []
    train_dir = picked[0].folder if picked else train_dir
    emit(with_picked(export_checkpoints(list(checkpoints) or None, fp16=fp16, ensemble=ensemble, ten_crop=ten_crop,
                                        dense_centre=dense_centre, cam_output=cam_output, int8=int8, tensorrt=tensorrt,
                                        max_batch=max_batch, data=data, parity_images=parity_images, out=out,
                                        train_dir=train_dir, progress=not as_json), picked),
         as_json, render_export)


@cli.command()
@click.argument("models", nargs=-1, type=click.Path(exists=True))
@click.option("--batch", default=64, show_default=True, help="Images per batch; each image is ten crops.")
@click.option("--backend", "backends", multiple=True, type=click.Choice(["torch", "onnxruntime", "tensorrt"]),
              help="Only these backends; repeatable.")
@click.option("--precision", "precisions", multiple=True, type=click.Choice(["fp32", "bf16", "fp16", "int8"]),
              help="Only these precisions; repeatable.")
@device_option
@click.option("--mode", type=click.Choice(["compute", "end-to-end", "both"]), default="compute", show_default=True,
              help="compute: pre-resized tensors on the device; end-to-end: image files to top-k.")
@click.option("--seconds", type=float, help="Time per row (default 5 s).")
@click.option("--iters", type=int, help="Fixed number of timed iterations per row instead of --seconds.")
@click.option("--warmup", default=3, show_default=True, help="Untimed iterations first.")
@click.option("--compile", "use_compile", is_flag=True, help="Also torch.compile rows (and CUDA graphs on a GPU).")
@click.option("--crops", "crop_modes", multiple=True, type=click.Choice(list(CROP_MODES)),
              help="Crop modes to measure; repeatable (default: 10, and an export's in-graph mode). "
                   "Agreement is always against the exact ten-crop fp32 reference.")
@held_out_data_option
@click.option("--out", type=click.Path(dir_okay=False), help="JSON path (default runs/bench/bench-<time>.json; CSV and PNG beside it).")
@click.option("--compare", type=click.Path(exists=True, dir_okay=False), help="An earlier bench JSON: print the ratio per row.")
@click.option("--eval-images", default=1000, show_default=True, help="Test images for accuracy/agreement (0: all).")
@click.option("--threads", type=int, help="CPU threads for the model (default: all cores).")
@click.option("--workers", type=int, help="end-to-end: decoding worker processes.")
@click.option("--train-dir", help="Checkpoints to bench when no MODELS are named (default: the newest runs/train or runs/*/train).")
@click.option("--export-dir", help="Exports to bench when no MODELS are named (default: the newest runs/export or runs/*/export).")
@json_option
def bench(models, batch, backends, precisions, device, mode, seconds, iters, warmup, use_compile, crop_modes, data, out,
          compare,
          eval_images, threads, workers, train_dir, export_dir, as_json):
    """Speed, accuracy and agreement of every backend and precision, side by side (MODELS: default all)."""
    from bench import run_bench
    from bench.report import render_table

    train_dir, export_dir, picked = _bench_folders(models, train_dir, export_dir)
    emit(with_picked(run_bench(list(models) or None, batch=batch, backends=list(backends) or None, precisions=list(precisions) or None,
                   device=device, mode=mode, seconds=seconds, iters=iters, warmup=warmup, compile=use_compile, data=data,
                   out=out, compare=compare, train_dir=train_dir, export_dir=export_dir, eval_images=eval_images or None,
                   threads=threads, workers=workers, crops=list(crop_modes) or None, progress=not as_json), picked),
         as_json, render_table)


def _bench_folders(models, train_dir, export_dir):
    """bench without MODELS: the newest trained runs and the newest exports, unless folders are named."""
    from common.runs import newest_runs

    picked = []
    if models:
        return train_dir or "runs/train", export_dir or "runs/export", picked
    for kind, folder in (("train", train_dir), ("export", export_dir)):
        if folder is None:
            try:
                picked.append(newest_runs(kind))
            except FileNotFoundError:
                if kind == "train":
                    raise  # exports alone can be benched; no checkpoint and no export is an error
    found = {p.kind: p.folder for p in picked}
    return (train_dir or found.get("train", "runs/train"), export_dir or found.get("export", "runs/export"), picked)


@cli.command()
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--quick", is_flag=True, help="Small data and narrow networks: the whole pipeline in about two minutes.")
@json_option
def demo(out, quick, as_json):
    """Train ResNet26 + Xception (5.9M) on the embedded set, evaluate, export, validate, bench, explain; write a report."""
    from demo import run_demo

    emit(run_demo(out=out, quick=quick, progress=not as_json), as_json,
         lambda r: f"demo finished in {r['seconds']:.0f} s; report: {r['report']['html']} (and report.md)")


def main() -> None:
    """Run the CLI; a problem the user can fix is one clear line on stderr and exit code 2, not a traceback."""
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except UserError as exc:  # anything else is a bug and keeps its traceback
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
