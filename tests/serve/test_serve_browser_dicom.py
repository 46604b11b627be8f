"""The page in real Chromium on a DICOM folder of two series: both listed, one opened, a click segments, and the
format menu (shown for DICOM cases only) saves a DICOM SEG and an RT Structure Set that read back to the labels."""

import socket
import threading
import time

import numpy as np
import pytest

from samadapt.data.dicom_out import read_seg
from samadapt.data.rtstruct import read_rtstruct
from tests.data.dicom_series import ct_case, mr_case, write_series
from tests.serve.test_serve_browser import ARGS, CHROMIUM, _browser_or_skip, at, idle, wait_status

pytestmark = pytest.mark.slow


@pytest.fixture
def dicom_server(root, tmp_path, tiny_run):
    import uvicorn

    from samadapt.inference import load_predictor
    from samadapt.serve import Workspace, create_app

    write_series(ct_case()[0], root / "export", "CT", series_number=2)
    write_series(mr_case()[0], root / "export", "MR", series_number=4)
    workspace = Workspace(
        load_predictor(tiny_run, device="cpu"), roots=[root], state_dir=tmp_path / "state", device="cpu"
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(create_app(workspace), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started and time.time() < deadline:
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{port}", "workspace": workspace, "root": root}
    uv.should_exit = True
    thread.join(10)
    workspace.close()


def test_dicom_case_saves_seg_and_rtstruct_from_the_format_menu(dicom_server):
    sync_playwright = _browser_or_skip()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.set_default_timeout(120_000)
        page.goto(dicom_server["url"])
        options = page.locator("[data-testid=case] option")
        options.first.wait_for(state="attached")
        names = options.all_inner_texts()
        assert "root/export/ (DICOM CT #2 CT crop)" in names and "root/export/ (DICOM MR #4 MR crop)" in names
        value = options.nth(names.index("root/export/ (DICOM CT #2 CT crop)")).get_attribute("value")
        page.get_by_test_id("case").select_option(value)
        page.get_by_test_id("open").click()
        wait_status(page, "opened ")
        assert page.get_by_test_id("save-format").is_visible()
        viewer = page.get_by_test_id("viewer").bounding_box()
        point = at(page, 30, 30)
        page.mouse.click(viewer["x"] + point["x"], viewer["y"] + point["y"])
        wait_status(page, "mask: ")
        saved = {}
        for label, suffix in (("DICOM SEG", ".seg.dcm"), ("RTSTRUCT", "_rtstruct.dcm")):
            page.get_by_test_id("save-format").select_option(label=label)
            assert page.get_by_test_id("save-path").input_value() == "export_s2" + suffix
            page.get_by_test_id("save").click()
            saved[label] = wait_status(page, "saved ").removeprefix("saved ")
            idle(page)
        browser.close()
    session = next(iter(dicom_server["workspace"].sessions.values()))
    labels = session.labels
    assert labels.sum() > 0
    np.testing.assert_array_equal(read_seg(saved["DICOM SEG"], session.volume)[0], labels)
    np.testing.assert_array_equal(read_rtstruct(saved["RTSTRUCT"], session.volume)[0], labels)
