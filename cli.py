"""cnnbench: train → export → verify → benchmark → explain CNN image classifiers.

    python cli.py demo                 the whole pipeline on the embedded data set
    python cli.py train resnet26       train (or fine-tune) one architecture
    python cli.py eval CHECKPOINT      accuracy on the saved split's test part (1, 10 or dense crops)
    python cli.py export --fp16        ONNX fp32/fp16 (+ TensorRT) of every checkpoint and their ensemble
    python cli.py predict IMG...       batched 10-crop inference through any backend
    python cli.py bench --batch 64     speed, accuracy and agreement of every backend side by side
    python cli.py mlperf               MLPerf LoadGen scenarios (Offline, Server, Single/MultiStream), VALID or not
    python cli.py gradcam IMG...       what the model looked at
    python cli.py serve [MODEL...]     Triton Inference Server on 127.0.0.1 over the same Predictors

Every command takes --json: a JSON summary on stdout and nothing else there (progress goes to stderr).
"""
from __future__ import annotations

import json
import os
import sys

import click

from cnnbench.common.errors import UserError

# Decoding workers and the model share few cores: OpenMP threads that spin while waiting for a
# descheduled sibling made PyTorch up to 45x slower here (1.4 s vs 31 ms for one batch). Passive
# waiting must be chosen before torch loads OpenMP; the user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from cnnbench.data.crops import CROP_MODES, TEN_CROP_PLACES  # noqa: E402 - loads torch, so only after the OpenMP setting
from cnnbench.data.heldout import DATA_HELP  # noqa: E402
from cnnbench.gradcam.core import DENSE_DEFAULT_LAYER as DENSE_CAM_LAYER  # noqa: E402
from cnnbench.gradcam.core import DEFAULT_CAMS  # noqa: E402
from cnnbench.gradcam.core import METHODS as CAM_METHODS  # noqa: E402
from cnnbench.models.dense import CENTRE_MODES, DEFAULT_CENTRE  # noqa: E402
from cnnbench.runtime.backends import BACKEND_CHOICES, BACKENDS, FORMAT_BACKENDS  # noqa: E402


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
    from cnnbench.data.check import synth_command

    emit(synth_command(out, classes=classes, per_class=per_class, size=size, seed=seed), as_json,
         lambda r: f"wrote {r['images']} images in {r['classes']} classes to {r['root']}")


@data.command("check")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--verify", is_flag=True, help="Open every image too (slower) and list the unreadable ones.")
@json_option
def data_check(path, verify, as_json):
    """Count classes and images under PATH and say what was skipped and why."""
    from cnnbench.data.check import check_folder, render_check

    emit(check_folder(path, verify=verify), as_json, render_check)


@cli.command()
@click.argument("arch")
@click.option("--data", type=click.Path(exists=True, file_okay=False), help="Data folder (Caltech-256 or ImageFolder). Default: the embedded set.")
@click.option("--quick-data", is_flag=True, help="Use the small embedded set (tests, quick looks).")
@click.option("--epochs", type=int, help="Default: the recipe's.")
@click.option("--minutes", type=float, help="Train by the clock instead of --epochs: measure the speed in the first "
              "steps and plan the steps, warm-up, LR decay to zero and the resizing switch to end within this much "
              "training time (validation included); re-planned when the speed changes; --resume keeps the plan.")
@click.option("--batch-size", type=int, help="Default: the recipe's.")
@click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), help="AdamW, or SGD with Nesterov momentum (default: the recipe's).")
@click.option("--lr", type=float, help="Peak learning rate of the one-cycle schedule (default: the recipe's, scaled with the batch size).")
@click.option("--weight-decay", type=float, help="Never on BatchNorm or biases (default: the recipe's).")
@click.option("--dropout", type=float, help="Dropout before the classifier (default 0; with --initial-checkpoint, the checkpoint's).")
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
@click.option("--precision", "train_precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
              show_default=True, help="Training arithmetic: fp32, or bf16/fp16 autocast (fp16: CUDA only). auto: "
              "$CNNBENCH_TRAIN_PRECISION (fp32|bf16) when set, else fp16 on CUDA, bf16 on CPUs with bf16 units, fp32 elsewhere.")
