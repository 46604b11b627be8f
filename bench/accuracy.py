"""The accuracy protocol: what each recipe reaches from k labelled slices, on held-out real slices, beside baselines.

    python bench/accuracy.py [--quick] [--tasks lesions,mni152,regions] [--recipes cheap-lunch,samed,msa]
                             [--k 1,3,6,12] [--seeds 0,1,2] [--steps 60] [--section NAME] [--out docs/accuracy.md]

Tasks. Within one volume (2D, held-out slices of the volumes the exemplars come from):

- ``lesions``: the five pyradiomics lesion volumes (brain / breast MRI, chest CT), one class; exemplars are random
  labelled slices (``select_exemplars``, strategy ``random``).
- ``mni152``: the MNI152 template, grey / white matter; exemplars one random slice in each of k equal strata of the
  brain's inner 80 % of slices (a user labelling a few slices spread through a volume).
- ``regions``: the MNI152 grey matter split into 8 regions (``fetch_regions``), many small classes; exemplars as for
  ``mni152``.
- ``abdomen_ct``: one abdominal CT (TotalSegmentator s0009) with Synapse's 8 organs, read in place from
  ``../shared/data/abdomen_ct`` (``SAMADAPT_SHARED_DATA`` overrides the folder); exemplars as for ``mni152``.

Across patients (3D: whole volumes of patients the model never saw, scored with the voxel spacing):

- ``hn_oar``: 6 head-and-neck CTs, 7 organs at risk (OpenKBP); ``brats``: 6 BraTS FLAIR volumes, 4 tumour labels.
  The first two patients (sorted case ids) give the exemplars: k slices of each, one random slice in each of k equal
  strata of that patient's labelled slices (inner 80 %); the other patients are predicted whole (prompted: every
  slice where an object exists, with the prompt drawn from its ground truth) and scored per organ in 3D (Dice, HD95,
  NSD at 2 mm). ``--max-volumes`` caps how many of them are predicted.

For every (task, k, seed): the exemplars, then the held-out slices (labelled slices at least ``--gap`` slices from
every exemplar of the same case, at most ``--max-test`` of them, evenly spread), then

- every recipe trained on the exemplars (prompted recipes also on a few target-free slices, as ``samadapt train``
  does) and evaluated on the held-out slices: ``none`` for the semantic recipe (samed), ``point:1``, ``point:3`` and
  ``box`` for the prompted ones (cheap-lunch, msa);
- the un-adapted model with the same prompts (same seed: identical clicks and boxes);
- "copy the nearest exemplar": each held-out slice predicted as the label of the nearest exemplar slice of the same
  case (empty when its case has no exemplar), all classes at once: what a few labelled slices give with no learning;
- "shape interpolation" (within-volume tasks): the signed-distance blend of the two exemplar slices that bracket a
  held-out slice (``samadapt.data.interpolate``, the "fill between slices" of Slicer / ITK-SNAP; empty outside them).

Dice, HD95 (mm) and NSD come from ``samadapt.eval`` (within a volume: 2D, pixel spacing, per slice; across patients:
3D per volume; mean over units then classes). Each
cell is mean +- standard deviation over seeds (of the per-seed means). The table, the grid, the exact command and the
wall time are written between ``<!-- accuracy:SECTION -->`` markers of ``--out`` (other sections are kept), and the
raw numbers to ``--runs``/results-SECTION.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import write_section  # noqa: E402
from samadapt.data.datasets import DatasetSpec, SliceDataset, load_dataset
from samadapt.data.demo import fetch_demo, fetch_regions
from samadapt.data.interpolate import interpolate_slice
from samadapt.data.synthesis import select_exemplars
from samadapt.demo import held_out, recipe_config, spread
from samadapt.eval.evaluate import Evaluation, evaluate_slices_under, evaluate_volumes
from samadapt.eval.metrics import aggregate, binary_metrics
from samadapt.runs import load_run
from samadapt.selection import DEFAULT_ONE_CLICK, ONE_CLICK_RULES
from samadapt.train.api import fit_slices
from samadapt.train.config import TrainConfig

PROMPTS = ("point:1", "point:3", "box")
SEMANTIC_RECIPES = ("samed",)


# the real labelled CT / MRI handed to the project (../shared/data beside the clone): read in place, never copied
SHARED_DATA = Path(os.environ.get("SAMADAPT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def shared_dataset(name: str) -> Path:
    """A dataset of ``SHARED_DATA`` by folder name, refused with the path when it is not there."""
    root = SHARED_DATA / name
    if not (root / "dataset.json").is_file():
        raise SystemExit(
            f"{root}/dataset.json not found: the shared real data lies beside the clone as ../shared/data "
            "(or set SAMADAPT_SHARED_DATA to its folder)"
        )
    return root


@dataclass(frozen=True)
class Task:
    name: str
    dataset: Callable[[], Path]
    classes: tuple[int, ...] | None  # None: every class of the dataset
    selection: str  # "random" (select_exemplars) or "strata"
    scope: str = "slices"  # "slices": held-out 2D slices of the same volumes; "patients": other patients, in 3D
    train_patients: int = 2  # "patients" scope: how many patients (first by case id) give the exemplars


TASKS = {
    "lesions": Task("lesions", lambda: fetch_demo()["lesions"], None, "random"),
    "mni152": Task("mni152", lambda: fetch_demo()["mni152"], None, "strata"),
    "regions": Task("regions", fetch_regions, None, "strata"),
    "abdomen_ct": Task("abdomen_ct", lambda: shared_dataset("abdomen_ct"), None, "strata"),
    "hn_oar": Task("hn_oar", lambda: shared_dataset("hn_oar"), None, "strata", scope="patients"),
    "brats": Task("brats", lambda: shared_dataset("brats_flair"), None, "strata", scope="patients"),
}


# ------------------------------------------------------------------------------------------------------- selection
def candidates(slices: SliceDataset, classes: list[int], selection: str) -> list[int]:
    """Slices that may be exemplars or held-out slices: every labelled slice; for the one-volume tasks the inner
    80 % (the tips of the brain hold a few pixels of tissue)."""
    labelled = slices.indices(classes)
    if selection == "strata":
        cut = len(labelled) // 10
        labelled = labelled[cut : len(labelled) - cut]
    return labelled


def choose_exemplars(slices: SliceDataset, pool: list[int], classes: list[int], task: Task, k: int, seed: int):
    """k exemplar slice indices, seeded: random labelled slices, or one random slice in each of k equal strata."""
    if task.selection == "random":
        return select_exemplars(slices, k, classes, strategy="random", seed=seed)
    return strata(pool, k, np.random.default_rng([seed, k]))


def strata(pool: list[int], k: int, rng: np.random.Generator) -> list[int]:
    """One random index of ``pool`` in each of k equal strata (a user labelling a few slices spread through a volume)."""
    edges = np.linspace(0, len(pool), k + 1).astype(int)
    return [pool[int(rng.integers(lo, max(lo + 1, hi)))] for lo, hi in zip(edges[:-1], edges[1:], strict=True)]


def patient_exemplars(slices: SliceDataset, classes: list[int], cases: list[str], k: int, seed: int) -> list[int]:
    """k exemplars in each of ``cases``: strata of that patient's labelled slices (inner 80 %), seeded per patient."""
    chosen = []
    for number, case in enumerate(cases):
        pool = slices.indices(classes, cases=[case], require=True)
        cut = len(pool) // 10
        pool = pool[cut : len(pool) - cut] or pool
        chosen += strata(pool, min(k, len(pool)), np.random.default_rng([seed, k, number]))
    return chosen


