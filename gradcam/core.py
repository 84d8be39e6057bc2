"""Class activation maps on the PyTorch reference model: Grad-CAM and its family, at any layer.

One base class does the plumbing: ``tap`` runs the model once, keeping the map of the chosen layer
(gradcam.layers) as a leaf tensor from which the rest of the network runs with autograd (the
backbone before it never is back-propagated through); ``explain`` takes one target class per image,
the gradients of the targets' RAW logits (before softmax) at the layer, and asks the method for its
map before the ReLU. A method overrides one small function: ``channel_weights`` (channel-weight
methods; the map is sum_k w_k A_k) or ``raw_map`` (pixel-wise methods). With A the layer's map
[B, C, h, w] and G = d logit_c / d A (formulas and epsilons as in pytorch-grad-cam 1.5, which the
tests compare every method with):

- ``GradCAM`` (Selvaraju et al.): w_k = mean_ij G_kij.
- ``HiResCAM`` (Draelos & Carin): map = sum_k G_k * A_k (pixel-wise; = Grad-CAM at ``last`` for a
  global-average-pool + linear head, whose G is spatially constant).
- ``GradCAMPlusPlus`` (Chattopadhay et al.): w_k = sum_ij relu(G) a_ij,
  a = G^2 / (2 G^2 + sum_ij(A) G^3 + 1e-6), 0 where G = 0.
- ``XGradCAM`` (Fu et al.): w_k = sum_ij G A / (sum_ij A + 1e-7).
- ``LayerCAM`` (Jiang et al.): map = sum_k relu(G_k) * A_k (pixel-wise).
- ``EigenCAM`` (Muhammad & Yeasin): the projection of the centred map on its first principal
  component (no gradients, no class: the same map for every target).
- ``ClassifierCAM`` (Zhou et al.): w_k = W[c, k], the classifier's weight; ``last`` only. For a
  global-average-pool + linear head, Grad-CAM = ClassifierCAM / (h*w) exactly (Grad-CAM paper,
  section 3.1), so this is also what an exported feature map yields without autograd.

Why our own small overrides rather than pytorch-grad-cam's classes: its CAM objects run their own
forward and backward per call and min-max scale then resize each map to the input (losing the
scale an ensemble's sum needs, below), one target set per pass; its weight functions work on host
numpy copies. Ours keep the maps on the model's device in torch, one forward for several target
sets, one target per image (the crops of ten crops share their image's class), raw-logit targets.
EigenCAM does use the package's projection (``get_2d_projection``): an SVD's sign is arbitrary, and
the same routine gives the same sign.

Scale: ``CamResult.at_size`` multiplies each member's map by the method's ``logit_unit_scale`` (h*w
for gradient methods) and upsamples it. For Grad-CAM, HiResCAM and XGrad-CAM at ``last`` that is
exactly "logit units" (= ClassifierCAM: the spatial mean of the pre-ReLU map equals the member's
logit minus its bias); other methods and layers get the same h*w factor, so members' maps have
comparable magnitudes. An ensemble's logit is the sum of its members' logits, so its map is the sum
of its members' maps in those units. EigenCAM has no units: each map is divided by its maximum, so
members weigh equally.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnbench.common.device import ieee_fp32
from cnnbench.common.errors import InputError
from cnnbench.data.crops import crop_mode
from cnnbench.gradcam.layers import LAST, Layer, members, resolve_layer
from cnnbench.models.resnet import ResNet
from cnnbench.models.xception import Xception


@dataclass
class CamResult:
    """maps: one [B, h, w] per member (a plain model has one), ReLU'd, at the layer's resolution.

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


