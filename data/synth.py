"""The embedded default data set: procedurally drawn shapes in Caltech-256's folder layout.

A class is a (shape, texture) pair. Everything else - object colours, position, area, rotation,
mirroring, background gradient, blotches, clutter lines and blobs, sensor noise - is drawn at
random for each image with the same distribution for every class, so only shape and texture
identify the class. Every image is generated from its own seed (seed, class, index), so a set is
byte-for-byte reproducible. Each image's object mask (L mode, 255 inside) is saved beside it.
"""
from __future__ import annotations

import functools
import io
import os
import shutil
import sys
import tempfile

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset
from tqdm import tqdm

from cnnbench.common.errors import ExistingFileError, InputError
from cnnbench.data.folder import MASK_SUFFIX

SYNTH_VERSION = 1  # bump when the generator changes, so cached sets are regenerated
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring",
          "crescent", "heart", "hexagon", "arrow", "semicircle", "tee")
TEXTURES = ("solid", "striped", "checkered")
FULL_SET = {"classes": 16, "per_class": 100, "size": 160, "seed": 0}
QUICK_SET = {"classes": 8, "per_class": 24, "size": 96, "seed": 0}
MIN_SIZE = 32

# Stored sets number their images below this (per_class <= 9999), the stream from here on: a streamed
# image never repeats a stored one, so the stored test split stays unseen.
STREAM_FIRST_INDEX = 10_000
JPEG_QUALITY = 92

_SUPERSAMPLE = 2  # object masks are drawn at twice the size, then averaged: anti-aliased edges
_MIN_CONTRAST = 90.0  # RGB distance between object colours and the background's colours
_RADIUS_RANGE = (0.14, 0.26)  # radius of the disc with the object's area, as a fraction of the image side
_MARGIN = 0.03  # fraction of the side kept free around the object


def class_catalogue() -> list[tuple[str, str]]:
    """(shape, texture) of every available class, in class order.

    The first 2*k classes are k shapes, each solid and striped, so small sets mix shape and texture.
    """
    two_textures = [(shape, texture) for shape in SHAPES for texture in TEXTURES[:2]]
    return two_textures + [(shape, TEXTURES[2]) for shape in SHAPES]


MAX_CLASSES = len(class_catalogue())


def class_folder_names(classes: int) -> list[str]:
    _check_params(classes, 1, MIN_SIZE)
    return [f"{i + 1:03d}.{shape}-{texture}" for i, (shape, texture) in enumerate(class_catalogue()[:classes])]


def mask_path(image_path) -> str:
    """The object-mask file that belongs to an image of the synthetic set."""
    return os.path.splitext(os.fspath(image_path))[0] + MASK_SUFFIX


def embedded_crop(quick: bool = False) -> int:
    """The crop side the embedded set is tested at: 96 (of 110 resizes); the quick set's 64 (of 73).
    The rest of the preprocessing is the architecture's (models.default_spec).

    Measured (docs/RECIPES.md): at 64 px a stride-32 network's last map is 2x2, and ResNet26's
    Grad-CAM pointed inside the object for 5.6 % of the test images; trained from 64 to 96 px
    (the recipe's progressive resizing) it points 48.8 % (3x3 maps) and classifies 47.8 % instead of
    46.6 %, for about 1.4x the training time. The quick set stays small and fast for the tests.
    """
    return 64 if quick else 96


