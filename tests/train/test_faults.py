"""Fault injection: real training processes killed at chosen moments, then resumed, end exactly where an
uninterrupted run ends; a full disk or a forbidden folder stops a run with its earlier checkpoints intact; damaged
checkpoints are skipped; one job per run directory."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from samadapt.errors import RunDirectoryBusyError, TrainingError
from samadapt.train.checkpoints import CheckpointStore, sealed_step
from samadapt.train.lock import RunLock

ROOT = Path(__file__).resolve().parents[2]
PYTHONPATH = os.pathsep.join([str(ROOT / "src"), str(ROOT)])  # this tree's samadapt, whatever is installed


def job(run_dir, *args, check=True, wait=True):
    command = [sys.executable, "-m", "tests.train.fault_job", str(run_dir), *args]
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            encoding="utf-8",
            errors="replace",
        )
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=300, check=False
    )
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("clean")
    job(run_dir)
    return torch.load(run_dir / "final.pt")


def assert_same_run(run_dir, reference):
    result = torch.load(run_dir / "final.pt")
    assert result["losses"] == reference["losses"]
    assert result["params"].keys() == reference["params"].keys()
    for name, value in reference["params"].items():
        assert torch.equal(result["params"][name], value), name


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill_in_step:4", "kill_in_save:3", "kill_between_renames:5"])
def test_a_killed_job_resumes_to_exactly_the_uninterrupted_run(tmp_path, uninterrupted, fault):
    killed = job(tmp_path, "--fault", fault, check=False)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "final.pt").exists()
    resumed = job(tmp_path, "--resume")
    assert "resumed from" in resumed.stdout
    assert_same_run(tmp_path, uninterrupted)
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in lines[1:]] == [str(k) for k in range(1, 7)]  # no step logged twice


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_stops(tmp_path, uninterrupted):
    stopped = job(tmp_path, "--fault", "sigterm_in_step:3", check=False)
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert "stopped by SIGTERM at step 3" in stopped.stderr
    assert sealed_step(tmp_path / "checkpoints" / "last") == 3
    job(tmp_path, "--resume")
    assert_same_run(tmp_path, uninterrupted)


@pytest.mark.slow
def test_a_second_job_on_the_same_directory_is_refused_while_the_first_runs(tmp_path):
    first = job(tmp_path, "--fault", "hold:240", wait=False)  # holds until released below, however slow the machine
    deadline = time.time() + 60
    while not (tmp_path / ".lock").exists() or not (tmp_path / ".lock").read_text():
        assert time.time() < deadline and first.poll() is None
        time.sleep(0.2)
    second = job(tmp_path, check=False)
    assert second.returncode != 0
    assert f"in use by process {first.pid}" in second.stderr
    (tmp_path / "release").touch()
    first.wait(timeout=300)
    assert first.returncode == 0
    job(tmp_path, "--resume")  # the lock went with the first job: a new one takes the directory


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, encoding="utf-8", errors="replace"
    )
    (tmp_path / ".lock").write_text(f'{{"pid": {dead.stdout.strip()}, "host": "here"}}')
    with RunLock(tmp_path), pytest.raises(RunDirectoryBusyError, match=f"process {os.getpid()}"):
        RunLock(tmp_path).acquire()


# a job holding the lock forks a child (as a DataLoader forks its workers) and is killed; the child lives on
FORK_THEN_DIE = """
import os, signal, sys, time
from samadapt.train.lock import RunLock
lock = RunLock(sys.argv[1])
lock.acquire()
child = os.fork()
if child == 0:
    quiet = os.open(os.devnull, os.O_RDWR)
    os.dup2(quiet, 1)  # the output pipes close with the job, for its caller to see the end
    os.dup2(quiet, 2)
    time.sleep(120)
    os._exit(0)
