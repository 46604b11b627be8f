"""The app's volume jobs: propagation keeps what the user decided, a corrective click is carried to the neighbours
until the change dies out, and "complete volume" labels the rest from the finished slices without touching them.

Propagation runs on a stand-in decoder with a known answer (the bright voxels inside the box, minus a disc around
each negative click), so the expected labels are exact; completion trains the real LiteMedSAM (slow)."""

import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from samadapt.prediction import Prediction
from samadapt.runs import Run
from samadapt.serve import Workspace, create_app
from tests.conftest import make_tiny_sam
from tests.serve.conftest import LOCAL


class BrightInBox:
    """Answers a box with the slice's bright pixels (> 0.5 after preprocessing) inside it, less a radius-4 disc
    around each negative click; score 0.9. The disc case's answer on slices 1-4 is the disc."""

    cache_size = 0

    def __init__(self):
        self.run = Run(model=make_tiny_sam(img_size=128), name="stand-in")
        self.image, self.asked = None, []

    def is_cached(self, key) -> bool:
        return False

    def set_image(self, image, preprocessed=False, cache_key=None):
        self.image, self.index = np.asarray(image), cache_key[2]

    def predict(self, points=None, labels=None, boxes=None, mask_input=None, multimask_output=None, text=None):
        self.asked.append(self.index)
        gray = self.image if self.image.ndim == 2 else self.image[..., 0]
        mask = np.zeros(gray.shape, bool)
        if boxes is not None:
            x0, y0, x1, y1 = (int(round(float(v))) for v in np.asarray(boxes).ravel()[:4])
            mask[y0 : y1 + 1, x0 : x1 + 1] = gray[y0 : y1 + 1, x0 : x1 + 1] > 0.5
        yy, xx = np.mgrid[: gray.shape[0], : gray.shape[1]]
        for (x, y), label in zip(
            points if points is not None else [], labels if labels is not None else [], strict=True
        ):
            if label == 0:
                mask &= (yy - y) ** 2 + (xx - x) ** 2 > 16
        return Prediction(mask[None, None], np.full((1, 1), 0.9, np.float32), np.zeros((1, 1, 8, 8), np.float32))


@pytest.fixture
def stand_in(root, tmp_path):
    predictor = BrightInBox()
    ws = Workspace(predictor, roots=[root], state_dir=tmp_path / "state", device="cpu")
    yield ws, predictor, TestClient(create_app(ws), base_url=LOCAL)
    ws.close()


def finish(client, body: dict) -> dict:
    job = client.post(*body).json() if isinstance(body, tuple) else body
    while job["state"] == "running":
        time.sleep(0.05)
        job = client.get(f"/api/jobs/{job['id']}").json()
    assert job["state"] == "done", job
    return job


def start(client, route: str, **body) -> dict:
    response = client.post(route, json=body)
    assert response.status_code == 200, response.text
    return finish(client, response.json())


def open_case(client, root) -> tuple[str, dict]:
    sid = client.post("/api/open", json={"path": str(root / "scans" / "disc.nii.gz")}).json()["session"]
    return sid, {"session": sid, "axis": 0}


def disc(shape=(48, 64)) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - 24) ** 2 + (xx - 30) ** 2 < 100


def test_propagation_keeps_the_users_slices_and_other_objects(stand_in, root):
    ws, _, client = stand_in
    sid, at = open_case(client, root)
    session = ws.session(sid)
    box = [18, 12, 42, 36]
    client.post("/api/prompt", json={**at, "index": 2, "object": 1, "box": box})
    np.testing.assert_array_equal(session.plane(0, 2) == 1, disc())
    client.post("/api/objects", json={**at, "index": 0})  # object 2
    session.plane(0, 3)[20:30, 25:35] = 2  # another object's voxels inside the disc on slice 3
    client.post("/api/prompt", json={**at, "index": 4, "object": 1, "box": box})
    client.post("/api/erase", json={**at, "index": 4, "object": 1})  # "not on slice 4": the user's decision
    assert (0, 4) in session.finished

    job = start(client, "/api/propagate", **at, index=2, object=1)
    assert job["result"]["slices"] == [1, 3]  # stops at the erased slice 4, and past the disc's end at 0
    np.testing.assert_array_equal(session.plane(0, 1) == 1, disc())
    np.testing.assert_array_equal(session.plane(0, 3) == 1, disc() & (session.plane(0, 3) != 2))
    assert (session.plane(0, 3) == 2).sum() == 100  # object 2 kept
    assert not session.plane(0, 4).any() and not session.plane(0, 5).any()

    client.post("/api/undo", json={**at, "index": 2})
    job = start(client, "/api/propagate", **at, index=2, object=1, overwrite=True)
    np.testing.assert_array_equal(session.plane(0, 3) == 1, disc())  # asked to: object 1 takes object 2's voxels
    assert not session.plane(0, 4).any()  # the erased slice is the user's even then