@dataclass
class Tapped:
    """One forward pass: per member the layer's map (a leaf), and the logits [B, K] computed from those
    leaves (with their autograd graph when ``with_graph``), so that each target set costs one backward
    of the network after the layer only. Gradients are cached per target set (several methods share them)."""

    layer: Layer
    activations: list[Tensor]
    logits: Tensor
    with_graph: bool
    _gradients: dict = field(default_factory=dict)

    def gradients(self, targets: Tensor) -> list[Tensor]:
        """d (sum over images of the target's raw logit) / d activations; images in an eval-mode batch are
        independent, so each image gets the gradient of its own target."""
        key = tuple(targets.tolist())
        if key not in self._gradients:
            if not self.with_graph:
                raise ValueError("these activations were tapped without gradients (a gradient-free method)")
            with ieee_fp32():
                chosen = self.logits.gather(1, targets[:, None]).sum()
                self._gradients[key] = list(torch.autograd.grad(chosen, self.activations, retain_graph=True))
        return self._gradients[key]


@dataclass
class Evidence:
    """What a method sees for one member: the layer's map A [B, C, h, w], its gradient G (None for a
    gradient-free method), the targets [B] and the member's classifier."""

    activations: Tensor
    gradients: Tensor | None
    targets: Tensor
    classifier: nn.Linear


class BaseCAM:
    """Plumbing shared by the CAM methods; a method overrides ``channel_weights`` or ``raw_map``.

    ``model`` has ``forward_features(x)`` (a [B, C, h, w] map, or a list of them for an Ensemble),
    ``forward_head(features) -> [B, K]`` and ``classifier`` (``classifiers`` for an Ensemble). It is
    put in eval mode and must be fp32: the reference is computed in fp32 with TF32 off. ``layer``: a
    name for gradcam.layers.resolve_layer (default ``last``), or a resolved Layer.
    """

    needs_gradients = True
    label = "?"  # the name people know it by, for titles and tables

    def __init__(self, model: nn.Module, layer: str | Layer = LAST):
        for name, param in model.named_parameters():
            if param.is_floating_point() and param.dtype != torch.float32:
                raise ValueError(f"the reference CAM runs in fp32, but parameter {name} is {param.dtype}")
        self.model = model.eval()
        self.layer = layer if isinstance(layer, Layer) else resolve_layer(model, layer)

    def channel_weights(self, e: Evidence) -> Tensor:
        """[B, C] channel weights (channel-weight methods)."""
        raise NotImplementedError(f"{type(self).__name__} defines neither channel_weights nor raw_map")

    def raw_map(self, e: Evidence) -> Tensor:
        """[B, h, w] map before the ReLU; by default the channel-weighted sum of the layer's maps."""
        return torch.einsum("bc,bchw->bhw", self.channel_weights(e), e.activations)

    def logit_unit_scale(self, activations: Tensor) -> float:
        """What this method's maps are multiplied by to be in logit units (see the module docstring)."""
        return float(activations.shape[-2] * activations.shape[-1])

    def __call__(self, x: Tensor, targets: Tensor | Callable[[Tensor], Tensor] | None = None) -> CamResult:
        """x: normalised float [B, 3, H, W].

        targets: [B] class indices, or a function of the [B, K] logits returning them (so a caller can
        pick targets from this very forward pass), or None for each image's predicted class.
        """
        return self.explain(self.tap(x), targets)

    def tap(self, x: Tensor) -> Tapped:
        """One forward pass keeping the layer's map; ``explain`` it for as many target sets as wanted."""
        return tap(self.model, self.layer, x, self.needs_gradients)

    def tap_features(self, features: list[Tensor]) -> Tapped:
        """A Tapped from maps entering global pooling computed elsewhere (dense ten crops): the head only."""
        return tap_features(self.model, self.layer, features, self.needs_gradients)

    def explain(self, tapped: Tapped, targets=None) -> CamResult:
        if tapped.layer.paths != self.layer.paths:
            raise ValueError(f"activations tapped at {tapped.layer.describe()}, this CAM explains {self.layer.describe()}")
        targets = _resolve_targets(targets, tapped.logits)
        gradients = tapped.gradients(targets) if self.needs_gradients else [None] * len(tapped.activations)
        maps = []
        with ieee_fp32(), torch.no_grad():
            for activations, grads, classifier in zip(tapped.activations, gradients, classifier_layers(self.model)):
                evidence = Evidence(activations.detach(), grads, targets, classifier)
                maps.append(torch.relu(self.raw_map(evidence)))
        scales = [self.logit_unit_scale(a) for a in tapped.activations]
        return CamResult(maps=maps, logits=tapped.logits.detach().float(), targets=targets, scales=scales)


