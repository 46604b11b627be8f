"""The accuracy protocol's own logic (bench/accuracy.py): exemplar choice, held-out gap, the copy baseline, the doc."""

import json

import nibabel as nib
import numpy as np
import pytest

from bench.accuracy import (
    Task,
    candidates,
    choose_exemplars,
    copy_nearest,
    merged_results,
    table,
    write_accuracy_section,
)
from samadapt.data.datasets import SliceDataset, load_dataset
from samadapt.demo import held_out


@pytest.fixture
def volume_dataset(tmp_path):
    """One (Z=30, Y=16, X=16) volume: class 1 a square that grows with z, class 2 on even slices 10..19."""
    root = tmp_path / "ds"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    label = np.zeros((30, 16, 16), np.uint8)
    for z in range(2, 28):
        label[z, 2 : 2 + z // 3, 2:6] = 1
    label[10:20:2, 10:14, 10:14] = 2
    image = (label * 50 + 10).astype(np.float32)
    for array, folder in ((image, "imagesTr"), (label, "labelsTr")):
        nib.save(nib.Nifti1Image(np.transpose(array, (2, 1, 0)), np.eye(4)), str(root / folder / "v.nii.gz"))
    meta = {
        "labels": {"0": "background", "1": "a", "2": "b"},
        "modality": {"0": "MRI"},
        "training": [{"image": "./imagesTr/v.nii.gz", "label": "./labelsTr/v.nii.gz"}],
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return SliceDataset(load_dataset(root))


def test_strata_exemplars_cover_the_volume_and_depend_on_the_seed(volume_dataset):
    slices = volume_dataset
    task = Task("t", lambda: None, None, "strata")
    pool = candidates(slices, [1, 2], "strata")
    assert len(pool) < len(slices.indices([1, 2]))  # the tips are left out
    chosen = choose_exemplars(slices, pool, [1, 2], task, 3, seed=0)
    thirds = np.array_split(pool, 3)
    assert [c in third for c, third in zip(chosen, thirds, strict=True)] == [True, True, True]
    assert chosen == choose_exemplars(slices, pool, [1, 2], task, 3, seed=0)
    others = {tuple(choose_exemplars(slices, pool, [1, 2], task, 3, seed=s)) for s in range(1, 6)}
    assert len(others | {tuple(chosen)}) > 1
    # held-out slices (gap 3 -> held_out(gap=2)) are at least 3 slices from every exemplar
    test = held_out(slices, pool, chosen, gap=2)
    assert test and all(abs(slices.slices[t][1] - slices.slices[e][1]) >= 3 for t in test for e in chosen)


def test_copy_nearest_uses_the_nearest_exemplar_label_of_the_same_case(volume_dataset):
    slices = volume_dataset
    classes = {1: "a", 2: "b"}
    exemplars = [slices.slices.index(("v", z, slices.slices[z][2])) for z in (6, 20)]
    # slice 7 copies exemplar 6: class 1 nearly equal; class 2 absent in both -> NaN (excluded)
    near = copy_nearest(slices, exemplars, [slices[7]], classes)
    gt, copied = slices[7]["label"] == 1, slices[6]["label"] == 1
    assert near["per_class"]["a"]["dice"] == pytest.approx(2 * (gt & copied).sum() / (gt.sum() + copied.sum()))
    assert near["per_class"]["b"]["cases"] == 0
    # slice 12 holds class 2; its nearest exemplar (6, 6 away; 20 is 8 away) has none: Dice 0 for class 2
    assert copy_nearest(slices, exemplars, [slices[12]], classes)["per_class"]["b"]["dice"] == 0.0
    # a perfect copy: the exemplar itself
    assert copy_nearest(slices, exemplars, [slices[20]], classes)["per_class"]["a"]["dice"] == 1.0
    # a case without exemplars is predicted empty
    item = dict(slices[7], case="other")
    assert copy_nearest(slices, exemplars, [item], classes)["per_class"]["a"]["dice"] == 0.0


def test_sections_are_replaced_and_kept(tmp_path):
    doc = tmp_path / "accuracy.md"
    write_accuracy_section(doc, "before", "table one")
    write_accuracy_section(doc, "after", "table two")
    write_accuracy_section(doc, "before", "table three")
    text = doc.read_text()
    assert "table one" not in text and "table three" in text and "table two" in text
    assert text.index("table three") < text.index("table two")


def _results(path, seed, dice, copy, steps=40):
    """A results file as one bench call writes it: one regions cell of a samed run."""
    summary = {"dice": dice, "hd95": 10.0, "per_class_dice": {"a": dice}}
    cell = {
        "task": "regions",
        "k": 3,
        "seed": seed,
        "held_out": 12,
        "results": {
            "copy nearest exemplar": {"none": {"dice": copy, "hd95": 20.0, "per_class_dice": {"a": copy}}},
            "samed": {"none": summary, "train": {"warnings": []}},
        },
    }
    grid = dict(
        tasks=["regions"], recipes=["samed"], ks=[3], seeds=[seed], steps=steps, batch_size=2, max_test=12, gap=3
    )
    grid.update(lr={}, overrides=[], reuse=None)
    path.write_text(
        json.dumps({"grid": grid, "wall_seconds": 60.0, "threads": 1, "command": f"s{seed}", "cells": [cell]})
    )
    return path


def test_results_of_calls_per_seed_merge_into_one_table_and_other_grids_are_refused(tmp_path):
    first = _results(tmp_path / "a.json", 1, 0.5, 0.4)
    second = _results(tmp_path / "b.json", 0, 0.3, 0.2)
    grid, cells, commands, wall, threads = merged_results([first, second])
    assert grid.seeds == [0, 1] and [c["seed"] for c in cells] == [0, 1] and wall == 120.0 and threads == "1"
    row = table(cells, grid)[-1]
    assert "| regions | 3 | samed | none | 0.400 ± 0.141 |" in row and "| 0.300 ± 0.141 |" in row
    with pytest.raises(SystemExit, match="differs .* in steps"):
        merged_results([first, _results(tmp_path / "c.json", 2, 0.3, 0.2, steps=80)])