def test_a_corrective_click_is_carried_until_the_change_dies_out(stand_in, root):
    ws, predictor, client = stand_in
    sid, at = open_case(client, root)
    session = ws.session(sid)
    first = client.post("/api/prompt", json={**at, "index": 2, "object": 1, "box": [18, 12, 42, 36]}).json()
    assert first["neighbours"] is False  # nothing to carry yet
    start(client, "/api/propagate", **at, index=2, object=1)
    assert [i for i in range(6) if session.plane(0, i).any()] == [1, 2, 3, 4]
    session.plane(0, 3)[:, 30:] = 0  # a poor propagation: slice 3 lost the disc's right half
    before = session.labels.copy()

    # a negative click on slice 2 trims the disc's top; the neighbours are re-propagated
    clicked = client.post("/api/prompt", json={**at, "index": 2, "object": 1, "point": [30, 15, 0]}).json()
    assert clicked["neighbours"] is True
    trimmed = session.plane(0, 2) == 1
    assert trimmed.sum() < disc().sum()
    predictor.asked.clear()
    job = start(client, "/api/propagate", **at, index=2, object=1, settle=True)
    # slice 3: re-segmented with slice 2's box widened to its own: the whole disc again (it changed: go on);
    # slice 4 comes back as it was (settled: stop); slice 1 likewise at once; slices 0 and 5 never asked
    assert predictor.asked == [3, 4, 1]
    np.testing.assert_array_equal(session.plane(0, 3) == 1, disc())
    for i in (0, 1, 4, 5):
        np.testing.assert_array_equal(session.plane(0, i), before[i])
    np.testing.assert_array_equal(session.plane(0, 2) == 1, trimmed)  # the clicked slice is the user's
    assert sorted(job["result"]["slices"]) == [1, 3, 4]


def test_a_click_on_a_carried_slice_corrects_its_mask(stand_in, root):
    """A first click on a slice the object was propagated to starts from that mask's box (without it, the click
    alone would be the prompt); a positive click beyond the box widens it, a drawn box replaces it."""
    from samadapt.prompts import box_from_mask

    ws, _, client = stand_in
    sid, at = open_case(client, root)
    session = ws.session(sid)
    client.post("/api/prompt", json={**at, "index": 2, "object": 1, "box": [18, 12, 42, 36]})
    start(client, "/api/propagate", **at, index=2, object=1)
    client.post("/api/prompt", json={**at, "index": 3, "object": 1, "point": [30, 15, 0]})
    yy, xx = np.mgrid[:48, :64]
    np.testing.assert_array_equal(session.plane(0, 3) == 1, disc() & ((yy - 15) ** 2 + (xx - 30) ** 2 > 16))
    assert session.prompts[(1, 0, 3)]["box"] == [float(v) for v in box_from_mask(disc())]
    client.post("/api/prompt", json={**at, "index": 1, "object": 1, "point": [50, 24, 1]})
    assert session.prompts[(1, 0, 1)]["box"][2] == 52.0  # pulled out to the click, 2 px beyond
    client.post("/api/prompt", json={**at, "index": 1, "object": 1, "box": [25, 20, 35, 28]})
    assert session.prompts[(1, 0, 1)] == {"points": [[50.0, 24.0, 1]], "box": [25.0, 20.0, 35.0, 28.0]}


