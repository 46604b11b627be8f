"""The app's API on a tiny random model: prompts give the library's masks, edits undo, files stay inside --root."""

import os
import time

import nibabel as nib
import numpy as np
import pytest
from fastapi.testclient import TestClient

from samadapt.data.io import read_volume
from samadapt.data.preprocess import preprocess_volume, volume_slice
from samadapt.inference import load_predictor
from samadapt.predict import Predictor
from samadapt.serve import Workspace, create_app
from samadapt.serve.app import plane_payload
from tests.serve.conftest import LOCAL


def labels_of(payload: dict) -> np.ndarray:
    import base64

    raw = base64.b64decode(payload["labels"])
    return np.frombuffer(raw, "<u2").reshape(payload["h"], payload["w"])


@pytest.fixture
def client(workspace):
    return TestClient(create_app(workspace), base_url=LOCAL)


def open_disc(client, root) -> dict:
    response = client.post("/api/open", json={"path": str(root / "scans" / "disc.nii.gz")})
    assert response.status_code == 200, response.text
    return response.json()


def test_cases_listed_and_opened(client, root):
    info = client.get("/api/info").json()
    assert [c["name"] for c in info["cases"]] == ["root/scans/disc.nii.gz"]
    summary = open_disc(client, root)
    assert summary["shape"] == [6, 48, 64] and summary["objects"] == {"1": {"name": "object 1", "color": "#e6194b"}}
    pixels = client.get(f"/api/slice/{summary['session']}?axis=2&index=30")
    assert pixels.headers["x-shape"] == "6,48,1"
    stored = read_volume(root / "scans" / "disc.nii.gz").array
    np.testing.assert_array_equal(np.frombuffer(pixels.content, "<f4").reshape(6, 48), stored[:, :, 30])


@pytest.mark.parametrize(
    "path",
    ["/etc/passwd", "{root}/../outside.nii.gz", "{root}/scans/../../outside.nii.gz", "{root}/link/secret.nii.gz"],
)
def test_paths_outside_root_are_refused(client, root, path):
    outside = root.parent / "outside"
    outside.mkdir(exist_ok=True)
    (root / "link").symlink_to(outside, target_is_directory=True)
    response = client.post("/api/open", json={"path": path.format(root=root)})
    assert response.status_code == 403 and "outside the folders" in response.json()["detail"]


def test_save_outside_root_refused_and_no_silent_overwrite(client, root):
    sid = open_disc(client, root)["session"]
    for path in ["/tmp/x.nii.gz", "../../x.nii.gz", str(root.parent / "x.nii.gz")]:
        assert client.post("/api/save", json={"session": sid, "path": path}).status_code == 403
    first = client.post("/api/save", json={"session": sid}).json()["path"]
    assert first == str(root / "labels" / "disc.nii.gz")
    again = client.post("/api/save", json={"session": sid})
    assert again.status_code == 409 and "exists" in again.json()["detail"]
    assert client.post("/api/save", json={"session": sid, "overwrite": True}).status_code == 200


def test_unreadable_file_gives_a_clear_message(client, root):
    (root / "scans" / "broken.nii.gz").write_bytes(b"not a nifti")
    response = client.post("/api/open", json={"path": str(root / "scans" / "broken.nii.gz")})
    assert response.status_code == 422 and "broken.nii.gz" in response.json()["detail"]
    assert client.post("/api/open", json={"path": str(root / "nothing.nii.gz")}).status_code == 404


def test_prompt_equals_predictor_and_undo_redo(client, root, workspace, tiny_run):
    summary = open_disc(client, root)
    sid = summary["session"]
    body = {"session": sid, "axis": 0, "index": 2, "object": 1}
    first = client.post("/api/prompt", json={**body, "point": [30, 24, 1]}).json()
    second = client.post("/api/prompt", json={**body, "point": [5, 5, 0]}).json()
    volume = read_volume(root / "scans" / "disc.nii.gz")
    image = volume_slice(preprocess_volume(volume.array, summary["preset"]), 2, 0, summary["preset"])
    predictor = Predictor.for_run(tiny_run, "cpu")
    predictor.set_image(image, preprocessed=True)
    expected = predictor.predict(points=np.array([[30, 24], [5, 5]]), labels=np.array([1, 0])).masks[0, 0]
    np.testing.assert_array_equal(labels_of(second) == 1, expected)
    assert second["encoded"] is False  # the slice was encoded by the first click
    assert second["prompts"] == [{"object": 1, "points": [[30, 24, 1], [5, 5, 0]], "box": None}]
    undone = client.post("/api/undo", json=body).json()
    np.testing.assert_array_equal(labels_of(undone), labels_of(first))
    assert len(undone["prompts"][0]["points"]) == 1
    redone = client.post("/api/redo", json=body).json()
    np.testing.assert_array_equal(labels_of(redone), labels_of(second))
    box = client.post("/api/prompt", json={**body, "box": [40, 35, 20, 14]}).json()
    assert box["prompts"][0]["box"] == [20, 14, 40, 35]
    erased = client.post("/api/erase", json=body).json()
    assert not labels_of(erased).any() and erased["prompts"] == []


