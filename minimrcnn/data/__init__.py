"""Data: the synthetic shapes set, the COCO instances (and panoptic) loader and its transforms."""

from minimrcnn.data.coco import CocoFormatError, CocoInstances, collate
from minimrcnn.data.panoptic import CocoPanoptic
from minimrcnn.data.shapes import SHAPES_CATEGORIES, ensure_shapes, generate_shapes
from minimrcnn.data.transforms import Compose, Normalize, RandomHorizontalFlip, Resize

__all__ = [
    "SHAPES_CATEGORIES",
    "CocoFormatError",
    "CocoInstances",
    "CocoPanoptic",
    "Compose",
    "Normalize",
    "RandomHorizontalFlip",
    "Resize",
    "collate",
    "ensure_shapes",
    "generate_shapes",
]