print(child, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""

# a process that holds the lock file's flock while the file names another process (one that has ended)
HOLD_FOR_DEAD = """
import fcntl, json, socket, sys, time
handle = open(sys.argv[1] + "/.lock", "a+")
fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
handle.write(json.dumps({"pid": int(sys.argv[2]), "host": socket.gethostname(), "since": "then"}))
handle.flush()
print("held", flush=True)
time.sleep(120)
"""


def ended(pid: int) -> bool:
    """Gone, or a zombie nobody reaped (an orphan whose new parent does not wait for it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_child_forked_by_a_killed_job_does_not_keep_its_lock(tmp_path):
    env = {**os.environ, "PYTHONPATH": PYTHONPATH}
    killed = subprocess.run(
        [sys.executable, "-c", FORK_THEN_DIE, str(tmp_path)], capture_output=True, encoding="utf-8", env=env
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    child = int(killed.stdout)
    try:
        assert not ended(child)  # the forked child outlives the job ...
        with RunLock(tmp_path):  # ... yet the directory is free at once
            assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_refusal_says_when_the_recorded_process_has_ended(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_FOR_DEAD, str(tmp_path), str(dead_pid)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirectoryBusyError) as refused:
            RunLock(tmp_path).acquire()
        message = str(refused.value)
        assert f"process {dead_pid} is no longer running, but processes {holder.pid} still hold it" in message
        assert f"kill {holder.pid}" in message
    finally:
        holder.kill()
        holder.wait()
    with RunLock(tmp_path):  # the holder gone, the directory is free
        pass


@pytest.fixture(scope="module")
def disk_data(tmp_path_factory):
    from tests.data.test_synthesis import write_tiny_msd

    return write_tiny_msd(tmp_path_factory.mktemp("disk") / "tiny")


@pytest.mark.slow
@pytest.mark.parametrize("loop", ["train", "pretrain"])
def test_kill_with_loader_workers_then_resume_at_once(tmp_path_factory, disk_data, loop):
    """kill -9 of a job reading its slices with 2 DataLoader workers (a real run's default): the workers end with
    it, ``--resume`` started at once is not refused, and it ends with the uninterrupted run's weights."""
    mode = ["--data", str(disk_data), "--workers", "2", *(["--pretrain"] if loop == "pretrain" else [])]
    clean = tmp_path_factory.mktemp(f"{loop}-clean")
    job(clean, *mode)
    run_dir = tmp_path_factory.mktemp(f"{loop}-killed")
    killed = job(run_dir, *mode, "--fault", "kill_in_step:4", check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = job(run_dir, *mode, "--resume", wait=False)  # at once: no wait for the workers
    workers = [int(pid) for pid in (run_dir / "workers.txt").read_text().split()]
    assert len(workers) == 2
    deadline = time.time() + 5
    while not all(ended(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert all(ended(pid) for pid in workers), "loader workers outlived their killed job"
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert "resumed from" in out and "at step 3" in out
    assert_same_run(run_dir, torch.load(clean / "final.pt"))


def small_trainer(run_dir, **overrides):
    from tests.train.test_trainer import make_trainer

    return make_trainer(run_dir, **{"train.val_every": 0, "train.checkpoint_every": 1, **overrides})


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_a_failed_save_stops_the_run_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, code):
    trainer = small_trainer(tmp_path)
    save = torch.save

    def failing(obj, path, *args, **kwargs):
        if trainer.step == 2:
            raise OSError(code, os.strerror(code), str(path))
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing)
    with pytest.raises(TrainingError, match=f"step 2.*{os.strerror(code)}"):
        trainer.fit()
    assert trainer.step == 2  # it stopped instead of training on without a checkpoint
    assert sealed_step(tmp_path / "checkpoints" / "last") == 1
    assert not (tmp_path / "checkpoints" / ".last.tmp").exists()
    assert (tmp_path / "config.yaml").exists()
    monkeypatch.setattr(torch, "save", save)
    again = small_trainer(tmp_path)
    assert again.resume() and again.step == 1


def test_a_corrupted_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    trainer = small_trainer(tmp_path, **{"train.steps": 3})
    trainer.fit()
    last = tmp_path / "checkpoints" / "last" / "adapter_model.safetensors"
    data = bytearray(last.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit in the newest adapter
    last.write_bytes(bytes(data))
    assert CheckpointStore(tmp_path / "checkpoints").newest_intact()[1] == 2
    again = small_trainer(tmp_path, **{"train.steps": 3})
    with caplog.at_level("WARNING"):
        assert again.resume()
    assert again.step == 2
    assert "damaged" in caplog.text


@pytest.mark.slow
def test_folder_prediction_killed_mid_write_then_rerun_gives_the_uninterrupted_labels(tmp_path, disk_data):
    from samadapt.data.io import read_volume

    mode = ["--data", str(disk_data), "--predict"]
    job(tmp_path / "clean", *mode)
    killed = job(tmp_path / "killed", *mode, "--fault", "kill_in_write:2", check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    out = tmp_path / "killed" / "predictions"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["a.nii.gz"]  # b: no final file
    job(tmp_path / "killed", *mode)  # the same command again, at once
    for name in ("a.nii.gz", "b.nii.gz"):
        expected = read_volume(tmp_path / "clean" / "predictions" / name)
        again = read_volume(out / name)
        assert (again.array == expected.array).all() and (again.affine == expected.affine).all(), name
