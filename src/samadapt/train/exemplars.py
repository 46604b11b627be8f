"""What a run learnt from: ``RUN_DIR/exemplars.json`` (``RunLayout.exemplars``), written when training starts.

A 2D model adapted from a few labelled slices labels what it saw on those slices; where it then labels organs on
slices far away (issue 30), the run directory says which slices it learnt from::

    {"axis": 0, "dataset": "/data/abdomen_ct", "classes": [1, 2],
     "labelled": [{"case": "s0009", "slice": 92, "classes": [1, 2]}, ...],   slices holding a learned class
     "target_free": [{"case": "s0009", "slice": 12}, ...],                    real slices holding none
     "synthetic": 0}                                                           synthetic slices besides them
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from samadapt.files import atomic_write_text


def exemplar_record(infos: Sequence, classes: Sequence[int], synthetic: int, axis: int, dataset: str) -> dict:
    """The content of exemplars.json from the training slices' infos (``case``, ``index``, ``classes``), of which the
    last ``synthetic`` are synthetic."""
    wanted = set(classes)
    real = list(infos)[: len(infos) - synthetic]
    return {
        "axis": axis,
        "dataset": dataset,
        "classes": sorted(wanted),
        "labelled": [
            {"case": s.case, "slice": int(s.index), "classes": sorted(wanted & set(s.classes))}
            for s in real
            if wanted & set(s.classes)
        ],
        "target_free": [{"case": s.case, "slice": int(s.index)} for s in real if not wanted & set(s.classes)],
        "synthetic": int(synthetic),
    }


def write_exemplars(path: Path, infos: Sequence, classes: Sequence[int], synthetic: int, config) -> None:
    """Write exemplars.json atomically (``config``: the run's ``TrainConfig``, for its axis and dataset)."""
    record = exemplar_record(infos, classes, synthetic, config.data.axis, config.data.path)
    atomic_write_text(path, json.dumps(record, indent=2))


def read_exemplars(run_dir: str | Path) -> list[tuple[str, int]]:
    """The (case, slice index) of every labelled slice a run learnt from; [] for a run written before the file
    existed."""
    from samadapt.runs import RunLayout

    path = RunLayout(Path(run_dir)).exemplars
    if not path.exists():
        return []
    return [(entry["case"], int(entry["slice"])) for entry in json.loads(path.read_text())["labelled"]]
