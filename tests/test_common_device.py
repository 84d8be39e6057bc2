"""One device/precision module: device names, the IEEE-fp32 context, the default worker count."""
import pytest
import torch

from cnnbench.common.device import default_workers, ieee_fp32, resolve_device
from cnnbench.common.errors import UserError
from cnnbench.export.parity import reference_logits
from cnnbench.models import create_model


def _tf32_state():
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision"):
        return matmul.fp32_precision, cudnn.conv.fp32_precision
    return matmul.allow_tf32, cudnn.allow_tf32


def _set_tf32_state(state):
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision, cudnn.conv.fp32_precision = state
    else:
        matmul.allow_tf32, cudnn.allow_tf32 = state


@pytest.fixture
def tf32_on():
    """TF32 switched on through the API this torch offers (torch >= 2.9: fp32_precision, which
    refuses to be mixed with the legacy allow_tf32 flags afterwards)."""
    saved = _tf32_state()
    _set_tf32_state(("tf32", "tf32") if isinstance(saved[0], str) else (True, True))
    yield _tf32_state()
    _set_tf32_state(saved)


def test_ieee_fp32_switches_tf32_off_and_restores_it(tf32_on):
    with ieee_fp32():
        assert _tf32_state() in {("ieee", "ieee"), (False, False)}
    assert _tf32_state() == tf32_on


def test_the_fp32_reference_runs_after_tf32_was_set_with_the_new_api(tf32_on):
    torch.manual_seed(0)
    model = create_model("resnet18", 3, width_mult=0.0625).eval()
    logits = reference_logits(model, torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 3)
    assert _tf32_state() == tf32_on


def test_resolve_device_and_workers():
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(UserError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            resolve_device("cuda")
    assert 1 <= default_workers() <= 4
