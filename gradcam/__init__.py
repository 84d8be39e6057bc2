"""Grad-CAM and its family on the PyTorch reference, ten-crop paste-back, CAM of exported models, galleries.

Public functions for cli.py (each returns a JSON-serialisable dict with ``ok``), one module each:
``gradcam_images`` (explain.py), ``validate_export`` (validate.py), ``errors_gallery`` (galleries.py);
what they share (held-out images, reading in groups) is in images.py; the methods in core.py, layer
names in layers.py, the pointing table in pointing_table.py.

Names are loaded on first use (PEP 562), so that the CLI can read ``gradcam.core``'s method choices
for its --help without loading matplotlib and the exporters.
"""
import importlib

_HOMES = {
    "gradcam_images": "explain", "validate_export": "validate", "errors_gallery": "galleries",
    "BaseCAM": "core", "CamResult": "core", "GradCAM": "core", "ClassifierCAM": "core", "METHODS": "core",
    "DEFAULT_CAMS": "core", "default_cam": "core", "default_method": "core", "default_layer": "core",
    "ExportedCam": "exported", "cam_parity": "exported",
    "ImageCam": "tencrop", "image_cam": "tencrop", "image_cams": "tencrop", "method_cams": "tencrop",
    "paste_back": "tencrop", "pointing_table_block": "pointing_table",
}

__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
