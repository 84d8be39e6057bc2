"""bench.train_step: the training step it times is a real one (the weights move, the loss is finite)."""
import torch

from cnnbench.bench import train_step


def test_a_timed_step_trains_and_reports_its_speed(monkeypatch):
    models = []
    real_create = train_step.create_model

    def keep(arch, **kwargs):
        models.append(real_create(arch, width_mult=0.25, **kwargs))
        return models[-1]

    monkeypatch.setattr(train_step, "create_model", keep)
    row = train_step.measure_step("resnet18", compiled=False, bf16=False, steps=3, warmup=1, size=32, batch=4)
    assert row["images_per_s"] > 0 and row["median_step_seconds"] > 0 and row["warmup_seconds"] > 0
    torch.manual_seed(0)
    untrained = real_create("resnet18", width_mult=0.25, num_classes=16)
    moved = [not torch.equal(a, b) for a, b in zip(models[0].parameters(), untrained.parameters())]
    assert all(moved)  # four AdamW steps changed every parameter tensor