@click.option("--allow-precision-change", is_flag=True, help="--resume a run in another precision than it trained in so far.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--workers", type=int, help="DataLoader worker processes (default min(4, cores)).")
@click.option("--seed", default=0, show_default=True, help="Seeds the split, the data order and the initial weights.")
@click.option("--out", default="runs/train", show_default=True, type=click.Path(file_okay=False))
@click.option("--name", help="Run folder name under --out (default: ARCH).")
@click.option("--resume", is_flag=True, help="Continue the run from its last.pt (given the options it was made with; "
              "a difference is named); ends where an uninterrupted run would.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), help="xception_pretrained: local ImageNet weights file.")
@click.option("--initial-checkpoint", type=click.Path(exists=True, dir_okay=False),
              help="Start from this trained checkpoint (same architecture and classes), e.g. to fine-tune it at a larger --image-size.")
@click.option("--width-mult", type=float, help="Scale every layer's width (tiny models for experiments; default: full width).")
@json_option
def train(arch, data, quick_data, epochs, minutes, batch_size, optimizer, lr, weight_decay, dropout, label_smoothing, augment,
          min_scale, ema, image_size, resize, progressive_from, synth_stream, norm, train_precision, allow_precision_change,
          device, workers, seed, out, name, resume, weights, initial_checkpoint, width_mult, as_json):
    """Train ARCH (resnet18, resnet26, xception_small, xception_medium, xception_pretrained).

    Unset options follow the default recipe (train/recipe.py; measured in docs/RECIPES.md); the run's
    train.json records every value used.

    Works under `torchrun --nproc_per_node N cli.py train ...` (DistributedDataParallel).
    """
    from cnnbench.train import TrainConfig, train_model

    config = TrainConfig(arch=arch, data=data, quick_data=quick_data, epochs=epochs, minutes=minutes, batch_size=batch_size,
                         optimizer=optimizer, lr=lr, weight_decay=weight_decay, dropout=dropout,
                         label_smoothing=label_smoothing, augment=augment, min_scale=min_scale, ema=ema,
                         image_size=image_size, resize=resize, progressive_from=progressive_from, synth_stream=synth_stream,
                         norm=norm, precision=train_precision, allow_precision_change=allow_precision_change,
                         device=device, workers=workers, seed=seed, out=out, name=name, resume=resume,
                         weights=weights, initial_checkpoint=initial_checkpoint, width_mult=width_mult,
                         progress=not as_json)
    result = train_model(config)
    if result:
        emit(result, as_json, lambda r: f"{r['arch']}: best val top-1 {r['best_val_top1']:.1f}% (1 crop) "
                                       f"at epoch {r['best_epoch']}, trained in {r['precision']}; checkpoint {r['best']}"
                                       + _budget_line(r.get("budget")))


def _budget_line(budget) -> str:
    """train --minutes: the plan against what was done."""
    if not budget:
        return ""
    return (f"\n{budget['done_steps']} of {budget['planned_steps']} planned steps ({budget['images']} images) in "
            f"{budget['seconds']:.0f} s of a {budget['minutes']:g}-minute budget; final LR {budget['final_lr']:.3g}")


model_source = click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True,
                            help="torch (checkpoints); onnxruntime, openvino (CPU) or tensorrt (exports). auto: torch "
                                 "for a checkpoint; for an export on the CPU the fastest backend `bench` measured "
                                 "and verified on this machine, else onnxruntime; on a GPU tensorrt, else onnxruntime.")
device_option = click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
precision_option = click.option("--precision", default="fp32", show_default=True,
                                help="torch: fp32, bf16, fp16; exports: the graph to run (fp32, fp16, int8); "
                                     "openvino also bf16 (the fp32 graph in bf16, on CPUs with bf16 units).")
crops_option = click.option("--crops", type=click.Choice(list(CROP_MODES)), default="10", show_default=True,
                            callback=lambda ctx, param, value: int(value) if value.isdigit() else value,
                            help="; ".join(f"{m.name}: {m.description}" for m in CROP_MODES.values()) + ".")
