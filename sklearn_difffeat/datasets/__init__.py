"""Embedded demo data: real Fashion-MNIST images in generated multi-label mosaics with generated captions."""

from ._coco import COCO_SPLITS, load_coco
from ._fashion import (
    CLASS_NAMES,
    load_fashion_mosaics,
    load_fashion_sources,
    load_fashion_vocabulary,
    mentioned_classes,
)
from ._vg500 import load_vg500

__all__ = [
    "CLASS_NAMES",
    "COCO_SPLITS",
    "load_coco",
    "load_fashion_mosaics",
    "load_fashion_sources",
    "load_fashion_vocabulary",
    "load_vg500",
    "mentioned_classes",
]
