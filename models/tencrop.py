"""Ten-crop inference as one module: resized image in, crop-averaged logits out (exportable to ONNX)."""
from __future__ import annotations

from torch import Tensor, nn

from cnnbench.data.crops import TEN
from cnnbench.data.spec import PreprocessSpec


class TenCropModel(nn.Module):
    """Input ``[B, 3, spec.resize, spec.resize]`` uint8 (or float holding 0..255).

    Normalises with ``spec``, cuts torchvision's ten crops (data.crops.TEN), runs ``model``
    on ``[B*10, 3, crop, crop]`` and returns the mean logit over the crops, ``[B, K]`` float32.
    With ``return_features=True`` it returns ``(logits, features)`` where features are
    ``[B, 10, C, h, w]`` (a list of those for an Ensemble), the maps CAM is computed from.
    """

    def __init__(self, model: nn.Module, spec: PreprocessSpec, return_features: bool = False):
        super().__init__()
        self.model = model
        self.spec = spec
        self.return_features = return_features

    def forward(self, x: Tensor):
        first_param = next(self.model.parameters())
        crops = TEN.cut(x, self.spec).flatten(0, 1).to(first_param.dtype)
        features = self.model.forward_features(crops)
        mean_logits = TEN.reduce(self.model.forward_head(features).float())
        if not self.return_features:
            return mean_logits
        return mean_logits, _per_image(features)


def _per_image(features):
    """[B*10, C, h, w] -> [B, 10, C, h, w], member by member for an ensemble's list."""
    if isinstance(features, (list, tuple)):
        return [_per_image(f) for f in features]
    return TEN.per_image(features)
