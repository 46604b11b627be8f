"""The synthetic share (``data.synthetic_share``): drawn batches take synthetic slices at the set rate, however many
there are, so that a large synthetic set never drowns the few real exemplars."""

import numpy as np
import pytest
import torch

from samadapt.peft import apply_peft
from samadapt.runs import Manifest
from samadapt.train.samples import prepare_slices
from samadapt.train.trainer import Trainer, TrainingError
from tests.conftest import make_tiny_sam
from tests.train.test_trainer import disc_items, make_config

REAL, SYNTHETIC = 4, 60


def trainer_with_synthetic(tmp_path, share: float, synthetic: int = SYNTHETIC) -> Trainer:
    overrides = {"train.batch_size": 4, "train.precision": "fp32", "data.synthetic_share": share}
    config = make_config("cheap-lunch", **overrides)
    model = make_tiny_sam(64)
    apply_peft(model, config.peft)
    real = disc_items(count=REAL, size=64, seed=0)
    fake = [{**item, "case": "synth"} for item in disc_items(count=synthetic, size=64, seed=1)]
    manifest = Manifest(base_model="tiny", base_sha256="0" * 64, peft=config.peft.to_dict())
    slices = prepare_slices(real + fake, 64)
    return Trainer(config, model, slices, [], [1], tmp_path, manifest, synthetic=synthetic)


@pytest.mark.parametrize("share", [0.0, 0.2, 0.5, 1.0])
def test_drawn_batches_hold_synthetic_slices_at_the_set_share(tmp_path, share):
    trainer = trainer_with_synthetic(tmp_path, share)
    picks = np.array([i for step in range(500) for i in trainer.picks_for(step, 0)])
    assert len(picks) == 2000
    synthetic = picks >= REAL
    # 60 synthetic slices against 4 real ones: a uniform draw would give 0.94; the setting decides instead
    assert abs(synthetic.mean() - share) < 0.04
    if share < 1:  # every real exemplar is seen
        assert set(picks[~synthetic].tolist()) == set(range(REAL))


def test_a_batch_trains_on_real_and_synthetic_slices(tmp_path):
    trainer = trainer_with_synthetic(tmp_path, 0.5)
    cases = [trainer.train_slices[i].case for step in range(10) for i in trainer.picks_for(step, 0)]
    assert {"synth"} < set(cases)
    row = trainer.train_step()
    assert torch.isfinite(torch.tensor(row["loss"]))


def test_without_synthetic_slices_the_draws_are_unchanged(tmp_path):
    # the share only matters with synthetic slices: the same seed draws what it drew before the setting existed
    a = trainer_with_synthetic(tmp_path / "a", 0.9, synthetic=0)
    b = trainer_with_synthetic(tmp_path / "b", 0.1, synthetic=0)
    assert [a.picks_for(s, 0) for s in range(20)] == [b.picks_for(s, 0) for s in range(20)]


def test_share_outside_zero_one_and_all_synthetic_are_refused(tmp_path):
    with pytest.raises(ValueError, match="synthetic_share"):
        make_config("cheap-lunch", **{"data.synthetic_share": -0.1})
    config = make_config("cheap-lunch")
    model = apply_peft(make_tiny_sam(64), config.peft)
    slices = prepare_slices(disc_items(count=2, size=64), 64)
    with pytest.raises(TrainingError, match="must be real"):
        Trainer(
            config,
            model,
            slices,
            [],
            [1],
            tmp_path,
            Manifest(base_model="tiny", base_sha256="0" * 64, peft=config.peft.to_dict()),
            synthetic=2,
        )
