"""Batched inference over image files, every file accounted for.

DataLoader workers read and decode files while the main process runs the model on the previous
batch. Two ways to get from a file to the uint8 [B,3,R,R] batch the predictor takes:

- host preprocessing (the CPU default): workers decode (data.images.load_rgb) and resize
  (data.transforms.resize_uint8), exactly the reference path;
- device preprocessing (the CUDA default): workers only decode (or, for plain JPEGs, just read
  the bytes, which nvJPEG decodes on the GPU); pinned buffers cross to the GPU with non-blocking
  copies and the antialiased resize runs there. The crops are always cut on the predictor's device.

A file that cannot be used becomes a (position, reason) failure; the rest of its batch goes on.
`FileStream` hands out each batch's results as it finishes (predict writes them out, memory stays
flat); `run_files` collects them all (evaluation and benchmarks need every logit at once).
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torchvision.transforms.functional as TF
from torchvision.io import ImageReadMode, decode_jpeg
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from cnnbench.common.errors import InputError
from cnnbench.data.images import MAX_PIXELS, ImageError, load_rgb
from cnnbench.common.device import default_workers
from cnnbench.data.spec import PreprocessSpec
from cnnbench.data.transforms import interpolation_mode, resize_uint8
from cnnbench.runtime.predictor import Predictor

PREPROCESS_MODES = ("auto", "host", "device", "device-jpeg")
_EXIF_ORIENTATION = 0x0112
_JPEG_END = b"\xff\xd9"


def resize_on_device(pixels: Tensor, spec: PreprocessSpec) -> Tensor:
    """uint8 [3,H,W] on any device -> uint8 [3,R,R]: the antialiased resize resize_uint8 does with PIL."""
    return TF.resize(pixels, [spec.resize, spec.resize], interpolation=interpolation_mode(spec), antialias=True)


@dataclass
class _Item:
    position: int
    pixels: Tensor | None = None  # host: uint8 [3,R,R]; device: uint8 [3,H,W] as decoded
    jpeg: Tensor | None = None  # device + nvJPEG: the file's bytes, decoded on the GPU
    error: str | None = None


@dataclass
class FileBatch:
    """What one DataLoader step yields. `pin_memory` is called by the DataLoader's pinning thread."""

    images: Tensor | None = None  # host preprocessing: uint8 [B,3,R,R], rows = image_positions
    image_positions: list[int] = field(default_factory=list)
    decoded: list[tuple[int, Tensor]] = field(default_factory=list)  # device preprocessing: (position, [3,H,W])
    jpegs: list[tuple[int, Tensor]] = field(default_factory=list)  # device preprocessing: (position, bytes)
    failures: list[tuple[int, str]] = field(default_factory=list)

    def pin_memory(self) -> "FileBatch":
        return FileBatch(
            images=None if self.images is None else self.images.pin_memory(),
            image_positions=self.image_positions,
            decoded=[(p, t.pin_memory()) for p, t in self.decoded],
            jpegs=[(p, t.pin_memory()) for p, t in self.jpegs],
            failures=self.failures,
        )


class FileDataset(Dataset):
    """Item i: file i decoded (and resized, for host preprocessing), or the reason it is unusable."""

    def __init__(self, paths: list[str], spec: PreprocessSpec, resize: bool, raw_jpegs: bool):
        self.paths = paths
        self.spec = spec
        self.resize = resize
        self.raw_jpegs = raw_jpegs

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int) -> _Item:
        path = self.paths[position]
        try:
            if self.raw_jpegs:
                data = _plain_jpeg_bytes(path)
                if data is not None:
                    return _Item(position, jpeg=torch.frombuffer(bytearray(data), dtype=torch.uint8))
            img = load_rgb(path)
            pixels = resize_uint8(img, self.spec) if self.resize else TF.pil_to_tensor(img)
            return _Item(position, pixels=pixels)
        except ImageError as e:
            return _Item(position, error=e.reason)
        except Exception as e:  # one unforeseen decoder failure must not end the whole run
            return _Item(position, error=f"cannot load image ({type(e).__name__}: {e})")


def _plain_jpeg_bytes(path: str) -> bytes | None:
    """The file's bytes when torchvision's decoder gives what load_rgb would (up to decoder rounding);
    None sends the file to load_rgb.

    Excluded: other formats, CMYK/other modes, EXIF rotations, oversized and truncated files (load_rgb
    then applies the rotation, or names the error).
    """
    try:
        with Image.open(path) as img:
            width, height = img.size
            if (img.format != "JPEG" or img.mode not in ("RGB", "L") or width * height > MAX_PIXELS
                    or img.getexif().get(_EXIF_ORIENTATION, 1) != 1):
                return None
        with open(path, "rb") as f:
            data = f.read()
    except Exception:
        return None
    return data if data.rstrip(b"\x00").endswith(_JPEG_END) else None


