"""Model registry: architectures register themselves with a decorator, ``create_model`` builds them by name.

Each entry also records the preprocessing it is trained and evaluated with (``default_spec``).
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Callable

from torch import nn

from cnnbench.common.errors import InputError
from cnnbench.data.spec import PreprocessSpec, spec_for_crop

# Keyword arguments that say where initial weights come from rather than what the network is:
# they are not recorded in ``model.model_kwargs``, so a checkpoint rebuilds without them.
INIT_ONLY_KWARGS = frozenset({"weights"})


@dataclass(frozen=True)
class _Entry:
    builder: Callable[..., nn.Module]
    crop: int
    norm: str
    interpolation: str


_REGISTRY: dict[str, _Entry] = {}


def register_model(crop: int = 224, norm: str = "imagenet", interpolation: str = "bilinear"):
    """Decorator registering ``builder(num_classes, **kwargs) -> nn.Module`` under its function name."""

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = builder.__name__
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = _Entry(builder, crop, norm, interpolation)
        return builder

    return decorate


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build a registered architecture with a ``num_classes``-way classifier.

    Shared kwargs: ``dropout`` (before the classifier) and, except for xception_pretrained,
    ``width_mult`` (scales every channel count; tiny models for tests). xception_pretrained takes
    ``weights`` (a local ImageNet state_dict file, or None). The returned model carries ``arch``
    and ``model_kwargs`` (the kwargs that shape it), which checkpoints store to rebuild it.
    """
    entry = _entry(name)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise InputError(f"num_classes must be a positive integer, got {num_classes!r}")
    accepted = [p for p in inspect.signature(entry.builder).parameters if p != "num_classes"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise InputError(f"model {name!r} does not take {', '.join(unknown)}; it takes: {', '.join(accepted)}")
    model = entry.builder(num_classes, **kwargs)
    model.arch = name
    model.model_kwargs = {k: v for k, v in kwargs.items() if k not in INIT_ONLY_KWARGS}
    return model


def default_spec(name: str, crop: int | None = None, norm: str | None = None,
                 resize: int | None = None) -> PreprocessSpec:
    """Preprocessing the architecture is trained with: 224 crops of 256 resizes, or its pretrained
    weights' own. ``crop``/``norm`` replace only the crop side (the resize keeps the 224/256 ratio) or
    the normalisation ("imagenet" | "half"); ``resize`` replaces the resize side (e.g. one whose
    margin is a multiple of the output stride, for dense ten crops); the interpolation stays the
    architecture's."""
    entry = _entry(name)
    spec = spec_for_crop(crop or entry.crop, norm or entry.norm)
    return dataclasses.replace(spec, interpolation=entry.interpolation, resize=resize or spec.resize)
