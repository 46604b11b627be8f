"""A tiny training job for the fault-injection tests, run in its own process (``python -m tests.train.fault_job``).

    fault_job RUN_DIR [--resume] [--fault KIND:STEP]

Faults: ``kill_in_step`` (SIGKILL during the forward pass of step STEP), ``kill_in_save`` (SIGKILL while the
checkpoint of step STEP is half written), ``kill_between_renames`` (SIGKILL after ``last`` became ``previous`` and
before the new ``last`` is in place), ``sigterm_in_step`` (SIGTERM during step STEP: a graceful stop), ``hold``
(wait inside the first step, holding the run directory, until RUN_DIR/release exists or STEP seconds passed). On success the trained tensors are saved to
RUN_DIR/final.pt.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch

from samadapt.errors import TrainingInterruptedError
from samadapt.peft import apply_peft
from samadapt.runs import Manifest
from samadapt.train import checkpoints
from samadapt.train.samples import prepare_slices
from samadapt.train.trainer import LossForward, Trainer
from tests.conftest import make_tiny_sam
from tests.train.test_trainer import disc_items, make_config

STEPS = 6


def build(run_dir: Path) -> Trainer:
    overrides = {
        "train.steps": STEPS,
        "train.batch_size": 2,
        "train.val_every": 0,
        "train.checkpoint_every": 1,
        "train.precision": "fp32",
        "optim.lr": 3e-3,
        "optim.warmup_steps": 0,
    }
    config = make_config("cheap-lunch", **overrides)
    model = make_tiny_sam(img_size=64)
    torch.manual_seed(0)
    apply_peft(model, config.peft)
    manifest = Manifest(base_model="tiny", base_sha256="0" * 64, peft=config.peft.to_dict())
    return Trainer(config, model, prepare_slices(disc_items(4, 64), 64), [], [1], run_dir, manifest)


def inject(trainer: Trainer, kind: str, step: int) -> None:
    def at(target: int) -> bool:
        return trainer.step + 1 == target  # the step being trained (trainer.step counts finished ones)

    if kind in ("kill_in_step", "sigterm_in_step", "hold"):
        forward = LossForward.forward

        def faulty(self, *args, **kwargs):
            if kind == "hold":
                release = trainer.layout.root / "release"
                deadline = time.monotonic() + step
                while at(1) and not release.exists() and time.monotonic() < deadline:
                    time.sleep(0.1)
            elif at(step):
                os.kill(os.getpid(), signal.SIGKILL if kind == "kill_in_step" else signal.SIGTERM)
            return forward(self, *args, **kwargs)

        LossForward.forward = faulty
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
    args = parser.parse_args()
    torch.set_num_threads(1)
    trainer = build(args.run_dir)
    kind, step = args.fault.split(":")
    inject(trainer, kind, int(step))
    try:
        result = trainer.fit(resume=args.resume)
    except TrainingInterruptedError as stopped:
        print(stopped, file=sys.stderr)
        return 130
    final = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    torch.save({"params": final, "losses": [row["loss"] for row in result.history]}, args.run_dir / "final.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
