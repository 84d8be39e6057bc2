"""The export folder's manifest.json: what was exported, from what, with which hashes and parity.

Every file an export lists (graphs, TensorRT plans, CAM weights) carries its sha256 and size, and
``load_manifest`` checks them all before anything is deserialised: a TensorRT plan is trusted code,
and a flipped byte in a graph must not reach a runtime.
"""
from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
from torch import nn

from cnnbench.common import atomic_write, atomic_write_json, sha256_file
from cnnbench.data.crops import TEN_CROP_PLACES
from cnnbench.export.errors import ExportError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
CAM_WEIGHTS_NAME = "cam_weights.npz"
FORMATS = ("onnx", "tensorrt")
_REQUIRED = ("format_version", "name", "kind", "sources", "classes", "spec", "io", "artifacts", "opset", "parity")


def file_entry(path, **fields) -> dict:
    """``{"file", **fields, "sha256", "bytes"}`` for a file in an export folder."""
    path = os.fspath(path)
    return {"file": os.path.basename(path), **fields, "sha256": sha256_file(path), "bytes": os.path.getsize(path)}


def write_manifest(export_dir, manifest: dict) -> str:
    """Write ``manifest`` (without the load-time ``export_dir`` key) atomically; returns its path."""
    body = {k: v for k, v in manifest.items() if k != "export_dir"}
    path = os.path.join(os.fspath(export_dir), MANIFEST_NAME)
    atomic_write_json(path, body)
    return path


def ten_crop_place(manifest: dict) -> str:
    """Where an export makes its ten crops (data.crops.TEN_CROP_PLACES: "host", "graph", "dense").
    Manifests from before dense exports record only ``ten_crop_in_graph``."""
    return manifest.get("ten_crop", "graph" if manifest.get("ten_crop_in_graph") else "host")


def graph_crops(manifest: dict) -> str | None:
    """The crop mode an export's graph computes ("10", "dense"), or None when it takes crops."""
    return TEN_CROP_PLACES[ten_crop_place(manifest)]


def listed_files(manifest: dict) -> list[dict]:
    """Every hashed file entry of a manifest: the artifacts, then the CAM weights when present."""
    entries = list(manifest["artifacts"])
    if manifest.get("cam_weights"):
        entries.append(manifest["cam_weights"])
    return entries


def load_manifest(export_dir_or_manifest) -> dict:
    """Read a manifest and verify the size and sha256 of every file it lists.

    Accepts the export folder or the manifest.json path. Returns the manifest dict with
    ``export_dir`` (absolute) added. Raises ExportError naming the file on a missing, truncated or
    modified file, or on a manifest that is not one.
    """
    target = os.fspath(export_dir_or_manifest)
    path = os.path.join(target, MANIFEST_NAME) if os.path.isdir(target) else target
    if not os.path.isfile(path):
        raise ExportError(f"{path}: no export manifest here (not an export folder, or the export never finished)")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path}: not a valid manifest (JSON error: {exc})") from None
    _check_structure(path, manifest)
    export_dir = os.path.dirname(os.path.abspath(path))
    for entry in listed_files(manifest):
        verify_file(export_dir, entry)
    return {**manifest, "export_dir": export_dir}


def _check_structure(path: str, manifest) -> None:
    if not isinstance(manifest, dict):
        raise ExportError(f"{path}: not a manifest (expected a JSON object)")
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise ExportError(f"{path}: not an export manifest: missing key(s) {', '.join(missing)}")
    version = manifest["format_version"]
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ExportError(f"{path}: manifest format {version!r} is not supported (this program reads 1..{FORMAT_VERSION})")
    for entry in listed_files(manifest):
        if not isinstance(entry, dict) or not {"file", "sha256", "bytes"} <= set(entry):
            raise ExportError(f"{path}: malformed file entry {entry!r} (needs file, sha256, bytes)")


def verify_file(export_dir: str, entry: dict) -> str:
    """Check one listed file's size and sha256; returns its path."""
    name = entry["file"]
    if not isinstance(name, str) or name in ("", ".", "..") or os.path.basename(name) != name:
        raise ExportError(f"{export_dir}: manifest lists {name!r}, which is not a file name inside the export folder")
    path = os.path.join(export_dir, name)
    if not os.path.isfile(path):
        raise ExportError(f"{path}: listed in the manifest but missing")
    size = os.path.getsize(path)
    if size != entry["bytes"]:
        raise ExportError(f"{path}: {size} bytes but the manifest says {entry['bytes']} (truncated or replaced); re-export")
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise ExportError(f"{path}: sha256 {digest[:16]}... does not match the manifest's {entry['sha256'][:16]}... "
                          "(the file was modified or corrupted); re-export")
    return path


def artifact_entry(manifest: dict, precision: str = "fp32", fmt: str = "onnx") -> dict:
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {FORMATS}, got {fmt!r}")
    for entry in manifest["artifacts"]:
        if entry["format"] == fmt and entry["precision"] == precision:
            return entry
    available = ", ".join(f"{a['format']}/{a['precision']}" for a in manifest["artifacts"]) or "none"
    raise ExportError(f"export {manifest.get('name', '?')!r} has no {fmt} artifact in {precision} (available: {available})")


def artifact_path(manifest: dict, precision: str = "fp32", fmt: str = "onnx") -> str:
    """Path of the ``fmt`` ("onnx" | "tensorrt") artifact in ``precision`` of a loaded manifest."""
    if "export_dir" not in manifest:
        raise ExportError("artifact_path needs a manifest from load_manifest (or export_checkpoints)")
    return os.path.join(manifest["export_dir"], artifact_entry(manifest, precision, fmt)["file"])


def verified_bytes(manifest: dict, precision: str = "fp32", fmt: str = "onnx") -> bytes:
    """The artifact's bytes, hashed as read: what is deserialised is exactly what was verified."""
    entry = artifact_entry(manifest, precision, fmt)
    path = artifact_path(manifest, precision, fmt)
    with open(path, "rb") as f:
        data = f.read()
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ExportError(f"{path}: changed since the manifest was written (size or sha256 mismatch); re-export")
    return data


def write_cam_weights(path, classifiers: list[nn.Linear]) -> None:
    """Classifier weight [K, C] and bias [K] of each member (``weight_<i>``, ``bias_<i>``), float32."""
    arrays = {}
    for i, layer in enumerate(classifiers):
        arrays[f"weight_{i}"] = layer.weight.detach().float().cpu().numpy()
        arrays[f"bias_{i}"] = (layer.bias.detach().float().cpu().numpy() if layer.bias is not None
                               else np.zeros(layer.out_features, dtype=np.float32))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write(path, buffer.getvalue())


def load_cam_weights(manifest: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(weight [K, C], bias [K]) per member] from a loaded manifest's verified ``cam_weights.npz``."""
    entry = manifest.get("cam_weights")
    if not entry:
        raise ExportError(f"export {manifest.get('name', '?')!r} has no CAM weights (export with cam_output)")
    path = verify_file(manifest["export_dir"], entry)
    with np.load(path, allow_pickle=False) as data:
        return [(data[f"weight_{i}"], data[f"bias_{i}"]) for i in range(entry["members"])]
