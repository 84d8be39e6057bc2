"""The default training recipe: what `cli.py train` does with every setting the user leaves unset.

One recipe for networks trained from scratch, on the embedded set and on a Caltech-256 folder alike,
chosen by measuring accuracy per CPU-minute (docs/RECIPES.md lists every recipe tried, losers
included); one for the ImageNet Xception's head fine-tune. Nothing here depends on the data being
synthetic except the stream of fresh images, which only the embedded set can offer.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Recipe:
    epochs: int
    batch_size: int
    optimizer: str               # "adamw" | "sgd" (Nesterov)
    lr_per_32: float             # peak learning rate at batch 32, scaled linearly with the batch size
    weight_decay: float          # never on BatchNorm or biases
    label_smoothing: float
    augment: str                 # data.transforms.AUGMENTATIONS
    min_scale: float             # augment "resized-crop": smallest crop as a share of the image area
    ema: Optional[float]         # decay of the validated and saved weight average; None: off
    progressive_start: Optional[float]  # first epoch's crop as a share of the final crop; None: fixed size
    stream_per_class: int        # embedded set: fresh images per class per epoch (0: the stored split)


FROM_SCRATCH = Recipe(epochs=5, batch_size=32, optimizer="adamw", lr_per_32=4e-3, weight_decay=0.05,
                      label_smoothing=0.1, augment="affine", min_scale=0.35, ema=None, progressive_start=2 / 3,
                      stream_per_class=320)
# The depthwise-separable Xceptions learn faster at half ResNet's peak (docs/RECIPES.md: at 4e-3 their
# 4-epoch run reached 25 %, at 2e-3 33 %, with ResNet26 the other way round: 47 % at 4e-3, 41 % at 2e-3).
XCEPTION_FROM_SCRATCH = dataclasses.replace(FROM_SCRATCH, lr_per_32=2e-3)
# Only the new classifier trains (the trunk and its BatchNorm statistics stay ImageNet's), so
# nothing that reshapes the trunk's inputs or its statistics: fixed size, no stream-sized epochs.
HEAD_FINETUNE = Recipe(epochs=2, batch_size=32, optimizer="adamw", lr_per_32=1e-3, weight_decay=0.0,
                       label_smoothing=0.1, augment="resized-crop", min_scale=0.35, ema=None,
                       progressive_start=None, stream_per_class=0)


# Progressive resizing never starts below this side: from 48 to 64 px it lost (the stripes are lost at
# 48), from 64 to 96 px it won (docs/RECIPES.md rows 7 and 21); so 64 px crops train at 64 throughout.
PROGRESSIVE_FLOOR = 64
# Its share of the epochs at the test crop (the rest at the start crop). ResNet26, 64 px then 96 for the
# last of 5 epochs: 47.8 % ten-crop top-1 in the demo (docs/RECIPES.md row 26); the crop grown linearly
# (64, 72, 80, 88, 96) reached 47.2 % at ~1.35x the time, and in about the same time 40.0 % (rows 21, 25).
PROGRESSIVE_FINAL_SHARE = 0.2


def recipe_for(arch: str) -> Recipe:
    if arch == "xception_pretrained":
        return HEAD_FINETUNE
    return XCEPTION_FROM_SCRATCH if arch.startswith("xception") else FROM_SCRATCH


# The starting point when the user picks the other optimiser: the ImageNet SGD recipe's 0.1 at batch
# 256 (twice that diverged here), and AdamW's usual 0.05 weight decay.
OTHER_OPTIMIZER = {"sgd": {"lr_per_32": 0.1 * 32 / 256, "weight_decay": 5e-4},
                   "adamw": {"lr_per_32": 2e-3, "weight_decay": 0.05}}


def apply_recipe(config, final_crop: int):
    """``config`` (a TrainConfig) with every unset (None) recipe field filled from the arch's recipe.

    ``final_crop`` is the test-time crop side, where progressive resizing ends.
    """
    recipe = recipe_for(config.arch)
    chosen = {f: getattr(config, f) for f in ("epochs", "batch_size", "optimizer", "label_smoothing", "augment",
                                              "min_scale", "ema")}
    filled = {f: getattr(recipe, f) if value is None else value for f, value in chosen.items()}
    if config.minutes is not None:  # train by the clock: the plan decides the steps, there are no fixed epochs
        filled["epochs"] = None
    own = recipe if filled["optimizer"] == recipe.optimizer else Recipe(**{
        **dataclasses.asdict(recipe), **OTHER_OPTIMIZER[filled["optimizer"]]})
    filled["lr"] = own.lr_per_32 * filled["batch_size"] / 32 if config.lr is None else config.lr
    filled["weight_decay"] = own.weight_decay if config.weight_decay is None else config.weight_decay
    if config.progressive_from is None:
        start = 0
        if recipe.progressive_start:
            start = max(PROGRESSIVE_FLOOR, 8 * round(final_crop * recipe.progressive_start / 8))
        filled["progressive_from"] = start if start < final_crop else 0
    if config.synth_stream is None:  # the stream replaces the full embedded set's stored training images
        filled["synth_stream"] = recipe.stream_per_class if config.data is None and not config.quick_data else 0
    return dataclasses.replace(config, **filled)


def recipe_summary(config) -> str:
    """One line naming what a run was trained with (train.json, the demo's report)."""
    length = f"{config.epochs} epochs" if config.minutes is None else f"{config.minutes:g} minutes of training"
    parts = [length, f"batch {config.batch_size}", f"{config.optimizer} lr {config.lr:g}",
             f"weight decay {config.weight_decay:g}", f"label smoothing {config.label_smoothing:g}",
             f"{config.augment} augmentation"]
    if config.ema:
        parts.append(f"EMA {config.ema:g}")
    if config.progressive_from:
        parts.append(f"progressive resizing: {config.progressive_from} px, the test crop for the last "
                     f"{PROGRESSIVE_FINAL_SHARE:.0%} of the {'epochs' if config.minutes is None else 'steps'}")
    if config.synth_stream:
        parts.append(f"{config.synth_stream} fresh images per class per epoch")
    return ", ".join(parts)