held_out_data_option = click.option("--data", type=click.Path(exists=True, file_okay=False), help=DATA_HELP)
ray_options = [
    click.option("--ray", "ray_address", is_flag=False, flag_value="auto", default=None, metavar="[auto|ADDRESS]",
                 help="Run on Ray (cluster/): CPU tasks decode, model actors (one per GPU, else CPU actors) compute. "
                      "auto (a bare --ray): the cluster in $RAY_ADDRESS, else a private Ray on this machine (files in "
                      "runs/ray); ADDRESS: a cluster's HOST:PORT or ray://HOST:10001. Write --ray=auto when a path "
                      "follows it."),
    click.option("--actors", type=int, help="--ray: model actors (default: one per GPU of the cluster; without GPUs one, "
                 "using its node's cores)."),
]


def with_ray_options(command):
    for option in reversed(ray_options):
        command = option(command)
    return command


@cli.command("eval")
@click.argument("model", type=click.Path(exists=True))
@held_out_data_option
@model_source
@device_option
@precision_option
@crops_option
@click.option("--batch", default=64, show_default=True, help="Images per batch (each is ten crops).")
@click.option("--workers", type=int, help="Decoding worker processes.")
@with_ray_options
@json_option
def evaluate(model, data, backend, device, precision, crops, batch, workers, ray_address, actors, as_json):
    """Accuracy of MODEL (checkpoint or export) on the saved split's test part: top-1, top-5, mean per-class."""
    from cnnbench import runtime
    from cnnbench.runtime.render import render_evaluation

    if ray_address is not None:
        if workers is not None:
            raise click.UsageError("--workers is local eval's; with --ray, Ray's CPU tasks decode")
        from cnnbench.cluster import evaluate_on_ray

        emit(evaluate_on_ray(model, data=data, address=ray_address, backend=backend, device=device, precision=precision,
                             crops=crops, batch=batch, actors=actors, progress=not as_json), as_json, render_evaluation)
        return
    if actors is not None:
        raise click.UsageError("--actors goes with --ray")
    emit(runtime.evaluate(model, data=data, backend=backend, device=device, precision=precision, crops=crops,
                          batch=batch, workers=workers, progress=not as_json), as_json, render_evaluation)


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--model", type=click.Path(exists=True), help="Checkpoint or export (default: the best.pt of the newest "
              "finished run in runs/train or runs/*/train).")
@model_source
@device_option
@precision_option
@crops_option
@click.option("--batch", default=64, show_default=True, help="Images per batch (each is ten crops).")
@click.option("--topk", default=5, show_default=True)
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False),
              help="Also write the predictions as CSV, row by row as each batch finishes; an existing FILE is "
                   "resumed (files it has a row for are skipped; delete it to start over).")
@click.option("--jsonl", "jsonl_path", type=click.Path(dir_okay=False),
              help="The same as JSON Lines (one result object a line); resumed like --csv.")
@click.option("--server", help="Ask a Triton server started by `serve` instead (http://HOST:PORT or grpc://HOST:PORT); "
              "the model, backend, crops and batching are then the server's.")
@click.option("--served-model", help="With --server: the served model's name (as `serve` printed it).")
@with_ray_options
@json_option
def predict(paths, model, backend, device, precision, crops, batch, topk, csv_path, jsonl_path, server, served_model,
            ray_address, actors, as_json):
    """Classify image files and folders (recursive); unreadable images are named, the rest go on.

    Lines are printed as each batch finishes. With --json and no --csv/--jsonl the summary holds every
    result; with a file it holds the counts (for big folders: memory then stays flat).
    """
    from cnnbench import runtime
    from cnnbench.common.runs import newest_runs
    from cnnbench.runtime.render import render_prediction, render_predictions

    if server or served_model:
        if not (server and served_model) or model:
            raise click.UsageError("--server and --served-model go together, without --model (the server runs the model)")
        if ray_address is not None:
            raise click.UsageError("--server or --ray: the model runs in one place")
        from cnnbench.serve import predict_over_server

        on_result = None if as_json else (lambda result: click.echo(render_prediction(result)))
        emit(predict_over_server(server, served_model, list(paths), topk=topk, csv=csv_path, jsonl=jsonl_path,
                                 on_result=on_result), as_json, render_predictions)
        return
    picked = [] if model else [newest_runs("train")]
    model = model or picked[0].newest
    on_result = None if as_json else (lambda result: click.echo(render_prediction(result)))
    if ray_address is not None:
        from cnnbench.cluster import predict_on_ray

        emit(with_picked(predict_on_ray(model, list(paths), address=ray_address, backend=backend, device=device,
                                        precision=precision, batch=batch, crops=crops, topk=topk, csv=csv_path,
                                        jsonl=jsonl_path, actors=actors, progress=not as_json, on_result=on_result),
                         picked), as_json, render_predictions)
        return
    if actors is not None:
        raise click.UsageError("--actors goes with --ray")
    emit(with_picked(runtime.predict_files(model, list(paths), backend=backend, device=device, precision=precision,
                                           batch=batch, crops=crops, topk=topk, csv=csv_path, jsonl=jsonl_path,
                                           progress=not as_json, on_result=on_result),
                     picked), as_json, render_predictions)


