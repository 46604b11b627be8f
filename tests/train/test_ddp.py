"""DistributedDataParallel with two gloo processes on the CPU: identical parameters on both ranks after training."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from tests.train.test_trainer import make_trainer

    trainer = make_trainer(out_dir, **{"train.steps": 3, "train.val_every": 0, "train.batch_size": 1})
    assert trainer.world == 2 and trainer.rank == rank
    trainer.fit()
    state = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad}
    torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_end_with_identical_parameters(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    # and training moved them: LoRA B started at zero
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)
    # only rank 0 wrote the run directory
    assert (tmp_path / "checkpoints" / "last").exists()
