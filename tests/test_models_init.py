"""Initialisation that keeps from-scratch training stable: every residual block starts as the identity."""
import torch

from cnnbench.models import create_model


def test_resnet_blocks_start_as_identity():
    for arch, last_bn in (("resnet18", "bn2"), ("resnet26", "bn3")):
        model = create_model(arch, num_classes=4, width_mult=0.25).eval()
        blocks = [m for m in model.modules() if hasattr(m, last_bn) and hasattr(m, "conv1")]
        assert blocks, arch
        for block in blocks:
            assert torch.count_nonzero(getattr(block, last_bn).weight) == 0
        # With zeroed residual branches, a block without downsampling returns relu(x) = x for x >= 0.
        plain = next(b for b in blocks if b.downsample is None)
        channels = plain.conv1.in_channels
        x = torch.rand(2, channels, 8, 8)
        torch.testing.assert_close(plain(x), x)


def test_xception_residual_branches_start_at_zero():
    from cnnbench.models.xception import Block

    model = create_model("xception_small", num_classes=4, width_mult=0.25).eval()
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    assert len(blocks) >= 5
    for block in blocks:
        last_bn = [m for m in block.rep if isinstance(m, torch.nn.BatchNorm2d)][-1]
        assert torch.count_nonzero(last_bn.weight) == 0
    middle = next(b for b in blocks if b.skip is None)
    x = torch.randn(2, middle.rep[1].conv1.in_channels, 8, 8)
    torch.testing.assert_close(middle(x), x)
