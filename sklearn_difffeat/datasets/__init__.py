"""Embedded demo data: real Fashion-MNIST images in generated multi-label mosaics with generated captions."""

from ._fashion import (
    CLASS_NAMES,
    load_fashion_mosaics,
    load_fashion_sources,
    load_fashion_vocabulary,
    mentioned_classes,
)

__all__ = [
    "CLASS_NAMES",
    "load_fashion_mosaics",
    "load_fashion_sources",
    "load_fashion_vocabulary",
    "mentioned_classes",
]