@cli.command()
@click.argument("images", nargs=-1, type=click.Path())
@click.option("--model", type=click.Path(exists=True), help="Checkpoint (its --method at --layer) or export made with "
              "--cam-output (its CAM = Grad-CAM at last, compared with the checkpoint's) (default: the newest best.pt of "
              "the newest runs/train or runs/*/train).")
@click.option("--class", "class_name", help="Also explain this class.")
@crops_option
@click.option("--errors", "errors_of", type=click.Path(exists=True, dir_okay=False),
              help="Instead of IMAGES: galleries of misclassified and correct test images of this checkpoint.")
@held_out_data_option
@click.option("--limit", default=16, show_default=True, help="--errors: images per gallery.")
@click.option("--images", "max_images", type=int, help="--errors: scan at most this many test images (default: all).")
@click.option("--method", type=click.Choice(list(CAM_METHODS)),
              help="CAM method of a checkpoint's maps: " + "; ".join(f"{name}: {cost}" for name, (_, cost)
                                                                      in CAM_METHODS.items())
                   + ". Default, per architecture (measured: points best, docs/GRADCAM.md): "
                   + ", ".join(f"{method} for {family.__name__}s" for family, (method, _) in DEFAULT_CAMS)
                   + ". An export's CAM and "
                   "validate's CAM parity are always gradcam at last (the one map a graph gives without gradients).")
@click.option("--layer",
              help="Layer whose map is weighed: last (the map entering global pooling: ResNet layer4, Xception's "
                   "exit; the only one an export's CAM and validate's CAM parity cover, with gradcam), last-1 (the "
                   "stage before: twice the side, ResNet layer3, Xception block8; costs a backward through the "
                   "last stage), last-2 (ResNet layer2, Xception block2), ..., or a module path (layer3, layer3.1, "
                   "block8). Dense crops: last only. "
                   "Default, per architecture: "
                   + ", ".join(f"{layer} for {family.__name__}s" for family, (_, layer) in DEFAULT_CAMS)
                   + f" ({DENSE_CAM_LAYER} with --crops dense).")
@click.option("--methods", "table_methods", help="--errors: also a pointing-game table over these methods "
              "(comma-separated, or 'all'), with a bar chart; the gradient methods share one backward per layer.")
@click.option("--layers", "table_layers", help="--errors: ... and these layers (comma-separated, e.g. last,last-1); "
              "each layer costs a forward and a backward of 1 and 10 crops per image.")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder (default runs/gradcam).")
@json_option
def gradcam(images, model, class_name, crops, errors_of, data, limit, max_images, method, layer, table_methods,
            table_layers, out, as_json):
    """CAM panels (image, heatmap, overlay) for the predicted class: Grad-CAM and its family, at any
    layer; ten-crop aware. With --errors: galleries and the pointing game (per method and layer with
    --methods/--layers)."""
    from cnnbench.gradcam import errors_gallery, gradcam_images
    from cnnbench.gradcam.render import render_errors, render_gradcam

    if errors_of:
        emit(errors_gallery(errors_of, data=data, limit=limit, crops=crops, out=out, images=max_images,
                            progress=not as_json, method=method, layer=layer, methods=table_methods,
                            layers=table_layers),
             as_json, render_errors)
    elif table_methods or table_layers:
        raise click.UsageError("--methods/--layers tabulate the pointing game of --errors CHECKPOINT")
    elif images:
        from cnnbench.common.runs import newest_runs

        picked = [] if model else [newest_runs("train")]
        model = model or picked[0].newest
        emit(with_picked(gradcam_images(list(images), model=model, class_name=class_name, crops=crops,
                                        out=out or "runs/gradcam", progress=not as_json, method=method,
                                        layer=layer), picked),
             as_json, render_gradcam)
    else:
        raise click.UsageError("give IMAGES, or --errors CHECKPOINT")


