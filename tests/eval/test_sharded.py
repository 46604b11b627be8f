"""``samadapt evaluate`` at scale: under torchrun two gloo ranks share the volumes and write one report, equal to the
single-process report; a rerun skips the volumes a killed evaluation had finished."""

import json
import os
import socket
import subprocess
import sys

import pytest

import samadapt
from tests.data.conftest import write_msd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_give_the_single_process_report(tmp_path):
    root = write_msd(tmp_path / "data", cases=3, shape=(24, 20, 6))
    single = samadapt.evaluate("lite_medsam", root, "box", out=tmp_path / "single", progress=False)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    # "--" ends torchrun's own options: without it, its parser takes "--run" for an abbreviation of "--run-path"
    command += ["-m", "--", "samadapt.cli", "evaluate", "--run", "lite_medsam", "--data", str(root), "--prompt", "box"]
    command += ["--device", "cpu", "--out", str(tmp_path / "sharded")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        command, capture_output=True, encoding="utf-8", errors="replace", env=env, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    sharded = json.loads((tmp_path / "sharded" / "metrics.json").read_text())
    assert sharded["cases"] == single["cases"] == 3
    for key in ("mean_dice", "mean_iou", "mean_hd95_mm", "mean_nsd"):
        assert sharded[key] == pytest.approx(single[key], abs=1e-6, nan_ok=True), key
    single_rows = (tmp_path / "single" / "metrics.csv").read_text()
    assert (tmp_path / "sharded" / "metrics.csv").read_text() == single_rows


def _rank_worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    import samadapt.eval.evaluate as evaluate_module

    torch.set_num_threads(1)
    real = evaluate_module.evaluate_volumes

    def recording(run, slices, case_ids, *args, **kwargs):
        with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
            json.dump(list(case_ids), handle)
        return real(run, slices, case_ids, *args, **kwargs)

    evaluate_module.evaluate_volumes = recording
    metrics = evaluate_module.evaluate("lite_medsam", root, "box", progress=False)
    with open(os.path.join(out, f"metrics{rank}.json"), "w") as handle:
        json.dump(metrics["mean_dice"], handle)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_each_rank_scores_only_its_share_of_the_volumes(tmp_path):
    import torch.multiprocessing as mp

    root = write_msd(tmp_path / "data", cases=3, shape=(24, 20, 6))
    mp.spawn(_rank_worker, args=(2, _free_port(), str(root), str(tmp_path)), nprocs=2, join=True)
    shares = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(shares[0] + shares[1]) == ["case0", "case1", "case2"] and not set(shares[0]) & set(shares[1])
    # both ranks return the gathered result
    assert (tmp_path / "metrics0.json").read_text() == (tmp_path / "metrics1.json").read_text()


@pytest.mark.slow
def test_a_rerun_evaluation_skips_finished_volumes_and_gives_the_same_report(tmp_path, monkeypatch):
    import samadapt.eval.evaluate as evaluate_module

    root = write_msd(tmp_path / "data", cases=3, shape=(24, 20, 6))
    first = samadapt.evaluate("lite_medsam", root, "box", out=tmp_path / "report", progress=False)
    finished = sorted((tmp_path / "report" / ".finished").glob("*/*.json"))
    assert [p.name for p in finished] == ["case0.json", "case1.json", "case2.json"]
    finished[1].unlink()  # as if the job had been killed while scoring case1
    scored = []
    real = evaluate_module.predict_slice
    monkeypatch.setattr(
        evaluate_module, "predict_slice", lambda p, r, item, *a: scored.append(item["case"]) or real(p, r, item, *a)
    )
    again = samadapt.evaluate("lite_medsam", root, "box", out=tmp_path / "report", progress=False)
    assert set(scored) == {"case1"}
    assert again["mean_dice"] == pytest.approx(first["mean_dice"]) and again["cases"] == 3
    # another protocol is another key: nothing reused
    samadapt.evaluate("lite_medsam", root, "point:1", out=tmp_path / "report", progress=False)
    assert {"case0", "case2"} <= set(scored)
