"""Data: folder reading, splits, transforms, ten-crop geometry and the embedded synthetic set."""
from cnnbench.data.dataset import BadImage, ImageDataset, collate_skip_bad
from cnnbench.data.crops import CROP_MODES, CropMode, crop_mode, eval_transform
from cnnbench.data.folder import FolderIndex, Sample, scan_folder
from cnnbench.data.geometry import CropBox, center_crop_box, ten_crop, ten_crop_boxes
from cnnbench.data.images import MAX_PIXELS, ImageError, load_rgb
from cnnbench.data.spec import HALF, IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec, spec_for_crop
from cnnbench.data.split import Split, load_split, make_split, save_split
from cnnbench.data.synth import default_data_root, embedded_crop, mask_path, synthesize
from cnnbench.data.transforms import normalize, resize_uint8, train_transform

__all__ = [
    "BadImage", "ImageDataset", "collate_skip_bad",
    "CROP_MODES", "CropMode", "crop_mode", "eval_transform",
    "FolderIndex", "Sample", "scan_folder",
    "CropBox", "center_crop_box", "ten_crop", "ten_crop_boxes",
    "MAX_PIXELS", "ImageError", "load_rgb",
    "HALF", "IMAGENET_MEAN", "IMAGENET_STD", "PreprocessSpec", "spec_for_crop",
    "Split", "load_split", "make_split", "save_split",
    "default_data_root", "embedded_crop", "mask_path", "synthesize",
    "normalize", "resize_uint8", "train_transform",
]