@cli.command()
@click.argument("export_dir", type=click.Path(exists=True))
@held_out_data_option
@click.option("--out", type=click.Path(file_okay=False), help="Report folder (default EXPORT/validation).")
@click.option("--limit", type=int, help="At most this many test images in the Grad-CAM comparison "
              "(the parity gates still use at least 200).")
@click.option("--backend", type=click.Choice(FORMAT_BACKENDS["onnx"]), default="onnxruntime", show_default=True,
              help="The runtime whose logits of the ONNX graphs are gated (openvino adds bf16 where the CPU has "
                   "bf16 units); the CAM comparison runs the graphs in onnxruntime.")
@json_option
def validate(export_dir, data, out, limit, backend, as_json):
    """Parity gates and CAM agreement of an export against its PyTorch reference, with panels."""
    from cnnbench.gradcam import validate_export
    from cnnbench.gradcam.render import render_validation

    emit(validate_export(export_dir, data=data, out=out, limit=limit, backend=backend, progress=not as_json), as_json,
         render_validation)


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
@click.option("--triton", is_flag=True, help="Also a Triton model repository in OUT/triton (config.pbtxt, labels, "
              "version folder per graph) for a full Triton server.")
@held_out_data_option
@click.option("--parity-images", default=200, show_default=True,
              help="Held-out images each graph is checked on (at most; spread over the classes).")
@click.option("--out", default="runs/export", show_default=True, type=click.Path(file_okay=False))
@click.option("--train-dir", help="Where to find checkpoints when none is named (default: the newest runs/train or runs/*/train).")
@json_option
def export(checkpoints, fp16, ensemble, ten_crop, ten_crop_in_graph, dense_centre, cam_output, int8, tensorrt, max_batch, triton,
           data, parity_images, out, train_dir, as_json):
    """Export CHECKPOINTS (default: every runs/train/*/best.pt, plus their ensemble) and verify each against PyTorch.

    A failed parity gate exits non-zero and names the gate and the tolerance that would have been needed.
    """
    from cnnbench.common.runs import newest_runs
    from cnnbench.export import export_checkpoints
    from cnnbench.export.render import render_export

    if ten_crop_in_graph and ten_crop not in (None, "graph"):
        raise click.UsageError(f"--ten-crop-in-graph means --ten-crop graph; it contradicts --ten-crop {ten_crop}")
    ten_crop = "graph" if ten_crop_in_graph else (ten_crop or "host")
    picked = [newest_runs("train")] if not checkpoints and train_dir is None else []
    # The newest finished runs' group, not every best.pt in their folder (unfinished or unrelated runs).
    checkpoints = list(checkpoints) or (picked[0].paths if picked else None)
    result = export_checkpoints(checkpoints, fp16=fp16, ensemble=ensemble, ten_crop=ten_crop,
                                dense_centre=dense_centre, cam_output=cam_output, int8=int8, tensorrt=tensorrt,
                                max_batch=max_batch, data=data, parity_images=parity_images, out=out,
                                train_dir=train_dir, progress=not as_json)
    if triton and result["ok"]:  # only exports that passed their parity gates are deployed
        from cnnbench.serve.repository import REPOSITORY_NAME, write_triton_repository
        from cnnbench.serve.render import render_repository

        result["triton"] = write_triton_repository([m["export_dir"] for m in result["exports"]],
                                                   os.path.join(out, REPOSITORY_NAME), max_batch=max_batch)
        emit(with_picked(result, picked), as_json, lambda r: render_export(r) + "\n" + render_repository(r["triton"]))
        return
    emit(with_picked(result, picked), as_json, render_export)


