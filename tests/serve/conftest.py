"""Fixtures of the app tests: a small NIfTI case under a temporary --root, workspaces on a tiny or the real model."""

import contextlib

import nibabel as nib
import numpy as np
import pytest

from samadapt.inference import load_predictor
from samadapt.runs import Run
from samadapt.serve import Workspace
from tests.conftest import make_tiny_sam

LOCAL = "http://127.0.0.1:8000"  # the test clients' address: the app answers loopback names only

AFFINE = np.array([[-0.8, 0, 0, 10.0], [0, 0.9, 0, -20.0], [0, 0, 2.5, 5.0], [0, 0, 0, 1]])


@pytest.fixture
def root(tmp_path):
    """--root with one (Z, Y, X) = (6, 48, 64) NIfTI case: a bright disc on slices 1-4, and a dataset-free folder."""
    folder = tmp_path / "root"
    (folder / "scans").mkdir(parents=True)
    zz, yy, xx = np.mgrid[:6, :48, :64]
    volume = 100.0 + 20 * np.sin(xx / 5.0)
    volume[(1 <= zz) & (zz <= 4) & ((yy - 24) ** 2 + (xx - 30) ** 2 < 100)] = 900.0
    nib.save(nib.Nifti1Image(volume.transpose(2, 1, 0).astype(np.float32), AFFINE), folder / "scans" / "disc.nii.gz")
    return folder


@pytest.fixture
def tiny_run():
    return Run(model=make_tiny_sam(img_size=128), name="tiny")


@pytest.fixture
def workspace(root, tmp_path, tiny_run):
    ws = Workspace(load_predictor(tiny_run, device="cpu"), roots=[root], state_dir=tmp_path / "state", device="cpu")
    yield ws
    ws.close()


@contextlib.contextmanager
def running(app):
    """``app`` served by a real uvicorn server on a free port of 127.0.0.1, in a thread: yields its port."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)