class GradCAM(BaseCAM):
    """Channel weight = spatial mean of the gradient of the target's raw logit."""

    label = "Grad-CAM"

    def channel_weights(self, e):
        return e.gradients.mean(dim=(2, 3))


class HiResCAM(BaseCAM):
    """Map = sum over channels of gradient times activation, pixel by pixel."""

    label = "HiResCAM"

    def raw_map(self, e):
        return (e.gradients * e.activations).sum(dim=1)


class GradCAMPlusPlus(BaseCAM):
    """Channel weight = positive gradients weighted by the higher-order alphas of Grad-CAM++ (eq. 19)."""

    label = "Grad-CAM++"

    def channel_weights(self, e):
        g2 = e.gradients ** 2
        g3 = g2 * e.gradients
        activation_sums = e.activations.sum(dim=(2, 3), keepdim=True)
        alphas = g2 / (2 * g2 + activation_sums * g3 + 1e-6)
        alphas = torch.where(e.gradients != 0, alphas, torch.zeros_like(alphas))
        return (torch.relu(e.gradients) * alphas).sum(dim=(2, 3))


class XGradCAM(BaseCAM):
    """Channel weight = gradients averaged with the activations as weights (axiom-based Grad-CAM)."""

    label = "XGrad-CAM"

    def channel_weights(self, e):
        activation_sums = e.activations.sum(dim=(2, 3), keepdim=True)
        return (e.gradients * e.activations / (activation_sums + 1e-7)).sum(dim=(2, 3))


class LayerCAM(BaseCAM):
    """Map = sum over channels of positive gradient times activation, pixel by pixel."""

    label = "LayerCAM"

    def raw_map(self, e):
        return (torch.relu(e.gradients) * e.activations).sum(dim=1)


class EigenCAM(BaseCAM):
    """Map = the centred map projected on its first principal component (pytorch-grad-cam's projection),
    scaled to a maximum of 1; class-free."""

    label = "EigenCAM"
    needs_gradients = False

    def logit_unit_scale(self, activations):
        return 1.0

    def raw_map(self, e):
        from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

        projection = torch.from_numpy(get_2d_projection(e.activations.float().cpu().numpy())).to(e.activations.device)
        top = projection.flatten(1).amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny)
        return projection / top[:, None, None]


class ClassifierCAM(BaseCAM):
    """Channel weight = the classifier's weight for the target class (CAM, exact for GAP + linear heads)."""

    label = "CAM"
    needs_gradients = False

    def __init__(self, model: nn.Module, layer: str | Layer = LAST):
        super().__init__(model, layer)
        if not self.layer.is_last:
            raise InputError(f"CAM (classifier weights) weighs the map entering global pooling only, not {layer!r}")

    def logit_unit_scale(self, activations):
        return 1.0

    def channel_weights(self, e):
        return e.classifier.weight.detach()[e.targets].to(e.activations.dtype)


