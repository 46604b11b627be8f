"""Medical data in: volumes and their grids, dataset layouts, preprocessing presets, demo data."""

from samadapt.data.datasets import Case, DatasetSpec, SliceDataset, load_dataset, split_cases
from samadapt.data.io import DataError, Volume, read_volume, write_label
from samadapt.data.preprocess import normalize

__all__ = [
    "Case",
    "DataError",
    "DatasetSpec",
    "SliceDataset",
    "Volume",
    "load_dataset",
    "normalize",
    "read_volume",
    "split_cases",
    "write_label",
]
