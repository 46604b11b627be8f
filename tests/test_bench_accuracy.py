"""The accuracy protocol's own logic (bench/accuracy.py): exemplar choice, held-out gap, the copy baseline, the doc."""

import json
import math

import nibabel as nib
import numpy as np
import pytest

from bench.accuracy import (
    SHARED_DATA,
    TASKS,
    Grid,
    Task,
    candidates,
    cell_slices,
    choose_exemplars,
    copy_nearest,
    merged_results,
    run_cell,
    shape_interpolation,
    shared_dataset,
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
            # the prompted baseline of a grid with prompted recipes too: a semantic row has no un-adapted cell
            "un-adapted": {"box": {"dice": 0.9, "hd95": 1.0, "per_class_dice": {"a": 0.9}}},
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
    assert "0.900" not in row  # the un-adapted box is not a baseline of a prompt-free row
    with pytest.raises(SystemExit, match="differs .* in steps"):
        merged_results([first, _results(tmp_path / "c.json", 2, 0.3, 0.2, steps=80)])


# ---------------------------------------------------------------------- protocol v2: the real CT / MRI of ../shared/data
def _crop_dataset(tmp_path, name: str, cases: int, box: tuple[slice, slice, slice]):
    """A small MSD dataset from the first ``cases`` cases of a real shared dataset, cropped to ``box`` ((z, y, x) of
    SimpleITK's array order): real intensities, labels and spacing, written to tmp_path (never into the repo)."""
    from samadapt.data.io import read_volume

    source = load_dataset(shared_dataset(name))
    root = tmp_path / name
    pairs = []
    for case in source.cases[:cases]:
        image, label = read_volume(case.image), read_volume(case.label)
        pairs.append((case.id, image.array[box], label.array[box].astype(np.uint8), image.spacing))
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
    entries = []
    for case_id, image, label, spacing in pairs:
        for array, folder in ((image, "imagesTr"), (label, "labelsTr")):
            affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
            nib.save(nib.Nifti1Image(np.transpose(array, (2, 1, 0)), affine), str(root / folder / f"{case_id}.nii.gz"))
        entries.append({"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"})
    meta = json.loads((source.root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "training": entries, "numTraining": len(entries)}))
    return root


def test_the_shared_tasks_are_registered_and_read_in_place():
    for name, folder in (("abdomen_ct", "abdomen_ct"), ("hn_oar", "hn_oar"), ("brats", "brats_flair")):
        assert TASKS[name].dataset() == SHARED_DATA / folder
    assert TASKS["hn_oar"].scope == TASKS["brats"].scope == "patients" and TASKS["abdomen_ct"].scope == "slices"
    spec = load_dataset(TASKS["abdomen_ct"].dataset())
    assert spec.preprocessing.startswith("ct_") and len(spec.classes) == 8


def test_cross_patient_cells_train_on_two_patients_and_score_the_others_whole(tmp_path):
    # head-and-neck CT, real: 4 patients, slices 0-40 (the first ones hold no organ), a 64 x 64 crop of the neck
    root = _crop_dataset(tmp_path, "hn_oar", 4, (slice(0, 40), slice(32, 96), slice(32, 96)))
    task = Task("hn", lambda: root, None, "strata", scope="patients")
    data = cell_slices(task, 3, 0, gap=3, max_test=12, max_volumes=1)
    cases = sorted(case.id for case in data.spec.cases)
    exemplar_cases = [data.slices.slices[i][0] for i in data.exemplars]
    assert sorted(set(exemplar_cases)) == cases[:2] and [exemplar_cases.count(c) for c in cases[:2]] == [3, 3]
    assert data.test_cases == cases[2:3] and data.held_out == 1 and data.test == []
    # target-free slices for a prompted recipe come from the training patients too, never from a test patient
    items = data.training_items(prompted=True)
    assert len(items) == 6 + 1 and {item["case"] for item in items} <= set(cases[:2])
    assert cell_slices(task, 3, 0, 3, 12, 1).exemplars == data.exemplars  # seeded
    assert cell_slices(task, 3, 1, 3, 12, 1).exemplars != data.exemplars


def test_shape_interpolation_fills_between_exemplars_of_the_real_abdomen(tmp_path):
    # abdominal CT, real: 30 slices through liver and left kidney (in this volume's order, slices 145-174)
    root = _crop_dataset(tmp_path, "abdomen_ct", 1, (slice(145, 175), slice(None), slice(None)))
    slices = SliceDataset(load_dataset(root))
    classes = {5: "liver", 3: "left kidney"}
    index = {z: i for i, (_, z, _) in enumerate(slices.slices)}
    exemplars = [index[5], index[25]]
    # the exemplars themselves come back exactly; a slice between them is a close blend; outside them: empty
    exact = shape_interpolation(slices, exemplars, [slices[index[25]]], classes)
    assert exact["per_class"]["liver"]["dice"] == 1.0
    between = shape_interpolation(slices, exemplars, [slices[index[15]]], classes)
    copied = copy_nearest(slices, exemplars, [slices[index[15]]], classes)
    # the liver changes smoothly over these 30 mm: the blend beats copying the nearer exemplar (0.77 vs 0.45)
    assert between["per_class"]["liver"]["dice"] > max(0.7, copied["per_class"]["liver"]["dice"] + 0.2)
    assert between["mean_dice"] > copied["mean_dice"]
    outside = shape_interpolation(slices, exemplars, [slices[index[2]]], classes)
    assert outside["per_class"]["liver"]["dice"] == 0.0


@pytest.mark.slow
def test_a_cross_patient_cell_runs_end_to_end_and_is_scored_in_3d(tmp_path):
    root = _crop_dataset(tmp_path, "hn_oar", 3, (slice(50, 58), slice(32, 96), slice(32, 96)))
    task = Task("hn", lambda: root, (1, 2), "strata", scope="patients")
    grid = Grid(["hn"], ["samed"], [1], [0], steps=2, batch_size=2, max_test=4, gap=3, lr={}, overrides=[])
    cell = run_cell(task, 1, 0, grid, tmp_path / "runs", log=lambda message: None)
    assert cell["scope"] == "patients" and cell["held_out"] == 1
    assert "copy nearest exemplar" not in cell["results"]  # within-volume baselines only
    assert set(cell["results"]["un-adapted"]) == {"point:1", "point:3", "box"}
    box = cell["results"]["un-adapted"]["box"]
    assert (
        0.0 < box["dice"] <= 1.0
        and 0.0 <= box["nsd"] <= 1.0
        and set(box["per_class_dice"])
        == {
            "brainstem",
            "spinal cord",
        }
    )
    samed = cell["results"]["samed"]
    assert samed["train"]["steps"] == 2 and math.isfinite(samed["none"]["dice"])
    rows = table([cell], Grid(["hn"], ["samed"], [1], [0], 2, 2, 4, 3, {}, []))
    assert "| hn | 1 | samed | none |" in rows[-1] and "un-adapted: box" in rows[-1]
    assert f"| {box['dice']:.3f} |" in rows[-1]
