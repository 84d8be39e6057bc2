"""What one served model is: a Predictor behind two Triton models, and the contract clients rely on.

For each export or checkpoint two Triton models are bound:

- ``<name>`` takes uint8 resized images ``images`` [B,3,R,R] (what `predict` feeds its Predictor) and
  has Triton's dynamic batcher: requests from many clients are merged into one Predictor call.
  Triton itself rejects a wrong dtype, a wrong shape or a batch above max_batch_size per request,
  before it reaches the batcher, so nothing a client sends here can fail a batch it shares.
- ``<name>.encoded`` takes encoded image files ``image`` (Triton BYTES, one per row). Each request runs
  alone (no batcher: PyTriton answers a failed execution with one error for every request in it, so a
  bad file must not share an execution with good ones). Its rows are decoded in worker threads by the
  project's own decoder (data.images.load_rgb, with its decompression-bomb guard) and resized
  (data.transforms.resize_uint8), then sent to ``<name>`` over loopback gRPC, where they join the
  dynamic batch like any client's images (Triton's BLS pattern).

Both answer ``logits`` FP32 [K] (crop-averaged, as `predict` computes them) and ``classes`` BYTES [k]:
the top-k as "probability:index:label", best first (Triton's classification convention).
"""
from __future__ import annotations

import os
import re
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from cnnbench.common import topk_indices
from cnnbench.common.errors import InputError
from cnnbench.data.images import ImageError, load_rgb
from cnnbench.data.transforms import resize_uint8
from cnnbench.runtime.predictor import Predictor

IMAGES = "images"  # uint8 [B,3,R,R] input of the batched model
IMAGE_BYTES = "image"  # BYTES [B,1] input of the encoded-files model
LOGITS = "logits"
CLASSES = "classes"
ENCODED_SUFFIX = ".encoded"
# Where uploaded files are written for the decoder, which opens paths (RAM-backed where the system has one).
_SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") else None
_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9_.-]")


class ImageRejected(InputError):
    """An uploaded file that is not a usable image; the message is what the client shows for that file."""


@dataclass
class ServedModel:
    """One Predictor and the names and shapes it is served under."""

    name: str  # the batched model; the encoded-files model is name + ENCODED_SUFFIX
    source: str  # the checkpoint or export it was loaded from
    predictor: Predictor
    crops: int | str
    topk: int

    @property
    def encoded_name(self) -> str:
        return self.name + ENCODED_SUFFIX

    @property
    def image_shape(self) -> tuple[int, int, int]:
        side = self.predictor.spec.resize
        return (3, side, side)

    def logits(self, images: np.ndarray) -> np.ndarray:
        """uint8 [B,3,R,R] -> float32 [B,K]: the same Predictor call `predict` makes for a batch."""
        return self.predictor.logits_from_images(torch.from_numpy(np.ascontiguousarray(images)),
                                                 self.crops).numpy()

    def top_classes(self, logits: np.ndarray) -> np.ndarray:
        """[B,K] logits -> BYTES [B,k] "probability:index:label" rows, best first."""
        probs = torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()
        best = topk_indices(logits, self.topk)
        rows = [[f"{probs[r, c]:.9g}:{c}:{self.predictor.classes[c]}".encode() for c in best[r]]
                for r in range(len(logits))]
        return np.array(rows, dtype=np.object_)

    def answer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        logits = self.logits(images)
        return {LOGITS: logits, CLASSES: self.top_classes(logits)}


def triton_name(text: str) -> str:
    """A Triton model name (letters, digits, '_', '.', '-') for an export or run name."""
    return _NAME_CHARACTERS.sub("_", text)


def batched_infer(model: ServedModel):
    """The infer function of ``<name>``: every request of one dynamic batch in one Predictor call."""

    def infer(requests):
        sizes = [len(r[IMAGES]) for r in requests]
        answer = model.answer(np.concatenate([r[IMAGES] for r in requests]))
        bounds = np.cumsum([0] + sizes)
        return [{k: v[bounds[i]:bounds[i + 1]] for k, v in answer.items()} for i in range(len(requests))]

    return infer


class EncodedInfer:
    """The infer function of ``<name>.encoded``: decode a request's files, then ask ``<name>``."""

    def __init__(self, model: ServedModel, batched_url: str, decoders: ThreadPoolExecutor):
        self.model = model
        self.batched_url = batched_url
        self.decoders = decoders
        self._local = threading.local()  # one gRPC client per instance thread

    def __call__(self, requests):
        return [self._one(request) for request in requests]

    def _one(self, request) -> dict[str, np.ndarray]:
        files = [row[0] if np.ndim(row) else row for row in request[IMAGE_BYTES]]
        images = np.stack(list(self.decoders.map(self._decode, range(len(files)), files)))
        return self._forward(images)

    def _decode(self, row: int, data) -> np.ndarray:
        spec = self.model.predictor.spec
        try:
            return resize_uint8(decode_upload(bytes(data)), spec).numpy()
        except ImageError as e:
            raise ImageRejected(f"row {row}: {e.reason}") from None

    def _forward(self, images: np.ndarray) -> dict[str, np.ndarray]:
        import tritonclient.grpc as grpcclient

        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = grpcclient.InferenceServerClient(self.batched_url)
        tensor = grpcclient.InferInput(IMAGES, list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images)
        outputs = [grpcclient.InferRequestedOutput(LOGITS), grpcclient.InferRequestedOutput(CLASSES)]
        result = client.infer(self.model.name, [tensor], outputs=outputs)
        return {LOGITS: result.as_numpy(LOGITS), CLASSES: result.as_numpy(CLASSES)}


def decode_upload(data: bytes):
    """Encoded file bytes -> RGB PIL image through data.images.load_rgb (same checks, same reasons).

    The decoder opens paths (its checks look at the file: empty, size before decoding), so the bytes
    go to a private temporary file first.
    """
    with tempfile.NamedTemporaryFile(prefix="cnnbench-upload-", dir=_SCRATCH) as f:
        f.write(data)
        f.flush()
        return load_rgb(f.name)
