"""The pieces of the training recipe: defaults, progressive sizes, weight EMA, the synthetic stream,
and the finder of the newest runs that commands use when given no paths."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from cnnbench.data import synth
from cnnbench.train import TrainConfig
from cnnbench.train.ema import WeightEMA
from cnnbench.train.loop import epoch_crop_sizes
from cnnbench.train.recipe import FROM_SCRATCH, HEAD_FINETUNE, XCEPTION_FROM_SCRATCH, apply_recipe


def test_unset_options_follow_the_recipe_and_set_ones_win():
    embedded = apply_recipe(TrainConfig(arch="resnet26"), final_crop=64)
    assert (embedded.epochs, embedded.optimizer, embedded.label_smoothing) == (
        FROM_SCRATCH.epochs, FROM_SCRATCH.optimizer, FROM_SCRATCH.label_smoothing)
    assert embedded.lr == FROM_SCRATCH.lr_per_32 * FROM_SCRATCH.batch_size / 32
    assert embedded.synth_stream == FROM_SCRATCH.stream_per_class
    # A Caltech-256 folder: same recipe, but there is no stream to draw from.
    caltech = apply_recipe(TrainConfig(arch="resnet26", data="/data/caltech", batch_size=64), final_crop=224)
    assert caltech.synth_stream == 0 and caltech.lr == pytest.approx(FROM_SCRATCH.lr_per_32 * 2)
    assert caltech.label_smoothing == embedded.label_smoothing and caltech.augment == embedded.augment
    chosen = apply_recipe(TrainConfig(arch="resnet26", epochs=2, lr=0.1, optimizer="sgd", synth_stream=0,
                                      label_smoothing=0.0), final_crop=64)
    assert (chosen.epochs, chosen.lr, chosen.optimizer, chosen.synth_stream, chosen.label_smoothing) == (
        2, 0.1, "sgd", 0, 0.0)
    assert chosen.weight_decay == 5e-4  # SGD's own decay, not AdamW's
    xception = apply_recipe(TrainConfig(arch="xception_medium"), final_crop=64)
    assert xception.lr == XCEPTION_FROM_SCRATCH.lr_per_32 < FROM_SCRATCH.lr_per_32  # measured: docs/RECIPES.md
    assert xception.epochs == embedded.epochs and xception.synth_stream == embedded.synth_stream
    head = apply_recipe(TrainConfig(arch="xception_pretrained", data="/data/caltech"), final_crop=299)
    assert (head.epochs, head.lr, head.progressive_from, head.synth_stream) == (
        HEAD_FINETUNE.epochs, HEAD_FINETUNE.lr_per_32, 0, 0)


def test_progressive_resizing_starts_at_two_thirds_never_below_64():
    assert apply_recipe(TrainConfig(arch="resnet26"), final_crop=96).progressive_from == 64
    assert apply_recipe(TrainConfig(arch="resnet26", data="/caltech"), final_crop=224).progressive_from == 152
    assert apply_recipe(TrainConfig(arch="resnet26"), final_crop=64).progressive_from == 0
    assert apply_recipe(TrainConfig(arch="resnet26", progressive_from=0), final_crop=224).progressive_from == 0


def test_progressive_sizes_finish_at_the_test_crop_for_the_last_fifth():
    assert epoch_crop_sizes(5, 112, 64) == [64, 64, 64, 64, 112]
    assert epoch_crop_sizes(10, 224, 152) == [152] * 8 + [224] * 2
    assert epoch_crop_sizes(2, 96, 64) == [64, 96]  # at least one epoch at the test crop
    assert epoch_crop_sizes(3, 64, None) == epoch_crop_sizes(3, 64, 0) == [64, 64, 64]
    with pytest.raises(ValueError, match="progressive"):
        epoch_crop_sizes(3, 64, 80)


def test_weight_ema_averages_weights_and_copies_counters():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = WeightEMA(model, decay=0.5)
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model[1].num_batches_tracked.fill_(7)
    ema.update(model)  # warm-up decay min(0.5, 2/11) = 2/11
    torch.testing.assert_close(ema.model[0].weight, start + 9 / 11)
    assert ema.model[1].num_batches_tracked.item() == 7
    assert not any(p.requires_grad for p in ema.model.parameters())
    restored = WeightEMA(model, decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 1 and restored.decay == 0.5
    torch.testing.assert_close(restored.model[0].weight, ema.model[0].weight)


def test_stream_draws_fresh_balanced_reproducible_images():
    to_array = np.asarray
    first = synth.SynthStream(classes=3, per_class=2, size=48, seed=0, epoch=0, transform=to_array)
    again = synth.SynthStream(classes=3, per_class=2, size=48, seed=0, epoch=0, transform=to_array)
    later = synth.SynthStream(classes=3, per_class=2, size=48, seed=0, epoch=1, transform=to_array)
    assert len(first) == 6 and [first[i][1] for i in range(6)] == [0, 1, 2, 0, 1, 2]
    assert all(np.array_equal(first[i][0], again[i][0]) for i in range(6))
    assert not any(np.array_equal(first[i][0], later[i][0]) for i in range(6))
    image, label, index = first[4]
    assert image.shape == (48, 48, 3) and image.dtype == np.uint8 and (label, index) == (1, 4)


def test_stream_never_repeats_a_stored_image(tmp_path):
    root = synth.synthesize(tmp_path / "set", classes=2, per_class=3, size=48, progress=False)
    stored = [to_bytes(p) for p in sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".jpg"))]
    stream = synth.SynthStream(classes=2, per_class=3, size=48, seed=0, epoch=0, transform=lambda im: im.tobytes())
    streamed = [stream[i][0] for i in range(len(stream))]
    assert not set(streamed) & set(stored)


def to_bytes(path) -> bytes:
    return Image.open(path).convert("RGB").tobytes()
