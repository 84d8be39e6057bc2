"""The client side: `predict --server URL` through Triton's HTTP or gRPC client, answers shaped as `predict`'s.

Each file is one request to ``<model>.encoded`` (the server decodes it), so a file the server cannot
use fails alone with its own reason, as it does in a local run; requests go out concurrently and the
server's dynamic batcher merges them.
"""
from __future__ import annotations

import re
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable
from urllib.parse import urlsplit

import numpy as np
import torch

from cnnbench.common import topk_indices
from cnnbench.common.errors import InputError, UserError
from cnnbench.runtime.predict import PredictionSink, expand_paths
from cnnbench.serve.models import CLASSES, ENCODED_SUFFIX, IMAGE_BYTES, IMAGES, LOGITS

PROTOCOLS = ("http", "grpc")
DEFAULT_CONCURRENCY = 8  # requests in flight from one predict: enough to fill a dynamic batch on a small CPU
# The server's error text for a rejected upload ends with "ImageRejected: row N: <reason>".
_REJECTED = re.compile(r"ImageRejected: row \d+: ([^\n]+)")
# Why a file cannot be sent, in the words the local decoder (data.images) uses for the same file.
_READ_ERRORS = {FileNotFoundError: "file not found", IsADirectoryError: "is a directory, not an image file",
                PermissionError: "permission denied"}


class ServerError(UserError):
    """The server refused or failed a request; str() is its reason."""


def parse_server(url: str) -> tuple[str, str]:
    """("http" | "grpc", "host:port") from http://host:port, grpc://host:port or host:port (HTTP)."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in PROTOCOLS or not parts.hostname or parts.port is None or parts.path not in ("", "/"):
        raise InputError(f"server must be http://HOST:PORT or grpc://HOST:PORT, got {url!r}")
    return parts.scheme, parts.netloc


class TritonClient:
    """One Triton connection (HTTP or gRPC) with the two calls the served models take."""

    def __init__(self, url: str):
        self.protocol, self.address = parse_server(url)
        if self.protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        self._module = module
        self._client = module.InferenceServerClient(self.address)

    def infer_images(self, model: str, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [B,3,R,R] -> (logits [B,K], classes [B,k]) from the batched model."""
        return self._infer(model, IMAGES, images, "UINT8")

    def infer_files(self, model: str, files: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """Encoded files -> (logits, classes) from an ``.encoded`` model."""
        data = np.array([[f] for f in files], dtype=np.object_)
        return self._infer(model, IMAGE_BYTES, data, "BYTES")

    def output_size(self, model: str, output: str = LOGITS) -> int:
        """Elements per image of one output, from the model's configuration (e.g. K logits)."""
        if self.protocol == "grpc":
            config = self._call(self._client.get_model_config, model, as_json=True)["config"]
        else:
            config = self._call(self._client.get_model_config, model)
        dims = next(o["dims"] for o in config["output"] if o["name"] == output)
        return int(np.prod([int(d) for d in dims]))

    def statistics(self, model: str) -> dict:
        """The model's Triton statistics (JSON form: inference_stats.success/fail counts, ...)."""
        extra = {"as_json": True} if self.protocol == "grpc" else {}
        return self._call(self._client.get_inference_statistics, model, **extra)["model_stats"][0]

    def _infer(self, model: str, name: str, data: np.ndarray, dtype: str):
        tensor = self._module.InferInput(name, list(data.shape), dtype)
        tensor.set_data_from_numpy(data)
        outputs = [self._module.InferRequestedOutput(LOGITS), self._module.InferRequestedOutput(CLASSES)]
        result = self._call(self._client.infer, model, [tensor], outputs=outputs)
        return result.as_numpy(LOGITS), result.as_numpy(CLASSES)

    def _call(self, method, *args, **kwargs):
        """A client call whose failures become ServerError: the server's reason, or why it cannot be reached."""
        from tritonclient.utils import InferenceServerException

        try:
            return method(*args, **kwargs)
        except InferenceServerException as e:
            message = e.message() or str(e)
            if "failed to connect" in message.lower():
                raise ServerError(f"cannot reach {self.protocol}://{self.address} ({message})") from None
            raise ServerError(server_reason(message)) from None
        except OSError as e:  # the HTTP client's connection errors (refused, reset, timed out)
            raise ServerError(f"cannot reach {self.protocol}://{self.address} ({e.strerror or e})") from None


def server_reason(message: str) -> str:
    """The part of a server error a person needs: an upload's reason, or Triton's own message."""
    rejected = _REJECTED.search(message)
    if rejected:
        return rejected.group(1)
    return message.strip().splitlines()[-1] if message.strip() else "server error (no message)"


def predict_over_server(server: str, model: str, paths, *, topk: int = 5, csv=None, jsonl=None,
                        on_result: Callable[[dict], None] | None = None,
                        concurrency: int = DEFAULT_CONCURRENCY) -> dict:
    """`runtime.predict_files` with the model on a Triton server: the same results in the same order,
    the same output files (resumed the same way) and the same summary counts."""
    if topk < 1 or concurrency < 1:
        raise InputError(f"topk and concurrency must be at least 1, got {topk} and {concurrency}")
    sink = PredictionSink(csv, jsonl, on_result)
    parse_server(server)
    model = model[: -len(ENCODED_SUFFIX)] if model.endswith(ENCODED_SUFFIX) else model
    files, unlistable = expand_paths(paths)
    topk = min(topk, TritonClient(server).output_size(model))  # as predict: at most K classes
    local = threading.local()

    def ask(path: str) -> dict:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            return {"path": path, "error": _READ_ERRORS.get(type(e), f"cannot read file ({e.strerror})")}
        if not hasattr(local, "client"):  # one connection per sending thread
            local.client = TritonClient(server)
        try:
            logits, classes = local.client.infer_files(model + ENCODED_SUFFIX, [data])
        except ServerError as e:
            return {"path": path, "error": str(e)}
        return {"path": path, "top": _top(logits[0], classes[0], topk)}

    start = time.perf_counter()
    with sink.open(topk):
        for result in _in_order(ask, [path for path in files if not sink.already_written(path)], concurrency):
            sink.hand_out([result])
        sink.hand_out_unlistable(unlistable)
    return {"server": server, "model": model, "topk": topk, "images": len(files) + len(unlistable), **sink.summary(),
            "seconds": time.perf_counter() - start}


def _in_order(ask, files: list[str], concurrency: int):
    """ask(file) for every file with `concurrency` requests in flight; results in file order."""
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        pending: deque = deque()
        for path in files:
            pending.append(pool.submit(ask, path))
            if len(pending) >= 2 * concurrency:  # bounded look-ahead: memory does not grow with the file count
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _top(logits: np.ndarray, classes: np.ndarray, topk: int) -> list[dict]:
    """[{"class", "prob"}] best first, computed from the logits exactly as `predict` does; the labels
    come from the server's top-k strings ("probability:index:label")."""
    labels = {}
    for entry in classes:
        _, index, label = (entry.decode() if isinstance(entry, bytes) else str(entry)).split(":", 2)
        labels[int(index)] = label
    k = min(topk, len(logits))
    if k > len(labels):
        raise InputError(f"the server returns the top {len(labels)} classes; ask for --topk {len(labels)} or less "
                         f"(or start the server with --topk {k})")
    probs = torch.softmax(torch.tensor(logits[None], dtype=torch.float64), dim=1).numpy()[0]
    best = topk_indices(logits[None], k)[0]
    return [{"class": labels[int(c)], "prob": float(probs[c])} for c in best]
