"""Model size and cost: parameter count and forward FLOPs (what the bench reports beside speed)."""
from __future__ import annotations

import torch
from torch import nn


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def model_flops(model: nn.Module, input_size: int | tuple[int, int]) -> int:
    """Forward FLOPs of one 3-channel image: 2 x multiply-accumulates of every Conv2d and Linear.

    Measured with forward hooks on one zero image, so whatever the forward actually runs is counted
    (ensemble members, ten crops). Biases, normalisation, activations and pooling are not counted
    (the usual convention; they are a small fraction for these networks).
    """
    height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
    macs = 0

    def count_conv(module: nn.Conv2d, inputs, output) -> None:
        nonlocal macs
        kernel_h, kernel_w = module.kernel_size
        macs += output.numel() * (module.in_channels // module.groups) * kernel_h * kernel_w

    def count_linear(module: nn.Linear, inputs, output) -> None:
        nonlocal macs
        macs += output.numel() * module.in_features

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(count_conv))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(count_linear))
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, height, width, device=device, dtype=dtype))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return 2 * macs
