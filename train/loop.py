"""The training loop: one function, `train_model`, from a config to checkpoints and curves.

Reproducibility: the data order and augmentation of epoch e depend only on (seed, e), and
`last.pt` holds the optimiser and schedule state, so `--resume` ends where an uninterrupted run
would. Under `torchrun` the same loop trains with DistributedDataParallel. With `--minutes` the
run is planned from its measured speed (train/budget.py) instead of a fixed epoch count; its steps
then depend on the machine, and `last.pt` holds the plan that `--resume` goes on with.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from cnnbench.common import accuracy_report, atomic_write_json
from cnnbench.common.device import AUTOCAST_DTYPES, default_workers, resolve_device, training_precision
from cnnbench.common.errors import ExistingFileError, InputError, MissingFileError, UserError
from cnnbench.data import ImageDataset, collate_skip_bad, eval_transform, train_transform
from cnnbench.data.spec import PreprocessSpec
from cnnbench.data.folder import scan_folder
from cnnbench.data.split import load_split, make_split, save_split
from cnnbench.data import synth
from cnnbench.models import create_model, default_spec, list_models
from cnnbench.models.checkpoint import load_checkpoint, save_checkpoint
from cnnbench.train.budget import BudgetClock
from cnnbench.train.ema import WeightEMA
from cnnbench.train.history import plot_curves, write_csv
from cnnbench.train.optim import make_optimizer, recompute_lr, scheduled, warmup_cosine
from cnnbench.train.recipe import PROGRESSIVE_FINAL_SHARE, apply_recipe, recipe_summary


@dataclass
class TrainConfig:
    arch: str
    data: Optional[str] = None          # None: the embedded synthetic set
    quick_data: bool = False            # the small embedded set (tests, demo --quick)
    # None in a recipe field (epochs ... synth_stream) means "the default recipe's" (train/recipe.py).
    epochs: Optional[int] = None
    minutes: Optional[float] = None     # train by the clock: plan the steps to end within this training time (train/budget.py)
    batch_size: Optional[int] = None
    optimizer: Optional[str] = None     # "adamw" | "sgd" (Nesterov)
    lr: Optional[float] = None          # peak; None: the recipe's, scaled from the batch size
    weight_decay: Optional[float] = None
    dropout: Optional[float] = None     # None: 0, or the initial checkpoint's
    label_smoothing: Optional[float] = None
    augment: Optional[str] = None       # data.transforms.AUGMENTATIONS
    min_scale: Optional[float] = None   # augment "resized-crop": smallest crop, as a share of the image's area
    ema: Optional[float] = None         # decay of the weight average that is validated and saved; 0: off
    image_size: Optional[int] = None    # crop side; None: the data set's / model's default
    resize: Optional[int] = None        # resize side before cropping; None: crop·256/224
    progressive_from: Optional[int] = None  # first epoch's crop side, growing linearly to image_size; 0: off
    synth_stream: Optional[int] = None  # embedded set: fresh images per class per epoch; 0: the stored train split
    norm: Optional[str] = None          # "imagenet" | "half"; None: the model's default
    precision: str = "auto"             # common.device.TRAIN_PRECISIONS; "auto": common.device.training_precision
    allow_precision_change: bool = False  # --resume in another precision than the run's so far
    channels_last: bool = True
    device: str = "auto"
    workers: Optional[int] = None
    seed: int = 0
    out: str = "runs/train"
    name: Optional[str] = None
    resume: bool = False
    weights: Optional[str] = None       # xception_pretrained's ImageNet weights file
    initial_checkpoint: Optional[str] = None  # a trained checkpoint (same arch, classes) to start from
    width_mult: Optional[float] = None  # None: the architecture's own width (xception_pretrained has only that)
    progress: bool = True
    progress_row: int = 0               # terminal row of the progress bar: runs side by side each keep their own


# What makes a run (TrainConfig fields, after the recipe filled the unset ones): a run is resumed or
# reused only when all of these, its data and its preprocessing match. The device, workers, names and
# progress bars change nothing that is learned; the precision is compared with the last of its `parts`.
IDENTITY_FIELDS = ("arch", "width_mult", "epochs", "minutes", "batch_size", "optimizer", "lr", "weight_decay", "dropout",
                   "label_smoothing", "augment", "min_scale", "ema", "progressive_from", "synth_stream", "seed",
                   "initial_checkpoint", "weights")


class RunMismatchError(UserError):
    """A run folder made with other settings than the run that would continue it; names each difference."""

    def __init__(self, run_dir, differences: str, advice: str):
        super().__init__(f"{run_dir} holds a run made with other settings ({differences}): {advice}")
        self.run_dir, self.differences = str(run_dir), differences


def train_model(config: TrainConfig, on_epoch_end: Optional[Callable[[int, dict], None]] = None,
                threads: Optional[Callable[[], int]] = None) -> dict:
    """Train `config.arch`; write best.pt, last.pt, split.json, metrics.csv, curves.png, train.json.

    ``threads``, asked before every step: the intra-op threads to use from then on (runs side by side
    take over the cores of a sibling that has finished).
    """
    if config.arch not in list_models():
        raise InputError(f"unknown architecture {config.arch!r}; known: {', '.join(list_models())}")
    if (config.arch == "xception_pretrained" and not config.weights and not config.initial_checkpoint
            and not config.resume):
        raise InputError("xception_pretrained fine-tunes ImageNet weights: pass --weights PATH (a local timm "
                         "legacy_xception state_dict; nothing is downloaded) or --initial-checkpoint")
    if config.minutes is not None and config.epochs is not None:
        raise InputError("--minutes and --epochs both set the length of the run: pass one (--minutes plans the "
                         "steps from the measured speed)")
    if config.minutes is not None and not config.minutes > 0:
        raise InputError(f"--minutes must be above 0, got {config.minutes}")
    ddp = _init_distributed(config.device)
    rank0 = not ddp or dist.get_rank() == 0
    world_size = dist.get_world_size() if ddp else 1
    device = _ddp_device() if ddp else torch.device(resolve_device(config.device))
    run_dir = Path(config.out) / (config.name or config.arch)
    if rank0 and not config.resume and (run_dir / "last.pt").exists():
        raise ExistingFileError(f"{run_dir} already holds a run: pass --resume to continue it or --name for a new one")

    root, spec, config, precision = resolve_run(config, device)
    identity = run_identity(config, spec, root)
    resumed = _read_resumable(run_dir / "last.pt", identity, precision, config) if config.resume else None
    split = _load_or_make_split(root, run_dir, config, rank0, ddp)
    torch.manual_seed(config.seed)
    if config.initial_checkpoint:
        model, model_kwargs = _initial_model(config, split.classes, spec)
    else:
        model_kwargs = {"dropout": config.dropout or 0.0}
        if config.width_mult is not None:
            model_kwargs["width_mult"] = config.width_mult
        build_kwargs = dict(model_kwargs, weights=config.weights) if config.weights else model_kwargs
        model = create_model(config.arch, num_classes=len(split.classes), **build_kwargs)
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)

    train_images = _train_set_factory(config, split, root)
    val_set = ImageDataset(split.test, eval_transform(spec, crops=1))
    steps_per_epoch = -(-len(train_images(0, spec)) // (config.batch_size * world_size))
    optimizer = make_optimizer(model, config.optimizer, config.lr, config.weight_decay)
    clock = None  # --minutes: the measured plan decides the steps, the LR and each epoch's crop
    if config.minutes is not None:
        if config.progressive_from:
            _check_progressive_start(config.progressive_from, spec.crop)
        so_far = resumed["record"].get("parts", []) if resumed else []
        clock = BudgetClock(config.minutes, steps_per_epoch, config.progressive_from or 0, spec.crop,
                            validation_batches=-(-len(val_set) // (2 * config.batch_size)),
                            spent_seconds=sum(part["seconds"] for part in so_far),
                            step=resumed["extra"]["budget"]["step"] if resumed else 0,
                            state=resumed["extra"]["budget"] if resumed else None)
        scheduler = scheduled(optimizer, lambda step: clock.lr_factor(step))
    else:
        crop_sizes = epoch_crop_sizes(config.epochs, spec.crop, config.progressive_from)
        scheduler = warmup_cosine(optimizer, config.epochs * steps_per_epoch, warmup_steps=steps_per_epoch)
    ema = WeightEMA(model, config.ema) if config.ema else None
    amp_dtype = AUTOCAST_DTYPES[precision]
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    history, start_epoch, best_top1, record = [], 0, -1.0, {}
    if resumed is not None:
        history, start_epoch, best_top1, record = _restore(resumed, run_dir / "last.pt", model, optimizer, scheduler,
                                                           ema, scaler)
    evaluated = ema.model if ema else model  # what is validated and saved
    net = nn.parallel.DistributedDataParallel(model) if ddp else model

    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    workers = config.workers if config.workers is not None else default_workers()
    # Carried over from the parts before a --resume: the best epoch, the images skipped, every part's
    # precision, device and seconds.
    skipped: dict[str, str] = dict(record.get("skipped_images", []))
    parts = list(record.get("parts", []))
    record.update({
        "data": str(Path(root).resolve()), "split": str((run_dir / "split.json").resolve()),
        "config": dataclasses.asdict(config), "identity": identity, "device": str(device),
    })
    started = time.perf_counter()
    epoch = start_epoch
    while (epoch < config.epochs) if clock is None else not clock.finished():
        t0 = time.perf_counter()
        epoch_spec = _with_crop(spec, crop_sizes[epoch] if clock is None else clock.crop())
        loader = _epoch_loader(train_images(epoch, epoch_spec), config, epoch, workers, ddp, device)
        if clock is not None:
            clock.epoch_started()
        of = f"/{config.epochs}" if clock is None else f" (step {clock.step}/{clock.plan.total_steps})"
        train_loss, train_top1 = _train_epoch(
            net, loader, criterion, optimizer, scheduler, scaler, amp_dtype, device, config, skipped, ema,
            desc=f"{config.arch} epoch {epoch + 1}{of}", show=rank0 and config.progress,
            bar_row=config.progress_row, threads=threads, clock=clock, crop=epoch_spec.crop)
        row = {"epoch": epoch + 1, "lr": scheduler.get_last_lr()[0], "crop": epoch_spec.crop,
               "train_loss": train_loss, "train_top1": train_top1}
        if clock is not None:
            row["step"] = clock.step
            clock.epoch_end_begins()
        if rank0:
            row.update(_validate(evaluated, val_set, config, amp_dtype, device, criterion, workers, skipped))
            row["seconds"] = round(time.perf_counter() - t0, 2)
            history.append(row)
            if epoch == start_epoch:
                parts.append({"epochs": [epoch + 1, epoch + 1], "precision": precision, "device": str(device),
                              "seconds": 0.0})
            parts[-1]["epochs"][1] = epoch + 1
            # A budget counts every second of the loop (checkpoints and curves too): what --resume has left.
            parts[-1]["seconds"] = round(clock.part_seconds() if clock is not None
                                         else parts[-1]["seconds"] + row["seconds"], 2)
            if clock is not None:
                record["budget"] = _budget_record(clock, scheduler, config.batch_size * world_size)
            record.update(history=history, epochs_done=epoch + 1, skipped_images=sorted(skipped.items()), parts=parts)
            meta = dict(arch=config.arch, classes=split.classes, spec=spec, model_kwargs=model_kwargs)
            if row["val_top1"] > best_top1:
                best_top1 = row["val_top1"]
                record["best_epoch"] = epoch + 1
                save_checkpoint(run_dir / "best.pt", evaluated, record=record, **meta)
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "epoch": epoch + 1, "best_top1": best_top1}
            if ema:
                state["ema"] = ema.state_dict()
                state["trained_weights"] = model.state_dict()  # the checkpoint holds the average
            if scaler.is_enabled():  # fp16's loss scale: a resumed run goes on with it, not from 65536
                state["scaler"] = scaler.state_dict()
            if clock is not None:
                state["budget"] = clock.state()
            save_checkpoint(run_dir / "last.pt", evaluated, record=record, extra=state, **meta)
            write_csv(history, run_dir / "metrics.csv")
            plot_curves(history, run_dir / "curves.png", f"{config.arch} on {Path(root).name}")
            _log(f"{config.arch} epoch {epoch + 1}: train loss {train_loss:.3f} top-1 {train_top1:.1f}% | "
                 f"val loss {row['val_loss']:.3f} top-1 {row['val_top1']:.1f}% top-5 {row['val_top5']:.1f}% "
                 f"({row['seconds']:.0f}s)")
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, row)
        if ddp:
            dist.barrier()
        if clock is not None:
            plan = clock.plan
            clock.epoch_ended()
            if clock.plan is not plan and not clock.finished():
                recompute_lr(scheduler)
        epoch += 1
    if ddp:
        dist.destroy_process_group()
    if not rank0:
        return {}
    summary = {
        "arch": config.arch, "run_dir": str(run_dir), "best": str(run_dir / "best.pt"),
        "last": str(run_dir / "last.pt"), "data": record["data"], "classes": len(split.classes),
        "train_images": len(split.train), "test_images": len(split.test), "spec": spec.to_dict(),
        "params": sum(p.numel() for p in model.parameters()), "epochs": len(history),
        "best_epoch": record.get("best_epoch"), "best_val_top1": best_top1,
        "final": history[-1] if history else None,
        "seconds": round(sum(part["seconds"] for part in parts), 1),  # every part's epochs
        "seconds_this_run": round(time.perf_counter() - started, 1),
        "world_size": world_size, "recipe": recipe_summary(config), "identity": identity,
        "device": str(device), "precision": precision, "parts": parts, "skipped_images": sorted(skipped.items()),
    }
    if clock is not None:
        summary["budget"] = _budget_record(clock, scheduler, config.batch_size * world_size)
    atomic_write_json(run_dir / "train.json", summary)
    return summary


def _budget_record(clock: BudgetClock, scheduler, images_per_step: int) -> dict:
    """A --minutes run's plan and what happened (train.json, the checkpoints' record)."""
    plan = clock.plan
    return {"minutes": plan.minutes, "planned_steps": plan.total_steps, "done_steps": clock.step,
            "images": clock.step * images_per_step,
            "seconds": round(clock.spent_seconds(), 2), "final_lr": scheduler.get_last_lr()[0],
            "switch_step": plan.switch_step, "warmup_steps": plan.warmup_steps, "plan": plan.to_dict(),
            "plans": clock.plans}


def resolve_run(config: TrainConfig, device: torch.device) -> tuple[str, PreprocessSpec, TrainConfig, str]:
    """What ``config`` means on ``device``: (data root, preprocessing, the config with the recipe's
    values filled in, the training precision)."""
    root = config.data or synth.default_data_root(quick=config.quick_data)
    spec = _resolve_spec(config)
    return root, spec, apply_recipe(config, spec.crop), training_precision(config.precision, device)


def run_identity(config: TrainConfig, spec: PreprocessSpec, root: str) -> dict:
    """What made a run (IDENTITY_FIELDS, its data and preprocessing), as recorded in its checkpoints and
    train.json. The embedded sets are named by their cache folder (the generator's version and sizes),
    so a run stays resumable when the cache moves; a user's folder by its absolute path."""
    identity = {field: getattr(config, field) for field in IDENTITY_FIELDS}
    for path_field in ("initial_checkpoint", "weights"):
        if identity[path_field]:
            identity[path_field] = str(Path(identity[path_field]).resolve())
    identity["data"] = str(Path(root).resolve()) if config.data else f"embedded {Path(root).name}"
    identity["spec"] = spec.to_dict()
    return identity


def identity_differences(recorded: Optional[dict], wanted: dict) -> Optional[str]:
    """None when ``recorded`` (a run's identity) equals ``wanted``, else each difference as
    "name: recorded → wanted"."""
    if recorded is None:
        return "it records no settings (written by an older cnnbench)"
    differences = []
    for key in sorted(set(recorded) | set(wanted)):
        before, now = recorded.get(key), wanted.get(key)
        if key == "spec" and isinstance(before, dict) and isinstance(now, dict):
            differences += [f"spec.{k} {before.get(k)} → {now.get(k)}" for k in sorted(set(before) | set(now))
                            if _plain(before.get(k)) != _plain(now.get(k))]
        elif _plain(before) != _plain(now):
            differences.append(f"{key} {before} → {now}")
    return "; ".join(differences) or None


def _plain(value):
    """Tuples and lists compare alike (a checkpoint or JSON file may hold either)."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def run_precision(record: dict) -> Optional[str]:
    """The precision a run has trained in so far (its last part's), None before its first epoch."""
    parts = record.get("parts") or []
    return parts[-1]["precision"] if parts else None


def _read_resumable(path: Path, identity: dict, precision: str, config: TrainConfig) -> dict:
    """The checkpoint that --resume continues, once it is known to be the same run: same identity, and
    the same precision unless a change was allowed. RunMismatchError names what differs."""
    if not path.exists():
        raise MissingFileError(f"--resume: no {path} to continue from")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    record = checkpoint["record"]
    differences = identity_differences(record.get("identity"), identity)
    if differences:
        raise RunMismatchError(path.parent, differences, "resume it with the options it was made with, or "
                               "start a new run with --name")
    so_far = run_precision(record)
    if so_far and so_far != precision and not config.allow_precision_change:
        raise RunMismatchError(path.parent, f"trained in {so_far} so far, this run would train in {precision}",
                               f"pass --precision {so_far}, or --allow-precision-change to go on in {precision}")
    return checkpoint


def _initial_model(config: TrainConfig, classes: list[str], spec: PreprocessSpec) -> tuple[nn.Module, dict]:
    """The model of --initial-checkpoint, in training mode, and its model_kwargs: a run that goes on from
    trained weights with its own recipe, size, dropout and data (e.g. fine-tuning at the test size, FixRes)."""
    if config.weights:
        raise InputError("--initial-checkpoint and --weights both name the starting weights: pass one")
    model, meta = load_checkpoint(config.initial_checkpoint, expect_arch=config.arch)
    kwargs = dict(meta["model_kwargs"])
    width = kwargs.get("width_mult", 1.0)
    if config.width_mult is not None and width != config.width_mult:
        raise InputError(f"{config.initial_checkpoint} has width_mult {width}, not --width-mult {config.width_mult}")
    if list(meta["classes"]) != list(classes):
        raise InputError(f"{config.initial_checkpoint} was trained on {len(meta['classes'])} other classes "
                         f"({', '.join(meta['classes'][:3])}, ...) than this data's {len(classes)}")
    trained = (tuple(meta["spec"]["mean"]), tuple(meta["spec"]["std"]))
    if trained != (tuple(spec.mean), tuple(spec.std)):
        raise InputError(f"{config.initial_checkpoint} was trained with normalisation mean {trained[0]} std "
                         f"{trained[1]}, this run uses mean {tuple(spec.mean)} std {tuple(spec.std)}: pass --norm "
                         f"to match the checkpoint's")
    if config.dropout is not None and config.dropout != kwargs.get("dropout", 0.0):
        # Dropout has no weights: the same network rebuilt with the new rate takes the checkpoint's tensors.
        kwargs["dropout"] = config.dropout
        rebuilt = create_model(config.arch, num_classes=len(classes), **kwargs)
        rebuilt.load_state_dict(model.state_dict())
        model = rebuilt
    return model.train(), kwargs


def _resolve_spec(config: TrainConfig):
    """The architecture's preprocessing (models.default_spec), at --image-size (else the embedded set's
    crop side when training on it), --resize and --norm when given."""
    crop = config.image_size or (synth.embedded_crop(config.quick_data) if config.data is None else None)
    return default_spec(config.arch, crop=crop, norm=config.norm, resize=config.resize)


def epoch_crop_sizes(epochs: int, final: int, start: Optional[int]) -> list[int]:
    """Crop side of every epoch: progressive resizing trains at ``start`` and at ``final``, the test-time
    crop, for the last PROGRESSIVE_FINAL_SHARE of the epochs (at least one: FixRes, the last epochs adapt
    the network to the test size); None or 0: ``final`` throughout."""
    if not start or epochs < 2:
        return [final] * epochs
    _check_progressive_start(start, final)
    at_final = max(1, round(epochs * PROGRESSIVE_FINAL_SHARE))
    return [start] * (epochs - at_final) + [final] * at_final


def _check_progressive_start(start: int, final: int) -> None:
    if not 16 <= start <= final:
        raise InputError(f"progressive resizing must start between 16 px and the final crop ({final} px), got {start}")


def _with_crop(spec: PreprocessSpec, crop: int) -> PreprocessSpec:
    """An earlier epoch's spec under progressive resizing: ``crop``, with the final resize/crop ratio."""
    if crop == spec.crop:
        return spec
    return dataclasses.replace(spec, crop=crop, resize=round(crop * spec.resize / spec.crop))


def _train_set_factory(config: TrainConfig, split, root: str) -> Callable:
    """(epoch, spec) -> the epoch's training set: the split's training images, or the synthetic stream."""
    augment = dict(augment=config.augment, min_scale=config.min_scale)
    if not config.synth_stream:
        return lambda epoch, spec: ImageDataset(split.train, train_transform(spec, **augment))
    if config.data is not None:
        raise InputError("--synth-stream draws images of the embedded set: it cannot be used with --data")
    params = synth.QUICK_SET if config.quick_data else synth.FULL_SET
    if split.classes != synth.class_folder_names(params["classes"]):
        raise InputError(f"{root} does not hold the embedded set's classes: regenerate it (delete the folder)")
    return lambda epoch, spec: synth.SynthStream(
        params["classes"], config.synth_stream, params["size"], params["seed"] + 1_000 * config.seed, epoch,
        train_transform(spec, **augment))


def _load_or_make_split(root, run_dir: Path, config: TrainConfig, rank0: bool, ddp: bool):
    split_path = run_dir / "split.json"
    if config.resume and split_path.exists():
        return load_split(split_path)
    if rank0:
        index = scan_folder(root)
        if index.skipped:
            _log(f"{len(index.skipped)} item(s) under {root} skipped (see `python cli.py data check {root}`)")
        split = make_split(index, test_fraction=0.2, seed=config.seed)
        save_split(split, split_path)
    if ddp:
        dist.barrier()
    return load_split(split_path)


def _epoch_loader(dataset, config: TrainConfig, epoch: int, workers: int, ddp: bool, device) -> DataLoader:
    # Everything random in epoch e (order, augmentation, dropout) is seeded from (seed, e) alone.
    torch.manual_seed(config.seed * 1_000_003 + epoch)
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    sampler = None
    if ddp:
        sampler = DistributedSampler(dataset, shuffle=True, seed=config.seed)
        sampler.set_epoch(epoch)
    return DataLoader(dataset, batch_size=config.batch_size, shuffle=sampler is None, sampler=sampler,
                      generator=generator, num_workers=workers, collate_fn=collate_skip_bad,
                      pin_memory=device.type == "cuda", persistent_workers=False)


def _train_epoch(net, loader, criterion, optimizer, scheduler, scaler, amp_dtype, device, config, skipped, ema,
                 desc, show, bar_row, threads, clock: Optional[BudgetClock] = None, crop: int = 0):
    """One epoch's steps; with a budget ``clock``, it stops at the plan's last step (the last epoch is cut)."""
    net.train()
    loss_sum, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc=desc, disable=not show, file=sys.stderr, leave=False, dynamic_ncols=True, position=bar_row)
    for images, labels, _, bad in bar:
        skipped.update(bad)
        if images is None:
            continue
        wanted = threads() if threads is not None else torch.get_num_threads()
        if wanted != torch.get_num_threads():
            torch.set_num_threads(wanted)
        images = images.to(device, non_blocking=True)
        if config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = net(images)
            loss = criterion(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if ema:
            ema.update(net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net)
        loss_sum += loss.item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", top1=f"{100 * correct / seen:.1f}%")
        if clock is not None:
            plan = clock.plan
            going_on = clock.step_done(crop)
            if clock.plan is not plan and not clock.finished():  # (a plan that ends here has no step left to set)
                recompute_lr(scheduler)
            if not going_on:
                break
    totals = torch.tensor([loss_sum, correct, seen], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    loss_sum, correct, seen = totals.tolist()
    return loss_sum / max(seen, 1), 100 * correct / max(seen, 1)


@torch.no_grad()
def _validate(model, dataset, config, amp_dtype, device, criterion, workers, skipped) -> dict:
    model.eval()
    loader = DataLoader(dataset, batch_size=config.batch_size * 2, num_workers=workers, collate_fn=collate_skip_bad)
    all_logits, all_labels = [], []
    for images, labels, _, bad in loader:
        skipped.update(bad)
        if images is None:
            continue
        images = images.to(device)
        if config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            all_logits.append(model(images).float().cpu())
        all_labels.append(labels)
    model.train()
    logits, labels = torch.cat(all_logits), torch.cat(all_labels)
    report = accuracy_report(logits.numpy(), labels.numpy())
    return {"val_loss": criterion(logits, labels).item(), "val_top1": report["top1"], "val_top5": report["top5"]}


def _restore(checkpoint: dict, path: Path, model, optimizer, scheduler, ema, scaler):
    """Load a --resume checkpoint's weights and training state; returns (history, epochs done, best
    top-1, record). The record carries the best epoch, skipped images and earlier parts over."""
    state = checkpoint["extra"]
    if (ema is None) != ("ema" not in state):
        raise InputError(f"--resume: {path} was trained {'with' if 'ema' in state else 'without'} --ema; resume it the same way")
    model.load_state_dict(state["trained_weights"] if ema else checkpoint["state_dict"])
    if ema:
        ema.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler.is_enabled() and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    _log(f"resuming {path} after epoch {state['epoch']}")
    record = dict(checkpoint["record"])
    return list(record.get("history", [])), int(state["epoch"]), float(state["best_top1"]), record


def _init_distributed(device: str) -> bool:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if device != "cpu" and torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    return True


def _ddp_device() -> torch.device:
    if dist.get_backend() == "nccl":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
