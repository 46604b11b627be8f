"""Streaming training data: slices read per batch (DataLoader workers for data on disk), the same run whatever
the number of workers, and no slice image held in memory by the trainer."""

import pytest
import torch

from samadapt.data.datasets import SliceDataset, load_dataset
from samadapt.peft import apply_peft
from samadapt.runs import Manifest
from samadapt.train.samples import ItemChain, TrainingSlices, prepare_slice
from samadapt.train.trainer import Trainer
from tests.conftest import make_tiny_sam
from tests.data.test_synthesis import tiny_msd  # noqa: F401  (fixture)
from tests.train.test_trainer import make_config


def trainer_on_disk(root, run_dir, workers: int) -> Trainer:
    slices = SliceDataset(load_dataset(root))
    items = ItemChain(slices.subset(slices.indices([1, 2])), slices.subset(slices.indices(None)[:2]))
    config = make_config(
        "cheap-lunch",
        **{"train.steps": 3, "train.batch_size": 2, "train.precision": "fp32", "data.workers": workers},
    )
    torch.manual_seed(0)
    model = apply_peft(make_tiny_sam(64), config.peft)
    manifest = Manifest(base_model="tiny", base_sha256="0" * 64, peft=config.peft.to_dict())
    return Trainer(config, model, TrainingSlices(items, 64), [], [1, 2], run_dir, manifest)


def test_lazy_training_slices_read_from_the_index_and_prepare_on_demand(tiny_msd):  # noqa: F811
    slices = SliceDataset(load_dataset(tiny_msd))
    chosen = slices.indices([2])
    data = TrainingSlices(slices.subset(chosen), 64)
    assert data.lazy and not slices._volumes  # building the sampling facts read no volume
    assert [info.classes for info in data.infos] == [slices.slices[i][2] for i in chosen]
    prepared = data[1]
    expected = prepare_slice(slices[chosen[1]], 64)
    assert torch.equal(prepared.image, expected.image) and (prepared.label == expected.label).all()


@pytest.mark.slow
def test_worker_processes_give_exactly_the_run_of_the_training_process(tiny_msd, tmp_path):  # noqa: F811
    runs = []
    for workers in (0, 2):
        trainer = trainer_on_disk(tiny_msd, tmp_path / f"w{workers}", workers)
        assert not hasattr(trainer.train_slices[0], "image")  # the trainer keeps facts, not images
        result = trainer.fit()
        runs.append(([row["loss"] for row in result.history], [p.detach().clone() for p in trainer.params]))
    (losses_a, params_a), (losses_b, params_b) = runs
    assert losses_a == losses_b
    for a, b in zip(params_a, params_b, strict=True):
        assert torch.equal(a, b)


def test_picks_depend_only_on_seed_rank_and_step(tmp_path, tiny_msd):  # noqa: F811
    trainer = trainer_on_disk(tiny_msd, tmp_path / "a", 0)
    again = trainer_on_disk(tiny_msd, tmp_path / "b", 0)
    trainer.train_step()  # consuming batches and prompt draws does not move later steps' picks
    assert trainer.picks_for(5, 0) == again.picks_for(5, 0)
    assert trainer.picks_for(5, 0) != trainer.picks_for(6, 0) or trainer.picks_for(5, 0) != trainer.picks_for(7, 0)
