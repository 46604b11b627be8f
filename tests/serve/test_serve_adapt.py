"""Annotate -> adapt: finished slices become an MSD training set, a recipe trains in a background job, and the page's
model switches to the new run with the base model kept one click away."""

import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from samadapt.data.datasets import load_dataset
from samadapt.data.io import read_label, read_volume
from samadapt.serve import Workspace, create_app
from samadapt.serve.adapt import training_set
from tests.serve.conftest import LOCAL


def test_training_set_holds_the_finished_slices(workspace, root, tmp_path):
    session = workspace.open(root / "scans" / "disc.nii.gz")
    with pytest.raises(ValueError, match="no finished slice"):
        training_set(session, tmp_path / "empty")
    session.labels[2, 10:20, 20:30] = 1
    session.labels[:, 5, 7] = 2  # a column, seen from axis 2
    session.add_object("rim", 2)
    session.finished |= {(0, 2), (2, 7), (1, 40)}  # row 40 holds nothing: left out
    spec = load_dataset(training_set(session, tmp_path / "set"))
    assert [c.id for c in spec.cases] == ["slice_a0_0002", "slice_a2_0007"]
    assert spec.classes == {1: "object 1", 2: "rim"} and spec.preprocessing == "percentile_slice"
    image, label = read_volume(spec.cases[1].image), read_label(spec.cases[1].label)
    np.testing.assert_array_equal(image.array[0], session.raw(2, 7))
    np.testing.assert_array_equal(label.array[0], session.plane(2, 7))
    assert image.spacing == pytest.approx((1.0, 2.5, 0.9))  # (z, y, x) spacing of the (Z, Y) plane of axis 2


@pytest.mark.slow
def test_adapt_job_switches_the_model(demo_data, tmp_path):
    from samadapt.inference import load_predictor

    workspace = Workspace(load_predictor("lite_medsam", device="cpu"), demo=demo_data, state_dir=tmp_path, device="cpu")
    client = TestClient(create_app(workspace), base_url=LOCAL)
    image = demo_data["lesions"] / "imagesTr" / "brain1.nrrd"
    sid = client.post("/api/open", json={"path": str(image)}).json()["session"]
    session = workspace.session(sid)
    truth = read_label(demo_data["lesions"] / "labelsTr" / "brain1.nrrd").array > 0
    for index in (12, 16):  # as if finished by hand
        session.plane(0, index)[...] = truth[index]
        session.finished.add((0, index))
    job = client.post("/api/adapt", json={"session": sid, "recipe": "cheap-lunch", "steps": 1}).json()
    while job["state"] == "running":
        time.sleep(0.5)
        job = client.get(f"/api/jobs/{job['id']}").json()
    assert job["state"] == "done", job
    assert job["result"]["slices"] == 2 and job["done"] == job["total"] == 1
    info = client.get("/api/info").json()
    assert info["current"] == job["result"]["run"] and info["runs"] == ["lite_medsam", job["result"]["run"]]
    assert workspace.run.base_model == "lite_medsam" and workspace.run.manifest is not None
    back = client.post("/api/model", json={"run": "lite_medsam"}).json()
    assert back["current"] == "lite_medsam" and workspace.run.path is None
    workspace.close()
