"""Datasets for the bundled tasks."""

from .classification import DATASETS, DataBundle, LabeledTensorDataset, balanced_subset, build_datasets

__all__ = ["DATASETS", "DataBundle", "LabeledTensorDataset", "balanced_subset", "build_datasets"]