def test_objects_do_not_erase_each_other(client, root, workspace):
    sid = open_disc(client, root)["session"]
    added = client.post("/api/objects", json={"session": sid, "axis": 0, "index": 2, "name": "rim"}).json()
    assert added["object"] == 2 and added["objects"]["2"]["name"] == "rim"
    session = workspace.session(sid)
    session.plane(0, 2)[:5, :5] = 1  # as if drawn
    client.post("/api/prompt", json={"session": sid, "axis": 0, "index": 2, "object": 2, "box": [20, 14, 40, 35]})
    plane = session.plane(0, 2)
    assert set(np.unique(plane)) <= {0, 1, 2}
    assert plane.sum() > 0


def test_autosave_survives_a_killed_server(root, tmp_path, tiny_run):
    first = Workspace(load_predictor(tiny_run, device="cpu"), roots=[root], state_dir=tmp_path / "state", device="cpu")
    client = TestClient(create_app(first), base_url=LOCAL)
    sid = open_disc(client, root)["session"]
    client.post("/api/prompt", json={"session": sid, "axis": 0, "index": 3, "object": 1, "box": [20, 14, 40, 35]})
    drawn = first.session(sid).labels.copy()
    target = first.autosave_path(first.session(sid).path)
    deadline = time.time() + 10
    while not target.exists() and time.time() < deadline:
        time.sleep(0.1)
    first._stop.set()  # "killed": no close(), no final flush
    second = Workspace(load_predictor(tiny_run, device="cpu"), roots=[root], state_dir=tmp_path / "state", device="cpu")
    restored = TestClient(create_app(second), base_url=LOCAL).post(
        "/api/open", json={"path": str(root / "scans" / "disc.nii.gz")}
    )
    assert restored.json()["restored"] is not None
    np.testing.assert_array_equal(second.session(restored.json()["session"]).labels, drawn)
    second.close()


def test_saved_file_keeps_grid_and_header(client, root, workspace):
    sid = open_disc(client, root)["session"]
    workspace.session(sid).labels[2, 10:20, 30:40] = 1
    workspace.session(sid).labels[3, 5, 6] = 7
    path = client.post("/api/save", json={"session": sid, "path": "sub/out.nii.gz"}).json()["path"]
    image = nib.load(path)
    assert image.shape == (64, 48, 6)
    np.testing.assert_allclose(image.affine, nib.load(root / "scans" / "disc.nii.gz").affine)
    data = np.asarray(image.dataobj).transpose(2, 1, 0)
    assert set(np.unique(data)) == {0, 1, 7} and data[2, 10:20, 30:40].all()


def test_propagate_job_and_its_undo(client, root, workspace):
    sid = open_disc(client, root)["session"]
    session = workspace.session(sid)
    refused = client.post("/api/propagate", json={"session": sid, "axis": 0, "index": 2, "object": 1})
    assert refused.status_code == 400 and "empty" in refused.json()["detail"]
    session.plane(0, 2)[14:35, 20:41] = 1
    job = client.post("/api/propagate", json={"session": sid, "axis": 0, "index": 2, "object": 1}).json()
    while job["state"] == "running":
        time.sleep(0.05)
        job = client.get(f"/api/jobs/{job['id']}").json()
    assert job["state"] == "done", job
    assert job["done"] == job["total"] == 5
    assert all(session.plane(0, i).any() for i in job["result"]["slices"])
    client.post("/api/undo", json={"session": sid, "axis": 0, "index": 2})
    assert session.labels.sum() == session.plane(0, 2).sum()  # only the drawn slice is left