class _Collate:
    """Stacks host-resized images into one tensor; keeps device-mode images per file (sizes differ)."""

    def __init__(self, resized: bool):
        self.resized = resized

    def __call__(self, items: list[_Item]) -> FileBatch:
        batch = FileBatch(failures=[(it.position, it.error) for it in items if it.error is not None])
        usable = [it for it in items if it.pixels is not None]
        if self.resized:
            if usable:
                batch.images = torch.stack([it.pixels for it in usable])
                batch.image_positions = [it.position for it in usable]
        else:
            batch.decoded = [(it.position, it.pixels) for it in usable]
            batch.jpegs = [(it.position, it.jpeg) for it in items if it.jpeg is not None]
        return batch


@dataclass
class PipelineResult:
    logits: Tensor  # [n_ok, K] float32 on the CPU; row i belongs to paths[positions[i]]
    positions: list[int]
    failures: list[tuple[int, str]]  # (position in paths, reason), in path order
    seconds: float  # wall time of the whole run, decode to logits on the host
    preprocess: str  # the mode that ran: host | device | device-jpeg


@dataclass
class BatchResult:
    """One batch of files: what FileStream yields."""

    logits: Tensor  # [n, K] float32 on the CPU; row i belongs to paths[positions[i]]
    positions: list[int]
    failures: list[tuple[int, str]]  # (position in paths, reason)


class FileStream:
    """Crop-averaged logits of every file in ``paths``, one BatchResult per batch, in path order.

    Nothing is kept between batches, so a caller that writes each batch out runs in memory that does
    not grow with the number of files. On CUDA a batch's logits are copied to pinned host memory
    without waiting, and handed out once the next batch is queued: the GPU is never left idle
    while the host writes results.

    preprocess "auto": host on the CPU; on CUDA, device-jpeg when nvJPEG works here, else device.
    """

    def __init__(self, predictor: Predictor, paths: list[str], *, crops: int = 10, batch: int = 64,
                 workers: int | None = None, progress: bool = False, preprocess: str = "auto"):
        if preprocess not in PREPROCESS_MODES:
            raise InputError(f"preprocess must be one of {', '.join(PREPROCESS_MODES)}, got {preprocess!r}")
        if batch < 1:
            raise InputError(f"batch must be at least 1, got {batch}")
        self.on_cuda = predictor.device.startswith("cuda")
        if preprocess == "auto":
            preprocess = "host" if not self.on_cuda else ("device-jpeg" if nvjpeg_works(predictor.device) else "device")
        self.preprocess = preprocess
        self.predictor = predictor
        self.paths = list(paths)
        self.crops = crops
        self.batch = batch
        self.workers = default_workers() if workers is None else workers
        self.progress = progress

    def __iter__(self) -> Iterator[BatchResult]:
        host = self.preprocess == "host"
        dataset = FileDataset(self.paths, self.predictor.spec, resize=host, raw_jpegs=self.preprocess == "device-jpeg")
        loader = DataLoader(dataset, batch_size=self.batch, num_workers=self.workers,
                            collate_fn=_Collate(resized=host), pin_memory=self.on_cuda)
        assemble = _DeviceBatch(self.predictor.spec, self.predictor.device, self.paths)
        pending = None  # the previous batch, its logits on their way to the host
        with tqdm(total=len(dataset), unit="img", disable=not self.progress, leave=False) as bar:
            for file_batch in loader:
                failures = list(file_batch.failures)
                if host:
                    images, ready = file_batch.images, file_batch.image_positions
                else:
                    images, ready, decode_failures = assemble(file_batch)
                    failures.extend(decode_failures)
                logits = self.predictor.device_logits_from_images(images, self.crops) if ready else None
                current = _PendingBatch(logits, ready, sorted(failures), len(self.predictor.classes))
                bar.update(len(file_batch.failures) + len(file_batch.image_positions) + len(file_batch.decoded)
                           + len(file_batch.jpegs))
                if pending is not None:
                    yield pending.result()
                    pending = None
                if current.copied is None:  # already on the host: nothing to overlap
                    yield current.result()
                else:
                    pending = current
        if pending is not None:
            yield pending.result()