def copy_nearest(slices: SliceDataset, exemplars: list[int], test_items: list[dict], classes: dict[int, str]) -> dict:
    """Scores of predicting each held-out slice as the label of the nearest exemplar slice of its case (empty when
    the case has no exemplar); the ``aggregate`` summary (mean_dice, mean_hd95_mm, per_class)."""
    by_case: dict[str, list[tuple[int, int]]] = {}
    for i in exemplars:
        case, z, _ = slices.slices[i]
        by_case.setdefault(case, []).append((z, i))
    labels: dict[int, np.ndarray] = {}
    rows = []
    for item in test_items:
        mine = by_case.get(item["case"], [])
        if mine:
            _, nearest = min(mine, key=lambda entry: (abs(entry[0] - item["slice"]), entry[0]))
            if nearest not in labels:
                labels[nearest] = slices[nearest]["label"]
            prediction = labels[nearest]
        else:
            prediction = np.zeros_like(item["label"])
        rows.extend(_rows(item, prediction, classes))
    return aggregate(rows, list(classes.values()))


def shape_interpolation(
    slices: SliceDataset, exemplars: list[int], test_items: list[dict], classes: dict[int, str]
) -> dict:
    """Scores of the "fill between slices" a Slicer / ITK-SNAP user has: each held-out slice is the signed-distance
    blend of the two exemplar slices of its case that bracket it (empty outside them); the ``aggregate`` summary."""
    by_case: dict[str, dict[int, np.ndarray]] = {}
    for i in exemplars:
        case, z, _ = slices.slices[i]
        by_case.setdefault(case, {})[z] = slices[i]["label"]
    rows = []
    for item in test_items:
        labelled = by_case.get(item["case"])
        spacing = item["spacing"]
        prediction = (
            interpolate_slice(labelled, item["slice"], list(classes), spacing)
            if labelled
            else np.zeros_like(item["label"])
        )
        rows.extend(_rows(item, prediction, classes))
    return aggregate(rows, list(classes.values()))


