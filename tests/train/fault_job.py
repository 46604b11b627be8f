"""A tiny training job for the fault-injection tests, run in its own process (``python -m tests.train.fault_job``).

    fault_job RUN_DIR [--resume] [--fault KIND:STEP] [--data DIR --workers N [--pretrain | --predict]]

Faults: ``kill_in_step`` (SIGKILL during the forward pass of step STEP), ``kill_in_save`` (SIGKILL while the
checkpoint of step STEP is half written), ``kill_between_renames`` (SIGKILL after ``last`` became ``previous`` and
before the new ``last`` is in place), ``sigterm_in_step`` (SIGTERM during step STEP: a graceful stop), ``hold``
(wait inside the first step, holding the run directory, until RUN_DIR/release exists or STEP seconds passed). On success the trained tensors are saved to
RUN_DIR/final.pt.

With ``--data DIR`` (an MSD folder) the slices are read from disk by N DataLoader worker processes (the default
2 of a real run), and ``kill_in_step`` first writes the workers' process ids to RUN_DIR/workers.txt; ``--pretrain``
runs the encoder pre-training loop (ShED) on that folder instead of fine-tuning. ``--predict`` predicts the folder's
images (DIR/imagesTr) with a tiny semantic run into RUN_DIR/predictions; its fault ``kill_in_write:N`` is SIGKILL
while the label file of the N-th case is half written.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

import torch

from samadapt.data.datasets import SliceDataset, load_dataset
from samadapt.errors import TrainingInterruptedError
from samadapt.peft import apply_peft
from samadapt.peft.pretrained import encoder_only
from samadapt.pretrain.config import PretrainConfig, pretrain_defaults
from samadapt.pretrain.data import ModelInputs, unlabelled_slices
from samadapt.pretrain.objectives import PretrainHeads, mae_target_width, objectives_of
from samadapt.pretrain.trainer import Pretrainer
from samadapt.runs import Manifest
from samadapt.train import checkpoints
from samadapt.train.config import apply_overrides, from_dict
from samadapt.train.forward import LossForward
from samadapt.train.samples import TrainingSlices, prepare_slices
from samadapt.train.trainer import Trainer
from tests.conftest import make_tiny_sam
from tests.train.test_trainer import disc_items, make_config

STEPS = 6


OVERRIDES = {
    "train.steps": STEPS,
    "train.batch_size": 2,
    "train.checkpoint_every": 1,
    "train.precision": "fp32",
    "optim.lr": 3e-3,
    "optim.warmup_steps": 0,
}


def build(run_dir: Path, data: Path | None = None, workers: int = 0) -> Trainer:
    config = make_config("cheap-lunch", **OVERRIDES, **{"train.val_every": 0, "data.workers": workers})
    model = make_tiny_sam(img_size=64)
    torch.manual_seed(0)
    apply_peft(model, config.peft)
    manifest = Manifest(base_model="tiny", base_sha256="0" * 64, peft=config.peft.to_dict())
    if data is None:
        slices = prepare_slices(disc_items(4, 64), 64)
    else:  # read from disk on demand: the trainer's loader then runs worker processes
        dataset = SliceDataset(load_dataset(data))
        slices = TrainingSlices(dataset.subset(dataset.indices([1])), 64)
    return Trainer(config, model, slices, [], [1], run_dir, manifest)


def build_pretrainer(run_dir: Path, data: Path, workers: int) -> Pretrainer:
    values = apply_overrides(pretrain_defaults("cheap-lunch"), [f"{k}={v}" for k, v in OVERRIDES.items()])
    values = apply_overrides(values, ["method=shed", f"data.path={data}", f"data.workers={workers}"])
    config = from_dict(PretrainConfig, values)
    model = make_tiny_sam(img_size=64)
    torch.manual_seed(0)
    apply_peft(model, encoder_only(config.peft))
    encoder = model.image_encoder
    heads = PretrainHeads(
        objectives_of(config.method),
        features=encoder.neck[0].out_channels,
        target_width=mae_target_width(encoder, config.objective.patch),
    )
    manifest = {"base_model": "tiny", "base_sha256": "0" * 64, "peft": config.peft.to_dict()}
    inputs = ModelInputs(unlabelled_slices(str(data)), model.img_size)
    return Pretrainer(config, model, heads, inputs, run_dir, manifest)


def predict(run_dir: Path, data: Path, fault: str) -> None:
    from samadapt.data import io
    from samadapt.predict import predict_folder
    from tests.test_predict_volume import semantic_run

    kind, step = fault.split(":")
    if kind == "kill_in_write":
        write, written = io._write_label_file, []

        def half_written(reference, labels, dtype, suffix, target):
            written.append(target)
            if len(written) == int(step):
                Path(target).write_bytes(b"half a label file")
                os.kill(os.getpid(), signal.SIGKILL)
            return write(reference, labels, dtype, suffix, target)

        io._write_label_file = half_written
    predict_folder(semantic_run(), data / "imagesTr", run_dir / "predictions", device="cpu", progress=False)


def inject(trainer: Trainer | Pretrainer, kind: str, step: int) -> None:
    def at(target: int) -> bool:
        return trainer.step + 1 == target  # the step being trained (trainer.step counts finished ones)

    if kind in ("kill_in_step", "sigterm_in_step", "hold"):
        # the forward pass of a step: the fine-tuning loss, or the pre-training objectives
        owner, name = (Pretrainer, "batch_losses") if isinstance(trainer, Pretrainer) else (LossForward, "forward")
        forward = getattr(owner, name)

        def faulty(self, *args, **kwargs):
            if kind == "hold":
                release = trainer.layout.root / "release"
                deadline = time.monotonic() + step
                while at(1) and not release.exists() and time.monotonic() < deadline:
                    time.sleep(0.1)
            elif at(step):
                if kind == "kill_in_step":
                    workers = [str(child.pid) for child in multiprocessing.active_children()]
                    (trainer.layout.root / "workers.txt").write_text(" ".join(workers))
                os.kill(os.getpid(), signal.SIGKILL if kind == "kill_in_step" else signal.SIGTERM)
            return forward(self, *args, **kwargs)

        setattr(owner, name, faulty)
    elif kind == "kill_in_save":
        save = torch.save

        def half_written(obj, path, *args, **kwargs):
            if trainer.step == step:
                Path(path).write_bytes(b"\\x80 half a pickle")
                os.kill(os.getpid(), signal.SIGKILL)
            return save(obj, path, *args, **kwargs)

        torch.save = half_written
    elif kind == "kill_between_renames":
        rename = Path.rename

        def interrupted(self, target):
            result = rename(self, target)
            if trainer.step == step and Path(target).name == "previous":
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        Path.rename = interrupted
    elif kind != "none":
        raise SystemExit(f"unknown fault {kind}")
    assert checkpoints  # the module the renames happen in


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--fault", default="none:0")
    parser.add_argument("--data", type=Path)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--pretrain", action="store_true")
    parser.add_argument("--predict", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.predict:
        predict(args.run_dir, args.data, args.fault)
        return 0
    if args.pretrain:
        trainer = build_pretrainer(args.run_dir, args.data, args.workers)
    else:
        trainer = build(args.run_dir, args.data, args.workers)
    kind, step = args.fault.split(":")
    inject(trainer, kind, int(step))
    try:
        result = trainer.fit(resume=args.resume)
    except TrainingInterruptedError as stopped:
        print(stopped, file=sys.stderr)
        return 130
    final = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    if args.pretrain:
        final |= {f"heads.{name}": p.detach().clone() for name, p in trainer.heads.named_parameters()}
    torch.save({"params": final, "losses": [row["loss"] for row in result.history]}, args.run_dir / "final.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