def test_a_carried_correction_never_moves_the_objects_ends(stand_in, root):
    ws, predictor, client = stand_in
    sid, at = open_case(client, root)
    session = ws.session(sid)
    client.post("/api/prompt", json={**at, "index": 2, "object": 1, "box": [18, 12, 42, 36]})
    start(client, "/api/propagate", **at, index=2, object=1)
    session.plane(0, 4)[...] = 0  # the object now ends at slice 3 (slice 4 holds the disc in the image)
    session.plane(0, 3)[:, 30:] = 0  # and slice 3 is poor: a correction will change it
    client.post("/api/prompt", json={**at, "index": 2, "object": 1, "point": [30, 15, 0]})
    predictor.asked.clear()
    start(client, "/api/propagate", **at, index=2, object=1, settle=True)
    assert predictor.asked == [3, 1]  # slice 3 changed, but slice 4 lies past the object's end
    assert not session.plane(0, 4).any()


def test_re_propagation_without_a_carried_neighbour_changes_nothing(stand_in, root):
    ws, predictor, client = stand_in
    sid, at = open_case(client, root)
    session = ws.session(sid)
    client.post("/api/prompt", json={**at, "index": 2, "object": 1, "box": [18, 12, 42, 36]})
    predictor.asked.clear()
    job = start(client, "/api/propagate", **at, index=2, object=1, settle=True)
    assert job["result"]["slices"] == [] and predictor.asked == []
    assert [i for i in range(6) if session.plane(0, i).any()] == [2]


def test_complete_refuses_without_a_finished_slice(stand_in, root):
    _, _, client = stand_in
    _, at = open_case(client, root)
    response = client.post("/api/complete", json={**at, "index": 0, "steps": 2})
    assert response.status_code == 400 and "label a few slices first" in response.json()["detail"]


@pytest.mark.slow
def test_complete_volume_keeps_the_finished_slices_and_the_labels_there(root, tmp_path):
    """LiteMedSAM adapted on two finished slices of the disc case (two steps, then one): the finished slices stay bit for
    bit, a propagated label elsewhere stays unless asked, and every other voxel is the adapted run's prediction."""
    from samadapt.data.io import read_volume
    from samadapt.inference import load_predictor
    from samadapt.predict import predict_volume
    from samadapt.runs import load_run

    ws = Workspace(load_predictor("lite_medsam", device="cpu"), roots=[root], state_dir=tmp_path / "s", device="cpu")
    client = TestClient(create_app(ws), base_url=LOCAL)
    try:
        sid, at = open_case(client, root)
        session = ws.session(sid)
        for index in (1, 4):  # the user's slices: the disc, drawn by hand
            client.post("/api/erase", json={**at, "index": index, "object": 1})
            session.plane(0, index)[disc()] = 1
        session.plane(0, 2)[0:5, 0:5] = 1  # a propagated label on an unfinished slice
        user = session.labels.copy()

        job = start(client, "/api/complete", **at, index=0, steps=2)
        assert job["result"]["given"] == [1, 4]
        run = load_run(job["result"]["run"], checkpoint="last", device="cpu")
        assert run.task == "semantic" and run.base_model == "lite_medsam"
        volume = read_volume(root / "scans" / "disc.nii.gz")
        predicted = predict_volume(run, volume, preprocessing=session.preset, axis=0, device="cpu")
        for index in (1, 4):
            np.testing.assert_array_equal(session.plane(0, index), user[index])
        expected = np.where(user != 0, user, predicted)
        expected[[1, 4]] = user[[1, 4]]
        np.testing.assert_array_equal(session.labels, expected)
        assert job["result"]["voxels"] == int((expected != user).sum())

        client.post("/api/undo", json={**at, "index": 0})
        np.testing.assert_array_equal(session.labels, user)
        job = start(client, "/api/complete", **at, index=0, steps=1, overwrite=True)
        run = load_run(job["result"]["run"], checkpoint="last", device="cpu")
        predicted = predict_volume(run, volume, preprocessing=session.preset, axis=0, device="cpu")
        expected = predicted.copy()
        expected[[1, 4]] = user[[1, 4]]
        np.testing.assert_array_equal(session.labels, expected)
    finally:
        ws.close()
