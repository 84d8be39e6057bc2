"""Does a compiled training step pay on this machine? Images per second of one step (forward, loss, backward,
fused AdamW) of a model, eager against ``torch.compile`` (Inductor) of model + loss (AOTAutograd compiles the
backward too), in fp32 and under bf16 autocast; the compile's one-off cost is reported beside it.

    OMP_NUM_THREADS=1 python -m cnnbench.bench.train_step resnet26 xception_medium --steps 20

One thread is how the demo trains each model (side by side, one core each); docs/RECIPES.md has the rows.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from cnnbench.common.device import cpu_flags
from cnnbench.models import create_model
from cnnbench.train.optim import make_optimizer


class _WithLoss(nn.Module):
    """Model and loss as one module, so that one compiled graph holds both (and their backward)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.loss = model, nn.CrossEntropyLoss(label_smoothing=0.1)

    def forward(self, images, labels):
        return self.loss(self.model(images).float(), labels)


def measure_step(arch: str, compiled: bool, bf16: bool, steps: int, warmup: int, size: int, batch: int) -> dict:
    """The median step's images per second after ``warmup`` steps (which hold the compile), on random data."""
    torch.manual_seed(0)
    model = create_model(arch, num_classes=16).to(memory_format=torch.channels_last).train()
    step_module = _WithLoss(model)
    run = torch.compile(step_module) if compiled else step_module
    optimizer = make_optimizer(model, "adamw", 4e-3, 0.05)
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 16, (batch,))

    def one_step() -> float:
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = run(images, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - started

    warmup_seconds = sum(one_step() for _ in range(warmup))
    median = sorted(one_step() for _ in range(steps))[steps // 2]
    return {"arch": arch, "compiled": compiled, "bf16": bf16, "size": size, "batch": batch,
            "warmup_seconds": round(warmup_seconds, 1), "median_step_seconds": round(median, 4),
            "images_per_s": round(batch / median, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("archs", nargs="+")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="Steps before timing; they hold the compile.")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--precision", action="append", choices=["fp32", "bf16"], help="Default: both.")
    args = parser.parse_args()
    rows = [measure_step(arch, compiled, precision == "bf16", args.steps, args.warmup, args.size, args.batch)
            for arch in args.archs for precision in args.precision or ["fp32", "bf16"] for compiled in (False, True)]
    print(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__,
                      "cpu_flags": sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c"))),
                      "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