def test_token_required_beyond_loopback(workspace, root):
    client = TestClient(create_app(workspace, token="s3cret"), base_url=LOCAL)
    assert client.get("/api/info").status_code == 403
    assert client.get("/api/info", headers={"X-Token": "s3cret"}).status_code == 200
    assert client.get("/api/info?token=s3cret").status_code == 200
    assert client.get("/").status_code == 200  # the page itself holds no data


def test_large_request_refused(client):
    response = client.post("/api/open", content=b"x" * (2 << 20), headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_serve_command_is_registered():
    from samadapt.cli import build_parser

    args = build_parser().parse_args(["serve", "--root", os.getcwd(), "--port", "8123"])
    assert args.command == "serve" and args.port == 8123 and args.host == "127.0.0.1"


def test_no_token_only_on_a_loopback_address(capsys):
    from samadapt.cli import main

    assert main(["serve", "--root", os.getcwd(), "--host", "0.0.0.0", "--no-token"]) == 2
    assert "--no-token: only on a loopback address" in capsys.readouterr().err
    assert main(["serve", "--root", os.getcwd(), "--token", "x", "--no-token"]) == 2


def test_plane_payload_round_trip(workspace, root):
    session = workspace.open(root / "scans" / "disc.nii.gz")
    session.labels[1, 2, 3] = 300
    assert labels_of(plane_payload(session, 0, 1))[2, 3] == 300


@pytest.mark.slow
def test_serve_command_starts_and_serves_the_page(root):
    import socket
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "samadapt.cli", "serve", "--root", str(root), "--port", str(port)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, encoding="utf-8", errors="replace")
    try:
        lines = [process.stderr.readline() for _ in range(1)]
        while "http://" not in lines[-1] and lines[-1] and len(lines) < 50:  # warnings may come first
            lines.append(process.stderr.readline())
        assert f"http://127.0.0.1:{port}/" in lines[-1], lines
        token = lines[-1].split("/?token=")[1].strip()  # a fresh token by default, even on 127.0.0.1
        assert len(token) >= 20
        deadline, page = time.time() + 120, ""
        while time.time() < deadline and not page:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
            except OSError:
                time.sleep(0.3)
        assert 'data-testid="viewer"' in page
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/info", timeout=5)
        assert refused.value.code == 403
        info = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/info?token={token}", timeout=5).read().decode()
        assert "disc.nii.gz" in info and "lite_medsam" in info
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/static/app.js", timeout=5).status == 200
    finally:
        process.terminate()
        process.wait(30)


@pytest.mark.parametrize("slice_position", [False, True])
def test_semantic_run_fills_the_slice(root, tmp_path, slice_position):
    from samadapt.models.mask_decoder import make_semantic_decoder
    from samadapt.runs import Run
    from tests.conftest import make_tiny_sam

    model = make_tiny_sam(img_size=128)
    make_semantic_decoder(model.mask_decoder, 2, slice_position=slice_position)
    seen: list[float] = []
    if slice_position:  # a run with model.slice_position reads the slice's position: index 2 of 6 along axis 0
        model.mask_decoder.slice_prior.register_forward_hook(lambda module, args, out: seen.extend(args[0].tolist()))
    run = Run(model=model.eval(), name="tiny", task="semantic", classes={3: "liver", 5: "spleen"})
    workspace = Workspace(load_predictor(run, device="cpu"), roots=[root], state_dir=tmp_path / "state", device="cpu")
    client = TestClient(create_app(workspace), base_url=LOCAL)
    sid = open_disc(client, root)["session"]
    answer = client.post("/api/semantic", json={"session": sid, "axis": 0, "index": 2}).json()
    assert seen == ([pytest.approx(0.4)] if slice_position else [])
    assert set(np.unique(labels_of(answer))) <= {0, 3, 5}
    assert answer["objects"] == {
        "3": {"name": "liver", "color": "#4363d8"},
        "5": {"name": "spleen", "color": "#911eb4"},
    }
    workspace.close()


def test_prompted_run_has_no_semantic_output(client, root):
    sid = open_disc(client, root)["session"]
    answer = client.post("/api/semantic", json={"session": sid, "axis": 0, "index": 2})
    assert answer.status_code == 400 and "prompted model" in answer.json()["detail"]