# The CLI's --method choices: name -> (class, what it costs). Every method but EigenCAM needs one
# backward pass from the logits to the layer (at ``last-1`` that backward runs through the last stage too);
# that backward is shared by every gradient method explained on the same images, layer and targets.
METHODS: dict[str, tuple[type[BaseCAM], str]] = {
    "gradcam": (GradCAM, "one backward from the logits to the layer; spatial-mean gradient weights"),
    "hirescam": (HiResCAM, "the same backward; gradient x activation per pixel (= Grad-CAM at last)"),
    "gradcam++": (GradCAMPlusPlus, "the same backward plus a few element-wise powers of the gradient"),
    "xgradcam": (XGradCAM, "the same backward; activation-weighted gradient"),
    "layercam": (LayerCAM, "the same backward; positive gradient x activation per pixel"),
    "eigencam": (EigenCAM, "no backward (no gradient), but a full SVD per crop map on the host (numpy): "
                           "0.1 s or more per crop at 256+ channels, several times a ResNet26 crop's forward "
                           "pass; class-free (same map for every class)"),
}
# The method and layer every command explains a checkpoint with unless told otherwise, per architecture family,
# chosen by the pointing table (docs/GRADCAM.md: `gradcam --errors CKPT --methods ... --layers last-1,last-2`,
# true class, ten crops, 160 test images of seven ResNet26 and four Xception-medium runs, then 800 fresh test
# images). ResNet26 points best with XGrad-CAM at last-2 (12x12 at 96 px crops): 65.7 % on average over the
# seven, HiResCAM at last-1 60.3 %; the demo's model 70.2 % on the 800 fresh images against 59.1 %.
# Xception-medium with Grad-CAM at last-1 (66.9 % at 36.9 % top-1; its last-2 trails by 9 points there);
# at last (3x3) every method sits near 50 % on either. Change them here only. Exported-graph CAM parity stays
# Grad-CAM at last (gradcam.exported.REFERENCE_*).
DEFAULT_CAMS: tuple[tuple[type[nn.Module], tuple[str, str]], ...] = (
    (ResNet, ("xgradcam", "last-2")), (Xception, ("gradcam", "last-1")))
# Another architecture, or an ensemble whose members' defaults differ (its map is one method's sum at one name).
FALLBACK_CAM = ("gradcam", "last-1")
# Dense ten crops cut their windows from ONE full-image map, the one entering global pooling; an earlier
# layer's full-image map has no windows (gradcam.dense), so dense mode's default layer is the last.
DENSE_DEFAULT_LAYER = LAST


def default_cam(model: nn.Module) -> tuple[str, str]:
    """(method, layer) used when none is named: the family default of the model (DEFAULT_CAMS), or of every
    member of an ensemble when they agree, else FALLBACK_CAM."""
    chosen = {next((cam for family, cam in DEFAULT_CAMS if isinstance(member, family)), FALLBACK_CAM)
              for member in members(model)}
    return chosen.pop() if len(chosen) == 1 else FALLBACK_CAM


def default_method(model: nn.Module) -> str:
    """The --method used when none is named (default_cam)."""
    return default_cam(model)[0]


def default_layer(model: nn.Module, crops) -> str:
    """The --layer used when none is named: the model's (default_cam), or DENSE_DEFAULT_LAYER in dense crop mode."""
    return default_cam(model)[1] if crop_mode(crops).cuts_crops else DENSE_DEFAULT_LAYER


