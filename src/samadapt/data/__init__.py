"""Medical data in: volumes and their grids, dataset layouts, preprocessing presets, converters, demo data."""

from samadapt.data.datasets import Case, DatasetSpec, SliceDataset, load_dataset
from samadapt.data.demo import fetch_demo
from samadapt.data.io import Volume, read_label, read_volume, write_label
from samadapt.data.preprocess import PRESETS, normalize, preset_for_modality
from samadapt.data.selection import CaseSplit, split_cases, split_dataset
from samadapt.errors import DataError

__all__ = [
    "PRESETS",
    "Case",
    "CaseSplit",
    "DataError",
    "DatasetSpec",
    "SliceDataset",
    "Volume",
    "fetch_demo",
    "load_dataset",
    "normalize",
    "preset_for_modality",
    "read_label",
    "read_volume",
    "split_cases",
    "split_dataset",
    "write_label",
]
