"""`serve`: Triton Inference Server (PyTriton's bundled build) over the runtime's Predictors.

Start-up order: load every Predictor and run it once (warm-up, and the crop-mode check), start
Triton on the bind address, bind two models per Predictor (serve/models.py), send one request to
every model through Triton itself, and only then announce "ready". SIGTERM and Ctrl-C stop Triton
with SIGINT, which stops accepting requests and finishes the ones in flight (up to
DRAIN_SECONDS) before it exits; then the process exits 0.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from cnnbench.common.device import available_cores
from cnnbench.common.errors import InputError
from cnnbench.common.runs import newest_runs
from cnnbench.data.crops import crop_mode
from cnnbench.serve.models import (CLASSES, IMAGE_BYTES, IMAGES, LOGITS, EncodedInfer, ServedModel, batched_infer,
                                   triton_name)

DEFAULT_ADDRESS = "127.0.0.1"
DEFAULT_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}  # Triton's own defaults
# How long a request may wait in the dynamic batcher for others to join it. 2 ms is small beside a
# batch's compute time on a CPU (tens of ms) and lets concurrent clients share one Predictor call.
DEFAULT_QUEUE_DELAY_US = 2000
DEFAULT_LOG = os.path.join("runs", "serve", "triton.log")
DRAIN_SECONDS = 30  # Triton's exit timeout: in-flight requests get this long to finish on SIGTERM
# Endpoints left behind PyTriton's generated access token: those that change or expose the server's
# state (load/unload models, shared memory, tracing, log settings). Statistics stays open: it is
# read-only counters, and Triton's perf_analyzer reads it to measure server-side latency.
RESTRICTED_ENDPOINTS = ["shared-memory", "model-repository", "trace", "logging"]


def default_models() -> list[str]:
    """The newest exports (each export folder of the newest runs/export or runs/*/export), else the
    newest trained checkpoints."""
    try:
        return newest_runs("export").paths
    except FileNotFoundError:
        return newest_runs("train").paths


def load_models(paths, *, backend: str, device: str, precision: str, crops, topk: int) -> list[ServedModel]:
    """One warmed-up ServedModel per path, named after its export (or run folder), names made unique."""
    from cnnbench import runtime

    if topk < 1:
        raise InputError(f"topk must be at least 1, got {topk}")
    crop_mode(crops)
    models, taken = [], set()
    for path in map(os.fspath, paths):
        predictor = runtime.load(path, backend=backend, device=device, precision=precision)
        name = _unique(served_name(path, predictor), taken)
        model = ServedModel(name=name, source=path, predictor=predictor, crops=crops,
                            topk=min(topk, len(predictor.classes)))
        model.answer(np.zeros((1, *model.image_shape), dtype=np.uint8))  # warm-up; a crop-mode mismatch fails here
        models.append(model)
    return models


def served_name(path: str, predictor) -> str:
    """The Triton model name `serve` gives a model: its export's name, or its run folder's (plus the file's
    stem unless it is best.pt); a second model of the same name gets "-2" (load_models)."""
    if predictor.manifest is not None:
        return triton_name(predictor.manifest["name"])
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    stem = os.path.splitext(os.path.basename(path))[0]
    return triton_name(folder if stem == "best" else f"{folder}-{stem}")


def _unique(name: str, taken: set) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}-{n}", n + 1
    taken.add(candidate)
    return candidate


def serve_models(paths=None, *, address: str = DEFAULT_ADDRESS, http_port: int = DEFAULT_PORTS["http"],
                 grpc_port: int = DEFAULT_PORTS["grpc"], metrics_port: int = DEFAULT_PORTS["metrics"],
                 backend: str = "auto", device: str = "auto", precision: str = "fp32", crops=10, topk: int = 5,
                 max_batch: int = 64, queue_delay_us: int = DEFAULT_QUEUE_DELAY_US, instances: int = 1,
                 decoders: int | None = None, log: str = DEFAULT_LOG, announce=None) -> dict:
    """Serve `paths` (default: default_models()) until SIGTERM / Ctrl-C; returns the summary on exit.

    `announce(summary)` is called once every model has answered a request through Triton (ready).
    `log`: Triton's own log file (appended to; it would otherwise go to stdout, which is the summary's).
    """
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    if max_batch < 1 or instances < 1 or queue_delay_us < 0:
        raise InputError("max_batch and instances must be at least 1, queue_delay_us at least 0")
    _check_ports_free(address, {"--http-port": http_port, "--grpc-port": grpc_port, "--metrics-port": metrics_port})
    models = load_models(list(paths) if paths else default_models(), backend=backend, device=device,
                         precision=precision, crops=crops, topk=topk)
    _python_backend_library_path()
    config = TritonConfig(http_address=address, http_port=http_port, grpc_address=address, grpc_port=grpc_port,
                          metrics_address=address, metrics_port=metrics_port, strict_readiness=True,
                          exit_timeout_secs=DRAIN_SECONDS, log_verbose=0, log_file=_log_file(log))
    # The encoded-files models forward decoded images to the batched ones over loopback gRPC (and the
    # readiness check asks every model there).
    loopback = f"{'127.0.0.1' if address in ('0.0.0.0', '::') else address}:{grpc_port}"
    decode_pool = ThreadPoolExecutor(max_workers=decoders or available_cores(), thread_name_prefix="decode")
    security = TritonSecurityConfig(restricted_endpoints=RESTRICTED_ENDPOINTS)
    summary = {"address": address, "http": f"http://{address}:{http_port}", "grpc": f"grpc://{address}:{grpc_port}",
               "metrics": f"http://{address}:{metrics_port}/metrics", "pid": os.getpid(),
               "log": os.path.abspath(log), "max_batch": max_batch, "queue_delay_us": queue_delay_us, "instances": instances,
               "models": [_describe(m) for m in models]}
    stopping = _StopSignals()
    stdout = sys.stdout
    try:
        # PyTriton echoes whatever tritonserver prints (the log goes to `log`; a few lines such as "Signal
        # (15) received." still come) on stdout, which belongs to the summary: send them to stderr.
        with contextlib.redirect_stdout(sys.stderr), Triton(config=config, security_config=security) as triton:
            for model in models:
                outputs = [Tensor(name=LOGITS, dtype=np.float32, shape=(len(model.predictor.classes),)),
                           Tensor(name=CLASSES, dtype=np.object_, shape=(model.topk,))]
                triton.bind(model_name=model.name, infer_func=[batched_infer(model)] * instances,
                            inputs=[Tensor(name=IMAGES, dtype=np.uint8, shape=model.image_shape)], outputs=outputs,
                            config=ModelConfig(max_batch_size=max_batch,
                                               batcher=DynamicBatcher(max_queue_delay_microseconds=queue_delay_us)),
                            strict=True)
                encoded = EncodedInfer(model, loopback, decode_pool)
                triton.bind(model_name=model.encoded_name, infer_func=[encoded] * instances,
                            inputs=[Tensor(name=IMAGE_BYTES, dtype=np.object_, shape=(1,))], outputs=outputs,
                            config=ModelConfig(max_batch_size=max_batch, batcher=None), strict=True)
            _answer_once(models, f"grpc://{loopback}")
            summary["ready_seconds"] = round(time.monotonic() - stopping.started, 2)
            if announce:
                with contextlib.redirect_stdout(stdout):
                    announce(summary)
            triton.serve()
    finally:
        decode_pool.shutdown(wait=False, cancel_futures=True)
        stopping.restore()
    summary["stopped_by"] = stopping.signal_name or "server exit"
    summary["ok"] = stopping.signal_name is not None  # Triton stopping by itself is a failure
    return summary


def _check_ports_free(address: str, ports: dict) -> None:
    """Name a port already taken now, rather than let Triton fail to start after the models have loaded."""
    import socket

    if len(set(ports.values())) < len(ports):
        raise InputError(f"the HTTP, gRPC and metrics ports must differ, got {ports}")
    for option, port in ports.items():
        with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no conflict
            try:
                probe.bind((address, port))
            except OSError as e:
                raise InputError(f"cannot listen on {address}:{port} ({e.strerror}): another server there? "
                                 f"choose another {option}") from None


def _log_file(path: str):
    import pathlib

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    return pathlib.Path(os.path.abspath(path))


def _describe(model: ServedModel) -> dict:
    p = model.predictor
    return {"name": model.name, "encoded": model.encoded_name, "source": model.source, "predictor": p.name,
            "backend": p.backend, "device": p.device, "precision": p.precision, "crops": model.crops,
            "topk": model.topk, "classes": len(p.classes), "input": [IMAGES, "UINT8", list(model.image_shape)]}


def _answer_once(models: list[ServedModel], grpc_url: str) -> None:
    """Every model answers one request through Triton before the server is announced as ready."""
    import io

    from PIL import Image

    from cnnbench.serve.client import TritonClient

    client = TritonClient(grpc_url)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (127, 127, 127)).save(buffer, format="PNG")
    for model in models:
        client.infer_images(model.name, np.zeros((1, *model.image_shape), dtype=np.uint8))
        client.infer_files(model.encoded_name, [buffer.getvalue()])


def _python_backend_library_path() -> None:
    """Let Triton's Python-backend stub load this interpreter's own libpython.

    The stub links libpython3.X by name; with a Python built outside the system (pyenv, conda) the
    loader otherwise finds the system's libpython of another patch release, whose C structures do
    not match this standard library, and the model fails to load. The stub is a child process of
    tritonserver, which PyTriton starts with a copy of this environment.
    """
    libdir = sysconfig.get_config_var("LIBDIR")
    if sysconfig.get_config_var("Py_ENABLE_SHARED") and libdir and os.path.isdir(libdir):
        current = os.environ.get("LD_LIBRARY_PATH", "")
        if libdir not in current.split(os.pathsep):
            os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, current) if p)


class _StopSignals:
    """SIGTERM becomes KeyboardInterrupt (what PyTriton's serve loop stops on); remembers which signal came."""

    def __init__(self):
        self.started = time.monotonic()
        self.signal_name: str | None = None
        self._previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in self._previous:
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        first = self.signal_name is None
        self.signal_name = signal.Signals(signum).name
        print(f"[serve] {self.signal_name}: finishing in-flight requests, then exiting", file=sys.stderr, flush=True)
        if first:
            raise KeyboardInterrupt

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
