"""Device and precision, decided once: which device "auto" means, IEEE fp32 (no TF32) for reference
math, the training precision, the cores this process may use, the default number of decoding
workers, and what this CPU/GPU can do fast."""
from __future__ import annotations

import contextlib
import functools
import os

import torch

from cnnbench.common.errors import InputError, UserError

MAX_DEFAULT_WORKERS = 4


class DeviceError(UserError, RuntimeError):
    """A device that was asked for but is not there (e.g. cuda without a GPU)."""


def resolve_device(device: str = "auto") -> str:
    """"auto" -> "cuda" when torch sees a GPU, else "cpu"; "cuda"/"cuda:N" without a GPU is a DeviceError."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu"
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r} requested but torch sees no CUDA GPU "
                              f"(torch {torch.__version__}, CUDA build {torch.version.cuda})")
        return device
    raise InputError(f"unknown device {device!r}; expected auto, cpu, cuda or cuda:N")


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity (``taskset``, a container's cpuset) where the
    OS reports one, not the host's count (a 16-CPU host pinned to 2 has 2)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def user_threads() -> int | None:
    """The thread count the user chose with OMP_NUM_THREADS (a positive integer), else None: a share of
    the cores computed here never overrides it."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def default_workers() -> int:
    """Decoding worker processes when none are asked for: one per core, at most MAX_DEFAULT_WORKERS."""
    return min(MAX_DEFAULT_WORKERS, available_cores())


def side_by_side_threads(jobs: int, device: str = "auto") -> int:
    """Threads for each of ``jobs`` independent trainings run at once, one process each with no loader
    workers; 0: run them one after the other (a GPU, or fewer cores than jobs).

    Why: on 2 cores two single-thread ResNet26 trainings, each making its own images, train 1.29x as
    many images per second together as one run with 2 threads and 2 loader workers (77.5 vs 60.2 img/s:
    a thread that both decodes and computes never waits for its sibling, and small convolutions scale
    sub-linearly with threads).
    """
    if jobs < 2 or available_cores() < jobs or resolve_device(device) != "cpu":
        return 0
    return cores_per_job(jobs)


def cores_per_job(jobs: int) -> int:
    """The process's cores shared equally between ``jobs`` running at once (at least one each); the
    user's OMP_NUM_THREADS instead, when set."""
    return user_threads() or max(1, available_cores() // max(jobs, 1))


@contextlib.contextmanager
def ieee_fp32():
    """IEEE fp32 for cuBLAS matmuls and cuDNN convolutions (TF32 off), the previous settings restored.

    torch >= 2.9 has per-backend ``fp32_precision`` settings and refuses to read the legacy
    ``allow_tf32`` flags once the new ones were set, so the new API is used where it exists. The
    flags only affect CUDA kernels; on the CPU the context changes nothing that runs.
    """
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision") and hasattr(getattr(cudnn, "conv", None), "fp32_precision"):
        saved = (matmul.fp32_precision, cudnn.conv.fp32_precision)
        matmul.fp32_precision, cudnn.conv.fp32_precision = "ieee", "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision, cudnn.conv.fp32_precision = saved
    else:
        saved = (matmul.allow_tf32, cudnn.allow_tf32)
        matmul.allow_tf32, cudnn.allow_tf32 = False, False
        try:
            yield
        finally:
            matmul.allow_tf32, cudnn.allow_tf32 = saved


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """True where the CPU has bf16 matrix/dot-product instructions (AMX or AVX512-BF16)."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


TRAIN_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Forces what "auto" means, for every training run of the process and its children (train, the demo's
# trainers): CI runs the training tests once per value, whatever the CPU's flags.
TRAIN_PRECISION_ENV = "CNNBENCH_TRAIN_PRECISION"
FORCEABLE_PRECISIONS = ("fp32", "bf16")
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def training_precision(requested: str, device: torch.device) -> str:
    """The precision a training run uses ("fp32", "bf16" or "fp16" autocast) for ``requested`` on ``device``.

    "auto": CNNBENCH_TRAIN_PRECISION when set, else fp16 on CUDA, bf16 on CPUs with bf16 units, fp32
    elsewhere. bf16 on a CPU without bf16 units is emulated (slower, but the same arithmetic); fp16
    autocast on a CPU is refused (no fp16 units to gain from, and no loss scaling there).
    """
    if requested not in TRAIN_PRECISIONS:
        raise InputError(f"unknown training precision {requested!r}; expected one of {', '.join(TRAIN_PRECISIONS)}")
    precision = requested
    if requested == "auto":
        forced = os.environ.get(TRAIN_PRECISION_ENV, "").strip()
        if forced and forced not in FORCEABLE_PRECISIONS:
            raise InputError(f"{TRAIN_PRECISION_ENV}={forced!r}: expected one of {', '.join(FORCEABLE_PRECISIONS)}")
        precision = forced or ("fp16" if device.type == "cuda" else "bf16" if cpu_has_fast_bf16() else "fp32")
    if precision == "fp16" and device.type != "cuda":
        raise InputError(f"fp16 training needs a CUDA GPU (this run is on {device}): use --precision bf16 or fp32")
    return precision
