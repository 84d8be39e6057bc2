"""Class activation maps on the PyTorch reference model.

One base class does the plumbing (forward through ``forward_features`` / ``forward_head``, one
target per image, the weighted channel sum and its ReLU); a method says two things:
``channel_weights`` (how channels are weighed) and ``logit_unit_scale`` (what puts its maps in logit
units, below), plus ``needs_gradients`` when its weights come from autograd:

- ``GradCAM`` (Selvaraju et al.): the weight of channel k is the spatial mean of
  d logit_c / d A_k, where A is the map that enters global average pooling and logit_c the RAW
  logit (before softmax) of the image's target class.
- ``ClassifierCAM`` (Zhou et al.): the weight of channel k is the classifier's W[c, k]. For a
  global-average-pool + linear head, Grad-CAM = ClassifierCAM / (h*w) exactly (Grad-CAM paper,
  section 3.1), so this is also what an exported feature map yields without autograd.

Scale: maps at the feature resolution are each method's own. ``CamResult.at_size`` puts every
member's map in "logit units" (Grad-CAM times h*w, CAM as it is) and upsamples it: the spatial mean
of the pre-ReLU map then equals the member's logit minus its bias. An ensemble's logit is the sum of its
members' logits, so its map is the sum of its members' maps in those units - members weigh in by
how much they contribute to the ensemble's decision, whatever their feature-map resolution.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.device import ieee_fp32


@dataclass
class CamResult:
    """maps: one [B, h, w] per member (a plain model has one), ReLU'd, at the feature resolution.

    logits: [B, K] float32 (the ensemble's summed logits for an ensemble); targets: [B] int64.
    """

    maps: list[Tensor]
    logits: Tensor
    targets: Tensor
    scales: list[float]  # per member: the factor that puts its map in logit units

    @property
    def map(self) -> Tensor:
        if len(self.maps) != 1:
            raise ValueError(f"an ensemble has {len(self.maps)} member maps; use at_size() to combine them")
        return self.maps[0]

    def at_size(self, size: int) -> Tensor:
        """[B, size, size]: every member's map in logit units, upsampled, summed over members."""
        return sum(upsample(m * scale, size) for m, scale in zip(self.maps, self.scales))


def upsample(maps: Tensor, size: int) -> Tensor:
    """[N, h, w] -> [N, size, size], bilinear (half-pixel centres), as Grad-CAM's usual resize."""
    if tuple(maps.shape[-2:]) == (size, size):
        return maps
    return F.interpolate(maps.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False).squeeze(1)


def weighted_channel_sum(features: Tensor, weights: Tensor) -> Tensor:
    """ReLU(sum_k weights[b, k] * features[b, k]) -> [B, h, w]; features [B, C, h, w], weights [B, C]."""
    return torch.relu(torch.einsum("bc,bchw->bhw", weights, features))


class BaseCAM:
    """Plumbing shared by the CAM methods; subclasses implement ``channel_weights`` and ``logit_unit_scale``.

    ``model`` has ``forward_features(x)`` (a [B, C, h, w] map, or a list of them for an
    Ensemble) and ``forward_head(features) -> [B, K]``. It is put in eval mode and must be fp32:
    the reference is computed in fp32 with TF32 off.
    """

    needs_gradients = False

    def __init__(self, model: nn.Module):
        for name, param in model.named_parameters():
            if param.is_floating_point() and param.dtype != torch.float32:
                raise ValueError(f"the reference CAM runs in fp32, but parameter {name} is {param.dtype}")
        self.model = model.eval()

    def channel_weights(self, features: list[Tensor], logits: Tensor, targets: Tensor) -> list[Tensor]:
        """One [B, C_m] weight tensor per member."""
        raise NotImplementedError

    def logit_unit_scale(self, features: Tensor) -> float:
        """What this method's maps are multiplied by to be in logit units (see the module docstring)."""
        raise NotImplementedError

    def __call__(self, x: Tensor, targets: Tensor | Callable[[Tensor], Tensor] | None = None) -> CamResult:
        """x: normalised float [B, 3, H, W].

        targets: [B] class indices, or a function of the [B, K] logits returning them (so a caller can
        pick targets from this very forward pass), or None for each image's predicted class.
        """
        return self.explain(self.features(x), targets)

    def features(self, x: Tensor) -> list[Tensor]:
        """The maps entering global pooling, one per member, computed once without autograd.

        ``explain`` can then be called for several target sets at the cost of the head only.
        """
        if x.dim() != 4:
            raise ValueError(f"expected a [B, 3, H, W] batch, got shape {tuple(x.shape)}")
        device = next(self.model.parameters()).device
        with ieee_fp32(), torch.no_grad():
            output = self.model.forward_features(x.to(device=device, dtype=torch.float32))
        return [f.detach() for f in (output if isinstance(output, (list, tuple)) else [output])]

    def explain(self, features: list[Tensor], targets=None) -> CamResult:
        # The head runs on leaf copies of the maps: gradients stop there, so the backbone is never
        # back-propagated through, and frozen backbones (requires_grad False) work too.
        leaves = [f.detach().requires_grad_(self.needs_gradients) for f in features]
        with ieee_fp32(), torch.set_grad_enabled(self.needs_gradients):
            logits = self.model.forward_head(leaves if is_ensemble(self.model) else leaves[0])
            targets = _resolve_targets(targets, logits)
            weights = self.channel_weights(leaves, logits, targets)
        maps = [weighted_channel_sum(f.detach(), w.detach()) for f, w in zip(leaves, weights)]
        scales = [self.logit_unit_scale(f) for f in leaves]
        return CamResult(maps=maps, logits=logits.detach().float(), targets=targets, scales=scales)


class GradCAM(BaseCAM):
    """Channel weight = spatial mean of the gradient of the target's raw logit."""

    needs_gradients = True

    def logit_unit_scale(self, features):
        # Each gradient of the GAP + linear head is W[c, k] / (h*w).
        return float(features.shape[-2] * features.shape[-1])

    def channel_weights(self, features, logits, targets):
        # Images in an eval-mode batch are independent, so the gradient of the sum of each image's
        # target logit gives every image the gradient of its own target: one backward pass.
        chosen = logits.gather(1, targets[:, None]).sum()
        grads = torch.autograd.grad(chosen, features)
        return [g.mean(dim=(2, 3)) for g in grads]


class ClassifierCAM(BaseCAM):
    """Channel weight = the classifier's weight for the target class (CAM, exact for GAP + linear heads)."""

    def logit_unit_scale(self, features):
        return 1.0

    def channel_weights(self, features, logits, targets):
        return [layer.weight.detach()[targets].to(f.dtype) for layer, f in zip(classifier_layers(self.model), features)]


def is_ensemble(model: nn.Module) -> bool:
    """models.ensemble.Ensemble and anything shaped like it (per-member features and classifiers)."""
    return hasattr(model, "classifiers")


def classifier_layers(model: nn.Module) -> list[nn.Linear]:
    """The final linear layer of each member (one for a plain model)."""
    if is_ensemble(model):
        return list(model.classifiers)
    return [model.classifier]


def _resolve_targets(targets, logits: Tensor) -> Tensor:
    if targets is None:
        return logits.detach().argmax(dim=1)
    if callable(targets):
        targets = targets(logits.detach())
    targets = torch.as_tensor(targets, dtype=torch.int64, device=logits.device).reshape(-1)
    if targets.numel() != logits.shape[0]:
        raise ValueError(f"one target per image: {targets.numel()} targets for {logits.shape[0]} images")
    num_classes = logits.shape[1]
    if targets.numel() and (targets.min() < 0 or targets.max() >= num_classes):
        raise ValueError(f"target class out of range for a {num_classes}-class model: {targets.tolist()}")
    return targets
