"""What the numbers were measured on, and how much memory a row used at its peak."""
from __future__ import annotations

import os
import platform
import resource
import sys

import torch

from cnnbench.common.device import available_cores, cpu_flags
from cnnbench.runtime.selection import MATRIX_FLAGS, cpu_model, library_version


def machine_info(device: torch.device) -> dict:
    info = {
        "cpu": cpu_model(),
        "cpu_cores": available_cores(),  # the cores this process may use (affinity)
        "cpu_features": [f for f in MATRIX_FLAGS if f in cpu_flags()],
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": library_version("torchvision"),
        "onnx": library_version("onnx"),
        "onnxruntime": library_version("onnxruntime"),
        "openvino": library_version("openvino"),
        "tensorrt": library_version("tensorrt"),
        "device": str(device),
        "gpu": None,
        "cuda": torch.version.cuda,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["gpu_capability"] = f"{props.major}.{props.minor}"
    return info


def load_average() -> float | None:
    """The 1-minute load average: other work competing for the cores makes timings slow and noisy."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


class PeakMemory:
    """Peak host RSS and CUDA allocation over a block: ``with PeakMemory(device) as peak: ...; peak.result()``.

    The host peak is the kernel's high-water mark (VmHWM), reset at entry through
    /proc/self/clear_refs; where that cannot be reset, the process-lifetime peak from getrusage is
    reported and marked as such.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.host_peak_is_process_lifetime = False

    def __enter__(self) -> "PeakMemory":
        self.host_peak_is_process_lifetime = not _reset_host_peak()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        self.host_peak_mib = _host_peak_mib()
        self.cuda_peak_mib = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.cuda_peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20

    def result(self) -> dict:
        return {
            "host_peak_rss_mib": round(self.host_peak_mib, 1),
            "host_peak_scope": "process" if self.host_peak_is_process_lifetime else "row",
            "cuda_max_allocated_mib": None if self.cuda_peak_mib is None else round(self.cuda_peak_mib, 1),
        }


def _reset_host_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # 5 = reset the peak RSS (VmHWM) to the current RSS
        return True
    except OSError:
        return False


def _host_peak_mib() -> float:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 / 2**20 if sys.platform == "darwin" else 1 / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
