"""Which map a CAM weighs: layer names that mean the same thing for every architecture.

- ``last``: the map entering global average pooling (``forward_features``'s output): ResNet's
  layer4, Xception's exit (act_exit). The only layer an exported graph gives (its CAM output), so
  exported CAM parity is defined here.
- ``last-k``: the k-th stage before it. A stage is the last top-level module at each feature-map
  resolution, in the order the modules run (found by running a probe image): ResNet18/26 ``last-1``
  = layer3, ``last-2`` = layer2; Xception ``last-1`` = the last middle-flow block (block8 for
  small/medium), ``last-2`` = the second entry block. One step back doubles the map's side.
- a module path (``layer3``, ``layer3.1``, ``block8``): that module's output (``named_modules`` names).

An ensemble resolves the name in each member (its map stays the sum of its members' maps): ``last-1``
is each member's own stage before the last; a module path must exist in every member.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cnnbench.common.errors import InputError

LAST = "last"
PROBE_SIZE = 64  # probe image side for finding stages (every model here downsamples it to >= 2x2)
_RELATIVE = re.compile(r"last-([1-9][0-9]*)")


@dataclass(frozen=True)
class Layer:
    """A layer name resolved for a model: per member, the module path (None: the map entering pooling)."""

    name: str
    paths: tuple[str | None, ...]

    @property
    def is_last(self) -> bool:
        return all(path is None for path in self.paths)

    def modules(self, model: nn.Module) -> list[nn.Module | None]:
        """Per member, the module whose output is weighed (None: the map entering pooling)."""
        return [None if path is None else member.get_submodule(path) for member, path in zip(members(model), self.paths)]

    def describe(self) -> str:
        """'last', or 'last-1 (layer3)', or 'last-1 (layer3 | block8)' for an ensemble."""
        shown = " | ".join(path or LAST for path in self.paths)
        return self.name if shown == self.name else f"{self.name} ({shown})"


def members(model: nn.Module) -> list[nn.Module]:
    """An ensemble's members (models.ensemble.Ensemble), or the model itself."""
    return list(model.members) if hasattr(model, "members") and hasattr(model, "classifiers") else [model]


def resolve_layer(model: nn.Module, name: str, probe: int = PROBE_SIZE) -> Layer:
    """``name`` -> a Layer for ``model``; InputError listing the valid names when a member has no such layer."""
    if not isinstance(name, str) or not name:
        raise InputError(f"a layer name is a non-empty string, got {name!r}")
    if name == LAST:
        return Layer(name, tuple(None for _ in members(model)))
    paths = []
    for index, member in enumerate(members(model)):
        relative = _RELATIVE.fullmatch(name)
        if relative:
            stages = stage_paths(member, probe)
            back = int(relative.group(1))
            if back >= len(stages):
                raise InputError(f"layer {name!r}: {_who(model, index, member)} has only {len(stages)} stages. "
                                 f"{valid_names(member, probe)}")
            paths.append(stages[-1 - back])
        elif name in dict(member.named_modules()) and name != "":
            paths.append(name)
        else:
            raise InputError(f"unknown layer {name!r} for {_who(model, index, member)}. {valid_names(member, probe)}")
    return Layer(name, tuple(paths))


def stage_paths(member: nn.Module, probe: int = PROBE_SIZE) -> list[str]:
    """The last top-level module at each feature-map resolution, in run order (the last one feeds pooling)."""
    runs = _top_level_runs(member, probe)
    stages: list[str] = []
    for (path, side), following in zip(runs, runs[1:] + [(None, None)]):
        if following[1] != side:
            stages.append(path)
    return stages


def valid_names(member: nn.Module, probe: int = PROBE_SIZE) -> str:
    """The sentence an error gives: relative names with the module each means, and module paths."""
    stages = stage_paths(member, probe)
    relative = [LAST] + [f"last-{k} ({stages[-1 - k]})" for k in range(1, len(stages))]
    children = [path for path, _ in _top_level_runs(member, probe)]
    nested = [f"{stages[-2]}.{name}" for name, _ in member.get_submodule(stages[-2]).named_children()][:1] \
        if len(stages) > 1 else []
    example = f" (e.g. {nested[0]})" if nested else ""
    return (f"Valid layers: {', '.join(relative)}; or a module path: {', '.join(children)}, "
            f"or a submodule of one{example}")


def map_sides(model: nn.Module, layer: Layer, crop: int) -> list[int]:
    """Per member, the side of the map ``layer`` gives for one ``crop`` x ``crop`` crop."""
    sides = []
    for member, module in zip(members(model), layer.modules(model)):
        seen: list[int] = []
        handle = None if module is None else module.register_forward_hook(lambda m, i, o: seen.append(o.shape[-1]))
        try:
            out = _probe(member, crop)
        finally:
            if handle is not None:
                handle.remove()
        sides.append(int(seen[-1] if seen else out.shape[-1]))
    return sides


def _top_level_runs(member: nn.Module, probe: int) -> list[tuple[str, int]]:
    """(name, output side) of each top-level module giving a 4-D map, in the order forward_features runs them."""
    runs: list[tuple[str, int]] = []

    def record(name):
        return lambda module, inputs, output: runs.append((name, int(output.shape[-1]))) \
            if isinstance(output, Tensor) and output.dim() == 4 else None

    handles = [child.register_forward_hook(record(name)) for name, child in member.named_children()]
    try:
        _probe(member, probe)
    finally:
        for handle in handles:
            handle.remove()
    ordered: dict[str, int] = {}
    for name, side in runs:  # a module run twice keeps its last place
        ordered.pop(name, None)
        ordered[name] = side
    return list(ordered.items())


def _probe(member: nn.Module, size: int) -> Tensor:
    """forward_features of one zero image (shapes are all that is read), on the member's device, in eval mode."""
    device = next(member.parameters()).device
    was_training = member.training
    member.eval()
    try:
        with torch.no_grad():
            return member.forward_features(torch.zeros(1, 3, size, size, device=device))
    finally:
        member.train(was_training)


def _who(model: nn.Module, index: int, member: nn.Module) -> str:
    kind = type(member).__name__
    return f"ensemble member {index} ({kind})" if len(members(model)) > 1 else kind
