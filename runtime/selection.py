"""`--backend auto` for an export on the CPU: the fastest verified backend that `bench` measured on this machine.

Which runtime is fastest depends on the CPU (OpenVINO int8 ran 2.5x ONNX Runtime int8 on an AMX Xeon,
1.09x on an EPYC without AMX), so it is measured, never assumed. Each `bench` run that measures an
export on the CPU updates ``backend_choice.json`` beside its manifest (atomically): per precision and
backend the latest measurement (images/s, whether it passed its parity gates, export.parity.GATES with
bf16 judged like fp16, on the bench's held-out images, and which bench report it comes from), and per
precision the backend of the fastest measurement that passed. The record names the manifest (its
digest) and the machine (CPU, cores, matrix features, runtime versions); the loader uses it only when
both still match and the backend still loads here, and otherwise falls back to its fixed rule.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import platform
import time
import warnings

from cnnbench.common import atomic_write_json
from cnnbench.common.device import available_cores, cpu_flags
from cnnbench.runtime.backends import EXPORT_BACKENDS, backend_problem

CHOICE_NAME = "backend_choice.json"
FORMAT_VERSION = 1
# CPU features that decide which precisions have fast matrix units (bench reports them too).
MATRIX_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_bf16", "amx_int8", "amx_fp16")
_RUNTIME_LIBRARIES = ("onnxruntime", "openvino")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except Exception:  # noqa: BLE001 - an absent or broken optional library is simply not reported
        return None


def machine_fingerprint() -> dict:
    """What a speed ranking depends on: the CPU, its cores and matrix features, the runtimes' versions."""
    return {
        "cpu": cpu_model(),
        "cpu_cores": available_cores(),  # the cores this process may use (affinity)
        "cpu_features": [f for f in MATRIX_FLAGS if f in cpu_flags()],
        **{name: library_version(name) for name in _RUNTIME_LIBRARIES},
    }


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's content (every artifact's hash included), independent of where it lies."""
    body = {k: v for k, v in manifest.items() if k != "export_dir"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


def measurements(rows: list[dict], *, bench_json: str | None, threads: int | None) -> dict:
    """{precision: {backend: measurement}} from one export's bench rows on one device: per backend and
    precision its compute row (the model alone), else its end-to-end row. Only export backends count;
    rows that failed or have no speed are left out."""
    measured: dict = {}
    for row in rows:
        if row.get("backend") not in EXPORT_BACKENDS or row.get("error") or not row.get("images_per_s"):
            continue
        current = measured.get(row["precision"], {}).get(row["backend"])
        if current is None or (current["mode"] != "compute" and row["mode"] == "compute"):
            measured.setdefault(row["precision"], {})[row["backend"]] = {
                "images_per_s": row["images_per_s"], "gates_passed": row.get("gates_passed"), "mode": row["mode"],
                "variant": row.get("variant"), "crops": row.get("crops"), "bench": bench_json, "threads": threads}
    return measured


def choose_backends(measured: dict) -> dict:
    """{precision: backend}: the fastest measurement that passed its parity gates (compute measurements
    before end-to-end ones); a precision none of whose measurements passed has no choice."""
    choices = {}
    for precision, by_backend in measured.items():
        verified = {b: m for b, m in by_backend.items() if m.get("gates_passed") is True}
        if not verified:
            continue
        compute = {b: m for b, m in verified.items() if m.get("mode") == "compute"}
        pool = compute or verified
        choices[precision] = max(pool, key=lambda b: pool[b]["images_per_s"])
    return choices


def record_measurements(manifest: dict, device: str, measured: dict) -> tuple[str, dict]:
    """Merge ``measured`` (measurements()) into the record beside the manifest and choose again; returns
    (the record's path, {precision: backend}).

    A bench that measured some backends only (``--backend openvino``) updates those and keeps the
    others' last measurements (each names its bench report), so a filtered run never hides a faster
    backend measured before. A record for another manifest or machine starts over."""
    path = os.path.join(manifest["export_dir"], CHOICE_NAME)
    digest, machine = manifest_digest(manifest), machine_fingerprint()
    old = _read(path)
    devices = dict(old["devices"]) if old and old.get("manifest") == digest and old.get("machine") == machine else {}
    merged = {p: dict(by_backend) for p, by_backend in devices.get(device, {}).get("measurements", {}).items()}
    for precision, by_backend in measured.items():
        merged.setdefault(precision, {}).update(by_backend)
    choices = choose_backends(merged)
    devices[device] = {"choices": choices, "measurements": merged, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_json(path, {"format_version": FORMAT_VERSION, "manifest": digest, "machine": machine,
                             "devices": devices})
    return path, choices


def recorded_choice(manifest: dict, device: str, precision: str) -> str | None:
    """The backend the record beside ``manifest`` chose for ``precision`` on ``device``, or None when
    there is no record, it is for another export or machine, or that backend cannot run here now."""
    record = _read(os.path.join(manifest["export_dir"], CHOICE_NAME))
    if not record or record.get("manifest") != manifest_digest(manifest) or record.get("machine") != machine_fingerprint():
        return None
    devices = record.get("devices")
    entry = devices.get(device) if isinstance(devices, dict) else None
    backend = entry.get("choices", {}).get(precision) if isinstance(entry, dict) else None
    if backend not in EXPORT_BACKENDS or backend_problem(backend, device):
        return None
    return backend


def _read(path: str) -> dict | None:
    """The record, or None when there is none; an unreadable one is ignored with a warning (it is a cache)."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        warnings.warn(f"{path}: ignoring an unreadable backend record ({exc}); the next bench rewrites it",
                      RuntimeWarning, stacklevel=3)
        return None
    if not isinstance(record, dict) or record.get("format_version") != FORMAT_VERSION:
        return None
    return record
