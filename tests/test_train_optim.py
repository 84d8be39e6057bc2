"""The optimiser: AdamW's fused step is the textbook update; no weight decay on BatchNorm and biases."""
import copy

import torch
from torch import nn

from cnnbench.train.optim import make_optimizer


def _tiny_model():
    torch.manual_seed(0)  # no bias before the BatchNorm: its gradient is rounding noise, which Adam would amplify
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def _loss(model):
    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    return nn.functional.cross_entropy(model(x), y)


def test_adamw_steps_as_the_per_tensor_reference_does():
    model, reference = _tiny_model(), _tiny_model()
    optimizer = make_optimizer(model, "adamw", lr=1e-2, weight_decay=0.05)
    assert optimizer.defaults["fused"]
    groups = [{"params": [p for p in reference.parameters() if p.ndim > 1], "weight_decay": 0.05},
              {"params": [p for p in reference.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    slow = torch.optim.AdamW(groups, lr=1e-2, foreach=False)
    for _ in range(3):
        for net, opt in ((model, optimizer), (reference, slow)):
            opt.zero_grad()
            _loss(net).backward()
            opt.step()
    for mine, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    moved = sum((a - b).abs().sum() for a, b in zip(model.parameters(), _tiny_model().parameters()))
    assert moved > 1e-2  # the comparison above compared trained weights, not two untouched copies


def test_weight_decay_skips_batchnorm_and_biases():
    model = _tiny_model()
    before = copy.deepcopy(model.state_dict())
    optimizer = make_optimizer(model, "adamw", lr=0.1, weight_decay=0.5)
    for param in model.parameters():
        param.grad = torch.zeros_like(param)  # only the decay can move a weight
    optimizer.step()
    after = model.state_dict()
    torch.testing.assert_close(after["1.weight"], before["1.weight"])  # BatchNorm scale
    torch.testing.assert_close(after["4.bias"], before["4.bias"])
    torch.testing.assert_close(after["0.weight"], before["0.weight"] * (1 - 0.1 * 0.5))
