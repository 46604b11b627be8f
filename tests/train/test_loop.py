"""The one training loop (``train.loop``): what both loops get from it alike."""

import json
import signal

from samadapt.peft import apply_peft
from samadapt.runs import Manifest
from samadapt.train.checkpoints import SEAL, sealed_step
from samadapt.train.loop import StopSignals
from samadapt.train.samples import prepare_slices
from samadapt.train.trainer import Trainer
from tests.conftest import make_tiny_sam
from tests.train.test_trainer import disc_items, make_config


def tiny_trainer(run_dir, steps=2):
    overrides = {"train.steps": steps, "train.batch_size": 1, "train.val_every": 0, "train.precision": "fp32"}
    config = make_config("cheap-lunch", **overrides)
    model = make_tiny_sam(img_size=64)
    apply_peft(model, config.peft)
    manifest = Manifest(base_model="tiny", base_sha256="0" * 64, peft=config.peft.to_dict())
    return Trainer(config, model, prepare_slices(disc_items(2, 64), 64), [], [1], run_dir, manifest)


def test_without_validation_best_is_a_sealed_copy_of_last_and_follows_a_longer_resumed_run(tmp_path):
    trainer = tiny_trainer(tmp_path, steps=1)
    trainer.fit()
    best, last = tmp_path / "checkpoints" / "best", tmp_path / "checkpoints" / "last"
    assert sealed_step(best) == sealed_step(last) == 1
    names = {p.name for p in last.iterdir()}
    assert {p.name for p in best.iterdir()} == names and SEAL in names
    for name in names - {SEAL}:
        assert (best / name).read_bytes() == (last / name).read_bytes()
    assert json.loads((best / "adapter_config.json").read_text())["val_dice"] is None

    longer = tiny_trainer(tmp_path, steps=2)
    longer.fit(resume=True)
    assert longer.step == 2 and sealed_step(best) == 2  # not left at the first call's step
    (best / "adapter_model.safetensors").write_bytes(b"damaged")
    assert sealed_step(best) is None  # the seal notices a damaged copy


def test_metrics_log_leaves_a_missing_validation_score_empty(tmp_path):
    tiny_trainer(tmp_path, steps=2).fit()
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0] == "step,loss,lr,val_dice,seconds_per_step,loader_seconds"
    assert [line.split(",")[0] for line in lines[1:]] == ["1", "2"]
    assert all(line.split(",")[3] == "" for line in lines[1:])  # no validation set: no score, not "nan"


def test_stop_signals_record_the_signal_and_restore_the_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        signal.raise_signal(signal.SIGTERM)
        assert stop.signal == signal.SIGTERM and stop.name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before
