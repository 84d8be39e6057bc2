"""Device and precision, decided once: which device "auto" means, IEEE fp32 (no TF32) for reference
math, the default number of decoding workers, and what this CPU/GPU can do fast."""
from __future__ import annotations

import contextlib
import functools
import os

import torch

from common.errors import InputError, UserError

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


def default_workers() -> int:
    """Decoding worker processes when none are asked for: one per core, at most MAX_DEFAULT_WORKERS."""
    return min(MAX_DEFAULT_WORKERS, os.cpu_count() or 1)


def side_by_side_threads(jobs: int, device: str = "auto") -> int:
    """Threads for each of ``jobs`` independent trainings run at once, one process each with no loader
    workers; 0: run them one after the other (a GPU, or fewer cores than jobs).

    Why: on 2 cores two single-thread ResNet26 trainings, each making its own images, train 1.29x as
    many images per second together as one run with 2 threads and 2 loader workers (77.5 vs 60.2 img/s:
    a thread that both decodes and computes never waits for its sibling, and small convolutions scale
    sub-linearly with threads).
    """
    if jobs < 2 or (os.cpu_count() or 1) < jobs or resolve_device(device) != "cpu":
        return 0
    return cores_per_job(jobs)


def cores_per_job(jobs: int) -> int:
    """This machine's cores shared equally between ``jobs`` running at once (at least one each)."""
    return max(1, (os.cpu_count() or 1) // max(jobs, 1))


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


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed-precision dtype for training: fp16 on CUDA, bf16 on CPUs with bf16 units, else none."""
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else None