def method_class(method: str | type[BaseCAM]) -> type[BaseCAM]:
    """A --method name (or a BaseCAM subclass, returned as is) -> its class; InputError naming the choices."""
    if isinstance(method, type) and issubclass(method, BaseCAM):
        return method
    if method not in METHODS:
        raise InputError(f"unknown CAM method {method!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[method][0]


def method_key(method: str | type[BaseCAM]) -> str:
    """The --method name of a method given by name or class; InputError naming the choices."""
    cls = method_class(method)
    for key, (known, _) in METHODS.items():
        if known is cls:
            return key
    raise InputError(f"{cls.__name__} is not one of the --method choices: {', '.join(METHODS)}")


def method_name(method: str | type[BaseCAM]) -> str:
    """The label people know a method by ('Grad-CAM++')."""
    return method_class(method).label


def tap(model: nn.Module, layer: Layer, x: Tensor, with_graph: bool = True) -> Tapped:
    """Run ``model`` on normalised float x [B, 3, H, W] once, keeping ``layer``'s map per member as a leaf.

    Before the layer the network runs without autograd; from the leaf on (a clone of it feeds the rest,
    so in-place ops downstream leave the kept map alone) with autograd when ``with_graph``.
    """
    return tap_layers(model, [layer], x, with_graph)[0]


def tap_layers(model: nn.Module, layers: list[Layer], x: Tensor, with_graph: bool = True) -> list[Tapped]:
    """``tap`` for several layers from ONE forward pass: per member the earliest of them is the leaf (no
    autograd before it), the later ones are kept inside the graph that runs from it, so each layer's
    gradient is a backward from the logits to that layer only. One Tapped per layer, in ``layers``' order."""
    if x.dim() != 4:
        raise ValueError(f"expected a [B, 3, H, W] batch, got shape {tuple(x.shape)}")
    device = next(model.parameters()).device
    x = x.to(device=device, dtype=torch.float32)
    kept_per_layer: list[list[Tensor]] = [[] for _ in layers]
    logits = []
    with ieee_fp32():
        for index, member in enumerate(members(model)):
            modules = [layer.modules(model)[index] for layer in layers]
            kept, member_logits = _tap_member(member, modules, x, with_graph, layers)
            for per_layer, tensor in zip(kept_per_layer, kept):
                per_layer.append(tensor)
            logits.append(member_logits)
    total = logits[0] if len(logits) == 1 else torch.stack(logits).sum(dim=0)  # as models.ensemble.Ensemble
    return [Tapped(layer, kept, total, with_graph) for layer, kept in zip(layers, kept_per_layer)]


def tap_features(model: nn.Module, layer: Layer, features: list[Tensor], with_graph: bool = True) -> Tapped:
    """``tap`` from the maps entering global pooling, one per member (the head runs on leaf copies)."""
    if not layer.is_last:
        raise InputError(f"these maps are the ones entering global pooling (layer 'last'), not {layer.describe()}")
    leaves = [f.detach().float().requires_grad_(with_graph) for f in features]
    with ieee_fp32(), torch.set_grad_enabled(with_graph):
        logits = [member.forward_head(leaf) for member, leaf in zip(members(model), leaves)]
    total = logits[0] if len(logits) == 1 else torch.stack(logits).sum(dim=0)
    return Tapped(layer, leaves, total, with_graph)


def _tap_member(member: nn.Module, modules: list[nn.Module | None], x: Tensor, with_graph: bool,
                layers: list[Layer]) -> tuple[list[Tensor], Tensor]:
    """One member's forward pass keeping the map of each of ``modules`` (None: the map entering global
    pooling), and its logits. The first kept map (in forward order) is a leaf; autograd runs from there."""
    kept: dict[int, list[Tensor]] = {index: [] for index in range(len(modules))}
    started = False  # whether the leaf exists, i.e. autograd runs from here on

    def keep_as(output: Tensor, positions: list[int]) -> Tensor:
        """Keep ``output`` for these positions; returns what the rest of the network runs on."""
        nonlocal started
        if not started:
            leaf = output.detach().requires_grad_(with_graph)
            started = True
            # Autograd from here on (the no_grad block restores the mode when the forward ends).
            torch.set_grad_enabled(with_graph)
            for position in positions:
                kept[position].append(leaf)
            return leaf.clone() if with_graph else leaf
        for position in positions:
            kept[position].append(output)
        return output.clone() if with_graph else output  # the clone's graph leads back to the kept map

    handles = []
    for module in dict.fromkeys(m for m in modules if m is not None):
        positions = [i for i, m in enumerate(modules) if m is module]

        def hook(_module, _inputs, output, positions=positions):
            if not isinstance(output, Tensor) or output.dim() != 4:
                raise InputError(f"layer {layers[positions[0]].describe()} gives {type(output).__name__} "
                                 f"{tuple(getattr(output, 'shape', ()))}, not a [B, C, h, w] map")
            return keep_as(output, positions)

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            features = member.forward_features(x)
            last = [i for i, m in enumerate(modules) if m is None]
            if last:
                features = keep_as(features, last)
            logits = member.forward_head(features)
    finally:
        for handle in handles:
            handle.remove()
    for position, tensors in kept.items():
        if len(tensors) != 1:
            raise InputError(f"layer {layers[position].describe()} ran {len(tensors)} times in one forward pass; its "
                             "map is ambiguous: name a module that runs once (e.g. the block containing it)")
    return [kept[i][0] for i in range(len(modules))], logits


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
