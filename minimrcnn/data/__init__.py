"""Data: the synthetic shapes set, the COCO instances loader and its transforms."""

from minimrcnn.data.coco import CocoFormatError, CocoInstances, ImageFilesError, check_image_files, collate
from minimrcnn.data.shapes import SHAPES_CATEGORIES, ensure_shapes, generate_shapes
from minimrcnn.data.transforms import ColorJitter, Compose, Normalize, RandomHorizontalFlip, Resize

__all__ = [
    "SHAPES_CATEGORIES",
    "CocoFormatError",
    "CocoInstances",
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
