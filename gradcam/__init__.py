"""Grad-CAM on the PyTorch reference, ten-crop paste-back, CAM of exported models, galleries.

Public functions for cli.py (each returns a JSON-serialisable dict with ``ok``):
``gradcam_images``, ``validate_export``, ``errors_gallery``.
"""
from gradcam.api import errors_gallery, gradcam_images, validate_export
from gradcam.core import BaseCAM, CamResult, ClassifierCAM, GradCAM
from gradcam.exported import CAM_GATES, ExportedCam, cam_parity
from gradcam.tencrop import ImageCam, image_cam, image_cams, paste_back

__all__ = [
    "gradcam_images", "validate_export", "errors_gallery", "BaseCAM", "CamResult", "GradCAM", "ClassifierCAM",
    "CAM_GATES", "ExportedCam", "cam_parity", "ImageCam", "image_cam", "image_cams", "paste_back",
]
