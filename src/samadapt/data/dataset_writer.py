"""Write a dataset's ``dataset.json`` in the MSD layout (or for a 2D folder dataset): the mirror of
``data.datasets.load_dataset``, used by the converters, the demo data, synthesis and the app's "adapt"."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from samadapt.errors import DataError
from samadapt.files import atomic_write_text


def write_msd_dataset(
    root: str | Path,
    training: Sequence[str | dict],
    classes: dict[int, str],
    modality: str,
    preprocessing: str | None,
    axis: int | None = 0,
    name: str = "",
    description: str = "",
    layout: str = "msd",
    test: Sequence[str] = (),
    **extra,
) -> Path:
    """Write ``dataset.json`` for the cases already in ``root`` (the mirror of ``load_dataset``); returns its path.

    Args:
        training: per case, a file name present in both ``imagesTr/`` and ``labelsTr/``, or an entry
            ``{"image": ..., "label": ..., ...}`` (its extra keys are kept). Ignored for ``layout="folders"``.
        classes: class id -> name, background excluded.
        preprocessing / axis: the ``samadapt`` block (the intensity preset and slicing axis training will use);
            ``None`` leaves a key out (the reader then picks its default).
        layout: ``msd`` (imagesTr/ + labelsTr/), or ``folders`` (2D images/ + masks/; no training list).
        test: unlabelled images (paths relative to ``root``, e.g. ``./imagesTs/x.nii.gz``), listed as ``test``.
        extra: further top-level entries (e.g. ``reference``); ``samadapt_extra`` adds keys to the samadapt block.

    Raises:
        DataError: a listed image or label does not exist (written files are checked, not trusted).
    """
    root = Path(root)
    entries = []
    for case in training if layout == "msd" else []:
        entry = dict(case) if isinstance(case, dict) else {"image": f"./imagesTr/{case}", "label": f"./labelsTr/{case}"}
        for part in ("image", "label"):
            if not (root / entry[part]).is_file():
                raise DataError(f"{root / entry[part]}: listed in dataset.json but not written")
        entries.append(entry)
    block = {"preprocessing": preprocessing, "axis": axis, **extra.pop("samadapt_extra", {})}
    meta = {
        "name": name or root.name,
        "description": description,
        **extra,
        "modality": {"0": modality},
        "labels": {"0": "background", **{str(int(c)): str(n) for c, n in sorted(classes.items())}},
        "numTraining": len(entries) if layout == "msd" else sum(1 for f in (root / "images").iterdir() if f.is_file()),
        "training": entries,
        "test": [str(t) for t in test],
        "samadapt": {k: v for k, v in block.items() if v is not None},
    }
    return atomic_write_text(root / "dataset.json", json.dumps(meta, indent=2))
