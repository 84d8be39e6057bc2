"""Grad-CAM on the PyTorch reference, ten-crop paste-back, CAM of exported models, galleries.

Public functions for cli.py (each returns a JSON-serialisable dict with ``ok``), one module each:
``gradcam_images`` (explain.py), ``validate_export`` (validate.py), ``errors_gallery`` (galleries.py);
what they share (held-out images, reading in groups) is in images.py.
"""
from gradcam.core import BaseCAM, CamResult, ClassifierCAM, GradCAM
from gradcam.explain import gradcam_images
from gradcam.exported import ExportedCam, cam_parity
from gradcam.galleries import errors_gallery
from gradcam.tencrop import ImageCam, image_cam, image_cams, paste_back
from gradcam.validate import validate_export

__all__ = [
    "gradcam_images", "validate_export", "errors_gallery", "BaseCAM", "CamResult", "GradCAM", "ClassifierCAM",
    "ExportedCam", "cam_parity", "ImageCam", "image_cam", "image_cams", "paste_back",
]
