"""Scale benchmark: does memory stay flat as a dataset grows from 4 to 64 volumes, and does data loading keep up?

    python bench/scale.py [--sizes 4 16 64] [--depth 64] [--predict-depth 8] [--work /tmp/samadapt-scale]
                          [--out docs/benchmarks.md]

For each N it generates N CT-like volumes of 512 x 512 x depth voxels (int16 HU, uncompressed NIfTI, an ellipsoid
"organ" spanning 2 slices) and measures, each in a fresh process so that peaks do not mix:

- train: 20 steps of the cheap-lunch recipe on LiteMedSAM, every labelled slice of the training cases, batch 2, two
  DataLoader workers reading the memory-mapped preprocessed cache; the share of step time spent waiting for data;
- evaluate: ``samadapt.evaluate`` with one click per object on every volume (3D metrics per volume);
- predict: folder prediction (``predict_folder``) of N volumes of 512 x 512 x predict_depth with a semantic run.

Peak resident memory is the process's own high-water mark (``VmHWM``), and its DataLoader workers' largest.
Goal (issue 12): peak memory at the largest N within 1.2x of the smallest, for all three; loader wait < 10 % of the
step time. The section written into OUT lies between the ``scale`` markers (``measure.write_section``); the rest of
the file is left as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import write_section  # noqa: E402

SIDE = 512
ORGAN_SLICES = 2  # labelled slices per volume: what prompted evaluation encodes
BATCH = 2


def make_dataset(root: Path, count: int, depth: int, with_labels: bool = True) -> Path:
    """N CT-like volumes (int16 HU, uncompressed NIfTI) with a 4-slice ellipsoid of class 1; reused when present."""
    import nibabel as nib

    done = root / "dataset.json"
    if done.exists():
        return root
    rng = np.random.default_rng(0)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(exist_ok=True)
    yy, xx = np.mgrid[:SIDE, :SIDE]
    training = []
    for i in range(count):
        image = rng.normal(40, 60, size=(SIDE, SIDE, depth)).astype(np.int16)  # NIfTI (x, y, z)
        label = np.zeros(image.shape, np.uint8)
        cx, cy = rng.integers(150, SIDE - 150, size=2)
        organ = ((xx - cx) / 60.0) ** 2 + ((yy - cy) / 45.0) ** 2 <= 1
        middle = depth // 2
        for z in range(max(0, middle - ORGAN_SLICES // 2), min(depth, middle + (ORGAN_SLICES + 1) // 2)):
            label[..., z][organ.T] = 1
        image[label == 1] += 200
        affine = np.diag([0.8, 0.8, 2.5, 1.0])
        nib.save(nib.Nifti1Image(image, affine), str(root / "imagesTr" / f"case{i:03d}.nii"))
        if with_labels:
            nib.save(nib.Nifti1Image(label, affine), str(root / "labelsTr" / f"case{i:03d}.nii.gz"))
        training.append({"image": f"./imagesTr/case{i:03d}.nii", "label": f"./labelsTr/case{i:03d}.nii.gz"})
    meta = {"labels": {"0": "background", "1": "organ"}, "modality": {"0": "CT"}, "training": training}
    done.write_text(json.dumps(meta))
    return root


def peaks(own_only: bool = False) -> dict:
    """Peak resident memory of this process (VmHWM: counted from its own start; ``ru_maxrss`` would also carry the
    parent's size at fork time), and of its largest DataLoader worker."""
    with open("/proc/self/status") as handle:
        own = next(int(line.split()[1]) for line in handle if line.startswith("VmHWM:")) / 1024  # KiB -> MiB
    if own_only:
        return {"peak_mb": own}
    # a worker is forked from this process: its figure includes pages it shares with it
    return {"peak_mb": own, "worker_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def run_train(data: Path, work: Path) -> dict:
    from samadapt.train.api import train
    from samadapt.train.config import TrainConfig, layered_config
    from samadapt.train.recipes import recipe_defaults

    overrides = [
        f"data.path={data}",
        "train.steps=20",
        f"train.batch_size={BATCH}",
        "train.val_every=0",
        "train.val_slices=4",
        "data.workers=2",
        "data.val_cases=1",
    ]
    config = layered_config(TrainConfig, recipe_defaults("cheap-lunch"), sets=overrides)
    started = time.perf_counter()
    result = train(config, work / "run")
    seconds = time.perf_counter() - started
    history = result.history  # seconds_per_step is the running mean since the first step
    # steps 2 to the end: the first step also starts the worker processes
    step_time = history[-1]["seconds_per_step"] * len(history) - history[0]["seconds_per_step"]
    waited = sum(row["loader_seconds"] for row in history[1:])
    return {
        "seconds": seconds,
        "slices_per_s": 20 * BATCH / seconds,
        "loader_wait_share": waited / max(step_time, 1e-9),
        **peaks(),
    }


def run_evaluate(data: Path, work: Path) -> dict:
    from samadapt.eval.evaluate import evaluate

    started = time.perf_counter()
    metrics = evaluate("lite_medsam", data, "point:1", progress=False)
    seconds = time.perf_counter() - started
    slices = metrics["units"] * ORGAN_SLICES
    return {"seconds": seconds, "slices_per_s": slices / seconds, "dice": metrics["mean_dice"], **peaks(own_only=True)}


def run_predict(data: Path, work: Path) -> dict:
    from samadapt.predict import predict_folder
    from samadapt.runs import load_run

    run = load_run(work.parent / "semantic-run")
    shutil.rmtree(work / "predictions", ignore_errors=True)  # folder prediction skips finished cases: start empty
    started = time.perf_counter()
    written = predict_folder(run, data / "imagesTr", work / "predictions", progress=False)
    seconds = time.perf_counter() - started
    slices = sum(1 for _ in written) * int(os.environ["SCALE_PREDICT_DEPTH"])
    return {"seconds": seconds, "slices_per_s": slices / seconds, **peaks(own_only=True)}


def semantic_run(data: Path, out: Path) -> None:
    """A one-step SAMed run: folder prediction needs a semantic model, its quality does not matter here."""
    from samadapt.train.api import train
    from samadapt.train.config import TrainConfig, layered_config
    from samadapt.train.recipes import recipe_defaults

    if (out / "checkpoints" / "best").exists():
        return
    overrides = [f"data.path={data}", "train.steps=1", "train.batch_size=1", "train.val_every=0", "data.workers=0"]
    overrides += ["train.val_slices=1"]
    train(layered_config(TrainConfig, recipe_defaults("samed"), sets=overrides), out)


TASKS = {"train": run_train, "evaluate": run_evaluate, "predict": run_predict}


def child(task: str, data: Path, work: Path) -> None:
    import torch

    torch.manual_seed(0)
    result = TASKS[task](data, work)
    print("RESULT " + json.dumps(result), flush=True)


def measure(task: str, data: Path, work: Path, predict_depth: int) -> dict:
    env = {**os.environ, "SCALE_PREDICT_DEPTH": str(predict_depth)}
    command = [sys.executable, __file__, "--child", task, str(data), str(work)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"{task} on {data} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--depth", type=int, default=64)
    parser.add_argument("--predict-depth", type=int, default=8)
    parser.add_argument("--work", type=Path, default=Path("/tmp/samadapt-scale"))
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], Path(args.child[1]), Path(args.child[2]))
        return 0
    started = time.perf_counter()
    # results accumulate in WORK/results.json, so one task can be measured again without the others
    store = args.work / "results.json"
    saved = json.loads(store.read_text()) if store.exists() else {}
    results: dict[str, dict[int, dict]] = {t: {int(n): r for n, r in saved.get(t, {}).items()} for t in TASKS}
    semantic_run(make_dataset(args.work / "data-4", 4, args.depth), args.work / "semantic-run")
    for n in args.sizes:
        data = make_dataset(args.work / f"data-{n}", n, args.depth)
        pred_data = make_dataset(args.work / f"predict-{n}", n, args.predict_depth, with_labels=False)
        for task in args.tasks:
            source = pred_data if task == "predict" else data
            work = args.work / f"{task}-{n}"
            results[task][n] = measure(task, source, work, args.predict_depth)
            print(f"N={n} {task}: {json.dumps(results[task][n])}", flush=True)
            store.write_text(json.dumps(results, indent=1))
    small, large = min(args.sizes), max(args.sizes)
    table = [
        "## Scale: memory and throughput from 4 to 64 volumes (`bench/scale.py`)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores. Volumes 512 x 512 x "
        f"{args.depth} (predict: x {args.predict_depth}), LiteMedSAM, fp32 on the CPU. Each cell: peak resident MiB "
        f"of the process (its DataLoader workers' largest in brackets) and slices/s. Wall time "
        f"{(time.perf_counter() - started) / 60:.1f} min.",
        "",
        "| task | " + " | ".join(f"N = {n}" for n in args.sizes) + f" | peak N={large} / N={small} | goal <= 1.2 |",
        "|---|" + "---|" * (len(args.sizes) + 2),
    ]
    for task in TASKS:
        cells = []
        for n in args.sizes:
            r = results[task][n]
            workers = f" [{r['worker_peak_mb']:.0f}]" if task == "train" else ""
            cells.append(f"{r['peak_mb']:.0f} MiB{workers}, {r['slices_per_s']:.2f} sl/s")
        ratio = results[task][large]["peak_mb"] / results[task][small]["peak_mb"]
        table.append(f"| {task} | " + " | ".join(cells) + f" | {ratio:.2f} | {'met' if ratio <= 1.2 else 'NOT met'} |")
    waits = [results["train"][n]["loader_wait_share"] for n in args.sizes]
    table += [
        "",
        f"Loader wait during training (steps 2-20, two workers): {', '.join(f'{100 * w:.1f} %' for w in waits)} of "
        f"the step time for N = {', '.join(map(str, args.sizes))} (goal < 10 %: "
        f"{'met' if max(waits) < 0.10 else 'NOT met'}).",
    ]
    write_section(args.out, "scale", "\n".join(table))
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