class _PendingBatch:
    """A batch whose device logits are being copied to the host (pinned, non-blocking on CUDA)."""

    def __init__(self, logits: Tensor | None, positions: list[int], failures: list[tuple[int, str]], classes: int):
        self.positions = positions
        self.failures = failures
        self.copied = None
        if logits is None:
            self.host = torch.empty(0, classes)
        elif logits.device.type == "cuda":
            self.device_logits = logits  # alive until the copy is done
            self.host = torch.empty(logits.shape, dtype=logits.dtype, pin_memory=True)
            self.host.copy_(logits, non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record()
        else:
            self.host = logits.cpu()

    def result(self) -> BatchResult:
        if self.copied is not None:
            self.copied.synchronize()
        return BatchResult(self.host.float(), self.positions, self.failures)


def run_files(predictor: Predictor, paths: list[str], *, crops: int = 10, batch: int = 64,
              workers: int | None = None, progress: bool = False, preprocess: str = "auto") -> PipelineResult:
    """Predict every file in `paths` (crop-averaged logits), recording the ones that cannot be used.

    Everything is kept until the end (evaluation and benchmarks need all the logits at once); to
    write results as they come, iterate a FileStream instead.
    """
    stream = FileStream(predictor, paths, crops=crops, batch=batch, workers=workers, progress=progress,
                        preprocess=preprocess)
    outputs, positions, failures = [], [], []
    start = time.perf_counter()
    for part in stream:
        outputs.append(part.logits)
        positions.extend(part.positions)
        failures.extend(part.failures)
    logits = torch.cat(outputs) if outputs else torch.empty(0, len(predictor.classes))
    seconds = time.perf_counter() - start
    return PipelineResult(logits, positions, sorted(failures), seconds, stream.preprocess)


class _DeviceBatch:
    """Decoded files of one FileBatch -> uint8 [B,3,R,R] on the device (decode JPEGs, resize there)."""

    def __init__(self, spec: PreprocessSpec, device: str, paths: list[str]):
        self.spec = spec
        self.device = device
        self.paths = paths

    def __call__(self, file_batch: FileBatch) -> tuple[Tensor | None, list[int], list[tuple[int, str]]]:
        resized: dict[int, Tensor] = {}
        failures: list[tuple[int, str]] = []
        for position, pixels in file_batch.decoded:
            resized[position] = resize_on_device(pixels.to(self.device, non_blocking=True), self.spec)
        for position, pixels in self._decoded_jpegs(file_batch.jpegs, failures):
            resized[position] = resize_on_device(pixels, self.spec)
        order = sorted(resized)
        images = torch.stack([resized[p] for p in order]) if order else None
        return images, order, failures

    def _decoded_jpegs(self, jpegs: list[tuple[int, Tensor]], failures: list):
        """(position, uint8 [3,H,W] on the device): all in one decode call, else file by file."""
        if not jpegs:
            return []
        try:
            decoded = _torchvision_decode([data for _, data in jpegs], self.device)
            return [(position, pixels) for (position, _), pixels in zip(jpegs, decoded)]
        except Exception:  # one file nvJPEG refuses fails the whole call: retry one by one
            pass
        out = []
        for position, data in jpegs:
            try:
                out.append((position, _torchvision_decode([data], self.device)[0]))
            except Exception:
                try:  # the reference decoder decides: an image, or a named error
                    out.append((position, TF.pil_to_tensor(load_rgb(self.paths[position])).to(self.device)))
                except ImageError as e:
                    failures.append((position, e.reason))
        return out


def _torchvision_decode(data: list[Tensor], device: str) -> list[Tensor]:
    with warnings.catch_warnings():
        # torchvision >= 0.29 announces that its decoders move to torchcodec; they still work, and are guarded.
        warnings.filterwarnings("ignore", message="The image decoding", category=DeprecationWarning)
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


_NVJPEG_WORKS: dict[str, bool] = {}


def nvjpeg_works(device: str) -> bool:
    """Whether torchvision can decode JPEGs on this CUDA device (its build may lack nvJPEG)."""
    if device not in _NVJPEG_WORKS:
        import io

        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 30, 60)).save(buffer, format="JPEG")
        data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
        try:
            decoded = _torchvision_decode([data], device)[0]
            _NVJPEG_WORKS[device] = tuple(decoded.shape) == (3, 16, 16)
        except Exception:
            _NVJPEG_WORKS[device] = False
    return _NVJPEG_WORKS[device]