def test_colour_picture_opens_and_saves_as_png(client, root):
    from PIL import Image

    picture = np.zeros((40, 50, 3), np.uint8)
    picture[10:30, 15:35] = (200, 120, 40)
    Image.fromarray(picture).save(root / "photo.png")
    summary = client.post("/api/open", json={"path": str(root / "photo.png")}).json()
    assert summary["shape"] == [1, 40, 50] and summary["channels"] == 3 and summary["preset"] == "rgb"
    pixels = client.get(f"/api/slice/{summary['session']}?axis=0&index=0")
    assert pixels.headers["x-shape"] == "40,50,3"
    sid = summary["session"]
    client.post("/api/prompt", json={"session": sid, "axis": 0, "index": 0, "object": 1, "box": [15, 10, 34, 29]})
    saved = client.post("/api/save", json={"session": sid}).json()["path"]
    assert saved.endswith("photo.png") and np.asarray(Image.open(saved)).shape == (40, 50)


def test_oldest_case_dropped_after_its_autosave(workspace, root, monkeypatch):
    import shutil

    from samadapt.serve import session as session_module

    monkeypatch.setattr(session_module, "MAX_SESSIONS", 2)
    for name in ("b", "c"):
        shutil.copy(root / "scans" / "disc.nii.gz", root / "scans" / f"{name}.nii.gz")
    first = workspace.open(root / "scans" / "disc.nii.gz")
    assert workspace.open(root / "scans" / "disc.nii.gz") is first  # a reloaded page continues the session
    first.labels[1, 1, 1] = 1
    first.dirty = True
    workspace._stop.set()  # no background flush: the drop itself must write it
    workspace.open(root / "scans" / "b.nii.gz")
    workspace.open(root / "scans" / "c.nii.gz")
    with pytest.raises(KeyError, match="open the case again"):
        workspace.session(first.id)
    again = workspace.open(root / "scans" / "disc.nii.gz")
    assert again is not first and again.labels[1, 1, 1] == 1  # restored from the autosave the drop wrote


def test_dataset_under_root_lists_its_cases_with_their_class_names(client, root):
    import json
    import shutil

    task = root / "Task01_Disc"
    for part in ("imagesTr", "labelsTr"):
        (task / part).mkdir(parents=True)
        shutil.copy(root / "scans" / "disc.nii.gz", task / part / "disc.nii.gz")
    meta = {
        "labels": {"0": "background", "1": "disc", "4": "rim"},
        "modality": {"0": "CT"},
        "training": [{"image": "./imagesTr/disc.nii.gz", "label": "./labelsTr/disc.nii.gz"}],
    }
    (task / "dataset.json").write_text(json.dumps(meta))
    cases = client.get("/api/info").json()["cases"]
    assert {"name": "root/Task01_Disc / disc", "path": str(task / "imagesTr" / "disc.nii.gz")} in cases
    assert not any("labelsTr" in c["path"] for c in cases)
    summary = client.post("/api/open", json={"path": str(task / "imagesTr" / "disc.nii.gz")}).json()
    assert {k: v["name"] for k, v in summary["objects"].items()} == {"1": "disc", "4": "rim"}
    assert summary["preset"] == "ct_abdomen" and summary["window"]["default"] == [-160.0, 240.0]


def test_component_filter_switched_from_the_page(client, root, workspace, tiny_run):
    """``/api/components`` switches the page's predictor (and any model switched to later) between every component
    and those the prompt touches; the masks then equal ``Predictor``'s with the same option."""
    summary = open_disc(client, root)
    body = {"session": summary["session"], "axis": 0, "index": 2, "object": 1}
    assert client.get("/api/info").json()["keep_components"] == "all"
    refused = client.post("/api/components", json={"mode": "largest"})
    assert refused.status_code == 400 and "keep-components" in refused.json()["detail"]
    assert client.post("/api/components", json={"mode": "prompt"}).json()["keep_components"] == "prompt"
    answer = client.post("/api/prompt", json={**body, "box": [10, 10, 50, 40]}).json()
    volume = read_volume(root / "scans" / "disc.nii.gz")
    image = volume_slice(preprocess_volume(volume.array, summary["preset"]), 2, 0, summary["preset"])
    masks = {}
    for mode in ("prompt", "all"):
        predictor = Predictor.for_run(tiny_run, "cpu", keep_components=mode)
        predictor.set_image(image, preprocessed=True)
        masks[mode] = predictor.predict(boxes=np.array([10, 10, 50, 40])).masks[0, 0]
    assert (masks["prompt"] != masks["all"]).any()  # the random model's mask has pieces outside the box
    np.testing.assert_array_equal(labels_of(answer) == 1, masks["prompt"])
    workspace.use_predictor(load_predictor(tiny_run, device="cpu"))
    assert workspace.predictor.keep_components == "prompt"
