"""DICOM folders in the app's case list: one case per image series, and the case path that names a series.

A folder holding several image series is listed once per series, with the path ``<folder>#<SeriesInstanceUID>``;
``split_case_path`` turns such a path back into the folder and the UID that ``read_volume(folder, series=UID)``
reads.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from samadapt.data.dicom import list_series
from samadapt.errors import DataError

SERIES_MARK = "#"


def dicom_cases(folder: Path, name: str) -> list[dict]:
    """The cases of a DICOM folder: the folder itself when it holds one image series, else one case per series."""
    series = [s for s in _series_of(folder, folder.stat().st_mtime_ns) if s.image]
    if len(series) <= 1:
        return [{"name": f"{name}/ (DICOM)", "path": str(folder)}]
    return [
        {
            "name": f"{name}/ (DICOM {s.modality} #{s.number} {s.description})".replace(" )", ")"),
            "path": f"{folder}{SERIES_MARK}{s.series_uid}",
        }
        for s in series
    ]


@lru_cache(maxsize=64)
def _series_of(folder: Path, mtime_ns: int) -> tuple:
    """The series of a folder, read again when the folder changes (a listing reads every file's header)."""
    try:
        return tuple(list_series(folder))
    except (OSError, DataError):
        return ()


def split_case_path(path: Path) -> tuple[Path, str | None]:
    """(folder, series UID) for a ``<folder>#<UID>`` case path, (path, None) for any other."""
    if path.exists() or SERIES_MARK not in path.name:
        return path, None
    folder, series = str(path).rsplit(SERIES_MARK, 1)
    return (Path(folder), series) if Path(folder).is_dir() else (path, None)


def case_name(path: Path, volume) -> str:
    """The name the page shows (and derives the save name from): ``<folder>_s<series number>`` for one series of a
    folder holding several, else the file or folder name."""
    if SERIES_MARK not in path.name or volume.dicom is None:
        return path.name
    folder = path.name.rsplit(SERIES_MARK, 1)[0]
    return f"{folder}_s{volume.dicom.number}" if volume.dicom.number is not None else folder
