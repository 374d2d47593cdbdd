"""Datasets for the bundled tasks."""

from .classification import (
    DATASETS,
    DataBundle,
    LabeledTensorDataset,
    balanced_subset,
    build_datasets,
    image_ids,
)

__all__ = ["DATASETS", "DataBundle", "LabeledTensorDataset", "balanced_subset", "build_datasets", "image_ids"]