def cache_dir() -> str:
    return os.environ.get("CNNBENCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "cnnbench")


def default_data_root(quick: bool = False, progress: bool = True) -> str:
    """The embedded set's folder, generated on first use into the cache folder.

    The folder name encodes the generator version and parameters; generation happens in a temporary
    folder that is renamed into place when complete, so an interrupted run is never reused.
    """
    params = QUICK_SET if quick else FULL_SET
    name = "synth-v{v}-{classes}c-{per_class}n-{size}px-seed{seed}".format(v=SYNTH_VERSION, **params)
    root = os.path.join(cache_dir(), name)
    if os.path.isdir(root):
        return root
    try:
        synthesize(root, progress=progress, **params)
    except FileExistsError:
        if not os.path.isdir(root):
            raise
        # Another process (e.g. a second DDP rank) finished the same set first: use it.
    return root


def synthesize(out, classes: int = 16, per_class: int = 100, size: int = 160, seed: int = 0,
               progress: bool = True) -> str:
    """Write the set to `out` (must not exist, or be empty) and return its absolute path.

    Layout: out/NNN.shape-texture/NNN_XXXX.jpg with NNN_XXXX.mask.png beside each image.
    """
    _check_params(classes, per_class, size)
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        raise ExistingFileError(f"{out} already exists and is not an empty folder")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", suffix=".partial", dir=parent)
    try:
        _generate(staging, classes, per_class, size, seed, progress)
        os.chmod(staging, 0o755)  # mkdtemp creates 0700
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _check_params(classes: int, per_class: int, size: int) -> None:
    if not 1 <= classes <= MAX_CLASSES:
        raise InputError(f"classes must be between 1 and {MAX_CLASSES}, got {classes}")
    if not 1 <= per_class <= 9999:
        raise InputError(f"per_class must be between 1 and 9999, got {per_class}")
    if size < MIN_SIZE:
        raise InputError(f"size must be at least {MIN_SIZE} pixels, got {size}")


def _publish(staging: str, out: str) -> None:
    if os.path.isdir(out):
        try:
            os.rmdir(out)  # an empty target folder is replaced
        except OSError:
            raise ExistingFileError(f"{out} was filled by another process during generation") from None
    try:
        os.rename(staging, out)
    except OSError:
        if os.path.exists(out):
            raise ExistingFileError(f"{out} was created by another process during generation") from None
        raise


def _generate(folder: str, classes: int, per_class: int, size: int, seed: int, progress: bool) -> None:
    catalogue = class_catalogue()
    with tqdm(total=classes * per_class, desc="synthesising data", unit="img", file=sys.stderr,
              disable=not progress) as bar:
        for class_index, class_name in enumerate(class_folder_names(classes)):
            class_dir = os.path.join(folder, class_name)
            os.mkdir(class_dir)
            shape, texture = catalogue[class_index]
            for image_index in range(per_class):
                rng = np.random.default_rng([seed, class_index, image_index])
                image, mask = render_image(rng, shape, texture, size)
                stem = os.path.join(class_dir, f"{class_index + 1:03d}_{image_index + 1:04d}")
                Image.fromarray(image).save(stem + ".jpg", quality=JPEG_QUALITY)
                Image.fromarray(mask).save(stem + MASK_SUFFIX)
                bar.update(1)


class SynthStream(Dataset):
    """Fresh training images from the embedded set's distribution, never the same image twice.

    Epoch ``epoch`` holds ``per_class`` images of each of the first ``classes`` classes; item i is
    class i % classes, drawn from its own seed, JPEG-coded like the stored set, then ``transform``ed.
    Items are ``(tensor, label, index)`` like ``data.ImageDataset``'s.
    """

    def __init__(self, classes: int, per_class: int, size: int, seed: int, epoch: int, transform):
        _check_params(classes, 1, size)
        self.catalogue = class_catalogue()[:classes]
        self.per_class, self.size, self.seed, self.epoch = per_class, size, seed, epoch
        self.transform = transform

    def __len__(self) -> int:
        return len(self.catalogue) * self.per_class

    def __getitem__(self, index: int):
        class_index, k = index % len(self.catalogue), index // len(self.catalogue)
        rng = np.random.default_rng([self.seed, class_index, STREAM_FIRST_INDEX + self.epoch * self.per_class + k])
        image, _ = render_image(rng, *self.catalogue[class_index], self.size)
        encoded = io.BytesIO()
        Image.fromarray(image).save(encoded, format="JPEG", quality=JPEG_QUALITY)
        return self.transform(Image.open(encoded).convert("RGB")), class_index, index


def render_image(rng: np.random.Generator, shape: str, texture: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One sample: (uint8 RGB image [size, size, 3], uint8 mask [size, size] with 255 on the object)."""
    gradient_ends = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    background = _background(rng, gradient_ends, size)
    alpha = _object_alpha(rng, shape, size)
    colours = _object_colours(rng, gradient_ends, 1 if texture == "solid" else 2)
    foreground = _texture(rng, texture, colours, size, _equivalent_diameter(alpha))
    coverage = alpha[..., None]
    image = background + (foreground - background) * coverage
    noise_sigma = np.float32(rng.uniform(2.0, 10.0))
    image += rng.standard_normal(size=image.shape, dtype=np.float32) * noise_sigma  # sensor noise
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    mask = np.where(alpha >= 0.5, 255, 0).astype(np.uint8)
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


# ---- background ---------------------------------------------------------------------------------

def _background(rng: np.random.Generator, gradient_ends: np.ndarray, size: int) -> np.ndarray:
    t = _ramp(rng, size)[..., None]
    image = gradient_ends[0] * (1.0 - t) + gradient_ends[1] * t
    image += _blotches(rng, size, amplitude=rng.uniform(0.0, 30.0))
    canvas = Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8))
    _draw_clutter(rng, canvas, size)
    return np.asarray(canvas, dtype=np.float32)


def _ramp(rng: np.random.Generator, size: int) -> np.ndarray:
    """A linear 0..1 ramp across the image in a random direction."""
    angle = rng.uniform(0.0, 2.0 * np.pi)
    ys, xs = _pixel_grid(size)
    u = xs * np.float32(np.cos(angle)) + ys * np.float32(np.sin(angle))
    return (u - u.min()) / (u.max() - u.min())


@functools.lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates as float32 (read-only, shared between images)."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    ys.flags.writeable = xs.flags.writeable = False
    return ys, xs


def _blotches(rng: np.random.Generator, size: int, amplitude: float) -> np.ndarray:
    """Smooth low-frequency colour variation: a 4x4 random field upsampled bicubically."""
    coarse = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.float32)
    return (smooth * np.float32(2.0 / 255.0) - 1.0) * np.float32(amplitude)


def _draw_clutter(rng: np.random.Generator, canvas: Image.Image, size: int) -> None:
    """Thin lines and small blobs: edges and texture that are not the object."""
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(2, 7)):
        ends = rng.uniform(0, size, size=4)
        draw.line([tuple(ends[:2]), tuple(ends[2:])], fill=_random_colour(rng), width=int(rng.integers(1, 3)))
    for _ in range(rng.integers(2, 7)):
        centre = rng.uniform(0, size, size=2)
        radii = rng.uniform(0.015, 0.05, size=2) * size
        draw.ellipse([tuple(centre - radii), tuple(centre + radii)], fill=_random_colour(rng))


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, size=3))


# ---- object -------------------------------------------------------------------------------------

def _object_colours(rng: np.random.Generator, gradient_ends: np.ndarray, count: int) -> list[np.ndarray]:
    """Random colours far from the background's gradient and from each other (visible object)."""
    colours: list[np.ndarray] = []
    for _ in range(count):
        best, best_distance = None, -1.0
        for _ in range(64):
            candidate = rng.uniform(0, 255, size=3)
            distance = min([_distance_to_segment(candidate, *gradient_ends)]
                           + [float(np.linalg.norm(candidate - c)) for c in colours])
            if distance > best_distance:
                best, best_distance = candidate, distance
            if distance >= _MIN_CONTRAST:
                break
        colours.append(best)
    return colours


def _distance_to_segment(point: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    ab = b - a
    t = float(np.clip(np.dot(point - a, ab) / max(float(np.dot(ab, ab)), 1e-9), 0.0, 1.0))
    return float(np.linalg.norm(point - (a + t * ab)))


def _object_alpha(rng: np.random.Generator, shape: str, size: int) -> np.ndarray:
    """Coverage in [0, 1] of the shape at a random area, rotation and position."""
    radius = rng.uniform(*_RADIUS_RANGE) * size * _area_normaliser(shape)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    parts = [(points @ rotation.T * radius, fill) for points, fill in _shape_parts(shape)]
    everything = np.concatenate([points for points, _ in parts])
    low, high = everything.min(axis=0), everything.max(axis=0)
    room = size * (1.0 - 2.0 * _MARGIN)
    if (high - low).max() > room:  # elongated shapes at the largest areas are shrunk to fit
        shrink = room / (high - low).max()
        parts = [(points * shrink, fill) for points, fill in parts]
        low, high = low * shrink, high * shrink
    margin = size * _MARGIN
    offset = rng.uniform(margin - low, size - margin - high)
    return _rasterise([(points + offset, fill) for points, fill in parts], size)


def _rasterise(parts: list[tuple[np.ndarray, int]], size: int) -> np.ndarray:
    big = size * _SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    for points, fill in parts:
        draw.polygon([tuple(p) for p in points * _SUPERSAMPLE], fill=fill)
    return np.asarray(canvas.resize((size, size), Image.BOX), dtype=np.float32) / np.float32(255.0)


def _equivalent_diameter(alpha: np.ndarray) -> float:
    return 2.0 * np.sqrt(max(float(alpha.sum()), 1.0) / np.pi)


def _texture(rng: np.random.Generator, texture: str, colours: list[np.ndarray], size: int,
             object_diameter: float) -> np.ndarray:
    """Full-frame [size, size, 3] fill of the object's texture (masked by the caller)."""
    if texture == "solid":
        strength = np.float32(rng.uniform(-0.12, 0.12))
        shade = 1.0 + strength * (2.0 * _ramp(rng, size) - 1.0)  # gentle lighting
        return np.clip(colours[0].astype(np.float32) * shade[..., None], 0, 255)
    angle = rng.uniform(0.0, np.pi)
    ys, xs = _pixel_grid(size)
    u = xs * np.float32(np.cos(angle)) + ys * np.float32(np.sin(angle))
    phase = rng.uniform(0.0, 1.0)
    if texture == "striped":
        period = max(6.0, rng.uniform(0.18, 0.3) * object_diameter)
        second = (np.floor(u / (period / 2.0) + phase) % 2).astype(bool)
    else:  # checkered
        cell = max(4.0, rng.uniform(0.14, 0.22) * object_diameter)
        v = ys * np.float32(np.cos(angle)) - xs * np.float32(np.sin(angle))
        second = ((np.floor(u / cell + phase) + np.floor(v / cell + phase)) % 2).astype(bool)
    return np.where(second[..., None], colours[1], colours[0]).astype(np.float32)


# ---- shapes -------------------------------------------------------------------------------------

def _regular(n: int, radius: float = 1.0, start: float = -np.pi / 2) -> np.ndarray:
    angles = start + 2.0 * np.pi * np.arange(n) / n
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _star() -> np.ndarray:
    outer, inner = _regular(5, 1.0), _regular(5, 0.42, start=-np.pi / 2 + np.pi / 5)
    return np.stack([outer, inner], axis=1).reshape(-1, 2)


def _heart() -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, 96, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y + 2.5], axis=1) / 16.0


def _semicircle() -> np.ndarray:
    angles = np.linspace(np.pi, 2.0 * np.pi, 49)
    return np.stack([np.cos(angles), np.sin(angles) + 0.42], axis=1)


def _polygon(*points: tuple[float, float]) -> np.ndarray:
    return np.array(points, dtype=np.float64)


def _shape_parts(shape: str) -> list[tuple[np.ndarray, int]]:
    """Polygons in unit coordinates around the origin; fill 255 adds area, fill 0 cuts a hole."""
    disc = _regular(96)
    if shape == "circle":
        return [(disc, 255)]
    if shape == "square":
        return [(_polygon((-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)), 255)]
    if shape == "triangle":
        return [(_regular(3) + [0.0, 0.25], 255)]
    if shape == "star":
        return [(_star(), 255)]
    if shape == "cross":
        a, b = 0.3, 1.0
        return [(_polygon((-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a),
                          (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)), 255)]
    if shape == "ring":
        return [(disc, 255), (_regular(96, 0.55), 0)]
    if shape == "crescent":
        return [(disc, 255), (_regular(96, 0.85) + [0.45, 0.0], 0)]
    if shape == "heart":
        return [(_heart(), 255)]
    if shape == "hexagon":
        return [(_regular(6), 255)]
    if shape == "arrow":
        return [(_polygon((-1.0, -0.28), (0.15, -0.28), (0.15, -0.7), (1.0, 0.0),
                          (0.15, 0.7), (0.15, 0.28), (-1.0, 0.28)), 255)]
    if shape == "semicircle":
        return [(_semicircle(), 255)]
    if shape == "tee":
        return [(_polygon((-0.9, -0.9), (0.9, -0.9), (0.9, -0.45), (0.22, -0.45),
                          (0.22, 0.9), (-0.22, 0.9), (-0.22, -0.45), (-0.9, -0.45)), 255)]
    raise ValueError(f"unknown shape {shape!r}")


@functools.lru_cache(maxsize=None)
def _area_normaliser(shape: str) -> float:
    """Scale that gives the shape the area of the unit disc, so area never tells the class."""
    side = 512
    unit = side / 4.0
    parts = [(points * unit + side / 2.0, fill) for points, fill in _shape_parts(shape)]
    canvas = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    for points, fill in parts:
        draw.polygon([tuple(p) for p in points], fill=fill)
    area = np.count_nonzero(np.asarray(canvas)) / unit ** 2
    return float(np.sqrt(np.pi / area))