@cli.command()
@click.argument("models", nargs=-1, type=click.Path(exists=True))
@click.option("--batch", default=64, show_default=True, help="Images per batch; each image is ten crops.")
@click.option("--backend", "backends", multiple=True, type=click.Choice(BACKENDS),
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
@click.option("--server", help="Load-test a `serve` server on this machine instead (http://127.0.0.1:PORT or grpc://...) "
              "with Triton's perf_analyzer; MODEL: the export it serves, timed in-process beside it; --batch: images "
              "per request; --seconds: each measurement window.")
@click.option("--served-model", help="--server: the served model's name (default: the name `serve` gives MODEL).")
@click.option("--concurrency", default="1:8", show_default=True, help="--server: requests in flight, START:END[:STEP].")
@click.option("--trials", default=4, show_default=True, help="--server: most measurement windows per concurrency.")
@click.option("--scenario", "scenarios", multiple=True,
              help="MLPerf LoadGen scenario instead of the closed loop: offline, server, singlestream or multistream; "
                   "repeatable. Runs `mlperf` (performance and accuracy mode) with this command's --backend, "
                   "--precision, --crops, --device, --batch (default 8 here), --seconds, --threads, --data and --out "
                   "(its folder); `mlperf` has the LoadGen options.")
@json_option
def bench(models, batch, backends, precisions, device, mode, seconds, iters, warmup, use_compile, crop_modes, data, out,
          compare,
          eval_images, threads, workers, train_dir, export_dir, server, served_model, concurrency, trials, scenarios,
          as_json):
    """Speed, accuracy and agreement of every backend and precision, side by side (MODELS: default all)."""
    from cnnbench.bench import run_bench
    from cnnbench.bench.report import render_table

    if scenarios:
        _bench_scenarios(models, scenarios, batch, backends, precisions, device, seconds, crop_modes, data, out, threads,
                         train_dir, export_dir, as_json)
        return
    if server:
        from cnnbench.serve.perf import DEFAULT_WINDOW_SECONDS, bench_server
        from cnnbench.serve.render import render_server_bench

        if len(models) > 1 or len(backends) > 1 or len(precisions) > 1 or len(crop_modes) > 1:
            raise click.UsageError("--server compares one served model with one in-process run: give at most one "
                                   "MODEL, --backend, --precision and --crops")
        crops = crop_modes[0] if crop_modes else "10"
        emit(bench_server(server, models[0] if models else None, served_model=served_model, batch=batch,
                          concurrency=concurrency, window_seconds=seconds or DEFAULT_WINDOW_SECONDS, trials=trials,
                          crops=int(crops) if crops.isdigit() else crops, backend=backends[0] if backends else "auto",
                          device=device, precision=precisions[0] if precisions else "fp32", threads=threads,
                          progress=not as_json), as_json, render_server_bench)
        return

    models, train_dir, export_dir, picked = _bench_folders(models, train_dir, export_dir)
    emit(with_picked(run_bench(models or None, batch=batch, backends=list(backends) or None, precisions=list(precisions) or None,
                   device=device, mode=mode, seconds=seconds, iters=iters, warmup=warmup, compile=use_compile, data=data,
                   out=out, compare=compare, train_dir=train_dir, export_dir=export_dir, eval_images=eval_images or None,
                   threads=threads, workers=workers, crops=list(crop_modes) or None, progress=not as_json), picked),
         as_json, render_table)


# bench's closed-loop options that mean nothing under LoadGen: given with --scenario, they are an error.
_CLOSED_LOOP_ONLY = ("mode", "iters", "warmup", "use_compile", "compare", "eval_images", "workers", "server",
                     "served_model", "concurrency", "trials")


def _bench_scenarios(models, scenarios, batch, backends, precisions, device, seconds, crop_modes, data, out, threads,
                     train_dir, export_dir, as_json):
    """bench --scenario: the mlperf command's run_mlperf with bench's options (its own batch default)."""
    from click.core import ParameterSource

    from cnnbench.bench.mlperf import DEFAULT_BATCH, run_mlperf
    from cnnbench.bench.mlperf_report import render_mlperf

    context = click.get_current_context()
    given = [p.opts[0] for p in context.command.params if p.name in _CLOSED_LOOP_ONLY
             and context.get_parameter_source(p.name) is not ParameterSource.DEFAULT]
    if given:
        raise click.UsageError(f"{', '.join(given)}: closed-loop option(s), meaningless with --scenario (LoadGen's "
                               "options are the mlperf command's)")
    if context.get_parameter_source("batch") is ParameterSource.DEFAULT:
        batch = DEFAULT_BATCH
    models, train_dir, export_dir, picked = _bench_folders(models, train_dir, export_dir)
    emit(with_picked(run_mlperf(models or None, scenarios=list(scenarios), backends=list(backends) or None,
                                precisions=list(precisions) or None, crops=list(crop_modes) or None, device=device,
                                batch=batch, seconds=seconds, data=data, threads=threads, out=out,
                                train_dir=train_dir, export_dir=export_dir, progress=not as_json), picked),
         as_json, render_mlperf)


def _bench_folders(models, train_dir, export_dir):
    """(models, train_dir, export_dir, picked). bench without MODELS: the newest finished trained runs and
    exports (their groups, as models), unless folders are named."""
    from cnnbench.common.runs import newest_runs

    picked = []
    if models:
        return list(models), train_dir or "runs/train", export_dir or "runs/export", picked
    for kind, folder in (("train", train_dir), ("export", export_dir)):
        if folder is None:
            try:
                picked.append(newest_runs(kind))
            except FileNotFoundError:
                if kind == "train":
                    raise  # exports alone can be benched; no checkpoint and no export is an error
    found = {p.kind: p.folder for p in picked}
    # Named folders are benched whole (find_targets); when the finder chose both, only its groups.
    chosen = [path for p in picked for path in p.paths] if train_dir is None and export_dir is None else []
    return (chosen, train_dir or found.get("train", "runs/train"), export_dir or found.get("export", "runs/export"),
            picked)


@cli.command()
@click.argument("models", nargs=-1, type=click.Path(exists=True))
@click.option("--scenario", "scenarios", multiple=True,
              help="offline, server, singlestream or multistream; repeatable (default: all four).")
@click.option("--mode", "modes", multiple=True,
              help="performance or accuracy (LoadGen's test modes); repeatable (default: both). "
                   "Accuracy mode's top-1 is checked against eval's on the same images.")
@click.option("--backend", "backends", multiple=True, type=click.Choice(BACKENDS), help="Only these backends; repeatable.")
@click.option("--precision", "precisions", multiple=True, help="Only these precisions (fp32, bf16, fp16, int8); repeatable.")
@click.option("--crops", "crop_modes", multiple=True, type=click.Choice(list(CROP_MODES)),
              help="Crop modes; repeatable (default: 10, and an export's in-graph mode).")
@device_option
@click.option("--batch", default=8, show_default=True, help="Offline and Server: most images per model call.")
@click.option("--seconds", type=float, help="LoadGen's minimum duration of each run (default 1 s).")
@click.option("--min-queries", type=int, help="LoadGen's minimum query count of each run (default: what early "
              "stopping needs: SingleStream 64, MultiStream 662, Server 459; Offline: samples for --seconds).")
@click.option("--official", is_flag=True, help="MLPerf's own minimums (ResNet-50's mlperf.conf: 10 minutes per run).")
@click.option("--latency-ms", type=float, help="Server latency bound at p99 (default: CPU 100 ms with one crop, "
              "500 ms with ten or dense; CUDA 15 ms and 50 ms).")
@click.option("--max-wait-ms", type=float, help="Server: longest wait of a sample for its batch to fill (default 5 % of the bound).")
@click.option("--server-trials", default=8, show_default=True, help="Server: most runs of the search for the highest VALID rate.")
@held_out_data_option
@click.option("--images", type=int, help="At most this many held-out images in the QSL (default: the whole test split).")
@click.option("--threads", type=int, help="CPU threads for the model (default: all cores).")
@click.option("--out", type=click.Path(file_okay=False), help="Folder for LoadGen's logs and mlperf.json "
              "(default runs/mlperf/mlperf-<time>).")
@click.option("--train-dir", help="Checkpoints to run when no MODELS are named (default: the newest runs/train or runs/*/train).")
@click.option("--export-dir", help="Exports to run when no MODELS are named (default: the newest runs/export or runs/*/export).")
@json_option
def mlperf(models, scenarios, modes, backends, precisions, crop_modes, device, batch, seconds, min_queries, official,
           latency_ms, max_wait_ms, server_trials, data, images, threads, out, train_dir, export_dir, as_json):
    """MLPerf LoadGen's Offline, Server, SingleStream and MultiStream scenarios over bench's targets (MODELS: default all).

    Each run is VALID or INVALID by LoadGen's own rules, with the reason. The default short runs compare our
    own targets; --official takes MLPerf's minimum durations and query counts.
    """
    from cnnbench.bench.mlperf import run_mlperf
    from cnnbench.bench.mlperf_report import render_mlperf

    models, train_dir, export_dir, picked = _bench_folders(models, train_dir, export_dir)
    emit(with_picked(run_mlperf(models or None, scenarios=list(scenarios) or None, modes=list(modes) or None,
                                backends=list(backends) or None, precisions=list(precisions) or None,
                                crops=list(crop_modes) or None, device=device, batch=batch, seconds=seconds,
                                min_queries=min_queries, official=official, latency_ms=latency_ms,
                                max_wait_ms=max_wait_ms, server_trials=server_trials, data=data, images=images,
                                threads=threads, out=out, train_dir=train_dir, export_dir=export_dir,
                                progress=not as_json), picked),
         as_json, render_mlperf)


@cli.command()
@click.argument("models", nargs=-1, type=click.Path(exists=True))
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Bind address of every endpoint (another than loopback only when clients elsewhere must reach it).")
@click.option("--http-port", default=8000, show_default=True)
@click.option("--grpc-port", default=8001, show_default=True)
@click.option("--metrics-port", default=8002, show_default=True, help="Prometheus metrics.")
@model_source
@device_option
@precision_option
@crops_option
@click.option("--topk", default=5, show_default=True, help="Class names returned per image (the 'classes' output).")
@click.option("--max-batch", default=64, show_default=True, help="Largest batch of images one request or dynamic batch holds.")
@click.option("--queue-delay-us", default=2000, show_default=True,
              help="Dynamic batching: longest wait of a request for others to join its batch, in microseconds.")
@click.option("--instances", default=1, show_default=True, help="Model instances (concurrent Predictor calls) per model.")
@click.option("--log", default="runs/serve/triton.log", show_default=True, type=click.Path(dir_okay=False),
              help="Triton's own log (appended).")
@json_option
def serve(models, address, http_port, grpc_port, metrics_port, backend, device, precision, crops, topk, max_batch,
          queue_delay_us, instances, log, as_json):
    """Serve MODELS (checkpoints or exports; default: the newest exports) with Triton until SIGTERM / Ctrl-C.

    \b
    Per model NAME: NAME takes uint8 resized images (dynamic batching), NAME.encoded image files
    (decoded on the server); both answer logits and the top-k classes. Prints the endpoints once
    every model has answered a request through the server.
    """
    from cnnbench.serve import serve_models
    from cnnbench.serve.render import render_ready, render_stopped

    def announce(summary):
        click.echo(json.dumps(summary) if as_json else render_ready(summary))
        sys.stdout.flush()

    emit(serve_models(list(models) or None, address=address, http_port=http_port, grpc_port=grpc_port,
                      metrics_port=metrics_port, backend=backend, device=device, precision=precision, crops=crops,
                      topk=topk, max_batch=max_batch, queue_delay_us=queue_delay_us, instances=instances, log=log,
                      announce=announce), as_json, render_stopped)


@cli.command()
@click.option("--out", type=click.Path(file_okay=False), help="Default: runs/demo, with --quick runs/demo-quick.")
@click.option("--quick", is_flag=True, help="Small data and narrow networks: the whole pipeline in about two minutes.")
@click.option("--minutes", type=float, help="Wall-clock training budget, split between the two models (demo/pipeline.py: "
              "DEMO_TRAIN_MINUTES by default; --quick trains fixed epochs unless this is given).")
@click.option("--resnet-share", type=float, help="ResNet26's share of the training minutes; then its core passes to "
              "Xception-medium, which trains all of them (demo/pipeline.py: DEMO_RESNET_SHARE, measured in docs/RECIPES.md).")
@json_option
def demo(out, quick, minutes, resnet_share, as_json):
    """Train ResNet26 + Xception (5.9M) on the embedded set, evaluate, export, validate, bench, explain; write a report."""
    from cnnbench.demo import run_demo

    emit(run_demo(out=out, quick=quick, progress=not as_json, minutes=minutes, resnet_share=resnet_share), as_json,
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
