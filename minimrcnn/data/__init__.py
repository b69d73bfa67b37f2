"""Data: the synthetic shapes set, the COCO instances (and panoptic) loader and its transforms."""

from minimrcnn.data.coco import CocoFormatError, CocoInstances, ImageFilesError, check_image_files, collate
from minimrcnn.data.panoptic import CocoPanoptic
from minimrcnn.data.shapes import SHAPES_CATEGORIES, ensure_shapes, generate_shapes
from minimrcnn.data.transforms import ColorJitter, Compose, Normalize, RandomHorizontalFlip, Resize

__all__ = [
    "SHAPES_CATEGORIES",
    "CocoFormatError",
    "CocoInstances",
    "CocoPanoptic",
    "ColorJitter",
    "Compose",
    "ImageFilesError",
    "Normalize",
    "RandomHorizontalFlip",
    "Resize",
    "check_image_files",
    "collate",
    "ensure_shapes",
    "generate_shapes",
]