def _rows(item: dict, prediction: np.ndarray, classes: dict[int, str]) -> list[dict]:
    return [
        {
            "case": item["case"],
            "slice": item["slice"],
            "class": name,
            **binary_metrics(prediction == class_id, item["label"] == class_id, item["spacing"]),
        }
        for class_id, name in classes.items()
    ]


# ------------------------------------------------------------------------------------------------------------- grid
@dataclass
class Grid:
    tasks: list[str]
    recipes: list[str]
    ks: list[int]
    seeds: list[int]
    steps: int
    batch_size: int
    max_test: int
    gap: int
    lr: dict[str, float]
    overrides: list[str]
    reuse: Path | None = None
    max_volumes: int = 4
    one_click: str = DEFAULT_ONE_CLICK  # how adapted runs answer one click (``selection.ONE_CLICK_RULES``)


def _summary(summary: dict) -> dict:
    per_class = {name: values["dice"] for name, values in summary["per_class"].items()}
    return {
        "dice": summary["mean_dice"],
        "hd95": summary["mean_hd95_mm"],
        "nsd": summary["mean_nsd"],
        "per_class_dice": per_class,
        "per_class_hd95": {name: values["hd95_mm"] for name, values in summary["per_class"].items()},
    }


@dataclass
class CellSlices:
    """The slices of one (task, k, seed) cell: its classes, exemplars and what is scored: held-out slices (indices
    into ``slices``) of the same volumes, or (``test_cases``) whole volumes of other patients."""

    spec: DatasetSpec
    classes: dict[int, str]
    slices: SliceDataset
    k: int
    exemplars: list[int]
    test: list[int]
    test_cases: list[str] | None = None

    def training_items(self, prompted: bool) -> list[dict]:
        """The exemplars; a prompted recipe also gets max(1, k / 4) target-free slices of the exemplars' volumes, as
        ``samadapt train`` adds."""
        items = [self.slices[i] for i in self.exemplars]
        if prompted:
            cases = None if self.test_cases is None else sorted({self.slices.slices[i][0] for i in self.exemplars})
            with_target = set(self.slices.indices(list(self.classes), cases=cases))
            empty = [i for i in self.slices.indices(None, cases=cases) if i not in with_target]
            items += [self.slices[i] for i in spread(empty, max(1, self.k // 4))]
        return items

    @property
    def held_out(self) -> int:
        """How many units are scored: held-out slices, or volumes of other patients."""
        return len(self.test) if self.test_cases is None else len(self.test_cases)


def cell_slices(task: Task, k: int, seed: int, gap: int, max_test: int, max_volumes: int = 4) -> CellSlices:
    """Exemplars by the task's selection, and at most ``max_test`` held-out slices at least ``gap`` from them; for a
    cross-patient task, k exemplars in each training patient and at most ``max_volumes`` other patients to predict."""
    spec = load_dataset(task.dataset())
    classes = {c: spec.classes[c] for c in (task.classes or sorted(spec.classes))}
    slices = SliceDataset(spec)
    if task.scope == "patients":
        cases = sorted(case.id for case in spec.cases)
        train, test_cases = cases[: task.train_patients], cases[task.train_patients :][:max_volumes]
        exemplars = patient_exemplars(slices, list(classes), train, k, seed)
        return CellSlices(spec, classes, slices, k, exemplars, [], test_cases)
    pool = candidates(slices, list(classes), task.selection)
    exemplars = choose_exemplars(slices, pool, list(classes), task, k, seed)
    test = spread(held_out(slices, pool, exemplars, gap=gap - 1), max_test)
    return CellSlices(spec, classes, slices, k, exemplars, test)


def score(run, data: CellSlices, protocols: list[str], **same) -> list[Evaluation]:
    """Evaluations of ``run`` under each protocol: on the held-out slices (2D), or the test patients' volumes (3D)."""
    if data.test_cases is None:
        items = [data.slices[i] for i in data.test]
        return evaluate_slices_under(run, items, data.classes, protocols, **same)
    return [evaluate_volumes(run, data.slices, data.test_cases, data.classes, p, **same) for p in protocols]


def run_cell(task: Task, k: int, seed: int, grid: Grid, runs: Path, log: Callable[[str], None]) -> dict:
    """Everything for one (task, k, seed): exemplars, held-out slices, baselines, each recipe trained and scored."""
    data = cell_slices(task, k, seed, grid.gap, grid.max_test, grid.max_volumes)
    spec, classes, slices, exemplars = data.spec, data.classes, data.slices, data.exemplars
    cell = {
        "task": task.name,
        "k": k,
        "seed": seed,
        "scope": task.scope,
        "exemplars": [list(slices.slices[i][:2]) for i in exemplars],
        "held_out": data.held_out,
        "results": {},
    }
    if not data.held_out:
        log(f"{task.name} k={k} seed={seed}: no held-out slice is {grid.gap} slices from every exemplar; skipped")
        return cell
    precision = TrainConfig().train.precision
    same = dict(seed=seed, precision=precision, progress=False)
    if data.test_cases is None:
        test_items = [slices[i] for i in data.test]
        cell["results"]["copy nearest exemplar"] = {
            "none": _summary(copy_nearest(slices, exemplars, test_items, classes))
        }
        cell["results"]["shape interpolation"] = {
            "none": _summary(shape_interpolation(slices, exemplars, test_items, classes))
        }
    if any(r not in SEMANTIC_RECIPES for r in grid.recipes) or data.test_cases is not None:
        # the un-adapted model with the same prompts; across patients also the reference for the semantic recipe
        tick = time.perf_counter()
        base = load_run("lite_medsam")
        evaluations = score(base, data, list(PROMPTS), **same)
        cell["results"]["un-adapted"] = {p: _summary(e.summary) for p, e in zip(PROMPTS, evaluations, strict=True)}
        cell["seconds_baseline"] = time.perf_counter() - tick
    for recipe in grid.recipes:
        semantic = recipe in SEMANTIC_RECIPES
        items = data.training_items(prompted=not semantic)
        config = recipe_config(recipe, grid.steps, grid.batch_size, seed, lr=grid.lr.get(recipe))
        if grid.overrides:
            from samadapt.train.config import layered_config

            config = layered_config(TrainConfig, config.to_dict(), sets=grid.overrides)
        config.data.path = str(spec.root)
        run_dir = runs / f"{task.name}_k{k}_s{seed}_{recipe}"
        tick = time.perf_counter()
        if grid.reuse is not None:  # score inference-side changes on the very checkpoints of an earlier run
            run_dir = grid.reuse / run_dir.name
            result = _trained(run_dir)
        else:
            synthetic = [] if semantic else _synthetic(config, slices, exemplars, classes)
            result = fit_slices(
                config, items, [], classes, run_dir, spec.preprocessing, verbose=False, synthetic_items=synthetic
            )
        trained = time.perf_counter() - tick
        adapted = load_run(run_dir, checkpoint="last")
        adapted.one_click = grid.one_click  # e.g. re-score the same checkpoints under another rule (--reuse)
        protocols = ["none"] if semantic else list(PROMPTS)
        evaluations = score(adapted, data, protocols, **same)
        entry = {p: _summary(e.summary) for p, e in zip(protocols, evaluations, strict=True)}
        losses = [row["loss"] for row in result.history]
        entry["train"] = {
            "steps": result.steps,
            "first_loss": losses[0],
            "last_loss": float(np.mean(losses[-5:])),
            "seconds": time.perf_counter() - tick,
            "train_seconds": trained,
            "warnings": _run_warnings(run_dir, evaluations, classes),
        }
        cell["results"][recipe] = entry
        best = max((v["dice"] for p, v in entry.items() if p != "train"), default=math.nan)
        log(
            f"{task.name} k={k} seed={seed} {recipe}: best Dice {best:.3f}, loss {losses[0]:.3f} -> "
            f"{entry['train']['last_loss']:.3f}, {entry['train']['seconds']:.0f} s"
        )
    return cell


def _synthetic(config: TrainConfig, slices: SliceDataset, exemplars: list[int], classes: dict[int, str]) -> list:
    """With ``--set data.synthesize_on_the_fly=true``: ``data.synthetic_size`` slices synthesised from the exemplars
    (Cheap Lunch), on target-free backgrounds of the exemplars' own cases (no lesion pasted into another modality)."""
    if not config.data.synthesize_on_the_fly:
        return []
    from samadapt.data.synthesis import SynthesisConfig, background_slices, synthesize

    seed = config.train.seed
    cases = sorted({slices.slices[i][0] for i in exemplars})
    backgrounds = [slices[i]["image"] for i in background_slices(slices, list(classes), cases, limit=200, seed=seed)]
    if not backgrounds:
        raise SystemExit("synthesis needs target-free background slices in the exemplars' cases; this task has none")
    exemplar_items = [slices[i] for i in exemplars]
    size = config.data.synthetic_size
    return synthesize(exemplar_items, backgrounds, size, SynthesisConfig(), seed=seed, classes=list(classes))


def _trained(run_dir: Path) -> SimpleNamespace:
    """An earlier run of the same cell (``--reuse``): its steps and loss history from ``metrics.csv``."""
    if not (run_dir / "checkpoints" / "last").is_dir():
        raise SystemExit(f"--reuse: {run_dir} holds no trained run (checkpoints/last is missing)")
    with (run_dir / "metrics.csv").open() as handle:
        history = [{"loss": float(row["loss"])} for row in csv.DictReader(handle)]
    return SimpleNamespace(steps=len(history), history=history)


def _run_warnings(run_dir: Path, evaluations, classes: dict[int, str]) -> list[str]:
    """The training run's own warnings (warnings.json, written at the end of ``Trainer.fit``), plus what the held-out
    evaluation shows: classes never predicted."""
    found = []
    path = run_dir / "warnings.json"
    if path.exists():
        found += json.loads(path.read_text()).get("warnings", [])
    for evaluation in evaluations:
        zero = [n for n, v in evaluation.summary["per_class"].items() if v["dice"] == 0.0]
        if len(zero) == len(classes):
            found.append(f"{evaluation.protocol}: Dice 0 for every class on the held-out slices")
        elif zero:
            found.append(f"{evaluation.protocol}: Dice 0 for {len(zero)} of {len(classes)} classes")
    return found


# ---------------------------------------------------------------------------------------------------------- report
def _stat(values: list[float], digits: int) -> str:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return "n/a"
    if len(finite) == 1:
        return f"{finite[0]:.{digits}f}"
    return f"{np.mean(finite):.{digits}f} ± {np.std(finite, ddof=1):.{digits}f}"


def table(cells: list[dict], grid: Grid) -> list[str]:
    """Markdown rows: one per (task, k, recipe, prompt), with the baselines for the same prompt beside (across
    patients, the semantic recipe's un-adapted reference is the un-adapted model with a box on the same slices)."""
    lines = [
        "| task | k | recipe | prompt | adapted Dice | adapted HD95 (mm) | adapted NSD | un-adapted Dice | "
        "un-adapted HD95 | copy nearest Dice | shape interp. Dice | min class Dice | held-out | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task in grid.tasks:
        for k in grid.ks:
            mine = [c for c in cells if c["task"] == task and c["k"] == k and c["results"]]
            if not mine:
                continue
            held = "/".join(str(c["held_out"]) for c in mine)
            across = mine[0].get("scope") == "patients"
            copy = [c["results"].get("copy nearest exemplar", {}).get("none", {}) for c in mine]
            shape = [c["results"].get("shape interpolation", {}).get("none", {}) for c in mine]
            for recipe in grid.recipes:
                protocols = ["none"] if recipe in SEMANTIC_RECIPES else list(PROMPTS)
                for prompt in protocols:
                    adapted = [c["results"][recipe][prompt] for c in mine if recipe in c["results"]]
                    reference = "box" if prompt == "none" and across else prompt
                    base = [  # no un-adapted model answers without a prompt
                        c["results"]["un-adapted"][reference]
                        for c in mine
                        if "un-adapted" in c["results"] and reference != "none"
                    ]
                    notes = sorted(
                        {
                            w
                            for c in mine
                            for w in c["results"][recipe]["train"]["warnings"]
                            if w.startswith(f"{prompt}:") or not any(w.startswith(f"{p}:") for p in (*PROMPTS, "none"))
                        }
                    )
                    if reference != prompt:
                        notes.insert(0, f"un-adapted: {reference}")
                    min_class = [min(a["per_class_dice"].values()) for a in adapted]
                    lines.append(
                        f"| {task} | {k} | {recipe} | {prompt} | {_stat([a['dice'] for a in adapted], 3)} | "
                        f"{_stat([a['hd95'] for a in adapted], 1)} | {_stat([a.get('nsd') for a in adapted], 3)} | "
                        f"{_stat([b['dice'] for b in base], 3)} | {_stat([b['hd95'] for b in base], 1)} | "
                        f"{_stat([c.get('dice') for c in copy], 3)} | {_stat([s.get('dice') for s in shape], 3)} | "
                        f"{_stat(min_class, 3)} | {held} | {'; '.join(notes)} |"
                    )
    return lines


def write_accuracy_section(path: Path, section: str, text: str) -> None:
    """``measure.write_section`` for docs/accuracy.md: its sections are marked ``accuracy:<section>``."""
    write_section(path, f"accuracy:{section}", text, title="# Accuracy from few labels\n")


# ------------------------------------------------------------------------------------------------------------- main
ALL_TASKS = "lesions,mni152,regions,abdomen_ct,hn_oar,brats"
# --quick touches every task once: one k, one seed, fewer steps, held-out slices and test patients
QUICK = dict(tasks=ALL_TASKS, recipes="cheap-lunch,samed", k="3", seeds="0", steps=40, max_test=12, max_volumes=2)
FULL = dict(tasks=ALL_TASKS, recipes="cheap-lunch,samed,msa", k="1,3,6,12", seeds="0,1,2", steps=200, max_volumes=4)


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def merged_results(paths: list[Path]) -> tuple[Grid, list[dict], list[str], float, str]:
    """One grid from the results files of several calls (e.g. one seed per core or per machine): their cells, the
    union of their tasks, recipes, k and seeds, their commands, summed wall time and threads per run.

    Raises:
        SystemExit: the calls differ in steps, batch size, held-out rule, learning rates or overrides, so their
            cells cannot share a table.
    """
    results = [json.loads(path.read_text()) for path in paths]
    grids = [r["grid"] for r in results]
    same = ("steps", "batch_size", "max_test", "gap", "lr", "overrides", "max_volumes", "one_click")
    for g in grids:  # results written before cross-patient tasks and the one-click option existed
        g.setdefault("max_volumes", FULL["max_volumes"])
        g.setdefault("one_click", "best")  # the only rule there was
    for path, other in zip(paths[1:], grids[1:], strict=True):
        differ = [key for key in same if other[key] != grids[0][key]]
        if differ:
            raise SystemExit(f"--merge: {path} differs from {paths[0]} in {', '.join(differ)}")

    def union(key: str) -> list:
        return sorted({value for g in grids for value in g[key]}, key=[v for g in grids for v in g[key]].index)

    grid = Grid(
        tasks=union("tasks"),
        recipes=union("recipes"),
        ks=sorted(union("ks")),
        seeds=sorted(union("seeds")),
        **{key: grids[0][key] for key in same},
    )
    cells = sorted((c for r in results for c in r["cells"]), key=lambda c: (c["task"], c["k"], c["seed"]))
    threads = "/".join(sorted({str(r.get("threads", "?")) for r in results}))
    return grid, cells, [r["command"] for r in results], sum(r["wall_seconds"] for r in results), threads


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"a reduced grid (~10-20 min on 2 CPU cores): {QUICK}")
    parser.add_argument("--tasks", help=f"comma-separated, of {', '.join(TASKS)}")
    parser.add_argument("--recipes", help="comma-separated recipe names")
    parser.add_argument("--k", help="exemplar counts, comma-separated")
    parser.add_argument("--seeds", help="seeds, comma-separated")
    parser.add_argument("--steps", type=int, help="training steps per run")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-test", type=int, default=24, help="held-out slices per (task, k, seed), spread")
    parser.add_argument("--max-volumes", type=int, help="cross-patient tasks: test patients predicted (default 4)")
    parser.add_argument("--gap", type=int, default=3, help="held-out slices are at least this far from exemplars")
    parser.add_argument("--lr", action="append", default=[], metavar="RECIPE=LR", help="a recipe's learning rate")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, all runs")
    parser.add_argument(
        "--reuse", type=Path, metavar="DIR", help="evaluate the runs an earlier call trained in DIR (RUNS/SECTION)"
    )
    parser.add_argument(
        "--merge", type=Path, nargs="+", metavar="RESULTS", help="no training: one table from results-*.json files"
    )
    parser.add_argument(
        "--one-click",
        choices=ONE_CLICK_RULES,
        default=DEFAULT_ONE_CLICK,
        help="how adapted runs answer one click alone: best of three (default), as they trained, or the single mask",
    )
    parser.add_argument("--section", default="latest", help="name of this table in --out (others are kept)")
    parser.add_argument("--title", default="", help="heading of the section")
    parser.add_argument("--out", type=Path, default=Path("docs/accuracy.md"))
    parser.add_argument("--runs", type=Path, default=Path("runs/accuracy"))
    args = parser.parse_args(argv)
    if args.merge:
        return write_merged(args.merge, args.out, args.section, args.title)
    preset = QUICK if args.quick else FULL
    grid = Grid(
        tasks=(args.tasks or preset["tasks"]).split(","),
        recipes=(args.recipes or preset["recipes"]).split(","),
        ks=_ints(args.k or preset["k"]),
        seeds=_ints(args.seeds or preset["seeds"]),
        steps=args.steps or preset["steps"],
        batch_size=args.batch_size,
        max_test=args.max_test if not args.quick or args.max_test != 24 else preset["max_test"],
        max_volumes=args.max_volumes or preset["max_volumes"],
        one_click=args.one_click,
        gap=args.gap,
        lr={r: float(v) for r, v in (item.split("=", 1) for item in args.lr)},
        overrides=args.set,
        reuse=args.reuse,
    )
    unknown = [t for t in grid.tasks if t not in TASKS]
    if unknown:
        parser.error(f"unknown tasks {unknown}; choose from {', '.join(TASKS)}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    started = time.perf_counter()
    runs = args.runs / args.section

    def log(message: str) -> None:
        print(f"[{(time.perf_counter() - started) / 60:5.1f} min] {message}", flush=True)

    cells = []
    partial = args.runs / f"results-{args.section}.partial.json"
    for name in grid.tasks:
        for k in grid.ks:
            for seed in grid.seeds:
                cells.append(run_cell(TASKS[name], k, seed, grid, runs, log))
                # each finished cell is kept: a long grid stopped part-way still has its numbers
                partial.parent.mkdir(parents=True, exist_ok=True)
                partial.write_text(json.dumps({"grid": grid.__dict__, "cells": cells}, indent=1, default=str))
    wall = time.perf_counter() - started
    command = "python bench/accuracy.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    threads = torch.get_num_threads()
    header = section_header(grid, args.title or args.section, f"Command: `{command}`", wall, str(threads))
    write_accuracy_section(args.out, args.section, "\n".join(header + table(cells, grid)))
    runs.mkdir(parents=True, exist_ok=True)
    (args.runs / f"results-{args.section}.json").write_text(
        json.dumps(
            {"grid": grid.__dict__, "wall_seconds": wall, "threads": threads, "command": command, "cells": cells},
            indent=1,
            default=str,
        )
    )
    print("\n".join(table(cells, grid)))
    log(f"done; table in {args.out} (section {args.section})")
    return 0


def write_merged(paths: list[Path], out: Path, section: str, title: str) -> int:
    grid, cells, commands, wall, threads = merged_results(paths)
    source = "Merged from " + "; ".join(f"`{c}`" for c in commands)
    write_accuracy_section(
        out, section, "\n".join(section_header(grid, title or section, source, wall, threads) + table(cells, grid))
    )
    print("\n".join(table(cells, grid)))
    return 0


def section_header(grid: Grid, title: str, source: str, wall: float, threads: str) -> list[str]:
    """The lines above a table: where it came from, the wall time, and the grid it measured."""
    lr = ", ".join(f"{r} {v:g}" for r, v in grid.lr.items()) or "recipe defaults"
    return [
        f"## {title}",
        "",
        f"{source}. Wall time {wall / 60:.1f} min on this machine ({threads} threads per run).",
        f"Grid: tasks {', '.join(grid.tasks)}; recipes {', '.join(grid.recipes)}; k = {grid.ks}; seeds {grid.seeds}; "
        f"{grid.steps} steps of batch {grid.batch_size}; learning rates: {lr}; overrides: {grid.overrides or 'none'}; "
        f"held-out slices at least {grid.gap} slices from every exemplar, at most {grid.max_test} per cell; "
        f"cross-patient tasks: k slices in each of 2 patients, at most {grid.max_volumes} other patients scored in 3D."
        + (f" Models not trained: the runs in {grid.reuse} re-evaluated." if grid.reuse else "")
        + (f" One click alone answered by: {grid.one_click}." if grid.one_click != DEFAULT_ONE_CLICK else ""),
        "Cells: mean ± standard deviation over seeds (a single number: one seed). 'held-out' lists the held-out "
        "slice count per seed. 'min class Dice' is the lowest per-class Dice of the adapted model.",
        "",
    ]


if __name__ == "__main__":
    sys.exit(main())
